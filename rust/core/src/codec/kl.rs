//! The KL-bounded log-probability codec (`kl:<bound>`, top-K stores).
//!
//! Error in an entry of tiny probability costs little divergence, and that is where most
//! bytes go. So the quantization step grows along the row: entry j >= 1 is stored as a
//! whole number of steps from the previous *decoded* value, with a step that doubles every
//! 1.5 nats of decoded -logprob (about 2 ln 2, the rate that keeps each entry's share of the
//! divergence, about p err^2 / 2, level). The top entry gets its own, finer precision: when
//! the rest of the vocabulary holds little mass the divergence is first order in its error.
//!
//! Per row the writer picks a base step `2^-b` (b in 2..=10) and `e` extra bits for the top
//! entry (e in {0, 4, 8, 12}), trying coarse settings first, rounds every value to the
//! nearest point of its grid, and computes in float64 KL(P || P_decoded) over the K entries
//! plus the rest bucket `max(0, 1 - sum)` from exactly the values a reader will decode (in
//! the generalized form `sum p ln(p/q) - sum p + sum q`, which also charges decoded mass
//! above 1, and is the usual KL when both rows sum to 1). The
//! first setting within the bound is kept; a row that none satisfies is stored losslessly.
//! The guarantee is therefore checked, not estimated.
//!
//! Levels are integers in units of `u = 2^-(b+e)` nats; a level L decodes to the float32
//! nearest to `-(L * u)` (computed exactly in float64, then rounded: the same bits on every
//! platform).

use crate::codec::bytes::{self, ByteReader};
use crate::codec::logprobs::PAIRED_GROUP;
use crate::codec::pairs::{self, PairReader};
use crate::error::{Error, Location, Result};

/// Base step exponents b tried, coarse first.
pub const B_MIN: u8 = 2;
pub const B_MAX: u8 = 10;
/// Extra precision bits of the top entry, by index (the high nibble of the row mode).
pub const TOP_EXTRA: [u8; 4] = [0, 4, 8, 12];
/// Row mode of a row stored losslessly.
pub const LOSSLESS_ROW: u8 = 255;
/// Largest band: the step never grows beyond `2^-b * 2^MAX_BAND`.
pub const MAX_BAND: u32 = 12;
/// Largest decoded -logprob, in nats; anything beyond is stored as -inf (its probability is
/// 0 in float32 and float64).
pub const MAX_NATS: u64 = 1 << 20;

/// Row mode byte of base exponent `b` and top-entry extra-bits index `ei`.
#[inline]
pub fn mode(b: u8, ei: usize) -> u8 {
    b | ((ei as u8) << 4)
}

/// (b, e) of a row mode, or None for modes that are not defined.
#[inline]
pub fn parse_mode(m: u8) -> Option<(u8, u8)> {
    let b = m & 0x0f;
    let ei = (m >> 4) as usize;
    ((B_MIN..=B_MAX).contains(&b) && ei < TOP_EXTRA.len()).then(|| (b, TOP_EXTRA[ei]))
}

/// Band of the entry after one at level `l` (units 2^-(b+e)): `floor(l u / 1.5)`, capped.
#[inline]
pub fn band(l: u64, shift: u32) -> u32 {
    // l * 2^-shift / (3/2) = 2 l / (3 2^shift) = floor(floor(2 l / 2^shift) / 3) (nested
    // floors of positive divisions); a shift and a division by the constant 3 (a multiply)
    // instead of a 64-bit division, which sat on the encoder's critical path. Levels never
    // exceed 2^(20 + shift) <= 2^42.
    let b = (l.saturating_mul(2) >> shift.min(63)) / 3;
    b.min(u64::from(MAX_BAND)) as u32
}

/// Round a non-negative float to the nearest integer (half up) without a libm call. The
/// values rounded here are at most 2^42 (levels), so through i64: one instruction each way
/// where u64 takes several.
#[inline]
fn round_nonneg(x: f64) -> u64 {
    let q = (x + 0.5) as i64;
    (if q as f64 - x > 0.5 { q - 1 } else { q }) as u64
}

/// The float32 value of level `l` at unit 2^-shift. Levels never exceed `max_level`
/// (2^42; the encoder and the decoder both check), so the conversion goes through i64,
/// exact either way and one instruction where u64 takes several.
#[inline]
pub fn dequantize(l: u64, shift: u32) -> f32 {
    (-(l as i64 as f64) * f64::from_bits((1023 - u64::from(shift)) << 52)) as f32
}

