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
            self.lead.push(0);
            if let Some(slot) = self.lead.last_mut() {
                put_code(r, slot, &mut self.ext, &mut self.used);
            }
        }
    }

    /// Append the codes of the ranks of `ids[r k + cols]` for every row r of `ids` (rows of
    /// `k`), each looked up in `rank_of` (indexed by id). False when an id is past
    /// `rank_of` or a row has no `cols`: the streams are then not a valid coding (the
    /// caller drops the writer and fails the chunk).
    ///
    /// [`RankWriter::put_all`] for the rows of a dense table, with the writer's state,
    /// the rows and the table held in locals: stores of code bytes may alias any memory,
    /// so through `self` and the table's scratch every code reloaded (and stored) the
    /// vectors' lengths and pointers. With AVX-512, rows of 8 ids or more go sixteen ids
    /// at a time (one gather of ranks, the extension bytes packed by a compress).
    pub fn put_rows<R: RankEntry>(
        &mut self,
        ids: &[u32],
        k: usize,
        cols: std::ops::Range<usize>,
        rank_of: &[R],
    ) -> bool {
        let w = cols.len();
        if k == 0 || w == 0 {
            return true;
        }
        #[cfg(target_arch = "x86_64")]
        let simd = w >= 8 && (2..=1 << 31).contains(&rank_of.len()) && has_avx512_vbmi2();
        // An escape takes at most 5 extension bytes; the store of a code writes 16 bytes at
        // most past the codes before it, that of a block of sixteen 64.
        let row_slack = 5 * w + 64;
        let start = self.lead.len();
        let mut lead = std::mem::take(&mut self.lead);
        let mut ext = std::mem::take(&mut self.ext);
        lead.resize(start + ids.len() / k * w, 0);
        let mut used = self.used;
        let mut ok = true;
        let mut n = start;
        for (row, out) in ids.chunks_exact(k).zip(lead[start..].chunks_exact_mut(w)) {
            if used + row_slack > ext.len() {
                ext.resize((used + row_slack) * 2, 0);
            }
            let Some(row_ids) = row.get(cols.clone()) else {
                ok = false;
                break;
            };
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the running CPU has AVX-512F, BW, VBMI2 and POPCNT
                // (has_avx512_vbmi2), the features the function is compiled for (it checks
                // its other preconditions itself).
                if !unsafe {
                    simd_codes::put_row_avx512(row_ids, rank_of, out, &mut ext, &mut used)
                } {
                    ok = false;
                    break;
                }
                n += w;
                continue;
            }
            for (slot, &id) in out.iter_mut().zip(row_ids) {
                match rank_of.get(id as usize) {
                    Some(&r) => put_code(r.into(), slot, &mut ext, &mut used),
                    None => ok = false,
                }
            }
            n += w;
        }
        lead.truncate(n);
        self.lead = lead;
        self.ext = ext;
        self.used = used;
        ok
    }

    /// The lead and extension streams.
    pub fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        self.ext.truncate(self.used);
        (self.lead, self.ext)
    }
}

/// Whether the CPU has what the rank codes' 16-lane paths use: AVX-512 F, BW and VBMI2
/// (byte compress and expand), BMI2 and POPCNT.
#[cfg(target_arch = "x86_64")]
fn has_avx512_vbmi2() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vbmi2")
        && std::is_x86_feature_detected!("bmi2")
        && std::is_x86_feature_detected!("popcnt")
}

/// Write the code of rank `r`: its lead byte to `slot`, its extension to `ext` at `*used`
/// (advanced by the extension's length). One- and two-byte codes take no branch on the data:
/// a byte is stored at `*used` either way and only long codes keep it. Stores past `ext`'s
/// end are dropped (the callers keep 5 bytes of slack per code).
#[inline(always)]
fn put_code(r: u32, slot: &mut u8, ext: &mut [u8], used: &mut usize) {
    if r >= ONE_BYTE + TWO_BYTE_SPAN {
        *slot = ESCAPE;
        let mut v = r - ONE_BYTE - TWO_BYTE_SPAN;
        while v >= 0x80 {
            if let Some(b) = ext.get_mut(*used) {
                *b = (v as u8) | 0x80;
            }
            *used += 1;
            v >>= 7;
        }
        if let Some(b) = ext.get_mut(*used) {
            *b = v as u8;
        }
        *used += 1;
        return;
    }
    let long = r >= ONE_BYTE;
    let v = r.wrapping_sub(ONE_BYTE);
    *slot = if long { (ONE_BYTE + (v >> 8)) as u8 } else { r as u8 };
    if let Some(b) = ext.get_mut(*used) {
        *b = v as u8;
    }
    *used += usize::from(long);
}

/// An entry of a dense rank table: two-byte ranks (chunks of at most 2^16 distinct ids) or
/// four-byte ones.
pub trait RankEntry: Copy + Into<u32> {
    /// True for two-byte entries.
    const TWO: bool;
}

impl RankEntry for u16 {
    const TWO: bool = true;
}

impl RankEntry for u32 {
    const TWO: bool = false;
}

#[cfg(target_arch = "x86_64")]
mod simd_codes {
    use std::arch::x86_64::*;

    use super::{ESCAPE, ONE_BYTE, RankEntry, TWO_BYTE_SPAN, put_code};

    /// Extension bytes a block may store past the codes before it (one 64-byte store).
    pub(super) const BLOCK_SLACK: usize = 64;

