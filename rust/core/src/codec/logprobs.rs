//! Log-probability codecs.
//!
//! * `lossless`: float32 bit patterns.
//! * `abs:<bound>`: uniform quantization of `x = -logprob` with the largest step
//!   `s = m 2^-e <= 2 * bound` (m in {1, 3, 5, 7}, so that the step can use most of the
//!   bound: 0.01 gives 5 2^-8, max error 0.0098, where a power of two would give 2^-6 and
//!   0.0078), round to nearest, so every decoded value is within `s / 2 <= bound` of the
//!   original. Decoding is exact binary arithmetic (`0 - q * s` in float32 with
//!   `q m <= 2^24`), identical on every platform. Top-K rows are non-increasing, so their
//!   quantized levels are coded as a first value and non-negative deltas (those of ranks
//!   16 and up two per byte, see [`super::pairs`]).
//! * `none`: sampled stores that keep only ids and counts.

use std::mem::MaybeUninit;

use crate::codec::bytes::{self, ByteReader};
use crate::codec::{CodecParams, RowShape, Streams, ids, kl, pairs, tag};
use crate::error::{Error, Location, Result};
use crate::format::Kind;

/// Largest quantized level of a power-of-two step: `q * s` is exact in float32 up to
/// `q m = 2^24` (see [`LogprobCodec::max_level`]).
pub const MAX_LEVEL: u32 = 1 << 24;

/// Odd step multipliers m of the abs codec (step `m 2^-e`).
pub const STEP_MULTIPLIERS: [u32; 4] = [1, 3, 5, 7];
/// Range of the abs step: `2^-13 <= s <= 2`, with e in 1..=13. The top entry of a row
/// lives on the grid s/64 with at most 2^24 / m levels, which covers about 2^18 s nats: at
/// s >= 2^-13 about 32, more than -ln(1/V) for any vocabulary below 2^31 (the top
/// probability of a distribution over V tokens is at least 1/V). Finer steps would store
/// the rows of flat distributions as all -inf (abs:1e-6 did, for any row below -0.5 nats).
const STEP_EXPONENTS: std::ops::RangeInclusive<i32> = 1..=13;
const SMALLEST_STEP: f32 = 1.0 / 8192.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogprobCodec {
    /// No log-probabilities (sampled stores only).
    None,
    /// float32, bit for bit.
    Lossless,
    /// Uniform quantization with step `mult 2^-step_log2` nats (`mult` in
    /// [`STEP_MULTIPLIERS`]).
    Abs { step_log2: i32, mult: u32 },
    /// Steps growing along the row, with KL(P || P_decoded) <= `bound` per position
    /// (top-K stores; see `codec::kl`).
    Kl { bound: f32 },
}

impl LogprobCodec {
    /// Header code of the codec.
    pub fn code(self) -> u8 {
        match self {
            LogprobCodec::None => 0,
            LogprobCodec::Lossless => 1,
            LogprobCodec::Abs { .. } => 2,
            LogprobCodec::Kl { .. } => 3,
        }
    }

    /// Rebuild a codec from a shard header's fields.
    pub fn from_header(code: u8, step: f32, kl_bound: f32) -> Option<LogprobCodec> {
        match code {
            3 => (kl_bound.is_finite() && kl_bound > 0.0 && step == 0.0)
                .then_some(LogprobCodec::Kl { bound: kl_bound }),
            0 => Some(LogprobCodec::None),
            1 => Some(LogprobCodec::Lossless),
            2 => all_abs_codecs().find(|c| c.step() == step),
            _ => None,
        }
    }

    /// Parse a user-facing codec name: `"lossless"`, `"abs:<bound>"` or `"none"`.
    pub fn parse(spec: &str) -> Result<LogprobCodec> {
        let bad = |msg: String| Err(Error::invalid_argument("codec", msg));
        match spec {
            "lossless" | "f32" => return Ok(LogprobCodec::Lossless),
            "none" => return Ok(LogprobCodec::None),
            _ => {}
        }
        if let Some(b) = spec.strip_prefix("kl:") {
            let Ok(bound) = b.parse::<f32>() else {
                return bad(format!("{spec:?}: the bound after \"kl:\" must be a number"));
            };
            if !(bound.is_finite() && (1e-8..=1.0).contains(&bound)) {
                return bad(format!("{spec:?}: the KL bound must be between 1e-8 and 1 nat"));
            }
            return Ok(LogprobCodec::Kl { bound });
        }
        if let Some(b) = spec.strip_prefix("abs:") {
            let Ok(bound) = b.parse::<f64>() else {
                return bad(format!("{spec:?}: the bound after \"abs:\" must be a number"));
            };
            let finest = f64::from(SMALLEST_STEP) / 2.0;
            if !(bound.is_finite() && (finest..=1.0).contains(&bound)) {
                return bad(format!(
                    "{spec:?}: the bound must be between 2^-14 = {finest:.3e} and 1 nat (finer \
                     steps cannot hold the top entry of every row; use \"lossless\")"
                ));
            }
            // The largest step whose half is within the bound (there is one: 2^-13).
            let best = all_abs_codecs()
                .filter(|c| f64::from(c.step()) / 2.0 <= bound)
                .max_by(|a, b| a.step().total_cmp(&b.step()));
            return best.ok_or_else(|| {
                Error::invalid_argument("codec", format!("{spec:?}: no step fits the bound"))
            });
        }
        bad(format!(
            "unknown codec {spec:?}; expected \"lossless\", \"abs:<max error in nats>\" (e.g. \"abs:0.01\"), \"kl:<max KL per position in nats>\" (e.g. \"kl:1e-4\") or \"none\""
        ))
    }

    /// Quantization step in nats (0 for lossless / none).
    pub fn step(self) -> f32 {
        match self {
            LogprobCodec::Abs { step_log2, mult } => step_from_log2(step_log2) * mult as f32,
            _ => 0.0,
        }
    }

    /// Largest level of the abs codec, on the step's grid and on the top entry's fine grid:
    /// `q m <= 2^24`, so that `q * s` is exact in float32.
    pub fn max_level(self) -> u32 {
        match self {
            LogprobCodec::Abs { mult, .. } => MAX_LEVEL / mult.max(1),
            _ => MAX_LEVEL,
        }
    }

    /// The scale and multiplier of [`level`] for this codec's step (`2^e`, `m`).
    pub fn grid(self) -> Grid {
        match self {
            LogprobCodec::Abs { step_log2, mult } => Grid::new(step_log2, mult),
            _ => Grid::new(0, 1),
        }
    }

    /// The guaranteed maximum absolute error, if the codec bounds it.
    pub fn max_abs_error(self) -> Option<f64> {
        match self {
            LogprobCodec::Abs { .. } => Some(f64::from(self.step()) / 2.0),
            LogprobCodec::Lossless => Some(0.0),
            LogprobCodec::None | LogprobCodec::Kl { .. } => None,
        }
    }

    /// The guaranteed bound on KL(P || P_decoded) per position, for the `kl` codec.
    pub fn kl_bound(self) -> Option<f32> {
        match self {
            LogprobCodec::Kl { bound } => Some(bound),
            _ => None,
        }
    }

    /// The codec as messages show it: its name and its guarantee (`abs (step 0.0195312, max
    /// abs error 0.00976562)`, `kl (bound 0.001)`, `lossless`, `none`).
    pub fn describe(self) -> String {
        match self {
            LogprobCodec::Abs { .. } => {
                format!("abs (step {}, max abs error {})", self.step(), self.step() / 2.0)
            }
            LogprobCodec::Kl { bound } => format!("kl (bound {bound})"),
            other => other.name().into(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LogprobCodec::None => "none",
            LogprobCodec::Lossless => "lossless",
            LogprobCodec::Abs { .. } => "abs",
            LogprobCodec::Kl { .. } => "kl",
        }
    }
}

fn step_from_log2(step_log2: i32) -> f32 {
    f32::from_bits(((127 - step_log2) as u32) << 23)
}

/// Every abs codec a store may declare: steps `m 2^-e` between 2^-13 and 2.
fn all_abs_codecs() -> impl Iterator<Item = LogprobCodec> {
    STEP_MULTIPLIERS.into_iter().flat_map(|mult| {
        STEP_EXPONENTS
            .map(move |step_log2| LogprobCodec::Abs { step_log2, mult })
            .filter(|c| (SMALLEST_STEP..=2.0).contains(&c.step()))
    })
}

/// The step `m 2^-e` of the abs codec as the numbers [`level_or_max`] computes with.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    /// `2^e`: `-logprob * scale` is exact (a float32 times a power of two).
    pub scale: f64,
    pub mult: f64,
    pub inv_mult: f64,
    pub max_level: u32,
}