/// Largest level allowed at unit 2^-shift.
#[inline]
fn max_level(shift: u32) -> u64 {
    MAX_NATS << shift
}

/// Quantize a sorted row at (b, e); returns the count of finite entries (the rest decode to
/// -inf). `numbers` receives the coded numbers, `levels` the levels.
///
/// By definition entry j >= 1 is `l_j = l_{j-1} + m k`, with `m = 2^(e + band(l_{j-1}))`
/// and `k = round(max(0, (x_j - l_{j-1}) / m))` (half up): a chain in which every entry
/// waits for the previous one, once per setting the search tries. While the band stays
/// the same, m does, and every level of the band is `a + (multiple of m)` for the band's
/// first level a, so `l_j = a + m round(max(0, (x_j - a) / m))`, clamped to at least
/// `l_{j-1}`: the same integer (x_j and the levels are exact in float64, so `(x_j - l_{j-1})
/// / m` is exactly `(x_j - a) / m` minus a whole number, and rounding half up commutes with
/// whole numbers; when the definition clamps at 0, so does this, at `l_{j-1}`). The levels
/// of a band then no longer depend on each other, only the band's end does. The test
/// `segments_match_the_chain` checks the equality against the definition.
fn quantize_row(row: &[f32], b: u8, e: u8, levels: &mut Vec<u64>, numbers: &mut Vec<u64>) -> usize {
    levels.clear();
    numbers.clear();
    let shift = u32::from(b) + u32::from(e);
    let inv_u = (shift as f64).exp2();
    let top = max_level(shift);
    let Some(&v0) = row.first() else { return 0 };
    if v0 == f32::NEG_INFINITY {
        return 0;
    }
    let x0 = (-f64::from(v0)).max(0.0) * inv_u;
    // Beyond the largest level (probability 0 in float64) the row ends here; checking
    // before rounding keeps the integer arithmetic below from saturating or wrapping.
    if x0 > top as f64 {
        return 0;
    }
    let l0 = round_nonneg(x0);
    if l0 > top {
        return 0;
    }
    levels.push(l0);
    numbers.push(l0);
    let mut prev = l0;
    let mut j = 1;
    while j < row.len() {
        let seg_band = band(prev, shift);
        let steps = u32::from(e) + seg_band;
        let m = 1u64 << steps;
        // Times 2^-steps: the same value as dividing by m, without a division.
        let inv_m = f64::from_bits((1023 - u64::from(steps)) << 52);
        let anchor = prev;
        let anchor_f = anchor as f64;
        // The first level of the next band: band(l) > seg_band exactly when 2 l >=
        // 3 (seg_band + 1) 2^shift (shift >= 2); none past the last band.
        let band_end = if seg_band < MAX_BAND {
            (3 * u64::from(seg_band + 1)) << (shift - 1)
        } else {
            u64::MAX
        };
        while j < row.len() {
            let v = row[j];
            if v == f32::NEG_INFINITY {
                return levels.len();
            }
            let x = (-f64::from(v)).max(0.0) * inv_u;
            if x > top as f64 {
                return levels.len();
            }
            let k = round_nonneg(((x - anchor_f) * inv_m).max(0.0));
            let l = (anchor + k * m).max(prev);
            if l > top {
                return levels.len();
            }
            levels.push(l);
            numbers.push((l - prev) >> steps);
            prev = l;
            j += 1;
            if l >= band_end {
                break;
            }
        }
    }
    levels.len()
}

/// [`row_kl`] with the decoded probabilities from a cheap exponential (0.02% error), in one
/// pass without branches: a screen that lets the search skip settings far outside the
/// bound before paying for the exact check.
fn row_kl_screen(row: &[f32], probs: &[f64], levels: &[u64], shift: u32) -> f64 {
    let n = levels.len().min(row.len());
    // Entries past the decoded ones decode to probability 0: infinite unless theirs is 0.
    if probs[n..].iter().any(|&p| p > 0.0) {
        return f64::INFINITY;
    }
    let (mut kl, mut sum_p, mut sum_q) = (0.0f64, 0.0f64, 0.0f64);
    let mut lost = false;
    for ((&v, &p), &l) in row[..n].iter().zip(&probs[..n]).zip(&levels[..n]) {
        let lq = f64::from(dequantize(l, shift));
        let q = f64::from(crate::record::approx_exp(lq as f32));
        sum_p += p;
        sum_q += q;
        kl += p * (f64::from(v) - lq);
        lost |= p > 0.0 && q == 0.0;
    }
    if lost {
        return f64::INFINITY;
    }
    kl_with_rest(kl, sum_p, sum_q)
}

