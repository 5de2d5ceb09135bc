//! `manifest.json`: the committed state of a store (FORMAT.md, "The manifest").
//!
//! The file is a JSON envelope `{"checksum":"crc32:XXXXXXXX","manifest":BODY}` followed by
//! a newline, where BODY is the manifest object serialised as compact JSON and the checksum
//! is the CRC-32 of BODY's exact bytes. The envelope keeps the file plain JSON for any tool
//! while letting a reader detect a flipped digit that would still parse.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Location, Result};
use crate::format::{FORMAT_VERSION, Kind, crc32};

pub const MANIFEST_NAME: &str = "manifest.json";
pub const FORMAT_NAME: &str = "logitcache-store";
const ENVELOPE_PREFIX: &[u8] = b"{\"checksum\":\"crc32:";
const ENVELOPE_MID: &[u8] = b"\",\"manifest\":";
const ENVELOPE_SUFFIX: &[u8] = b"}\n";

/// Who produced the targets: a model name and a fingerprint of its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherInfo {
    pub name: Option<String>,
    pub config_fingerprint: Option<String>,
}

/// Which tokenizer the ids belong to: a name and a fingerprint of its vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub name: Option<String>,
    pub vocab_fingerprint: Option<String>,
}

/// How log-probabilities are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodecInfo {
    /// "lossless", "abs", "kl" or "none".
    pub logprobs: String,
    /// Quantization step in nats (`abs`, and the base step of `kl`).
    pub step: Option<f64>,
    /// Guaranteed maximum absolute error of every decoded log-probability (`abs`).
    pub max_abs_error: Option<f64>,
    /// Guaranteed maximum KL(P || P_decoded) per position, in nats (`kl`).
    pub kl_bound: Option<f64>,
    /// Token-id coding scheme.
    pub ids: String,
    /// zstd level the writer used (informational: decoding does not depend on it).
    pub zstd_level: i32,
}

/// One shard as the manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Path relative to the store directory, with `/` separators.
    pub file: String,
    /// The shard's random id, as 16 lower-case hex digits (also in its header).
    pub uid: String,
    pub num_samples: u64,
    pub num_positions: u64,
    pub num_chunks: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// CRC-32 of the whole file, as "crc32:XXXXXXXX".
    pub checksum: String,
}

/// The manifest object (the envelope's `manifest` member).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub kind: String,
    /// K (top-K) or n, the draws per position (sampled).
    pub k: u32,
    pub vocab_size: u32,
    /// Capture temperature T_c of the stored log-probabilities / samples.
    pub temperature: f64,
    pub codec: CodecInfo,
    pub teacher: Option<TeacherInfo>,
    pub tokenizer: Option<TokenizerInfo>,
    /// "logitcache X.Y.Z" of the writer that created the store.
    pub created_by: String,
    /// "logitcache X.Y.Z" of the writer that committed this manifest.
    pub updated_by: String,
    /// Free-form user metadata (a JSON object).
    pub metadata: serde_json::Value,
    pub num_samples: u64,
    pub num_positions: u64,
    pub shards: Vec<ShardInfo>,
}

pub fn format_checksum(crc: u32) -> String {
    format!("crc32:{crc:08x}")
}