    /// The codes of the ranks of `row_ids` (looked up in `table`) sixteen at a time: lead
    /// bytes into `lead` (one per id), extensions appended to `ext` at `*used`. Escapes of
    /// up to three varint bytes (ranks below 2^21 + 8160: every rank of a chunk with fewer
    /// distinct ids) are written in the block too; a block with a longer one goes through
    /// [`put_code`]. Each lane's extension (0 to 3 bytes) is laid out in its own 4 bytes,
    /// and one byte compress packs them, in order, for one store.
    ///
    /// False (codes partly written) when an id is past the table, or when the table is not
    /// 2 to 2^31 entries long, or the buffers are shorter than one lead byte per id and 5
    /// extension bytes per id plus [`BLOCK_SLACK`] past `*used`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub(super) fn put_row_avx512<R: RankEntry>(
        row_ids: &[u32],
        table: &[R],
        lead: &mut [u8],
        ext: &mut [u8],
        used: &mut usize,
    ) -> bool {
        let len = table.len();
        if lead.len() != row_ids.len()
            || !(2..=1 << 31).contains(&len)
            || ext.len() < *used + 5 * row_ids.len() + BLOCK_SLACK
        {
            return false;
        }
        let set = |x: u32| _mm512_set1_epi32(x as i32);
        // len <= 2^31: every id below it, and len - 2, is a non-negative i32.
        let (limit, last_pair) = (set(len as u32), set(len as u32 - 2));
        let one_byte = set(ONE_BYTE);
        let escape_from = set(ONE_BYTE + TWO_BYTE_SPAN);
        let three_bytes_past = set(ONE_BYTE + TWO_BYTE_SPAN + (1 << 21));
        let (low7, low8, low16, one) = (set(0x7f), set(0xff), set(0xffff), set(1));
        // Byte i of a lane: i, against the lane's extension length.
        let byte_of_lane = set(0x0302_0100);
        for (i16, l16) in row_ids.chunks(16).zip(lead.chunks_mut(16)) {
            let n = i16.len().min(l16.len());
            let lanes: __mmask16 = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
            // SAFETY: the masked load reads only the first n lanes, all inside `i16`.
            let id = unsafe { _mm512_maskz_loadu_epi32(lanes, i16.as_ptr().cast()) };
            if _mm512_mask_cmplt_epu32_mask(lanes, id, limit) != lanes {
                return false;
            }
            // Inactive lanes hold rank 0 (a one-byte code without extension).
            let r = if R::TWO {
                // Four bytes are read per lane: at the id's entry, or for the last entry
                // at the one before it (then its high half), so that no read passes the
                // table's end.
                let at = _mm512_min_epu32(id, last_pair);
                // SAFETY: for the active lanes `at <= len - 2`, so the 4 bytes read at
                // `2 at` lie inside the table's `2 len` bytes; inactive lanes read nothing.
                let pair = unsafe {
                    _mm512_mask_i32gather_epi32::<2>(
                        _mm512_setzero_si512(),
                        lanes,
                        at,
                        table.as_ptr().cast(),
                    )
                };
                let shift = _mm512_slli_epi32::<4>(_mm512_sub_epi32(id, at));
                _mm512_and_si512(_mm512_srlv_epi32(pair, shift), low16)
            } else {
                // SAFETY: the active lanes' ids are below `len`: each 4-byte read lies
                // inside the table; inactive lanes read nothing.
                unsafe {
                    _mm512_mask_i32gather_epi32::<4>(
                        _mm512_setzero_si512(),
                        lanes,
                        id,
                        table.as_ptr().cast(),
                    )
                }
            };
            if _mm512_cmpge_epu32_mask(r, three_bytes_past) != 0 {
                for (slot, &id) in l16.iter_mut().zip(i16) {
                    // Every id of the block was checked to be below `len`.
                    let Some(&r) = table.get(id as usize) else { return false };
                    put_code(r.into(), slot, ext, used);
                }
                continue;
            }
            let escape = _mm512_cmpge_epu32_mask(r, escape_from);
            let long = _mm512_cmpge_epu32_mask(r, one_byte) & !escape;
            // Two-byte codes: lead 224 + (v >> 8), extension v & 0xff.
            let v = _mm512_sub_epi32(r, one_byte);
            let two = _mm512_add_epi32(one_byte, _mm512_srli_epi32::<8>(v));
            let codes = _mm512_mask_blend_epi32(long, r, two);
            let codes = _mm512_mask_mov_epi32(codes, escape, set(u32::from(ESCAPE)));
            // Escapes: the varint of e = r - 8160 < 2^21, in 1 to 3 bytes.
            let e = _mm512_sub_epi32(r, escape_from);
            let c0 = _mm512_cmpge_epu32_mask(e, set(1 << 7));
            let c1 = _mm512_cmpge_epu32_mask(e, set(1 << 14));
            let b0 = _mm512_mask_or_epi32(_mm512_and_si512(e, low7), c0, e, set(0x80));
            let b0 = _mm512_and_si512(b0, low8);
            let b1 = _mm512_and_si512(_mm512_srli_epi32::<7>(e), low7);
            let b1 = _mm512_mask_or_epi32(b1, c1, b1, set(0x80));
            let b2 = _mm512_srli_epi32::<14>(e);
            let varint = _mm512_or_si512(
                b0,
                _mm512_or_si512(_mm512_slli_epi32::<8>(b1), _mm512_slli_epi32::<16>(b2)),
            );
            let word = _mm512_mask_blend_epi32(escape, _mm512_and_si512(v, low8), varint);
            let varint_len = _mm512_add_epi32(
                one,
                _mm512_add_epi32(_mm512_maskz_mov_epi32(c0, one), _mm512_maskz_mov_epi32(c1, one)),
            );
            let ext_len =
                _mm512_mask_blend_epi32(escape, _mm512_maskz_mov_epi32(long, one), varint_len);
            // The length in every byte of its lane (lengths are below 4).
            let ext_len = _mm512_or_si512(ext_len, _mm512_slli_epi32::<8>(ext_len));
            let ext_len = _mm512_or_si512(ext_len, _mm512_slli_epi32::<16>(ext_len));
            let keep = _mm512_cmplt_epu8_mask(byte_of_lane, ext_len);
            let packed = _mm512_maskz_compress_epi8(keep, word);
            let bytes = _mm512_cvtepi32_epi8(codes);
            let mut lead16 = [0u8; 16];
            // SAFETY: `lead16` holds 16 bytes, the store's width.
            unsafe { _mm_storeu_si128(lead16.as_mut_ptr().cast(), bytes) };
            l16.copy_from_slice(&lead16[..n]);
            let Some(dst) = ext.get_mut(*used..*used + BLOCK_SLACK) else { return false };
            // SAFETY: `dst` holds 64 bytes, the store's width.
            unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), packed) };
            *used += keep.count_ones() as usize;
        }
        true
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

/// Zero bytes after an extension stream, so that the rank decoders can load 64 bytes at any
/// position a valid stream reaches.
const EXT_PAD: usize = 64;

/// The rank of lead byte `b`, reading its extension from `padded` (the stream followed by
/// `EXT_PAD` zero bytes) at `*pos` and advancing it. One- and two-byte codes take no branch
/// on the data (whether a code is long is close to random for rare ids); an escape's varint
/// of more than 3 bytes sets `*long_varint` (the stream is then decoded again by the plain
/// loop of `Table::code`).
#[inline(always)]
fn rank_of(b: u8, padded: &[u8], pos: &mut usize, long_varint: &mut u32) -> u32 {
    let b = u32::from(b);
    if b == u32::from(ESCAPE) {
        // A varint of up to 3 bytes (ranks below 2^21 + 8160). A branch: the position then
        // depends on the extension's bytes, which other codes must not wait for.
        let x = load4(padded, *pos);
        let c0 = (x >> 7) & 1;
        let c1 = c0 & (x >> 15);
        *long_varint |= c1 & (x >> 23);
        *pos += (1 + c0 + c1) as usize;
        let v = (x & 0x7f)
            | ((x >> 1) & 0x3f80 & 0u32.wrapping_sub(c0))
            | ((x >> 2) & 0x1f_c000 & 0u32.wrapping_sub(c1));
        ONE_BYTE + TWO_BYTE_SPAN + v
    } else {
        // The next byte is read either way; the position only advances for long codes.
        let long = u32::from(b >= ONE_BYTE);
        let lo = u32::from(padded.get(*pos).copied().unwrap_or(0));
        // (Wraps for short codes, whose value is not used.)
        let two = ONE_BYTE.wrapping_add((b.wrapping_sub(ONE_BYTE) << 8) | lo);
        *pos += long as usize;
        if long == 1 { two } else { b }
    }
}