impl Grid {
    pub fn new(step_log2: i32, mult: u32) -> Grid {
        let mult = mult.max(1);
        Grid {
            scale: 2f64.powi(step_log2),
            mult: f64::from(mult),
            inv_mult: 1.0 / f64::from(mult),
            max_level: MAX_LEVEL / mult,
        }
    }

    /// The same step divided by `TOP_FINE` (the top entry's grid).
    pub fn fine(self) -> Grid {
        Grid { scale: self.scale * f64::from(TOP_FINE), ..self }
    }
}

/// Quantize one value to its level `floor(-logprob / s + 1/2)` (clamped at 0), or `None`
/// for -inf and values too negative to represent (below `-max_level s` nats: probability
/// exactly 0 in float32 and float64).
#[inline]
pub fn level(logprob: f32, grid: Grid) -> Option<u32> {
    let q = level_or_max(logprob, grid);
    (q != u32::MAX).then_some(q)
}

/// [`level`] without branches (so that a row's levels vectorize): the level, or `u32::MAX`
/// where `level` gives `None`.
#[inline]
pub fn level_or_max(logprob: f32, grid: Grid) -> u32 {
    // y = -logprob 2^e is exact; the level is floor(y / m + 1/2).
    let y = -f64::from(logprob) * grid.scale;
    // (False for NaN and -inf: no level.)
    let ok = y * grid.inv_mult <= f64::from(grid.max_level) + 1.0;
    let y = if y > 0.0 { y } else { 0.0 };
    // A guess, then a correction by the remainder y - q m, which is exact in float64 (y has
    // 24 significant bits, q m is an integer within m of it): q + 1 where the remainder
    // reaches m/2 (round half up), q - 1 where it is below -m/2. The guess is y / m rounded
    // to the nearest integer by adding and removing 2^52 (ties to even, and 1/m inexact:
    // off by at most one, which the correction undoes). Everything stays in float64 and the
    // integer is read from the low bits of q + 2^52, so that a row's loop vectorizes.
    const ROUND: f64 = 4_503_599_627_370_496.0; // 2^52
    let t = (y * grid.inv_mult).min(f64::from(grid.max_level) + 2.0);
    let q = (t + ROUND) - ROUND;
    let r = y - q * grid.mult;
    let half = 0.5 * grid.mult;
    let q = q + f64::from(u8::from(r >= half)) - f64::from(u8::from(r < -half));
    let q = (q + ROUND).to_bits() as u32;
    if ok && q <= grid.max_level { q } else { u32::MAX }
}

/// Append [`level_or_max`] of each of `row` to `out`: the encoder's costliest loop, so it is
/// also compiled for AVX2 (four float64 lanes instead of SSE2's two) and chosen at run time.
/// Both builds run the same IEEE operations (no fused multiply-adds), hence the same levels.
fn push_levels(row: &[f32], grid: Grid, out: &mut Vec<u32>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the running CPU has AVX2, the one feature the function is compiled for.
        return unsafe { push_levels_avx2(row, grid, out) };
    }
    push_levels_baseline(row, grid, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn push_levels_avx2(row: &[f32], grid: Grid, out: &mut Vec<u32>) {
    push_levels_baseline(row, grid, out)
}

#[inline(always)]
fn push_levels_baseline(row: &[f32], grid: Grid, out: &mut Vec<u32>) {
    let start = out.len();
    out.resize(start + row.len(), 0);
    for (q, &v) in out[start..].iter_mut().zip(row) {
        *q = level_or_max(v, grid);
    }
}

/// The decoded value of a level: `0 - q * step` in float32 (exact for q m <= 2^24, the
/// step being m times a power of two).
#[inline]
pub fn dequantize(q: u32, step: f32) -> f32 {
    0.0f32 - (q as f32) * step
}

/// The top entry of a sorted row is stored on a grid this many times finer than the step.
pub const TOP_FINE: u32 = 64;

/// Level of the top entry of a sorted row on the fine grid (`step / TOP_FINE`): within the
/// codec's error bound of the written value, chosen so that the decoded row keeps the written
/// row's total probability (so the rest bucket `1 - sum` keeps its mass). `None` when the top
/// entry is beyond the fine grid's range (the row's probability is then 0 in float64).
fn top_level(row: &[f32], coarse: &[u32], step: f32, grid: Grid) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the running CPU has AVX2, the one feature the function is compiled for.
        return unsafe { top_level_avx2(row, coarse, step, grid) };
    }
    top_level_baseline(row, coarse, step, grid)
}

/// [`top_level`] compiled for AVX2: eight float32 lanes for its mass sums instead of four;
/// the same IEEE operations (no fused multiply-adds), hence the same level.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn top_level_avx2(row: &[f32], coarse: &[u32], step: f32, grid: Grid) -> Option<u32> {
    top_level_baseline(row, coarse, step, grid)
}

#[inline(always)]
fn top_level_baseline(row: &[f32], coarse: &[u32], step: f32, grid: Grid) -> Option<u32> {
    let &v0 = row.first()?;
    if coarse.is_empty() {
        return None;
    }
    // In units of the fine grid's 2^-e: y exact, the level Q must satisfy
    // |Q m - y| <= (TOP_FINE / 2) m. The bounds are first guessed with 1/m (inexact), then
    // corrected by exact comparisons (y -+ 32 m is exact in float64 wherever it matters:
    // y has 24 significant bits; where y is too small for that, lo is 0 either way).
    let fine = grid.fine();
    let (m, inv_m) = (fine.mult, fine.inv_mult);
    let y = (-f64::from(v0)).max(0.0) * fine.scale;
    let half = f64::from(TOP_FINE / 2) * m;
    let (below, above) = (y - half, y + half);
    let mut lo = (below * inv_m).ceil().max(0.0);
    if lo >= 1.0 && (lo - 1.0) * m >= below {
        lo -= 1.0;
    } else if lo * m < below {
        lo += 1.0;
    }
    let mut hi = (above * inv_m).floor();
    if (hi + 1.0) * m <= above {
        hi += 1.0;
    } else if hi * m > above {
        hi -= 1.0;
    }
    if hi > f64::from(fine.max_level) {
        return None;
    }
    if let Some(&q1) = coarse.get(1) {
        // Keep the decoded row sorted: the top entry may not fall below the second. (The
        // interval stays non-empty: 64 q_1 >= 64 x_1 / step - 32 >= lo.)
        hi = hi.min(f64::from(q1) * f64::from(TOP_FINE));
    }
    // The top entry's probability that keeps the row's mass: p_0 + sum_{j>=1} (p_j - p^_j)
    // = p_0 - sum p_j (e^d_j - 1) with d_j = (decoded - written) log-prob, |d_j| <= s/2.
    // e^d - 1 is taken as d + d^2/2 (relative error below d^2/6 <= 2e-5 for s/2 <= 0.01,
    // and the error bound holds whatever the choice), so each entry needs one exponential, and
    // probabilities only steer the choice, so the cheap one is enough.
    // Float32 is ample: the fine grid needs the target to about 1e-4 relative. Eight
    // running sums, so that the loop vectorizes.
    let correction = |v: f32, q: u32| {
        let d = dequantize(q, step) - v;
        crate::record::approx_exp(v) * (d + 0.5 * d * d)
    };
    let (vs, qs) = (&row[1..coarse.len()], &coarse[1..]);
    let mut acc = [0f32; 8];
    for (v8, q8) in vs.chunks_exact(8).zip(qs.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += correction(v8[i], q8[i]);
        }
    }
    // The last partial chunk as a full one (at K = 64, 7 of the 63 entries): padded with
    // entries decoded exactly (value 0 at level 0), whose correction is exactly 0.
    let tail = vs.len() / 8 * 8;
    let (mut v8, mut q8) = ([0f32; 8], [0u32; 8]);
    for (i, (&v, &q)) in vs[tail..].iter().zip(&qs[tail..]).enumerate().take(8) {
        v8[i] = v;
        q8[i] = q;
    }
    for i in 0..8 {
        acc[i] += correction(v8[i], q8[i]);
    }
    let sum: f32 = acc.iter().sum();
    let target = f64::from(crate::record::approx_exp(v0)) - f64::from(sum);
    let want = if target > 0.0 { -target.ln() * fine.scale * inv_m } else { hi };
    Some(want.round().clamp(lo, hi) as u32)
}

