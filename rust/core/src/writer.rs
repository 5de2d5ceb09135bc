//! Writing a store: records are validated, grouped into chunks, encoded and appended to the
//! current shard; `commit` finishes the shard (footer, trailer, fsync) and atomically
//! replaces the manifest. Until a commit, nothing a reader sees changes; an aborted or
//! killed writer leaves the last committed state (plus at most orphan shard files, which
//! `verify` reports and the next writer ignores).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions as FsOpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::clean::{FileLeft, delete_left_out};
use crate::codec::{self, ChunkBuf, CodecParams, LogprobCodec};
use crate::error::{Error, IoContext, Result};
use crate::format::{
    ChunkEntry, FLAG_HAS_LOGPROBS, FORMAT_VERSION, Footer, HEADER_LEN, Kind, RecordEntry,
    ShardHeader, Trailer, crc32,
};
use crate::manifest::{
    self, CodecInfo, CommitError, FORMAT_NAME, MANIFEST_NAME, Manifest, ShardInfo, TeacherInfo,
    TokenizerInfo,
};
use crate::progress;
use crate::reader::{ShardReader, params_from_header, params_from_manifest};
use crate::record::SeenIds;

pub const LOCK_NAME: &str = ".lock";
pub const SHARDS_DIR: &str = "shards";

/// How to open the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Create a new store; refuse an existing path.
    Create,
    /// Add samples to an existing store of the same configuration (create it if missing).
    Append,
    /// Replace whatever store is at the path (the old one stays until the first commit).
    Overwrite,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "x" => Ok(Mode::Create),
            "a" => Ok(Mode::Append),
            "w" => Ok(Mode::Overwrite),
            _ => Err(Error::invalid_argument(
                "mode",
                format!("{s:?}; expected \"x\" (create), \"a\" (append) or \"w\" (replace)"),
            )),
        }
    }
}

/// What a store is: fixed at creation, checked on append.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSpec {
    pub kind: Kind,
    pub k: u32,
    pub vocab_size: u32,
    pub temperature: f64,
    /// `None`: the default (`abs:0.01` for top-K, `none` for sampled) for a new store, the
    /// store's own codec when appending.
    pub logprobs: Option<LogprobCodec>,
    pub teacher: Option<TeacherInfo>,
    pub tokenizer: Option<TokenizerInfo>,
    /// JSON object; on append its keys are merged into the stored metadata.
    pub metadata: Option<serde_json::Value>,
}

/// Tuning knobs that do not change what is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterOptions {
    pub zstd_level: i32,
    /// A chunk holds at most this many positions, or one record longer than that: it is
    /// closed once it is full, and before a record that would not fit.
    pub chunk_positions: usize,
    /// A shard is closed once it reaches this many bytes.
    pub shard_bytes: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        // 1024: records at least that long are chunks of their own, so a shuffled read
        // decodes only what it returns (benches/README.md, "chunk size").
        WriterOptions { zstd_level: 1, chunk_positions: 1024, shard_bytes: 1 << 30 }
    }
}

pub fn default_codec(kind: Kind) -> LogprobCodec {
    match kind {
        // abs:0.01: step 5 2^-8, max error 0.0098 nats.
        Kind::TopK => LogprobCodec::Abs { step_log2: 8, mult: 5 },
        Kind::Sampled => LogprobCodec::None,
    }
}

pub(crate) struct ShardWriter {
    pub(crate) path: PathBuf,
    rel: String,
    uid: u64,
    file: BufWriter<File>,
    hasher: crc32fast::Hasher,
    len: u64,
    footer: Footer,
}

impl ShardWriter {
    pub(crate) fn create(dir: &Path, seq: u64, header: &ShardHeader) -> Result<ShardWriter> {
        let rel = format!("{SHARDS_DIR}/{seq:06}-{:016x}.lcs", header.uid);
        let path = dir.join(&rel);
        let f = FsOpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .io_ctx("create shard", &path)?;
        let mut w = ShardWriter {
            path,
            rel,
            uid: header.uid,
            file: BufWriter::with_capacity(1 << 20, f),
            hasher: crc32fast::Hasher::new(),
            len: 0,
            footer: Footer::default(),
        };
        w.write(&header.encode())?;
        Ok(w)
    }

    /// A new shard to take the place of `old` in its store: its header with a uid of its
    /// own, under its sequence number (the names differ by uid), so that a manifest rebuilt
    /// from the shard files lists it where the old one was. `next_seq` is taken, and
    /// advanced, when the old name has no sequence number.
    pub(crate) fn replacing(
        dir: &Path,
        old: &ShardReader,
        next_seq: &mut u64,
    ) -> Result<ShardWriter> {
        let seq = seq_of(&old.info.file).unwrap_or_else(|| {
            *next_seq += 1;
            *next_seq - 1
        });
        let header = ShardHeader { uid: random_u64(), ..old.header.clone() };
        ShardWriter::create(dir, seq, &header)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).io_ctx("write shard", &self.path)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    pub(crate) fn add_chunk(&mut self, payload: &[u8], buf: &ChunkBuf) -> Result<()> {
        let positions = buf.positions();
        let entries = buf.entries();
        // The footer's fields are u32: a count that does not fit is refused, never truncated
        // into a footer that disagrees with its chunk.
        let field = |what: &str, v: usize| {
            u32::try_from(v).map_err(|_| {
                Error::invalid_argument(
                    "chunk_positions",
                    format!("a chunk of {v} {what} does not fit the format's u32 field; use smaller chunks or shards"),
                )
            })
        };
        let entry = ChunkEntry {
            offset: self.len,
            stored_len: field("stored bytes", payload.len())?,
            crc32: crc32(payload),
            first_record: field("records before it in the shard", self.footer.records.len())?,
            num_records: field("records", buf.num_records())?,
            num_positions: field("positions", positions)?,
            num_entries: field("target entries", entries)?,
        };
        self.write(payload)?;
        self.footer.chunks.push(entry);
        for (&sample_id, &length) in buf.sample_ids.iter().zip(&buf.lengths) {
            self.footer.records.push(RecordEntry { sample_id, length });
        }
        self.footer.num_positions += positions as u64;
        Ok(())
    }