/// The generalized divergence from `sum p ln(p/q)` over the entries and the two rows'
/// sums, adding the rest buckets.
fn kl_with_rest(kl: f64, sum_p: f64, sum_q: f64) -> f64 {
    let p_rest = (1.0 - sum_p).max(0.0);
    let q_rest = (1.0 - sum_q).max(0.0);
    let mut kl = kl;
    if p_rest > 0.0 {
        if q_rest == 0.0 {
            return f64::INFINITY;
        }
        kl += p_rest * (p_rest / q_rest).ln();
    }
    // Rounding can push a decoded row's mass above 1 (its rest bucket is then 0): the
    // generalized divergence sum p ln(p/q) - sum p + sum q charges that excess and stays
    // >= 0; it is the usual KL when both rows, rest bucket included, sum to 1.
    kl - (sum_p + p_rest) + (sum_q + q_rest)
}

/// KL(P || P_decoded) over the row's entries plus the rest bucket, in float64, from exactly
/// the values a reader decodes; `probs` are the written probabilities (exp of `row`),
/// computed once per row.
fn row_kl(row: &[f32], probs: &[f64], levels: &[u64], shift: u32) -> f64 {
    let mut kl = 0.0f64;
    let mut sum_p = 0.0f64;
    let mut sum_q = 0.0f64;
    for (j, (&v, &p)) in row.iter().zip(probs).enumerate() {
        sum_p += p;
        let lq = levels.get(j).map(|&l| f64::from(dequantize(l, shift)));
        let q = lq.map_or(0.0, f64::exp);
        sum_q += q;
        if p > 0.0 {
            match lq {
                Some(lq) if q > 0.0 => kl += p * (f64::from(v) - lq),
                _ => return f64::INFINITY,
            }
        }
    }
    kl_with_rest(kl, sum_p, sum_q)
}

/// Encoded rows: per-row modes, coded numbers by group, lossless rows, finite counts.
pub struct Encoded {
    pub modes: Vec<u8>,
    pub leads: [Vec<u8>; 4],
    pub exts: [Vec<u8>; 4],
    pub lossless: Vec<u32>,
    pub finite: Vec<u8>,
    pub any_nonfinite: bool,
}