/// Top-K rows store the numbers of this group (ranks 16 and up) two per lead byte
/// ([`pairs`]); groups 0 to 2, and every group of sampled rows, one per lead byte.
pub const PAIRED_GROUP: usize = 3;

/// Lead bytes below this carry the value itself; 255 announces a varint extension.
const LEAD_ESCAPE: u32 = 255;

#[inline]
fn put_small(lead: &mut Vec<u8>, ext: &mut Vec<u8>, v: u32) {
    if v < LEAD_ESCAPE {
        lead.push(v as u8);
    } else {
        lead.push(LEAD_ESCAPE as u8);
        bytes::put_varint(ext, u64::from(v - LEAD_ESCAPE));
    }
}

/// The number coded by an escape lead byte and extension varint `v`: `v + 255`, which a
/// corrupt varint near 2^64 must not wrap around to a small, valid-looking level.
#[inline]
fn escaped(v: u64, loc: &Location) -> Result<u64> {
    v.checked_add(u64::from(LEAD_ESCAPE)).ok_or_else(|| {
        Error::corrupt(loc.clone(), format!("log-probability code 255 + {v} overflows"))
    })
}

#[inline]
fn get_small(lead: &mut ByteReader<'_>, ext: &mut ByteReader<'_>, loc: &Location) -> Result<u64> {
    let b = lead.byte(loc)?;
    if u32::from(b) < LEAD_ESCAPE { Ok(u64::from(b)) } else { escaped(ext.varint(loc)?, loc) }
}

/// Encode the log-probabilities of a chunk's rows into (tag, stream) pairs.
pub fn encode(lp: &[f32], rows: &RowShape<'_>, p: &CodecParams) -> Result<Vec<(u8, Vec<u8>)>> {
    match p.logprobs {
        LogprobCodec::None => Ok(Vec::new()),
        LogprobCodec::Lossless => {
            // Neighbouring ranks share sign, exponent and high mantissa bits: XOR with the
            // previous entry of the row leaves mostly zero high bytes.
            let mut bits = Vec::with_capacity(lp.len());
            rows.for_each_row(|start, n| {
                let mut prev = 0u32;
                for &v in &lp[start..start + n] {
                    bits.push(v.to_bits() ^ prev);
                    prev = v.to_bits();
                }
                Ok(())
            })?;
            Ok(vec![(tag::LP_LOSSLESS, bytes::u32_planes(&bits))])
        }
        LogprobCodec::Kl { bound } => {
            let RowShape::Fixed { k, .. } = rows else {
                return Err(Error::invalid_argument("codec", "the kl codec is for top-K stores"));
            };
            let enc = kl::encode(lp, *k, f64::from(bound));
            let mut out: Vec<(u8, Vec<u8>)> = vec![(tag::LP_ROW_MODES, enc.modes)];
            for (g, (lead, ext)) in enc.leads.into_iter().zip(enc.exts).enumerate() {
                out.push((tag::LP_LEAD + g as u8, lead));
                out.push((tag::LP_EXT + g as u8, ext));
            }
            out.push((tag::LP_LOSSLESS, bytes::u32_planes(&enc.lossless)));
            if enc.any_nonfinite {
                out.push((tag::FINITE_COUNTS, enc.finite));
            }
            Ok(out)
        }
        LogprobCodec::Abs { .. } => {
            let step = p.logprobs.step();
            let grid = p.logprobs.grid();
            let sorted = p.kind == Kind::TopK;
            let mut leads: [Vec<u8>; 4] = Default::default();
            let mut exts: [Vec<u8>; 4] = Default::default();
            let mut finite = Vec::with_capacity(rows.num_rows());
            let mut any_nonfinite = false;
            let mut levels: Vec<u32> = Vec::new();
            let mut deltas: Vec<u32> = Vec::new();
            rows.for_each_row(|start, n| {
                let row = &lp[start..start + n];
                let count = if sorted {
                    // -inf (and anything too negative to quantize) ends a sorted row: the
                    // rest of the row is -inf too.
                    levels.clear();
                    push_levels(row, grid, &mut levels);
                    let mut count =
                        levels.iter().position(|&q| q == u32::MAX).unwrap_or(levels.len());
                    levels.truncate(count);
                    match top_level(row, &levels, step, grid) {
                        Some(q0) => {
                            put_small(&mut leads[0], &mut exts[0], q0);
                            // Ranks 1.. on the coarse grid: the first relative to the top
                            // entry's coarse level minus one (never negative, see FORMAT.md),
                            // then non-negative deltas (non-increasing logprobs).
                            // (q_1 >= q0 / 64 - 1 by the choice of q0, so nothing wraps.)
                            deltas.clear();
                            if let Some(&q1) = levels.get(1) {
                                deltas.push((i64::from(q1) - (q0 / TOP_FINE) as i64 + 1) as u32);
                                deltas.extend(
                                    levels[1..].windows(2).map(|w| w[1].wrapping_sub(w[0])),
                                );
                            }
                            let largest = deltas.iter().copied().max().unwrap_or(0);
                            for (g, &(a, b)) in ids::GROUPS.iter().enumerate().skip(1) {
                                let Some(part) = deltas.get(a - 1..b.min(count).max(a) - 1) else {
                                    continue;
                                };
                                if g == PAIRED_GROUP {
                                    pairs::put_row(&mut leads[g], &mut exts[g], part);
                                } else if largest < LEAD_ESCAPE {
                                    // The common case: one byte per delta, no extensions.
                                    leads[g].extend(part.iter().map(|&d| d as u8));
                                } else {
                                    for &d in part {
                                        put_small(&mut leads[g], &mut exts[g], d);
                                    }
                                }
                            }
                        }
                        None => count = 0,
                    }
                    count
                } else {
                    for (j, &v) in row.iter().enumerate() {
                        let g = ids::group_of(j);
                        // Sampled ids were drawn, so their probability is positive; a level
                        // beyond the range only means "smaller than e^-(max_level step)".
                        put_small(
                            &mut leads[g],
                            &mut exts[g],
                            level(v, grid).unwrap_or(grid.max_level),
                        );
                    }
                    n
                };
                if count < n {
                    any_nonfinite = true;
                }
                bytes::put_varint(&mut finite, count as u64);
                Ok(())
            })?;
            let mut out: Vec<(u8, Vec<u8>)> = Vec::with_capacity(9);
            for (g, (lead, ext)) in leads.into_iter().zip(exts).enumerate() {
                out.push((tag::LP_LEAD + g as u8, lead));
                out.push((tag::LP_EXT + g as u8, ext));
            }
            if any_nonfinite {
                out.push((tag::FINITE_COUNTS, finite));
            }
            Ok(out)
        }
    }
}

