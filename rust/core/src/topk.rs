//! Full teacher logits to top-K targets: log-softmax at the capture temperature and top-K
//! selection per position, rows in parallel on the shared pool.

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
    // logsumexp of x / T in f64: the stored log-probabilities should not inherit an
    // accumulation error that grows with the vocabulary.
    let m = f64::from(max) * inv_t;
    let mut sum = 0.0f64;
    for &x in row.iter() {
        sum += (f64::from(x) * inv_t - m).exp();
    }
    // Subtracted as (x - m) - ln(sum), not x - (m + ln(sum)): for logits so large that
    // m + ln(sum) rounds to m (|m| above ~1e15 in f64), the latter would lose ln(sum) and make
    // every top entry 0, a row of more than one certain token.
    let log_sum = sum.ln();
    for (j, &(x, id)) in heap.iter().enumerate() {
        out_ids[j] = id;
        let lp = (f64::from(x) * inv_t - m) - log_sum;
        // A log-probability is never positive; rounding must not make it so.
        out_lp[j] = lp.min(0.0) as f32;
    }
    Ok(())
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
}
