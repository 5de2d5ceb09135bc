//! Row kernels of the sparse targets: top-K with the `bucket` or `renormalize` tail, and
//! sampled ids (forward KL estimator).
//!
//! Bucket: the outcomes are the K ids and the rest `C` (the complement of the ids). With
//! `s = z / T`, `lse` the log-sum-exp of the row and `lse_C` that of the complement,
//! `log Q_j = s_j - lse` and `log Q_rest = lse_C - lse`. For a logit `i` in `C`,
//! `d log Q_rest / d s_i = exp(s_i - lse_C) - q_i` and `d log Q_j / d s_i = -q_i`, so with
//! `g` and `G = sum g` as in `divergence.rs`:
//! * `dD/ds_i = exp(s_i - lse_C) (g_rest - G Q_rest)` for `i` in `C`,
//! * `dD/ds_i = g_j - G Q_j` for `i = id_j`,
//!
//! and `dD/dz = dD/ds / T`. So one pass computes `lse_C` (the K ids are skipped, which gives
//! `Q_rest` stably, never as `1 - sum`) and stores each `exp(s_i - shift)` (the shift of its
//! block) in the gradient row (f32) or a per-thread f32 row (bf16); the K+1 outcomes cost
//! O(K); a second pass over the row, still in cache, multiplies each block by
//! `c exp(shift - lse_C)` with `c = (g_rest - G Q_rest) / T`, and the K id entries are set.
//! One exponential per logit, the logits read from memory once, the gradient written once.

use super::divergence::{Divergence, outcomes};
use super::rowops::{
    LSE_BLOCK, OnlineLse, block_factor, check_row_lse, logaddexp, logsumexp, rescale_block,
    scale_in_place,
};
use super::simd::{Elem, Kernel, Simd};
use crate::error::{Error, Result};

/// The `tail` mode of top-K targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// K+1 outcomes: the K ids and one bucket holding the rest of the vocabulary.
    Bucket,
    /// The K ids alone, both distributions renormalized over them.
    Renormalize,
}

impl Tail {
    /// "bucket" or "renormalize".
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "bucket" => Ok(Tail::Bucket),
            "renormalize" => Ok(Tail::Renormalize),
            other => Err(Error::invalid_argument(
                "tail",
                format!("unknown tail {other:?}; expected \"bucket\" or \"renormalize\""),
            )),
        }
    }
}

/// Per-thread buffers reused from row to row.
#[derive(Default)]
pub(crate) struct Scratch {
    /// `(id, j)` of the row's targets, sorted by id.
    order: Vec<(usize, usize)>,
    /// Student values `s_j = z_id / T` by target position `j`.
    s: Vec<f64>,
    p: Vec<f64>,
    lq: Vec<f64>,
    g: Vec<f64>,
    /// Shift of each block of the log-sum-exp pass.
    shifts: Vec<f32>,
    /// Staged exponentials of a bf16 row (an f32 gradient row stages them itself).
    stage: Vec<f32>,
}

/// The blocks of a row of `len` values, each with the sorted `holes` inside it.
#[inline(always)]
fn blocks_with_holes(
    len: usize,
    holes: &[(usize, usize)],
) -> impl Iterator<Item = (usize, usize, &[(usize, usize)])> {
    let mut rest = holes;
    (0..len).step_by(LSE_BLOCK).map(move |start| {
        let end = (start + LSE_BLOCK).min(len);
        let n = rest.iter().take_while(|&&(h, _)| h < end).count();
        let (inside, after) = rest.split_at(n);
        rest = after;
        (start, end, inside)
    })
}

