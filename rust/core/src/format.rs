//! Shard file layout (FORMAT.md, "Shard files"): fixed header, chunks, footer index, trailer.
//!
//! Everything here is plain byte layout with bounds checks; the chunk payloads are the
//! codec's business (`crate::codec`). All integers are little-endian.

use crate::error::{Error, Location, Result};

/// First 8 bytes of every shard.
pub const SHARD_MAGIC: [u8; 8] = *b"LCSHARD\0";
/// Last 8 bytes of every shard.
pub const TRAILER_MAGIC: [u8; 8] = *b"LCSHEND\0";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const TRAILER_LEN: usize = 32;
/// Bytes of one chunk-table entry in the footer.
pub const CHUNK_ENTRY_LEN: usize = 32;
/// Bytes of one record-table entry in the footer.
pub const RECORD_ENTRY_LEN: usize = 12;
/// Bytes of the fixed part of the footer before its tables.
pub const FOOTER_FIXED_LEN: usize = 24;

/// What a store keeps per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// K ids by teacher rank and their log-probabilities.
    TopK,
    /// Distinct ids of n draws with counts (and optionally log-probabilities).
    Sampled,
}

impl Kind {
    pub fn code(self) -> u8 {
        match self {
            Kind::TopK => 1,
            Kind::Sampled => 2,
        }
    }
    pub fn from_code(code: u8) -> Option<Kind> {
        match code {
            1 => Some(Kind::TopK),
            2 => Some(Kind::Sampled),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::TopK => "topk",
            Kind::Sampled => "sampled",
        }
    }
    pub fn from_name(name: &str) -> Option<Kind> {
        match name {
            "topk" => Some(Kind::TopK),
            "sampled" => Some(Kind::Sampled),
            _ => None,
        }
    }
}

pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Little-endian reads from a slice that report a corrupt-data error instead of panicking.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    loc: &'a Location,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], loc: &'a Location, what: &'static str) -> Self {
        Cursor { buf, pos: 0, loc, what }
    }
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::corrupt(
                self.loc.clone(),
                format!(
                    "{} truncated: needs {n} more bytes at byte {} of {}, has {}",
                    self.what,
                    self.pos,
                    self.buf.len(),
                    self.remaining()
                ),
            ));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_le_bytes(self.array()?))
    }
}

/// The fixed 64-byte shard header. It repeats the store configuration so that a shard is
/// self-describing (verify and recovery can read an orphan shard without the manifest).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardHeader {
    pub format_version: u32,
    pub kind: Kind,
    /// Logprob codec code (`codec::LogprobCodec::code`).
    pub logprob_codec: u8,
    /// Id codec code.
    pub id_codec: u8,
    /// Bit 0: records carry log-probabilities (always set for top-K).
    pub flags: u8,
    /// K for top-K stores, n (draws per position) for sampled stores.
    pub k: u32,
    pub vocab_size: u32,
    /// Quantization step of the logprob codec (0 for lossless or none).
    pub step: f32,
    /// KL bound of the `kl` codec (0 otherwise).
    pub kl_bound: f32,
    /// Random id of the shard, also in its file name and in the manifest.
    pub uid: u64,
    /// Capture temperature.
    pub temperature: f32,
}

pub const FLAG_HAS_LOGPROBS: u8 = 1;

