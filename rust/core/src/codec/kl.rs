//! The KL-bounded log-probability codec (`kl:<bound>`, top-K stores).
//!
//! Error in an entry of tiny probability costs little divergence, and that is where most
//! bytes go. So the quantization step grows with the decoded value: along a row, entry j is
//! stored on a grid of step `s * 2^band`, where `band = floor(x'_{j-1} / W)` (capped) is
//! computed from the previous decoded value `x'` (= -logprob) and `W = 11/8` nats, close to
//! 2 ln 2: the step doubles each time the probability drops by about 4, which keeps each
//! entry's share of the divergence (about p * step^2) level along the row.
//!
//! Each value goes to one of the two grid points around it, chosen to keep the decoded row's
//! total probability close to the written one (so the rest bucket barely moves). The writer
//! then computes, in float64, KL(P || P_decoded) over the K entries plus the rest bucket
//! `max(0, 1 - sum)`, using exactly the values a reader will decode, and picks per row the
//! coarsest base step `s = 2^-e` (e in `E_MIN..=E_MAX`) that meets the bound; a row that no
//! step satisfies is stored losslessly. The guarantee is therefore checked, not estimated.

use crate::codec::bytes::{self, ByteReader};
use crate::error::{Error, Location, Result};

use super::logprobs::MAX_LEVEL;

/// Coarsest and finest base steps, as exponents e of s = 2^-e.
pub const E_MIN: u8 = 4;
pub const E_MAX: u8 = 12;
/// Row mode of a row stored losslessly.
pub const LOSSLESS_ROW: u8 = 255;
/// Largest band: the step never grows beyond `s * 2^MAX_BAND`.
pub const MAX_BAND: u32 = 12;

/// Band of the next entry given the previous level `l` on the grid of step 2^-e:
/// `floor(l * 2^-e / (11/8))`, in integers.
#[inline]
pub fn band(l: u64, e: u8) -> u32 {
    let b = (8 * l) / (11u64 << e);
    b.min(u64::from(MAX_BAND)) as u32
}

/// Levels of one row at base exponent `e`; returns how many entries are finite (levels[j] *
/// 2^-e is the decoded -logprob of entry j; entries from the returned count on decode to
/// -inf). Each entry goes to one of the two grid points around it, the one that keeps the
/// running difference between decoded and written probability mass closest to zero: the
/// rest bucket (1 - sum) then barely moves, which matters when it is small.
fn quantize_row(row: &[f32], e: u8, levels: &mut Vec<u64>) -> usize {
    levels.clear();
    let inv = f64::from(1u32 << e);
    let step = 1.0 / inv;
    let mut prev = 0u64;
    let mut mass_err = 0.0f64;
    for &v in row {
        if v == f32::NEG_INFINITY {
            break;
        }
        let x = (-f64::from(v)).max(0.0) * inv;
        let m = 1u64 << band(prev, e);
        let need = x - prev as f64;
        let k_lo = if need <= 0.0 { 0 } else { (need / m as f64).floor() as u64 };
        let l_lo = prev + k_lo * m;
        let l_hi = l_lo + m;
        let l = if need <= 0.0 {
            l_lo
        } else {
            let p = f64::from(v).exp();
            let q_lo = (-(l_lo as f64) * step).exp();
            let q_hi = (-(l_hi as f64) * step).exp();
            if (mass_err + q_hi - p).abs() < (mass_err + q_lo - p).abs() { l_hi } else { l_lo }
        };
        if l > u64::from(MAX_LEVEL) {
            break;
        }
        mass_err += (-(l as f64) * step).exp() - f64::from(v).exp();
        levels.push(l);
        prev = l;
    }
    levels.len()
}

/// The decoded value of level `l` at base exponent `e` (exact: l <= 2^24, power-of-two step).
#[inline]
pub fn dequantize(l: u64, e: u8) -> f32 {
    0.0f32 - (l as f32) * f32::from_bits((127 - u32::from(e)) << 23)
}

/// KL(P || P_decoded) over the row's entries plus the rest bucket, in float64.
fn row_kl(row: &[f32], levels: &[u64], e: u8) -> f64 {
    let mut kl = 0.0f64;
    let mut sum_p = 0.0f64;
    let mut sum_q = 0.0f64;
    for (j, &v) in row.iter().enumerate() {
        let p = f64::from(v).exp();
        sum_p += p;
        let q = match levels.get(j) {
            Some(&l) => f64::from(dequantize(l, e)).exp(),
            None => 0.0,
        };
        sum_q += q;
        if p > 0.0 {
            if q == 0.0 {
                return f64::INFINITY;
            }
            kl += p * (f64::from(v) - q.ln());
        }
    }
    let p_rest = (1.0 - sum_p).max(0.0);
    let q_rest = (1.0 - sum_q).max(0.0);
    if p_rest > 0.0 {
        if q_rest == 0.0 {
            return f64::INFINITY;
        }
        kl += p_rest * (p_rest / q_rest).ln();
    }
    kl.max(0.0)
}