    /// Append a chunk copied from another shard of the same configuration: its stored
    /// bytes (already checked against `entry.crc32`) and its records, in order.
    pub(crate) fn copy_chunk(
        &mut self,
        bytes: &[u8],
        entry: &ChunkEntry,
        records: &[RecordEntry],
    ) -> Result<()> {
        let first_record = u32::try_from(self.footer.records.len()).map_err(|_| {
            Error::State("a repaired shard holds more records than a footer can count".into())
        })?;
        let copied = ChunkEntry { offset: self.len, first_record, ..*entry };
        self.write(bytes)?;
        self.footer.chunks.push(copied);
        self.footer.records.extend_from_slice(records);
        self.footer.num_positions += u64::from(entry.num_positions);
        Ok(())
    }

    /// Write footer and trailer, flush and fsync.
    pub(crate) fn finish(mut self) -> Result<ShardInfo> {
        let footer = self.footer.encode();
        let trailer = Trailer {
            footer_offset: self.len,
            footer_len: footer.len() as u64,
            footer_crc32: crc32(&footer),
        };
        self.write(&footer)?;
        self.write(&trailer.encode())?;
        let file = self
            .file
            .into_inner()
            .map_err(|e| Error::io("flush shard", &self.path, e.into_error()))?;
        file.sync_all().io_ctx("fsync shard", &self.path)?;
        Ok(ShardInfo {
            file: self.rel,
            uid: format!("{:016x}", self.uid),
            num_samples: self.footer.records.len() as u64,
            num_positions: self.footer.num_positions,
            num_chunks: self.footer.chunks.len() as u64,
            bytes: self.len,
            checksum: manifest::format_checksum(self.hasher.finalize()),
        })
    }
}

fn no_shard() -> Error {
    Error::State("no shard being written".into())
}

/// What [`StoreWriter::copy_records`] added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopiedRecords {
    pub samples: u64,
    pub positions: u64,
    /// Chunks whose stored bytes were copied as they are.
    pub chunks_copied: u64,
    /// Chunks of kept and other records: decoded, their kept records encoded again.
    pub chunks_reencoded: u64,
}

/// A store being written. Call [`StoreWriter::close`] to commit; dropping it without
/// closing aborts (removes what was written since the last commit).
pub struct StoreWriter {
    dir: PathBuf,
    mode: Mode,
    lock: Option<File>,
    /// The state that the next commit extends (for a new store: not yet on disk).
    manifest: Manifest,
    ever_committed: bool,
    created_dir: bool,
    /// Directories created by this writer, deepest first; emptied by the first commit.
    new_dirs: Vec<PathBuf>,
    params: CodecParams,
    opts: WriterOptions,
    known: HashSet<u64>,
    pending: ChunkBuf,
    shard: Option<ShardWriter>,
    finished: Vec<ShardInfo>,
    uncommitted_files: Vec<PathBuf>,
    /// Shard files of the store a `mode="w"` writer replaces (relative to `dir`), deleted
    /// after its first commit.
    replaced_files: Vec<String>,
    /// Those of them that could not be deleted, until [`StoreWriter::take_left_behind`].
    left_behind: Vec<FileLeft>,
    next_seq: u64,
    seen: SeenIds,
    scratch: codec::EncodeScratch,
    closed: bool,
}

pub(crate) fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

pub(crate) fn tool() -> String {
    format!("logitcache {}", crate::VERSION)
}

pub(crate) fn codec_info(c: LogprobCodec, zstd_level: i32) -> CodecInfo {
    CodecInfo {
        logprobs: c.name().into(),
        step: matches!(c, LogprobCodec::Abs { .. }).then(|| f64::from(c.step())),
        max_abs_error: match c {
            LogprobCodec::Abs { .. } => c.max_abs_error(),
            _ => None,
        },
        kl_bound: c.kl_bound().map(f64::from),
        ids: codec::ID_CODEC_NAME.into(),
        zstd_level,
    }
}

fn validate_spec(spec: &StoreSpec, codec: LogprobCodec) -> Result<()> {
    if spec.k == 0 {
        return Err(Error::invalid_argument("k", "must be at least 1"));
    }
    if spec.vocab_size == 0 {
        return Err(Error::invalid_argument("vocab_size", "must be at least 1"));
    }
    if spec.k >= 1 << 31 {
        // A sampled row's counts add up to k, and readers return counts as int32.
        return Err(Error::invalid_argument("k", format!("{} must be below 2^31", spec.k)));
    }
    if spec.kind == Kind::TopK && spec.k > spec.vocab_size {
        return Err(Error::invalid_argument(
            "k",
            format!("K = {} is larger than vocab_size = {}", spec.k, spec.vocab_size),
        ));
    }
    if !(spec.temperature.is_finite() && spec.temperature > 0.0) {
        return Err(Error::invalid_argument(
            "temperature",
            format!("{} must be finite and positive", spec.temperature),
        ));
    }
    if spec.kind == Kind::Sampled && matches!(codec, LogprobCodec::Kl { .. }) {
        return Err(Error::invalid_argument(
            "codec",
            "the kl codec bounds the divergence of top-K rows; sampled stores use \"abs:<bound>\", \"lossless\" or \"none\"",
        ));
    }
    // A codec built by hand must be one a reader accepts (e.g. an abs step m 2^-e with m
    // in 1, 3, 5, 7 and no other spelling of the same step).
    if LogprobCodec::from_header(codec.code(), codec.step(), codec.kl_bound().unwrap_or(0.0))
        != Some(codec)
    {
        return Err(Error::invalid_argument("codec", format!("{codec:?} is not a valid codec")));
    }
    if spec.kind == Kind::TopK && codec == LogprobCodec::None {
        return Err(Error::invalid_argument(
            "codec",
            "a top-K store must keep log-probabilities; \"none\" is for sampled stores",
        ));
    }
    if let Some(m) = &spec.metadata
        && !m.is_object()
    {
        return Err(Error::invalid_argument("metadata", "must be a JSON object (a dict)"));
    }
    Ok(())
}