impl ShardHeader {
    pub fn has_logprobs(&self) -> bool {
        self.flags & FLAG_HAS_LOGPROBS != 0
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&SHARD_MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16] = self.kind.code();
        b[17] = self.logprob_codec;
        b[18] = self.id_codec;
        b[19] = self.flags;
        b[20..24].copy_from_slice(&self.k.to_le_bytes());
        b[24..28].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.step.to_le_bytes());
        b[32..36].copy_from_slice(&self.kl_bound.to_le_bytes());
        b[36..40].copy_from_slice(&self.temperature.to_le_bytes());
        b[40..48].copy_from_slice(&self.uid.to_le_bytes());
        // 48..60 reserved, zero.
        let crc = crc32(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(bytes: &[u8], loc: &Location) -> Result<ShardHeader> {
        if bytes.len() != HEADER_LEN {
            // The checksum below is read at fixed offsets: a shorter slice must not reach it.
            return Err(Error::corrupt(
                loc.clone().offset(0),
                format!("shard header of {} bytes, expected {HEADER_LEN}", bytes.len()),
            ));
        }
        let mut c = Cursor::new(bytes, loc, "shard header");
        let magic: [u8; 8] = c.array()?;
        if magic != SHARD_MAGIC {
            return Err(Error::corrupt(
                loc.clone().offset(0),
                format!("not a logitcache shard: magic {magic:02x?}, expected {SHARD_MAGIC:02x?}"),
            ));
        }
        let format_version = c.u32()?;
        if format_version > FORMAT_VERSION || format_version == 0 {
            // Checked before the CRC: a newer writer may lay out the rest differently.
            return Err(Error::UnsupportedVersion {
                path: loc.file.clone().unwrap_or_default(),
                found: u64::from(format_version),
                supported: u64::from(FORMAT_VERSION),
            });
        }
        let header_len = c.u32()? as usize;
        if header_len != HEADER_LEN {
            return Err(Error::corrupt(
                loc.clone().offset(12),
                format!("header length {header_len}, expected {HEADER_LEN}"),
            ));
        }
        let stored_crc = u32::from_le_bytes([bytes[60], bytes[61], bytes[62], bytes[63]]);
        let actual = crc32(&bytes[0..60]);
        if stored_crc != actual {
            return Err(Error::corrupt(
                loc.clone().offset(0),
                format!(
                    "header checksum mismatch: stored {stored_crc:#010x}, computed {actual:#010x}"
                ),
            ));
        }
        let kind_code = c.u8()?;
        let kind = Kind::from_code(kind_code).ok_or_else(|| {
            Error::corrupt(loc.clone().offset(16), format!("unknown record kind {kind_code}"))
        })?;
        let logprob_codec = c.u8()?;
        let id_codec = c.u8()?;
        let flags = c.u8()?;
        if flags & !FLAG_HAS_LOGPROBS != 0 {
            return Err(Error::corrupt(
                loc.clone().offset(19),
                format!("header flags {flags:#04x} set bits that are not defined"),
            ));
        }
        let k = c.u32()?;
        let vocab_size = c.u32()?;
        let step = c.f32()?;
        let kl_bound = c.f32()?;
        let temperature = c.f32()?;
        let uid = c.u64()?;
        if bytes[48..60].iter().any(|&b| b != 0) {
            return Err(Error::corrupt(
                loc.clone().offset(48),
                "header bytes 48..60 are reserved and must be zero",
            ));
        }
        Ok(ShardHeader {
            format_version,
            kind,
            logprob_codec,
            id_codec,
            flags,
            k,
            vocab_size,
            step,
            kl_bound,
            uid,
            temperature,
        })
    }
}

/// One entry of the footer's chunk table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Byte offset of the chunk in the shard file.
    pub offset: u64,
    /// Stored (compressed) length in bytes.
    pub stored_len: u32,
    /// CRC-32 of the stored bytes.
    pub crc32: u32,
    /// Index of the chunk's first record in the record table.
    pub first_record: u32,
    /// Number of records in the chunk.
    pub num_records: u32,
    /// Number of positions (sum of record lengths) in the chunk.
    pub num_positions: u32,
    /// Number of target entries in the chunk (positions x K for top-K, sum of distinct ids
    /// per position for sampled); bounds what a decoder may allocate.
    pub num_entries: u32,
}

/// One entry of the footer's record table, in write order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordEntry {
    pub sample_id: u64,
    /// Number of positions (tokens) of the record.
    pub length: u32,
}

/// The footer: counts, the chunk table and the record table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Footer {
    pub chunks: Vec<ChunkEntry>,
    pub records: Vec<RecordEntry>,
    pub num_positions: u64,
}

