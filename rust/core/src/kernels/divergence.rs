//! The divergences of DESIGN.md ("Losses"), one outcome at a time.
//!
//! Every kernel reduces a row to distributions `P` (teacher, a constant) and `Q = softmax(s)`
//! (student) over some outcomes (the K ids and the rest bucket, the K ids alone, or the whole
//! vocabulary). For each outcome `k` the divergence contributes a term `d_k`, and
//! `g_k = dD / d(log Q_k)` (taking `Q_k = exp(log Q_k)`) depends on that outcome alone. The
//! chain rule through the log-softmax then gives `dD/ds_k = g_k - Q_k sum_j g_j`; the bucket
//! mode adds the complement's share (see `sparse.rs`). Derivations, with `m` the mixtures:
//! * forward KL `sum p (log p - log q)`:       `g = -p`
//! * reverse KL `sum q (log q - log p)`:       `g = q (log q - log p + 1)`
//! * JSD `beta KL(P||M) + (1-beta) KL(Q||M)`, `M = beta P + (1-beta) Q`:
//!   `g = -beta p (1-beta) q / m + (1-beta) q (log q - log m + 1 - (1-beta) q / m)
//!      = (1-beta) q (log q - log m)` (the `1 - m/m` cancels)
//! * Jeffreys: the mean of the two KL terms
//! * skew forward `KL(P || alpha P + (1-alpha) Q)`: `g = -(1-alpha) p q / m`
//! * skew reverse `KL(Q || (1-alpha) P + alpha Q)`: `g = q (log q - log m + 1 - alpha q / m)`
//! * TVD `0.5 sum |p - q|`:                     `g = 0.5 sign(q - p) q` (sign(0) = 0)
//!
//! Conventions (the loss contract): `0 log 0 = 0`; the teacher probability inside a logarithm
//! is floored at 1e-10; a mixture that is 0 contributes nothing.

use crate::error::{Error, Result};

/// Floor of a teacher probability inside a logarithm.
pub const PROB_FLOOR: f64 = 1e-10;

/// A divergence between the teacher distribution `P` and the student distribution `Q`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    ForwardKl,
    ReverseKl,
    /// Generalized Jensen-Shannon divergence, `beta` in (0, 1).
    Jsd {
        beta: f64,
    },
    Jeffreys,
    /// `KL(P || alpha P + (1-alpha) Q)`, `alpha` in (0, 1).
    SkewForwardKl {
        alpha: f64,
    },
    /// `KL(Q || (1-alpha) P + alpha Q)`, `alpha` in (0, 1).
    SkewReverseKl {
        alpha: f64,
    },
    Tvd,
}

/// Names accepted by [`Divergence::parse`].
pub const DIVERGENCE_NAMES: [&str; 7] =
    ["forward_kl", "reverse_kl", "jsd", "jeffreys", "skew_forward_kl", "skew_reverse_kl", "tvd"];

fn open_unit(arg: &str, x: f64) -> Result<f64> {
    if x > 0.0 && x < 1.0 {
        Ok(x)
    } else {
        Err(Error::invalid_argument(arg, format!("must be in the open interval (0, 1), got {x}")))
    }
}

impl Divergence {
    /// The divergence called `name`; `beta` is read for "jsd" only and `alpha` for the skew
    /// divergences only, each checked to lie in (0, 1).
    pub fn parse(name: &str, beta: f64, alpha: f64) -> Result<Self> {
        Ok(match name {
            "forward_kl" => Divergence::ForwardKl,
            "reverse_kl" => Divergence::ReverseKl,
            "jsd" => Divergence::Jsd { beta: open_unit("beta", beta)? },
            "jeffreys" => Divergence::Jeffreys,
            "skew_forward_kl" => Divergence::SkewForwardKl { alpha: open_unit("alpha", alpha)? },
            "skew_reverse_kl" => Divergence::SkewReverseKl { alpha: open_unit("alpha", alpha)? },
            "tvd" => Divergence::Tvd,
            other => {
                return Err(Error::invalid_argument(
                    "divergence",
                    format!(
                        "unknown divergence {other:?}; expected one of {}",
                        DIVERGENCE_NAMES.join(", ")
                    ),
                ));
            }
        })
    }