/// Who is told what to do instead when a path already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExistsAdvice {
    /// A writer (`mode="a"` appends, `mode="w"` replaces).
    Writer,
    /// A merge (`mode="a"` / `--append` merges into it; there is no replacing).
    Merge,
}

/// [`Error::StoreExists`] for creating a store at `dir`, saying what is there and what to
/// do instead.
pub(crate) fn store_exists(dir: &Path, advice: ExistsAdvice) -> Error {
    let into = match advice {
        ExistsAdvice::Writer => "mode=\"a\"",
        ExistsAdvice::Merge => "mode=\"a\" (logitcache merge --append)",
    };
    let msg = if dir.join(MANIFEST_NAME).exists() {
        match advice {
            ExistsAdvice::Writer => format!(
                "already holds a store; open it with {into} to append or mode=\"w\" to replace it"
            ),
            ExistsAdvice::Merge => format!("already holds a store; merge into it with {into}"),
        }
    } else if !dir.is_dir() {
        "already exists and is not a directory".into()
    } else if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
        format!("already exists (an empty directory); {into} writes a new store into it")
    } else if holds_only_a_writers_files(dir).unwrap_or(false) {
        // Not "mode=a adopts it": a new store there leaves the finished shards as orphans
        // (which clean would delete); only a rebuild takes them.
        format!(
            "holds no committed store (a writer is writing one there, or died before its \
             first commit); once no writer holds it, `logitcache repair --rebuild-manifest` \
             makes a store of the shards it finished (if any), while {into} starts a new \
             store there and leaves them as orphans"
        )
    } else {
        "already exists and is not a logitcache store; choose another path".into()
    };
    Error::StoreExists { path: dir.to_path_buf(), msg }
}

/// `dir` made absolute against the working directory now (not normalized: `..` and links keep
/// their meaning), for a store that is used after this call returns.
pub(crate) fn absolute_dir(dir: &Path) -> Result<PathBuf> {
    if dir.as_os_str().is_empty() {
        return Err(Error::invalid_argument("path", "is empty"));
    }
    std::path::absolute(dir).io_ctx("resolve store path", dir)
}

