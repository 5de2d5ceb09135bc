//! Chunk payload codecs (FORMAT.md, "Chunks").
//!
//! A chunk holds whole records. Its payload is a small stream directory followed by
//! independently compressed streams (input ids, target ids, log-probabilities, ...), so that
//! each zstd stream sees data of one kind and its entropy tables fit that kind.

pub mod bytes;
pub mod ids;
pub mod kl;
pub mod logprobs;
pub mod pairs;

use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::error::{Error, Location, Result};
use crate::format::Kind;

pub use logprobs::LogprobCodec;

/// Layout version of the chunk payload, its first byte.
pub const CHUNK_LAYOUT: u8 = 1;

/// Stream tags of the chunk directory (FORMAT.md, section 4).
pub mod tag {
    pub const INPUT_LEAD: u8 = 1;
    pub const INPUT_EXT: u8 = 2;
    pub const ID_TABLE: u8 = 3;
    pub const ID_COUNTS: u8 = 4;
    /// `ID_LEAD + g` / `ID_EXT + g` for teacher-rank group g in 0..4.
    pub const ID_LEAD: u8 = 8;
    pub const ID_EXT: u8 = 12;
    /// `LP_LEAD + g` / `LP_EXT + g` for teacher-rank group g in 0..4.
    pub const LP_LEAD: u8 = 16;
    pub const LP_EXT: u8 = 20;
    pub const LP_LOSSLESS: u8 = 24;
    pub const FINITE_COUNTS: u8 = 25;
    pub const ROW_LENS: u8 = 26;
    pub const COUNTS: u8 = 27;
    /// kl codec: one byte per row, its base step exponent (255: stored losslessly).
    pub const LP_ROW_MODES: u8 = 28;
    /// One past the largest tag.
    pub const END: usize = 29;
}

const METHOD_RAW: u8 = 0;
const METHOD_ZSTD: u8 = 1;

/// How the store codes token ids (recorded as the shard header's `id_codec`).
pub const ID_CODEC_V1: u8 = 1;
pub const ID_CODEC_NAME: &str = "rank-table-v1";

/// Everything a codec needs to know about the store.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecParams {
    pub kind: Kind,
    /// K (top-K) or n draws (sampled).
    pub k: u32,
    pub vocab_size: u32,
    pub logprobs: LogprobCodec,
    pub zstd_level: i32,
}

impl CodecParams {
    pub fn has_logprobs(&self) -> bool {
        !matches!(self.logprobs, LogprobCodec::None)
    }
}

/// One sequence with its targets, in flat row-major arrays.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    pub sample_id: u64,
    /// Input token ids, `[L]`.
    pub input_ids: Vec<u32>,
    /// Sampled stores: number of distinct ids of each position, `[L]`; empty for top-K.
    pub row_lens: Vec<u32>,
    /// Target ids: `[L * K]` for top-K (rank order), `[sum(row_lens)]` for sampled.
    pub ids: Vec<u32>,
    /// Sampled stores: draw count of each id, parallel to `ids`; empty for top-K.
    pub counts: Vec<u32>,
    /// Log-probabilities parallel to `ids`; empty when the store keeps none.
    pub logprobs: Vec<f32>,
}

impl Record {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Number of target entries (ids) of the record.
    pub fn num_entries(&self) -> usize {
        self.ids.len()
    }
}

/// Records waiting to be encoded as one chunk, in flat arrays (writers validate records
/// straight into these, so a record's data is copied once on its way to the encoder).
#[derive(Debug, Clone, Default)]
pub struct ChunkBuf {
    pub sample_ids: Vec<u64>,
    /// Positions of each record.
    pub lengths: Vec<u32>,
    pub input_ids: Vec<u32>,
    /// Sampled stores: ids per position.
    pub row_lens: Vec<u32>,
    pub ids: Vec<u32>,
    pub counts: Vec<u32>,
    pub logprobs: Vec<f32>,
}

/// Sizes of a [`ChunkBuf`]'s arrays, to undo a partial append.
#[derive(Debug, Clone, Copy)]
pub struct Mark([usize; 7]);