/// [`decode`] into `out`, which must hold exactly `num_entries` slots; every slot is written
/// when this returns Ok. Top-K rows of the abs codec without -inf are decoded in place; the
/// other cases are decoded, then copied.
pub(crate) fn decode_into(
    s: &mut Streams,
    rows: &RowShape<'_>,
    num_entries: usize,
    p: &CodecParams,
    loc: &Location,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if let (LogprobCodec::Abs { .. }, RowShape::Fixed { rows, k }) = (p.logprobs, rows)
        && s.len(tag::FINITE_COUNTS) == 0
    {
        let raw: [(Vec<u8>, Vec<u8>); 4] = std::array::from_fn(|g| {
            (s.optional(tag::LP_LEAD + g as u8), s.optional(tag::LP_EXT + g as u8))
        });
        let (step, max_level) = (p.logprobs.step(), p.logprobs.max_level());
        return decode_sorted_full_into(&raw, *rows, *k, step, max_level, loc, out);
    }
    let values = decode(s, rows, num_entries, p, loc)?;
    if values.len() != out.len() {
        return Err(Error::State(format!(
            "{} log-probabilities for {} slots",
            values.len(),
            out.len()
        )));
    }
    for (slot, v) in out.iter_mut().zip(values) {
        slot.write(v);
    }
    Ok(())
}

/// The finite counts stream (tag 25), `None` when absent or listed empty: an empty stream
/// cannot hold a count for any row, so it means what an absent one means (every entry is
/// finite), as every other empty stream means what its absence does.
fn finite_counts(s: &mut Streams) -> Option<Vec<u8>> {
    s.take(tag::FINITE_COUNTS).filter(|f| !f.is_empty())
}

/// Decode the log-probabilities of a chunk's rows from its streams.
pub(crate) fn decode(
    s: &mut Streams,
    rows: &RowShape<'_>,
    num_entries: usize,
    p: &CodecParams,
    loc: &Location,
) -> Result<Vec<f32>> {
    match p.logprobs {
        LogprobCodec::None => Ok(Vec::new()),
        LogprobCodec::Lossless => {
            let raw = s.optional(tag::LP_LOSSLESS);
            let bits = bytes::u32_from_planes(&raw, num_entries, "log-probabilities", loc)?;
            let mut out = Vec::with_capacity(num_entries);
            rows.for_each_row(|start, n| {
                let mut prev = 0u32;
                for &x in &bits[start..start + n] {
                    prev ^= x;
                    out.push(f32::from_bits(prev));
                }
                Ok(())
            })?;
            Ok(out)
        }
        LogprobCodec::Kl { .. } => {
            let RowShape::Fixed { rows, k } = rows else {
                return Err(Error::corrupt(loc.clone(), "kl codec in a sampled store"));
            };
            let modes = s.optional(tag::LP_ROW_MODES);
            let leads: [Vec<u8>; 4] = std::array::from_fn(|g| s.optional(tag::LP_LEAD + g as u8));
            let exts: [Vec<u8>; 4] = std::array::from_fn(|g| s.optional(tag::LP_EXT + g as u8));
            let lossless = s.optional(tag::LP_LOSSLESS);
            let finite = finite_counts(s);
            kl::decode(&modes, &leads, &exts, &lossless, finite.as_deref(), *rows, *k, loc)
        }
        LogprobCodec::Abs { .. } => {
            let (step, max_level) = (p.logprobs.step(), p.logprobs.max_level());
            let raw: [(Vec<u8>, Vec<u8>); 4] = std::array::from_fn(|g| {
                (s.optional(tag::LP_LEAD + g as u8), s.optional(tag::LP_EXT + g as u8))
            });
            let finite_raw = finite_counts(s);
            match (rows, finite_raw) {
                (RowShape::Fixed { rows, k }, None) => {
                    decode_sorted_full(&raw, *rows, *k, step, max_level, loc)
                }
                (rows, finite_raw) => decode_general(
                    &raw,
                    finite_raw.as_deref(),
                    rows,
                    num_entries,
                    (step, max_level),
                    p.kind == Kind::TopK,
                    loc,
                ),
            }
        }
    }
}

/// Decoder state along one sorted (top-K) row: the top entry's level on the fine grid, then
/// the coarse level relative to it, then deltas.
struct SortedRow<'a> {
    step: f32,
    fine: f32,
    max_level: u32,
    j: usize,
    q: i64,
    loc: &'a Location,
}

impl<'a> SortedRow<'a> {
    fn new(step: f32, max_level: u32, loc: &'a Location) -> Self {
        SortedRow { step, fine: step / TOP_FINE as f32, max_level, j: 0, q: 0, loc }
    }

    fn start(&mut self) {
        self.j = 0;
    }

    #[inline]
    fn next(&mut self, v: u64) -> Result<f32> {
        let range = |q: i64| {
            Error::corrupt(self.loc.clone(), format!("log-probability level {q} out of range"))
        };
        let j = self.j;
        self.j += 1;
        if j == 0 {
            let q0 = i64::try_from(v).unwrap_or(i64::MAX);
            if q0 > i64::from(self.max_level) {
                return Err(range(q0));
            }
            self.q = q0 / i64::from(TOP_FINE) - 1;
            return Ok(dequantize(q0 as u32, self.fine));
        }
        let q = self.q.saturating_add(i64::try_from(v).unwrap_or(i64::MAX));
        if !(0..=i64::from(self.max_level)).contains(&q) {
            return Err(range(q));
        }
        self.q = q;
        Ok(dequantize(q as u32, self.step))
    }
}

/// Top-K rows without -inf: every lead stream holds exactly one byte per entry of its group,
/// so rows are decoded straight into the output, group by group.
fn decode_sorted_full(
    raw: &[(Vec<u8>, Vec<u8>); 4],
    rows: usize,
    k: usize,
    step: f32,
    max_level: u32,
    loc: &Location,
) -> Result<Vec<f32>> {
    // Written without zeroing first (see ids::Table::decode_rows).
    let n = rows.checked_mul(k).ok_or_else(|| Error::corrupt(loc.clone(), "too many entries"))?;
    let mut out: Vec<f32> = Vec::with_capacity(n);
    decode_sorted_full_into(
        raw,
        rows,
        k,
        step,
        max_level,
        loc,
        &mut out.spare_capacity_mut()[..n],
    )?;
    // SAFETY: decode_sorted_full_into returned Ok, so it wrote all n slots.
    unsafe { out.set_len(n) };
    Ok(out)
}

/// Pair bytes `codes` of a sorted row's paired group into `slots` (two entries per byte; an
/// odd row's last byte has one, and its pad must be 0), levels counted on from `*q`, escaped
/// pairs read from `ext`. Returns whether a level left `0..=max` and whether a byte was
/// invalid or a pad not 0 (the caller fails the chunk after its loop); Err when `ext` ends.
/// Escaped values are capped at 2 MAX_LEVEL, so the sums cannot overflow.
#[inline(always)]
fn pair_codes(
    codes: &[u8],
    slots: &mut [MaybeUninit<f32>],
    q: &mut i64,
    ext: &mut ByteReader<'_>,
    (max, step): (u64, f32),
    loc: &Location,
) -> Result<(bool, bool)> {
    let (mut bad, mut bad_pair) = (false, false);
    let mut slots = slots.iter_mut();
    for &c in codes {
        let (a, b) = match pairs::UNPAIR[usize::from(c)] {
            pairs::ESCAPED => {
                let mut big = || -> Result<i64> {
                    let v = ext.varint(loc)?;
                    Ok(i64::try_from(v).unwrap_or(i64::MAX).min(2 * i64::from(MAX_LEVEL)))
                };
                (big()?, big()?)
            }
            pairs::INVALID => {
                bad_pair = true;
                (0, 0)
            }
            ab => (i64::from(ab & 0xFF), i64::from(ab >> 8)),
        };
        *q += a;
        bad |= (*q as u64) > max;
        if let Some(slot) = slots.next() {
            slot.write(dequantize(*q as u32, step));
        }
        match slots.next() {
            Some(slot) => {
                *q += b;
                bad |= (*q as u64) > max;
                slot.write(dequantize(*q as u32, step));
            }
            // The pad of an odd row.
            None => bad_pair |= b != 0,
        }
    }
    Ok((bad, bad_pair))
}

