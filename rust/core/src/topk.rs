//! Full teacher logits to a store's targets: log-softmax at the capture temperature, then
//! per position the top K (top-K stores) or the distinct ids of n draws (sampled stores),
//! rows in parallel on the shared pool.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Logits of one sequence, `[L, V]` row-major, in the dtype the caller has.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    F32(&'a [f32]),
    /// IEEE half precision bit patterns.
    F16(&'a [u16]),
    /// bfloat16 bit patterns.
    BF16(&'a [u16]),
}

impl Logits<'_> {
    pub fn len(&self) -> usize {
        match self {
            Logits::F32(a) => a.len(),
            Logits::F16(a) | Logits::BF16(a) => a.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn row_into(&self, row: usize, v: usize, out: &mut [f32]) {
        let r = row * v..(row + 1) * v;
        match self {
            Logits::F32(a) => out.copy_from_slice(&a[r]),
            Logits::F16(a) => {
                for (o, &b) in out.iter_mut().zip(&a[r]) {
                    *o = half::f16::from_bits(b).to_f32();
                }
            }
            Logits::BF16(a) => {
                for (o, &b) in out.iter_mut().zip(&a[r]) {
                    *o = half::bf16::from_bits(b).to_f32();
                }
            }
        }
    }
}

/// Log-softmax of `logits / temperature` over each row and its `k` largest entries, by
/// decreasing log-probability (ties: lower id first). Returns `(ids [L*k], logprobs [L*k])`.
pub fn topk_from_logits(
    sample_id: u64,
    logits: Logits<'_>,
    rows: usize,
    vocab: usize,
    k: usize,
    temperature: f64,
) -> Result<(Vec<u32>, Vec<f32>)> {
    if rows.checked_mul(vocab) != Some(logits.len()) {
        return Err(Error::invalid_argument(
            "logits",
            format!("has {} values, expected {rows} x {vocab}", logits.len()),
        ));
    }
    if k == 0 || k > vocab {
        return Err(Error::invalid_argument("k", format!("K = {k} must be in 1..={vocab}")));
    }
    let mut ids = vec![0u32; rows * k];
    let mut lps = vec![0f32; rows * k];
    let inv_t = 1.0 / temperature;
    if !inv_t.is_finite() {
        return Err(Error::invalid_argument(
            "temperature",
            format!("{temperature:e} is too small: 1 / temperature overflows float64"),
        ));
    }
    crate::threads::install(|| {
        ids.par_chunks_mut(k).zip(lps.par_chunks_mut(k)).enumerate().try_for_each_init(
            || (vec![0f32; vocab], Vec::with_capacity(k + 1)),
            |(row, heap), (pos, (out_ids, out_lp))| {
                logits.row_into(pos, vocab, row);
                row_topk(row, heap, inv_t, out_ids, out_lp).map_err(|msg| Error::InvalidRecord {
                    sample_id,
                    msg: format!("logits at position {pos}: {msg}"),
                })
            },
        )
    })??;
    Ok((ids, lps))
}

/// Selection key: larger logit first, then lower id.
#[inline]
fn better(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

fn row_topk(
    row: &mut [f32],
    heap: &mut Vec<(f32, u32)>,
    inv_t: f64,
    out_ids: &mut [u32],
    out_lp: &mut [f32],
) -> std::result::Result<(), String> {
    let k = out_ids.len();
    let m = scaled_max(row, inv_t)?;
    // Min-heap (by `better`) of the k best seen so far; most entries lose one comparison.
    heap.clear();
    for (i, &x) in row.iter().enumerate() {
        let cand = (x, i as u32);
        if heap.len() < k {
            heap.push(cand);
            let last = heap.len() - 1;
            sift_up(heap, last);
        } else if better(cand, heap[0]) {
            heap[0] = cand;
            sift_down(heap, 0);
        }
    }
    heap.sort_unstable_by(|a, b| {
        if better(*a, *b) {
            std::cmp::Ordering::Less
        } else if better(*b, *a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    let mut sum = 0.0f64;
    for &x in row.iter() {
        sum += (f64::from(x) * inv_t - m).exp();
    }
    let log_sum = sum.ln();
    for (j, &(x, id)) in heap.iter().enumerate() {
        out_ids[j] = id;
        out_lp[j] = logprob(x, inv_t, m, log_sum);
    }
    Ok(())
}

/// A row's largest logit, once it is known to hold no NaN and no +inf, and some finite value.
fn row_max(row: &[f32]) -> std::result::Result<f32, String> {
    let mut max = f32::NEG_INFINITY;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            return Err(format!("NaN at vocabulary id {i}"));
        }
        if x == f32::INFINITY {
            return Err(format!("+inf at vocabulary id {i}"));
        }
        max = max.max(x);
    }
    if max == f32::NEG_INFINITY {
        return Err("every logit is -inf".into());
    }
    Ok(max)
}

/// The largest of a row's logits times `inv_t`: refused where that overflows float64 (a
/// temperature so small that the row's softmax cannot be computed; its sum would be NaN).
fn scaled_max(row: &[f32], inv_t: f64) -> std::result::Result<f64, String> {
    let max = row_max(row)?;
    let m = f64::from(max) * inv_t;
    if !m.is_finite() {
        return Err(format!(
            "the largest logit, {max:e}, divided by the temperature {:e} overflows float64",
            1.0 / inv_t
        ));
    }
    Ok(m)
}

/// The log-probability of logit `x` in a row whose largest scaled logit is `m` and whose
/// `sum exp(x * inv_t - m)` has the logarithm `log_sum`. That sum is taken in f64, so the
/// stored values do not inherit an accumulation error that grows with the vocabulary.
/// Subtracted as (x - m) - ln(sum), not x - (m + ln(sum)): for logits so large that
/// m + ln(sum) rounds to m (|m| above ~1e15 in f64), the latter would lose ln(sum) and make
/// every top entry 0, a row of more than one certain token.
#[inline]
fn logprob(x: f32, inv_t: f64, m: f64, log_sum: f64) -> f32 {
    let lp = (f64::from(x) * inv_t - m) - log_sum;
    // A log-probability is never positive; rounding must not make it so.
    lp.min(0.0) as f32
}

/// The most draws per position [`sample_from_logits`] takes: each row's draws are sorted
/// in memory (8 bytes each, per thread), and a million or so already give every id of
/// probability 1e-6 its expected count.
pub const MAX_DRAWS: usize = 1 << 24;

/// Sampled targets of one sequence, `[rows, width]` row-major: each row's distinct ids by
/// decreasing count (ties: lower id first), their counts and log-probabilities, padded to
/// the widest row with count 0 (id 0, log-probability 0).
#[derive(Debug, Clone, PartialEq)]
pub struct SampledRows {
    pub width: usize,
    pub ids: Vec<u32>,
    pub counts: Vec<u32>,
    pub logprobs: Vec<f32>,
}

/// Per position, `n` independent draws from `softmax(logits / temperature)`, kept as the
/// distinct ids drawn with their counts and log-probabilities (the log-probabilities are
/// those [`topk_from_logits`] gives the same ids, bit for bit).
///
/// The draws are a function of `(seed, sample_id, position)` alone: ChaCha8 keyed by `seed`
/// and `sample_id` (each 8 bytes little-endian, then 16 zero bytes), stream `position`;
/// each draw takes one 64-bit output `u`, the uniform `(u >> 11) 2^-53`, and is the first
/// id whose running sum of `exp(x / T - max)` (in id order, f64) exceeds the uniform times
/// the row's sum. So a capture gives the same rows whatever the thread count, and running
/// it again gives them again; another `seed` gives other draws.
pub fn sample_from_logits(
    sample_id: u64,
    logits: Logits<'_>,
    rows: usize,
    vocab: usize,
    n: usize,
    temperature: f64,
    seed: u64,
) -> Result<SampledRows> {
    if rows.checked_mul(vocab) != Some(logits.len()) {
        return Err(Error::invalid_argument(
            "logits",
            format!("has {} values, expected {rows} x {vocab}", logits.len()),
        ));
    }
    if n == 0 || n > MAX_DRAWS {
        return Err(Error::invalid_argument(
            "n",
            format!(
                "this store's k = {n} draws per position; add_logits takes 1 to {MAX_DRAWS} \
                 (count larger samples elsewhere and pass ids and counts to add_sampled)"
            ),
        ));
    }
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&sample_id.to_le_bytes());
    let inv_t = 1.0 / temperature;
    if !inv_t.is_finite() {
        return Err(Error::invalid_argument(
            "temperature",
            format!("{temperature:e} is too small: 1 / temperature overflows float64"),
        ));
    }
    let per_row: Vec<Vec<(u32, u32, f32)>> = crate::threads::install(|| {
        (0..rows)
            .into_par_iter()
            .map_init(
                || (vec![0f32; vocab], Vec::with_capacity(vocab), Vec::with_capacity(n)),
                |(row, cum, targets), pos| {
                    logits.row_into(pos, vocab, row);
                    let mut rng = ChaCha8Rng::from_seed(key);
                    rng.set_stream(pos as u64);
                    row_sample(row, cum, targets, inv_t, n, &mut rng).map_err(|msg| {
                        Error::InvalidRecord {
                            sample_id,
                            msg: format!("logits at position {pos}: {msg}"),
                        }
                    })
                },
            )
            .collect::<Result<_>>()
    })??;
    let width = per_row.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = SampledRows {
        width,
        ids: vec![0; rows * width],
        counts: vec![0; rows * width],
        logprobs: vec![0.0; rows * width],
    };
    for (pos, drawn) in per_row.iter().enumerate() {
        for (j, &(id, count, lp)) in drawn.iter().enumerate() {
            out.ids[pos * width + j] = id;
            out.counts[pos * width + j] = count;
            out.logprobs[pos * width + j] = lp;
        }
    }
    Ok(out)
}

/// One row of [`sample_from_logits`]: `(id, count, log-probability)` of the ids drawn.
fn row_sample(
    row: &[f32],
    cum: &mut Vec<f64>,
    targets: &mut Vec<f64>,
    inv_t: f64,
    n: usize,
    rng: &mut ChaCha8Rng,
) -> std::result::Result<Vec<(u32, u32, f32)>, String> {
    let m = scaled_max(row, inv_t)?;
    cum.clear();
    let mut sum = 0.0f64;
    for &x in row {
        // Summed in the order topk_from_logits sums, so the log-probabilities agree.
        sum += (f64::from(x) * inv_t - m).exp();
        cum.push(sum);
    }
    // sum >= 1 (the largest logit adds exp(0)): `below` is the largest f64 under it, and a
    // target at most `below` lands on an id whose running sum exceeds it, one of positive
    // weight (exp of a -inf logit adds 0, so that id never moves the running sum past one).
    let below = f64::from_bits(sum.to_bits() - 1);
    targets.clear();
    targets.extend((0..n).map(|_| {
        let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        (u * sum).min(below)
    }));
    targets.sort_unstable_by(f64::total_cmp);
    let log_sum = sum.ln();
    let mut drawn: Vec<(u32, u32, f32)> = Vec::new();
    let mut i = 0usize;
    for &t in targets.iter() {
        // Targets ascend, so each search starts at the previous id. It finds an id: cum's
        // last value is sum > below >= t (the min keeps any index in range regardless).
        i = (i + cum[i..].partition_point(|&c| c <= t)).min(cum.len() - 1);
        match drawn.last_mut() {
            Some(last) if last.0 == i as u32 => last.1 += 1,
            _ => drawn.push((i as u32, 1, logprob(row[i], inv_t, m, log_sum))),
        }
    }
    drawn.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(drawn)
}

fn worse_in_heap(heap: &[(f32, u32)], a: usize, b: usize) -> bool {
    better(heap[b], heap[a])
}

fn sift_up(heap: &mut [(f32, u32)], mut i: usize) {
    while i > 0 {
        let parent = (i - 1) / 2;
        if worse_in_heap(heap, i, parent) {
            heap.swap(i, parent);
            i = parent;
        } else {
            break;
        }
    }
}

fn sift_down(heap: &mut [(f32, u32)], mut i: usize) {
    let n = heap.len();
    loop {
        let l = 2 * i + 1;
        let r = l + 1;
        let mut worst = i;
        if l < n && worse_in_heap(heap, l, worst) {
            worst = l;
        }
        if r < n && worse_in_heap(heap, r, worst) {
            worst = r;
        }
        if worst == i {
            break;
        }
        heap.swap(i, worst);
        i = worst;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(row: &[f32], k: usize, t: f64) -> (Vec<u32>, Vec<f64>) {
        let z: Vec<f64> = row.iter().map(|&x| f64::from(x) / t).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
        let lp = idx.iter().map(|&i| z[i as usize] - lse).collect();
        (idx, lp)
    }

    #[test]
    fn matches_sorting_reference_with_ties_and_masks() {
        let v = 257;
        let mut row: Vec<f32> = (0..v).map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0).collect();
        row[3] = f32::NEG_INFINITY;
        row[100] = row[5];
        for (k, t) in [(1, 1.0), (8, 1.0), (64, 2.0), (257, 0.5)] {
            let (ids, lps) = topk_from_logits(1, Logits::F32(&row), 1, v, k, t).unwrap();
            let (rid, rlp) = reference(&row, k, t);
            assert_eq!(ids, rid, "k={k}");
            for (a, b) in lps.iter().zip(rlp) {
                if b.is_infinite() {
                    assert_eq!(*a, f32::NEG_INFINITY);
                } else {
                    assert!((f64::from(*a) - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} {b}");
                }
            }
        }
    }

    /// Huge logits (where m + ln(sum) rounds to m, even in f64) still give log-probabilities
    /// of a distribution: equal logits share the mass.
    #[test]
    fn huge_logits_keep_the_row_a_distribution() {
        for big in [3e38f32, 1e20, -1e30] {
            let row = [big, big, big, f32::NEG_INFINITY];
            let (_, lps) = topk_from_logits(1, Logits::F32(&row), 1, 4, 4, 1.0).unwrap();
            let want = -(3.0f64.ln()) as f32;
            assert_eq!(lps, [want, want, want, f32::NEG_INFINITY], "{big}");
        }
    }

    #[test]
    fn half_inputs_and_bad_rows() {
        let row = [1.0f32, 2.0, 3.0, 0.5];
        let bf: Vec<u16> = row.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let hf: Vec<u16> = row.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect();
        let a = topk_from_logits(1, Logits::F32(&row), 1, 4, 2, 1.0).unwrap();
        assert_eq!(topk_from_logits(1, Logits::BF16(&bf), 1, 4, 2, 1.0).unwrap(), a);
        assert_eq!(topk_from_logits(1, Logits::F16(&hf), 1, 4, 2, 1.0).unwrap(), a);
        assert!(topk_from_logits(1, Logits::F32(&[1.0, f32::NAN]), 1, 2, 1, 1.0).is_err());
        assert!(topk_from_logits(1, Logits::F32(&[f32::NEG_INFINITY; 2]), 1, 2, 1, 1.0).is_err());
        assert!(topk_from_logits(1, Logits::F32(&[1.0; 3]), 1, 2, 1, 1.0).is_err());
    }

    /// Chi-square statistic of the counts drawn over all rows against probabilities `p` (by
    /// id; ids of probability 0 left out).
    fn chi_square(rows: &SampledRows, p: &[f64]) -> f64 {
        let mut seen = vec![0f64; p.len()];
        for (&id, &c) in rows.ids.iter().zip(&rows.counts) {
            seen[id as usize] += f64::from(c);
        }
        let draws: f64 = seen.iter().sum();
        let expected = |q: f64| draws * q;
        seen.iter()
            .zip(p)
            .filter(|&(_, &q)| q > 0.0)
            .map(|(o, &q)| (o - expected(q)).powi(2) / expected(q))
            .sum()
    }

    /// Draws follow softmax(logits / T): on 2000 rows of 64 draws over five ids (and a
    /// masked one, never drawn), the chi-square statistic against the float64 softmax stays
    /// below its 0.1% quantile (4 degrees of freedom: 18.47) at T = 1 and T = 2.5, and is far
    /// above it against the distribution of the other temperature. Fixed seeds: the outcome
    /// never changes from run to run.
    #[test]
    fn draws_follow_the_tempered_softmax() {
        let logit = [2.0f32, 1.0, 0.5, -1.0, f32::NEG_INFINITY, 0.0];
        let rows = 2000;
        let logits: Vec<f32> = logit.iter().copied().cycle().take(rows * 6).collect();
        let softmax = |t: f64| {
            let w: Vec<f64> = logit.iter().map(|&x| (f64::from(x) / t).exp()).collect();
            let s: f64 = w.iter().sum();
            w.iter().map(|x| x / s).collect::<Vec<_>>()
        };
        for (t, other) in [(1.0, 2.5), (2.5, 1.0)] {
            let r = sample_from_logits(7, Logits::F32(&logits), rows, 6, 64, t, 11).unwrap();
            assert!(r.counts.chunks(r.width).all(|c| c.iter().sum::<u32>() == 64));
            let drawn = |id: u32| r.ids.iter().zip(&r.counts).any(|(&i, &c)| c > 0 && i == id);
            assert!(!drawn(4), "a -inf logit is never drawn");
            let fit = chi_square(&r, &softmax(t));
            assert!(fit < 18.47, "T = {t}: chi-square {fit}");
            let misfit = chi_square(&r, &softmax(other));
            assert!(misfit > 100.0, "T = {t} against T = {other}: {misfit}");
        }
    }

    /// Each row: distinct ids by decreasing count (ties: lower id first), counts adding up to
    /// n, log-probabilities bit for bit those of topk_from_logits; padding has count 0; the
    /// same seed gives the same rows whatever the thread count, another seed other rows.
    #[test]
    fn rows_are_well_formed_and_reproducible() {
        let v = 300;
        let rows = 40;
        let logits: Vec<f32> =
            (0..rows * v).map(|i| ((i * 7919) % 1009) as f32 / 97.0 - 5.0).collect();
        let (tk_ids, tk_lps) = topk_from_logits(1, Logits::F32(&logits), rows, v, v, 0.7).unwrap();
        let r = sample_from_logits(1, Logits::F32(&logits), rows, v, 100, 0.7, 3).unwrap();
        for pos in 0..rows {
            let range = pos * r.width..(pos + 1) * r.width;
            let (ids, counts, lps) =
                (&r.ids[range.clone()], &r.counts[range.clone()], &r.logprobs[range]);
            let used = counts.iter().take_while(|&&c| c > 0).count();
            assert!(counts[used..].iter().all(|&c| c == 0), "padding only at the end");
            assert_eq!(counts.iter().sum::<u32>(), 100);
            for j in 1..used {
                assert!(
                    (counts[j - 1], ids[j]) > (counts[j], ids[j - 1]) || counts[j - 1] > counts[j]
                );
            }
            let mut distinct = ids[..used].to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), used);
            for j in 0..used {
                let at = (0..v).find(|&q| tk_ids[pos * v + q] == ids[j]).unwrap();
                assert_eq!(lps[j].to_bits(), tk_lps[pos * v + at].to_bits());
            }
        }
        // (Other tests may resize the shared pool meanwhile: the rows must not care.)
        for threads in [1, 3] {
            crate::threads::set_num_threads(threads).unwrap();
            let again = sample_from_logits(1, Logits::F32(&logits), rows, v, 100, 0.7, 3);
            assert_eq!(again.unwrap(), r, "{threads} threads");
        }
        let other = sample_from_logits(1, Logits::F32(&logits), rows, v, 100, 0.7, 4).unwrap();
        assert_ne!(other, r);
        let other_sample = sample_from_logits(2, Logits::F32(&logits), rows, v, 100, 0.7, 3);
        assert_ne!(other_sample.unwrap(), r);
    }

    #[test]
    fn sampling_refuses_bad_rows_and_draw_counts() {
        let ok = [1.0f32, 2.0];
        assert!(sample_from_logits(1, Logits::F32(&ok), 1, 2, 0, 1.0, 0).is_err());
        assert!(sample_from_logits(1, Logits::F32(&ok), 1, 2, MAX_DRAWS + 1, 1.0, 0).is_err());
        assert!(sample_from_logits(1, Logits::F32(&ok), 1, 3, 4, 1.0, 0).is_err());
        for bad in [[1.0, f32::NAN], [f32::INFINITY, 0.0], [f32::NEG_INFINITY; 2]] {
            let e = sample_from_logits(9, Logits::F32(&bad), 1, 2, 4, 1.0, 0).unwrap_err();
            assert!(matches!(e, Error::InvalidRecord { sample_id: 9, .. }), "{e}");
        }
        // One finite logit: every draw is that id, at log-probability 0.
        let r = sample_from_logits(1, Logits::F32(&[f32::NEG_INFINITY, 3.0]), 1, 2, 5, 1.0, 0);
        let r = r.unwrap();
        assert_eq!((r.ids, r.counts, r.logprobs), (vec![1], vec![5], vec![0.0]));
    }

    /// A temperature so small that the logits over it overflow float64 is refused, in both
    /// kinds (the sampler drew id 0 at log-probability 0 from the NaN sum; top-K blamed the
    /// row's mass).
    #[test]
    fn temperatures_that_overflow_are_refused() {
        let row = [0.0f32, 3e38];
        let e = topk_from_logits(4, Logits::F32(&row), 1, 2, 1, 1e-300).unwrap_err();
        assert!(e.to_string().contains("divided by the temperature 1e-300 overflows"), "{e}");
        let e = sample_from_logits(4, Logits::F32(&row), 1, 2, 8, 1e-300, 0).unwrap_err();
        assert!(matches!(e, Error::InvalidRecord { sample_id: 4, .. }), "{e}");
        for t in [5e-324, 1e-310] {
            let e = sample_from_logits(4, Logits::F32(&[0.0, 1.0]), 1, 2, 8, t, 0).unwrap_err();
            assert!(e.to_string().contains("1 / temperature overflows"), "{e}");
            let e = topk_from_logits(4, Logits::F32(&[0.0, 1.0]), 1, 2, 1, t).unwrap_err();
            assert!(e.to_string().contains("1 / temperature overflows"), "{e}");
        }
        // Small but workable: the row is one certain token.
        let r = sample_from_logits(4, Logits::F32(&[0.0, 1.0]), 1, 2, 8, 1e-300, 0).unwrap();
        assert_eq!((r.ids, r.counts, r.logprobs), (vec![1], vec![8], vec![0.0]));
    }
}
