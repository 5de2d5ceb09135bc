//! Reading a store: open and cross-check the manifest and every shard's header and footer,
//! index sample ids, decode chunks on demand (checksum first), read single records and
//! padded batches in parallel.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::codec::{self, CodecParams, DecodedChunk, LogprobCodec, Record};
use crate::error::{Error, Location, Result};
use crate::format::{
    self, Footer, HEADER_LEN, Kind, ShardHeader, ShardIndex, TRAILER_LEN, Trailer,
};
use crate::manifest::{Manifest, ShardInfo, TokenizerInfo};
use crate::pool::{BufferPool, Pooled};
use crate::source::{self, Source};

/// Options of [`Store::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Memory-map shards (`None`: yes, unless on a network file system).
    pub mmap: Option<bool>,
    /// Refuse the store unless its vocabulary has this size.
    pub expect_vocab_size: Option<u32>,
    /// Refuse the store unless its tokenizer matches (fingerprint if both sides have one,
    /// else name).
    pub expect_tokenizer: Option<TokenizerInfo>,
    /// Decoded chunks kept for reuse (default 8).
    pub cache_chunks: Option<usize>,
    /// Shards read with positioned reads keep a file open each, up to this many shards;
    /// past it they share this many open files, least recently used closed first
    /// (`None`: a quarter of the process's open-file limit, within 16..=1024; 256 where
    /// the limit is not known).
    pub max_open_files: Option<usize>,
}

/// Codec parameters described by a manifest.
pub fn params_from_manifest(m: &Manifest, path: &Path) -> Result<CodecParams> {
    let corrupt = |msg: String| Error::corrupt(Location::file(path), msg);
    let kind = m.kind().ok_or_else(|| corrupt(format!("unknown kind {:?}", m.kind)))?;
    let logprobs = match m.codec.logprobs.as_str() {
        "none" => LogprobCodec::None,
        "lossless" => LogprobCodec::Lossless,
        "abs" => {
            let step =
                m.codec.step.ok_or_else(|| corrupt("codec \"abs\" without a step".into()))?;
            LogprobCodec::from_header(2, step as f32, 0.0)
                .filter(|c| f64::from(c.step()) == step)
                .ok_or_else(|| {
                corrupt(format!(
                    "codec step {step} is not m 2^-e (m in 1, 3, 5, 7) between 2^-13 and 2"
                ))
            })?
        }
        "kl" => {
            let bound = m
                .codec
                .kl_bound
                .ok_or_else(|| corrupt("codec \"kl\" without a kl_bound".into()))?;
            LogprobCodec::from_header(3, 0.0, bound as f32)
                .ok_or_else(|| corrupt(format!("kl_bound {bound} must be positive")))?
        }
        other => return Err(corrupt(format!("unknown log-probability codec {other:?}"))),
    };
    if let Some(msg) = combination_error(kind, logprobs) {
        return Err(corrupt(msg.into()));
    }
    if m.codec.ids != codec::ID_CODEC_NAME {
        return Err(corrupt(format!("unknown id codec {:?}", m.codec.ids)));
    }
    Ok(CodecParams {
        kind,
        k: m.k,
        vocab_size: m.vocab_size,
        logprobs,
        zstd_level: m.codec.zstd_level,
    })
}

/// Why a store of `kind` cannot use `logprobs`, if it cannot.
fn combination_error(kind: Kind, logprobs: LogprobCodec) -> Option<&'static str> {
    match (kind, logprobs) {
        (Kind::TopK, LogprobCodec::None) => Some("a top-K store must keep log-probabilities"),
        (Kind::Sampled, LogprobCodec::Kl { .. }) => Some("the kl codec is for top-K stores"),
        _ => None,
    }
}

/// Codec parameters described by a shard header (a shard read without its manifest). The
/// same rules as [`params_from_manifest`] apply; `zstd_level` is informational and set to 0.
pub fn params_from_header(h: &ShardHeader, loc: &Location) -> Result<CodecParams> {
    let corrupt = |msg: String| Error::corrupt(loc.clone(), msg);
    let logprobs =
        LogprobCodec::from_header(h.logprob_codec, h.step, h.kl_bound).ok_or_else(|| {
            corrupt(format!(
                "log-probability codec {} with step {} and KL bound {} is not defined",
                h.logprob_codec, h.step, h.kl_bound
            ))
        })?;
    if let Some(msg) = combination_error(h.kind, logprobs) {
        return Err(corrupt(msg.into()));
    }
    if h.id_codec != codec::ID_CODEC_V1 {
        return Err(corrupt(format!("unknown id codec {}", h.id_codec)));
    }
    if h.k == 0 || h.vocab_size == 0 {
        return Err(corrupt(format!(
            "k = {} and vocab_size = {} must be positive",
            h.k, h.vocab_size
        )));
    }
    Ok(CodecParams { kind: h.kind, k: h.k, vocab_size: h.vocab_size, logprobs, zstd_level: 0 })
}

/// One open shard.
pub struct ShardReader {
    pub index: u32,
    pub path: PathBuf,
    pub info: ShardInfo,
    pub source: Source,
    pub header: ShardHeader,
    pub footer: Footer,
    /// Chunk of every record, in record order.
    record_chunk: Vec<u32>,
}

impl ShardReader {
    pub fn location(&self) -> Location {
        Location::file(&self.path).shard(self.index)
    }

    /// Open a shard and check its header, trailer and footer against the manifest entry.
    pub fn open(
        dir: &Path,
        index: u32,
        info: &ShardInfo,
        p: &CodecParams,
        use_mmap: bool,
    ) -> Result<ShardReader> {
        let path = dir.join(&info.file);
        let source = Source::open(&path, use_mmap)?;
        ShardReader::from_source(source, path, index, Some(info), p)
    }