impl Footer {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            FOOTER_FIXED_LEN
                + self.chunks.len() * CHUNK_ENTRY_LEN
                + self.records.len() * RECORD_ENTRY_LEN,
        );
        b.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.num_positions.to_le_bytes());
        for c in &self.chunks {
            b.extend_from_slice(&c.offset.to_le_bytes());
            b.extend_from_slice(&c.stored_len.to_le_bytes());
            b.extend_from_slice(&c.crc32.to_le_bytes());
            b.extend_from_slice(&c.first_record.to_le_bytes());
            b.extend_from_slice(&c.num_records.to_le_bytes());
            b.extend_from_slice(&c.num_positions.to_le_bytes());
            b.extend_from_slice(&c.num_entries.to_le_bytes());
        }
        for r in &self.records {
            b.extend_from_slice(&r.sample_id.to_le_bytes());
            b.extend_from_slice(&r.length.to_le_bytes());
        }
        b
    }

    /// Parse and cross-check a footer whose checksum has already been verified.
    /// `data_end` is the offset where the footer starts: every chunk must lie in
    /// `[HEADER_LEN, data_end)`, in order, without overlap.
    pub fn decode(bytes: &[u8], data_end: u64, loc: &Location) -> Result<Footer> {
        let mut c = Cursor::new(bytes, loc, "footer");
        let num_chunks = c.u64()?;
        let num_records = c.u64()?;
        let num_positions = c.u64()?;
        let need = (num_chunks as u128) * CHUNK_ENTRY_LEN as u128
            + (num_records as u128) * RECORD_ENTRY_LEN as u128;
        if need != c.remaining() as u128 {
            return Err(Error::corrupt(
                loc.clone(),
                format!(
                    "footer declares {num_chunks} chunks and {num_records} records ({need} table bytes) but holds {} table bytes",
                    c.remaining()
                ),
            ));
        }
        // Lengths are now proven to fit in the footer, so these allocations are bounded by it.
        let mut chunks = Vec::with_capacity(num_chunks as usize);
        let mut next_offset = HEADER_LEN as u64;
        let mut next_record: u64 = 0;
        let mut total_positions: u64 = 0;
        for i in 0..num_chunks {
            let e = ChunkEntry {
                offset: c.u64()?,
                stored_len: c.u32()?,
                crc32: c.u32()?,
                first_record: c.u32()?,
                num_records: c.u32()?,
                num_positions: c.u32()?,
                num_entries: c.u32()?,
            };
            let cloc = || loc.clone().chunk(i);
            if e.offset != next_offset {
                return Err(Error::corrupt(
                    cloc(),
                    format!("chunk starts at byte {}, expected {next_offset}", e.offset),
                ));
            }
            let end = e.offset + u64::from(e.stored_len);
            if end > data_end {
                return Err(Error::corrupt(
                    cloc(),
                    format!("chunk ends at byte {end}, past the start of the footer at {data_end}"),
                ));
            }
            if u64::from(e.first_record) != next_record || e.num_records == 0 {
                return Err(Error::corrupt(
                    cloc(),
                    format!(
                        "chunk holds records {}..+{}, expected to start at record {next_record} with at least one",
                        e.first_record, e.num_records
                    ),
                ));
            }
            next_offset = end;
            next_record += u64::from(e.num_records);
            total_positions += u64::from(e.num_positions);
            chunks.push(e);
        }
        if next_offset != data_end {
            return Err(Error::corrupt(
                loc.clone(),
                format!("chunks end at byte {next_offset} but the footer starts at {data_end}"),
            ));
        }
        if next_record != num_records {
            return Err(Error::corrupt(
                loc.clone(),
                format!("chunks hold {next_record} records, footer declares {num_records}"),
            ));
        }
        if total_positions != num_positions {
            return Err(Error::corrupt(
                loc.clone(),
                format!("chunks hold {total_positions} positions, footer declares {num_positions}"),
            ));
        }
        let mut records = Vec::with_capacity(num_records as usize);
        for _ in 0..num_records {
            records.push(RecordEntry { sample_id: c.u64()?, length: c.u32()? });
        }
        for (i, ch) in chunks.iter().enumerate() {
            let first = ch.first_record as usize;
            let sum: u64 = records[first..first + ch.num_records as usize]
                .iter()
                .map(|r| u64::from(r.length))
                .sum();
            if sum != u64::from(ch.num_positions) {
                return Err(Error::corrupt(
                    loc.clone().chunk(i as u64),
                    format!(
                        "records of the chunk have {sum} positions, chunk table says {}",
                        ch.num_positions
                    ),
                ));
            }
        }
        Ok(Footer { chunks, records, num_positions })
    }
}

