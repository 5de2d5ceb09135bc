//! Errors of the core crate.
//!
//! Every error says what was expected, what was found and where: the file, and when known the
//! shard, chunk, byte offset and sample id. The Python bindings map each variant to one class
//! of the `logitcache.StoreError` hierarchy (or to `ValueError` / `OSError` where Python users
//! expect those), so the variants here are the contract of that mapping.

use std::fmt;
use std::path::{Path, PathBuf};

/// Result alias used across the core crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where in a store something went wrong. Fields that do not apply are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    pub file: Option<PathBuf>,
    pub shard: Option<u32>,
    pub chunk: Option<u64>,
    pub offset: Option<u64>,
    pub sample_id: Option<u64>,
}

impl Location {
    pub fn file(path: impl AsRef<Path>) -> Self {
        Location { file: Some(path.as_ref().to_path_buf()), ..Default::default() }
    }
    pub fn shard(mut self, shard: u32) -> Self {
        self.shard = Some(shard);
        self
    }
    pub fn chunk(mut self, chunk: u64) -> Self {
        self.chunk = Some(chunk);
        self
    }
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
    pub fn sample(mut self, sample_id: u64) -> Self {
        self.sample_id = Some(sample_id);
        self
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        if let Some(file) = &self.file {
            parts.push(format!("file {}", file.display()));
        }
        if let Some(shard) = self.shard {
            parts.push(format!("shard {shard}"));
        }
        if let Some(chunk) = self.chunk {
            parts.push(format!("chunk {chunk}"));
        }
        if let Some(offset) = self.offset {
            parts.push(format!("byte offset {offset}"));
        }
        if let Some(sample) = self.sample_id {
            parts.push(format!("sample {sample}"));
        }
        if parts.is_empty() {
            write!(f, "<unknown location>")
        } else {
            write!(f, "{}", parts.join(", "))
        }
    }
}

/// Every failure the core can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A caller passed an argument that can never be valid (wrong shape, dtype, range).
    /// Maps to `ValueError`.
    #[error("invalid argument `{arg}`: {msg}")]
    InvalidArgument { arg: String, msg: String },

    /// A record handed to a writer breaks the store's rules (ids out of range, NaN
    /// log-probabilities, unsorted rows...). Nothing is written. Maps to `InvalidRecordError`.
    #[error("invalid record for sample {sample_id}: {msg}")]
    InvalidRecord { sample_id: u64, msg: String },

    /// A sample id that is already in the store. Maps to `DuplicateSampleError`.
    #[error("duplicate sample id {sample_id}: {msg}")]
    DuplicateSample { sample_id: u64, msg: String },

    /// A sample id that is not in the store. Maps to `MissingSampleError` (a `KeyError`).
    /// `more`: how many other requested ids are missing too, where counted.
    #[error("sample id {sample_id} is not in the store {}{}", path.display(), nor_more(*more))]
    MissingSample { sample_id: u64, path: PathBuf, more: u64 },

    /// Bytes that fail a checksum, a bound or a structural rule. Maps to `CorruptStoreError`.
    #[error("corrupt store data at {location}: {msg}")]
    Corrupt { location: Location, msg: String },

    /// A format version this build cannot read. Maps to `FormatVersionError`.
    #[error("{}: format version {found} is not supported (this build reads versions up to {supported}); upgrade logitcache", path.display())]
    UnsupportedVersion { path: PathBuf, found: u64, supported: u64 },

    /// The store does not match what the caller expects (vocabulary, tokenizer, or the
    /// configuration of an appending writer). Maps to `StoreMismatchError`.
    #[error("store {} does not match: {field} expected {expected}, found {found}", path.display())]
    Mismatch { path: PathBuf, field: String, expected: String, found: String },

    /// `mode="x"` on a path that exists. Maps to `StoreExistsError` (a `FileExistsError`).
    /// `msg` says what is there and what to do instead.
    #[error("{} {msg}", path.display())]
    StoreExists { path: PathBuf, msg: String },

    /// Another live writer holds the store's lock. Maps to `StoreLockedError`.
    #[error("store {} is locked by another writer ({msg})", path.display())]
    Locked { path: PathBuf, msg: String },

    /// An operation on a writer or reader in the wrong state (closed, aborted).
    /// Maps to `StoreError`.
    #[error("{0}")]
    State(String),

    /// An operating-system error on a path. Maps to the matching `OSError` subclass.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn nor_more(more: u64) -> String {
    if more == 0 { String::new() } else { format!(" (nor are {more} more)") }
}

