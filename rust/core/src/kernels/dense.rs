//! Row kernel of dense targets (`kd_loss`): the teacher's full logits over `V_t <= V_s`,
//! `P = softmax(t / T)` zero-padded to `V_s`, every divergence exact over the vocabulary.
//!
//! Pass 1 computes both log-sum-exps; pass 2 sums the divergence terms `d_i` and
//! `G = sum g_i` (`divergence.rs`); the gradient `(g_i - q_i G) / T` needs `G`, so a third
//! pass writes it, except for forward KL where `G = -sum p = -1` is known and pass 2 writes it.

use super::divergence::{Divergence, PROB_FLOOR};
use super::rowops::{OnlineLse, check_row_lse, split_f64};
use super::simd::{
    Elem, Kernel, LANES, Simd, exp_le_max, ln, padded, split_lanes, split_lanes_mut,
};
use crate::error::Result;

/// One dense row: student `z` (`V_s`), teacher `t` (`V_t <= V_s`).
pub(crate) struct DenseRow<'a, E: Elem, T: Elem> {
    pub row: usize,
    pub z: &'a [E],
    pub t: &'a [T],
    pub grad: Option<&'a mut [E]>,
    pub divergence: Divergence,
    pub temperature: f64,
}

/// Divergence with its parameters in f32, as the vector code uses them.
#[derive(Clone, Copy)]
enum Div32 {
    Forward,
    Reverse,
    Jsd(f32),
    Jeffreys,
    SkewForward(f32),
    SkewReverse(f32),
    Tvd,
}

impl From<Divergence> for Div32 {
    fn from(d: Divergence) -> Self {
        match d {
            Divergence::ForwardKl => Div32::Forward,
            Divergence::ReverseKl => Div32::Reverse,
            Divergence::Jsd { beta } => Div32::Jsd(beta as f32),
            Divergence::Jeffreys => Div32::Jeffreys,
            Divergence::SkewForwardKl { alpha } => Div32::SkewForward(alpha as f32),
            Divergence::SkewReverseKl { alpha } => Div32::SkewReverse(alpha as f32),
            Divergence::Tvd => Div32::Tvd,
        }
    }
}

/// `(d, g, q)` for eight outcomes with teacher log-probability `lp` (-inf where p = 0) and
/// student log-probability `lq`; the vector form of `divergence::outcome_term`.
#[inline(always)]
fn terms<S: Simd>(s: S, div: Div32, lp: S::F, lq: S::F) -> (S::F, S::F, S::F) {
    let zero = s.splat(0.0);
    let half = s.splat(0.5);
    // lp, lq <= ~0 (log-probabilities), within the domain of exp_le_max.
    let p = exp_le_max(s, lp);
    let q = exp_le_max(s, lq);
    let lpf = s.max(s.splat(PROB_FLOOR.ln() as f32), lp);
    let p_pos = s.gt(p, zero);
    let q_pos = s.gt(q, zero);
    let (d, g) = match div {
        Div32::Forward => forward_terms(s, p, lpf, lq, p_pos),
        Div32::Reverse => reverse_terms(s, lpf, q, lq, q_pos),
        Div32::Jsd(beta) => {
            let b = s.splat(beta);
            let b1 = s.splat(1.0 - beta);
            let lm = ln(s, s.mul_add(b, p, s.mul(b1, q)));
            let kl_pm = s.select(p_pos, s.mul(p, s.sub(lpf, lm)), zero);
            let kl_qm = s.select(q_pos, s.mul(q, s.sub(lq, lm)), zero);
            let g = s.mul(b1, kl_qm);
            (s.mul_add(b, kl_pm, g), g)
        }
        Div32::Jeffreys => {
            let (df, gf) = forward_terms(s, p, lpf, lq, p_pos);
            let (dr, gr) = reverse_terms(s, lpf, q, lq, q_pos);
            (s.mul(half, s.add(df, dr)), s.mul(half, s.add(gf, gr)))
        }
        Div32::SkewForward(alpha) => {
            let a1 = s.splat(1.0 - alpha);
            let m = s.mul_add(s.splat(alpha), p, s.mul(a1, q));
            let m_pos = s.gt(m, zero);
            // p = 0 makes both terms 0; m > 0 keeps the log and the ratio finite.
            let d = s.select(m_pos, s.mul(p, s.sub(lpf, ln(s, m))), zero);
            let g = s.select(m_pos, s.sub(zero, s.div(s.mul(a1, s.mul(p, q)), m)), zero);
            (d, g)
        }
        Div32::SkewReverse(alpha) => {
            let a = s.splat(alpha);
            let m = s.mul_add(s.splat(1.0 - alpha), p, s.mul(a, q));
            // q > 0 and m > 0 (the latter fails only if alpha q underflows).
            let ok = s.gt(s.select(q_pos, m, zero), zero);
            let r = s.sub(lq, ln(s, m));
            let d = s.select(ok, s.mul(q, r), zero);
            let g =
                s.select(ok, s.mul(q, s.sub(s.add(r, s.splat(1.0)), s.div(s.mul(a, q), m))), zero);
            (d, g)
        }
        Div32::Tvd => {
            let d = s.mul(half, s.abs(s.sub(p, q)));
            let hq = s.mul(half, q);
            let g = s.select(s.gt(q, p), hq, s.select(s.lt(q, p), s.sub(zero, hq), zero));
            (d, g)
        }
    };
    (d, g, q)
}