impl ChunkBuf {
    pub fn num_records(&self) -> usize {
        self.sample_ids.len()
    }
    pub fn positions(&self) -> usize {
        self.input_ids.len()
    }
    pub fn entries(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.sample_ids.is_empty()
    }
    pub fn mark(&self) -> Mark {
        Mark([
            self.sample_ids.len(),
            self.lengths.len(),
            self.input_ids.len(),
            self.row_lens.len(),
            self.ids.len(),
            self.counts.len(),
            self.logprobs.len(),
        ])
    }
    /// Drop everything appended since `m`.
    pub fn rollback(&mut self, m: Mark) {
        self.sample_ids.truncate(m.0[0]);
        self.lengths.truncate(m.0[1]);
        self.input_ids.truncate(m.0[2]);
        self.row_lens.truncate(m.0[3]);
        self.ids.truncate(m.0[4]);
        self.counts.truncate(m.0[5]);
        self.logprobs.truncate(m.0[6]);
    }
    pub fn clear(&mut self) {
        self.rollback(Mark([0; 7]));
    }
    /// Append record `j` of a decoded chunk as it was decoded. Not checked again: its values
    /// passed the writer's checks when first written, and decoding keeps what they ask for.
    pub fn push_decoded(&mut self, d: &DecodedChunk, j: usize, sample_id: u64, p: &CodecParams) {
        let (a, b) = (d.pos_offsets[j], d.pos_offsets[j + 1]);
        let (ea, eb) = d.entry_range(a, b, p);
        self.sample_ids.push(sample_id);
        self.lengths.push((b - a) as u32);
        self.input_ids.extend_from_slice(&d.input_ids[a..b]);
        self.ids.extend_from_slice(&d.ids[ea..eb]);
        if p.kind == Kind::Sampled {
            self.row_lens.extend_from_slice(&d.row_lens[a..b]);
            self.counts.extend_from_slice(&d.counts[ea..eb]);
        }
        if !d.logprobs.is_empty() {
            self.logprobs.extend_from_slice(&d.logprobs[ea..eb]);
        }
    }
    /// Append a whole record (already validated).
    pub fn push(&mut self, r: &Record) {
        self.sample_ids.push(r.sample_id);
        self.lengths.push(r.len() as u32);
        self.input_ids.extend_from_slice(&r.input_ids);
        self.row_lens.extend_from_slice(&r.row_lens);
        self.ids.extend_from_slice(&r.ids);
        self.counts.extend_from_slice(&r.counts);
        self.logprobs.extend_from_slice(&r.logprobs);
    }
}

thread_local! {
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    /// Compression contexts by settings, kept between calls: creating one per stream (a
    /// chunk has about a dozen) allocated and zeroed its tables each time.
    static CCTX: RefCell<Vec<(ZstdSettings, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(Vec::new()) };
}

/// How one stream is compressed: the level, and zstd's shortest match where it is set.
#[derive(Clone, Copy, PartialEq, Debug)]
struct ZstdSettings {
    level: i32,
    min_match: Option<u32>,
}

impl ZstdSettings {
    /// The settings for the stream with tag `t` at the store's level. At the fast levels
    /// (<= 1) the id table's streams (varints of id gaps and counts) are compressed with
    /// matches of 7 bytes or more: zstd's default there (6) finds many short matches in
    /// them that cost more time than they save; 7 took about a quarter less time on these
    /// streams and made them smaller (by 0.05-0.3 bytes per position on the three
    /// benchmark corpora). Other streams lose bytes with longer matches (the n-gram
    /// teacher's repeated rows) and keep zstd's default.
    fn for_stream(t: u8, level: i32) -> ZstdSettings {
        let table = t == tag::ID_TABLE || t == tag::ID_COUNTS;
        ZstdSettings { level, min_match: (table && level <= 1).then_some(7) }
    }
}

/// `raw` compressed into `out` (its contents replaced), with this thread's context for `z`.
fn compress_into(raw: &[u8], z: ZstdSettings, out: &mut Vec<u8>) -> Result<()> {
    let failed = |e: std::io::Error| Error::State(format!("zstd compression failed: {e}"));
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
    CCTX.with(|cell| {
        let mut contexts = cell.borrow_mut();
        if let Some((_, c)) = contexts.iter_mut().find(|(s, _)| *s == z) {
            return c.compress_to_buffer(raw, out).map(drop).map_err(failed);
        }
        let mut c = zstd::bulk::Compressor::new(z.level).map_err(failed)?;
        if let Some(m) = z.min_match {
            c.set_parameter(zstd::zstd_safe::CParameter::MinMatch(m)).map_err(failed)?;
        }
        c.compress_to_buffer(raw, out).map_err(failed)?;
        // A writer uses one level, so this holds at most two contexts; a process that
        // writes at many levels keeps the latest few.
        if contexts.len() >= 4 {
            contexts.remove(0);
        }
        contexts.push((z, c));
        Ok(())
    })
}

#[cfg(test)]
fn compress(raw: &[u8], z: ZstdSettings) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    compress_into(raw, z, &mut out)?;
    Ok(out)
}