/// Encode sorted top-K rows of width `k` under the KL bound.
pub fn encode(lp: &[f32], k: usize, bound: f64) -> Encoded {
    let mut out = Encoded {
        modes: Vec::with_capacity(lp.len() / k.max(1)),
        leads: Default::default(),
        exts: Default::default(),
        lossless: Vec::new(),
        finite: Vec::new(),
        any_nonfinite: false,
    };
    let (mut levels, mut numbers) = (Vec::with_capacity(k), Vec::with_capacity(k));
    let mut probs = Vec::with_capacity(k);
    let mut prev_b = B_MIN;
    // The numbers and finite count of the last setting that fit: the one chosen.
    let mut kept: Vec<u64> = Vec::with_capacity(k);
    for row in lp.chunks_exact(k.max(1)) {
        probs.clear();
        probs.extend(row.iter().map(|&v| f64::from(v).exp()));
        let mut kept_finite = 0;
        let mut ok = |b: u8, ei: usize| {
            let e = TOP_EXTRA[ei];
            let finite = quantize_row(row, b, e, &mut levels, &mut numbers);
            let shift = u32::from(b) + u32::from(e);
            let fits = row_kl_screen(row, &probs, &levels, shift) <= 2.0 * bound
                && row_kl(row, &probs, &levels, shift) <= bound;
            if fits {
                kept.clone_from(&numbers);
                kept_finite = finite;
            }
            fits
        };
        let first_fit = |ok: &mut dyn FnMut(u8, usize) -> bool, b: u8| {
            (0..TOP_EXTRA.len()).find(|&ei| ok(b, ei))
        };
        // Neighbouring rows behave alike: start one step coarser than the previous row and
        // go finer until a setting fits; if the start fits, try coarser still.
        let start = prev_b.saturating_sub(1).max(B_MIN);
        let mut chosen = None;
        for b in start..=B_MAX {
            if let Some(ei) = first_fit(&mut ok, b) {
                chosen = Some((b, ei));
                break;
            }
        }
        if let Some((b, _)) = chosen
            && b == start
        {
            let mut b = start;
            while b > B_MIN {
                match first_fit(&mut ok, b - 1) {
                    Some(ei) => {
                        chosen = Some((b - 1, ei));
                        b -= 1;
                    }
                    None => break,
                }
            }
        }
        match chosen {
            Some((b, ei)) => {
                let (finite, numbers) = (kept_finite, &kept);
                out.modes.push(mode(b, ei));
                prev_b = b;
                let paired = super::ids::GROUPS[PAIRED_GROUP].0.min(numbers.len());
                for (j, &n) in numbers[..paired].iter().enumerate() {
                    let g = super::ids::group_of(j);
                    put_number(&mut out.leads[g], &mut out.exts[g], n);
                }
                let (lead, ext) = (&mut out.leads[PAIRED_GROUP], &mut out.exts[PAIRED_GROUP]);
                pairs::put_row(lead, ext, &numbers[paired..]);
                if finite < row.len() {
                    out.any_nonfinite = true;
                }
                bytes::put_varint(&mut out.finite, finite as u64);
            }
            None => {
                out.modes.push(LOSSLESS_ROW);
                let mut prev = 0u32;
                for &v in row {
                    out.lossless.push(v.to_bits() ^ prev);
                    prev = v.to_bits();
                }
                bytes::put_varint(&mut out.finite, row.len() as u64);
            }
        }
    }
    out
}

#[inline]
fn put_number(lead: &mut Vec<u8>, ext: &mut Vec<u8>, v: u64) {
    if v < 255 {
        lead.push(v as u8);
    } else {
        lead.push(255);
        bytes::put_varint(ext, v - 255);
    }
}

/// The decoder's levels of one row: entry j >= 1 is `l_{j-1} + n m` with `m = 2^(e +
/// band(l_{j-1}))`, refused (None) past the largest level. The step is kept from entry to
/// entry and recomputed only when a level crosses into the next band, so each entry costs
/// a shift, an add and two comparisons on the chain instead of the band's division.
struct LevelChain {
    prev: u64,
    e: u32,
    shift: u32,
    top: u64,
    steps: u32,
    band_end: u64,
}

impl LevelChain {
    /// The chain after the top entry's level `first` (which the caller checks against
    /// `top`).
    fn new(first: u64, e: u8, shift: u32, top: u64) -> LevelChain {
        let mut c = LevelChain { prev: first, e: u32::from(e), shift, top, steps: 0, band_end: 0 };
        c.rebase();
        c
    }

    fn rebase(&mut self) {
        let b = band(self.prev, self.shift);
        self.steps = self.e + b;
        // band(l) > b exactly when 2 l >= 3 (b + 1) 2^shift (shift >= 2).
        self.band_end =
            if b < MAX_BAND { (3 * u64::from(b + 1)) << (self.shift - 1) } else { u64::MAX };
    }

    /// The next level after number `n`: None when it would pass the largest level.
    #[inline]
    fn next(&mut self, n: u64) -> Option<u64> {
        // n m > top means past it, and rules out overflow below (prev <= top <= 2^42).
        if n > self.top >> self.steps {
            return None;
        }
        let l = self.prev + (n << self.steps);
        if l > self.top {
            return None;
        }
        self.prev = l;
        if l >= self.band_end {
            self.rebase();
        }
        Some(l)
    }
}