thread_local! {
    /// The rank buffer of [`ranks_of`], kept between calls so that it is not zeroed anew
    /// for every stream (every slot is written before it is read).
    static RANKS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Call `f` with the ranks of all codes of `lead`, the extension position after them and
/// the `long_varint` flag of [`rank_of`]. On x86-64 CPUs with SSSE3, sixteen codes at a
/// time.
fn ranks_of<R>(lead: &[u8], padded: &[u8], f: impl FnOnce(&[u32], usize, u32) -> R) -> R {
    let fill = |ranks: &mut [u32]| {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_vbmi2() {
            // SAFETY: the running CPU has AVX-512F, BW, VBMI2, BMI2 and POPCNT
            // (has_avx512_vbmi2), the features the function is compiled for.
            return unsafe { simd_ranks::ranks_avx512(lead, padded, ranks) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("ssse3") && std::is_x86_feature_detected!("popcnt") {
            // SAFETY: the running CPU has SSSE3 and POPCNT, the features the function is
            // compiled for.
            return unsafe { simd_ranks::ranks_ssse3(lead, padded, ranks) };
        }
        ranks_plain(lead, padded, ranks)
    };
    // A stream longer than a few chunks' worth (a record of many thousand positions) gets a
    // buffer of its own, so that no thread keeps one that large.
    if lead.len() > KEPT_RANKS {
        let mut ranks = vec![0u32; lead.len()];
        let (pos, long_varint) = fill(&mut ranks);
        return f(&ranks, pos, long_varint);
    }
    RANKS.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < lead.len() {
            buf.resize(lead.len(), 0);
        }
        let ranks = &mut buf[..lead.len()];
        let (pos, long_varint) = fill(ranks);
        f(ranks, pos, long_varint)
    })
}

/// Write the ids of `ranks` (rows of `w`) into `out` (rows of `k`, the group's slots from
/// `start`): `lut[rank & (lut.len() - 1)]`, `lut.len()` being a power of two. Returns the
/// largest rank, which the caller checks against the table (so the mask never hides a
/// corrupt rank). With AVX-512, sixteen lookups per gather.
fn place(
    lut: &[u32],
    ranks: &[u32],
    w: usize,
    out: &mut [MaybeUninit<u32>],
    k: usize,
    start: usize,
) -> Result<u32> {
    let unfit = || Error::State("id ranks do not fit their rows".into());
    // Rows as wide as their slots (the input ids) are one run: one row, so that the vector
    // path takes them.
    let (w, k) = if w == k && !ranks.is_empty() { (ranks.len(), ranks.len()) } else { (w, k) };
    let rows = ranks.len() / w.max(1);
    if w == 0
        || start + w > k
        || ranks.len() != rows * w
        || out.len() != rows * k
        || !lut.len().is_power_of_two()
    {
        return Err(unfit());
    }
    #[cfg(target_arch = "x86_64")]
    if w >= 8 && lut.len() <= 1 << 31 && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the running CPU has AVX-512F, the one feature the function is compiled
        // for; the table size is its precondition.
        return unsafe { simd_place::place_avx512(lut, ranks, w, out, k, start) }.ok_or_else(unfit);
    }
    let mask = lut.len() - 1;
    let mut max_rank = 0u32;
    for (row, row_ranks) in out.chunks_exact_mut(k).zip(ranks.chunks_exact(w)) {
        let slots = row.get_mut(start..start + w).ok_or_else(unfit)?;
        for (slot, &r) in slots.iter_mut().zip(row_ranks) {
            max_rank = max_rank.max(r);
            slot.write(lut.get(r as usize & mask).copied().unwrap_or(0));
        }
    }
    Ok(max_rank)
}

#[cfg(target_arch = "x86_64")]
mod simd_place {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// [`super::place`] sixteen slots at a time with AVX-512 gathers; None (some slots left
    /// unwritten) when a row has no slots `start..start + w`, which the caller's shape checks
    /// rule out. Precondition (checked by the caller): `lut.len()` is a power of two no
    /// larger than 2^31.
    #[target_feature(enable = "avx512f")]
    pub(super) fn place_avx512(
        lut: &[u32],
        ranks: &[u32],
        w: usize,
        out: &mut [MaybeUninit<u32>],
        k: usize,
        start: usize,
    ) -> Option<u32> {
        // lut.len() <= 2^31, so masked indices are below 2^31: non-negative as i32.
        let mask = _mm512_set1_epi32((lut.len() - 1) as i32);
        let mut max = _mm512_setzero_si512();
        for (row, row_ranks) in out.chunks_exact_mut(k.max(1)).zip(ranks.chunks_exact(w.max(1))) {
            let slots = row.get_mut(start..start + w)?;
            for (r16, s16) in row_ranks.chunks(16).zip(slots.chunks_mut(16)) {
                let n = r16.len().min(s16.len());
                let lanes: __mmask16 = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
                // SAFETY: the masked load reads only the first n lanes, all inside `r16`
                // (masked-off lanes are neither read nor faulted on); the gather reads
                // lut[r & (lut.len() - 1)] for those lanes, inside `lut` (its length is a
                // power of two); the masked store writes only the first n lanes, inside
                // `s16`, whose u32 slots may hold any bit pattern.
                unsafe {
                    let r = _mm512_maskz_loadu_epi32(lanes, r16.as_ptr().cast());
                    max = _mm512_max_epu32(max, r);
                    let idx = _mm512_and_si512(r, mask);
                    let ids = _mm512_mask_i32gather_epi32::<4>(
                        _mm512_setzero_si512(),
                        lanes,
                        idx,
                        lut.as_ptr().cast(),
                    );
                    _mm512_mask_storeu_epi32(s16.as_mut_ptr().cast(), lanes, ids);
                }
            }
        }
        Some(_mm512_reduce_max_epu32(max))
    }
}

/// Longest rank buffer kept per thread (1 MiB).
const KEPT_RANKS: usize = 1 << 18;

/// [`ranks_of`] one code at a time.
fn ranks_plain(lead: &[u8], padded: &[u8], ranks: &mut [u32]) -> (usize, u32) {
    let (mut pos, mut long_varint) = (0usize, 0u32);
    for (r, &b) in ranks.iter_mut().zip(lead) {
        *r = rank_of(b, padded, &mut pos, &mut long_varint);
    }
    (pos, long_varint)
}

#[cfg(target_arch = "x86_64")]
mod simd_ranks {
    use std::arch::x86_64::*;

    use super::{ONE_BYTE, TWO_BYTE_SPAN, load4, rank_of};