/// Largest ratio of decoded to stored bytes a zstd frame can reach: a block decodes to at most
/// 128 KiB and costs at least 4 stored bytes (a 3-byte block header and one byte of an RLE
/// block), so a declared size above this is impossible, whatever the frame holds.
const MAX_ZSTD_RATIO: usize = (128 << 10) / 4;
/// Streams up to this size are decompressed into a buffer allocated up front; larger ones
/// (rare: a chunk holds about 1024 positions, or one record) grow with the bytes actually
/// decoded, so that a corrupt size field cannot make a reader allocate gigabytes before
/// failing.
const PREALLOC_MAX: usize = 16 << 20;

fn decompress(stored: &[u8], raw_len: usize, loc: &Location, what: &str) -> Result<Vec<u8>> {
    if raw_len > stored.len().saturating_mul(MAX_ZSTD_RATIO) {
        return Err(Error::corrupt(
            loc.clone(),
            format!(
                "{what} stream declares {raw_len} decoded bytes, more than a zstd frame of {} bytes can hold",
                stored.len()
            ),
        ));
    }
    if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(stored)
        && n != raw_len as u64
    {
        return Err(Error::corrupt(
            loc.clone(),
            format!("{what} stream's zstd frame holds {n} bytes, directory says {raw_len}"),
        ));
    }
    let undecodable = |e: std::io::Error| {
        Error::corrupt(loc.clone(), format!("{what} stream does not decompress: {e}"))
    };
    if raw_len > PREALLOC_MAX {
        let mut out = Vec::new();
        let dec = zstd::stream::read::Decoder::with_buffer(stored).map_err(undecodable)?;
        std::io::Read::read_to_end(&mut std::io::Read::take(dec, raw_len as u64 + 1), &mut out)
            .map_err(undecodable)?;
        if out.len() != raw_len {
            return Err(Error::corrupt(
                loc.clone(),
                format!(
                    "{what} stream decompresses to {} bytes, directory says {raw_len}",
                    out.len()
                ),
            ));
        }
        return Ok(out);
    }
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| {
                Error::State(format!("cannot create a zstd decompression context: {e}"))
            })?);
        }
        let Some(d) = slot.as_mut() else {
            return Err(Error::State("zstd context missing".into()));
        };
        let mut out = Vec::with_capacity(raw_len);
        let n = d.decompress_to_buffer(stored, &mut out).map_err(undecodable)?;
        if n != raw_len {
            return Err(Error::corrupt(
                loc.clone(),
                format!("{what} stream decompresses to {n} bytes, directory says {raw_len}"),
            ));
        }
        Ok(out)
    })
}

/// Whether chunks of a store of `p`'s kind and codec have streams of tag `t` (FORMAT.md 4).
fn uses_tag(p: &CodecParams, t: u8) -> bool {
    let quantized = matches!(p.logprobs, LogprobCodec::Abs { .. } | LogprobCodec::Kl { .. });
    match t {
        tag::INPUT_LEAD | tag::INPUT_EXT | tag::ID_TABLE | tag::ID_COUNTS => true,
        8..=15 => true,
        16..=23 => quantized,
        tag::LP_LOSSLESS => matches!(p.logprobs, LogprobCodec::Lossless | LogprobCodec::Kl { .. }),
        tag::FINITE_COUNTS => quantized && p.kind == Kind::TopK,
        tag::ROW_LENS | tag::COUNTS => p.kind == Kind::Sampled,
        tag::LP_ROW_MODES => matches!(p.logprobs, LogprobCodec::Kl { .. }),
        _ => false,
    }
}

fn tag_name(t: u8) -> &'static str {
    match t {
        tag::INPUT_LEAD | tag::INPUT_EXT => "input ids",
        tag::ID_TABLE => "id table",
        tag::ID_COUNTS => "id counts",
        8..=15 => "target ids",
        16..=24 => "log-probabilities",
        tag::FINITE_COUNTS => "finite counts",
        tag::ROW_LENS => "row lengths",
        tag::COUNTS => "counts",
        tag::LP_ROW_MODES => "log-probability row modes",
        _ => "unknown",
    }
}

/// Assemble streams into a chunk payload in `s.payload` (the directory, then each stream
/// compressed with zstd unless that does not make it smaller), built in `s`'s buffers.
fn frame(streams: Vec<(u8, Vec<u8>)>, level: i32, s: &mut EncodeScratch) -> Result<()> {
    let streams: Vec<(u8, Vec<u8>)> =
        streams.into_iter().filter(|(_, raw)| !raw.is_empty()).collect();
    let dir = &mut s.payload;
    dir.clear();
    dir.extend_from_slice(&[CHUNK_LAYOUT, streams.len() as u8]);
    s.body.clear();
    for (t, raw) in streams {
        compress_into(&raw, ZstdSettings::for_stream(t, level), &mut s.packed)?;
        let (method, stored) = if s.packed.len() < raw.len() {
            (METHOD_ZSTD, &s.packed[..])
        } else {
            (METHOD_RAW, &raw[..])
        };
        let len32 = |n: usize| {
            u32::try_from(n).map_err(|_| {
                Error::invalid_argument(
                    "chunk_positions",
                    format!("a chunk stream of {n} bytes does not fit the format's u32 length; use smaller chunks"),
                )
            })
        };
        dir.push(t);
        dir.push(method);
        dir.extend_from_slice(&len32(stored.len())?.to_le_bytes());
        dir.extend_from_slice(&len32(raw.len())?.to_le_bytes());
        s.body.extend_from_slice(stored);
    }
    dir.extend_from_slice(&s.body);
    Ok(())
}

