//! Passes over one row of logits shared by the kernels: the online log-sum-exp, the scaled
//! exponential that writes a gradient row, the NaN/+inf scan, and small `f64` helpers.

use std::ops::Range;

use super::simd::{Elem, LANES, Simd, exp_le_max, padded, split_lanes, split_lanes_mut};
use crate::error::{Error, Result};

/// Elements per block of the online log-sum-exp: a block is read twice (its max, then its
/// exponentials), the second time from L1, so the row is read from memory once. 256 also
/// bounds each lane's f32 partial sum to 32 terms before it is added to the f64 total.
const BLOCK: usize = 256;

/// Log-sum-exp of `x * inv_t` accumulated block by block: `max` is the largest scaled value
/// seen, `sum` the sum of `exp(x * inv_t - shift)` where `shift` is `max` (0 while every value
/// so far is -inf). A NaN or +inf input makes `sum` NaN, so [`OnlineLse::lse`] reports it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OnlineLse {
    max: f32,
    sum: f64,
}

impl OnlineLse {
    pub(crate) fn new() -> Self {
        OnlineLse {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }

    /// Add the values `x * inv_t` (`inv_t > 0`).
    #[inline(always)]
    pub(crate) fn push<S: Simd, E: Elem>(&mut self, s: S, x: &[E], inv_t: f32) {
        for block in x.chunks(BLOCK) {
            self.push_block(s, block, inv_t, None);
        }
    }

    /// Add one block of at most [`BLOCK`] values; with `out`, also store each
    /// `exp(x * inv_t - shift)` there, for the caller to rescale once the log-sum-exp of the
    /// row is known ([`block_factor`]). Returns this block's shift: the running max, -inf
    /// while every value so far is -inf.
    #[inline(always)]
    pub(crate) fn push_block<S: Simd, E: Elem>(
        &mut self,
        s: S,
        x: &[E],
        inv_t: f32,
        out: Option<&mut [f32]>,
    ) -> f32 {
        let (body, tail) = split_lanes(x);
        let tail = padded(tail, E::NEG_INF);
        // max(acc, x) may skip a NaN lane; the exponential below turns it into a NaN sum.
        let mut m = s.splat(f32::NEG_INFINITY);
        for a in body {
            m = s.max(m, E::load(s, a));
        }
        m = s.max(m, E::load(s, &tail));
        // Scaling by inv_t > 0 is monotonic, so the max of the scaled values is this.
        let block_max = s.max_lane(m) * inv_t;
        if block_max > self.max {
            self.sum *= (f64::from(self.max) - f64::from(block_max)).exp();
            self.max = block_max;
        }
        let shift = self.shift();
        let vinv = s.splat(inv_t);
        let vneg = s.splat(-shift);
        let mut acc = s.splat(0.0);
        match out {
            None => {
                for a in body {
                    acc = s.add(acc, exp_le_max(s, s.mul_add(E::load(s, a), vinv, vneg)));
                }
                acc = s.add(acc, exp_le_max(s, s.mul_add(E::load(s, &tail), vinv, vneg)));
            }
            Some(out) => {
                let (ob, ot) = split_lanes_mut(out);
                for (a, o) in body.iter().zip(ob.iter_mut()) {
                    let e = exp_le_max(s, s.mul_add(E::load(s, a), vinv, vneg));
                    acc = s.add(acc, e);
                    s.store(e, o);
                }
                let e = exp_le_max(s, s.mul_add(E::load(s, &tail), vinv, vneg));
                acc = s.add(acc, e);
                let mut o = [0.0f32; LANES];
                s.store(e, &mut o);
                let n = ot.len();
                ot.copy_from_slice(&o[..n]);
            }
        }
        self.sum += s.sum_f64(acc);
        self.max
    }

    fn shift(&self) -> f32 {
        if self.max == f32::NEG_INFINITY {
            0.0
        } else {
            self.max
        }
    }

    /// The log-sum-exp: -inf when every value is -inf (or none was pushed), NaN when a value
    /// is NaN or +inf.
    pub(crate) fn lse(&self) -> f64 {
        if self.sum == 0.0 {
            f64::NEG_INFINITY
        } else {
            f64::from(self.shift()) + self.sum.ln()
        }
    }
}

/// Ranges of `0..len` that skip the sorted distinct positions `holes` (each `.0`), cut into
/// blocks of at most [`BLOCK`]: the blocks a row's complement is processed in.
pub(crate) fn blocks_between(
    len: usize,
    holes: &[(usize, usize)],
) -> impl Iterator<Item = Range<usize>> + '_ {
    let starts = std::iter::once(0).chain(holes.iter().map(|&(i, _)| i + 1));
    let ends = holes.iter().map(|&(i, _)| i).chain(std::iter::once(len));
    starts
        .zip(ends)
        .flat_map(|(a, b)| (a..b).step_by(BLOCK).map(move |lo| lo..(lo + BLOCK).min(b)))
}