/// The fixed 32-byte trailer at the end of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub footer_offset: u64,
    pub footer_len: u64,
    pub footer_crc32: u32,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(&self.footer_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.footer_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.footer_crc32.to_le_bytes());
        let crc = crc32(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b[24..32].copy_from_slice(&TRAILER_MAGIC);
        b
    }

    /// Parse the trailer of a file of `file_len` bytes.
    pub fn decode(bytes: &[u8], file_len: u64, loc: &Location) -> Result<Trailer> {
        let at = file_len.saturating_sub(TRAILER_LEN as u64);
        let tloc = || loc.clone().offset(at);
        if bytes.len() != TRAILER_LEN {
            return Err(Error::corrupt(tloc(), "shard too short to hold a trailer"));
        }
        if bytes[24..32] != TRAILER_MAGIC {
            return Err(Error::corrupt(
                tloc(),
                "trailer magic missing: the shard is truncated or was not finished",
            ));
        }
        let mut c = Cursor::new(bytes, loc, "trailer");
        let footer_offset = c.u64()?;
        let footer_len = c.u64()?;
        let footer_crc32 = c.u32()?;
        let stored = c.u32()?;
        let actual = crc32(&bytes[0..20]);
        if stored != actual {
            return Err(Error::corrupt(
                tloc(),
                format!(
                    "trailer checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"
                ),
            ));
        }
        let footer_end = footer_offset.checked_add(footer_len);
        if footer_offset < HEADER_LEN as u64 || footer_end != Some(at) {
            return Err(Error::corrupt(
                tloc(),
                format!(
                    "footer at bytes {footer_offset}..+{footer_len} does not end where the trailer starts ({at})"
                ),
            ));
        }
        Ok(Trailer { footer_offset, footer_len, footer_crc32 })
    }
}

/// A shard's checked footer and the chunk of every record: what a reader needs to find a
/// record. Built from the footer bytes the trailer points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    pub footer: Footer,
    /// Chunk of every record, in record order.
    pub record_chunk: Vec<u32>,
}

impl ShardIndex {
    /// Check `footer_bytes` against the trailer's checksum, parse and cross-check them
    /// ([`Footer::decode`]) and map every record to its chunk. The footer starts at
    /// `trailer.footer_offset`, so every chunk must end before it.
    pub fn parse(footer_bytes: &[u8], trailer: &Trailer, loc: &Location) -> Result<ShardIndex> {
        if footer_bytes.len() as u64 != trailer.footer_len {
            return Err(Error::corrupt(
                loc.clone().offset(trailer.footer_offset),
                format!(
                    "footer holds {} bytes, the trailer says {}",
                    footer_bytes.len(),
                    trailer.footer_len
                ),
            ));
        }
        let crc = crc32(footer_bytes);
        if crc != trailer.footer_crc32 {
            return Err(Error::corrupt(
                loc.clone().offset(trailer.footer_offset),
                format!(
                    "footer checksum mismatch: stored {:#010x}, computed {crc:#010x}",
                    trailer.footer_crc32
                ),
            ));
        }
        let footer = Footer::decode(footer_bytes, trailer.footer_offset, loc)?;
        // The chunks' record counts were checked to add up to the record table's length.
        let mut record_chunk = Vec::with_capacity(footer.records.len());
        for (ci, c) in footer.chunks.iter().enumerate() {
            let ci = u32::try_from(ci)
                .map_err(|_| Error::corrupt(loc.clone(), "more than 2^32 chunks in a shard"))?;
            record_chunk.extend(std::iter::repeat_n(ci, c.num_records as usize));
        }
        Ok(ShardIndex { footer, record_chunk })
    }

