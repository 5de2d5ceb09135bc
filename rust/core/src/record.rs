//! Validation of records handed to a writer. Everything a store promises its readers
//! (ids in range and distinct per row, log-probabilities finite-or-minus-infinity, <= 0,
//! non-increasing by rank, draws adding up to n) is checked here, before anything is written.

use crate::codec::Record;
use crate::error::{Error, Result};

/// A borrowed integer array in whatever dtype the caller has.
#[derive(Debug, Clone, Copy)]
pub enum IdArray<'a> {
    I64(&'a [i64]),
    I32(&'a [i32]),
    U32(&'a [u32]),
    U16(&'a [u16]),
    U64(&'a [u64]),
}

impl IdArray<'_> {
    pub fn len(&self) -> usize {
        match self {
            IdArray::I64(a) => a.len(),
            IdArray::I32(a) => a.len(),
            IdArray::U32(a) => a.len(),
            IdArray::U16(a) => a.len(),
            IdArray::U64(a) => a.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline]
    pub fn get(&self, i: usize) -> i128 {
        match self {
            IdArray::I64(a) => i128::from(a[i]),
            IdArray::I32(a) => i128::from(a[i]),
            IdArray::U32(a) => i128::from(a[i]),
            IdArray::U16(a) => i128::from(a[i]),
            IdArray::U64(a) => i128::from(a[i]),
        }
    }
}

/// Per-thread scratch for the distinct-ids check: one stamp per vocabulary entry, so that
/// checking a row costs O(K) and never needs clearing.
pub struct SeenIds {
    stamp: Vec<u32>,
    current: u32,
}

impl SeenIds {
    pub fn new(vocab_size: u32) -> Self {
        SeenIds { stamp: vec![0; vocab_size as usize], current: 0 }
    }
    fn next_row(&mut self) {
        self.current = self.current.wrapping_add(1);
        if self.current == 0 {
            self.stamp.iter_mut().for_each(|s| *s = 0);
            self.current = 1;
        }
    }
    /// Whether `ids` holds no id twice (ids must be below the vocabulary size).
    pub fn row_is_distinct(&mut self, ids: &[u32]) -> bool {
        self.next_row();
        ids.iter().all(|&id| (id as usize) < self.stamp.len() && self.insert(id))
    }

    /// Returns false if `id` was already seen in the current row.
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        let s = &mut self.stamp[id as usize];
        if *s == self.current {
            false
        } else {
            *s = self.current;
            true
        }
    }
}

/// Largest log-probability accepted: float rounding of a log-softmax never gets near it.
pub const MAX_LOGPROB: f32 = 1e-6;
/// Largest accepted total probability of a top-K row (float rounding of a full softmax).
pub const MAX_ROW_MASS: f64 = 1.0 + 1e-3;

fn shape_err(arg: &str, got: &[usize], want: &str) -> Error {
    Error::invalid_argument(arg, format!("has shape {got:?}, expected {want}"))
}

fn convert_ids(
    sample_id: u64,
    arr: IdArray<'_>,
    vocab: u32,
    what: &str,
    k: usize,
) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(arr.len());
    for i in 0..arr.len() {
        let v = arr.get(i);
        if v < 0 || v >= i128::from(vocab) {
            let at = match (i.checked_div(k), i.checked_rem(k)) {
                (Some(pos), Some(rank)) => format!("position {pos}, rank {rank}"),
                _ => format!("position {i}"),
            };
            return Err(Error::InvalidRecord {
                sample_id,
                msg: format!("{what} {v} at {at} is outside the vocabulary [0, {vocab})"),
            });
        }
        out.push(v as u32);
    }
    Ok(out)
}

/// Build a validated top-K record from `input_ids [L]`, `ids [L, K]`, `logprobs [L, K]`.
#[allow(clippy::too_many_arguments)]
pub fn topk_record(
    sample_id: u64,
    input_ids: IdArray<'_>,
    ids: IdArray<'_>,
    ids_shape: &[usize],
    logprobs: &[f32],
    logprobs_shape: &[usize],
    k: u32,
    vocab: u32,
    seen: &mut SeenIds,
) -> Result<Record> {
    let l = input_ids.len();
    let k = k as usize;
    let want = format!("[{l}, {k}] (input length, K)");
    if ids_shape != [l, k] {
        return Err(shape_err("topk_ids", ids_shape, &want));
    }
    if logprobs_shape != [l, k] {
        return Err(shape_err("topk_logprobs", logprobs_shape, &want));
    }
    let input = convert_ids(sample_id, input_ids, vocab, "input id", 0)?;
    let ids = convert_ids(sample_id, ids, vocab, "top-k id", k)?;
    check_topk_values(sample_id, &ids, logprobs, k, seen)?;
    Ok(Record {
        sample_id,
        input_ids: input,
        row_lens: Vec::new(),
        ids,
        counts: Vec::new(),
        logprobs: logprobs.to_vec(),
    })
}

/// The per-row rules of a top-K record (also used by `add_logits` output in debug builds
/// and by `verify` on decoded data).
pub fn check_topk_values(
    sample_id: u64,
    ids: &[u32],
    logprobs: &[f32],
    k: usize,
    seen: &mut SeenIds,
) -> Result<()> {
    let bad = |pos: usize, msg: String| Error::InvalidRecord {
        sample_id,
        msg: format!("position {pos}: {msg}"),
    };
    for (pos, (row_ids, row_lp)) in ids.chunks_exact(k).zip(logprobs.chunks_exact(k)).enumerate() {
        seen.next_row();
        for (j, &id) in row_ids.iter().enumerate() {
            if !seen.insert(id) {
                return Err(bad(pos, format!("token id {id} appears twice (again at rank {j})")));
            }
        }
        let mut prev = f32::INFINITY;
        let mut mass = 0.0f64;
        for (j, &v) in row_lp.iter().enumerate() {
            if v.is_nan() {
                return Err(bad(pos, format!("log-probability at rank {j} is NaN")));
            }
            if v > MAX_LOGPROB {
                return Err(bad(
                    pos,
                    format!(
                        "log-probability {v} at rank {j} is positive; pass log-softmax outputs, not logits (StoreWriter.add_logits takes logits)"
                    ),
                ));
            }
            if v > prev {
                return Err(bad(
                    pos,
                    format!(
                        "log-probabilities are not sorted by rank: {v} at rank {j} > {prev} at rank {}; order each row by decreasing log-probability",
                        j - 1
                    ),
                ));
            }
            prev = v;
            // Rows are sorted, so once terms are below e^-40 the rest cannot matter.
            if v > -40.0 {
                mass += f64::from(v.exp());
            }
        }
        if mass > MAX_ROW_MASS {
            return Err(bad(
                pos,
                format!(
                    "probabilities add up to {mass:.6} > 1: these are not log-probabilities of one distribution"
                ),
            ));
        }
    }
    Ok(())
}

/// Build a validated sampled record from padded `ids [L, M]` / `counts [L, M]`
/// (entries with count 0 are padding) and optional `logprobs [L, M]`.
#[allow(clippy::too_many_arguments)]
pub fn sampled_record(
    sample_id: u64,
    input_ids: IdArray<'_>,
    ids: IdArray<'_>,
    ids_shape: &[usize],
    counts: IdArray<'_>,
    counts_shape: &[usize],
    logprobs: Option<(&[f32], &[usize])>,
    n_draws: u32,
    vocab: u32,
    keeps_logprobs: bool,
    seen: &mut SeenIds,
) -> Result<Record> {
    let l = input_ids.len();
    if ids_shape.len() != 2 || ids_shape[0] != l {
        return Err(shape_err(
            "ids",
            ids_shape,
            &format!("[{l}, M] (input length, ids per position)"),
        ));
    }
    let m = ids_shape[1];
    if counts_shape != ids_shape {
        return Err(shape_err(
            "counts",
            counts_shape,
            &format!("{ids_shape:?} (the shape of ids)"),
        ));
    }
    match (logprobs, keeps_logprobs) {
        (Some((_, shape)), true) if shape != ids_shape => {
            return Err(shape_err("logprobs", shape, &format!("{ids_shape:?} (the shape of ids)")));
        }
        (Some(_), false) => {
            return Err(Error::invalid_argument(
                "logprobs",
                "this store keeps no log-probabilities (codec=\"none\"); create it with a log-probability codec to store them",
            ));
        }
        (None, true) => {
            return Err(Error::invalid_argument(
                "logprobs",
                "this store keeps log-probabilities for sampled ids; pass them (or create the store with codec=\"none\")",
            ));
        }
        _ => {}
    }
    let input = convert_ids(sample_id, input_ids, vocab, "input id", 0)?;
    let mut rec = Record { sample_id, input_ids: input, ..Default::default() };
    let bad = |pos: usize, msg: String| Error::InvalidRecord {
        sample_id,
        msg: format!("position {pos}: {msg}"),
    };
    for pos in 0..l {
        seen.next_row();
        let mut total: u64 = 0;
        let mut n_ids = 0u32;
        for j in 0..m {
            let i = pos * m + j;
            let c = counts.get(i);
            if c < 0 {
                return Err(bad(pos, format!("count {c} at entry {j} is negative")));
            }
            if c == 0 {
                continue;
            }
            let id = ids.get(i);
            if id < 0 || id >= i128::from(vocab) {
                return Err(bad(
                    pos,
                    format!(
                        "id {id} at entry {j} (count {c}) is outside the vocabulary [0, {vocab})"
                    ),
                ));
            }
            let id = id as u32;
            if !seen.insert(id) {
                return Err(bad(
                    pos,
                    format!(
                        "id {id} appears twice (again at entry {j}); give each distinct id once with its count"
                    ),
                ));
            }
            total += c as u64;
            if total > u64::from(n_draws) {
                return Err(bad(pos, format!("counts add up to more than n = {n_draws} draws")));
            }
            rec.ids.push(id);
            rec.counts.push(c as u32);
            if let Some((lp, _)) = logprobs {
                let v = lp[i];
                if !v.is_finite() || v > MAX_LOGPROB {
                    return Err(bad(
                        pos,
                        format!(
                            "log-probability {v} of sampled id {id} must be finite and <= 0 (a drawn id has positive probability)"
                        ),
                    ));
                }
                rec.logprobs.push(v);
            }
            n_ids += 1;
        }
        if total != u64::from(n_draws) {
            return Err(bad(
                pos,
                format!("counts add up to {total}, expected n = {n_draws} draws"),
            ));
        }
        rec.row_lens.push(n_ids);
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topk(ids: &[i64], lp: &[f32], k: usize) -> Result<Record> {
        let l = ids.len() / k;
        let input: Vec<i64> = vec![1; l];
        let mut seen = SeenIds::new(100);
        topk_record(
            7,
            IdArray::I64(&input),
            IdArray::I64(ids),
            &[l, k],
            lp,
            &[l, k],
            k as u32,
            100,
            &mut seen,
        )
    }

    #[test]
    fn topk_rules() {
        assert!(topk(&[3, 4, 5, 6], &[-0.2, -2.0, -0.5, f32::NEG_INFINITY], 2).is_ok());
        let msg = |r: Result<Record>| r.unwrap_err().to_string();
        assert!(msg(topk(&[3, 3], &[-0.2, -2.0], 2)).contains("appears twice"));
        assert!(msg(topk(&[3, 100], &[-0.1, -2.0], 2)).contains("outside the vocabulary"));
        assert!(msg(topk(&[3, -1], &[-0.1, -2.0], 2)).contains("outside the vocabulary"));
        assert!(msg(topk(&[3, 4], &[-2.0, -0.1], 2)).contains("not sorted"));
        assert!(msg(topk(&[3, 4], &[f32::NAN, -0.1], 2)).contains("NaN"));
        assert!(msg(topk(&[3, 4], &[f32::INFINITY, -0.1], 2)).contains("positive"));
        assert!(msg(topk(&[3, 4], &[0.5, -0.1], 2)).contains("positive"));
        assert!(msg(topk(&[3, 4], &[-0.1, -0.2], 2)).contains("add up to"));
        let mut seen = SeenIds::new(100);
        let e = topk_record(
            1,
            IdArray::I64(&[1]),
            IdArray::I64(&[1, 2]),
            &[2, 1],
            &[0.0, 0.0],
            &[1, 2],
            2,
            100,
            &mut seen,
        );
        assert!(e.unwrap_err().to_string().contains("topk_ids"));
    }

    #[test]
    fn sampled_rules() {
        let mut seen = SeenIds::new(50);
        let input = [1i64, 2];
        let ids = [5i64, 6, -1, 7, -1, -1];
        let counts = [2i64, 1, 0, 3, 0, 0];
        let r = sampled_record(
            1,
            IdArray::I64(&input),
            IdArray::I64(&ids),
            &[2, 3],
            IdArray::I64(&counts),
            &[2, 3],
            None,
            3,
            50,
            false,
            &mut seen,
        )
        .unwrap();
        assert_eq!(r.row_lens, vec![2, 1]);
        assert_eq!(r.ids, vec![5, 6, 7]);
        assert_eq!(r.counts, vec![2, 1, 3]);
        let bad_counts = [2i64, 2, 0, 3, 0, 0];
        let e = sampled_record(
            1,
            IdArray::I64(&input),
            IdArray::I64(&ids),
            &[2, 3],
            IdArray::I64(&bad_counts),
            &[2, 3],
            None,
            3,
            50,
            false,
            &mut seen,
        );
        assert!(e.unwrap_err().to_string().contains("more than n"));
        let dup = [5i64, 5, -1, 7, -1, -1];
        let e = sampled_record(
            1,
            IdArray::I64(&input),
            IdArray::I64(&dup),
            &[2, 3],
            IdArray::I64(&counts),
            &[2, 3],
            None,
            3,
            50,
            false,
            &mut seen,
        );
        assert!(e.unwrap_err().to_string().contains("twice"));
        let lp = [-0.1f32, -1.0, 0.0, -0.2, 0.0, 0.0];
        let e = sampled_record(
            1,
            IdArray::I64(&input),
            IdArray::I64(&ids),
            &[2, 3],
            IdArray::I64(&counts),
            &[2, 3],
            Some((&lp, &[2, 3])),
            3,
            50,
            false,
            &mut seen,
        );
        assert!(e.unwrap_err().to_string().contains("keeps no log-probabilities"));
    }
}
