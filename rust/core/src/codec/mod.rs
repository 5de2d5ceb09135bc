//! Chunk payload codecs (FORMAT.md, "Chunks").
//!
//! A chunk holds whole records. Its payload is a small stream directory followed by
//! independently compressed streams (input ids, target ids, log-probabilities, ...), so that
//! each zstd stream sees data of one kind and its entropy tables fit that kind.

pub mod bytes;
pub mod logprobs;

use std::cell::RefCell;

use crate::error::{Error, Location, Result};
use crate::format::Kind;

pub use logprobs::LogprobCodec;

/// Layout version of the chunk payload, its first byte.
pub const CHUNK_LAYOUT: u8 = 1;

/// Stream tags of the chunk directory.
pub mod tag {
    pub const INPUT_IDS: u8 = 1;
    pub const TARGET_IDS: u8 = 2;
    pub const LOGPROBS: u8 = 3;
    pub const FINITE_COUNTS: u8 = 4;
    pub const ROW_LENS: u8 = 5;
    pub const COUNTS: u8 = 6;
}

const METHOD_RAW: u8 = 0;
const METHOD_ZSTD: u8 = 1;

/// How the store codes token ids (recorded as the shard header's `id_codec`).
pub const ID_CODEC_V1: u8 = 1;
pub const ID_CODEC_NAME: &str = "planes-v1";

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

thread_local! {
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress(raw: &[u8], level: i32) -> Result<Vec<u8>> {
    zstd::bulk::compress(raw, level)
        .map_err(|e| Error::State(format!("zstd compression failed: {e}")))
}

fn decompress(stored: &[u8], raw_len: usize, loc: &Location, what: &str) -> Result<Vec<u8>> {
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
        let n = d.decompress_to_buffer(stored, &mut out).map_err(|e| {
            Error::corrupt(loc.clone(), format!("{what} stream does not decompress: {e}"))
        })?;
        if n != raw_len {
            return Err(Error::corrupt(
                loc.clone(),
                format!("{what} stream decompresses to {n} bytes, directory says {raw_len}"),
            ));
        }
        Ok(out)
    })
}

fn tag_name(t: u8) -> &'static str {
    match t {
        tag::INPUT_IDS => "input ids",
        tag::TARGET_IDS => "target ids",
        tag::LOGPROBS => "log-probabilities",
        tag::FINITE_COUNTS => "finite counts",
        tag::ROW_LENS => "row lengths",
        tag::COUNTS => "counts",
        _ => "unknown",
    }
}

/// Assemble streams into a chunk payload, compressing each with zstd unless that
/// does not make it smaller.
fn frame(streams: Vec<(u8, Vec<u8>)>, level: i32) -> Result<Vec<u8>> {
    let mut dir = vec![CHUNK_LAYOUT, streams.len() as u8];
    let mut body = Vec::new();
    for (t, raw) in streams {
        let packed = compress(&raw, level)?;
        let (method, stored) = if packed.len() < raw.len() {
            (METHOD_ZSTD, packed)
        } else {
            (METHOD_RAW, raw.clone())
        };
        dir.push(t);
        dir.push(method);
        dir.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        dir.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        body.extend_from_slice(&stored);
    }
    dir.extend_from_slice(&body);
    Ok(dir)
}

/// The decoded streams of a chunk, by tag.
struct Streams {
    by_tag: [Option<Vec<u8>>; 7],
}