    /// The 16 codes of the block at `i`, the `W` stream bytes at `pos` and the block's 16
    /// rank slots, or None when any of them runs past its slice.
    #[inline(always)]
    fn block_at<'a, const W: usize>(
        lead: &'a [u8],
        padded: &'a [u8],
        ranks: &'a mut [u32],
        i: usize,
        pos: usize,
    ) -> Option<(&'a [u8; 16], &'a [u8; W], &'a mut [u32; 16])> {
        let codes = lead.get(i..i + 16)?.try_into().ok()?;
        let window = padded.get(pos..pos + W)?.try_into().ok()?;
        let out = ranks.get_mut(i..i + 16)?.try_into().ok()?;
        Some((codes, window, out))
    }

    /// [`super::ranks_of`] sixteen codes at a time: the extension bytes of a block's long
    /// codes are the next ones of the stream, in order, so each long code's byte is found by
    /// a prefix count of the long codes before it and picked out with one shuffle. A block
    /// is used up to its first escape, which goes through [`rank_of`], and the next block
    /// starts after it; the last codes, and any block too close to the end of `padded` for
    /// a 16-byte load (only a corrupt stream gets there), go through `rank_of` too.
    #[target_feature(enable = "ssse3,popcnt")]
    pub(super) fn ranks_ssse3(lead: &[u8], padded: &[u8], ranks: &mut [u32]) -> (usize, u32) {
        let (mut pos, mut long_varint) = (0usize, 0u32);
        let n = lead.len().min(ranks.len());
        let mut i = 0usize;
        while i + 16 <= n {
            let Some((codes, window, out)) = block_at::<16>(lead, padded, ranks, i, pos) else {
                break;
            };
            // SAFETY: SSSE3 and POPCNT are enabled for this function (the caller checked the
            // CPU); `block` reads exactly the 16 bytes of `codes` and `window` and writes
            // exactly the 64 bytes of `out`, references of those sizes.
            let (long, escapes) = unsafe { block(codes, window, out) };
            // Codes before the first escape (all 16 if none) are done.
            let done = escapes.trailing_zeros().min(16);
            pos += (long & ((1u32 << done) - 1)).count_ones() as usize;
            i += done as usize;
            if done < 16 {
                ranks[i] = rank_of(lead[i], padded, &mut pos, &mut long_varint);
                i += 1;
            }
        }
        for (r, &b) in ranks[i..n].iter_mut().zip(&lead[i..n]) {
            *r = rank_of(b, padded, &mut pos, &mut long_varint);
        }
        (pos, long_varint)
    }

    /// [`super::ranks_of`] sixteen codes at a time, escapes included: each lane's extension
    /// (none for a one-byte code, one byte for a two-byte code, 1 to 3 varint bytes for an
    /// escape) is expanded from the stream into the lane's own 4 bytes by one byte expand,
    /// and the ranks are computed from them for all lanes at once. Only the escapes'
    /// lengths are found one by one (each depends on the bytes before it; a block of a
    /// chunk at V = 128256 holds about one). Varints of more than 3 bytes are cut and
    /// flagged as by [`rank_of`]. The last codes, and any block too close to the end of
    /// `padded` for a 64-byte load (only a corrupt stream gets there), go through `rank_of`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,bmi2,popcnt")]
    pub(super) fn ranks_avx512(lead: &[u8], padded: &[u8], ranks: &mut [u32]) -> (usize, u32) {
        let (mut pos, mut long_varint) = (0usize, 0u32);
        let n = lead.len().min(ranks.len());
        let set = |x: u32| _mm512_set1_epi32(x as i32);
        let (one_byte, escape) = (set(ONE_BYTE), set(255));
        let escape_base = set(ONE_BYTE + TWO_BYTE_SPAN);
        let mut i = 0usize;
        while i + 16 <= n {
            let Some((codes, window, out)) = block_at::<64>(lead, padded, ranks, i, pos) else {
                break;
            };
            // SAFETY: `codes` holds 16 bytes, the load's width.
            let b = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(codes.as_ptr().cast()) });
            let escapes = _mm512_cmpeq_epi32_mask(b, escape);
            let long = _mm512_cmpge_epu32_mask(b, one_byte) & !escapes;
            // SAFETY: `window` holds 64 bytes, the load's width.
            let bytes = unsafe { _mm512_loadu_si512(window.as_ptr().cast()) };
            // Bit 4 i + j of `keep`: byte j of lane i is an extension byte, first as if every
            // escape took 2 (escapes of ranks 8288 to 24543, most of them in chunks of
            // 1024 positions). The scalar mask and position keep the vector work off the
            // chain from one block's position to the next.
            let spread = |m: __mmask16| _pdep_u64(u64::from(m), 0x1111_1111_1111_1111);
            let mut keep = spread(long) | (spread(escapes) * 3);
            let mut escape_bytes = 2 * escapes.count_ones() as usize;
            let mut word = _mm512_maskz_expand_epi8(keep, bytes);
            // The guess holds if every escape's first byte continues and its second ends
            // (the first escape that does not take 2 is where the guess is read, so it
            // fails this test).
            let ends = _mm512_and_si512(word, set(0x8080));
            if _mm512_mask_cmpneq_epi32_mask(escapes, ends, set(0x80)) != 0 {
                keep = spread(long);
                escape_bytes = 0;
                let mut m = u32::from(escapes);
                while m != 0 {
                    let j = m.trailing_zeros();
                    let at =
                        (u32::from(long) & ((1 << j) - 1)).count_ones() as usize + escape_bytes;
                    // at <= 15 + 3 * 15: the 4 bytes lie inside the window.
                    let x = load4(window, at);
                    let c0 = (x >> 7) & 1;
                    let c1 = c0 & (x >> 15);
                    long_varint |= c1 & (x >> 23);
                    let len = 1 + c0 + c1;
                    keep |= ((1u64 << len) - 1) << (4 * j);
                    escape_bytes += len as usize;
                    m &= m - 1;
                }
                word = _mm512_maskz_expand_epi8(keep, bytes);
            }
            // Two-byte codes: ONE_BYTE + ((b - ONE_BYTE) << 8 | low byte).
            let high = _mm512_slli_epi32::<8>(_mm512_sub_epi32(b, one_byte));
            let two = _mm512_add_epi32(one_byte, _mm512_or_si512(high, word));
            // Escapes: the varint's 7-bit groups (bytes past its length are zero).
            let g0 = _mm512_and_si512(word, set(0x7f));
            let g1 = _mm512_and_si512(_mm512_srli_epi32::<1>(word), set(0x3f80));
            let g2 = _mm512_and_si512(_mm512_srli_epi32::<2>(word), set(0x1f_c000));
            let varint = _mm512_or_si512(g0, _mm512_or_si512(g1, g2));
            let r = _mm512_mask_blend_epi32(long, b, two);
            let r = _mm512_mask_blend_epi32(escapes, r, _mm512_add_epi32(escape_base, varint));
            // SAFETY: `out` holds 16 u32, the store's width.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), r) };
            pos += u32::from(long).count_ones() as usize + escape_bytes;
            i += 16;
        }
        for (r, &b) in ranks[i..n].iter_mut().zip(&lead[i..n]) {
            *r = rank_of(b, padded, &mut pos, &mut long_varint);
        }
        (pos, long_varint)
    }

    /// Ranks of 16 codes into `out`, their extension bytes at the start of `window`, as if
    /// none were an escape; returns the masks of the long codes and of the escapes (lane i
    /// in bit i). Ranks from the first escape on are meaningless.
    #[inline]
    #[target_feature(enable = "ssse3,popcnt")]
    unsafe fn block(codes: &[u8; 16], window: &[u8; 16], out: &mut [u32; 16]) -> (u32, u32) {
        // SAFETY: see the caller; every pointer below is one of the three references, read or
        // written within its size.
        unsafe {
            let b = _mm_loadu_si128(codes.as_ptr().cast());
            let escapes = _mm_movemask_epi8(_mm_cmpeq_epi8(b, _mm_set1_epi8(-1))) as u32;
            let e = _mm_loadu_si128(window.as_ptr().cast());
            // b >= ONE_BYTE, unsigned, as a signed comparison of b ^ 0x80.
            let flip = _mm_xor_si128(b, _mm_set1_epi8(i8::MIN));
            let long = _mm_cmpgt_epi8(flip, _mm_set1_epi8(((ONE_BYTE as u8 - 1) ^ 0x80) as i8));
            let ones = _mm_and_si128(long, _mm_set1_epi8(1));
            // Inclusive prefix sums of the long flags, then exclusive: each long code's byte
            // index in the window.
            let mut s = ones;
            s = _mm_add_epi8(s, _mm_slli_si128::<1>(s));
            s = _mm_add_epi8(s, _mm_slli_si128::<2>(s));
            s = _mm_add_epi8(s, _mm_slli_si128::<4>(s));
            s = _mm_add_epi8(s, _mm_slli_si128::<8>(s));
            let lo = _mm_shuffle_epi8(e, _mm_sub_epi8(s, ones));
            let zero = _mm_setzero_si128();
            let one_byte = _mm_set1_epi16(ONE_BYTE as i16);
            // Sixteen-bit lanes: ONE_BYTE + ((b - ONE_BYTE) << 8 | lo) for long codes, b else.
            let ranks16 = |b: __m128i, lo: __m128i, long: __m128i| {
                let two = _mm_add_epi16(
                    _mm_or_si128(_mm_slli_epi16::<8>(_mm_sub_epi16(b, one_byte)), lo),
                    one_byte,
                );
                _mm_or_si128(_mm_and_si128(long, two), _mm_andnot_si128(long, b))
            };
            let r_lo = ranks16(
                _mm_unpacklo_epi8(b, zero),
                _mm_unpacklo_epi8(lo, zero),
                _mm_unpacklo_epi8(long, long),
            );
            let r_hi = ranks16(
                _mm_unpackhi_epi8(b, zero),
                _mm_unpackhi_epi8(lo, zero),
                _mm_unpackhi_epi8(long, long),
            );
            let p = out.as_mut_ptr().cast::<__m128i>();
            _mm_storeu_si128(p, _mm_unpacklo_epi16(r_lo, zero));
            _mm_storeu_si128(p.add(1), _mm_unpackhi_epi16(r_lo, zero));
            _mm_storeu_si128(p.add(2), _mm_unpacklo_epi16(r_hi, zero));
            _mm_storeu_si128(p.add(3), _mm_unpackhi_epi16(r_hi, zero));
            (_mm_movemask_epi8(long) as u32, escapes)
        }
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
        self.decode_all_into(lead, ext, &mut out.spare_capacity_mut()[..lead.len()], loc)?;
        // SAFETY: decode_all_into returned Ok, so it wrote all lead.len() slots of the spare
        // capacity.
        unsafe { out.set_len(lead.len()) };
        Ok(out)
    }

    /// [`Table::decode_all`] into `out`, which must hold exactly one slot per code; every
    /// slot is written when this returns Ok.
    pub fn decode_all_into(
        &self,
        lead: &[u8],
        ext: &[u8],
        out: &mut [MaybeUninit<u32>],
        loc: &Location,
    ) -> Result<()> {
        if out.len() != lead.len() {
            return Err(Error::State(format!("{} id slots for {} codes", out.len(), lead.len())));
        }
        // Rows of width 1: decode_strided writes column 0 of every row, i.e. every slot.
        self.decode_strided(lead, ext, out, 1, 0, 1, loc)
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
        self.decode_rows_into(groups, rows, k, &mut out.spare_capacity_mut()[..n], loc)?;
        // SAFETY: decode_rows_into returned Ok, so it wrote all n slots.
        unsafe { out.set_len(n) };
        Ok(out)
    }

    /// [`Table::decode_rows`] into `out`, which must hold exactly `rows * k` slots; every
    /// slot is written when this returns Ok.
    pub fn decode_rows_into(
        &self,
        groups: &[(Vec<u8>, Vec<u8>); 4],
        rows: usize,
        k: usize,
        out: &mut [MaybeUninit<u32>],
        loc: &Location,
    ) -> Result<()> {
        if Some(out.len()) != rows.checked_mul(k) {
            return Err(Error::State(format!("{} id slots for {rows} rows of {k}", out.len())));
        }
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
            self.decode_strided(lead, ext, out, k, start, w, loc)?;
            covered += w;
        }
        // The groups' column ranges start..start + w are consecutive from 0 (GROUPS), so
        // with `covered == k` they are all k columns, and decode_strided returned Ok for each,
        // which means it wrote its columns of every row: every slot of `out`.
        if covered != k {
            return Err(Error::State(format!("id groups cover {covered} of {k} ranks")));
        }
        Ok(())
    }

    /// Decode one stream of `w` codes per row into columns `start..start + w` of the rows of
    /// `out` (rows of `k`); `lead` holds exactly `w` codes per row of `out`. Returns Ok only
    /// after writing every one of those slots (callers rely on it to skip zeroing `out`).
    ///
    /// Group by group rather than row by row, in two passes: the ranks of the whole stream
    /// ([`ranks_of`], sixteen codes at a time where the CPU allows), then the table lookups
    /// into the rows. The lookups (random reads of a table larger than the L1 cache) are
    /// the larger half.
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
        // The extension padded so that every code can load 16 bytes at its position.
        let mut padded = Vec::with_capacity(ext.len() + EXT_PAD);
        padded.extend_from_slice(ext);
        padded.extend_from_slice(&[0; EXT_PAD]);
        let lut = &self.lut[..];
        let placed = ranks_of(lead, &padded, |ranks, pos, long_varint| {
            let max_rank = place(lut, ranks, w, out, k, start)?;
            Ok((max_rank as usize, pos, long_varint))
        });
        let (max_rank, pos, long_varint) = placed?;
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
/// `DENSE_LIMIT` (a sort is used beyond); once the table is built, each of the chunk's ids
/// has its rank in `ranks16` when the chunk has at most 2^16 distinct ids (a 1024-position
/// chunk at K = 64 has about 12,000 at V = 128256), else in its counter.
///
/// The rank lookups of the encoder and the record check's stamps ([`crate::record::SeenIds`])
/// are random reads over vocabulary-sized tables: at V = 128256 two-byte entries (0.25 MB
/// each) keep both in a 1 MB L2 cache where four-byte ones (0.5 MB each) did not.
#[derive(Default)]
pub struct TableScratch {
    counts: Vec<u32>,
    ranks16: Vec<u16>,
}