/// Pass 1: the log-sum-exp of `z / T` leaving out the positions in `holes`; with `grad`,
/// each block's `exp(s_i - shift)` is staged (in `grad` itself for f32) and its shift kept.
#[inline(always)]
fn lse_pass<S: Simd, E: Elem>(
    s: S,
    z: &[E],
    holes: &[(usize, usize)],
    inv_t: f32,
    grad: Option<&mut [E]>,
    shifts: &mut Vec<f32>,
    stage: &mut Vec<f32>,
) -> f64 {
    let mut acc = OnlineLse::new();
    shifts.clear();
    match grad {
        None => {
            for (a, b, h) in blocks_with_holes(z.len(), holes) {
                acc.push_block(s, &z[a..b], inv_t, a, h, None);
            }
        }
        Some(grad) => {
            let out: &mut [f32] = match E::as_f32_mut(grad) {
                Some(g) => g,
                None => {
                    stage.resize(z.len(), 0.0);
                    stage
                }
            };
            for (a, b, h) in blocks_with_holes(z.len(), holes) {
                let shift = acc.push_block(s, &z[a..b], inv_t, a, h, Some(&mut out[a..b]));
                shifts.push(shift);
            }
        }
    }
    acc.lse()
}

/// Pass 2: turn the staged blocks into `coef * exp(s_i - lse)` in `grad`.
#[inline(always)]
fn scale_pass<S: Simd, E: Elem>(s: S, coef: f64, lse: f64, grad: &mut [E], sc: &Scratch) {
    let len = grad.len();
    let blocks = (0..len).step_by(LSE_BLOCK).zip(&sc.shifts);
    if E::IS_F32 {
        if let Some(g) = E::as_f32_mut(grad) {
            for (a, &shift) in blocks {
                let b = (a + LSE_BLOCK).min(len);
                scale_in_place(s, &mut g[a..b], block_factor(coef, shift, lse));
            }
        }
    } else {
        for (a, &shift) in blocks {
            let b = (a + LSE_BLOCK).min(len);
            let f = block_factor(coef, shift, lse);
            rescale_block(s, &sc.stage[a..b], f, &mut grad[a..b]);
        }
    }
}

/// Convert `ids[j]` (for `j` in `keep`) to indices below `vocab`, sort them into
/// `order`, and reject out-of-range and repeated ids.
fn sorted_ids(
    ids: &[i64],
    keep: impl Iterator<Item = usize>,
    vocab: usize,
    row: usize,
    order: &mut Vec<(usize, usize)>,
) -> Result<()> {
    order.clear();
    for j in keep {
        let id = ids[j];
        match usize::try_from(id) {
            Ok(i) if i < vocab => order.push((i, j)),
            _ => {
                return Err(Error::invalid_argument(
                    "ids",
                    format!(
                        "row {row}, position {j}: id {id} is outside [0, {vocab}) (the student vocabulary)"
                    ),
                ));
            }
        }
    }
    order.sort_unstable();
    for w in order.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(Error::invalid_argument(
                "ids",
                format!(
                    "row {row}: id {} appears twice (positions {} and {}); ids must be distinct",
                    w[0].0, w[0].1, w[1].1
                ),
            ));
        }
    }
    Ok(())
}

fn check_teacher_logprob(lp: f32, row: usize, j: usize, allow_neg_inf: bool) -> Result<()> {
    if lp.is_nan() || lp == f32::INFINITY || (!allow_neg_inf && lp == f32::NEG_INFINITY) {
        let expected = if allow_neg_inf {
            "NaN and +inf are not log-probabilities"
        } else {
            "log-probabilities of sampled ids must be finite"
        };
        return Err(Error::invalid_argument(
            "logprobs",
            format!("row {row}, position {j}: {lp} ({expected})"),
        ));
    }
    Ok(())
}

/// Gather `s_j = z[id_j] / T` for the sorted targets into `s` (indexed by `j`).
fn gather<E: Elem>(z: &[E], order: &[(usize, usize)], temperature: f64, s: &mut Vec<f64>) {
    s.clear();
    s.resize(order.len(), 0.0);
    for &(i, j) in order {
        s[j] = f64::from(z[i].to_f32()) / temperature;
    }
}