/// The decoded streams of a chunk, by tag.
pub(crate) struct Streams {
    by_tag: [Option<Vec<u8>>; tag::END],
}

impl Streams {
    pub(crate) fn take(&mut self, t: u8) -> Option<Vec<u8>> {
        self.by_tag.get_mut(t as usize).and_then(Option::take)
    }
    /// A stream that may be left out when empty.
    pub(crate) fn optional(&mut self, t: u8) -> Vec<u8> {
        self.take(t).unwrap_or_default()
    }
    /// Length of a stream (0 when left out).
    pub(crate) fn len(&self, t: u8) -> usize {
        self.by_tag.get(t as usize).and_then(Option::as_ref).map_or(0, Vec::len)
    }
}

/// Parse a chunk directory and decompress its streams. `max_raw` bounds every stream's
/// declared decoded size before anything is allocated.
fn unframe(payload: &[u8], max_raw: usize, loc: &Location) -> Result<Streams> {
    let mut c = crate::format::Cursor::new(payload, loc, "chunk");
    let layout = c.u8()?;
    if layout != CHUNK_LAYOUT {
        return Err(Error::corrupt(
            loc.clone(),
            format!("chunk layout {layout}, expected {CHUNK_LAYOUT}"),
        ));
    }
    let n = c.u8()? as usize;
    let mut dir = Vec::with_capacity(n);
    for _ in 0..n {
        let t = c.u8()?;
        let method = c.u8()?;
        let stored_len = c.u32()? as usize;
        let raw_len = c.u32()? as usize;
        dir.push((t, method, stored_len, raw_len));
    }
    let mut streams = Streams { by_tag: Default::default() };
    for (t, method, stored_len, raw_len) in dir {
        let name = tag_name(t);
        if name == "unknown" || streams.by_tag[t as usize].is_some() {
            return Err(Error::corrupt(
                loc.clone(),
                format!("chunk stream tag {t} unknown or repeated"),
            ));
        }
        if raw_len > max_raw {
            return Err(Error::corrupt(
                loc.clone(),
                format!(
                    "{name} stream declares {raw_len} decoded bytes, more than the {max_raw} its chunk can need"
                ),
            ));
        }
        let stored = c.bytes(stored_len)?;
        let raw = match method {
            METHOD_RAW if stored_len == raw_len => stored.to_vec(),
            METHOD_ZSTD => decompress(stored, raw_len, loc, name)?,
            _ => {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!(
                        "{name} stream has method {method} with {stored_len} stored / {raw_len} decoded bytes"
                    ),
                ));
            }
        };
        streams.by_tag[t as usize] = Some(raw);
    }
    if c.remaining() != 0 {
        return Err(Error::corrupt(
            loc.clone(),
            format!("chunk has {} trailing bytes", c.remaining()),
        ));
    }
    Ok(streams)
}

/// Reusable encoder state (keeps per-chunk allocations out of the hot path). The payload
/// and the compression buffers are kept too: allocated afresh for every chunk, they were
/// written into new pages whenever the allocator had returned the last chunk's to the OS
/// meanwhile, as it does while a writer waits for its teacher between records (with 250 ms
/// pauses between records, keeping them took `StoreWriter.add` from 0.40 to 0.57 M
/// positions/s; benches/README.md).
#[derive(Default)]
pub struct EncodeScratch {
    table: ids::TableScratch,
    payload: Vec<u8>,
    body: Vec<u8>,
    packed: Vec<u8>,
}

impl EncodeScratch {
    /// The payload of the chunk [`encode_chunk`] encoded last.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
}