/// [`decode_sorted_full`] into `out`, which must hold exactly `rows * k` slots; every slot is
/// written when this returns Ok.
fn decode_sorted_full_into(
    raw: &[(Vec<u8>, Vec<u8>); 4],
    rows: usize,
    k: usize,
    step: f32,
    max_level: u32,
    loc: &Location,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if Some(out.len()) != rows.checked_mul(k) {
        return Err(Error::State(format!("{} log-prob slots for {rows} rows of {k}", out.len())));
    }
    let widths: [usize; 4] =
        std::array::from_fn(|g| ids::GROUPS[g].1.min(k).saturating_sub(ids::GROUPS[g].0));
    // Lead bytes per row: one per entry, or one per pair in the paired group.
    let codes_per_row: [usize; 4] = std::array::from_fn(|g| {
        if g == PAIRED_GROUP { pairs::lead_bytes(widths[g]) } else { widths[g] }
    });
    for (g, (lead, _)) in raw.iter().enumerate() {
        if lead.len() != rows * codes_per_row[g] {
            return Err(Error::corrupt(
                loc.clone(),
                format!(
                    "log-probability stream {g} has {} codes, expected {}",
                    lead.len(),
                    rows * codes_per_row[g]
                ),
            ));
        }
    }
    let mut exts: Vec<ByteReader<'_>> =
        raw.iter().map(|(_, e)| ByteReader::new(e, "log-probability extension")).collect();
    let widths_sum: usize = widths.iter().sum();
    if widths_sum != k {
        return Err(Error::State(format!("log-prob groups cover {widths_sum} of {k} ranks")));
    }
    let fine = step / TOP_FINE as f32;
    // Levels stay in 0..=max_level along a valid row; an entry outside sets `bad`, which
    // fails the chunk after the loop, so the per-entry work has no early exit. Escaped
    // values are capped at 2 MAX_LEVEL (deltas are never negative, so a larger one leaves
    // the range whatever came before), so the sums cannot overflow.
    let max = u64::from(max_level);
    let (mut bad, mut bad_pair) = (false, false);
    let mut at = [0usize; 4];
    for row in out.chunks_exact_mut(k.max(1)) {
        let mut q: i64 = 0;
        let mut j = 0usize;
        for (g, (lead, _)) in raw.iter().enumerate() {
            let (w, nc) = (widths[g], codes_per_row[g]);
            let (Some(codes), Some(slots)) = (lead.get(at[g]..at[g] + nc), row.get_mut(j..j + w))
            else {
                return Err(Error::corrupt(loc.clone(), "log-probability stream ends early"));
            };
            at[g] += nc;
            if g == PAIRED_GROUP {
                // Blocks of 8 pair bytes (16 entries) without an escape or invalid byte go
                // through SSE2; a quarter of the rows of the benchmark corpus hold an
                // escape somewhere in the group, so blocks, not rows, fall back to the
                // scalar loop.
                let blocks = if cfg!(target_arch = "x86_64") {
                    (codes.len() / 8).min(slots.len() / 16)
                } else {
                    0
                };
                let (block_codes, codes) = codes.split_at(8 * blocks);
                let (block_slots, slots) = slots.split_at_mut(16 * blocks);
                #[cfg(target_arch = "x86_64")]
                for (c8, s16) in block_codes.chunks_exact(8).zip(block_slots.chunks_exact_mut(16)) {
                    let (Ok(c8), Ok(s16)) =
                        (<&[u8; 8]>::try_from(c8), <&mut [_; 16]>::try_from(s16))
                    else {
                        return Err(Error::State("pair blocks of other than 8 bytes".into()));
                    };
                    match pairs_sse2::plain_block(c8, s16, q, step) {
                        Some(total) => {
                            // Levels only grow along a row: the first and last bound them.
                            let first = q + i64::from(c8[0] / pairs::PAIR_BASE);
                            q += total;
                            bad |= (first as u64) > max || (q as u64) > max;
                        }
                        None => {
                            let (b, p) =
                                pair_codes(c8, s16, &mut q, &mut exts[g], (max, step), loc)?;
                            bad |= b;
                            bad_pair |= p;
                        }
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (block_codes, block_slots);
                let (b, p) = pair_codes(codes, slots, &mut q, &mut exts[g], (max, step), loc)?;
                bad |= b;
                bad_pair |= p;
                j += w;
                continue;
            }
            for (slot, &c) in slots.iter_mut().zip(codes) {
                let v = if c != LEAD_ESCAPE as u8 {
                    i64::from(c)
                } else {
                    let v = escaped(exts[g].varint(loc)?, loc)?;
                    i64::try_from(v).unwrap_or(i64::MAX).min(2 * i64::from(MAX_LEVEL))
                };
                if g == 0 {
                    // The top entry, on the fine grid; the next level counts from its coarse
                    // level minus one.
                    bad |= v as u64 > max;
                    slot.write(dequantize(v as u32, fine));
                    q = v / i64::from(TOP_FINE) - 1;
                } else {
                    q += v;
                    bad |= (q as u64) > max;
                    slot.write(dequantize(q as u32, step));
                }
            }
            j += w;
        }
    }
    if bad_pair {
        return Err(Error::corrupt(
            loc.clone(),
            "log-probability pair byte above 225, or an odd row's pad is not 0",
        ));
    }
    if bad {
        return Err(Error::corrupt(loc.clone(), "log-probability level out of range"));
    }
    for e in &exts {
        e.finish(loc)?;
    }
    // Every slot was written: the widths add up to k (checked above), every row of k slots
    // (out.len() / k of them, k > 0 when out is not empty) went through the four groups, and
    // each group wrote its w slots (codes and slots both hold exactly w, or the loop returned
    // an error; in the paired group each block of 8 codes wrote its 16 slots, by SSE2 or by
    // `pair_codes`, and the ceil(w / 2) - 8 b codes after the b blocks each wrote the next
    // of the w - 16 b slots left and then the one after it if any: 2 ceil(w / 2) - 16 b >=
    // w - 16 b slots in order).
    Ok(())
}

/// The paired group of a top-K row, eight pair bytes (sixteen entries) at a time, with
/// SSE2 (part of every x86-64 CPU).
#[cfg(target_arch = "x86_64")]
mod pairs_sse2 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use crate::codec::pairs::{PAIR_BASE, PAIR_ESCAPE};

    /// Decode 8 pair bytes into 16 entries, levels counted from `q`; returns the sum of the
    /// 16 deltas, or None (nothing written) when a byte is an escape or invalid (>= 225).
    ///
    /// A byte c < 225 holds a = c / 15 (computed as (137 c) >> 11, exact for c < 225) and
    /// b = c - 15 a; the levels are q plus the running sums of a0, b0, a1, b1, ... (in
    /// 16-bit lanes: a block adds at most 16 x 14), converted to float32 as `dequantize`
    /// does: 0 - level * step, the same IEEE operations.
    #[inline]
    pub(super) fn plain_block(
        c8: &[u8; 8],
        s16: &mut [MaybeUninit<f32>; 16],
        q: i64,
        step: f32,
    ) -> Option<i64> {
        if c8.iter().fold(0u8, |m, &c| m.max(c)) >= PAIR_ESCAPE {
            return None;
        }
        // SAFETY: SSE2 is part of the x86-64 baseline; the one load reads the 8 bytes of
        // `c8` and the four stores write the 64 bytes of `s16` (16 f32 slots), references
        // of exactly those sizes.
        Some(unsafe { block(c8, s16, q, step) })
    }

    /// One block: writes 16 entries from level `q`, returns the sum of its 16 deltas.
    #[inline(always)]
    unsafe fn block(c8: &[u8; 8], s16: &mut [MaybeUninit<f32>; 16], q: i64, step: f32) -> i64 {
        // SAFETY: see `plain_block`.
        unsafe {
            let zero = _mm_setzero_si128();
            let c = _mm_unpacklo_epi8(_mm_loadl_epi64(c8.as_ptr().cast()), zero);
            let a = _mm_srli_epi16::<11>(_mm_mullo_epi16(c, _mm_set1_epi16(137)));
            let b = _mm_sub_epi16(c, _mm_mullo_epi16(a, _mm_set1_epi16(i16::from(PAIR_BASE))));
            let running = |v: __m128i| {
                let v = _mm_add_epi16(v, _mm_slli_si128::<2>(v));
                let v = _mm_add_epi16(v, _mm_slli_si128::<4>(v));
                _mm_add_epi16(v, _mm_slli_si128::<8>(v))
            };
            let lo = running(_mm_unpacklo_epi16(a, b));
            let hi = running(_mm_unpackhi_epi16(a, b));
            let lo_total = _mm_extract_epi16::<7>(lo);
            let total = lo_total + _mm_extract_epi16::<7>(hi);
            // (A corrupt chunk's level may not fit i32; the chunk then fails on its range.)
            let base_lo = _mm_set1_epi32(q as i32);
            let base_hi = _mm_set1_epi32((q as i32).wrapping_add(lo_total));
            let vstep = _mm_set1_ps(step);
            let out = s16.as_mut_ptr().cast::<f32>();
            for (i, (v, base)) in [
                (_mm_unpacklo_epi16(lo, zero), base_lo),
                (_mm_unpackhi_epi16(lo, zero), base_lo),
                (_mm_unpacklo_epi16(hi, zero), base_hi),
                (_mm_unpackhi_epi16(hi, zero), base_hi),
            ]
            .into_iter()
            .enumerate()
            {
                let level = _mm_cvtepi32_ps(_mm_add_epi32(v, base));
                _mm_storeu_ps(
                    out.add(4 * i),
                    _mm_sub_ps(_mm_setzero_ps(), _mm_mul_ps(level, vstep)),
                );
            }
            i64::from(total)
        }
    }
}

/// Any row shape, with or without finite counts: one entry at a time.
fn decode_general(
    raw: &[(Vec<u8>, Vec<u8>); 4],
    finite_raw: Option<&[u8]>,
    rows: &RowShape<'_>,
    num_entries: usize,
    (step, max_level): (f32, u32),
    sorted: bool,
    loc: &Location,
) -> Result<Vec<f32>> {
    let mut readers: Vec<(ByteReader<'_>, ByteReader<'_>)> = raw
        .iter()
        .map(|(l, e)| {
            (
                ByteReader::new(l, "log-probabilities"),
                ByteReader::new(e, "log-probability extension"),
            )
        })
        .collect();
    let mut paired = pairs::PairReader::new(&raw[PAIRED_GROUP].0, &raw[PAIRED_GROUP].1);
    let mut fr = finite_raw.map(|f| ByteReader::new(f, "finite counts"));
    let mut out = vec![f32::NEG_INFINITY; num_entries];
    let mut sorted_row = SortedRow::new(step, max_level, loc);
    rows.for_each_row(|start, n| {
        let finite = match fr.as_mut() {
            Some(f) => f.varint(loc)? as usize,
            None => n,
        };
        if finite > n {
            return Err(Error::corrupt(
                loc.clone(),
                format!("row of {n} entries claims {finite} finite log-probabilities"),
            ));
        }
        sorted_row.start();
        for (j, slot) in out[start..start + finite].iter_mut().enumerate() {
            let g = ids::group_of(j);
            let v = if sorted && g == PAIRED_GROUP {
                paired.next(loc)?
            } else {
                let (lead, ext) = &mut readers[g];
                get_small(lead, ext, loc)?
            };
            *slot = if sorted {
                sorted_row.next(v)?
            } else {
                if v > u64::from(max_level) {
                    return Err(Error::corrupt(
                        loc.clone(),
                        format!("log-probability level {v} out of range"),
                    ));
                }
                dequantize(v as u32, step)
            };
        }
        if sorted {
            paired.end_row(loc)?;
        }
        Ok(())
    })?;
    for (g, (lead, ext)) in readers.iter().enumerate() {
        if sorted && g == PAIRED_GROUP {
            paired.finish(loc)?;
        } else {
            lead.finish(loc)?;
            ext.finish(loc)?;
        }
    }
    if let Some(f) = fr {
        f.finish(loc)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// The top-K fast path against the entry-at-a-time decoder, on streams of random
        /// codes (escapes included, many out of range) and on corrupted encoder output:
        /// same values, same verdict.
        #[test]
        fn fast_sorted_decoder_agrees_with_the_general_one(
            k in 1usize..70,
            rows in 0usize..12,
            seed in proptest::prelude::any::<u64>(),
            escapes in 0u32..4,
        ) {
            let loc = Location::default();
            let mut x = seed | 1;
            let mut next = || crate::test_util::xorshift(&mut x);
            let mut raw: [(Vec<u8>, Vec<u8>); 4] = Default::default();
            let w3 = k.saturating_sub(ids::GROUPS[PAIRED_GROUP].0);
            for j in 0..rows * k {
                let g = ids::group_of(j % k);
                let r = next();
                if g == PAIRED_GROUP {
                    // Pair codes, one per two entries: small pairs, escapes (whose numbers
                    // may leave the range), rarely a byte past the escape; an odd row's
                    // pad is whatever the byte says (usually 0: small second numbers).
                    if (j % k - ids::GROUPS[PAIRED_GROUP].0) % 2 == 1 {
                        continue;
                    }
                    let c = if (r % 16) < u64::from(escapes) {
                        for shift in [8, 30] {
                            let v = match r % 3 {
                                0 => (r >> shift) % 40,
                                1 => (r >> shift) % (1 << 26),
                                _ => r >> 2,
                            };
                            bytes::put_varint(&mut raw[g].1, v);
                        }
                        pairs::PAIR_ESCAPE
                    } else if r % 97 == 0 {
                        pairs::PAIR_ESCAPE + 1 + (r >> 8) as u8 % 30
                    } else if w3 % 2 == 1 && j % k == k - 1 && r % 5 != 0 {
                        (r >> 8) as u8 % 8 * pairs::PAIR_BASE
                    } else {
                        (r >> 8) as u8 % 8 * pairs::PAIR_BASE + (r >> 16) as u8 % 8
                    };
                    raw[g].0.push(c);
                    continue;
                }
                if (r % 16) < u64::from(escapes) {
                    raw[g].0.push(LEAD_ESCAPE as u8);
                    let v = match r % 3 {
                        0 => (r >> 8) % 1000,
                        1 => (r >> 8) % (1 << 26),
                        _ => r >> 2,
                    };
                    bytes::put_varint(&mut raw[g].1, v);
                } else {
                    raw[g].0.push((r >> 8) as u8 % if j % k == 0 { 255 } else { 8 });
                }
            }
            // Occasionally a stray extension byte.
            if next() % 8 == 0 {
                raw[3].1.push(1);
            }
            let shape = RowShape::Fixed { rows, k };
            // A power-of-two step, or 5 2^-8 with its lower level limit.
            let c = LogprobCodec::Abs { step_log2: 6 + 2 * (seed & 1) as i32, mult: 1 + 4 * (seed & 1) as u32 };
            let (step, max) = (c.step(), c.max_level());
            let fast = decode_sorted_full(&raw, rows, k, step, max, &loc);
            let plain = decode_general(&raw, None, &shape, rows * k, (step, max), true, &loc);
            proptest::prop_assert_eq!(fast.is_ok(), plain.is_ok());
            if let (Ok(a), Ok(b)) = (fast, plain) {
                proptest::prop_assert_eq!(
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    proptest::proptest! {
        /// The SSE2 pair block against the pair table, one entry at a time: same values,
        /// the sum of the deltas; blocks with an escape or invalid byte are refused, with
        /// nothing written.
        #[test]
        fn sse2_pairs_agree_with_the_pair_table(
            codes in proptest::array::uniform8(0u8..pairs::PAIR_ESCAPE),
            odd in proptest::option::of((0usize..8, pairs::PAIR_ESCAPE..=255u8)),
            q0 in -1i64..(1 << 20),
            codec in proptest::sample::select(all_abs_codecs().collect::<Vec<_>>()),
        ) {
            let step = codec.step();
            let mut codes = codes;
            if let Some((at, c)) = odd {
                codes[at] = c;
            }
            let mut slots = [std::mem::MaybeUninit::new(f32::NAN); 16];
            let got = pairs_sse2::plain_block(&codes, &mut slots, q0, step);
            // SAFETY: every slot was initialized (NaN) before the call.
            let have: Vec<u32> =
                slots.iter().map(|s| unsafe { s.assume_init() }.to_bits()).collect();
            if odd.is_some() {
                proptest::prop_assert_eq!(got, None);
                proptest::prop_assert!(have.iter().all(|&v| v == f32::NAN.to_bits()));
            } else {
                let mut q = q0;
                let mut want = Vec::new();
                for &c in &codes {
                    let ab = pairs::UNPAIR[usize::from(c)];
                    for d in [ab & 0xFF, ab >> 8] {
                        q += i64::from(d);
                        want.push(dequantize(q as u32, step).to_bits());
                    }
                }
                proptest::prop_assert_eq!(have, want);
                proptest::prop_assert_eq!(got, Some(q - q0));
            }
        }
    }

    /// A row whose levels leave the range only inside plain pair blocks (no escape in the
    /// paired group: the block path) fails like any other out-of-range level, in both
    /// decoders; one step less stays inside.
    #[test]
    fn plain_pair_blocks_past_the_last_level_are_corrupt() {
        let loc = Location::default();
        let c = LogprobCodec::Abs { step_log2: 8, mult: 5 };
        let (step, max) = (c.step(), c.max_level());
        let k = 64;
        for over in [true, false] {
            let mut raw: [(Vec<u8>, Vec<u8>); 4] = Default::default();
            // The top entry at fine level 64 (the next count from 0), rank 1 at max - 11 (an
            // escaped delta), then deltas of 0 but the last pair's (0, 12 or 11).
            let (lead, ext) = &mut raw[0];
            put_small(lead, ext, TOP_FINE);
            let (lead, ext) = &mut raw[1];
            for d in [max - 11, 0, 0] {
                put_small(lead, ext, d);
            }
            raw[2].0.extend([0; 12]);
            raw[3].0.extend([0; 23]);
            raw[3].0.push(if over { 12 } else { 11 });
            let shape = RowShape::Fixed { rows: 1, k };
            let fast = decode_sorted_full(&raw, 1, k, step, max, &loc);
            let plain = decode_general(&raw, None, &shape, k, (step, max), true, &loc);
            assert_eq!((fast.is_err(), plain.is_err()), (over, over), "over {over}");
        }
    }

    /// Every plain pair byte once (the division by 15 is a multiply and shift).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse2_pairs_decode_every_pair_byte() {
        let mut codes: Vec<u8> = (0..pairs::PAIR_ESCAPE).collect();
        codes.resize(codes.len().next_multiple_of(8), 0);
        let mut slots = vec![std::mem::MaybeUninit::new(f32::NAN); 2 * codes.len()];
        let mut last = 0i64;
        for (c8, s16) in codes.chunks_exact(8).zip(slots.chunks_exact_mut(16)) {
            let (c8, s16) = (c8.try_into().unwrap(), s16.try_into().unwrap());
            last += pairs_sse2::plain_block(c8, s16, last, 1.0).unwrap();
        }
        let mut q = 0i64;
        for (pair, &c) in slots.chunks(2).zip(&codes) {
            let ab = pairs::UNPAIR[usize::from(c)];
            for (slot, d) in pair.iter().zip([ab & 0xFF, ab >> 8]) {
                q += i64::from(d);
                // SAFETY: every slot was initialized (NaN) before the call.
                assert_eq!(unsafe { slot.assume_init() }, -(q as f32), "byte {c}");
            }
        }
        assert_eq!(last, q);
    }

    #[test]
    fn level_range_edges_are_checked_by_both_decoders() {
        let loc = Location::default();
        // One row of K = 2: the top entry's fine level, then the delta of the second entry
        // from (top / 64 - 1).
        let row = |q0: u64, d: u64| -> [(Vec<u8>, Vec<u8>); 4] {
            let (mut l0, mut e0, mut l1, mut e1) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (v, l, e) in [(q0, &mut l0, &mut e0), (d, &mut l1, &mut e1)] {
                if v < 255 {
                    l.push(v as u8);
                } else {
                    l.push(255);
                    bytes::put_varint(e, v - 255);
                }
            }
            [(l0, e0), (l1, e1), Default::default(), Default::default()]
        };
        for c in [
            LogprobCodec::Abs { step_log2: 6, mult: 1 },
            LogprobCodec::Abs { step_log2: 8, mult: 5 },
        ] {
            let (step, max) = (c.step(), u64::from(c.max_level()));
            assert_eq!(max, u64::from(MAX_LEVEL) / u64::from(c.grid().mult as u32));
            for (q0, d, ok) in [
                (0, 1, true),
                (0, 0, false),
                (64, 0, true),
                (max, 1, true),
                (max + 1, 1, false),
                (0, max + 1, true),
                (0, max + 2, false),
            ] {
                let raw = row(q0, d);
                let shape = RowShape::Fixed { rows: 1, k: 2 };
                let fast = decode_sorted_full(&raw, 1, 2, step, max as u32, &loc);
                let plain = decode_general(&raw, None, &shape, 2, (step, max as u32), true, &loc);
                assert_eq!(fast.is_ok(), ok, "{c:?} q0 {q0} d {d}");
                assert_eq!(plain.is_ok(), ok, "{c:?} q0 {q0} d {d}");
            }
        }
    }

    #[test]
    fn parse_and_steps() {
        let abs = |step_log2, mult| LogprobCodec::Abs { step_log2, mult };
        assert_eq!(LogprobCodec::parse("abs:0.01").unwrap(), abs(8, 5));
        assert_eq!(crate::writer::default_codec(Kind::TopK), abs(8, 5));
        assert_eq!(LogprobCodec::parse("abs:0.0078125").unwrap(), abs(6, 1));
        assert_eq!(LogprobCodec::parse("abs:0.5").unwrap(), abs(3, 7));
        assert_eq!(LogprobCodec::parse("abs:1e-4").unwrap(), abs(13, 1));
        assert_eq!(LogprobCodec::parse("abs:6.2e-5").unwrap(), abs(13, 1));
        assert!(LogprobCodec::parse("abs:1e-6").is_err());
        assert!(LogprobCodec::parse("abs:6e-5").is_err());
        assert!(LogprobCodec::parse("abs:nan").is_err());
        assert!(LogprobCodec::parse("abs:0").is_err());
        assert!(LogprobCodec::parse("zip").is_err());
        let all: Vec<LogprobCodec> = all_abs_codecs().collect();
        let mut steps: Vec<f32> = all.iter().map(|c| c.step()).collect();
        steps.sort_by(f32::total_cmp);
        steps.dedup();
        assert_eq!(steps.len(), all.len(), "every step has one (e, m)");
        for &c in &all {
            let LogprobCodec::Abs { step_log2, mult } = c else { unreachable!() };
            assert_eq!(f64::from(c.step()), f64::from(mult) * 2f64.powi(-step_log2));
            assert!((SMALLEST_STEP..=2.0).contains(&c.step()));
            // The top entry's grid reaches about 32 nats (> ln 2^31 = 21.5).
            assert!(f64::from(c.max_level()) * f64::from(c.step()) / 64.0 > 31.9, "{c:?}");
            assert_eq!(LogprobCodec::from_header(2, c.step(), 0.0), Some(c));
            assert_eq!(c.max_abs_error().unwrap(), f64::from(c.step()) / 2.0);
        }
        assert_eq!(LogprobCodec::from_header(2, 9.0 * 2f32.powi(-8), 0.0), None);
        assert_eq!(LogprobCodec::from_header(2, 4.0, 0.0), None);
        assert_eq!(LogprobCodec::from_header(2, 2f32.powi(-14), 0.0), None);
        for b in [6.2e-5, 3e-4, 0.01, 0.0195, 0.3, 1.0] {
            let c = LogprobCodec::parse(&format!("abs:{b}")).unwrap();
            assert!(c.max_abs_error().unwrap() <= b, "{b}");
            // The largest step that fits.
            assert!(all.iter().all(|o| o.max_abs_error().unwrap() > b || o.step() <= c.step()));
        }
    }

    #[test]
    fn escaped_level_near_2_pow_64_is_an_error_not_a_wrapped_level() {
        // Lead byte 255 + varint(2^64 - 255) used to wrap to level 0, a valid -0.0.
        let loc = Location::default();
        let mut ext = Vec::new();
        bytes::put_varint(&mut ext, u64::MAX - 254);
        let raw: [(Vec<u8>, Vec<u8>); 4] =
            [(vec![255], ext.clone()), (vec![], vec![]), (vec![], vec![]), (vec![], vec![])];
        assert!(decode_sorted_full(&raw, 1, 1, 0.5, MAX_LEVEL, &loc).is_err());
        let rows = RowShape::Fixed { rows: 1, k: 1 };
        assert!(decode_general(&raw, None, &rows, 1, (0.5, MAX_LEVEL), true, &loc).is_err());
        assert!(decode_general(&raw, None, &rows, 1, (0.5, MAX_LEVEL), false, &loc).is_err());
    }

    use proptest::strategy::Strategy;

    /// floor(y / m + 1/2) for y = -v 2^e, in exact integer arithmetic (y 2^64 is an integer
    /// below 2^94 where it matters), or u32::MAX beyond the codec's range.
    fn exact_level(v: f32, e: i32, m: u32) -> u32 {
        let y = -f64::from(v) * 2f64.powi(e);
        if y.is_nan() || y * 2f64.powi(-30) > 1.0 {
            return u32::MAX;
        }
        if y < 2f64.powi(-40) {
            return 0;
        }
        let big = (y * 2f64.powi(64)) as u128; // exact: an integer times a power of two
        let (one, m) = (1u128 << 64, u128::from(m));
        let q = (2 * big + m * one) / (2 * m * one);
        if q > u128::from(MAX_LEVEL) / m { u32::MAX } else { q as u32 }
    }

    proptest::proptest! {
        /// The level is round-half-up of -logprob / step, exactly (against integer
        /// arithmetic), over the whole float32 range (the random bit patterns include NaN,
        /// infinities and subnormals) and near the rounding edges of each multiplier, and
        /// `level` is its Option form.
        #[test]
        fn level_is_round_half_up(
            (v, in_steps) in proptest::prop_oneof![
                proptest::prelude::any::<u32>().prop_map(|b| (f32::from_bits(b), false)),
                (-100f32..1e-3).prop_map(|v| (v, false)),
                // Within 2 ulps of -(q + 1/2) steps: the ties.
                (0u32..1 << 22, -2i32..=2).prop_map(|(q, d)| {
                    (f32::from_bits((-(q as f32 + 0.5)).to_bits().wrapping_add(d as u32)), true)
                }),
            ],
            e in 1i32..=22,
            mi in 0usize..4,
        ) {
            let m = STEP_MULTIPLIERS[mi];
            let v = if in_steps { v * m as f32 * 2f32.powi(-e) } else { v };
            let grid = Grid::new(e, m);
            let want = exact_level(v, e, m);
            proptest::prop_assert_eq!(level_or_max(v, grid), want, "{} e {} m {}", v, e, m);
            proptest::prop_assert_eq!(level(v, grid), (want != u32::MAX).then_some(want));
        }
    }

    #[test]
    fn level_at_the_rounding_edges() {
        for m in STEP_MULTIPLIERS {
            let max = MAX_LEVEL / m;
            for q in [0u32, 1, 2, (1 << 20) - 1, 1 << 20, max - 1, max, max + 1] {
                for x in [q as f64, q as f64 + 0.5, q as f64 - 0.5] {
                    let x = (x * f64::from(m) * 2f64.powi(-8)) as f32;
                    for v in
                        [-x, f32::from_bits((-x).to_bits() + 1), f32::from_bits((-x).to_bits() - 1)]
                    {
                        let want = exact_level(v, 8, m);
                        assert_eq!(level_or_max(v, Grid::new(8, m)), want, "{v} m {m}");
                    }
                }
            }
        }
    }

    #[test]
    fn level_rounds_to_nearest() {
        let unit = Grid::new(0, 1);
        for (x, q) in [(0.0f32, 0), (0.49, 0), (0.5, 1), (1.4999, 1), (2.5, 3), (7.0, 7)] {
            assert_eq!(level(-x, unit), Some(q), "{x}");
        }
        // Step 5 2^-8: 1 nat is 51.2 steps, 1.2890625 nats exactly 66 (a tie, rounded up).
        assert_eq!(level(-1.0, Grid::new(8, 5)), Some(51));
        assert_eq!(level(-0.998_046_9, Grid::new(8, 5)), Some(51));
        assert_eq!(level(-(65.5 * 5.0 / 256.0), Grid::new(8, 5)), Some(66));
        assert_eq!(level(1e-7, Grid::new(6, 1)), Some(0));
        assert_eq!(level(f32::NEG_INFINITY, Grid::new(6, 1)), None);
        assert_eq!(level(f32::NAN, Grid::new(8, 5)), None);
    }

    proptest::proptest! {
        /// The AVX2 build of the level loop (taken on this machine when it has AVX2) gives
        /// the baseline build's levels, edge values included.
        #[test]
        fn dispatched_levels_match_the_baseline(
            row in proptest::collection::vec(
                proptest::prop_oneof![
                    -40.0f32..0.0,
                    proptest::num::f32::ANY,
                    proptest::sample::select(vec![0.0f32, -0.0, f32::NEG_INFINITY, -1e-30,
                                                  -65536.0, -1e9])],
                0..70),
            codec in proptest::sample::select(all_abs_codecs().collect::<Vec<_>>()),
        ) {
            let grid = codec.grid();
            let (mut a, mut b) = (vec![7u32], vec![7u32]);
            push_levels(&row, grid, &mut a);
            push_levels_baseline(&row, grid, &mut b);
            let want: Vec<u32> =
                [7].into_iter().chain(row.iter().map(|&v| level_or_max(v, grid))).collect();
            proptest::prop_assert_eq!(&a, &want);
            proptest::prop_assert_eq!(&b, &want);
        }
    }

    proptest::proptest! {
        /// The AVX2 build of the top entry's choice gives the baseline build's level.
        #[test]
        fn dispatched_top_level_matches_the_baseline(
            mut row in proptest::collection::vec(-30.0f32..0.0, 1..70),
            top in -3.0f32..0.0,
            codec in proptest::sample::select(all_abs_codecs().collect::<Vec<_>>()),
        ) {
            row.sort_by(|a, b| b.total_cmp(a));
            row[0] = row[0].max(top);
            let grid = codec.grid();
            let mut levels = Vec::new();
            push_levels(&row, grid, &mut levels);
            let step = codec.step();
            proptest::prop_assert_eq!(
                top_level(&row, &levels, step, grid),
                top_level_baseline(&row, &levels, step, grid)
            );
        }
    }

    #[test]
    fn dequantize_is_exact() {
        for c in all_abs_codecs() {
            let LogprobCodec::Abs { step_log2, mult } = c else { unreachable!() };
            let step = c.step();
            for q in [0u32, 1, 63, 64, 12345, c.max_level() - 1, c.max_level()] {
                let exact = -(f64::from(q) * f64::from(mult) * 2f64.powi(-step_log2));
                assert_eq!(f64::from(dequantize(q, step)), exact, "{c:?} {q}");
                let fine = step / TOP_FINE as f32;
                assert_eq!(f64::from(dequantize(q, fine)), exact / 64.0, "{c:?} {q}");
            }
            assert_eq!(dequantize(0, step).to_bits(), 0.0f32.to_bits());
        }
    }
}