/// Settings of a top-K row, validated by the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TopKSettings {
    pub divergence: Divergence,
    pub tail: Tail,
    pub temperature: f64,
    pub teacher_temperature: f64,
}

/// One top-K row.
pub(crate) struct TopKRow<'a, E: Elem> {
    pub row: usize,
    pub z: &'a [E],
    pub ids: &'a [i64],
    pub logprobs: &'a [f32],
    pub grad: Option<&'a mut [E]>,
    pub settings: TopKSettings,
    pub scratch: &'a mut Scratch,
}

impl<E: Elem> Kernel for TopKRow<'_, E> {
    type Output = Result<f64>;

    #[inline(always)]
    fn run<S: Simd>(self, s: S) -> Result<f64> {
        let TopKRow { row, z, ids, logprobs, grad, settings, scratch: sc } = self;
        let k = ids.len();
        sorted_ids(ids, 0..k, z.len(), row, &mut sc.order)?;
        for (j, &lp) in logprobs.iter().enumerate() {
            check_teacher_logprob(lp, row, j, true)?;
        }
        let t = settings.temperature;
        let inv_t = 1.0 / t;
        let inv_t32 = inv_t as f32;
        gather(z, &sc.order, t, &mut sc.s);
        sc.p.clear();
        sc.lq.clear();
        sc.g.clear();
        sc.g.resize(k + 1, 0.0);

        match settings.tail {
            Tail::Bucket => {
                let mut grad = grad;
                let lse_rest = lse_pass(
                    s,
                    z,
                    &sc.order,
                    inv_t32,
                    grad.as_deref_mut(),
                    &mut sc.shifts,
                    &mut sc.stage,
                );
                let lse = logaddexp(lse_rest, logsumexp(&sc.s));
                check_row_lse(lse, "student_logits", row)?;

                let mut p_sum = 0.0;
                for &lp in logprobs {
                    let p = f64::from(lp).exp();
                    p_sum += p;
                    sc.p.push(p);
                }
                // When the ids cover the whole student vocabulary, 1 - sum p is float rounding
                // of the teacher's softmax, not mass the student could place anywhere.
                let p_rest = if k == z.len() { 0.0 } else { (1.0 - p_sum).max(0.0) };
                sc.p.push(p_rest);
                sc.lq.extend(sc.s.iter().map(|&sj| sj - lse));
                sc.lq.push(lse_rest - lse);
                let (d, mut g_sum) = outcomes(settings.divergence, &sc.p, &sc.lq, &mut sc.g);
                if lse_rest == f64::NEG_INFINITY {
                    // q_rest = 0 whatever z (a fully masked complement): the rest outcome adds
                    // to the value (+inf where p_rest > 0) but not to the gradient, as in the
                    // torch path and docs/losses.md.
                    g_sum -= sc.g[k];
                    sc.g[k] = 0.0;
                }

                if let Some(grad) = grad {
                    // With lse_rest = -inf (K == V, or a fully masked complement) every block
                    // factor is 0: nothing flows to the complement.
                    let q_rest = (lse_rest - lse).exp();
                    let coef = (sc.g[k] - g_sum * q_rest) * inv_t;
                    scale_pass(s, coef, lse_rest, grad, sc);
                    for &(i, j) in &sc.order {
                        let gi = (sc.g[j] - g_sum * sc.lq[j].exp()) * inv_t;
                        grad[i] = E::from_f32(gi as f32);
                    }
                }
                Ok(d)
            }
            Tail::Renormalize => {
                // Only the K logits enter the loss, and only they are read (O(K) per row, as
                // the torch path and docs/losses.md have it): a NaN elsewhere cannot change
                // the result. One among them makes lse_s NaN (or +inf).
                let lse_s = logsumexp(&sc.s);
                if lse_s.is_nan() || lse_s == f64::INFINITY {
                    return Err(Error::invalid_argument(
                        "student_logits",
                        format!("row {row} contains NaN or +inf at a target id"),
                    ));
                }
                if lse_s == f64::NEG_INFINITY {
                    return Err(Error::invalid_argument(
                        "student_logits",
                        format!(
                            "row {row}: every logit at the target ids is -inf, so the \
                             renormalized student distribution is undefined"
                        ),
                    ));
                }
                let scale = settings.teacher_temperature / t;
                // The scaled teacher values go in `p` first, then become probabilities.
                sc.p.extend(logprobs.iter().map(|&lp| f64::from(lp) * scale));
                let lse_p = logsumexp(&sc.p);
                if lse_p == f64::NEG_INFINITY {
                    return Err(Error::invalid_argument(
                        "logprobs",
                        format!(
                            "row {row}: every log-probability is -inf, so the renormalized \
                             teacher distribution is undefined"
                        ),
                    ));
                }
                for a in sc.p.iter_mut() {
                    *a = (*a - lse_p).exp();
                }
                sc.lq.extend(sc.s.iter().map(|&sj| sj - lse_s));
                let (d, g_sum) = outcomes(settings.divergence, &sc.p, &sc.lq, &mut sc.g[..k]);
                if let Some(grad) = grad {
                    grad.fill(E::from_f32(0.0));
                    for &(i, j) in &sc.order {
                        let gi = (sc.g[j] - g_sum * sc.lq[j].exp()) * inv_t;
                        grad[i] = E::from_f32(gi as f32);
                    }
                }
                Ok(d)
            }
        }
    }
}