const DENSE_LIMIT: usize = 1 << 22;
/// Marks a counter whose id was already collected, where the distinct ids are sorted: that
/// path is taken for chunks of fewer than vocab / 16 <= 2^28 ids, so counts stay below.
const FIRST_SEEN: u32 = 1 << 31;

/// The chunk's id table as the encoder builds it.
pub struct TableEncoder {
    ranks: RankPlace,
    /// Sorted distinct ids, to reset the scratch afterwards.
    distinct: Vec<u32>,
    pub ids_stream: Vec<u8>,
    pub counts_stream: Vec<u8>,
}

/// Where a [`TableEncoder`] keeps the rank of each counted id.
enum RankPlace {
    /// In the scratch's `ranks16`, by id (dense counters, at most 2^16 distinct ids).
    Two,
    /// In the scratch's counters, by id (dense counters, more distinct ids).
    Four,
    /// (id, rank) sorted by id (no dense counters).
    Sparse(Vec<(u32, u32)>),
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
                nonzero_ids(&scratch.counts[..vocab as usize], &mut ids);
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
        let ranks = if dense && distinct.len() <= 1 << 16 {
            if scratch.ranks16.len() < vocab as usize {
                scratch.ranks16.resize(vocab as usize, 0);
            }
            for (rank, &i) in order.iter().enumerate() {
                // rank < distinct.len() <= 2^16.
                scratch.ranks16[distinct[i as usize].0 as usize] = rank as u16;
            }
            RankPlace::Two
        } else if dense {
            for (rank, &i) in order.iter().enumerate() {
                // The counts were copied into `distinct`: each counter now holds its id's
                // rank (one vocabulary-sized table in the cache instead of two).
                scratch.counts[distinct[i as usize].0 as usize] = rank as u32;
            }
            RankPlace::Four
        } else {
            let mut sparse: Vec<(u32, u32)> = distinct.iter().map(|&(id, _)| (id, 0)).collect();
            for (rank, &i) in order.iter().enumerate() {
                sparse[i as usize].1 = rank as u32;
            }
            RankPlace::Sparse(sparse)
        };
        TableEncoder {
            ranks,
            distinct: distinct.into_iter().map(|(id, _)| id).collect(),
            ids_stream,
            counts_stream,
        }
    }

    /// Rank of an id that was counted.
    #[inline]
    pub fn rank(&self, id: u32, scratch: &TableScratch) -> u32 {
        match &self.ranks {
            RankPlace::Two => u32::from(scratch.ranks16[id as usize]),
            RankPlace::Four => scratch.counts[id as usize],
            RankPlace::Sparse(sparse) => match sparse.binary_search_by_key(&id, |e| e.0) {
                Ok(i) => sparse[i].1,
                Err(_) => u32::MAX,
            },
        }
    }

    /// The rank of every id (indexed by id) when the table is dense; valid for the ids
    /// that were counted.
    pub fn dense_ranks<'s>(&self, scratch: &'s TableScratch) -> Option<DenseRanks<'s>> {
        match self.ranks {
            RankPlace::Two => Some(DenseRanks::Two(&scratch.ranks16)),
            RankPlace::Four => Some(DenseRanks::Four(&scratch.counts)),
            RankPlace::Sparse(_) => None,
        }
    }

    /// Leave the scratch all-zero for the next chunk.
    pub fn reset(&self, scratch: &mut TableScratch) {
        if !matches!(self.ranks, RankPlace::Sparse(_)) {
            for &id in &self.distinct {
                scratch.counts[id as usize] = 0;
            }
        }
    }
}

