//! Scalar f64 reference of the losses for the Rust tests: the formulas of DESIGN.md written
//! over dense vectors, one row at a time, the way tests/reference_losses.py writes them (and
//! independently of the kernels' per-outcome gradient algebra). Gradients come from central
//! finite differences of the reference value, so they check the kernels' derivation too.

use super::divergence::{Divergence, PROB_FLOOR};
use super::sparse::Tail;

/// One row's teacher target.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    TopK { ids: Vec<usize>, logprobs: Vec<f64>, tail: Tail, teacher_temperature: f64 },
    Dense { logits: Vec<f64> },
    Sampled { ids: Vec<i64>, counts: Vec<i64>, logprobs: Option<Vec<f64>> },
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + x.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    x.iter().map(|v| v - lse).collect()
}

fn xlogy_floor(p: f64) -> f64 {
    if p > 0.0 { p * p.max(PROB_FLOOR).ln() } else { 0.0 }
}

/// `sum a * lb` over the entries where `a > 0`.
fn plogq(a: &[f64], lb: &[f64]) -> f64 {
    a.iter().zip(lb).map(|(&x, &l)| if x > 0.0 { x * l } else { 0.0 }).sum()
}

fn log_or_zero(m: &[f64]) -> Vec<f64> {
    m.iter().map(|&x| if x > 0.0 { x.ln() } else { 0.0 }).collect()
}

/// `D(P, Q)` from the definitions.
pub(crate) fn divergence_between(p: &[f64], lq: &[f64], div: Divergence) -> f64 {
    let q: Vec<f64> = lq.iter().map(|l| l.exp()).collect();
    let p_logp: f64 = p.iter().map(|&x| xlogy_floor(x)).sum();
    match div {
        Divergence::ForwardKl => p_logp - plogq(p, lq),
        Divergence::ReverseKl => {
            let lpf: Vec<f64> = p.iter().map(|&x| x.max(PROB_FLOOR).ln()).collect();
            plogq(&q, lq) - plogq(&q, &lpf)
        }
        Divergence::Jsd { beta } => {
            let m: Vec<f64> =
                p.iter().zip(&q).map(|(&a, &b)| beta * a + (1.0 - beta) * b).collect();
            let lm = log_or_zero(&m);
            beta * (p_logp - plogq(p, &lm)) + (1.0 - beta) * (plogq(&q, lq) - plogq(&q, &lm))
        }
        Divergence::Jeffreys => {
            0.5 * divergence_between(p, lq, Divergence::ForwardKl)
                + 0.5 * divergence_between(p, lq, Divergence::ReverseKl)
        }
        Divergence::SkewForwardKl { alpha } => {
            let m: Vec<f64> =
                p.iter().zip(&q).map(|(&a, &b)| alpha * a + (1.0 - alpha) * b).collect();
            p_logp - plogq(p, &log_or_zero(&m))
        }
        Divergence::SkewReverseKl { alpha } => {
            let m: Vec<f64> =
                p.iter().zip(&q).map(|(&a, &b)| (1.0 - alpha) * a + alpha * b).collect();
            plogq(&q, lq) - plogq(&q, &log_or_zero(&m))
        }
        Divergence::Tvd => 0.5 * p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f64>(),
    }
}

/// `(P, log Q)` over the outcomes of a top-K or dense target.
pub(crate) fn distributions(z: &[f64], target: &Target, temperature: f64) -> (Vec<f64>, Vec<f64>) {
    let s: Vec<f64> = z.iter().map(|v| v / temperature).collect();
    let lq_full = log_softmax(&s);
    match target {
        Target::Dense { logits } => {
            let lt = log_softmax(&logits.iter().map(|v| v / temperature).collect::<Vec<_>>());
            let mut p = vec![0.0; z.len()];
            for (pi, l) in p.iter_mut().zip(&lt) {
                *pi = l.exp();
            }
            (p, lq_full)
        }
        Target::Sampled { .. } => (Vec::new(), Vec::new()),
        Target::TopK { ids, logprobs, tail: Tail::Renormalize, teacher_temperature } => {
            let scaled: Vec<f64> =
                logprobs.iter().map(|l| l * teacher_temperature / temperature).collect();
            let p: Vec<f64> = log_softmax(&scaled).iter().map(|l| l.exp()).collect();
            let lq = log_softmax(&ids.iter().map(|&i| s[i]).collect::<Vec<_>>());
            (p, lq)
        }
        Target::TopK { ids, logprobs, tail: Tail::Bucket, .. } => {
            let mut p: Vec<f64> = logprobs.iter().map(|l| l.exp()).collect();
            // Ids covering the whole vocabulary leave only float rounding for the rest.
            let rest_p =
                if ids.len() == z.len() { 0.0 } else { (1.0 - p.iter().sum::<f64>()).max(0.0) };
            p.push(rest_p);
            let mut lq: Vec<f64> = ids.iter().map(|&i| lq_full[i]).collect();
            let rest: Vec<f64> =
                (0..z.len()).filter(|i| !ids.contains(i)).map(|i| lq_full[i]).collect();
            let m = rest.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            lq.push(if m == f64::NEG_INFINITY {
                m
            } else {
                m + rest.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
            });
            (p, lq)
        }
    }
}

/// The per-row loss in f64.
pub(crate) fn loss(z: &[f64], target: &Target, div: Divergence, temperature: f64) -> f64 {
    if let Target::Sampled { ids, counts, logprobs } = target {
        let lq_full = log_softmax(&z.iter().map(|v| v / temperature).collect::<Vec<_>>());
        let n: i64 = counts.iter().filter(|&&c| c > 0).sum();
        let mut d = 0.0;
        for (j, (&id, &c)) in ids.iter().zip(counts).enumerate() {
            if c > 0 {
                let w = c as f64 / n as f64;
                let lp = logprobs.as_ref().map_or(w.ln(), |l| l[j]);
                d += w * (lp - lq_full[id as usize]);
            }
        }
        return d;
    }
    let (p, lq) = distributions(z, target, temperature);
    divergence_between(&p, &lq, div)
}

/// Central finite-difference gradient of [`loss`] (0 at -inf logits, which stay -inf).
pub(crate) fn grad_fd(z: &[f64], target: &Target, div: Divergence, temperature: f64) -> Vec<f64> {
    let h = 1e-5;
    let mut x = z.to_vec();
    (0..z.len())
        .map(|i| {
            if !z[i].is_finite() {
                return 0.0;
            }
            x[i] = z[i] + h;
            let up = loss(&x, target, div, temperature);
            x[i] = z[i] - h;
            let down = loss(&x, target, div, temperature);
            x[i] = z[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Smallest `|p_k - q_k|` over the outcomes: TVD has a kink where it is 0, and a finite
/// difference across a kink means nothing.
pub(crate) fn min_gap_pq(z: &[f64], target: &Target, temperature: f64) -> f64 {
    let (p, lq) = distributions(z, target, temperature);
    p.iter().zip(&lq).map(|(a, l)| (a - l.exp()).abs()).fold(f64::INFINITY, f64::min)
}
