//! Passes over one row of logits shared by the kernels: the online log-sum-exp, the scaled
//! exponential that writes a gradient row, the NaN/+inf scan, and small `f64` helpers.

use super::simd::{
    Elem, LANES, Simd, exp_le_max, exp_le_max2, padded, split_lanes, split_lanes_mut,
};
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

/// The vector of `a` (the elements at `pos..pos + LANES`) with the positions in `holes`
/// (sorted `(position, _)` pairs, from `*next` on) replaced by -inf, which then count for
/// nothing in a max or a sum of exponentials. Advances `*next` past them.
#[inline(always)]
fn load_skipping<S: Simd, E: Elem>(
    s: S,
    a: &[E; LANES],
    pos: usize,
    holes: &[(usize, usize)],
    next: &mut usize,
) -> S::F {
    match holes.get(*next) {
        Some(&(h, _)) if h < pos + LANES => {
            let mut c = *a;
            while let Some(&(h, _)) = holes.get(*next) {
                if h >= pos + LANES {
                    break;
                }
                c[h - pos] = E::NEG_INF;
                *next += 1;
            }
            E::load(s, &c)
        }
        _ => E::load(s, a),
    }
}

impl OnlineLse {
    pub(crate) fn new() -> Self {
        OnlineLse { max: f32::NEG_INFINITY, sum: 0.0 }
    }

    /// Add the values `x * inv_t` (`inv_t > 0`).
    #[inline(always)]
    pub(crate) fn push<S: Simd, E: Elem>(&mut self, s: S, x: &[E], inv_t: f32) {
        for block in x.chunks(BLOCK) {
            self.push_block(s, block, inv_t, 0, &[], None);
        }
    }

    /// Add one block of at most [`BLOCK`] values that starts at row position `base`, leaving
    /// out the positions in `holes` (sorted, all within the block). With `out`, also store
    /// each `exp(x * inv_t - shift)` there (0 at the holes), for the caller to rescale once
    /// the log-sum-exp of the row is known ([`block_factor`]). Returns this block's shift:
    /// the running max, -inf while every value so far is -inf.
    #[inline(always)]
    pub(crate) fn push_block<S: Simd, E: Elem>(
        &mut self,
        s: S,
        x: &[E],
        inv_t: f32,
        base: usize,
        holes: &[(usize, usize)],
        out: Option<&mut [f32]>,
    ) -> f32 {
        let (body, tail) = split_lanes(x);
        let tail = padded(tail, E::NEG_INF);
        let tail_pos = base + body.len() * LANES;
        // max(acc, x) may skip a NaN lane; the exponential below turns it into a NaN sum.
        let mut m = s.splat(f32::NEG_INFINITY);
        let mut next = 0;
        for (b, a) in body.iter().enumerate() {
            m = s.max(m, load_skipping(s, a, base + b * LANES, holes, &mut next));
        }
        m = s.max(m, load_skipping(s, &tail, tail_pos, holes, &mut next));
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
        let mut next = 0;
        match out {
            None => {
                let mut acc1 = s.splat(0.0);
                let pairs = body.chunks_exact(2);
                let odd = pairs.remainder();
                for (b, pair) in pairs.enumerate() {
                    let pos = base + 2 * b * LANES;
                    let v0 = load_skipping(s, &pair[0], pos, holes, &mut next);
                    let v1 = load_skipping(s, &pair[1], pos + LANES, holes, &mut next);
                    let (e0, e1) =
                        exp_le_max2(s, s.mul_add(v0, vinv, vneg), s.mul_add(v1, vinv, vneg));
                    acc = s.add(acc, e0);
                    acc1 = s.add(acc1, e1);
                }
                acc = s.add(acc, acc1);
                if let Some(a) = odd.first() {
                    let pos = base + (body.len() - 1) * LANES;
                    let v = load_skipping(s, a, pos, holes, &mut next);
                    acc = s.add(acc, exp_le_max(s, s.mul_add(v, vinv, vneg)));
                }
                let v = load_skipping(s, &tail, tail_pos, holes, &mut next);
                acc = s.add(acc, exp_le_max(s, s.mul_add(v, vinv, vneg)));
            }
            Some(out) => {
                let (ob, ot) = split_lanes_mut(out);
                let mut acc1 = s.splat(0.0);
                let pairs = body.chunks_exact(2).zip(ob.chunks_exact_mut(2));
                for (b, (pair, o)) in pairs.enumerate() {
                    let pos = base + 2 * b * LANES;
                    let v0 = load_skipping(s, &pair[0], pos, holes, &mut next);
                    let v1 = load_skipping(s, &pair[1], pos + LANES, holes, &mut next);
                    let (e0, e1) =
                        exp_le_max2(s, s.mul_add(v0, vinv, vneg), s.mul_add(v1, vinv, vneg));
                    acc = s.add(acc, e0);
                    acc1 = s.add(acc1, e1);
                    s.store(e0, &mut o[0]);
                    s.store(e1, &mut o[1]);
                }
                acc = s.add(acc, acc1);
                if body.len() % 2 == 1 {
                    let last = body.len() - 1;
                    let v = load_skipping(s, &body[last], base + last * LANES, holes, &mut next);
                    let e = exp_le_max(s, s.mul_add(v, vinv, vneg));
                    acc = s.add(acc, e);
                    s.store(e, &mut ob[last]);
                }
                let v = load_skipping(s, &tail, tail_pos, holes, &mut next);
                let e = exp_le_max(s, s.mul_add(v, vinv, vneg));
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
        if self.max == f32::NEG_INFINITY { 0.0 } else { self.max }
    }

    /// The log-sum-exp: -inf when every value is -inf (or none was pushed), NaN when a value
    /// is NaN or +inf.
    pub(crate) fn lse(&self) -> f64 {
        if self.sum == 0.0 { f64::NEG_INFINITY } else { f64::from(self.shift()) + self.sum.ln() }
    }
}

/// Elements per block of [`OnlineLse::push_block`].
pub(crate) const LSE_BLOCK: usize = BLOCK;

/// The factor that turns a block's stored `exp(x * inv_t - shift)` into
/// `coef * exp(x * inv_t - lse)`; 0 for a block whose shift is -inf (all its values are -inf).
#[inline(always)]
pub(crate) fn block_factor(coef: f64, shift: f32, lse: f64) -> f32 {
    if shift == f32::NEG_INFINITY { 0.0 } else { (coef * (f64::from(shift) - lse).exp()) as f32 }
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

/// `x[i] *= factor` in place (computed in f32, rounded once to `E`).
#[inline(always)]
pub(crate) fn scale_in_place<S: Simd, E: Elem>(s: S, x: &mut [E], factor: f32) {
    let (xb, xt) = split_lanes_mut(x);
    let f = s.splat(factor);
    for a in xb.iter_mut() {
        let v = s.mul(f, E::load(s, a));
        E::store(s, v, a);
    }
    for v in xt.iter_mut() {
        *v = E::from_f32(v.to_f32() * factor);
    }
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
        Err(Error::invalid_argument(arg, format!("row {row} contains NaN or +inf")))
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