/// Encode the records of `buf` into one chunk payload, left in [`EncodeScratch::payload`].
/// Records must already be validated.
pub fn encode_chunk(buf: &ChunkBuf, p: &CodecParams, scratch: &mut EncodeScratch) -> Result<()> {
    let sampled = p.kind == Kind::Sampled;
    let table =
        ids::TableEncoder::new(&[&buf.input_ids, &buf.ids], p.vocab_size, &mut scratch.table);
    let ts = &scratch.table;
    let mut input = ids::RankWriter::with_capacity(buf.positions());
    match table.dense_ranks(ts) {
        Some(rank_of) => {
            // The input ids as one row (a row of 8 or more can take the vector path).
            let n = buf.input_ids.len();
            if !rank_of.put_rows(&mut input, &buf.input_ids, n, 0..n) {
                return Err(Error::State("a chunk input id past the id table".into()));
            }
        }
        None => input.put_all(buf.input_ids.iter().map(|&t| table.rank(t, ts))),
    }
    let (input_lead, input_ext) = input.finish();
    let mut groups: [ids::RankWriter; 4] =
        std::array::from_fn(|_| ids::RankWriter::with_capacity(buf.entries() / 2 + 16));
    let rows = RowShape::of(buf, p);
    match &rows {
        RowShape::Fixed { rows: n, k } => {
            // Group by group: each writer's state stays in registers over its loop.
            for (g, w) in groups.iter_mut().enumerate() {
                let (a, b) = (ids::GROUPS[g].0.min(*k), ids::GROUPS[g].1.min(*k));
                if let Some(rank_of) = table.dense_ranks(ts) {
                    if !rank_of.put_rows(w, &buf.ids[..n * k], *k, a..b) {
                        return Err(Error::State("a chunk id past the id table".into()));
                    }
                    continue;
                }
                for r in 0..*n {
                    w.put_all(buf.ids[r * k + a..r * k + b].iter().map(|&id| table.rank(id, ts)));
                }
            }
        }
        RowShape::Ragged(_) => rows.for_each_row(|start, n| {
            for (j, &id) in buf.ids[start..start + n].iter().enumerate() {
                groups[ids::group_of(j)].put_all([table.rank(id, ts)]);
            }
            Ok(())
        })?,
    }
    let (leads, exts): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
        groups.into_iter().map(|w| w.finish()).unzip();
    let table_streams = (table.ids_stream.clone(), table.counts_stream.clone());
    table.reset(&mut scratch.table);
    let mut streams = vec![
        (tag::INPUT_LEAD, input_lead),
        (tag::INPUT_EXT, input_ext),
        (tag::ID_TABLE, table_streams.0),
        (tag::ID_COUNTS, table_streams.1),
    ];
    for (g, (lead, ext)) in leads.into_iter().zip(exts).enumerate() {
        streams.push((tag::ID_LEAD + g as u8, lead));
        streams.push((tag::ID_EXT + g as u8, ext));
    }

    if sampled {
        let mut lens = Vec::with_capacity(buf.positions());
        let mut counts = Vec::with_capacity(buf.entries());
        for &n in &buf.row_lens {
            bytes::put_varint(&mut lens, u64::from(n));
        }
        for &c in &buf.counts {
            bytes::put_varint(&mut counts, u64::from(c));
        }
        streams.push((tag::ROW_LENS, lens));
        streams.push((tag::COUNTS, counts));
    }

    if p.has_logprobs() {
        streams.extend(logprobs::encode(&buf.logprobs, &rows, p)?);
    }
    frame(streams, p.zstd_level, scratch)
}

/// Row lengths of the entries of a chunk: fixed K, or the sampled row lengths.
pub enum RowShape<'a> {
    Fixed { rows: usize, k: usize },
    Ragged(std::borrow::Cow<'a, [u32]>),
}

impl<'a> RowShape<'a> {
    fn of(buf: &'a ChunkBuf, p: &CodecParams) -> RowShape<'a> {
        match p.kind {
            Kind::TopK => RowShape::Fixed { rows: buf.positions(), k: p.k as usize },
            Kind::Sampled => RowShape::Ragged(std::borrow::Cow::Borrowed(&buf.row_lens)),
        }
    }

    /// Call `f(start, len)` for every row, in order.
    pub fn for_each_row(&self, mut f: impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
        match self {
            RowShape::Fixed { rows, k } => {
                for r in 0..*rows {
                    f(r * k, *k)?;
                }
            }
            RowShape::Ragged(lens) => {
                let mut start = 0usize;
                for &n in lens.iter() {
                    f(start, n as usize)?;
                    start += n as usize;
                }
            }
        }
        Ok(())
    }

    pub fn num_rows(&self) -> usize {
        match self {
            RowShape::Fixed { rows, .. } => *rows,
            RowShape::Ragged(l) => l.len(),
        }
    }
}

/// A decoded chunk: flat arrays plus where each record starts.
#[derive(Debug, Clone, Default)]
pub struct DecodedChunk {
    pub input_ids: Vec<u32>,
    pub row_lens: Vec<u32>,
    pub ids: Vec<u32>,
    pub counts: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Start position of each record in `input_ids` (len = records + 1).
    pub pos_offsets: Vec<usize>,
    /// Start entry of each position in `ids` (sampled only; len = positions + 1).
    pub entry_offsets: Vec<usize>,
}

impl DecodedChunk {
    /// The target entries of positions `p0..p1`, as a range of the flat arrays.
    pub fn entry_range(&self, p0: usize, p1: usize, p: &CodecParams) -> (usize, usize) {
        match p.kind {
            Kind::TopK => (p0 * p.k as usize, p1 * p.k as usize),
            Kind::Sampled => (self.entry_offsets[p0], self.entry_offsets[p1]),
        }
    }
}

/// Where a top-K chunk is decoded to: one slot per position, K per position, and K per
/// position for the log-probabilities (none when the store keeps none).
pub struct TopkSlots<'a> {
    pub input_ids: &'a mut [MaybeUninit<u32>],
    pub ids: &'a mut [MaybeUninit<u32>],
    pub logprobs: &'a mut [MaybeUninit<f32>],
}