    /// [`ShardReader::open`] through a store's cache of open files (see
    /// [`source::FileCache`]).
    pub fn open_cached(
        dir: &Path,
        index: u32,
        info: &ShardInfo,
        p: &CodecParams,
        files: &Arc<source::FileCache>,
    ) -> Result<ShardReader> {
        let path = dir.join(&info.file);
        let source = Source::open_cached(&path, files)?;
        ShardReader::from_source(source, path, index, Some(info), p)
    }

    /// Open a shard from bytes already in memory, on its own: the store configuration comes
    /// from its header ([`params_from_header`]) instead of a manifest. Every check that does
    /// not need a manifest is made, as in [`ShardReader::open`]; `path` only names the shard
    /// in error messages. Used by the fuzz targets and for shards received from elsewhere.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<(ShardReader, CodecParams)> {
        ShardReader::from_unlisted_source(Source::from_bytes(bytes), path, 0)
    }

    /// [`ShardReader::from_bytes`] for any source (a shard file with no manifest entry, as a
    /// manifest rebuild finds them); `index` names the shard in errors.
    pub fn from_unlisted_source(
        source: Source,
        path: &Path,
        index: u32,
    ) -> Result<(ShardReader, CodecParams)> {
        let loc = Location::file(path).shard(index);
        if source.len() < HEADER_LEN as u64 {
            return Err(Error::corrupt(
                loc,
                format!("shard of {} bytes is too short", source.len()),
            ));
        }
        let header = ShardHeader::decode(&source.read(0, HEADER_LEN, &loc)?, &loc)?;
        let p = params_from_header(&header, &loc)?;
        let shard = ShardReader::from_source(source, path.to_path_buf(), index, None, &p)?;
        Ok((shard, p))
    }

    /// Check a shard's header, trailer and footer, against `expect` (its manifest entry) when
    /// given. `path` names the shard in errors.
    pub fn from_source(
        source: Source,
        path: PathBuf,
        index: u32,
        expect: Option<&ShardInfo>,
        p: &CodecParams,
    ) -> Result<ShardReader> {
        let loc = Location::file(&path).shard(index);
        let len = source.len();
        if let Some(info) = expect
            && len != info.bytes
        {
            return Err(Error::corrupt(
                loc,
                format!(
                    "shard has {len} bytes, the manifest says {} (truncated or replaced?)",
                    info.bytes
                ),
            ));
        }
        if len < (HEADER_LEN + TRAILER_LEN) as u64 {
            return Err(Error::corrupt(loc, format!("shard of {len} bytes is too short")));
        }
        let header = match ShardHeader::decode(&source.read(0, HEADER_LEN, &loc)?, &loc) {
            Ok(h) => h,
            // The manifest, already checked, has a version this build reads, and a store's
            // shards share its version: a shard claiming another one is damaged (a flipped
            // bit in the version field), not newer. Say so, and say which shard. (A shard
            // opened on its own, without a manifest, may really be newer.)
            Err(Error::UnsupportedVersion { found, .. }) if expect.is_some() => {
                return Err(Error::corrupt(
                    loc.offset(8),
                    format!(
                        "shard header says format version {found}, but the manifest's version \
                         is one this build reads (up to {}): the header is damaged",
                        format::FORMAT_VERSION
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        let uid = format!("{:016x}", header.uid);
        check_header(&header, &uid, expect.map(|i| i.uid.as_str()), p, &loc)?;
        let trailer_at = len - TRAILER_LEN as u64;
        let trailer = Trailer::decode(&source.read(trailer_at, TRAILER_LEN, &loc)?, len, &loc)?;
        let footer_len = usize::try_from(trailer.footer_len)
            .map_err(|_| Error::corrupt(loc.clone(), "footer length does not fit in memory"))?;
        let footer_bytes = source.read(trailer.footer_offset, footer_len, &loc)?;
        let ShardIndex { footer, record_chunk } = ShardIndex::parse(&footer_bytes, &trailer, &loc)?;
        drop(footer_bytes);
        let info = match expect {
            Some(info) => {
                if footer.records.len() as u64 != info.num_samples
                    || footer.num_positions != info.num_positions
                    || footer.chunks.len() as u64 != info.num_chunks
                {
                    return Err(Error::corrupt(
                        loc,
                        format!(
                            "shard holds {} samples, {} positions, {} chunks; the manifest says {}, {}, {}",
                            footer.records.len(),
                            footer.num_positions,
                            footer.chunks.len(),
                            info.num_samples,
                            info.num_positions,
                            info.num_chunks
                        ),
                    ));
                }
                info.clone()
            }
            None => ShardInfo {
                file: path.to_string_lossy().into_owned(),
                uid,
                num_samples: footer.records.len() as u64,
                num_positions: footer.num_positions,
                num_chunks: footer.chunks.len() as u64,
                bytes: len,
                checksum: String::new(),
            },
        };
        Ok(ShardReader { index, path, info, source, header, footer, record_chunk })
    }

    pub fn num_chunks(&self) -> usize {
        self.footer.chunks.len()
    }

    /// Raw stored bytes of a chunk after checking its checksum.
    pub fn chunk_bytes(&self, chunk: usize) -> Result<std::borrow::Cow<'_, [u8]>> {
        let loc = self.location().chunk(chunk as u64);
        let e = self
            .footer
            .chunks
            .get(chunk)
            .ok_or_else(|| Error::corrupt(loc.clone(), "chunk index out of range"))?;
        let bytes = self.source.read(e.offset, e.stored_len as usize, &loc)?;
        let crc = format::crc32(&bytes);
        if crc != e.crc32 {
            return Err(Error::corrupt(
                loc.offset(e.offset),
                format!("chunk checksum mismatch: stored {:#010x}, computed {crc:#010x}", e.crc32),
            ));
        }
        Ok(bytes)
    }

    /// Decode a whole chunk.
    pub fn decode_chunk(&self, chunk: usize, p: &CodecParams) -> Result<DecodedChunk> {
        let bytes = self.chunk_bytes(chunk)?;
        let e = &self.footer.chunks[chunk];
        let first = e.first_record as usize;
        let lengths: Vec<u32> = self.footer.records[first..first + e.num_records as usize]
            .iter()
            .map(|r| r.length)
            .collect();
        let loc = self.location().chunk(chunk as u64);
        codec::decode_chunk(&bytes, &lengths, e.num_entries as usize, p, &loc)
    }

    /// Check and decompress a chunk of a top-K store, ready to decode into caller slots.
    pub fn prepare_topk(&self, chunk: usize, p: &CodecParams) -> Result<codec::PreparedTopk> {
        let bytes = self.chunk_bytes(chunk)?;
        let e = &self.footer.chunks[chunk];
        let first = e.first_record as usize;
        let positions: usize = self.footer.records[first..first + e.num_records as usize]
            .iter()
            .map(|r| r.length as usize)
            .sum();
        let loc = self.location().chunk(chunk as u64);
        codec::PreparedTopk::new(&bytes, positions, e.num_entries as usize, p, &loc)
    }

    /// The record table's entries of chunk `chunk`.
    pub fn chunk_record_entries(&self, chunk: usize) -> Result<&[format::RecordEntry]> {
        let e = self.footer.chunks.get(chunk);
        e.and_then(|e| {
            let first = e.first_record as usize;
            self.footer.records.get(first..first.checked_add(e.num_records as usize)?)
        })
        .ok_or_else(|| {
            Error::corrupt(self.location().chunk(chunk as u64), "chunk outside the record table")
        })
    }

    /// Records in chunk `chunk`.
    pub fn chunk_records(&self, chunk: usize) -> usize {
        self.footer.chunks.get(chunk).map_or(0, |e| e.num_records as usize)
    }

    /// Chunk of record `record` and the record's index inside that chunk.
    pub fn locate(&self, record: usize) -> Option<(usize, usize)> {
        format::locate_record(&self.footer, &self.record_chunk, record)
    }
}

/// `uid` is the header's uid as hex, `want_uid` the manifest entry's; a shard opened on its
/// own has none to match.
pub(crate) fn check_header(
    h: &ShardHeader,
    uid: &str,
    want_uid: Option<&str>,
    p: &CodecParams,
    loc: &Location,
) -> Result<()> {
    let mut problems = Vec::new();
    if let Some(want) = want_uid
        && uid != want
    {
        problems.push(format!("uid {uid} (manifest: {want})"));
    }
    if h.kind != p.kind {
        problems.push(format!("kind {} (manifest: {})", h.kind.name(), p.kind.name()));
    }
    if h.k != p.k {
        problems.push(format!("k {} (manifest: {})", h.k, p.k));
    }
    if h.vocab_size != p.vocab_size {
        problems.push(format!("vocab_size {} (manifest: {})", h.vocab_size, p.vocab_size));
    }
    if h.logprob_codec != p.logprobs.code()
        || h.step != p.logprobs.step()
        || h.kl_bound != p.logprobs.kl_bound().unwrap_or(0.0)
    {
        problems.push(format!("log-probability codec {} step {}", h.logprob_codec, h.step));
    }
    if h.id_codec != codec::ID_CODEC_V1 {
        problems.push(format!("id codec {}", h.id_codec));
    }
    if h.has_logprobs() != p.has_logprobs() {
        problems.push("log-probability flag".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::corrupt(
            loc.clone(),
            format!("shard header disagrees with the manifest: {}", problems.join(", ")),
        ))
    }
}

/// Where a sample lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IndexEntry {
    pub sample_id: u64,
    pub shard: u32,
    pub record: u32,
}

/// A small least-recently-used cache of decoded chunks. A reader that cannot take its lock
/// at once decodes without it rather than wait (this also keeps a process forked while
/// another thread held the lock from deadlocking).
struct ChunkCache {
    capacity: usize,
    entries: Vec<((u32, u32), Arc<DecodedChunk>)>,
}

impl ChunkCache {
    fn get(&mut self, key: (u32, u32)) -> Option<Arc<DecodedChunk>> {
        let i = self.entries.iter().position(|(k, _)| *k == key)?;
        let e = self.entries.remove(i);
        let v = Arc::clone(&e.1);
        self.entries.push(e);
        Some(v)
    }
    fn contains(&self, key: (u32, u32)) -> bool {
        self.entries.iter().any(|(k, _)| *k == key)
    }
    fn put(&mut self, key: (u32, u32), v: Arc<DecodedChunk>) {
        if self.capacity == 0 || self.entries.iter().any(|(k, _)| *k == key) {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.remove(0);
        }
        self.entries.push((key, v));
    }
}

/// An open store.
pub struct Store {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub params: CodecParams,
    pub shards: Vec<ShardReader>,
    index: Vec<IndexEntry>,
    cache: Mutex<ChunkCache>,
    pool: Arc<BufferPool>,
}

/// Records of a batch, row-major: padded to common shapes, or packed one after the other.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub batch: usize,
    /// Longest record of the batch; 0 for a packed batch (`Store::read_packed`), whose
    /// arrays are `[sum(lengths)]` and `[sum(lengths), width]` instead of `[batch, max_len]`
    /// and `[batch, max_len, width]`.
    pub max_len: usize,
    /// Entries per position: K for top-K, the widest sampled row of the batch for sampled.
    pub width: usize,
    pub lengths: Vec<u32>,
    /// `[batch, max_len]`, padded with 0.
    pub input_ids: Vec<i32>,
    /// `[batch, max_len, width]`, padded with 0 (top-K) or -1 (sampled).
    pub ids: Vec<i32>,
    /// `[batch, max_len, width]` (empty when the store keeps none), padded with -inf.
    pub logprobs: Vec<f32>,
    /// `[batch, max_len, width]` for sampled stores (else empty), padded with 0.
    pub counts: Vec<i32>,
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// How many manifests [`Store::open`] tries when shard files vanish under it.
const OPEN_ATTEMPTS: usize = 8;

impl Store {
    /// Open the store at `dir` as its committed manifest describes it.
    ///
    /// A writer that replaces the store (`mode="w"`) or a removal deletes shard files once
    /// its new manifest is committed; if that happens between the reading of
    /// the manifest and the opening of the files it names, the open starts again from the
    /// new manifest (up to 8 times, and only while the manifest keeps
    /// changing), so a reader never fails for a store that is sound at every moment.
    pub fn open(dir: &Path, opts: &OpenOptions) -> Result<Store> {
        // Absolute: shards are opened again after a fork, and a process may change its
        // working directory while the store is open.
        let dir = crate::writer::absolute_dir(dir)?;
        Store::open_from(&dir, Manifest::read_committed(&dir)?, opts)
    }

    /// [`Store::open`] from a manifest already read.
    fn open_from(dir: &Path, mut manifest: Manifest, opts: &OpenOptions) -> Result<Store> {
        for _ in 1..OPEN_ATTEMPTS {
            match Store::open_manifest(dir, &manifest, opts) {
                Err(e) if is_not_found(&e) => {
                    let now = Manifest::read(dir)?;
                    if now.shards == manifest.shards {
                        // Missing, not replaced: the store is damaged.
                        return Err(e);
                    }
                    manifest = now;
                }
                r => return r,
            }
        }
        Store::open_manifest(dir, &manifest, opts)
    }

    fn open_manifest(dir: &Path, manifest: &Manifest, opts: &OpenOptions) -> Result<Store> {
        let manifest = manifest.clone();
        let mpath = dir.join(crate::manifest::MANIFEST_NAME);
        let params = params_from_manifest(&manifest, &mpath)?;
        if let Some(v) = opts.expect_vocab_size
            && v != manifest.vocab_size
        {
            return Err(Error::Mismatch {
                path: dir.to_path_buf(),
                field: "vocab_size".into(),
                expected: v.to_string(),
                found: manifest.vocab_size.to_string(),
            });
        }
        if let Some(t) = &opts.expect_tokenizer {
            check_tokenizer(dir, t, manifest.tokenizer.as_ref())?;
        }
        let use_mmap = opts.mmap.unwrap_or_else(|| source::mmap_is_safe(dir));
        // Under an address-space limit (`ulimit -v`) maps count like allocations, and a map
        // that took the last of it would leave decoding to fail an allocation (an abort, not
        // an error; the allocator reserves address space in large segments). So by default
        // shards are mapped only while their total stays within half of what is left at open
        // beyond MAP_RESERVE; the others are read with positioned reads.
        let mut map_budget = match opts.mmap {
            None if use_mmap => source::address_space_left()
                .map(|left| left.saturating_sub(source::MAP_RESERVE) / 2),
            _ => None,
        };
        let maps: Vec<bool> = manifest
            .shards
            .iter()
            .map(|info| {
                use_mmap
                    && match map_budget.as_mut() {
                        None => true,
                        Some(left) if info.bytes <= *left => {
                            *left -= info.bytes;
                            true
                        }
                        Some(_) => false,
                    }
            })
            .collect();
        // A shard read with positioned reads keeps a file open; past the limit, they
        // share a bounded set of open files instead (a store of more shards than the
        // process may open would otherwise fail here with "too many open files").
        let max_files = opts.max_open_files.unwrap_or_else(source::default_max_open_files);
        let files = (maps.iter().filter(|&&m| !m).count() > max_files)
            .then(|| Arc::new(source::FileCache::new(max_files)));
        let shards = manifest
            .shards
            .iter()
            .zip(&maps)
            .enumerate()
            .map(|(i, (info, &map))| match (&files, map) {
                (Some(files), false) => {
                    ShardReader::open_cached(dir, i as u32, info, &params, files)
                }
                _ => ShardReader::open(dir, i as u32, info, &params, map),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut index = Vec::with_capacity(manifest.num_samples as usize);
        for s in &shards {
            for (r, rec) in s.footer.records.iter().enumerate() {
                index.push(IndexEntry {
                    sample_id: rec.sample_id,
                    shard: s.index,
                    record: r as u32,
                });
            }
        }
        index.par_sort_unstable();
        if let Some(w) = index.windows(2).find(|w| w[0].sample_id == w[1].sample_id) {
            let a = &shards[w[0].shard as usize];
            let b = &shards[w[1].shard as usize];
            return Err(Error::corrupt(
                Location::file(&b.path).shard(b.index).sample(w[1].sample_id),
                format!(
                    "sample id {} is stored twice (also in {} shard {})",
                    w[0].sample_id,
                    a.path.display(),
                    a.index
                ),
            ));
        }
        let capacity = opts.cache_chunks.unwrap_or(8);
        Ok(Store {
            dir: dir.to_path_buf(),
            manifest,
            params,
            shards,
            index,
            cache: Mutex::new(ChunkCache { capacity, entries: Vec::new() }),
            pool: Arc::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Where [`Store::read_batch`], [`Store::read_packed`] and [`Store::get`] take their
    /// output arrays from; give them back here once done with them (see [`crate::pool`]).
    pub fn buffer_pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Sample ids in storage order (shard by shard, in write order).
    pub fn sample_ids(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.index.len());
        for s in &self.shards {
            out.extend(s.footer.records.iter().map(|r| r.sample_id));
        }
        out
    }

    /// Lengths (positions) of the samples, in the order of [`Store::sample_ids`].
    pub fn sample_lengths(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.index.len());
        for s in &self.shards {
            out.extend(s.footer.records.iter().map(|r| r.length));
        }
        out
    }

    pub fn lookup(&self, sample_id: u64) -> Option<IndexEntry> {
        let i = self.index.binary_search_by_key(&sample_id, |e| e.sample_id).ok()?;
        self.index.get(i).copied()
    }

    pub fn contains(&self, sample_id: u64) -> bool {
        self.lookup(sample_id).is_some()
    }

    fn missing(&self, sample_id: u64) -> Error {
        Error::MissingSample { sample_id, path: self.dir.clone(), more: 0 }
    }

    fn chunk(&self, shard: u32, chunk: u32) -> Result<Arc<DecodedChunk>> {
        if let Ok(mut c) = self.cache.try_lock()
            && let Some(hit) = c.get((shard, chunk))
        {
            return Ok(hit);
        }
        let s = self
            .shards
            .get(shard as usize)
            .ok_or_else(|| Error::State("shard index out of range".into()))?;
        let decoded = Arc::new(s.decode_chunk(chunk as usize, &self.params)?);
        if let Ok(mut c) = self.cache.try_lock() {
            c.put((shard, chunk), Arc::clone(&decoded));
        }
        Ok(decoded)
    }

    fn place(&self, e: IndexEntry) -> Result<(u32, usize)> {
        let s = &self.shards[e.shard as usize];
        let (c, r) = s.locate(e.record as usize).ok_or_else(|| {
            Error::corrupt(s.location().sample(e.sample_id), "record index out of range")
        })?;
        Ok((c as u32, r))
    }

    /// One record, decoded, in arrays from the store's [`BufferPool`]. A top-K record alone
    /// in its chunk, and that chunk not in the cache, is decoded straight into them (no
    /// decoded chunk to copy from, as for batches); the others are copied out of the
    /// decoded (or cached) chunk.
    pub fn get(&self, sample_id: u64) -> Result<Record> {
        let e = self.lookup(sample_id).ok_or_else(|| self.missing(sample_id))?;
        let (c, r) = self.place(e)?;
        let shard = &self.shards[e.shard as usize];
        let cached = self.cache.try_lock().is_ok_and(|cache| cache.contains((e.shard, c)));
        if self.params.kind == Kind::TopK && !cached && shard.chunk_records(c as usize) == 1 {
            return self.get_direct(shard, c, sample_id).map_err(|err| with_sample(err, sample_id));
        }
        let chunk = self.chunk(e.shard, c).map_err(|err| with_sample(err, sample_id))?;
        Ok(extract(&chunk, r, sample_id, &self.params, &self.pool))
    }

    /// [`Store::get`] of a top-K record alone in chunk `c`.
    fn get_direct(&self, shard: &ShardReader, c: u32, sample_id: u64) -> Result<Record> {
        let p = &self.params;
        let prepared = shard.prepare_topk(c as usize, p)?;
        let (l, n) = (prepared.positions(), prepared.num_entries());
        let lp_n = if p.has_logprobs() { n } else { 0 };
        let mut input_ids: Vec<u32> = self.pool.take(l);
        let mut ids: Vec<u32> = self.pool.take(n);
        let mut logprobs: Vec<f32> = if lp_n == 0 { Vec::new() } else { self.pool.take(lp_n) };
        let out = codec::TopkSlots {
            input_ids: &mut input_ids.spare_capacity_mut()[..l],
            ids: &mut ids.spare_capacity_mut()[..n],
            logprobs: &mut logprobs.spare_capacity_mut()[..lp_n],
        };
        prepared.decode_into(p, &shard.location().chunk(u64::from(c)), out)?;
        // SAFETY: the pool's arrays have room for at least l, n and lp_n values, and
        // decode_into, having returned Ok, wrote every slot of the three slices it was
        // given, which are exactly the first l, n and lp_n of them.
        unsafe {
            input_ids.set_len(l);
            ids.set_len(n);
            logprobs.set_len(lp_n);
        }
        Ok(Record { sample_id, input_ids, row_lens: Vec::new(), ids, counts: Vec::new(), logprobs })
    }

    /// Decode many records into padded arrays, in parallel on the shared pool.
    pub fn read_batch(&self, sample_ids: &[u64]) -> Result<Batch> {
        self.read_records(sample_ids, false)
    }

    /// Decode many records into arrays holding them one after the other (no padding between
    /// records; sampled rows are still padded to the widest row).
    pub fn read_packed(&self, sample_ids: &[u64]) -> Result<Batch> {
        self.read_records(sample_ids, true)
    }

    fn read_records(&self, sample_ids: &[u64], packed: bool) -> Result<Batch> {
        let mut places = Vec::with_capacity(sample_ids.len());
        for &sid in sample_ids {
            let e = self.lookup(sid).ok_or_else(|| self.missing(sid))?;
            let (c, r) = self.place(e)?;
            places.push((e.shard, c, r, sid));
        }
        let mut keys: Vec<(u32, u32)> = places.iter().map(|p| (p.0, p.1)).collect();
        keys.sort_unstable();
        keys.dedup();
        if self.params.kind == Kind::TopK {
            return self.read_topk(&places, &keys, packed);
        }
        let decoded: Vec<Arc<DecodedChunk>> = crate::threads::install(|| {
            keys.par_iter()
                .map(|&(s, c)| {
                    self.chunk(s, c).map_err(|err| {
                        let sid = places.iter().find(|p| (p.0, p.1) == (s, c)).map(|p| p.3);
                        match sid {
                            Some(sid) => with_sample(err, sid),
                            None => err,
                        }
                    })
                })
                .collect::<Result<Vec<_>>>()
        })??;
        let by_key: HashMap<(u32, u32), &DecodedChunk> =
            keys.iter().copied().zip(decoded.iter().map(|d| &**d)).collect();
        let sources: Vec<(&DecodedChunk, usize)> =
            places.iter().map(|p| (by_key[&(p.0, p.1)], p.2)).collect();
        crate::threads::install(|| assemble(&sources, &self.params, packed, &self.pool))
    }
}

/// Where a record of a top-K batch comes from.
enum TopkSource<'a> {
    /// Decoded straight into the batch: the record is its chunk's only one, read once by
    /// the batch and not in the cache.
    Direct(Box<codec::PreparedTopk>, u64, Location),
    /// Copied out of a decoded chunk (record index in the chunk).
    Copied(&'a DecodedChunk, usize),
}

impl TopkSource<'_> {
    fn len(&self) -> usize {
        match self {
            TopkSource::Direct(prepared, ..) => prepared.positions(),
            TopkSource::Copied(c, r) => c.pos_offsets[r + 1] - c.pos_offsets[*r],
        }
    }
}

impl Store {
    /// [`Store::read_records`] of a top-K store, in one parallel pass over the records that
    /// writes all three arrays. A record alone in its chunk is decoded straight into the
    /// batch (no decoded chunk to copy from: on a corpus of records about a chunk long,
    /// half the records); the others are copied out of decoded (or cached) chunks.
    fn read_topk(
        &self,
        places: &[(u32, u32, usize, u64)],
        keys: &[(u32, u32)],
        packed: bool,
    ) -> Result<Batch> {
        let p = &self.params;
        let k = p.k as usize;
        let mut uses: HashMap<(u32, u32), usize> = HashMap::with_capacity(keys.len());
        for pl in places {
            *uses.entry((pl.0, pl.1)).or_default() += 1;
        }
        let cached: Vec<bool> = match self.cache.try_lock() {
            Ok(c) => keys.iter().map(|&key| c.contains(key)).collect(),
            Err(_) => vec![false; keys.len()],
        };
        let first_sid =
            |key: (u32, u32)| places.iter().find(|pl| (pl.0, pl.1) == key).map(|pl| pl.3);
        enum Ready {
            Direct(Box<codec::PreparedTopk>, Location),
            Decoded(Arc<DecodedChunk>),
        }
        let ready: Vec<Ready> = crate::threads::install(|| {
            keys.par_iter()
                .zip(&cached)
                .map(|(&(s, c), &in_cache)| {
                    let shard = self
                        .shards
                        .get(s as usize)
                        .ok_or_else(|| Error::State("shard index out of range".into()))?;
                    let direct = !in_cache
                        && uses.get(&(s, c)) == Some(&1)
                        && shard.chunk_records(c as usize) == 1;
                    let r = if direct {
                        let loc = shard.location().chunk(u64::from(c));
                        shard
                            .prepare_topk(c as usize, p)
                            .map(|prep| Ready::Direct(Box::new(prep), loc))
                    } else {
                        self.chunk(s, c).map(Ready::Decoded)
                    };
                    r.map_err(|err| match first_sid((s, c)) {
                        Some(sid) => with_sample(err, sid),
                        None => err,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })??;
        let mut by_key: HashMap<(u32, u32), Ready> = keys.iter().copied().zip(ready).collect();
        let mut decoded: HashMap<(u32, u32), Arc<DecodedChunk>> = HashMap::new();
        for (key, r) in by_key.iter() {
            if let Ready::Decoded(d) = r {
                decoded.insert(*key, Arc::clone(d));
            }
        }
        let mut sources: Vec<TopkSource<'_>> = Vec::with_capacity(places.len());
        for pl in places {
            let key = (pl.0, pl.1);
            let src = match decoded.get(&key) {
                Some(d) => TopkSource::Copied(d, pl.2),
                None => match by_key.remove(&key) {
                    Some(Ready::Direct(prepared, loc)) => TopkSource::Direct(prepared, pl.3, loc),
                    _ => return Err(Error::State("chunk of a record read twice".into())),
                },
            };
            sources.push(src);
        }
        let lens: Vec<usize> = sources.iter().map(TopkSource::len).collect();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let slots: Vec<usize> = if packed { lens.clone() } else { vec![max_len; lens.len()] };
        let total: usize = slots.iter().sum();
        let lp_width = if p.has_logprobs() { k } else { 0 };
        let mut input_ids: Vec<i32> = self.pool.take(total);
        let mut ids: Vec<i32> = self.pool.take(total * k);
        let mut logprobs: Vec<f32> =
            if lp_width == 0 { Vec::new() } else { self.pool.take(total * lp_width) };
        let parts = split_parts(&mut input_ids, &slots, 1)
            .into_iter()
            .zip(split_parts(&mut ids, &slots, k))
            .zip(split_parts(&mut logprobs, &slots, lp_width));
        crate::threads::install(|| {
            parts
                .zip(sources)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|(((inp, idp), lpp), src)| {
                    let l = src.len();
                    match src {
                        TopkSource::Direct(prepared, sid, loc) => {
                            let out = codec::TopkSlots {
                                input_ids: as_u32_slots(&mut inp[..l]),
                                ids: as_u32_slots(&mut idp[..l * k]),
                                logprobs: &mut lpp[..l * lp_width],
                            };
                            prepared.decode_into(p, &loc, out).map_err(|e| with_sample(e, sid))?;
                        }
                        TopkSource::Copied(c, r) => {
                            let p0 = c.pos_offsets[r];
                            for (d, &v) in inp.iter_mut().zip(&c.input_ids[p0..p0 + l]) {
                                d.write(v as i32);
                            }
                            for (d, &v) in idp.iter_mut().zip(&c.ids[p0 * k..(p0 + l) * k]) {
                                d.write(v as i32);
                            }
                            let Some(lp) = c.logprobs.get(p0 * lp_width..(p0 + l) * lp_width)
                            else {
                                return Err(Error::State(
                                    "decoded chunk without its log-probabilities".into(),
                                ));
                            };
                            for (d, &v) in lpp.iter_mut().zip(lp) {
                                d.write(v);
                            }
                        }
                    }
                    for d in &mut inp[l..] {
                        d.write(0);
                    }
                    for d in &mut idp[l * k..] {
                        d.write(0);
                    }
                    for d in &mut lpp[l * lp_width..] {
                        d.write(f32::NEG_INFINITY);
                    }
                    Ok(())
                })
                .collect::<Result<()>>()
        })??;
        // SAFETY: the parts tile the first total, total * k and total * lp_width slots of
        // the three spare capacities (split_parts), and every record's closure returned Ok,
        // which it does only after writing each of its parts entirely: the record's l
        // positions (decode_into writes every slot when it returns Ok; a copied record's
        // source ranges hold exactly l, l k and l lp_width values, its decoded chunk holding
        // that record whole) and then the padding from there to the part's end.
        unsafe {
            input_ids.set_len(total);
            ids.set_len(total * k);
            logprobs.set_len(total * lp_width);
        }
        Ok(Batch {
            batch: lens.len(),
            max_len: if packed { 0 } else { max_len },
            width: k,
            lengths: lens.iter().map(|&l| l as u32).collect(),
            input_ids,
            ids,
            logprobs,
            counts: Vec::new(),
        })
    }
}

/// The slots of an i32 array as u32 slots, for decoders that write ids as u32 (the bits of
/// an id read back as `id as i32`, which is what copying does).
fn as_u32_slots(slots: &mut [MaybeUninit<i32>]) -> &mut [MaybeUninit<u32>] {
    // SAFETY: MaybeUninit<i32> and MaybeUninit<u32> have the same size and alignment, any
    // bit pattern is valid for both, and the result borrows `slots` mutably for its life.
    unsafe { std::slice::from_raw_parts_mut(slots.as_mut_ptr().cast(), slots.len()) }
}

/// The spare capacity of `v` cut into consecutive parts of `sizes[i] * width` slots (`v`
/// must have capacity for all of them).
fn split_parts<'a, T>(
    v: &'a mut Vec<T>,
    sizes: &[usize],
    width: usize,
) -> Vec<&'a mut [MaybeUninit<T>]> {
    let n: usize = sizes.iter().map(|&s| s * width).sum();
    let mut rest = &mut v.spare_capacity_mut()[..n];
    let mut parts = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(size * width);
        parts.push(part);
        rest = tail;
    }
    parts
}

fn with_sample(err: Error, sample_id: u64) -> Error {
    match err {
        Error::Corrupt { location, msg } if location.sample_id.is_none() => {
            Error::Corrupt { location: location.sample(sample_id), msg }
        }
        other => other,
    }
}

fn check_tokenizer(dir: &Path, want: &TokenizerInfo, have: Option<&TokenizerInfo>) -> Result<()> {
    let mismatch = |field: &str, expected: String, found: String| Error::Mismatch {
        path: dir.to_path_buf(),
        field: field.into(),
        expected,
        found,
    };
    let Some(have) = have else {
        return Err(mismatch(
            "tokenizer",
            format!("{:?}", want.name.as_deref().unwrap_or("<fingerprint only>")),
            "no tokenizer recorded in the store".into(),
        ));
    };
    if let (Some(a), Some(b)) = (&want.vocab_fingerprint, &have.vocab_fingerprint) {
        if a != b {
            return Err(mismatch("tokenizer.vocab_fingerprint", a.clone(), b.clone()));
        }
        return Ok(());
    }
    match (&want.name, &have.name) {
        (Some(a), Some(b)) if a == b => Ok(()),
        (Some(a), Some(b)) => Err(mismatch("tokenizer.name", a.clone(), b.clone())),
        _ => Err(mismatch(
            "tokenizer",
            describe_tokenizer(want),
            format!(
                "{} (nothing to compare: no common name or fingerprint)",
                describe_tokenizer(have)
            ),
        )),
    }
}

/// A tokenizer's identity as messages show it: `name "gpt2", vocab_fingerprint "sha256:.."`.
fn describe_tokenizer(t: &TokenizerInfo) -> String {
    let parts: Vec<String> = [("name", &t.name), ("vocab_fingerprint", &t.vocab_fingerprint)]
        .into_iter()
        .filter_map(|(field, v)| v.as_ref().map(|v| format!("{field} {v:?}")))
        .collect();
    if parts.is_empty() { "nothing".into() } else { parts.join(", ") }
}

/// Copy record `r` of a decoded chunk out as an owned record, in arrays from `pool`.
pub fn extract(
    chunk: &DecodedChunk,
    r: usize,
    sample_id: u64,
    p: &CodecParams,
    pool: &BufferPool,
) -> Record {
    let (p0, p1) = (chunk.pos_offsets[r], chunk.pos_offsets[r + 1]);
    let (e0, e1) = chunk.entry_range(p0, p1, p);
    fn copy<T: Pooled>(pool: &BufferPool, all: &[T], range: std::ops::Range<usize>) -> Vec<T> {
        if all.is_empty() {
            return Vec::new();
        }
        let mut v = pool.take(range.len());
        v.extend_from_slice(&all[range]);
        v
    }
    Record {
        sample_id,
        input_ids: copy(pool, &chunk.input_ids, p0..p1),
        row_lens: copy(pool, &chunk.row_lens, p0..p1),
        ids: copy(pool, &chunk.ids, e0..e1),
        counts: copy(pool, &chunk.counts, e0..e1),
        logprobs: copy(pool, &chunk.logprobs, e0..e1),
    }
}

/// Copy the records into a [`Batch`]: padded to the longest record, or packed one after the
/// other (`packed`, then `max_len` is 0 and arrays are `[sum(lengths), ...]`).
pub(crate) fn assemble(
    sources: &[(&DecodedChunk, usize)],
    p: &CodecParams,
    packed: bool,
    pool: &BufferPool,
) -> Batch {
    let b = sources.len();
    let lens: Vec<usize> =
        sources.iter().map(|(c, r)| c.pos_offsets[r + 1] - c.pos_offsets[*r]).collect();
    let max_len = lens.iter().copied().max().unwrap_or(0);
    let width = match p.kind {
        Kind::TopK => p.k as usize,
        Kind::Sampled => sources
            .iter()
            .map(|(c, r)| {
                c.row_lens[c.pos_offsets[*r]..c.pos_offsets[r + 1]]
                    .iter()
                    .copied()
                    .max()
                    .unwrap_or(0) as usize
            })
            .max()
            .unwrap_or(0),
    };
    let sampled = p.kind == Kind::Sampled;
    let k = p.k as usize;
    // Positions reserved for each record.
    let slots: Vec<usize> = if packed { lens.clone() } else { vec![max_len; b] };
    let entry_slots: Vec<usize> = slots.iter().map(|&l| l * width).collect();
    let (total, total_entries) = (slots.iter().sum(), entry_slots.iter().sum());
    // Rows of one record: (first entry, entries) in the chunk's flat arrays.
    let rows = |c: &DecodedChunk, pos: usize| {
        if sampled {
            (c.entry_offsets[pos], c.entry_offsets[pos + 1] - c.entry_offsets[pos])
        } else {
            (pos * k, k)
        }
    };
    // Writes each record's entries, then the padding of each row (sampled rows are ragged)
    // or of the record's tail (top-K rows are full, so a record is one contiguous copy).
    let fill = |src: &(dyn Fn(&DecodedChunk) -> &[u32] + Sync), pad: i32| {
        padded_parts(pool.take(total_entries), &entry_slots, pad, |i, part: &mut Part<'_, i32>| {
            let (c, r) = sources[i];
            let (p0, p1) = (c.pos_offsets[r], c.pos_offsets[r + 1]);
            let data = src(c);
            if sampled {
                for (row, pos) in (p0..p1).enumerate() {
                    let (e0, n) = rows(c, pos);
                    part.put_map(&data[e0..e0 + n], |&v| v as i32);
                    part.pad_to((row + 1) * width, pad);
                }
            } else {
                part.put_map(&data[p0 * k..p1 * k], |&v| v as i32);
            }
        })
    };
    Batch {
        batch: b,
        max_len: if packed { 0 } else { max_len },
        width,
        lengths: lens.iter().map(|&l| l as u32).collect(),
        input_ids: padded_parts(pool.take(total), &slots, 0, |i, part| {
            let (c, r) = sources[i];
            part.put_map(&c.input_ids[c.pos_offsets[r]..c.pos_offsets[r + 1]], |&v| v as i32);
        }),
        ids: fill(&|c| &c.ids, if sampled { -1 } else { 0 }),
        logprobs: if p.has_logprobs() {
            padded_parts(pool.take(total_entries), &entry_slots, f32::NEG_INFINITY, |i, part| {
                let (c, r) = sources[i];
                let (p0, p1) = (c.pos_offsets[r], c.pos_offsets[r + 1]);
                if sampled {
                    for (row, pos) in (p0..p1).enumerate() {
                        let (e0, n) = rows(c, pos);
                        part.put_map(&c.logprobs[e0..e0 + n], |&v| v);
                        part.pad_to((row + 1) * width, f32::NEG_INFINITY);
                    }
                } else {
                    part.put_map(&c.logprobs[p0 * k..p1 * k], |&v| v);
                }
            })
        } else {
            Vec::new()
        },
        counts: if sampled { fill(&|c| &c.counts, 0) } else { Vec::new() },
    }
}

/// The front of an uninitialized part of an output array, written in order.
struct Part<'a, T> {
    slots: &'a mut [MaybeUninit<T>],
    len: usize,
}

impl<T: Copy> Part<'_, T> {
    /// Append `f` of each of `src` (as many as fit).
    #[inline]
    fn put_map<S>(&mut self, src: &[S], f: impl Fn(&S) -> T) {
        let n = src.len().min(self.slots.len() - self.len);
        for (d, s) in self.slots[self.len..self.len + n].iter_mut().zip(src) {
            d.write(f(s));
        }
        self.len += n;
    }

    /// Append `v` up to length `to` (capped at the part's size).
    fn pad_to(&mut self, to: usize, v: T) {
        let to = to.min(self.slots.len());
        if to > self.len {
            for d in &mut self.slots[self.len..to] {
                d.write(v);
            }
            self.len = to;
        }
    }
}

/// Parts of the given sizes, one after the other, in `out` (an empty array; it grows if it
/// has not the room): part `i` written by `fill(i, ..)` in parallel and the rest of each
/// part padded with `pad`, so every value is written once (a padded batch is tens of MB,
/// and filling it with the padding before copying the records in doubled the writes).
fn padded_parts<T, F>(mut out: Vec<T>, sizes: &[usize], pad: T, fill: F) -> Vec<T>
where
    T: Copy + Send + Sync,
    F: Fn(usize, &mut Part<'_, T>) + Sync + Send,
{
    let n: usize = sizes.iter().sum();
    out.clear();
    out.reserve(n);
    let parts = split_parts(&mut out, sizes, 1);
    parts.into_par_iter().enumerate().for_each(|(i, slots)| {
        let mut part = Part { slots, len: 0 };
        fill(i, &mut part);
        part.pad_to(usize::MAX, pad);
    });
    // SAFETY: the parts tile the first n slots (their sizes add up to n), and each part ends
    // with pad_to(its size), so every slot was written: `Part` only writes at `len`, moving
    // it up, and pad_to writes everything from `len` to the part's end.
    unsafe { out.set_len(n) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::write_small_store as write;
    use crate::writer::Mode;

    /// A manifest read just before a removal (or a replacing writer) deleted shard files it
    /// names: the open goes on from the manifest committed since. A shard file missing from
    /// an unchanged manifest is still an error.
    #[test]
    fn an_open_that_loses_the_race_with_a_commit_starts_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        write(&dir, Mode::Create, 0..30);
        let before = Manifest::read(&dir).unwrap();
        assert!(before.shards.len() >= 3, "{:?}", before.shards);
        crate::remove::remove_samples(&dir, &[0, 29], Default::default()).unwrap();
        assert!(Store::open_manifest(&dir, &before, &OpenOptions::default()).is_err());
        let s = Store::open_from(&dir, before.clone(), &OpenOptions::default()).unwrap();
        assert_eq!(s.len(), 28);

        write(&dir, Mode::Overwrite, 100..110);
        let s = Store::open_from(&dir, before, &OpenOptions::default()).unwrap();
        assert_eq!(s.sample_ids(), (100..110).collect::<Vec<u64>>());

        let now = Manifest::read(&dir).unwrap();
        std::fs::remove_file(dir.join(&now.shards[0].file)).unwrap();
        let Err(err) = Store::open(&dir, &OpenOptions::default()) else { panic!("opened") };
        assert!(is_not_found(&err), "{err}");
    }
}