#[inline(always)]
fn forward_terms<S: Simd>(s: S, p: S::F, lpf: S::F, lq: S::F, p_pos: S::M) -> (S::F, S::F) {
    let zero = s.splat(0.0);
    let d = s.select(p_pos, s.mul(p, s.sub(lpf, lq)), zero);
    (d, s.sub(zero, p))
}

#[inline(always)]
fn reverse_terms<S: Simd>(s: S, lpf: S::F, q: S::F, lq: S::F, q_pos: S::M) -> (S::F, S::F) {
    let zero = s.splat(0.0);
    let r = s.sub(lq, lpf);
    let d = s.select(q_pos, s.mul(q, r), zero);
    let g = s.select(q_pos, s.mul(q, s.add(r, s.splat(1.0))), zero);
    (d, g)
}

/// Vectors per f32 partial sum before it is added to the f64 total.
const FLUSH: usize = 32;

/// Pass 2 (and 3): returns `(sum d, sum g)` and, with `write = Some((grad, G))`, writes
/// `(g_i - q_i G) / T` into `grad`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pass<S: Simd, E: Elem, T: Elem>(
    s: S,
    div: Div32,
    z: &[E],
    t: &[T],
    inv_t: f32,
    (lse_s_hi, lse_s_lo): (f32, f32),
    (lse_t_hi, lse_t_lo): (f32, f32),
    write: Option<(&mut [E], f32)>,
) -> (f64, f64) {
    let (zb, zt) = split_lanes(z);
    let (tb, tt) = split_lanes(t);
    let z_tail = padded(zt, E::NEG_INF);
    let t_tail = padded(tt, T::NEG_INF);
    let n_vec = zb.len() + usize::from(!zt.is_empty());
    let vinv = s.splat(inv_t);
    let (s_hi, s_lo) = (s.splat(-lse_s_hi), s.splat(lse_s_lo));
    let (t_hi, t_lo) = (s.splat(-lse_t_hi), s.splat(lse_t_lo));
    let neg_inf = s.splat(f32::NEG_INFINITY);
    let mut d_total = 0.0;
    let mut g_total = 0.0;
    let mut d_acc = s.splat(0.0);
    let mut g_acc = s.splat(0.0);
    let mut out = match write {
        Some((grad, g_sum)) => {
            let (gb, gt) = split_lanes_mut(grad);
            Some((gb, gt, s.splat(g_sum)))
        }
        None => None,
    };
    for b in 0..n_vec {
        let zv = match zb.get(b) {
            Some(a) => E::load(s, a),
            None => E::load(s, &z_tail),
        };
        let lq = s.sub(s.mul_add(zv, vinv, s_hi), s_lo);
        let lp = match tb.get(b) {
            Some(a) => s.sub(s.mul_add(T::load(s, a), vinv, t_hi), t_lo),
            None if b == tb.len() && !tt.is_empty() => {
                s.sub(s.mul_add(T::load(s, &t_tail), vinv, t_hi), t_lo)
            }
            None => neg_inf,
        };
        let (d, g, q) = terms(s, div, lp, lq);
        d_acc = s.add(d_acc, d);
        g_acc = s.add(g_acc, g);
        if b % FLUSH == FLUSH - 1 {
            d_total += s.sum_f64(d_acc);
            g_total += s.sum_f64(g_acc);
            d_acc = s.splat(0.0);
            g_acc = s.splat(0.0);
        }
        if let Some((gb, gt, g_sum)) = out.as_mut() {
            let v = s.mul(s.sub(g, s.mul(q, *g_sum)), vinv);
            match gb.get_mut(b) {
                Some(o) => E::store(s, v, o),
                None => {
                    let mut o = [E::NEG_INF; LANES];
                    E::store(s, v, &mut o);
                    let n = gt.len();
                    gt.copy_from_slice(&o[..n]);
                }
            }
        }
    }
    d_total += s.sum_f64(d_acc);
    g_total += s.sum_f64(g_acc);
    (d_total, g_total)
}

impl<E: Elem, T: Elem> Kernel for DenseRow<'_, E, T> {
    type Output = Result<f64>;

    #[inline(always)]
    fn run<S: Simd>(self, s: S) -> Result<f64> {
        let DenseRow { row, z, t, grad, divergence, temperature } = self;
        let inv_t = (1.0 / temperature) as f32;
        let mut lse_s = OnlineLse::new();
        lse_s.push(s, z, inv_t);
        let lse_s = lse_s.lse();
        check_row_lse(lse_s, "student_logits", row)?;
        let mut lse_t = OnlineLse::new();
        lse_t.push(s, t, inv_t);
        let lse_t = lse_t.lse();
        check_row_lse(lse_t, "teacher_logits", row)?;
        let (ls, lt) = (split_f64(lse_s), split_f64(lse_t));
        let div = Div32::from(divergence);
        let d = match (grad, div) {
            (None, _) => pass(s, div, z, t, inv_t, ls, lt, None).0,
            (Some(grad), Div32::Forward) => pass(s, div, z, t, inv_t, ls, lt, Some((grad, -1.0))).0,
            (Some(grad), _) => {
                let (d, g_sum) = pass(s, div, z, t, inv_t, ls, lt, None);
                pass(s, div, z, t, inv_t, ls, lt, Some((grad, g_sum as f32)));
                d
            }
        };
        Ok(d)
    }
}