/// A top-K chunk whose streams are decompressed and whose counts were checked against them:
/// its positions and entries are backed by bytes actually decoded, so buffers of that size
/// can be allocated before [`PreparedTopk::decode_into`] (a corrupt footer cannot make a
/// reader allocate for data that is not there).
pub struct PreparedTopk {
    streams: Streams,
    table: ids::Table,
    positions: usize,
    num_entries: usize,
}

impl PreparedTopk {
    /// Decompress and check the chunk of a top-K store holding `positions` positions and
    /// `num_entries` entries.
    pub fn new(
        payload: &[u8],
        positions: usize,
        num_entries: usize,
        p: &CodecParams,
        loc: &Location,
    ) -> Result<PreparedTopk> {
        if p.kind != Kind::TopK {
            return Err(Error::State("PreparedTopk of a sampled store".into()));
        }
        let (streams, table) = open_streams(payload, positions, num_entries, p, loc)?;
        let k = p.k as usize;
        let widths = (0..4).map(|g| ids::GROUPS[g].1.min(k).saturating_sub(ids::GROUPS[g].0));
        for (g, w) in widths.enumerate() {
            let have = streams.len(tag::ID_LEAD + g as u8);
            if have != positions * w {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!("target ids stream {g} has {have} codes, expected {}", positions * w),
                ));
            }
        }
        Ok(PreparedTopk { streams, table, positions, num_entries })
    }

    pub fn positions(&self) -> usize {
        self.positions
    }

    pub fn num_entries(&self) -> usize {
        self.num_entries
    }

    /// Decode into `out`, whose slices must hold exactly `positions`, `num_entries` and
    /// `num_entries` (or, without log-probabilities, 0) slots; every slot is written when
    /// this returns Ok.
    pub fn decode_into(self, p: &CodecParams, loc: &Location, out: TopkSlots<'_>) -> Result<()> {
        let PreparedTopk { mut streams, table, positions, num_entries } = self;
        let want_lp = if p.has_logprobs() { num_entries } else { 0 };
        if out.logprobs.len() != want_lp {
            return Err(Error::State(format!(
                "{} log-prob slots for {want_lp} entries",
                out.logprobs.len()
            )));
        }
        let s = &mut streams;
        let lead = s.optional(tag::INPUT_LEAD);
        table.decode_all_into(&lead, &s.optional(tag::INPUT_EXT), out.input_ids, loc)?;
        let k = p.k as usize;
        let groups: [(Vec<u8>, Vec<u8>); 4] = std::array::from_fn(|g| {
            (s.optional(tag::ID_LEAD + g as u8), s.optional(tag::ID_EXT + g as u8))
        });
        table.decode_rows_into(&groups, positions, k, out.ids, loc)?;
        if p.has_logprobs() {
            let shape = RowShape::Fixed { rows: positions, k };
            logprobs::decode_into(s, &shape, num_entries, p, loc, out.logprobs)?;
        }
        Ok(())
    }
}

