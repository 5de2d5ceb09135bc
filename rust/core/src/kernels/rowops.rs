//! Passes over one row of logits shared by the kernels: the online log-sum-exp, the scaled
//! exponential that writes a gradient row, the NaN/+inf scan, and small `f64` helpers.

use super::simd::{Elem, LANES, Simd, exp, padded, split_lanes, split_lanes_mut};
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
            self.push_block(s, block, inv_t);
        }
    }

    #[inline(always)]
    fn push_block<S: Simd, E: Elem>(&mut self, s: S, x: &[E], inv_t: f32) {
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
        for a in body {
            acc = s.add(acc, exp(s, s.mul_add(E::load(s, a), vinv, vneg)));
        }
        acc = s.add(acc, exp(s, s.mul_add(E::load(s, &tail), vinv, vneg)));
        self.sum += s.sum_f64(acc);
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

/// `out[i] = coef * exp(x[i] * inv_t - shift)`.
#[inline(always)]
pub(crate) fn write_scaled_exp<S: Simd, E: Elem>(
    s: S,
    x: &[E],
    inv_t: f32,
    shift: f32,
    coef: f32,
    out: &mut [E],
) {
    let (xb, xt) = split_lanes(x);
    let (ob, ot) = split_lanes_mut(out);
    let vinv = s.splat(inv_t);
    let vneg = s.splat(-shift);
    let vcoef = s.splat(coef);
    for (a, o) in xb.iter().zip(ob.iter_mut()) {
        let e = exp(s, s.mul_add(E::load(s, a), vinv, vneg));
        E::store(s, s.mul(vcoef, e), o);
    }
    if !xt.is_empty() {
        let e = exp(
            s,
            s.mul_add(E::load(s, &padded(xt, E::NEG_INF)), vinv, vneg),
        );
        let mut o = [E::NEG_INF; LANES];
        E::store(s, s.mul(vcoef, e), &mut o);
        let n = ot.len().min(xt.len());
        ot[..n].copy_from_slice(&o[..n]);
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