/// The deep entries of one row (group 3) from its pair bytes `codes`, escapes from `ext`.
#[inline]
fn decode_deep(
    codes: &[u8],
    ext: &mut ByteReader<'_>,
    deep: &mut [f32],
    chain: &mut LevelChain,
    shift: u32,
    loc: &Location,
) -> Result<()> {
    let out_of_range = || Error::corrupt(loc.clone(), "log-probability level out of range");
    let mut deep = deep.iter_mut();
    for &c in codes {
        let (a, b) = match pairs::UNPAIR[usize::from(c)] {
            pairs::ESCAPED => (ext.varint(loc)?, ext.varint(loc)?),
            pairs::INVALID => {
                return Err(Error::corrupt(loc.clone(), format!("log-probability pair byte {c}")));
            }
            ab => (u64::from(ab & 0xFF), u64::from(ab >> 8)),
        };
        if let Some(d) = deep.next() {
            *d = dequantize(chain.next(a).ok_or_else(out_of_range)?, shift);
        }
        match deep.next() {
            Some(d) => *d = dequantize(chain.next(b).ok_or_else(out_of_range)?, shift),
            None if b != 0 => {
                return Err(Error::corrupt(loc.clone(), format!("pair padding is {b}, not 0")));
            }
            None => {}
        }
    }
    Ok(())
}