/// Refuse a directory at `dir` that holds no store but files no writer made: a writer does
/// not write into (nor a merge merge into) a directory of other things.
pub(crate) fn refuse_foreign_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.join(MANIFEST_NAME).exists() && !holds_only_a_writers_files(dir)? {
        return Err(Error::invalid_argument(
            "path",
            format!(
                "{} exists and is not a logitcache store; refusing to write into it",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// A directory that a writer started: nothing but the lock file, the shards directory,
/// temporary manifests and (committed since the caller looked) the manifest; an empty
/// directory counts too.
fn holds_only_a_writers_files(dir: &Path) -> Result<bool> {
    for e in fs::read_dir(dir).io_ctx("list", dir)? {
        let e = e.io_ctx("list", dir)?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name == LOCK_NAME
            || name == SHARDS_DIR
            || name == MANIFEST_NAME
            || name.starts_with(".manifest.json.tmp-"))
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The sequence number in a shard file's name (`shards/NNNNNN-UID.lcs`).
fn seq_of(file: &str) -> Option<u64> {
    file.strip_prefix(SHARDS_DIR)?.strip_prefix('/')?.split_once('-')?.0.parse().ok()
}

/// What a writer holding the lock wrote in the lock file ("pid N"), or what to say in the
/// instant between its taking the lock and writing it.
fn lock_holder_text(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    match text.trim() {
        "" => "a process that has not written its pid yet".to_string(),
        holder => holder.to_string(),
    }
}

/// [`Error::Locked`] for the store at `dir` whose lock another writer holds, naming the
/// holder as its lock file says (best effort: [`lock_holder_text`]).
fn held_by_another(dir: &Path, holder: &str) -> Error {
    Error::Locked { path: dir.to_path_buf(), msg: format!("lock held by {holder}") }
}

/// Whether the open file `f` is the file at `path` now (same device and inode).
fn is_same_file(f: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (f.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (f, path);
        true
    }
}

/// Whether a writer holds the lock of the store at `dir`: `Some` of what it wrote in the
/// lock file ("pid N") when one does, found without taking the lock (nor creating or writing
/// the lock file): for what only reports.
pub(crate) fn lock_holder(dir: &Path) -> Result<Option<String>> {
    let path = dir.join(LOCK_NAME);
    let f = match File::open(&path) {
        Ok(f) => f,
        // No lock file: no writer has ever opened the store.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open lock file", &path, e)),
    };
    // A shared lock is refused while a writer holds the exclusive one. (A writer locking in
    // the instant this one holds it waits it out: see `lock`.)
    match f.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => Ok(Some(lock_holder_text(&path))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

/// [`Error::Locked`] when a writer holds the lock of the store at `dir` ([`lock_holder`]).
pub(crate) fn check_unlocked(dir: &Path) -> Result<()> {
    match lock_holder(dir)? {
        None => Ok(()),
        Some(holder) => Err(held_by_another(dir, &holder)),
    }
}

/// Largest sequence number among shard files already in `shards/` (orphans included), so
/// that new shards never reuse a name.
pub(crate) fn max_seq(dir: &Path) -> Result<Option<u64>> {
    let sd = dir.join(SHARDS_DIR);
    let mut best = None;
    let Ok(rd) = fs::read_dir(&sd) else {
        return Ok(None);
    };
    for e in rd {
        let e = e.io_ctx("list", &sd)?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((seq, _)) = name.split_once('-')
            && let Ok(n) = seq.parse::<u64>()
        {
            best = Some(best.map_or(n, |b: u64| b.max(n)));
        }
    }
    Ok(best)
}

pub(crate) fn lock(dir: &Path) -> Result<File> {
    // Said of the store, not of its lock file (which a missing store also lacks).
    fs::metadata(dir).io_ctx("open store", dir)?;
    let path = dir.join(LOCK_NAME);
    let f = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .io_ctx("open lock file", &path)?;
    // A shared lock held for an instant (`verify` or `clean --dry-run` looking whether a
    // writer is open) is waited out rather than taken for a writer: a few tries over ~40 ms.
    let mut tries = 0;
    let taken = loop {
        match f.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if tries < 4 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r,
        }
    };
    match taken {
        // A writer aborting a store it created removes the lock file before it lets go of
        // the lock: a lock taken on the file it had (opened just before the removal) is a
        // lock on a file no other writer will see, and the next one would make a new lock
        // file and take that too. So the lock only counts on the file still at the path.
        Ok(()) if !is_same_file(&f, &path) => Err(Error::Locked {
            path: dir.to_path_buf(),
            msg: "the lock file was removed while it was being taken (a writer aborting a \
                  new store): try again"
                .into(),
        }),
        Ok(()) => {
            // Best effort: who holds it, for the next writer's error message.
            let _ = f.set_len(0);
            let _ = (&f).write_all(format!("pid {}\n", std::process::id()).as_bytes());
            Ok(f)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(held_by_another(dir, &lock_holder_text(&path)))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

impl StoreWriter {
    pub fn open(
        dir: &Path,
        spec: StoreSpec,
        mode: Mode,
        opts: WriterOptions,
    ) -> Result<StoreWriter> {
        if opts.chunk_positions == 0 {
            return Err(Error::invalid_argument("chunk_positions", "must be at least 1"));
        }
        if !(1..=22).contains(&opts.zstd_level) {
            return Err(Error::invalid_argument(
                "zstd_level",
                format!("{} is outside 1..=22", opts.zstd_level),
            ));
        }
        // Absolute: the writer creates, writes and renames files under `dir` until it is
        // closed, and a process that changes its working directory meanwhile must not commit
        // into another store. `new/.` names `new`: without the dot, creating its last
        // component is creating it (`absolute` keeps `..`, whose meaning depends on links).
        let dir_buf: PathBuf = absolute_dir(dir)?.components().collect();
        let dir = dir_buf.as_path();
        let exists = dir.exists();
        let has_manifest = dir.join(MANIFEST_NAME).exists();
        if !(mode == Mode::Append && has_manifest) {
            // Check a new store's configuration before anything touches the disk.
            validate_spec(&spec, spec.logprobs.unwrap_or_else(|| default_codec(spec.kind)))?;
        }
        let mut created_dir = false;
        if mode == Mode::Create && exists {
            return Err(store_exists(dir, ExistsAdvice::Writer));
        }
        refuse_foreign_dir(dir)?;
        // Directories this writer creates (the store and any missing parents): their entries
        // in their parents are fsynced at the first commit, or a power loss could drop a
        // committed store whole.
        let mut new_dirs = Vec::new();
        if !exists {
            let mut d = Some(dir);
            while let Some(p) = d.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
                new_dirs.push(p.to_path_buf());
                d = p.parent();
            }
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            match (dir.components().next_back(), parent) {
                (Some(std::path::Component::Normal(_)), parent) => {
                    if let Some(parent) = parent {
                        fs::create_dir_all(parent).io_ctx("create store directory", parent)?;
                    }
                    // Only a directory made here is this writer's to remove again: another
                    // writer may have made it since `exists` was read (and be writing in it).
                    // (Its entry is fsynced at the first commit all the same.)
                    match fs::create_dir(dir) {
                        Ok(()) => created_dir = true,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                            if mode == Mode::Create {
                                return Err(store_exists(dir, ExistsAdvice::Writer));
                            }
                        }
                        Err(e) => return Err(Error::io("create store directory", dir, e)),
                    }
                }
                // `a/b/..` names a directory only once `a/b` exists, and never a new one:
                // there is nothing to create, and no new store to make in what it names.
                _ => {
                    return Err(Error::invalid_argument(
                        "path",
                        format!(
                            "{} does not exist and does not end in a name to create",
                            dir.display()
                        ),
                    ));
                }
            }
            // Made by another writer since the first look: what is in it now decides.
            if !created_dir
                && !dir.join(MANIFEST_NAME).exists()
                && !holds_only_a_writers_files(dir)?
            {
                return Err(store_exists(dir, ExistsAdvice::Writer));
            }
        }
        let lock = match lock(dir) {
            Ok(l) => l,
            // Locked: another writer took the directory made here before this one locked it,
            // and is writing in it. Any other failure: removed only while it is still empty
            // (another writer may hold its lock all the same, say after a failure of this
            // process's own to open a file).
            Err(e) => {
                if created_dir && !matches!(e, Error::Locked { .. }) {
                    // A lock file no writer ever wrote its pid into is this one's own.
                    let lockfile = dir.join(LOCK_NAME);
                    if fs::metadata(&lockfile).is_ok_and(|m| m.len() == 0) {
                        let _ = fs::remove_file(&lockfile);
                    }
                    let _ = fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        // Under the lock. A failure from here on removes a directory this writer made (as
        // an abort does), lest a retry find a "store a writer died in" that never held data.
        let opened = (|| -> Result<_> {
            // What is at the path is read again under the lock: a writer that held it before may
            // have committed a store there since (appending then adds to it, creating refuses).
            let has_manifest = dir.join(MANIFEST_NAME).exists();
            if mode == Mode::Create && has_manifest {
                return Err(store_exists(dir, ExistsAdvice::Writer));
            }
            let mode = if mode == Mode::Append && !has_manifest { Mode::Create } else { mode };
            if mode != Mode::Append {
                // (Also when the manifest the first look found is gone now.)
                validate_spec(&spec, spec.logprobs.unwrap_or_else(|| default_codec(spec.kind)))?;
            }
            let shards_dir = dir.join(SHARDS_DIR);
            fs::create_dir_all(&shards_dir).io_ctx("create shards directory", &shards_dir)?;

            let mut known = HashSet::new();
            let mut replaced_files = Vec::new();
            let (manifest, codec) = match mode {
                Mode::Append => {
                    let m = Manifest::read(dir)?;
                    let codec = check_append(dir, &m, &spec)?;
                    let p = params_from_manifest(&m, &dir.join(MANIFEST_NAME))?;
                    for (i, info) in m.shards.iter().enumerate() {
                        let s = ShardReader::open(dir, i as u32, info, &p, false)?;
                        known.extend(s.footer.records.iter().map(|r| r.sample_id));
                    }
                    let mut m = m;
                    if let Some(extra) = &spec.metadata
                        && let (Some(dst), Some(src)) =
                            (m.metadata.as_object_mut(), extra.as_object())
                    {
                        for (k, v) in src {
                            dst.insert(k.clone(), v.clone());
                        }
                    }
                    fill_identity(
                        &mut m.teacher,
                        &mut m.tokenizer,
                        spec.teacher.as_ref(),
                        spec.tokenizer.as_ref(),
                    );
                    (m, codec)
                }
                Mode::Create | Mode::Overwrite => {
                    let codec = spec.logprobs.unwrap_or_else(|| default_codec(spec.kind));
                    if mode == Mode::Overwrite && has_manifest {
                        // The old store stays readable until the first commit replaces it.
                        if let Ok(old) = Manifest::read(dir) {
                            replaced_files = old.shards.iter().map(|s| s.file.clone()).collect();
                        }
                    }
                    let m = Manifest {
                        format: FORMAT_NAME.into(),
                        format_version: FORMAT_VERSION,
                        kind: spec.kind.name().into(),
                        k: spec.k,
                        vocab_size: spec.vocab_size,
                        temperature: spec.temperature,
                        codec: codec_info(codec, opts.zstd_level),
                        teacher: spec.teacher.clone(),
                        tokenizer: spec.tokenizer.clone(),
                        created_by: tool(),
                        updated_by: tool(),
                        metadata: spec.metadata.clone().unwrap_or_else(|| serde_json::json!({})),
                        num_samples: 0,
                        num_positions: 0,
                        shards: Vec::new(),
                    };
                    (m, codec)
                }
            };
            let params = CodecParams {
                kind: spec.kind,
                k: manifest.k,
                vocab_size: manifest.vocab_size,
                logprobs: codec,
                zstd_level: opts.zstd_level,
            };
            let next_seq = max_seq(dir)?.map_or(0, |s| s + 1);
            Ok((mode, manifest, params, known, replaced_files, next_seq))
        })();
        let (mode, manifest, params, known, replaced_files, next_seq) = match opened {
            Ok(parts) => parts,
            Err(e) => {
                if created_dir {
                    remove_created_store(dir, Some(lock));
                }
                return Err(e);
            }
        };
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            mode,
            lock: Some(lock),
            seen: SeenIds::new(manifest.vocab_size),
            manifest,
            ever_committed: mode == Mode::Append,
            created_dir,
            new_dirs,
            params,
            opts,
            known,
            pending: ChunkBuf::default(),
            shard: None,
            finished: Vec::new(),
            uncommitted_files: Vec::new(),
            replaced_files,
            left_behind: Vec::new(),
            next_seq,
            scratch: codec::EncodeScratch::default(),
            closed: false,
        })
    }

    pub fn params(&self) -> &CodecParams {
        &self.params
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the store holds `sample_id` (committed, or added since the last commit).
    pub fn holds(&self, sample_id: u64) -> bool {
        self.known.contains(&sample_id)
    }

    /// Samples added since the last commit plus those committed.
    pub fn num_samples(&self) -> usize {
        self.known.len()
    }

    /// Shard files of the replaced store (`Mode::Overwrite`) that could not be deleted
    /// after the commit, with the error; emptied by the call. The store no longer refers to
    /// them (`clean` deletes them once the cause is fixed).
    pub fn take_left_behind(&mut self) -> Vec<FileLeft> {
        std::mem::take(&mut self.left_behind)
    }

    /// Samples added since the last commit (what an abort discards).
    pub fn num_uncommitted(&self) -> usize {
        self.known.len().saturating_sub(self.manifest.num_samples as usize)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed { Err(Error::State("the writer is closed".into())) } else { Ok(()) }
    }

    /// Add one record of `positions` positions: `fill` validates it and appends it to the
    /// pending chunk (see [`crate::record`]); a record it rejects leaves nothing behind.
    /// (`positions` only decides where chunks are closed, before `fill` runs.)
    pub fn add(
        &mut self,
        sample_id: u64,
        positions: usize,
        fill: impl FnOnce(&mut ChunkBuf, &mut SeenIds) -> Result<()>,
    ) -> Result<()> {
        self.check_open()?;
        if self.known.contains(&sample_id) {
            return Err(Error::DuplicateSample {
                sample_id,
                msg: format!(
                    "it is already in {} (committed or added earlier by this writer)",
                    self.dir.display()
                ),
            });
        }
        // Chunk-table counts are u32: a chunk holds at most HALF before a record is added
        // and a record at most HALF, so a chunk never overflows.
        const HALF: usize = u32::MAX as usize / 2;
        // A record that would take the pending chunk past chunk_positions starts a new one,
        // so that reading a record decodes at most max(chunk_positions, its length)
        // positions: a shuffled read then decodes little it does not return.
        let pending = self.pending.positions();
        let overflows =
            pending > 0 && pending.saturating_add(positions) > self.opts.chunk_positions;
        if overflows || pending > HALF || self.pending.entries() > HALF {
            self.flush_chunk()?;
        }
        let mark = self.pending.mark();
        let (p0, e0) = (self.pending.positions(), self.pending.entries());
        fill(&mut self.pending, &mut self.seen)?;
        let (p1, e1) = (self.pending.positions(), self.pending.entries());
        if p1 - p0 > HALF || e1 - e0 > HALF {
            self.pending.rollback(mark);
            return Err(Error::InvalidRecord {
                sample_id,
                msg: format!(
                    "{} positions and {} target entries are too many for one record",
                    p1 - p0,
                    e1 - e0
                ),
            });
        }
        self.known.insert(sample_id);
        if p1 >= self.opts.chunk_positions {
            self.flush_chunk()?;
        }
        Ok(())
    }

    /// Make a committed shard of another store part of this one, as it is: its file is
    /// hard-linked into this store's `shards/` (shard files are never modified, so two
    /// stores can share one), or copied when `copy` is set or the file system cannot link
    /// it (across file systems, say). A copy is checked against the shard's manifest entry
    /// (size and CRC-32 of the whole file) as it is written. The shard's records belong to
    /// this store from the next commit on, like records added one by one.
    ///
    /// The shard must be encoded as this store is (kind, K, vocabulary, codec, temperature:
    /// else [`Error::Mismatch`]) and hold no sample id already in this store or added since
    /// the last commit. `tick(bytes)` is called as the file's bytes are copied (once, with
    /// its size, for a link); a `false` from it stops a copy with [`progress::stopped`], the
    /// partial file removed.
    pub fn add_shard(
        &mut self,
        shard: &ShardReader,
        copy: bool,
        tick: &dyn Fn(u64) -> bool,
    ) -> Result<ShardPlacement> {
        self.check_open()?;
        // (Its header was checked against its own manifest entry, uid included, at open.)
        self.check_same_encoding(shard)?;
        let uid = format!("{:016x}", shard.header.uid);
        let mut ids = HashSet::with_capacity(shard.footer.records.len());
        for r in &shard.footer.records {
            if self.known.contains(&r.sample_id) || !ids.insert(r.sample_id) {
                return Err(Error::DuplicateSample {
                    sample_id: r.sample_id,
                    msg: format!(
                        "{} holds it, and it is already in {} (committed, added earlier by \
                         this writer, or earlier in the same shard)",
                        shard.path.display(),
                        self.dir.display()
                    ),
                });
            }
        }
        // Records added before stay before the adopted shard, in a shard of their own.
        self.flush_chunk()?;
        self.finish_shard()?;
        let rel = format!("{SHARDS_DIR}/{:06}-{uid}.lcs", self.next_seq);
        let path = self.dir.join(&rel);
        let linked = !copy && fs::hard_link(&shard.path, &path).is_ok();
        // Whatever stops a link (another file system, a file system without links, a
        // link limit) is no reason to stop: the copy that follows reports real faults.
        if !linked {
            copy_shard_file(shard, &path, tick)?;
        } else {
            tick(shard.info.bytes);
        }
        self.next_seq += 1;
        self.uncommitted_files.push(path);
        self.finished.push(ShardInfo { file: rel, ..shard.info.clone() });
        self.known.extend(ids);
        Ok(if linked { ShardPlacement::Linked } else { ShardPlacement::Copied })
    }

    fn header(&self) -> ShardHeader {
        ShardHeader {
            format_version: FORMAT_VERSION,
            kind: self.params.kind,
            logprob_codec: self.params.logprobs.code(),
            id_codec: codec::ID_CODEC_V1,
            flags: if self.params.has_logprobs() { FLAG_HAS_LOGPROBS } else { 0 },
            k: self.params.k,
            vocab_size: self.params.vocab_size,
            step: self.params.logprobs.step(),
            kl_bound: self.params.logprobs.kl_bound().unwrap_or(0.0),
            uid: random_u64(),
            temperature: self.manifest.temperature as f32,
        }
    }

    fn flush_chunk(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        codec::encode_chunk(&self.pending, &self.params, &mut self.scratch)?;
        self.start_shard()?;
        let w = self.shard.as_mut().ok_or_else(no_shard)?;
        w.add_chunk(self.scratch.payload(), &self.pending)?;
        self.pending.clear();
        self.finish_shard_if_full()
    }

    /// Start a shard unless one is being written.
    fn start_shard(&mut self) -> Result<()> {
        if self.shard.is_none() {
            let h = self.header();
            let w = ShardWriter::create(&self.dir, self.next_seq, &h)?;
            self.next_seq += 1;
            self.uncommitted_files.push(w.path.clone());
            self.shard = Some(w);
        }
        Ok(())
    }

    fn finish_shard_if_full(&mut self) -> Result<()> {
        let full = self
            .shard
            .as_ref()
            .is_some_and(|w| w.len + (HEADER_LEN as u64) >= self.opts.shard_bytes);
        if full { self.finish_shard() } else { Ok(()) }
    }

    /// Add the records of `shard`, a shard of another store encoded as this one is (kind, K,
    /// vocabulary, codec, temperature: else [`Error::Mismatch`]), for which `keep` holds, in
    /// their order, without decoding where it can: a chunk all of whose records are kept as
    /// its stored bytes (checked against its CRC-32 as they are read, so its values stay bit
    /// for bit what they were); a chunk of kept and other records decoded, its kept records
    /// added as they were decoded (encoded again with this store's codec). `tick(bytes)` is
    /// called with each chunk's stored size as it is done; a `false` from it stops the copy
    /// with [`progress::stopped`] (the records added so far stay uncommitted in the writer).
    pub fn copy_records(
        &mut self,
        shard: &ShardReader,
        keep: &dyn Fn(u64) -> bool,
        tick: &dyn Fn(u64) -> bool,
    ) -> Result<CopiedRecords> {
        self.check_open()?;
        self.check_same_encoding(shard)?;
        let p = self.params.clone();
        let mut out = CopiedRecords::default();
        for (c, e) in shard.footer.chunks.iter().enumerate() {
            let records = shard.chunk_record_entries(c)?;
            let (mut kept, mut positions) = (0, 0);
            for r in records.iter().filter(|r| keep(r.sample_id)) {
                kept += 1;
                positions += u64::from(r.length);
            }
            out.samples += kept as u64;
            out.positions += positions;
            if kept == records.len() {
                self.add_chunk_bytes(&shard.chunk_bytes(c)?, e, records)?;
                out.chunks_copied += 1;
            } else if kept > 0 {
                let d = shard.decode_chunk(c, &p)?;
                for (j, r) in records.iter().enumerate().filter(|(_, r)| keep(r.sample_id)) {
                    self.add(r.sample_id, r.length as usize, |buf, _| {
                        buf.push_decoded(&d, j, r.sample_id, &p);
                        Ok(())
                    })?;
                }
                out.chunks_reencoded += 1;
            }
            if !tick(u64::from(e.stored_len)) {
                return Err(progress::stopped());
            }
        }
        Ok(out)
    }

    /// A shard to copy records from must be encoded as this store is: its values are taken
    /// as they are stored (or as they decode).
    fn check_same_encoding(&self, shard: &ShardReader) -> Result<()> {
        let src = params_from_header(&shard.header, &shard.location())?;
        check_encoding(&shard.path, &self.params, &src)?;
        if shard.header.temperature != self.manifest.temperature as f32 {
            return Err(Error::Mismatch {
                path: shard.path.clone(),
                field: "temperature".into(),
                expected: self.manifest.temperature.to_string(),
                found: shard.header.temperature.to_string(),
            });
        }
        Ok(())
    }

    /// Append a chunk copied from another shard of this store's encoding, after the records
    /// added before it (so they keep their order).
    fn add_chunk_bytes(
        &mut self,
        bytes: &[u8],
        entry: &ChunkEntry,
        records: &[RecordEntry],
    ) -> Result<()> {
        let mut ids = HashSet::with_capacity(records.len());
        for r in records {
            if self.known.contains(&r.sample_id) || !ids.insert(r.sample_id) {
                return Err(Error::DuplicateSample {
                    sample_id: r.sample_id,
                    msg: format!(
                        "it is already in {} (committed or added earlier by this writer)",
                        self.dir.display()
                    ),
                });
            }
        }
        self.flush_chunk()?;
        self.start_shard()?;
        self.shard.as_mut().ok_or_else(no_shard)?.copy_chunk(bytes, entry, records)?;
        self.known.extend(ids);
        self.finish_shard_if_full()
    }

    fn finish_shard(&mut self) -> Result<()> {
        if let Some(w) = self.shard.take() {
            self.finished.push(w.finish()?);
        }
        Ok(())
    }

    /// Make everything added so far durable and visible: finish the current shard and
    /// atomically replace the manifest. Later additions go to a new shard.
    pub fn commit(&mut self) -> Result<()> {
        self.check_open()?;
        self.flush_chunk()?;
        self.finish_shard()?;
        let mut m = self.manifest.clone();
        for s in &self.finished {
            m.num_samples += s.num_samples;
            m.num_positions += s.num_positions;
            m.shards.push(s.clone());
        }
        m.updated_by = tool();
        manifest::sync_dir(&self.dir.join(SHARDS_DIR))?;
        for d in &self.new_dirs {
            let parent = d.parent().filter(|p| !p.as_os_str().is_empty());
            manifest::sync_dir(parent.unwrap_or(Path::new(".")))?;
        }
        let committed = m.commit(&self.dir);
        if let Err(CommitError::NotReplaced(e)) = committed {
            return Err(e);
        }
        // The new manifest is in place: what it names is no longer this writer's to remove.
        self.new_dirs.clear();
        self.manifest = m;
        self.finished.clear();
        self.uncommitted_files.clear();
        self.ever_committed = true;
        if let Err(CommitError::NotDurable(e)) = committed {
            // A power loss could still bring back the replaced store's manifest: keep its
            // shard files (orphans once the new manifest is durable).
            self.replaced_files.clear();
            return Err(e);
        }
        // Shards of a replaced store are garbage once the new manifest is in place; the
        // commit stands whether or not they can be deleted.
        let replaced = std::mem::take(&mut self.replaced_files);
        let (_, left) = delete_left_out(&self.dir, replaced.iter().map(String::as_str));
        self.left_behind.extend(left);
        Ok(())
    }

    /// Commit and release the store.
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        let r = self.commit();
        if r.is_err() {
            self.abort();
            return r;
        }
        self.closed = true;
        self.lock = None;
        Ok(())
    }

    /// Drop everything written since the last commit and release the store. A store that
    /// this writer created and never committed is removed.
    pub fn abort(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        self.pending.clear();
        self.shard = None;
        for f in self.uncommitted_files.drain(..) {
            let _ = fs::remove_file(f);
        }
        self.finished.clear();
        if !self.ever_committed && self.created_dir {
            remove_created_store(&self.dir, self.lock.take());
        }
        self.lock = None;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// Remove the directory of a store this writer created and never committed: its empty
/// `shards/`, then its lock file while the lock is still held (a writer that opened the
/// file just before finds it gone once it has the lock: see [`lock`]), then the directory,
/// if nothing else is in it.
fn remove_created_store(dir: &Path, lock: Option<File>) {
    let _ = fs::remove_dir(dir.join(SHARDS_DIR));
    let _ = fs::remove_file(dir.join(LOCK_NAME));
    drop(lock);
    let _ = fs::remove_dir(dir);
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

/// How [`StoreWriter::add_shard`] placed a shard file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPlacement {
    /// A hard link to the other store's file.
    Linked,
    /// A checked copy.
    Copied,
}

/// Copy `shard`'s file to `dest` (a new file), checking size and CRC-32 against its
/// manifest entry, and fsync it. A failed copy leaves no file behind.
fn copy_shard_file(shard: &ShardReader, dest: &Path, tick: &dyn Fn(u64) -> bool) -> Result<()> {
    use std::io::Read;
    let mut src = File::open(&shard.path).io_ctx("open shard", &shard.path)?;
    // Created here, so removed on failure below; a file already there is not ours to remove.
    let out = FsOpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .io_ctx("create shard", dest)?;
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let mut buf = vec![0u8; 1 << 20];
        let mut hasher = crc32fast::Hasher::new();
        let mut len = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read shard", &shard.path, e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).io_ctx("write shard", dest)?;
            len += n as u64;
            if !tick(n as u64) {
                return Err(progress::stopped());
            }
        }
        let crc = hasher.finalize();
        if len != shard.info.bytes || Some(crc) != manifest::parse_checksum(&shard.info.checksum) {
            return Err(Error::corrupt(
                shard.location(),
                format!(
                    "the file has {len} bytes with CRC-32 {}, its manifest says {} bytes with \
                     {} (changed since it was opened, or damaged: verify its store)",
                    manifest::format_checksum(crc),
                    shard.info.bytes,
                    shard.info.checksum
                ),
            ));
        }
        let out = out.into_inner().map_err(|e| Error::io("flush shard", dest, e.into_error()))?;
        out.sync_all().io_ctx("fsync shard", dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(dest);
    }
    result
}

/// Fill the teacher and tokenizer fields left unset with those of `other_teacher` and
/// `other_tokenizer` (appending writers may know more than the writer that created the
/// store; `check_append` has made sure that what both know agrees).
pub(crate) fn fill_identity(
    teacher: &mut Option<TeacherInfo>,
    tokenizer: &mut Option<TokenizerInfo>,
    other_teacher: Option<&TeacherInfo>,
    other_tokenizer: Option<&TokenizerInfo>,
) {
    if let Some(t) = other_teacher {
        let s = teacher.get_or_insert_with(|| t.clone());
        s.name = s.name.take().or_else(|| t.name.clone());
        s.config_fingerprint = s.config_fingerprint.take().or_else(|| t.config_fingerprint.clone());
    }
    if let Some(t) = other_tokenizer {
        let s = tokenizer.get_or_insert_with(|| t.clone());
        s.name = s.name.take().or_else(|| t.name.clone());
        s.vocab_fingerprint = s.vocab_fingerprint.take().or_else(|| t.vocab_fingerprint.clone());
    }
}

/// Check an appending writer's spec against the stored configuration, naming the first
/// field that differs. Returns the codec to use.
pub(crate) fn check_append(dir: &Path, m: &Manifest, spec: &StoreSpec) -> Result<LogprobCodec> {
    let mismatch = |field: &str, expected: String, found: String| Error::Mismatch {
        path: dir.to_path_buf(),
        field: field.into(),
        expected,
        found,
    };
    let stored = params_from_manifest(m, &dir.join(MANIFEST_NAME))?;
    let want = CodecParams {
        kind: spec.kind,
        k: spec.k,
        vocab_size: spec.vocab_size,
        logprobs: spec.logprobs.unwrap_or(stored.logprobs),
        zstd_level: stored.zstd_level,
    };
    check_encoding(dir, &want, &stored)?;
    if spec.temperature != m.temperature {
        return Err(mismatch(
            "temperature",
            spec.temperature.to_string(),
            m.temperature.to_string(),
        ));
    }
    if let (Some(a), Some(b)) = (&spec.teacher, &m.teacher) {
        if a.name.is_some() && b.name.is_some() && a.name != b.name {
            return Err(mismatch("teacher.name", quoted(&a.name), quoted(&b.name)));
        }
        if a.config_fingerprint.is_some()
            && b.config_fingerprint.is_some()
            && a.config_fingerprint != b.config_fingerprint
        {
            return Err(mismatch(
                "teacher.config_fingerprint",
                quoted(&a.config_fingerprint),
                quoted(&b.config_fingerprint),
            ));
        }
    }
    if let (Some(a), Some(b)) = (&spec.tokenizer, &m.tokenizer) {
        if a.name.is_some() && b.name.is_some() && a.name != b.name {
            return Err(mismatch("tokenizer.name", quoted(&a.name), quoted(&b.name)));
        }
        if a.vocab_fingerprint.is_some()
            && b.vocab_fingerprint.is_some()
            && a.vocab_fingerprint != b.vocab_fingerprint
        {
            return Err(mismatch(
                "tokenizer.vocab_fingerprint",
                quoted(&a.vocab_fingerprint),
                quoted(&b.vocab_fingerprint),
            ));
        }
    }
    Ok(stored.logprobs)
}

/// The first of kind, K, vocabulary and codec in which `found` differs from `want`, as a
/// mismatch of the store or shard at `path`.
fn check_encoding(path: &Path, want: &CodecParams, found: &CodecParams) -> Result<()> {
    let mismatch = |field: &str, expected: String, found: String| {
        Err(Error::Mismatch { path: path.to_path_buf(), field: field.into(), expected, found })
    };
    if want.kind != found.kind {
        return mismatch("kind", want.kind.name().into(), found.kind.name().into());
    }
    if want.k != found.k {
        return mismatch("k", want.k.to_string(), found.k.to_string());
    }
    if want.vocab_size != found.vocab_size {
        return mismatch("vocab_size", want.vocab_size.to_string(), found.vocab_size.to_string());
    }
    if want.logprobs != found.logprobs {
        return mismatch("codec", want.logprobs.describe(), found.logprobs.describe());
    }
    Ok(())
}

/// A name or fingerprint as messages show it: quoted, or `none`.
fn quoted(v: &Option<String>) -> String {
    v.as_deref().map_or_else(|| "none".into(), |s| format!("{s:?}"))
}

#[cfg(all(test, unix))]
mod lock_tests {
    use super::*;

    /// A lock file opened before it was removed (and replaced) is not the store's lock.
    #[test]
    fn a_lock_counts_only_on_the_file_at_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_NAME);
        let old = File::create(&path).unwrap();
        assert!(is_same_file(&old, &path));
        fs::remove_file(&path).unwrap();
        assert!(!is_same_file(&old, &path));
        File::create(&path).unwrap();
        assert!(!is_same_file(&old, &path));
        assert!(is_same_file(&File::open(&path).unwrap(), &path));
    }

    /// A shared lock held for an instant (clean's dry run looking for a writer) delays a
    /// writer's lock a little instead of refusing it; an exclusive one refuses it.
    #[test]
    fn a_passing_shared_lock_is_waited_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_NAME);
        File::create(&path).unwrap();
        let probe = File::open(&path).unwrap();
        probe.lock_shared().unwrap();
        let held = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            drop(probe);
        });
        let got = lock(dir.path());
        held.join().unwrap();
        assert!(got.is_ok(), "{:?}", got.err());
        drop(got);
        let writer = lock(dir.path()).unwrap();
        assert!(matches!(lock(dir.path()), Err(Error::Locked { .. })));
        drop(writer);
    }
}