/// A dense table's rank of every id, indexed by id.
pub enum DenseRanks<'s> {
    Two(&'s [u16]),
    Four(&'s [u32]),
}

impl DenseRanks<'_> {
    /// [`RankWriter::put_rows`] with this table.
    pub fn put_rows(
        &self,
        w: &mut RankWriter,
        ids: &[u32],
        k: usize,
        cols: std::ops::Range<usize>,
    ) -> bool {
        match self {
            DenseRanks::Two(r) => w.put_rows(ids, k, cols, r),
            DenseRanks::Four(r) => w.put_rows(ids, k, cols, r),
        }
    }
}

/// Append to `ids` the indices of the non-zero `counts` (fewer than 2^31), in order.
fn nonzero_ids(counts: &[u32], ids: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("popcnt")
        && counts.len() <= 1 << 31
    {
        // SAFETY: the running CPU has AVX-512F and POPCNT, the features the function is
        // compiled for; its precondition on the length was checked above.
        unsafe { simd_scan::nonzero_ids_avx512(counts, ids) };
        return;
    }
    nonzero_ids_baseline(counts, ids, 0);
}

/// [`nonzero_ids`] sixteen counters at a time, the indices numbered from `first`.
fn nonzero_ids_baseline(counts: &[u32], ids: &mut Vec<u32>, first: u32) {
    for (block, c16) in counts.chunks(16).enumerate() {
        if c16.iter().fold(0, |acc, &c| acc | c) != 0 {
            // Without a branch per counter (whether an id occurs is close to random): each
            // id is written, and kept when its count is not 0.
            let mut found = [0u32; 16];
            let mut n = 0usize;
            for (i, &c) in c16.iter().enumerate() {
                found[n & 15] = first + (block * 16 + i) as u32;
                n += usize::from(c != 0);
            }
            ids.extend_from_slice(&found[..n.min(16)]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd_scan {
    use std::arch::x86_64::*;

    /// [`super::nonzero_ids`] with AVX-512: one test and one compress per sixteen counters
    /// (at V = 128256 the scan of the counters was about a third of the table's encoding,
    /// with a scalar loop for every block that holds an id). Precondition (checked by the
    /// caller): `counts.len() <= 2^31`, so every index fits an i32 lane.
    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) fn nonzero_ids_avx512(counts: &[u32], ids: &mut Vec<u32>) {
        let blocks = counts.chunks_exact(16);
        let tail = blocks.remainder();
        let mut index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let sixteen = _mm512_set1_epi32(16);
        for c16 in blocks {
            // SAFETY: `c16` holds exactly 16 u32 (chunks_exact), read unaligned.
            let c = unsafe { _mm512_loadu_si512(c16.as_ptr().cast()) };
            let present = _mm512_test_epi32_mask(c, c);
            if present != 0 {
                ids.reserve(16);
                let spare = ids.spare_capacity_mut();
                let packed = _mm512_maskz_compress_epi32(present, index);
                // SAFETY: after reserve(16) the spare capacity holds at least 16 u32 slots,
                // which the unaligned store writes; the first count_ones (<= 16) of them now
                // hold the indices of the non-zero counters, so the length may cover them.
                unsafe {
                    _mm512_storeu_si512(spare.as_mut_ptr().cast(), packed);
                    ids.set_len(ids.len() + present.count_ones() as usize);
                }
            }
            index = _mm512_add_epi32(index, sixteen);
        }
        super::nonzero_ids_baseline(tail, ids, (counts.len() - tail.len()) as u32);
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
    let (values, counts) = (&values[..n], &counts[..n]);
    // Each output has 16 slots of slack for the vector split's full-width stores.
    let mut out = vec![0u32; n + 16];
    let mut twos = vec![0u32; n + 16];
    let mut rest_values = vec![0u32; n + 16];
    let mut rest_counts = vec![0u32; n + 16];
    let mut outs = [&mut out[..], &mut twos[..], &mut rest_values[..], &mut rest_counts[..]];
    let (n1, n2, nr) = split_by_count(values, counts, &mut outs);
    let (rest_values, rest_counts) = (&rest_values[..nr], &rest_counts[..nr]);
    // Final layout: rest (counting-sorted, decreasing), twos, ones.
    out.truncate(n);
    out.copy_within(0..n1, n - n1);
    out[nr..nr + n2].copy_from_slice(&twos[..n2]);
    let max = rest_counts.iter().copied().max().unwrap_or(0) as usize;
    if max > 4 * nr + 1024 {
        let mut keys: Vec<(u32, usize)> =
            rest_counts.iter().enumerate().map(|(i, &c)| (u32::MAX - c, i)).collect();
        keys.sort_unstable();
        for (o, (_, i)) in out.iter_mut().zip(keys) {
            *o = rest_values[i];
        }
        return out;
    }
    // starts[c] = first output slot of count c, counts taken in decreasing order.
    let mut starts = vec![0u32; max + 1];
    for &c in rest_counts {
        starts[c as usize] += 1;
    }
    let mut acc = 0u32;
    for s in starts.iter_mut().rev() {
        let k = *s;
        *s = acc;
        acc += k;
    }
    for (&v, &c) in rest_values.iter().zip(rest_counts) {
        let slot = &mut starts[c as usize];
        // In bounds: the slots of count c end where those of the next smaller count begin.
        if let Some(o) = out.get_mut(*slot as usize) {
            *o = v;
        }
        *slot += 1;
    }
    out
}

/// Split `values` by their `counts`, keeping their order: those of count 1 to `outs[0]`,
/// of count 2 to `outs[1]`, the others to `outs[2]` with their counts in `outs[3]`; returns
/// the three numbers. Each of `outs` must hold `values.len() + 16` slots (with AVX-512
/// sixteen values go at a time, by compress, and every store is 16 wide).
fn split_by_count(
    values: &[u32],
    counts: &[u32],
    outs: &mut [&mut [u32]; 4],
) -> (usize, usize, usize) {
    let n = values.len().min(counts.len());
    if outs.iter().any(|o| o.len() < n + 16) {
        return (0, 0, 0);
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("popcnt") {
        // SAFETY: the running CPU has AVX-512F and POPCNT, the features the function is
        // compiled for.
        return unsafe { simd_split::split_by_count_avx512(values, counts, outs) };
    }
    split_by_count_from(values, counts, outs, (0, 0, 0))
}

/// [`split_by_count`] one value at a time, from the given numbers already in `outs`.
fn split_by_count_from(
    values: &[u32],
    counts: &[u32],
    outs: &mut [&mut [u32]; 4],
    (mut n1, mut n2, mut nr): (usize, usize, usize),
) -> (usize, usize, usize) {
    let [ones, twos, rest_values, rest_counts] = outs;
    let last = |o: &[u32]| o.len().saturating_sub(1);
    let (l1, l2, lr, lc) = (last(ones), last(twos), last(rest_values), last(rest_counts));
    for (&v, &c) in values.iter().zip(counts) {
        // Each slot is written before its index can move past it, and indices stay inside
        // the outputs (the caller's sizes): at most one of the three advances per value.
        // Without branches: whether an id occurs once is close to random.
        if let (Some(a), Some(b), Some(r), Some(rc)) = (
            ones.get_mut(n1.min(l1)),
            twos.get_mut(n2.min(l2)),
            rest_values.get_mut(nr.min(lr)),
            rest_counts.get_mut(nr.min(lc)),
        ) {
            (*a, *b, *r, *rc) = (v, v, v, c);
        }
        n1 += usize::from(c == 1);
        n2 += usize::from(c == 2);
        nr += usize::from(c > 2);
    }
    (n1, n2, nr)
}

#[cfg(target_arch = "x86_64")]
mod simd_split {
    use std::arch::x86_64::*;

    /// [`super::split_by_count`] sixteen values at a time: three compares and four
    /// compresses, each stored 16 wide at its output's end (the slack covers the lanes past
    /// the kept ones, which the next store overwrites).
    #[target_feature(enable = "avx512f,popcnt")]
    pub(super) fn split_by_count_avx512(
        values: &[u32],
        counts: &[u32],
        outs: &mut [&mut [u32]; 4],
    ) -> (usize, usize, usize) {
        let n = values.len().min(counts.len());
        let (mut n1, mut n2, mut nr) = (0usize, 0usize, 0usize);
        let (one, two) = (_mm512_set1_epi32(1), _mm512_set1_epi32(2));
        let blocks = n / 16;
        for (v16, c16) in values.chunks_exact(16).zip(counts.chunks_exact(16)).take(blocks) {
            // SAFETY: `v16` and `c16` hold exactly 16 u32 (chunks_exact), read unaligned.
            let (v, c) = unsafe {
                (_mm512_loadu_si512(v16.as_ptr().cast()), _mm512_loadu_si512(c16.as_ptr().cast()))
            };
            let m1 = _mm512_cmpeq_epu32_mask(c, one);
            let m2 = _mm512_cmpeq_epu32_mask(c, two);
            let mr = _mm512_cmpgt_epu32_mask(c, two);
            let [ones, twos, rest_values, rest_counts] = &mut *outs;
            let stores = [
                (&mut **ones, n1, _mm512_maskz_compress_epi32(m1, v)),
                (&mut **twos, n2, _mm512_maskz_compress_epi32(m2, v)),
                (&mut **rest_values, nr, _mm512_maskz_compress_epi32(mr, v)),
                (&mut **rest_counts, nr, _mm512_maskz_compress_epi32(mr, c)),
            ];
            for (o, at, x) in stores {
                // Each number is at most the values before this block (<= n - 16), and the
                // outputs hold n + 16: the 16 slots from it are inside.
                let Some(dst) = o.get_mut(at..at + 16) else { return (0, 0, 0) };
                // SAFETY: `dst` holds 16 u32, the store's width.
                unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), x) };
            }
            n1 += m1.count_ones() as usize;
            n2 += m2.count_ones() as usize;
            nr += mr.count_ones() as usize;
        }
        let done = blocks * 16;
        super::split_by_count_from(&values[done..n], &counts[done..n], outs, (n1, n2, nr))
    }
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

    use crate::test_util::xorshift;

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
        /// The lookups of a group's ranks into its rows (sixteen per gather where the CPU has
        /// AVX-512, one at a time elsewhere) against the definition: every slot of the group
        /// written with lut[rank & mask], the others left alone, the largest rank returned.
        #[test]
        fn placed_ids_are_the_table_entries_of_their_ranks(
            lut_log2 in 0u32..13,
            w in 1usize..40,
            extra in 0usize..30,
            start_frac in 0.0f64..1.0,
            rows in 0usize..12,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let lut: Vec<u32> = (0..1u32 << lut_log2).map(|i| i.wrapping_mul(2_654_435_761)).collect();
            let k = w + extra;
            let start = ((extra as f64) * start_frac) as usize;
            let mut x = seed | 1;
            let ranks: Vec<u32> = (0..rows * w)
                .map(|_| {
                    xorshift(&mut x);
                    // Mostly inside the table, some past it (a corrupt stream's).
                    (x % (2 * lut.len() as u64 + 3)) as u32
                })
                .collect();
            let mut out = vec![MaybeUninit::new(7u32); rows * k];
            let max = place(&lut, &ranks, w, &mut out, k, start).unwrap();
            proptest::prop_assert_eq!(max, ranks.iter().copied().max().unwrap_or(0));
            let mask = lut.len() - 1;
            for (row, (slots, rr)) in out.chunks(k).zip(ranks.chunks(w)).enumerate() {
                for (j, slot) in slots.iter().enumerate() {
                    // SAFETY: every slot was initialised (to 7) before the call.
                    let got = unsafe { slot.assume_init() };
                    let want = if (start..start + w).contains(&j) {
                        lut[rr[j - start] as usize & mask]
                    } else {
                        7
                    };
                    proptest::prop_assert_eq!(got, want, "row {} slot {}", row, j);
                }
            }
        }
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        /// The sixteen-codes-at-a-time rank decoder agrees with the one-at-a-time one on any
        /// bytes (escapes anywhere, extension streams too short or too long).
        #[test]
        fn block_ranks_agree_with_plain_ranks(
            lead in proptest::collection::vec(
                proptest::prop_oneof![3 => 0u8..224, 3 => 224u8..255, 1 => proptest::num::u8::ANY,
                                      1 => proptest::strategy::Just(ESCAPE)],
                0..200),
            ext in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        ) {
            let mut padded = ext.clone();
            padded.extend_from_slice(&[0; EXT_PAD]);
            let mut want = vec![0u32; lead.len()];
            let want_end = ranks_plain(&lead, &padded, &mut want);
            let got = ranks_of(&lead, &padded, |r, pos, lv| (r.to_vec(), (pos, lv)));
            proptest::prop_assert_eq!(&got, &(want.clone(), want_end));
            // Each vector path the CPU has, called directly (ranks_of takes the widest).
            #[cfg(target_arch = "x86_64")]
            {
                let mut ranks = vec![0u32; lead.len()];
                if std::is_x86_feature_detected!("ssse3") && std::is_x86_feature_detected!("popcnt") {
                    // SAFETY: the running CPU has the function's features.
                    let end = unsafe { simd_ranks::ranks_ssse3(&lead, &padded, &mut ranks) };
                    proptest::prop_assert_eq!((&ranks, end), (&want, want_end));
                }
                if has_avx512_vbmi2() {
                    ranks.fill(0);
                    // SAFETY: the running CPU has the function's features.
                    let end = unsafe { simd_ranks::ranks_avx512(&lead, &padded, &mut ranks) };
                    proptest::prop_assert_eq!((&ranks, end), (&want, want_end));
                }
            }
        }
    }

    /// Streams longer than the kept buffer take a buffer of their own, with the same ranks;
    /// the kept buffer serves shorter streams after them.
    #[test]
    fn long_streams_take_their_own_rank_buffer() {
        let n = KEPT_RANKS + 17;
        let lead: Vec<u8> = (0..n).map(|i| (i * 7919 % 256) as u8).collect();
        let mut padded: Vec<u8> = (0..n).map(|i| (i * 31 % 256) as u8).collect();
        padded.extend_from_slice(&[0; EXT_PAD]);
        for len in [n, 100, n] {
            let mut want = vec![0u32; len];
            let want_end = ranks_plain(&lead[..len], &padded, &mut want);
            let got = ranks_of(&lead[..len], &padded, |r, pos, lv| (r.to_vec(), (pos, lv)));
            assert_eq!(got, (want, want_end), "{len} codes");
        }
        RANKS.with(|b| assert!(b.borrow().len() <= KEPT_RANKS));
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

    proptest::proptest! {
        /// The chunk's table against counting with a map, on both ways of finding the
        /// distinct ids (a scan of the counters when the chunk is large against the
        /// vocabulary, a sort otherwise): ranks by decreasing count then increasing id, and
        /// streams that decode to that order.
        #[test]
        fn table_matches_counting_with_a_map(
            vocab in 1u32..5000,
            n in 0usize..3000,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let ids: Vec<u32> = (0..n)
                .map(|_| {
                    xorshift(&mut x);
                    // Skewed, so that counts differ and many ids never occur.
                    let r = (x % u64::from(vocab)) as u32;
                    if x >> 60 < 12 { r % (vocab / 8 + 1) } else { r }
                })
                .collect();
            let mut counts = std::collections::BTreeMap::<u32, u32>::new();
            for &id in &ids {
                *counts.entry(id).or_default() += 1;
            }
            let mut want: Vec<(u32, u32)> = counts.into_iter().collect();
            want.sort_by_key(|&(id, c)| (std::cmp::Reverse(c), id));
            let mut scratch = TableScratch::default();
            let t = TableEncoder::new(&[&ids], vocab, &mut scratch);
            for (rank, &(id, _)) in want.iter().enumerate() {
                proptest::prop_assert_eq!(t.rank(id, &scratch), rank as u32);
            }
            t.reset(&mut scratch);
            proptest::prop_assert!(scratch.counts.iter().all(|&c| c == 0));
            let table = decode_table(&t.ids_stream, &t.counts_stream, n as u64, vocab, &Location::default());
            let table = table.map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert_eq!(table.ids(), &want.iter().map(|&(id, _)| id).collect::<Vec<_>>()[..]);
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

    #[test]
    fn chunks_of_more_than_two_to_the_sixteen_distinct_ids_keep_four_byte_ranks() {
        // 70,000 distinct ids (each once, so ranked by id) and id 5 twice more: ranks past
        // 2^16 do not fit the two-byte table.
        let vocab = 80_000u32;
        let mut ids: Vec<u32> = (0..70_000).collect();
        ids.extend([5, 5]);
        let mut scratch = TableScratch::default();
        let t = TableEncoder::new(&[&ids], vocab, &mut scratch);
        assert!(matches!(t.ranks, RankPlace::Four));
        assert_eq!(t.rank(5, &scratch), 0);
        assert_eq!(t.rank(0, &scratch), 1);
        assert_eq!(t.rank(69_999, &scratch), 69_999);
        let Some(DenseRanks::Four(r)) = t.dense_ranks(&scratch) else {
            panic!("a dense table of 70,000 ids has four-byte ranks");
        };
        assert_eq!((r[5], r[66_000]), (0, 66_000));
        t.reset(&mut scratch);
        assert!(scratch.counts.iter().all(|&c| c == 0));
        // The same scratch, then a chunk of few ids: two-byte ranks.
        let t = TableEncoder::new(&[&[9, 9, 4]], vocab, &mut scratch);
        assert!(matches!(t.dense_ranks(&scratch), Some(DenseRanks::Two(_))));
        assert_eq!([9, 4].map(|id| t.rank(id, &scratch)), [0, 1]);
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
            // The split (sixteen at a time where the CPU has AVX-512) and the scalar loop
            // alone give the same parts.
            let values: Vec<u32> = distinct.iter().map(|&(id, _)| id).collect();
            let n = values.len();
            let split = |vector: bool| {
                let mut bufs: [Vec<u32>; 4] = std::array::from_fn(|_| vec![u32::MAX; n + 16]);
                let [a, b, c, d] = &mut bufs;
                let mut outs = [&mut a[..], &mut b[..], &mut c[..], &mut d[..]];
                let (n1, n2, nr) = if vector {
                    split_by_count(&values, &counts, &mut outs)
                } else {
                    split_by_count_from(&values, &counts, &mut outs, (0, 0, 0))
                };
                [n1, n2, nr, nr].iter().zip(&bufs).map(|(&m, b)| b[..m].to_vec()).collect::<Vec<_>>()
            };
            let parts = |keep: &dyn Fn(u32) -> bool, of_counts: bool| -> Vec<u32> {
                distinct.iter().filter(|&&(_, c)| keep(c))
                    .map(|&(id, c)| if of_counts { c } else { id }).collect()
            };
            let want_parts = vec![
                parts(&|c| c == 1, false),
                parts(&|c| c == 2, false),
                parts(&|c| c > 2, false),
                parts(&|c| c > 2, true),
            ];
            proptest::prop_assert_eq!(split(true), want_parts.clone());
            proptest::prop_assert_eq!(split(false), want_parts);
        }

        /// The strided writer of a dense table (sixteen ids at a time where the CPU has
        /// AVX-512 and a row has 8 or more) writes the codes `put_rank` defines (one- and
        /// two-byte codes, escapes of every varint length, blocks with and without
        /// escapes, every table length from 2, the last entry included), after what the
        /// writer already holds; an id past the table is refused.
        #[test]
        fn put_rows_writes_the_codes_of_put_rank(
            k in 1usize..70,
            rows in 0usize..24,
            a_frac in 0.0f64..1.0,
            b_frac in 0.0f64..1.0,
            table_len in proptest::prop_oneof![2usize..5, 2usize..400],
            escapes in proptest::prelude::any::<bool>(),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let mut next = move || xorshift(&mut x);
            // Ranks of every size class: one byte, two bytes, escapes of 1 to 5 varint bytes
            // (none in some tables, so that whole blocks take the vector path).
            let classes = if escapes { 4 } else { 2 };
            let rank_of: Vec<u32> = (0..table_len)
                .map(|_| match next() % classes {
                    0 => (next() % u64::from(ONE_BYTE)) as u32,
                    1 => (next() % u64::from(ONE_BYTE + TWO_BYTE_SPAN)) as u32,
                    2 => (next() % (1 << 22)) as u32,
                    _ => next() as u32,
                })
                .collect();
            let ids: Vec<u32> = (0..rows * k).map(|_| (next() % table_len as u64) as u32).collect();
            let a = (a_frac * k as f64) as usize;
            let b = a + ((k - a) as f64 * b_frac) as usize;
            let before = [5, 9000, 1 << 30];
            let want = |ranks: &[u32]| {
                let (mut lead, mut ext) = (Vec::new(), Vec::new());
                for &r in before.iter().chain(ids.chunks(k).flat_map(|row| {
                    row[a..b].iter().map(|&id| &ranks[id as usize])
                })) {
                    put_rank(&mut lead, &mut ext, r);
                }
                (lead, ext)
            };
            let mut fast = RankWriter::with_capacity(3);
            fast.put_all(before);
            proptest::prop_assert!(fast.put_rows(&ids, k, a..b, &rank_of));
            proptest::prop_assert_eq!(fast.finish(), want(&rank_of));
            let rank16: Vec<u16> = rank_of.iter().map(|&r| r as u16).collect();
            let mut two = RankWriter::default();
            two.put_all(before);
            proptest::prop_assert!(two.put_rows(&ids, k, a..b, &rank16));
            let ranks: Vec<u32> = rank16.iter().map(|&r| u32::from(r)).collect();
            proptest::prop_assert_eq!(two.finish(), want(&ranks));
            if rows > 0 && b > a {
                let mut past = ids.clone();
                past[a] = table_len as u32;
                proptest::prop_assert!(!RankWriter::default().put_rows(&past, k, a..b, &rank_of));
                proptest::prop_assert!(!RankWriter::default().put_rows(&past, k, a..b, &rank16));
            }
        }

        /// The scan of the counters (AVX-512 where the CPU has it, else the baseline; the
        /// baseline is also run directly) appends exactly the indices of the non-zero
        /// counters, in order, whatever the density and the length's tail.
        #[test]
        fn nonzero_ids_are_the_indices_of_the_nonzero_counters(
            len in 0usize..400,
            sparsity in 0u32..6,
            first in 0u32..1000,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let counts: Vec<u32> = (0..len)
                .map(|_| {
                    xorshift(&mut x);
                    // Zero with probability about 1 - 2^-sparsity; any value otherwise.
                    if (x >> 40) % (1 << sparsity) == 0 { (x >> 8) as u32 | 1 } else { 0 }
                })
                .collect();
            let nonzero = counts.iter().enumerate().filter(|&(_, &c)| c != 0);
            let want: Vec<u32> =
                std::iter::once(7).chain(nonzero.clone().map(|(i, _)| i as u32)).collect();
            let mut got = vec![7u32];
            nonzero_ids(&counts, &mut got);
            proptest::prop_assert_eq!(&got, &want);
            let want_from: Vec<u32> = nonzero.map(|(i, _)| first + i as u32).collect();
            let mut base = Vec::new();
            nonzero_ids_baseline(&counts, &mut base, first);
            proptest::prop_assert_eq!(base, want_from);
        }
    }
}
