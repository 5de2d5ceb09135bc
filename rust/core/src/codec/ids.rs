//! Token-id coding: a per-chunk frequency table and tiered byte codes of table ranks.
//!
//! Each chunk lists its distinct ids (input ids and target ids together) with their counts;
//! the rank of an id is its position when the table is ordered by decreasing count, then
//! increasing id. Every id is coded as its rank in one lead byte (ranks below 224) or a lead
//! byte plus extension bytes. Lead and extension bytes go to separate streams per group
//! (the input ids, and teacher ranks 0, 1-3, 4-15, 16+), so that zstd's entropy tables fit
//! each group's skew and LZ matching picks up rows that repeat; each lead stream holds
//! exactly one byte per id, which lets the decoder run over it without per-byte checks.

use std::mem::MaybeUninit;

use crate::codec::bytes::{self, ByteReader, put_varint};
use crate::error::{Error, Location, Result};

/// Ranks below this take one byte.
pub const ONE_BYTE: u32 = 224;
/// Lead bytes `ONE_BYTE..255` carry 5 high bits of a two-byte code.
pub const TWO_BYTE_SPAN: u32 = (255 - ONE_BYTE) * 256;
/// Table slots reachable by one- and two-byte codes (a power of two above
/// `ONE_BYTE + TWO_BYTE_SPAN`).
const FAST_RANKS: usize = 8192;
/// Lead byte announcing a varint extension.
pub const ESCAPE: u8 = 255;

/// Teacher-rank groups: `[start, end)` within a row (the last runs to the row's end).
pub const GROUPS: [(usize, usize); 4] = [(0, 1), (1, 4), (4, 16), (16, usize::MAX)];

/// Group of the entry at `rank` within its row.
#[inline]
pub fn group_of(rank: usize) -> usize {
    match rank {
        0 => 0,
        1..=3 => 1,
        4..=15 => 2,
        _ => 3,
    }
}

/// Append the code of `r`: the lead byte to `lead`, any extension to `ext` (the plain
/// definition of the code; the encoder uses [`RankWriter`]).
#[inline]
pub fn put_rank(lead: &mut Vec<u8>, ext: &mut Vec<u8>, r: u32) {
    if r < ONE_BYTE {
        lead.push(r as u8);
    } else if r - ONE_BYTE < TWO_BYTE_SPAN {
        let v = r - ONE_BYTE;
        lead.push((ONE_BYTE + (v >> 8)) as u8);
        ext.push(v as u8);
    } else {
        lead.push(ESCAPE);
        put_varint(ext, u64::from(r - ONE_BYTE - TWO_BYTE_SPAN));
    }
}

/// Writes rank codes like [`put_rank`], without branches on the data for one- and
/// two-byte codes (whether a code is long is close to random for rare ids): every code
/// stores a byte at the extension's end, which only long codes keep.
#[derive(Default)]
pub struct RankWriter {
    pub lead: Vec<u8>,
    ext: Vec<u8>,
    /// Bytes of `ext` in use (the rest is slack for the next store).
    used: usize,
}

impl RankWriter {
    pub fn with_capacity(codes: usize) -> RankWriter {
        RankWriter { lead: Vec::with_capacity(codes), ext: vec![0; codes / 2 + 64], used: 0 }
    }

    #[inline]
    /// Append the codes of `ranks`.
    pub fn put_all(&mut self, ranks: impl IntoIterator<Item = u32>) {
        for r in ranks {
            if self.used + 16 > self.ext.len() {
                self.ext.resize(self.ext.len() * 2 + 64, 0);
            }
            if r >= ONE_BYTE + TWO_BYTE_SPAN {
                self.lead.push(ESCAPE);
                let mut v = u64::from(r - ONE_BYTE - TWO_BYTE_SPAN);
                // A u32 rank takes at most 5 varint bytes; 16 are free.
                while v >= 0x80 {
                    if let Some(b) = self.ext.get_mut(self.used) {
                        *b = (v as u8) | 0x80;
                    }
                    self.used += 1;
                    v >>= 7;
                }
                if let Some(b) = self.ext.get_mut(self.used) {
                    *b = v as u8;
                }
                self.used += 1;
                continue;
            }
            let long = r >= ONE_BYTE;
            let v = r.wrapping_sub(ONE_BYTE);
            self.lead.push(if long { (ONE_BYTE + (v >> 8)) as u8 } else { r as u8 });
            if let Some(b) = self.ext.get_mut(self.used) {
                *b = v as u8;
            }
            self.used += usize::from(long);
        }
    }