    /// The name [`Divergence::parse`] accepts for this divergence.
    pub fn name(&self) -> &'static str {
        match self {
            Divergence::ForwardKl => "forward_kl",
            Divergence::ReverseKl => "reverse_kl",
            Divergence::Jsd { .. } => "jsd",
            Divergence::Jeffreys => "jeffreys",
            Divergence::SkewForwardKl { .. } => "skew_forward_kl",
            Divergence::SkewReverseKl { .. } => "skew_reverse_kl",
            Divergence::Tvd => "tvd",
        }
    }
}

/// `(d, g)` of one outcome with teacher probability `p` and student log-probability `lq`.
#[inline]
pub(crate) fn outcome_term(div: Divergence, p: f64, lq: f64) -> (f64, f64) {
    let q = lq.exp();
    let lp = p.max(PROB_FLOOR).ln();
    match div {
        Divergence::ForwardKl => forward(p, lp, lq),
        Divergence::ReverseKl => reverse(lp, q, lq),
        Divergence::Jsd { beta } => {
            let m = beta * p + (1.0 - beta) * q;
            let lm = if m > 0.0 { m.ln() } else { 0.0 };
            let kl_pm = if p > 0.0 { p * (lp - lm) } else { 0.0 };
            let kl_qm = if q > 0.0 { q * (lq - lm) } else { 0.0 };
            (beta * kl_pm + (1.0 - beta) * kl_qm, (1.0 - beta) * kl_qm)
        }
        Divergence::Jeffreys => {
            let (df, gf) = forward(p, lp, lq);
            let (dr, gr) = reverse(lp, q, lq);
            (0.5 * (df + dr), 0.5 * (gf + gr))
        }
        Divergence::SkewForwardKl { alpha } => {
            let m = alpha * p + (1.0 - alpha) * q;
            if p > 0.0 && m > 0.0 {
                (p * (lp - m.ln()), -(1.0 - alpha) * p * q / m)
            } else {
                (0.0, 0.0)
            }
        }
        Divergence::SkewReverseKl { alpha } => {
            let m = (1.0 - alpha) * p + alpha * q;
            if q > 0.0 && m > 0.0 {
                let lm = m.ln();
                (q * (lq - lm), q * (lq - lm + 1.0 - alpha * q / m))
            } else {
                (0.0, 0.0)
            }
        }
        Divergence::Tvd => {
            let sign = if q > p {
                1.0
            } else if q < p {
                -1.0
            } else {
                0.0
            };
            (0.5 * (p - q).abs(), 0.5 * sign * q)
        }
    }
}

#[inline]
fn forward(p: f64, lp: f64, lq: f64) -> (f64, f64) {
    if p > 0.0 { (p * (lp - lq), -p) } else { (0.0, 0.0) }
}

#[inline]
fn reverse(lp: f64, q: f64, lq: f64) -> (f64, f64) {
    if q > 0.0 { (q * (lq - lp), q * (lq - lp + 1.0)) } else { (0.0, 0.0) }
}

/// `D` and, in `g`, `dD/d log Q_k` for the outcomes `(p[k], lq[k])`; returns `(D, sum g)`.
pub(crate) fn outcomes(div: Divergence, p: &[f64], lq: &[f64], g: &mut [f64]) -> (f64, f64) {
    let mut d_sum = 0.0;
    let mut g_sum = 0.0;
    for ((&pk, &lqk), gk) in p.iter().zip(lq).zip(g.iter_mut()) {
        let (d, gr) = outcome_term(div, pk, lqk);
        d_sum += d;
        g_sum += gr;
        *gk = gr;
    }
    (d_sum, g_sum)
}