impl Error {
    /// Where the error happened, as far as it is known: the `Corrupt` location, else the path
    /// and sample id a variant carries (a store directory, a manifest or a shard file).
    /// Bindings expose these fields on the exceptions they raise.
    pub fn location(&self) -> Location {
        match self {
            Error::Corrupt { location, .. } => location.clone(),
            Error::MissingSample { sample_id, path, .. } => Location::file(path).sample(*sample_id),
            Error::InvalidRecord { sample_id, .. } | Error::DuplicateSample { sample_id, .. } => {
                Location { sample_id: Some(*sample_id), ..Default::default() }
            }
            Error::UnsupportedVersion { path, .. }
            | Error::Mismatch { path, .. }
            | Error::StoreExists { path, .. }
            | Error::Locked { path, .. }
            | Error::Io { path, .. } => Location::file(path),
            Error::InvalidArgument { .. } | Error::State(_) => Location::default(),
        }
    }

    pub fn invalid_argument(arg: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument { arg: arg.into(), msg: msg.into() }
    }
    pub fn corrupt(location: Location, msg: impl Into<String>) -> Self {
        Error::Corrupt { location, msg: msg.into() }
    }
    pub fn io(op: &'static str, path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.as_ref().to_path_buf(), source }
    }
}

/// Attach an operation and a path to `std::io::Result`s.
pub trait IoContext<T> {
    fn io_ctx(self, op: &'static str, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_ctx(self, op: &'static str, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_reports_what_it_knows_of_its_location() {
        let p = || PathBuf::from("/s");
        let corrupt = Location::file("/s/x.lcs").shard(1).chunk(2).offset(3).sample(4);
        let cases: Vec<(Error, Location)> = vec![
            (Error::corrupt(corrupt.clone(), "m"), corrupt),
            (
                Error::MissingSample { sample_id: 9, path: p(), more: 0 },
                Location::file("/s").sample(9),
            ),
            (
                Error::InvalidRecord { sample_id: 5, msg: "m".into() },
                Location { sample_id: Some(5), ..Default::default() },
            ),
            (
                Error::DuplicateSample { sample_id: 6, msg: "m".into() },
                Location { sample_id: Some(6), ..Default::default() },
            ),
            (Error::UnsupportedVersion { path: p(), found: 2, supported: 1 }, Location::file("/s")),
            (
                Error::Mismatch {
                    path: p(),
                    field: "k".into(),
                    expected: "1".into(),
                    found: "2".into(),
                },
                Location::file("/s"),
            ),
            (Error::StoreExists { path: p(), msg: "m".into() }, Location::file("/s")),
            (Error::Locked { path: p(), msg: "m".into() }, Location::file("/s")),
            (Error::io("open", "/s", std::io::ErrorKind::NotFound.into()), Location::file("/s")),
            (Error::invalid_argument("a", "m"), Location::default()),
            (Error::State("m".into()), Location::default()),
        ];
        for (e, want) in cases {
            assert_eq!(e.location(), want, "{e}");
            // The message names every field that is known.
            let msg = e.to_string();
            if let Some(f) = &want.file {
                assert!(msg.contains(&f.display().to_string()), "{msg}");
            }
            if let Some(s) = want.sample_id {
                assert!(msg.contains(&s.to_string()), "{msg}");
            }
        }
    }
}