    /// The lead and extension streams.
    pub fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        self.ext.truncate(self.used);
        (self.lead, self.ext)
    }
}

/// The 4 bytes of `buf` at `pos`, little-endian (0 past the end).
#[inline(always)]
fn load4(buf: &[u8], pos: usize) -> u32 {
    match buf.get(pos..pos + 4) {
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// A decoded table: ids in rank order.
pub struct Table {
    /// Number of ids in the table.
    len: usize,
    /// The ids in rank order, padded with zeros to a power of two (at least `FAST_RANKS`),
    /// so that the decoding loop's index mask keeps its bounds check out of the way; ranks
    /// past the table are caught separately.
    lut: Vec<u32>,
}

impl Table {
    fn new(mut by_rank: Vec<u32>) -> Table {
        let len = by_rank.len();
        by_rank.resize(len.next_power_of_two().max(FAST_RANKS), 0);
        Table { len, lut: by_rank }
    }

    /// The ids in rank order.
    pub fn ids(&self) -> &[u32] {
        &self.lut[..self.len]
    }

    /// The id coded by lead byte `b`, reading any extension from `ext` at `*pos`.
    ///
    /// One- and two-byte codes are decoded without branches on the data (whether a code is
    /// long is close to random for rare ids, and mispredictions would dominate); only the
    /// rare escape takes a branch. Errors only set `*bad` (checked once per stream).
    #[inline(always)]
    pub fn code(&self, b: u8, ext: &[u8], pos: &mut usize, bad: &mut bool) -> u32 {
        let r = if b == ESCAPE {
            let mut reader = ByteReader::new(ext, "id extension");
            reader.skip_to(*pos);
            let v = reader.varint(&Location::default());
            *pos = reader.position();
            // Checked: a varint near 2^64 must not wrap around to a small, valid rank.
            match v
                .ok()
                .and_then(|v| v.checked_add(u64::from(ONE_BYTE + TWO_BYTE_SPAN)))
                .and_then(|r| usize::try_from(r).ok())
            {
                Some(r) => r,
                None => {
                    *bad = true;
                    0
                }
            }
        } else {
            let long = usize::from(u32::from(b) >= ONE_BYTE);
            // Reads a byte even for one-byte codes (0 past the end); it is only used, and the
            // position only advances, for two-byte codes.
            let lo = ext.get(*pos).copied().unwrap_or(0) as usize;
            let two =
                ONE_BYTE as usize + (((b as usize).saturating_sub(ONE_BYTE as usize) << 8) | lo);
            *pos += long;
            if long == 1 { two } else { b as usize }
        };
        *bad |= r >= self.len;
        self.ids().get(r).copied().unwrap_or(0)
    }

    /// Fail if any code was bad or an extension stream was not consumed exactly.
    pub fn check_stream(&self, bad: bool, pos: usize, ext: &[u8], loc: &Location) -> Result<()> {
        if bad || pos > ext.len() {
            return Err(Error::corrupt(
                loc.clone(),
                format!(
                    "id codes point past the chunk's table of {} ids or its extension stream",
                    self.len
                ),
            ));
        }
        if pos != ext.len() {
            return Err(Error::corrupt(loc.clone(), "id extension stream has trailing bytes"));
        }
        Ok(())
    }

    /// Decode `lead` (one byte per id) into a new vector, extensions from `ext`, which must
    /// be consumed exactly.
    pub fn decode_all(&self, lead: &[u8], ext: &[u8], loc: &Location) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(lead.len());
        self.decode_strided(lead, ext, &mut out.spare_capacity_mut()[..lead.len()], 1, 0, 1, loc)?;
        // SAFETY: decode_strided returned Ok, so it wrote column 0 of every row of width 1,
        // i.e. all lead.len() slots of the spare capacity.
        unsafe { out.set_len(lead.len()) };
        Ok(out)
    }

    /// Decode top-K rows of width `k` from the four rank-group streams (lead stream g holds
    /// exactly `rows` times the group's width bytes) into a new `[rows * k]` vector.
    pub fn decode_rows(
        &self,
        groups: &[(Vec<u8>, Vec<u8>); 4],
        rows: usize,
        k: usize,
        loc: &Location,
    ) -> Result<Vec<u32>> {
        // Written without zeroing first (a chunk's ids are a megabyte, and zeroing them took
        // ~8% of the decoding time).
        let n = rows * k;
        let mut out = Vec::with_capacity(n);
        let slots = &mut out.spare_capacity_mut()[..n];
        let mut covered = 0;
        for (g, (lead, ext)) in groups.iter().enumerate() {
            let start = GROUPS[g].0;
            let w = GROUPS[g].1.min(k).saturating_sub(start);
            if lead.len() != rows * w {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!(
                        "target ids stream {g} has {} codes, expected {}",
                        lead.len(),
                        rows * w
                    ),
                ));
            }
            self.decode_strided(lead, ext, slots, k, start, w, loc)?;
            covered += w;
        }
        if covered != k {
            return Err(Error::State(format!("id groups cover {covered} of {k} ranks")));
        }
        // SAFETY: the groups' column ranges start..start + w are consecutive from 0
        // (GROUPS), so with `covered == k` they are all k columns; decode_strided returned
        // Ok for each, which means it wrote its columns of every one of the n / k rows.
        unsafe { out.set_len(n) };
        Ok(out)
    }

    /// Decode one stream of `w` codes per row into columns `start..start + w` of the rows of
    /// `out` (rows of `k`); `lead` holds exactly `w` codes per row of `out`. Returns Ok only
    /// after writing every one of those slots (callers rely on it to skip zeroing `out`).
    ///
    /// Group by group rather than row by row: each inner loop then runs over one stream with
    /// its extension position in a register. One- and two-byte codes are decoded without
    /// branches on the data (whether a code is long is close to random for rare ids, and
    /// mispredictions would dominate); only escapes (ranks past 8160) take a branch.
    #[allow(clippy::too_many_arguments)]
    fn decode_strided(
        &self,
        lead: &[u8],
        ext: &[u8],
        out: &mut [MaybeUninit<u32>],
        k: usize,
        start: usize,
        w: usize,
        loc: &Location,
    ) -> Result<()> {
        if w == 0 {
            return Ok(());
        }
        if k == 0
            || !out.len().is_multiple_of(k)
            || start + w > k
            || lead.len() != out.len() / k * w
        {
            return Err(Error::corrupt(
                loc.clone(),
                format!(
                    "id stream of {} codes for {} rows of {w}",
                    lead.len(),
                    out.len() / k.max(1)
                ),
            ));
        }
        let rows = || {
            let mut at = start;
            lead.chunks_exact(w).map(move |codes| {
                let r = at..at + w;
                at += k;
                (r, codes)
            })
        };
        // The extension padded so that every code can load 4 bytes at its position.
        let mut padded = Vec::with_capacity(ext.len() + 4);
        padded.extend_from_slice(ext);
        padded.extend_from_slice(&[0; 4]);
        let lut = &self.lut[..];
        let mask = lut.len() - 1;
        let (mut pos, mut max_rank, mut long_varint) = (0usize, 0usize, 0u32);
        for (range, codes) in rows() {
            let Some(slots) = out.get_mut(range) else {
                return Err(Error::State("id rows past the output".into()));
            };
            for (slot, &b) in slots.iter_mut().zip(codes) {
                let b = u32::from(b);
                let r = if b == u32::from(ESCAPE) {
                    // A varint of up to 3 bytes (ranks below 2^21 + 8160; longer ones send
                    // the stream to the general loop below). A branch: the position then
                    // depends on the extension's bytes, which other codes must not wait for.
                    let x = load4(&padded, pos);
                    let c0 = (x >> 7) & 1;
                    let c1 = c0 & (x >> 15);
                    long_varint |= c1 & (x >> 23);
                    pos += (1 + c0 + c1) as usize;
                    let v = (x & 0x7f)
                        | ((x >> 1) & 0x3f80 & 0u32.wrapping_sub(c0))
                        | ((x >> 2) & 0x1f_c000 & 0u32.wrapping_sub(c1));
                    (ONE_BYTE + TWO_BYTE_SPAN + v) as usize
                } else {
                    // One- or two-byte code without branches on the data (whether a code is
                    // long is close to random for rare ids): the next byte is read either
                    // way, the position only advances for long codes.
                    let long = u32::from(b >= ONE_BYTE);
                    let lo = u32::from(padded.get(pos).copied().unwrap_or(0));
                    // (Wraps for short codes, whose value is not used.)
                    let two = ONE_BYTE.wrapping_add((b.wrapping_sub(ONE_BYTE) << 8) | lo);
                    pos += long as usize;
                    (if long == 1 { two } else { b }) as usize
                };
                max_rank = max_rank.max(r);
                slot.write(lut.get(r & mask).copied().unwrap_or(0));
            }
        }
        if long_varint & 1 == 0 {
            let bad = !lead.is_empty() && max_rank >= self.len;
            return self.check_stream(bad, pos, ext, loc);
        }
        let (mut pos, mut bad) = (0usize, false);
        for (range, codes) in rows() {
            let Some(slots) = out.get_mut(range) else {
                return Err(Error::State("id rows past the output".into()));
            };
            for (slot, &b) in slots.iter_mut().zip(codes) {
                slot.write(self.code(b, ext, &mut pos, &mut bad));
            }
        }
        self.check_stream(bad, pos, ext, loc)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Reusable encoder scratch: dense per-vocabulary counters for vocabularies up to
/// `DENSE_LIMIT` (a sort is used beyond).
#[derive(Default)]
pub struct TableScratch {
    counts: Vec<u32>,
    ranks: Vec<u32>,
}

const DENSE_LIMIT: usize = 1 << 22;
/// Marks a counter whose id was already collected, where the distinct ids are sorted: that
/// path is taken for chunks of fewer than vocab / 16 <= 2^28 ids, so counts stay below.
const FIRST_SEEN: u32 = 1 << 31;

/// The chunk's id table as the encoder builds it.
pub struct TableEncoder {
    /// Dense rank per id (`dense`), else (id, rank) sorted by id.
    sparse: Vec<(u32, u32)>,
    dense: bool,
    /// Sorted distinct ids, to reset the scratch afterwards.
    distinct: Vec<u32>,
    pub ids_stream: Vec<u8>,
    pub counts_stream: Vec<u8>,
}

impl TableEncoder {
    /// Count `all` (ids below `vocab`) and serialise the table.
    pub fn new(all: &[&[u32]], vocab: u32, scratch: &mut TableScratch) -> TableEncoder {
        let total: usize = all.iter().map(|a| a.len()).sum();
        let dense = (vocab as usize) <= DENSE_LIMIT;
        let mut distinct: Vec<(u32, u32)> = Vec::new();
        if dense {
            if scratch.counts.len() < vocab as usize {
                scratch.counts.resize(vocab as usize, 0);
                scratch.ranks.resize(vocab as usize, 0);
            }
            for a in all {
                for &id in *a {
                    scratch.counts[id as usize] += 1;
                }
            }
            // The distinct ids in id order: a scan of the counters, sixteen at a time, when
            // the chunk is large against the vocabulary (sorting a 1024-position chunk's
            // ~8,800 distinct ids took a tenth of the encoding time), else a sort.
            let mut ids: Vec<u32> = Vec::new();
            if total >= vocab as usize / 16 {
                for (block, c16) in scratch.counts[..vocab as usize].chunks(16).enumerate() {
                    if c16.iter().fold(0, |acc, &c| acc | c) != 0 {
                        for (i, &c) in c16.iter().enumerate() {
                            if c != 0 {
                                ids.push((block * 16 + i) as u32);
                            }
                        }
                    }
                }
            } else {
                for a in all {
                    for &id in *a {
                        let c = &mut scratch.counts[id as usize];
                        if *c & FIRST_SEEN == 0 {
                            *c |= FIRST_SEEN;
                            ids.push(id);
                        }
                    }
                }
                ids.sort_unstable();
                for &id in &ids {
                    scratch.counts[id as usize] &= !FIRST_SEEN;
                }
            }
            distinct.extend(ids.iter().map(|&id| (id, scratch.counts[id as usize])));
        } else {
            let mut sorted: Vec<u32> = Vec::with_capacity(total);
            for a in all {
                sorted.extend_from_slice(a);
            }
            sorted.sort_unstable();
            for id in sorted {
                match distinct.last_mut() {
                    Some((last, c)) if *last == id => *c += 1,
                    _ => distinct.push((id, 1)),
                }
            }
        }
        let mut ids_stream = Vec::with_capacity(distinct.len() * 2);
        let mut counts_stream = Vec::with_capacity(distinct.len() * 2);
        let mut next = 0u32;
        for &(id, c) in &distinct {
            put_varint(&mut ids_stream, u64::from(id - next));
            put_varint(&mut counts_stream, u64::from(c));
            next = id + 1;
        }
        let order = rank_order(&distinct);
        let mut sparse = Vec::new();
        if dense {
            for (rank, &i) in order.iter().enumerate() {
                scratch.ranks[distinct[i as usize].0 as usize] = rank as u32;
            }
        } else {
            sparse = distinct.iter().map(|&(id, _)| (id, 0)).collect();
            for (rank, &i) in order.iter().enumerate() {
                sparse[i as usize].1 = rank as u32;
            }
        }
        TableEncoder {
            sparse,
            dense,
            distinct: distinct.into_iter().map(|(id, _)| id).collect(),
            ids_stream,
            counts_stream,
        }
    }

    /// Rank of an id that was counted.
    #[inline]
    pub fn rank(&self, id: u32, scratch: &TableScratch) -> u32 {
        if self.dense {
            scratch.ranks[id as usize]
        } else {
            match self.sparse.binary_search_by_key(&id, |e| e.0) {
                Ok(i) => self.sparse[i].1,
                Err(_) => u32::MAX,
            }
        }
    }

    /// Leave the scratch all-zero for the next chunk.
    pub fn reset(&self, scratch: &mut TableScratch) {
        if self.dense {
            for &id in &self.distinct {
                scratch.counts[id as usize] = 0;
            }
        }
    }
}

/// Indices of `distinct` (sorted by id) in rank order: decreasing count, then increasing id.
fn rank_order(distinct: &[(u32, u32)]) -> Vec<u32> {
    let ids: Vec<u32> = (0..distinct.len() as u32).collect();
    let counts: Vec<u32> = distinct.iter().map(|&(_, c)| c).collect();
    by_rank(&ids, &counts)
}

/// `values` (given in increasing id order) reordered by decreasing `counts`, ties kept in
/// the given order.
///
/// Most ids of a chunk occur once or twice. A plain counting sort then spends its time on
/// `starts[1] += 1`, a chain of dependent loads and stores through memory; so the ones and
/// twos are first split off without branches (their order is the given order) and only the
/// rest is counting-sorted.
fn by_rank(values: &[u32], counts: &[u32]) -> Vec<u32> {
    let n = values.len().min(counts.len());
    let mut out = vec![0u32; n];
    let mut twos = vec![0u32; n];
    let mut rest: Vec<(u32, u32)> = vec![(0, 0); n];
    let (mut n1, mut n2, mut nr) = (0usize, 0usize, 0usize);
    for (&v, &c) in values.iter().zip(counts) {
        // Each slot is written before its index can move past it, and indices stay below
        // n: at most one of the three advances per value.
        out[n1.min(n - 1)] = v;
        twos[n2.min(n - 1)] = v;
        rest[nr.min(n - 1)] = (v, c);
        n1 += usize::from(c == 1);
        n2 += usize::from(c == 2);
        nr += usize::from(c > 2);
    }
    let rest = &rest[..nr];
    // Final layout: rest (counting-sorted, decreasing), twos, ones.
    out.copy_within(0..n1, n - n1);
    out[nr..nr + n2].copy_from_slice(&twos[..n2]);
    let max = rest.iter().map(|&(_, c)| c).max().unwrap_or(0) as usize;
    if max > 4 * nr + 1024 {
        let mut keys: Vec<(u32, usize)> =
            rest.iter().enumerate().map(|(i, &(_, c))| (u32::MAX - c, i)).collect();
        keys.sort_unstable();
        for (o, (_, i)) in out.iter_mut().zip(keys) {
            *o = rest[i].0;
        }
        return out;
    }
    // starts[c] = first output slot of count c, counts taken in decreasing order.
    let mut starts = vec![0u32; max + 1];
    for &(_, c) in rest {
        starts[c as usize] += 1;
    }
    let mut acc = 0u32;
    for s in starts.iter_mut().rev() {
        let k = *s;
        *s = acc;
        acc += k;
    }
    for &(v, c) in rest {
        let slot = &mut starts[c as usize];
        // In bounds: the slots of count c end where those of the next smaller count begin.
        if let Some(o) = out.get_mut(*slot as usize) {
            *o = v;
        }
        *slot += 1;
    }
    out
}

/// Decode a table holding `total` ids, all below `vocab`.
pub fn decode_table(
    ids_stream: &[u8],
    counts_stream: &[u8],
    total: u64,
    vocab: u32,
    loc: &Location,
) -> Result<Table> {
    let mut ids = bytes::varints_u32(ids_stream, "id table", loc)?;
    let counts = bytes::varints_u32(counts_stream, "id counts", loc)?;
    if ids.len() != counts.len() {
        return Err(Error::corrupt(
            loc.clone(),
            format!("id table has {} ids and {} counts", ids.len(), counts.len()),
        ));
    }
    // Gaps to ids in u64: the sum of the gaps of a corrupt table may pass 2^32.
    let mut next: u64 = 0;
    for v in &mut ids {
        let id = next + u64::from(*v);
        if id >= u64::from(vocab) {
            return Err(Error::corrupt(
                loc.clone(),
                format!("id table holds {id} >= vocab_size {vocab}"),
            ));
        }
        *v = id as u32;
        next = id + 1;
    }
    let (sum, min) =
        counts.iter().fold((0u64, u32::MAX), |(s, m), &c| (s + u64::from(c), m.min(c)));
    if min == 0 {
        return Err(Error::corrupt(loc.clone(), "id table count of 0"));
    }
    if sum != total {
        return Err(Error::corrupt(
            loc.clone(),
            format!("id table counts add up to {sum}, the chunk has {total} ids"),
        ));
    }
    Ok(Table::new(by_rank(&ids, &counts)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_codes_roundtrip() {
        let loc = Location::default();
        let n = (ONE_BYTE + TWO_BYTE_SPAN + 300) as usize;
        let by_rank: Vec<u32> = (0..n as u32).map(|r| r * 3).collect();
        let table = Table::new(by_rank);
        let ranks = [
            0u32,
            1,
            223,
            224,
            225,
            1000,
            ONE_BYTE + TWO_BYTE_SPAN - 1,
            ONE_BYTE + TWO_BYTE_SPAN,
            n as u32 - 1,
        ];
        let (mut lead, mut ext) = (Vec::new(), Vec::new());
        for &r in &ranks {
            put_rank(&mut lead, &mut ext, r);
        }
        let out = table.decode_all(&lead, &ext, &loc).unwrap();
        assert_eq!(out, ranks.iter().map(|r| r * 3).collect::<Vec<_>>());
        let small = Table::new(vec![5, 6]);
        assert!(small.decode_all(&[2], &[], &loc).is_err());
        // A two-byte code without its extension byte, and a stray extension byte.
        assert!(table.decode_all(&[230], &[], &loc).is_err());
        assert!(table.decode_all(&[3], &[1], &loc).is_err());
    }

    /// Decode one code at a time through `Table::code`: the plain decoder the fast loop of
    /// `decode_strided` must agree with.
    fn reference(table: &Table, lead: &[u8], ext: &[u8], loc: &Location) -> Result<Vec<u32>> {
        let (mut pos, mut bad) = (0usize, false);
        let out = lead.iter().map(|&b| table.code(b, ext, &mut pos, &mut bad)).collect();
        table.check_stream(bad, pos, ext, loc)?;
        Ok(out)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Every code length (1, 2 and escapes of 1 to 4 varint bytes), tables of every size
        /// around the fast loop's limits, and corrupted streams: same ids, same verdict.
        #[test]
        fn fast_decoder_agrees_with_the_plain_one(
            ranks in proptest::collection::vec(
                proptest::prop_oneof![0u32..224, 224u32..8160, 8160u32..30_000],
                0..300),
            extra in 0usize..3,
            flip in proptest::option::of((0usize..1000, 0u8..8, proptest::bool::ANY)),
        ) {
            let loc = Location::default();
            let max = ranks.iter().copied().max().unwrap_or(0) as usize;
            // Sometimes one entry short of the largest rank: a code past the table.
            let n = (max + 1 + extra).saturating_sub(usize::from(extra == 0 && !ranks.is_empty()));
            let table = Table::new((0..n as u32).map(|r| r ^ 0x5555).collect());
            let (mut lead, mut ext) = (Vec::new(), Vec::new());
            for &r in &ranks {
                put_rank(&mut lead, &mut ext, r);
            }
            // The encoder's branch-free writer, in pieces, writes the same streams.
            let mut w = RankWriter::with_capacity(0);
            for part in ranks.chunks(7) {
                w.put_all(part.iter().copied());
            }
            proptest::prop_assert_eq!(w.finish(), (lead.clone(), ext.clone()));
            if let Some((at, bit, in_lead)) = flip {
                let target = if in_lead { &mut lead } else { &mut ext };
                if !target.is_empty() {
                    let i = at % target.len();
                    target[i] ^= 1 << bit;
                }
            }
            let fast = table.decode_all(&lead, &ext, &loc);
            let plain = reference(&table, &lead, &ext, &loc);
            proptest::prop_assert_eq!(fast.is_ok(), plain.is_ok());
            if let (Ok(a), Ok(b)) = (fast, plain) {
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn escapes_of_four_varint_bytes_take_the_plain_loop() {
        // Ranks from 2^21 + 8160 need 4 varint bytes, beyond the fast loop's 3: the stream
        // is decoded again by the plain loop, with the same result.
        let loc = Location::default();
        let big = (1u32 << 21) + ONE_BYTE + TWO_BYTE_SPAN;
        let n = big as usize + 10;
        let table = Table::new((0..n as u32).map(|r| r ^ 0x5555).collect());
        let ranks = [3u32, big + 5, 300, 9000, big, 1];
        let (mut lead, mut ext) = (Vec::new(), Vec::new());
        for &r in &ranks {
            put_rank(&mut lead, &mut ext, r);
        }
        let got = table.decode_all(&lead, &ext, &loc).unwrap();
        assert_eq!(got, ranks.iter().map(|r| r ^ 0x5555).collect::<Vec<_>>());
        assert_eq!(got, reference(&table, &lead, &ext, &loc).unwrap());
        // One past the table: refused by both.
        let small = Table::new((0..big + 5).collect());
        assert!(small.decode_all(&lead, &ext, &loc).is_err());
        assert!(reference(&small, &lead, &ext, &loc).is_err());
    }

    #[test]
    fn escaped_rank_near_2_pow_64_is_an_error_not_a_wrapped_rank() {
        // 255 + varint(2^64 - 8160) used to wrap to rank 0 and decode as a valid id.
        let loc = Location::default();
        let table = Table::new(vec![5, 6]);
        let mut ext = Vec::new();
        put_varint(&mut ext, u64::MAX - u64::from(ONE_BYTE + TWO_BYTE_SPAN) + 1);
        assert!(table.decode_all(&[ESCAPE], &ext, &loc).is_err());
    }

    #[test]
    fn table_orders_by_count_then_id() {
        let loc = Location::default();
        let ids = [7u32, 3, 7, 9, 3, 7, 1];
        // A scan of the counters (small vocabulary), a sort of the ids seen (large against
        // the chunk), no dense counters at all.
        for vocab in [10u32, 1000, (DENSE_LIMIT + 1) as u32] {
            let mut scratch = TableScratch::default();
            let t = TableEncoder::new(&[&ids], vocab, &mut scratch);
            assert_eq!([7, 3, 1, 9].map(|id| t.rank(id, &scratch)), [0, 1, 2, 3], "vocab {vocab}");
            t.reset(&mut scratch);
            assert!(scratch.counts.iter().all(|&c| c == 0));
            let table = decode_table(&t.ids_stream, &t.counts_stream, 7, 10, &loc).unwrap();
            // The encoder's scratch is clean for the next chunk, FIRST_SEEN marks included.
            let again = TableEncoder::new(&[&ids], vocab, &mut scratch);
            assert_eq!(
                (&again.ids_stream, &again.counts_stream),
                (&t.ids_stream, &t.counts_stream)
            );
            again.reset(&mut scratch);
            assert_eq!(table.ids(), [7, 3, 1, 9]);
            assert!(decode_table(&t.ids_stream, &t.counts_stream, 8, 10, &loc).is_err());
            assert!(decode_table(&t.ids_stream, &t.counts_stream, 7, 9, &loc).is_err());
        }
    }

    #[test]
    fn counting_sort_matches_comparison_sort() {
        let distinct: Vec<(u32, u32)> = (0..500u32).map(|i| (i * 2, (i * 7919) % 37 + 1)).collect();
        let mut want: Vec<u32> = (0..500).collect();
        want.sort_by_key(|&i| (std::cmp::Reverse(distinct[i as usize].1), distinct[i as usize].0));
        assert_eq!(rank_order(&distinct), want);
        let skewed = vec![(1, 100_000), (2, 1), (3, 100_000), (4, 2), (5, 1), (6, 3)];
        assert_eq!(rank_order(&skewed), vec![0, 2, 5, 3, 1, 4]);
        assert_eq!(rank_order(&[]), Vec::<u32>::new());
        assert_eq!(rank_order(&[(4, 1)]), vec![0]);
    }

    proptest::proptest! {
        #[test]
        fn rank_order_is_a_stable_sort_by_decreasing_count(
            counts in proptest::collection::vec(
                proptest::prop_oneof![1u32..4, 1u32..100, 1u32..1_000_000], 0..400),
        ) {
            let distinct: Vec<(u32, u32)> =
                counts.iter().enumerate().map(|(i, &c)| (i as u32 * 3, c)).collect();
            let mut want: Vec<u32> = (0..distinct.len() as u32).collect();
            want.sort_by_key(|&i| std::cmp::Reverse(distinct[i as usize].1));
            proptest::prop_assert_eq!(rank_order(&distinct), want);
        }
    }
}