/// Check a chunk's entry count, decompress its streams and decode its id table; the input
/// ids stream must hold one code per position.
fn open_streams(
    payload: &[u8],
    positions: usize,
    num_entries: usize,
    p: &CodecParams,
    loc: &Location,
) -> Result<(Streams, ids::Table)> {
    if p.kind == Kind::TopK && Some(num_entries) != positions.checked_mul(p.k as usize) {
        return Err(Error::corrupt(
            loc.clone(),
            format!(
                "chunk table says {num_entries} entries for {positions} positions of K = {}",
                p.k
            ),
        ));
    }
    if p.kind == Kind::Sampled && num_entries > positions.saturating_mul(p.k as usize) {
        return Err(Error::corrupt(
            loc.clone(),
            format!(
                "chunk table says {num_entries} entries, more than {positions} positions x n = {}",
                p.k
            ),
        ));
    }
    // No stream may decode to more than 10 bytes (a u64 varint) per value, plus the table.
    let max_raw =
        10usize.saturating_mul(2 * num_entries.saturating_add(positions)).saturating_add(64);
    let mut s = unframe(payload, max_raw, loc)?;
    // A stream of a tag this kind and codec never write may be listed empty (writers may list
    // empty streams), but one holding bytes is damage, not data to ignore.
    if let Some(t) = (0..tag::END as u8).find(|&t| s.len(t) > 0 && !uses_tag(p, t)) {
        return Err(Error::corrupt(
            loc.clone(),
            format!(
                "chunk has a {} stream (tag {t}) holding data, which a {} store with the {} \
                 codec does not use",
                tag_name(t),
                p.kind.name(),
                p.logprobs.name()
            ),
        ));
    }

    let table = ids::decode_table(
        &s.optional(tag::ID_TABLE),
        &s.optional(tag::ID_COUNTS),
        (positions + num_entries) as u64,
        p.vocab_size,
        loc,
    )?;
    let have = s.len(tag::INPUT_LEAD);
    if have != positions {
        return Err(Error::corrupt(
            loc.clone(),
            format!("input ids stream has {have} codes, expected {positions}"),
        ));
    }
    Ok((s, table))
}