/// Decode `rows` rows of width `k`.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    modes: &[u8],
    leads: &[Vec<u8>; 4],
    exts: &[Vec<u8>; 4],
    lossless_raw: &[u8],
    finite_raw: Option<&[u8]>,
    rows: usize,
    k: usize,
    loc: &Location,
) -> Result<Vec<f32>> {
    if modes.len() != rows {
        return Err(Error::corrupt(
            loc.clone(),
            format!("{} row modes for {rows} rows", modes.len()),
        ));
    }
    let n_lossless = modes.iter().filter(|&&m| m == LOSSLESS_ROW).count();
    let words = bytes::u32_from_planes(lossless_raw, n_lossless * k, "lossless rows", loc)?;
    let mut words = words.chunks_exact(k.max(1));
    let mut lead_r: Vec<ByteReader<'_>> =
        leads.iter().map(|l| ByteReader::new(l, "log-probabilities")).collect();
    let mut ext_r: Vec<ByteReader<'_>> =
        exts.iter().map(|l| ByteReader::new(l, "log-probability extension")).collect();
    let mut paired = PairReader::new(&leads[PAIRED_GROUP], &exts[PAIRED_GROUP]);
    let mut fr = finite_raw.map(|f| ByteReader::new(f, "finite counts"));
    let mut out = vec![f32::NEG_INFINITY; rows * k];
    let out_of_range = || Error::corrupt(loc.clone(), "log-probability level out of range");
    for (row, (&m, dst)) in modes.iter().zip(out.chunks_exact_mut(k.max(1))).enumerate() {
        let finite = match fr.as_mut() {
            Some(f) => f.varint(loc)? as usize,
            None => k,
        };
        if finite > k {
            return Err(Error::corrupt(
                loc.clone(),
                format!("row {row} claims {finite} finite entries of {k}"),
            ));
        }
        if m == LOSSLESS_ROW {
            if finite != k {
                return Err(Error::corrupt(
                    loc.clone(),
                    format!(
                        "row {row} is stored losslessly but claims {finite} finite entries of {k}"
                    ),
                ));
            }
            let src =
                words.next().ok_or_else(|| Error::corrupt(loc.clone(), "lossless rows missing"))?;
            let mut prev = 0u32;
            for (d, &x) in dst.iter_mut().zip(src) {
                prev ^= x;
                *d = f32::from_bits(prev);
            }
            continue;
        }
        let (b, e) = parse_mode(m)
            .ok_or_else(|| Error::corrupt(loc.clone(), format!("row {row} has mode {m}")))?;
        let shift = u32::from(b) + u32::from(e);
        let top = max_level(shift);
        let Some(dst) = dst.get_mut(..finite) else {
            return Err(Error::State("finite count past the row".into()));
        };
        let (shallow, deep) = dst.split_at_mut(finite.min(super::ids::GROUPS[PAIRED_GROUP].0));
        let mut chain: Option<LevelChain> = None;
        for (j, d) in shallow.iter_mut().enumerate() {
            let g = super::ids::group_of(j);
            let c = lead_r[g].byte(loc)?;
            let n = if c < 255 {
                u64::from(c)
            } else {
                ext_r[g].varint(loc)?.checked_add(255).ok_or_else(out_of_range)?
            };
            let l = match chain.as_mut() {
                Some(chain) => chain.next(n),
                None => (n <= top).then(|| chain.insert(LevelChain::new(n, e, shift, top)).prev),
            }
            .ok_or_else(out_of_range)?;
            *d = dequantize(l, shift);
        }
        // Group 3 two numbers at a time (pairs; an odd row's last pad must be 0). A row
        // reaches it only through the shallow entries, so the chain has begun.
        if deep.is_empty() {
            continue;
        }
        let Some(chain) = chain.as_mut() else {
            return Err(Error::State("deep entries of a row without a top entry".into()));
        };
        let (codes, ext) = paired.row(deep.len(), loc)?;
        decode_deep(codes, ext, deep, chain, shift, loc)?;
    }
    for (g, (lead, ext)) in lead_r.iter().zip(&ext_r).enumerate() {
        if g != PAIRED_GROUP {
            lead.finish(loc)?;
            ext.finish(loc)?;
        }
    }
    paired.finish(loc)?;
    if let Some(f) = fr {
        f.finish(loc)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u64, k: usize, top: f32) -> Vec<f32> {
        let mut x = seed | 1;
        let mut v = -top;
        (0..k)
            .map(|_| {
                crate::test_util::xorshift(&mut x);
                let out = v;
                v -= 0.05 + (x % 1000) as f32 / 2000.0;
                out
            })
            .collect()
    }

    fn kl_of(orig: &[f32], got: &[f32]) -> f64 {
        let (mut kl, mut sp, mut sq) = (0.0f64, 0.0f64, 0.0f64);
        for (&a, &b) in orig.iter().zip(got) {
            let (p, q) = (f64::from(a).exp(), f64::from(b).exp());
            sp += p;
            sq += q;
            if p > 0.0 {
                kl += p * (f64::from(a) - f64::from(b));
            }
        }
        let (pr, qr) = ((1.0 - sp).max(0.0), (1.0 - sq).max(0.0));
        if pr > 0.0 {
            kl += pr * (pr / qr).ln();
        }
        kl - (sp + pr) + (sq + qr)
    }

    #[test]
    fn every_row_meets_the_bound() {
        let loc = Location::default();
        let k = 64;
        for bound in [1e-2, 1e-3, 1e-4, 1e-5] {
            let mut lp = Vec::new();
            for s in 0..200u64 {
                let mut r = row(s, k, (s % 7) as f32 * 0.3 + 0.001);
                if s % 11 == 0 {
                    r[40..].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                }
                lp.extend(r);
            }
            let enc = encode(&lp, k, bound);
            let planes = bytes::u32_planes(&enc.lossless);
            let finite = enc.any_nonfinite.then_some(&enc.finite[..]);
            let dec =
                decode(&enc.modes, &enc.leads, &enc.exts, &planes, finite, 200, k, &loc).unwrap();
            for (orig, got) in lp.chunks_exact(k).zip(dec.chunks_exact(k)) {
                let kl = kl_of(orig, got);
                assert!(kl <= bound * (1.0 + 1e-9) + 1e-15, "kl {kl} > {bound}");
            }
        }
    }

    /// Bad deep-rank pair streams are errors, not values: an invalid pair byte, a nonzero
    /// pad of an odd row, a stream that ends early, one with bytes left over.
    #[test]
    fn bad_pair_streams_are_errors() {
        let loc = Location::default();
        let k = 21; // 5 deep entries: 3 pair bytes, the last with a pad
        let lp: Vec<f32> = (0..4u64).flat_map(|s| row(s, k, 0.5)).collect();
        let enc = encode(&lp, k, 1e-3);
        let planes = bytes::u32_planes(&enc.lossless);
        let finite = enc.any_nonfinite.then_some(&enc.finite[..]);
        let run = |leads: &[Vec<u8>; 4]| {
            decode(&enc.modes, leads, &enc.exts, &planes, finite, 4, k, &loc)
                .map_err(|e| e.to_string())
        };
        let good = run(&enc.leads).unwrap();
        assert_eq!(good.len(), 4 * k);
        let g = PAIRED_GROUP;
        assert_eq!(enc.leads[g].len(), 4 * 3);
        let mut bad = enc.leads.clone();
        bad[g][4] = pairs::PAIR_ESCAPE + 1;
        assert!(run(&bad).unwrap_err().contains("pair byte"));
        let mut bad = enc.leads.clone();
        bad[g][5] = bad[g][5] - bad[g][5] % pairs::PAIR_BASE + 1; // the pad (b) of row 1
        assert!(run(&bad).unwrap_err().contains("pair padding is 1"));
        let mut bad = enc.leads.clone();
        bad[g].pop();
        assert!(run(&bad).unwrap_err().contains("ends early"));
        let mut bad = enc.leads.clone();
        bad[g].push(0);
        assert!(run(&bad).is_err());
    }

    /// A row kept losslessly has K finite entries in the finite counts stream (when there is
    /// one): any other count is an error, not ignored.
    #[test]
    fn a_lossless_row_counts_k_finite_entries() {
        let loc = Location::default();
        let row = [-0.5f32, -1.0, -2.0];
        let words: Vec<u32> = (0..3)
            .map(|j| row[j].to_bits() ^ if j == 0 { 0 } else { row[j - 1].to_bits() })
            .collect();
        let planes = bytes::u32_planes(&words);
        let none: [Vec<u8>; 4] = Default::default();
        let run = |finite: Option<&[u8]>| {
            decode(&[LOSSLESS_ROW], &none, &none, &planes, finite, 1, 3, &loc)
        };
        assert_eq!(run(None).unwrap(), row);
        assert_eq!(run(Some(&[3])).unwrap(), row);
        let err = run(Some(&[2])).unwrap_err().to_string();
        assert!(err.contains("stored losslessly but claims 2 finite entries of 3"), "{err}");
    }

    #[test]
    fn values_beyond_the_range_end_the_row() {
        // Finite but astronomically negative entries (probability 0 in float64) must not
        // overflow the level arithmetic: they decode to -inf.
        let loc = Location::default();
        let k = 6;
        let mut lp = Vec::new();
        for far in [-1.5e6f32, -1e30, -3.0e38, f32::MIN] {
            lp.extend([-0.01f32, -5.0, -9.0, far, f32::MIN, f32::NEG_INFINITY]);
        }
        let rows = lp.len() / k;
        for bound in [1e-1, 1e-2, 1e-4] {
            let enc = encode(&lp, k, bound);
            assert!(enc.modes.iter().all(|&m| m != LOSSLESS_ROW));
            let planes = bytes::u32_planes(&enc.lossless);
            let finite = enc.any_nonfinite.then_some(&enc.finite[..]);
            let dec =
                decode(&enc.modes, &enc.leads, &enc.exts, &planes, finite, rows, k, &loc).unwrap();
            for (orig, got) in lp.chunks_exact(k).zip(dec.chunks_exact(k)) {
                assert!(got[3..].iter().all(|&v| v == f32::NEG_INFINITY), "{got:?}");
                assert!(kl_of(orig, got) <= bound);
            }
        }
    }

    /// Round half up, in u64 (any non-negative value below 2^64).
    fn round_half_up(x: f64) -> u64 {
        let q = (x + 0.5) as u64;
        if q as f64 - x > 0.5 { q - 1 } else { q }
    }

    /// quantize_row by its definition: each entry from the previous decoded level.
    fn quantize_row_by_definition(row: &[f32], b: u8, e: u8) -> (Vec<u64>, Vec<u64>) {
        let (mut levels, mut numbers) = (Vec::new(), Vec::new());
        let shift = u32::from(b) + u32::from(e);
        let inv_u = (shift as f64).exp2();
        let top = max_level(shift);
        let mut prev = 0u64;
        for (j, &v) in row.iter().enumerate() {
            if v == f32::NEG_INFINITY {
                break;
            }
            let x = (-f64::from(v)).max(0.0) * inv_u;
            if x > top as f64 {
                break;
            }
            let (l, n) = if j == 0 {
                let l = round_half_up(x);
                (l, l)
            } else {
                let m = 1u64 << (u32::from(e) + band(prev, shift));
                let k = round_half_up(((x - prev as f64) / m as f64).max(0.0));
                (prev + k * m, k)
            };
            if l > top {
                break;
            }
            levels.push(l);
            numbers.push(n);
            prev = l;
        }
        (levels, numbers)
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(1000))]

        /// Levels and numbers of the segment-wise quantization are the chain's, at every
        /// setting, for sorted rows and unsorted ones, with values near grid midpoints,
        /// tiny, huge and -inf.
        #[test]
        fn segments_match_the_chain(
            steps in proptest::collection::vec((0u32..6, 0.0f32..1.0), 1..80),
            top in -3.0f32..0.0,
            b in B_MIN..=B_MAX,
            ei in 0usize..4,
            sorted in proptest::bool::ANY,
            tail in 0usize..3,
        ) {
            let e = TOP_EXTRA[ei];
            // Gaps from exact grid multiples (0: a tie of rounding half up) to arbitrary.
            let mut v = top;
            let mut row: Vec<f32> = steps
                .iter()
                .map(|&(kind, f)| {
                    let out = v;
                    let unit = (-f32::from(b)).exp2();
                    v -= match kind {
                        0 => unit * (f * 8.0).floor() / 2.0,
                        1 => f * 0.01,
                        2 => f * 30.0,
                        3 => unit * (f * 64.0).floor(),
                        _ => f,
                    };
                    if !sorted && kind == 4 { v += 2.0 * f; }
                    out
                })
                .collect();
            match tail {
                1 => { let n = row.len(); row[n / 2..].fill(f32::NEG_INFINITY) }
                2 => { let n = row.len(); row[n - 1] = -3.0e38 }
                _ => {}
            }
            let (mut levels, mut numbers) = (Vec::new(), Vec::new());
            let n = quantize_row(&row, b, e, &mut levels, &mut numbers);
            let (want_l, want_n) = quantize_row_by_definition(&row, b, e);
            proptest::prop_assert_eq!(n, want_l.len());
            proptest::prop_assert_eq!(levels, want_l);
            proptest::prop_assert_eq!(numbers, want_n);
        }

        /// The decoder's chain of levels is the definition, `l + n 2^(e + band(l))`,
        /// refused on overflow or past the largest level, for numbers small and huge.
        #[test]
        fn level_chain_is_the_definition(
            first in 0u64..64,
            numbers in proptest::collection::vec((0u64..300, 0u32..60), 1..64),
            b in B_MIN..=B_MAX,
            ei in 0usize..4,
        ) {
            let e = TOP_EXTRA[ei];
            let shift = u32::from(b) + u32::from(e);
            let top = max_level(shift);
            // Levels that are multiples of 2^e land exactly on the first band's end.
            let first = first << e;
            let mut chain = LevelChain::new(first, e, shift, top);
            let mut prev = first;
            for &(n, scale) in &numbers {
                // Small numbers (to land on band ends), moderate ones, and huge ones.
                let n = match scale {
                    0..20 => n % 8,
                    20..40 => n,
                    _ => n << ((scale - 40) * 3),
                };
                let step = 1u64 << (u32::from(e) + band(prev, shift));
                let want = n.checked_mul(step).and_then(|x| x.checked_add(prev)).filter(|&l| l <= top);
                let got = chain.next(n);
                proptest::prop_assert_eq!(got, want);
                match want {
                    Some(l) => prev = l,
                    None => break,
                }
            }
        }

        /// The shift-and-divide-by-3 band is the definition, floor(2 l / (3 2^shift)),
        /// at every shift a mode can give and every level up to the largest.
        #[test]
        fn band_is_the_defining_division(
            raw in 0u64..(1u64 << 43),
            shift in 2u32..=22,
            capped in proptest::bool::ANY,
        ) {
            // Mostly levels below the cap (band 12 starts at 19.5 nats), sometimes any.
            let l = if capped { raw } else { raw % (20u64 << shift) };
            let want = (2 * l / (3u64 << shift)).min(u64::from(MAX_BAND)) as u32;
            proptest::prop_assert_eq!(band(l, shift), want);
        }
    }

    #[test]
    fn bands_and_values_are_exact() {
        for shift in 2..=22u32 {
            let per_nat = 1u64 << shift;
            assert_eq!(band(0, shift), 0);
            assert_eq!(band(3 * per_nat / 2 - 1, shift), 0);
            assert_eq!(band(3 * per_nat / 2, shift), 1);
            assert_eq!(band(u64::MAX / 4, shift), MAX_BAND);
            assert_eq!(f64::from(dequantize(3 * per_nat, shift)), -3.0);
        }
        for m in 0..=255u8 {
            if let Some((b, e)) = parse_mode(m) {
                assert_eq!(mode(b, TOP_EXTRA.iter().position(|&x| x == e).unwrap()), m);
            }
        }
    }
}