/// Encoded rows: per-row modes, level codes by group, lossless rows, finite counts.
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
    let mut levels = Vec::with_capacity(k);
    let mut hint = E_MIN;
    for row in lp.chunks_exact(k.max(1)) {
        // Start from the previous row's exponent (neighbouring rows behave alike): go
        // coarser while the bound holds, else finer until it does.
        let ok = |e: u8, levels: &mut Vec<u64>| {
            quantize_row(row, e, levels);
            row_kl(row, levels, e) <= bound
        };
        let mut chosen = None;
        if ok(hint, &mut levels) {
            let mut e = hint;
            while e > E_MIN && ok(e - 1, &mut levels) {
                e -= 1;
            }
            chosen = Some(e);
        } else {
            for e in hint + 1..=E_MAX {
                if ok(e, &mut levels) {
                    chosen = Some(e);
                    break;
                }
            }
        }
        match chosen {
            Some(e) => {
                let finite = quantize_row(row, e, &mut levels);
                out.modes.push(e);
                hint = e;
                let mut prev = 0u64;
                for (j, &l) in levels.iter().enumerate() {
                    let g = super::ids::group_of(j);
                    let m = 1u64 << band(prev, e);
                    put_small(&mut out.leads[g], &mut out.exts[g], (l - prev) / m);
                    prev = l;
                }
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
fn put_small(lead: &mut Vec<u8>, ext: &mut Vec<u8>, v: u64) {
    if v < 255 {
        lead.push(v as u8);
    } else {
        lead.push(255);
        bytes::put_varint(ext, v - 255);
    }
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
    let mut fr = finite_raw.map(|f| ByteReader::new(f, "finite counts"));
    let mut out = vec![f32::NEG_INFINITY; rows * k];
    for (row, (&mode, dst)) in
        modes.iter().zip(out.chunks_exact_mut(k.max(1))).enumerate().take(rows)
    {
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
        if mode == LOSSLESS_ROW {
            let src =
                words.next().ok_or_else(|| Error::corrupt(loc.clone(), "lossless rows missing"))?;
            let mut prev = 0u32;
            for (d, &x) in dst.iter_mut().zip(src) {
                prev ^= x;
                *d = f32::from_bits(prev);
            }
            continue;
        }
        if !(E_MIN..=E_MAX).contains(&mode) {
            return Err(Error::corrupt(loc.clone(), format!("row {row} has mode {mode}")));
        }
        let mut prev = 0u64;
        for (j, d) in dst.iter_mut().take(finite).enumerate() {
            let g = super::ids::group_of(j);
            let b = lead_r[g].byte(loc)?;
            let v = if b < 255 { u64::from(b) } else { ext_r[g].varint(loc)? + 255 };
            let m = 1u64 << band(prev, mode);
            let l = v
                .checked_mul(m)
                .and_then(|x| x.checked_add(prev))
                .filter(|&l| l <= u64::from(MAX_LEVEL))
                .ok_or_else(|| Error::corrupt(loc.clone(), "log-probability level out of range"))?;
            *d = dequantize(l, mode);
            prev = l;
        }
    }
    for r in lead_r.iter().chain(&ext_r) {
        r.finish(loc)?;
    }
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
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let out = v;
                v -= 0.05 + (x % 1000) as f32 / 2000.0;
                out
            })
            .collect()
    }

    #[test]
    fn every_row_meets_the_bound() {
        let loc = Location::default();
        let k = 64;
        for bound in [1e-2, 1e-3, 1e-4, 1e-5] {
            let mut lp = Vec::new();
            for s in 0..200u64 {
                let mut r = row(s, k, (s % 7) as f32 * 0.3 + 0.05);
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
                // Recompute the divergence from the decoded floats directly.
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
                assert!(kl <= bound * (1.0 + 1e-9) + 1e-15, "kl {kl} > {bound}");
            }
        }
    }

    #[test]
    fn bands_are_exact_integers() {
        // band boundaries at multiples of 11/8 nats, whatever the base step.
        for e in E_MIN..=E_MAX {
            let per_nat = 1u64 << e;
            assert_eq!(band(0, e), 0);
            assert_eq!(band(11 * per_nat / 8 - 1, e), 0);
            assert_eq!(band(11 * per_nat / 8, e), 1);
            assert_eq!(band(u64::from(MAX_LEVEL), e), MAX_BAND.min(band(u64::from(MAX_LEVEL), e)));
        }
    }
}