/// One row of sampled targets.
pub(crate) struct SampledRow<'a, E: Elem> {
    pub row: usize,
    pub z: &'a [E],
    pub ids: &'a [i64],
    pub counts: &'a [i64],
    pub logprobs: Option<&'a [f32]>,
    pub grad: Option<&'a mut [E]>,
    pub temperature: f64,
    pub scratch: &'a mut Scratch,
}

impl<E: Elem> Kernel for SampledRow<'_, E> {
    type Output = Result<f64>;

    #[inline(always)]
    fn run<S: Simd>(self, s: S) -> Result<f64> {
        let SampledRow { row, z, ids, counts, logprobs, grad, temperature: t, scratch: sc } = self;
        let mut total: u128 = 0;
        for (j, &c) in counts.iter().enumerate() {
            if c < 0 {
                return Err(Error::invalid_argument(
                    "counts",
                    format!("row {row}, position {j}: count {c} is negative"),
                ));
            }
            total += c.unsigned_abs() as u128;
            if let (Some(lps), true) = (logprobs, c > 0) {
                check_teacher_logprob(lps[j], row, j, false)?;
            }
        }
        if total == 0 {
            return Err(Error::invalid_argument(
                "counts",
                format!("row {row}: the counts of a valid row sum to 0"),
            ));
        }
        let kept = counts.iter().enumerate().filter(|&(_, &c)| c > 0);
        sorted_ids(ids, kept.map(|(j, _)| j), z.len(), row, &mut sc.order)?;

        let inv_t = 1.0 / t;
        let mut grad = grad;
        let lse =
            lse_pass(s, z, &[], inv_t as f32, grad.as_deref_mut(), &mut sc.shifts, &mut sc.stage);
        check_row_lse(lse, "student_logits", row)?;

        let n = total as f64;
        let mut d = 0.0;
        for &(i, j) in &sc.order {
            let w = counts[j] as f64 / n;
            let log_p = match logprobs {
                Some(lps) => f64::from(lps[j]),
                None => w.ln(),
            };
            let lq = f64::from(z[i].to_f32()) / t - lse;
            d += w * (log_p - lq);
        }
        if let Some(grad) = grad {
            scale_pass(s, inv_t, lse, grad, sc);
            for &(i, j) in &sc.order {
                let w = counts[j] as f64 / n;
                let q = (f64::from(z[i].to_f32()) / t - lse).exp();
                grad[i] = E::from_f32(((q - w) * inv_t) as f32);
            }
        }
        Ok(d)
    }
}