pub fn parse_checksum(s: &str) -> Option<u32> {
    let hex = s.strip_prefix("crc32:")?;
    if !is_lower_hex(hex, 8) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

impl Manifest {
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_name(&self.kind)
    }

    /// Serialise into the checksummed envelope.
    pub fn to_file_bytes(&self) -> Result<Vec<u8>> {
        let body = serde_json::to_vec(self)
            .map_err(|e| Error::State(format!("cannot serialise the manifest: {e}")))?;
        let mut out = Vec::with_capacity(body.len() + 64);
        out.extend_from_slice(ENVELOPE_PREFIX);
        out.extend_from_slice(format!("{:08x}", crc32(&body)).as_bytes());
        out.extend_from_slice(ENVELOPE_MID);
        out.extend_from_slice(&body);
        out.extend_from_slice(ENVELOPE_SUFFIX);
        Ok(out)
    }

    /// Parse and check a manifest file's bytes.
    pub fn from_file_bytes(bytes: &[u8], path: &Path) -> Result<Manifest> {
        let loc = || Location::file(path);
        let head = ENVELOPE_PREFIX.len() + 8 + ENVELOPE_MID.len();
        if bytes.len() < head + ENVELOPE_SUFFIX.len()
            || !bytes.starts_with(ENVELOPE_PREFIX)
            || &bytes[ENVELOPE_PREFIX.len() + 8..head] != ENVELOPE_MID
            || !bytes.ends_with(ENVELOPE_SUFFIX)
        {
            return Err(Error::corrupt(
                loc(),
                "not a logitcache manifest envelope ({\"checksum\":\"crc32:...\",\"manifest\":{...}})",
            ));
        }
        let hex = std::str::from_utf8(&bytes[ENVELOPE_PREFIX.len()..ENVELOPE_PREFIX.len() + 8])
            .ok()
            .filter(|h| is_lower_hex(h, 8))
            .and_then(|h| u32::from_str_radix(h, 16).ok());
        let body = &bytes[head..bytes.len() - ENVELOPE_SUFFIX.len()];
        // The envelope is the same in every format version, so the checksum is checked first;
        // the version then decides whether this build can read the body.
        let actual = crc32(body);
        match hex {
            Some(stored) if stored == actual => {}
            Some(stored) => {
                return Err(Error::corrupt(
                    loc(),
                    format!(
                        "manifest checksum mismatch: stored {stored:08x}, computed {actual:08x}"
                    ),
                ));
            }
            None => {
                return Err(Error::corrupt(
                    loc(),
                    "manifest checksum is not 8 lower-case hex digits",
                ));
            }
        }
        if let Some(found) = peek_version(body)
            && found > u64::from(FORMAT_VERSION)
        {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
                supported: u64::from(FORMAT_VERSION),
            });
        }
        let m: Manifest = serde_json::from_slice(body)
            .map_err(|e| Error::corrupt(loc(), format!("manifest does not parse: {e}")))?;
        m.validate(path)?;
        Ok(m)
    }

    /// Structural rules that JSON parsing alone does not enforce.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::corrupt(Location::file(path), msg));
        if self.format != FORMAT_NAME {
            return bad(format!("format is {:?}, expected {FORMAT_NAME:?}", self.format));
        }
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: u64::from(self.format_version),
                supported: u64::from(FORMAT_VERSION),
            });
        }
        if self.kind().is_none() {
            return bad(format!("kind is {:?}, expected \"topk\" or \"sampled\"", self.kind));
        }
        if self.k == 0 || self.vocab_size == 0 {
            return bad(format!(
                "k = {} and vocab_size = {} must be positive",
                self.k, self.vocab_size
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!("temperature {} must be finite and positive", self.temperature));
        }
        if !self.metadata.is_object() {
            return bad("metadata must be a JSON object".into());
        }
        let mut samples = 0u64;
        let mut positions = 0u64;
        let mut seen = std::collections::HashSet::new();
        for s in &self.shards {
            if !is_valid_shard_file(&s.file) {
                return bad(format!(
                    "shard file name {:?} is not of the form shards/NNNNNN-UID.lcs",
                    s.file
                ));
            }
            if !is_lower_hex(&s.uid, 16) || !s.file.ends_with(&format!("-{}.lcs", s.uid)) {
                return bad(format!(
                    "shard {} uid {:?} is not the 16 lower-case hex digits of its file name",
                    s.file, s.uid
                ));
            }
            if !seen.insert(s.uid.as_str()) {
                return bad(format!("shard uid {} appears twice", s.uid));
            }
            if parse_checksum(&s.checksum).is_none() {
                return bad(format!(
                    "shard {} checksum {:?} is not crc32:XXXXXXXX",
                    s.file, s.checksum
                ));
            }
            samples = samples.saturating_add(s.num_samples);
            positions = positions.saturating_add(s.num_positions);
        }
        if samples != self.num_samples || positions != self.num_positions {
            return bad(format!(
                "shards hold {samples} samples and {positions} positions, manifest declares {} and {}",
                self.num_samples, self.num_positions
            ));
        }
        Ok(())
    }

    /// Read `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        if dir.as_os_str().is_empty() {
            // Not the working directory's store: an empty path is a mistake, as for writers.
            return Err(Error::invalid_argument("path", "is empty"));
        }
        let path = dir.join(MANIFEST_NAME);
        let bytes = fs::read(&path).io_ctx("read manifest", &path)?;
        Manifest::from_file_bytes(&bytes, &path)
    }

    /// [`Manifest::read`] of a store that must be there and committed (a reader's open, and
    /// an operation's first look, before it takes the lock): a missing manifest is explained
    /// where the reason is known, instead of naming the missing file. No such directory, or
    /// not a directory: that error on `dir` itself. A writer that holds the store's lock:
    /// [`Error::Locked`], it has not committed a manifest yet. (Not for a caller holding the
    /// lock itself, which would find its own.)
    pub fn read_committed(dir: &Path) -> Result<Manifest> {
        match Manifest::read(dir) {
            Err(e) if is_missing(&e) => {
                if let Some(no_dir) = no_store_dir(dir) {
                    return Err(no_dir);
                }
                match crate::writer::lock_holder(dir) {
                    Ok(Some(holder)) => Err(Error::Locked {
                        path: dir.to_path_buf(),
                        msg: format!("lock held by {holder}: it has not committed a manifest yet"),
                    }),
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    /// Commit this manifest to `dir` atomically and durably: write a temporary file, fsync
    /// it, rename it over `manifest.json`, fsync the directory. A crash at any point leaves
    /// either the old manifest or this one. A failure says which of the two is in place
    /// ([`CommitError`]): a caller cleaning up after a failed commit must not delete files
    /// that the manifest in place, or the one a power loss may bring back, names.
    pub fn commit(&self, dir: &Path) -> std::result::Result<(), CommitError> {
        let bytes = self.to_file_bytes().map_err(CommitError::NotReplaced)?;
        let tmp = dir.join(format!(".{MANIFEST_NAME}.tmp-{}", std::process::id()));
        let path = dir.join(MANIFEST_NAME);
        let written = (|| {
            let mut f = File::create(&tmp).io_ctx("create", &tmp)?;
            f.write_all(&bytes).io_ctx("write", &tmp)?;
            f.sync_all().io_ctx("fsync", &tmp)?;
            fs::rename(&tmp, &path).io_ctx("rename into place", &path)
        })();
        written.map_err(CommitError::NotReplaced)?;
        sync_dir(dir).map_err(CommitError::NotDurable)
    }
}

/// Why [`Manifest::commit`] failed, and which manifest it left in place.
#[derive(Debug)]
pub enum CommitError {
    /// Before the rename: the old manifest is the store's, untouched.
    NotReplaced(Error),
    /// After the rename: the new manifest is the store's, but the fsync of the directory
    /// failed, so a power loss could still bring back the old one. The files of both must
    /// be kept.
    NotDurable(Error),
}

impl CommitError {
    /// The error, whichever manifest is in place.
    pub fn into_error(self) -> Error {
        match self {
            CommitError::NotReplaced(e) | CommitError::NotDurable(e) => e,
        }
    }
}

/// fsync a directory so that renames and new entries in it survive a power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).io_ctx("fsync directory", dir)
}

/// Whether `e` is a manifest that is not there (no such file, or a path through a file).
pub(crate) fn is_missing(e: &Error) -> bool {
    use std::io::ErrorKind::{NotADirectory, NotFound};
    matches!(e, Error::Io { source, .. } if matches!(source.kind(), NotFound | NotADirectory))
}

/// The error to give for a store at `dir` when `dir` is no directory to look in: it does not
/// exist, or it is a file (the OS's own error for listing it, so that Python gets its errno
/// and file name). `None` when it is a directory (one that may not be listed included).
fn no_store_dir(dir: &Path) -> Option<Error> {
    match fs::metadata(dir) {
        Err(e) => Some(Error::io("open store", dir, e)),
        Ok(md) if md.is_dir() => None,
        Ok(_) => fs::read_dir(dir).err().map(|e| Error::io("open store", dir, e)),
    }
}

/// Shard files are `shards/<6+ digit sequence>-<16 hex uid>.lcs`: nothing else is accepted, so
/// a crafted manifest cannot point a reader outside the store directory.
pub fn is_valid_shard_file(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("shards/") else {
        return false;
    };
    let Some(stem) = rest.strip_suffix(".lcs") else {
        return false;
    };
    let Some((seq, uid)) = stem.split_once('-') else {
        return false;
    };
    seq.len() >= 6 && seq.bytes().all(|b| b.is_ascii_digit()) && is_lower_hex(uid, 16)
}

/// Exactly `len` lower-case hex digits (one spelling per value, so a flipped case bit shows).
fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn peek_version(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Peek {
        format_version: u64,
    }
    serde_json::from_slice::<Peek>(body).ok().map(|p| p.format_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            kind: "topk".into(),
            k: 64,
            vocab_size: 32768,
            temperature: 1.0,
            codec: CodecInfo {
                logprobs: "abs".into(),
                step: Some(1.0 / 64.0),
                max_abs_error: Some(1.0 / 128.0),
                kl_bound: None,
                ids: "rankdict-v1".into(),
                zstd_level: 3,
            },
            teacher: Some(TeacherInfo { name: Some("t".into()), config_fingerprint: None }),
            tokenizer: None,
            created_by: "logitcache 0.1.0".into(),
            updated_by: "logitcache 0.1.0".into(),
            metadata: serde_json::json!({"run": 1}),
            num_samples: 3,
            num_positions: 30,
            shards: vec![ShardInfo {
                file: "shards/000000-0123456789abcdef.lcs".into(),
                uid: "0123456789abcdef".into(),
                num_samples: 3,
                num_positions: 30,
                num_chunks: 1,
                bytes: 1000,
                checksum: "crc32:00000001".into(),
            }],
        }
    }

    #[test]
    fn roundtrip_and_flips() {
        let m = sample();
        let b = m.to_file_bytes().unwrap();
        let p = Path::new("m.json");
        assert_eq!(Manifest::from_file_bytes(&b, p).unwrap(), m);
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert!(Manifest::from_file_bytes(&c, p).is_err(), "flip at {i}:{bit} undetected");
            }
        }
        for cut in 0..b.len() {
            assert!(Manifest::from_file_bytes(&b[..cut], p).is_err());
        }
    }

    /// Bytes of a manifest envelope around `body`, with its checksum.
    fn envelope(body: &str) -> Vec<u8> {
        format!("{{\"checksum\":\"crc32:{:08x}\",\"manifest\":{body}}}\n", crc32(body.as_bytes()))
            .into_bytes()
    }

    #[test]
    fn numbers_read_back_bit_for_bit_after_a_rewrite() {
        // Found by the `manifest` fuzz target: serde_json's default float parser is not
        // correctly rounded, so this temperature read as 1.8888888880000007e72, was written
        // back as such and then read as 1.8888888880000003e72: every rewrite of the manifest
        // (an append) could move it, and Python's json read another value than Rust.
        let body = String::from_utf8(serde_json::to_vec(&sample()).unwrap()).unwrap();
        let literal = "1888888888000000000000000000000000000000000000000000010248191152060862007.0";
        let body = body.replace("\"temperature\":1.0", &format!("\"temperature\":{literal}"));
        let p = Path::new("m.json");
        let m = Manifest::from_file_bytes(&envelope(&body), p).unwrap();
        assert_eq!(m.temperature, literal.parse::<f64>().unwrap());
        let back = Manifest::from_file_bytes(&m.to_file_bytes().unwrap(), p).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn shard_uid_must_match_its_file_name() {
        let p = Path::new("m.json");
        for uid in ["8xxxxxxxxxxxxxxxxe531ffccf534ff7", "0123456789ABCDEF", "0123456789abcdee"] {
            let mut m = sample();
            m.shards[0].uid = uid.into();
            let b = m.to_file_bytes().unwrap();
            assert!(
                matches!(Manifest::from_file_bytes(&b, p), Err(Error::Corrupt { .. })),
                "{uid}"
            );
        }
    }

    #[test]
    fn future_version_is_reported_as_such() {
        let mut m = sample();
        m.format_version = 2;
        let b = m.to_file_bytes().unwrap();
        assert!(matches!(
            Manifest::from_file_bytes(&b, Path::new("m")),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn shard_names_cannot_escape() {
        assert!(is_valid_shard_file("shards/000001-0123456789abcdef.lcs"));
        for bad in [
            "../x.lcs",
            "shards/../../etc/passwd",
            "shards/000001-0123456789ABCDEF.lcs",
            "/abs/000001-0123456789abcdef.lcs",
            "shards/00001-0123456789abcdef.lcs",
        ] {
            assert!(!is_valid_shard_file(bad), "{bad}");
        }
    }
}