    /// Chunk of record `record` and the record's index inside that chunk.
    pub fn locate(&self, record: usize) -> Option<(usize, usize)> {
        locate_record(&self.footer, &self.record_chunk, record)
    }
}

/// Chunk of record `record` and its index inside that chunk, from a record -> chunk map.
pub fn locate_record(
    footer: &Footer,
    record_chunk: &[u32],
    record: usize,
) -> Option<(usize, usize)> {
    let c = *record_chunk.get(record)? as usize;
    let first = footer.chunks.get(c)?.first_record as usize;
    Some((c, record.checked_sub(first)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ShardHeader {
        ShardHeader {
            format_version: FORMAT_VERSION,
            kind: Kind::TopK,
            logprob_codec: 2,
            id_codec: 1,
            flags: FLAG_HAS_LOGPROBS,
            k: 64,
            vocab_size: 128_256,
            step: 1.0 / 64.0,
            kl_bound: 0.0,
            uid: 0xdead_beef_0123_4567,
            temperature: 1.0,
        }
    }

    #[test]
    fn header_roundtrip_and_every_flip_detected() {
        let h = header();
        let b = h.encode();
        let loc = Location::file("x");
        assert_eq!(ShardHeader::decode(&b, &loc).unwrap(), h);
        for byte in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut c = b;
                c[byte] ^= 1 << bit;
                assert!(ShardHeader::decode(&c, &loc).is_err(), "flip {byte}:{bit} undetected");
            }
        }
    }

    #[test]
    fn short_header_slices_are_errors() {
        // A 16..63-byte slice used to pass the magic/version/length reads and then index the
        // checksum at bytes 60..64 out of bounds.
        let b = header().encode();
        let loc = Location::file("x");
        for len in 0..HEADER_LEN {
            assert!(ShardHeader::decode(&b[..len], &loc).is_err(), "{len}");
        }
    }

    #[test]
    fn trailer_roundtrip_and_truncation() {
        let t = Trailer { footer_offset: 100, footer_len: 50, footer_crc32: 7 };
        let b = t.encode();
        let loc = Location::file("x");
        assert_eq!(Trailer::decode(&b, 182, &loc).unwrap(), t);
        assert!(Trailer::decode(&b, 183, &loc).is_err());
        assert!(Trailer::decode(&b[..31], 181, &loc).is_err());
    }

    #[test]
    fn footer_roundtrip_and_cross_checks() {
        let f = Footer {
            chunks: vec![
                ChunkEntry {
                    offset: 64,
                    stored_len: 10,
                    crc32: 1,
                    first_record: 0,
                    num_records: 2,
                    num_positions: 5,
                    num_entries: 5,
                },
                ChunkEntry {
                    offset: 74,
                    stored_len: 6,
                    crc32: 2,
                    first_record: 2,
                    num_records: 1,
                    num_positions: 4,
                    num_entries: 4,
                },
            ],
            records: vec![
                RecordEntry { sample_id: 9, length: 2 },
                RecordEntry { sample_id: 3, length: 3 },
                RecordEntry { sample_id: 1 << 63, length: 4 },
            ],
            num_positions: 9,
        };
        let b = f.encode();
        let loc = Location::file("x");
        assert_eq!(Footer::decode(&b, 80, &loc).unwrap(), f);
        assert!(Footer::decode(&b, 81, &loc).is_err());
        assert!(Footer::decode(&b[..b.len() - 1], 80, &loc).is_err());
        let mut bad = f.clone();
        bad.records[0].length = 3;
        assert!(Footer::decode(&bad.encode(), 80, &loc).is_err());
        let mut huge = b.clone();
        huge[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Footer::decode(&huge, 80, &loc).is_err());
    }
}