/// Decode a chunk payload holding records of `lengths` positions and `num_entries` target
/// entries. Every count is checked against the footer's figures before use.
pub fn decode_chunk(
    payload: &[u8],
    lengths: &[u32],
    num_entries: usize,
    p: &CodecParams,
    loc: &Location,
) -> Result<DecodedChunk> {
    let positions: usize = lengths.iter().map(|&l| l as usize).sum();
    let mut out = DecodedChunk::default();
    let mut offs = Vec::with_capacity(lengths.len() + 1);
    let mut acc = 0usize;
    offs.push(0);
    for &l in lengths {
        acc += l as usize;
        offs.push(acc);
    }
    out.pos_offsets = offs;
    if p.kind == Kind::TopK {
        let prepared = PreparedTopk::new(payload, positions, num_entries, p, loc)?;
        let lp_entries = if p.has_logprobs() { num_entries } else { 0 };
        // Allocated once the streams showed these counts are real, written without zeroing.
        let mut input_ids = Vec::with_capacity(positions);
        let mut ids = Vec::with_capacity(num_entries);
        let mut logprobs = Vec::with_capacity(lp_entries);
        prepared.decode_into(
            p,
            loc,
            TopkSlots {
                input_ids: &mut input_ids.spare_capacity_mut()[..positions],
                ids: &mut ids.spare_capacity_mut()[..num_entries],
                logprobs: &mut logprobs.spare_capacity_mut()[..lp_entries],
            },
        )?;
        // SAFETY: decode_into returned Ok, so it wrote every slot of the three slices, which
        // are the first positions, num_entries and lp_entries slots of the spare capacities.
        unsafe {
            input_ids.set_len(positions);
            ids.set_len(num_entries);
            logprobs.set_len(lp_entries);
        }
        out.input_ids = input_ids;
        out.ids = ids;
        out.logprobs = logprobs;
        return Ok(out);
    }
    // Sampled rows: ragged, one at a time.
    let (mut s, table) = open_streams(payload, positions, num_entries, p, loc)?;
    out.input_ids =
        table.decode_all(&s.optional(tag::INPUT_LEAD), &s.optional(tag::INPUT_EXT), loc)?;
    {
        let lens_raw = s.optional(tag::ROW_LENS);
        let mut r = bytes::ByteReader::new(&lens_raw, "row lengths");
        let mut row_lens = Vec::with_capacity(positions);
        let mut entry_offsets = Vec::with_capacity(positions + 1);
        let mut total = 0usize;
        entry_offsets.push(0);
        for _ in 0..positions {
            let n = r.varint_u32(loc)?;
            if n == 0 || n > p.k {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!("sampled row with {n} ids (n = {})", p.k),
                ));
            }
            total += n as usize;
            row_lens.push(n);
            entry_offsets.push(total);
        }
        r.finish(loc)?;
        if total != num_entries {
            return Err(Error::corrupt(
                loc.clone(),
                format!("row lengths add up to {total} entries, chunk table says {num_entries}"),
            ));
        }
        let counts_raw = s.optional(tag::COUNTS);
        let mut r = bytes::ByteReader::new(&counts_raw, "counts");
        let mut counts = Vec::with_capacity(num_entries);
        for w in entry_offsets.windows(2) {
            let mut sum = 0u64;
            for _ in w[0]..w[1] {
                let c = r.varint_u32(loc)?;
                if c == 0 {
                    return Err(Error::corrupt(loc.clone(), "sampled id with count 0"));
                }
                sum += u64::from(c);
                counts.push(c);
            }
            if sum != u64::from(p.k) {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!("sampled row counts add up to {sum}, expected n = {}", p.k),
                ));
            }
        }
        r.finish(loc)?;
        out.counts = counts;
        out.entry_offsets = entry_offsets;
        out.row_lens = row_lens;
    }
    let shape = RowShape::Ragged(std::borrow::Cow::Borrowed(&out.row_lens));
    let mut ids_out = Vec::with_capacity(num_entries);
    let raw: [(Vec<u8>, Vec<u8>); 4] = std::array::from_fn(|g| {
        (s.optional(tag::ID_LEAD + g as u8), s.optional(tag::ID_EXT + g as u8))
    });
    let (mut at, mut pos, mut bad) = ([0usize; 4], [0usize; 4], false);
    shape.for_each_row(|_, n| {
        for j in 0..n {
            let g = ids::group_of(j);
            let (lead, ext) = &raw[g];
            let Some(&b) = lead.get(at[g]) else {
                return Err(Error::corrupt(loc.clone(), "target ids stream ends early"));
            };
            at[g] += 1;
            ids_out.push(table.code(b, ext, &mut pos[g], &mut bad));
        }
        Ok(())
    })?;
    for (g, (lead, ext)) in raw.iter().enumerate() {
        if at[g] != lead.len() {
            return Err(Error::corrupt(loc.clone(), "target ids stream has trailing bytes"));
        }
        table.check_stream(bad, pos[g], ext, loc)?;
    }

    let logprobs = if p.has_logprobs() {
        logprobs::decode(&mut s, &shape, num_entries, p, loc)?
    } else {
        Vec::new()
    };
    drop(shape);
    out.ids = ids_out;
    out.logprobs = logprobs;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_stream_sizes_are_checked_against_the_frame_before_allocating() {
        let loc = Location::default();
        let raw = vec![7u8; 1000];
        let packed = compress(&raw, ZstdSettings { level: 1, min_match: None }).unwrap();
        assert_eq!(decompress(&packed, 1000, &loc, "t").unwrap(), raw);
        // The frame records 1000 bytes: any other size is refused up front.
        assert!(decompress(&packed, 999, &loc, "t").is_err());
        assert!(decompress(&packed, 1001, &loc, "t").is_err());
        // No frame of this size can hold 4 GiB: refused without allocating it.
        assert!(decompress(&packed, u32::MAX as usize, &loc, "t").is_err());
        assert!(decompress(&[0u8; 4], 1 << 20, &loc, "t").is_err());
    }

    #[test]
    fn every_compression_setting_round_trips_and_each_keeps_its_own_context() {
        let loc = Location::default();
        // Random small values, like an id table's gaps and counts: short repeats everywhere.
        let mut x = 1u64;
        let raw: Vec<u8> = (0..20_000)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 62) as u8
            })
            .collect();
        let table = ZstdSettings::for_stream(tag::ID_TABLE, 1);
        assert_eq!(table.min_match, Some(7));
        assert_eq!(ZstdSettings::for_stream(tag::ID_COUNTS, 1).min_match, Some(7));
        assert_eq!(ZstdSettings::for_stream(tag::ID_LEAD, 1).min_match, None);
        assert_eq!(ZstdSettings::for_stream(tag::ID_TABLE, 3).min_match, None);
        let mut sizes = Vec::new();
        // Alternating settings on one thread: each call must use its own settings.
        for z in [
            table,
            ZstdSettings::for_stream(tag::ID_LEAD, 1),
            table,
            ZstdSettings::for_stream(tag::ID_TABLE, 9),
        ] {
            let packed = compress(&raw, z).unwrap();
            assert_eq!(decompress(&packed, raw.len(), &loc, "t").unwrap(), raw);
            sizes.push(packed.len());
        }
        assert_eq!(sizes[0], sizes[2], "the same settings give the same frame");
        assert_ne!(sizes[0], sizes[1], "min_match 7 must change what level 1 finds here");
    }

    #[test]
    fn large_streams_decode_through_the_growing_path() {
        let loc = Location::default();
        let raw: Vec<u8> = (0..PREALLOC_MAX + 12345).map(|i| (i % 251) as u8).collect();
        let packed = compress(&raw, ZstdSettings { level: 1, min_match: None }).unwrap();
        assert_eq!(decompress(&packed, raw.len(), &loc, "t").unwrap(), raw);
        assert!(decompress(&packed[..packed.len() - 1], raw.len(), &loc, "t").is_err());
    }
}