/// The factor that turns a block's stored `exp(x * inv_t - shift)` into
/// `coef * exp(x * inv_t - lse)`; 0 for a block whose shift is -inf (all its values are -inf).
#[inline(always)]
pub(crate) fn block_factor(coef: f64, shift: f32, lse: f64) -> f32 {
    if shift == f32::NEG_INFINITY {
        0.0
    } else {
        (coef * (f64::from(shift) - lse).exp()) as f32
    }
}

/// `dst[i] = factor * src[i]`, converted to `E` (`src` and `dst` have the same length).
#[inline(always)]
pub(crate) fn rescale_block<S: Simd, E: Elem>(s: S, src: &[f32], factor: f32, dst: &mut [E]) {
    let (sb, st) = split_lanes(src);
    let (db, dt) = split_lanes_mut(dst);
    let f = s.splat(factor);
    for (a, o) in sb.iter().zip(db.iter_mut()) {
        E::store(s, s.mul(f, s.load(a)), o);
    }
    if !st.is_empty() {
        let mut o = [E::NEG_INF; LANES];
        E::store(s, s.mul(f, s.load(&padded(st, 0.0))), &mut o);
        let n = dt.len();
        dt.copy_from_slice(&o[..n]);
    }
}

/// `x[i] *= factor` in place.
#[inline(always)]
pub(crate) fn rescale_in_place<S: Simd>(s: S, x: &mut [f32], factor: f32) {
    let (xb, xt) = split_lanes_mut(x);
    let f = s.splat(factor);
    for a in xb.iter_mut() {
        let v = s.mul(f, s.load(a));
        s.store(v, a);
    }
    for v in xt.iter_mut() {
        *v *= factor;
    }
}

/// Whether `x` holds a NaN or +inf.
#[inline(always)]
pub(crate) fn has_nan_or_pos_inf<S: Simd, E: Elem>(s: S, x: &[E]) -> bool {
    let (body, tail) = split_lanes(x);
    let inf = s.splat(f32::INFINITY);
    let mut bad = s.no_mask();
    for a in body {
        bad = s.or(bad, s.not_lt(E::load(s, a), inf));
    }
    bad = s.or(bad, s.not_lt(E::load(s, &padded(tail, E::NEG_INF)), inf));
    s.any(bad)
}

/// `log(sum(exp(x)))` in f64: -inf for an empty or all -inf input, NaN if any input is NaN
/// or +inf.
pub(crate) fn logsumexp(x: &[f64]) -> f64 {
    let mut m = f64::NEG_INFINITY;
    for &v in x {
        if v.is_nan() {
            return f64::NAN;
        }
        if v > m {
            m = v;
        }
    }
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + x.iter().map(|&v| (v - m).exp()).sum::<f64>().ln()
}

/// `log(exp(a) + exp(b))`, with the conventions of [`logsumexp`].
pub(crate) fn logaddexp(a: f64, b: f64) -> f64 {
    logsumexp(&[a, b])
}

/// Check a student row's log-sum-exp: NaN (a NaN or +inf logit) and -inf (no finite logit)
/// are invalid arguments.
pub(crate) fn check_row_lse(lse: f64, arg: &str, row: usize) -> Result<()> {
    if lse.is_nan() || lse == f64::INFINITY {
        Err(Error::invalid_argument(
            arg,
            format!("row {row} contains NaN or +inf"),
        ))
    } else if lse == f64::NEG_INFINITY {
        Err(Error::invalid_argument(
            arg,
            format!("row {row} has no finite entry (every entry is -inf)"),
        ))
    } else {
        Ok(())
    }
}

/// `hi + lo` = `x` to about 2^-48 relative, so that `y - hi - lo` subtracts an f64 shift
/// from f32 values without rounding the shift to f32.
pub(crate) fn split_f64(x: f64) -> (f32, f32) {
    let hi = x as f32;
    let lo = (x - f64::from(hi)) as f32;
    (hi, lo)
}