impl Streams {
    fn take(&mut self, t: u8) -> Option<Vec<u8>> {
        self.by_tag.get_mut(t as usize).and_then(Option::take)
    }
    fn require(&mut self, t: u8, loc: &Location) -> Result<Vec<u8>> {
        self.take(t).ok_or_else(|| {
            Error::corrupt(loc.clone(), format!("chunk lacks its {} stream", tag_name(t)))
        })
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

/// Encode whole records into one chunk payload. Records must already be validated.
pub fn encode_chunk(records: &[Record], p: &CodecParams) -> Result<Vec<u8>> {
    let positions: usize = records.iter().map(Record::len).sum();
    let mut input_ids = Vec::with_capacity(positions);
    for r in records {
        input_ids.extend_from_slice(&r.input_ids);
    }
    let mut streams = vec![(tag::INPUT_IDS, bytes::u32_planes(&input_ids))];

    let mut ids = Vec::new();
    for r in records {
        ids.extend_from_slice(&r.ids);
    }
    streams.push((tag::TARGET_IDS, bytes::u32_planes(&ids)));

    if p.kind == Kind::Sampled {
        let mut lens = Vec::new();
        let mut counts = Vec::new();
        for r in records {
            for &n in &r.row_lens {
                bytes::put_varint(&mut lens, u64::from(n));
            }
            for &c in &r.counts {
                bytes::put_varint(&mut counts, u64::from(c));
            }
        }
        streams.push((tag::ROW_LENS, lens));
        streams.push((tag::COUNTS, counts));
    }

    if p.has_logprobs() {
        let rows = RowShape::of(records, p);
        let mut lp = Vec::with_capacity(ids.len());
        for r in records {
            lp.extend_from_slice(&r.logprobs);
        }
        let enc = logprobs::encode(&lp, &rows, p)?;
        streams.push((tag::LOGPROBS, enc.values));
        if let Some(finite) = enc.finite_counts {
            streams.push((tag::FINITE_COUNTS, finite));
        }
    }
    frame(streams, p.zstd_level)
}

/// Row lengths of the entries of a chunk: fixed K, or the sampled row lengths.
pub enum RowShape<'a> {
    Fixed { rows: usize, k: usize },
    Ragged(std::borrow::Cow<'a, [u32]>),
}

impl<'a> RowShape<'a> {
    fn of(records: &'a [Record], p: &CodecParams) -> RowShape<'a> {
        match p.kind {
            Kind::TopK => {
                RowShape::Fixed { rows: records.iter().map(Record::len).sum(), k: p.k as usize }
            }
            Kind::Sampled => {
                let mut lens = Vec::new();
                for r in records {
                    lens.extend_from_slice(&r.row_lens);
                }
                RowShape::Ragged(lens.into())
            }
        }
    }

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
    if p.kind == Kind::TopK && num_entries != positions * p.k as usize {
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
    // No stream may decode to more than 10 bytes (a u64 varint) per value.
    let max_raw = 10usize.saturating_mul(num_entries.saturating_add(positions)).saturating_add(64);
    let mut s = unframe(payload, max_raw, loc)?;

    let input_ids =
        bytes::u32_from_planes(&s.require(tag::INPUT_IDS, loc)?, positions, "input ids", loc)?;
    let vocab = p.vocab_size;
    if let Some(bad) = input_ids.iter().find(|&&t| t >= vocab) {
        return Err(Error::corrupt(loc.clone(), format!("input id {bad} >= vocab_size {vocab}")));
    }
    let ids =
        bytes::u32_from_planes(&s.require(tag::TARGET_IDS, loc)?, num_entries, "target ids", loc)?;
    if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
        return Err(Error::corrupt(loc.clone(), format!("target id {bad} >= vocab_size {vocab}")));
    }

    let mut out = DecodedChunk { input_ids, ids, ..Default::default() };
    let mut offs = Vec::with_capacity(lengths.len() + 1);
    let mut acc = 0usize;
    offs.push(0);
    for &l in lengths {
        acc += l as usize;
        offs.push(acc);
    }
    out.pos_offsets = offs;

    let shape = if p.kind == Kind::Sampled {
        let lens_raw = s.require(tag::ROW_LENS, loc)?;
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
        let counts_raw = s.require(tag::COUNTS, loc)?;
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
        RowShape::Ragged(std::borrow::Cow::Borrowed(&out.row_lens))
    } else {
        RowShape::Fixed { rows: positions, k: p.k as usize }
    };

    if p.has_logprobs() {
        let values = s.require(tag::LOGPROBS, loc)?;
        let finite = s.take(tag::FINITE_COUNTS);
        out.logprobs = logprobs::decode(&values, finite.as_deref(), &shape, num_entries, p, loc)?;
    }
    drop(shape);
    Ok(out)
}
