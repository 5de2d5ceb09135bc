//! Validation of records handed to a writer. Everything a store promises its readers
//! (ids in range and distinct per row, log-probabilities finite-or-minus-infinity, <= 0,
//! non-increasing by rank, draws adding up to n) is checked here, before anything is written.

use crate::codec::ChunkBuf;
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

/// e^x within 0.02% relative error (x <= 0; 0 below -87): enough to tell a distribution
/// from something that is not one, at a fraction of the cost of `expf`.
#[inline]
pub fn approx_exp(x: f32) -> f32 {
    // Selects, not branches, so that loops over rows vectorize. NaN stays NaN (clamp keeps
    // it, and NaN as i32 is 0). Inputs above 88 (not log-probabilities, but
    // record checks may see them) give e^88 instead of overflowing the exponent bits.
    let xc = x.clamp(-87.0, 88.0);
    // 2^t with t = x log2(e): exponent bits from floor(t), a cubic for 2^frac.
    let t = xc * std::f32::consts::LOG2_E;
    // floor(t) in float arithmetic only (a float-to-int cast kept the loops scalar): adding
    // and removing 1.5 2^23 rounds |t| < 2^22 to an integer, then one step down where that
    // rounded up. NaN stays NaN throughout.
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let r = (t + MAGIC) - MAGIC;
    let fl = if r > t { r - 1.0 } else { r };
    let f = t - fl;
    let p = 1.0 + f * (0.695_036 + f * (0.228_308_76 + f * 0.076_325));
    // fl + 1.5 2^23 is exact (|fl| <= 126) and its bits are those of 1.5 2^23 plus fl.
    let biased = (fl + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127);
    let e = f32::from_bits(biased << 23) * p;
    if x < -87.0 { 0.0 } else { e }
}

/// Per-thread scratch for the distinct-ids check: one stamp per vocabulary entry, so that
/// checking a row costs O(K); the stamps are cleared once every 65,535 rows. Two bytes per
/// stamp, not four: at V = 128256 the stamps and the encoder's rank table (see
/// [`crate::codec::ids::TableScratch`]) then fit a 1 MB L2 cache together.
pub struct SeenIds {
    stamp: Vec<u16>,
    current: u16,
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
/// Largest accepted total probability of a top-K row. Above 1 for rounding: of a float32
/// softmax, of float16/bfloat16 inputs, and of rows decoded from a store with a quantizing
/// codec, so that a store's own output can be written again (`abs:0.01` decodes every value
/// within 0.0098 nat: a row's mass at most e^0.0098 = 1.0098 times what was written, which
/// ties of equal values do reach). Logits, or log-probabilities of another temperature, are
/// far beyond it.
pub const MAX_ROW_MASS: f64 = 1.0 + MAX_ROW_MASS_SLACK;
const MAX_ROW_MASS_SLACK: f64 = 2e-2;

fn shape_err(arg: &str, got: &[usize], want: &str) -> Error {
    Error::invalid_argument(arg, format!("has shape {got:?}, expected {want}"))
}

/// Append `arr` to `out` as u32 ids, checking each is in `[0, vocab)`.
fn append_ids(
    out: &mut Vec<u32>,
    sample_id: u64,
    arr: IdArray<'_>,
    vocab: u32,
    what: &str,
    k: usize,
) -> Result<()> {
    /// Index of the first id outside [0, vocab), or None after appending all as u32. The
    /// check is one unsigned compare per id (negative ids wrap to huge values) in a loop
    /// without early exit, so it vectorizes; the index is only searched for on failure.
    fn run<T: Copy + Into<i128>>(
        out: &mut Vec<u32>,
        a: &[T],
        vocab: u32,
        wide: impl Fn(T) -> u64,
    ) -> Option<usize> {
        let v = u64::from(vocab);
        if a.iter().fold(false, |bad, &x| bad | (wide(x) >= v)) {
            let v = i128::from(vocab);
            return a.iter().position(|&x| {
                let x: i128 = x.into();
                x < 0 || x >= v
            });
        }
        out.extend(a.iter().map(|&x| wide(x) as u32));
        None
    }
    let start = out.len();
    let bad = match arr {
        IdArray::I64(a) => run(out, a, vocab, |x| x as u64),
        IdArray::I32(a) => run(out, a, vocab, |x| i64::from(x) as u64),
        IdArray::U32(a) => run(out, a, vocab, u64::from),
        IdArray::U16(a) => run(out, a, vocab, u64::from),
        IdArray::U64(a) => run(out, a, vocab, |x| x),
    };
    let Some(i) = bad else { return Ok(()) };
    out.truncate(start);
    let at = match (i.checked_div(k), i.checked_rem(k)) {
        (Some(pos), Some(rank)) => format!("position {pos}, rank {rank}"),
        _ => format!("position {i}"),
    };
    Err(Error::InvalidRecord {
        sample_id,
        msg: format!("{what} {} at {at} is outside the vocabulary [0, {vocab})", arr.get(i)),
    })
}

/// Validate a top-K record (`input_ids [L]`, `ids [L, K]`, `logprobs [L, K]`) and append
/// it to `buf`; on any error `buf` is left as it was.
#[allow(clippy::too_many_arguments)]
pub fn append_topk(
    buf: &mut ChunkBuf,
    seen: &mut SeenIds,
    sample_id: u64,
    input_ids: IdArray<'_>,
    ids: IdArray<'_>,
    ids_shape: &[usize],
    logprobs: &[f32],
    logprobs_shape: &[usize],
    k: u32,
    vocab: u32,
) -> Result<()> {
    let l = input_ids.len();
    let k = k as usize;
    let want = format!("[{l}, {k}] (input length, K)");
    if ids_shape != [l, k] {
        return Err(shape_err("topk_ids", ids_shape, &want));
    }
    if logprobs_shape != [l, k] {
        return Err(shape_err("topk_logprobs", logprobs_shape, &want));
    }
    let l32 = u32::try_from(l).map_err(|_| Error::InvalidRecord {
        sample_id,
        msg: format!("{l} positions; a record holds at most 2^32 - 1"),
    })?;
    let mark = buf.mark();
    let r = (|| {
        append_ids(&mut buf.input_ids, sample_id, input_ids, vocab, "input id", 0)?;
        let start = buf.ids.len();
        append_ids(&mut buf.ids, sample_id, ids, vocab, "top-k id", k)?;
        check_topk_values(sample_id, &buf.ids[start..], logprobs, k, seen)
    })();
    match r {
        Ok(()) => {
            buf.logprobs.extend_from_slice(logprobs);
            buf.sample_ids.push(sample_id);
            buf.lengths.push(l32);
            Ok(())
        }
        Err(e) => {
            buf.rollback(mark);
            Err(e)
        }
    }
}

/// True when the CPU has AVX-512 conflict detection, `k` is a multiple of 8 from 16 to 64
/// and no row of `ids` (rows of `k`) holds an id twice; false otherwise (the stamps decide).
///
/// The stamps cost a random read and write of a vocabulary-sized table per id (about 4
/// cycles an id at V = 128256); a row of up to 64 ids is instead split into eighths and
/// every pair of eighths goes through one 16-lane conflict detection (28 for K = 64).
pub(crate) fn rows_are_distinct_by_conflicts(ids: &[u32], k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512cd") {
        // SAFETY: the running CPU has AVX-512F and CD, the features the function is
        // compiled for (it checks `k` itself).
        return unsafe { conflicts::rows_are_distinct(ids, k) };
    }
    let _ = (ids, k);
    false
}

#[cfg(target_arch = "x86_64")]
mod conflicts {
    use std::arch::x86_64::*;

    /// [`super::rows_are_distinct_by_conflicts`] once the CPU is checked (false for a `k`
    /// it does not take).
    #[target_feature(enable = "avx512f,avx512cd")]
    pub(super) fn rows_are_distinct(ids: &[u32], k: usize) -> bool {
        if !k.is_multiple_of(8) || !(16..=64).contains(&k) {
            return false;
        }
        let eighths = k / 8;
        let mut parts = [_mm256_setzero_si256(); 8];
        for row in ids.chunks_exact(k) {
            for (part, ids8) in parts.iter_mut().zip(row.chunks_exact(8)) {
                // SAFETY: `ids8` holds exactly 8 u32 (chunks_exact), read unaligned.
                *part = unsafe { _mm256_loadu_si256(ids8.as_ptr().cast()) };
            }
            let mut any = _mm512_setzero_si512();
            for i in 0..eighths {
                for j in i + 1..eighths {
                    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(parts[i]), parts[j]);
                    any = _mm512_or_si512(any, _mm512_conflict_epi32(both));
                }
            }
            if _mm512_test_epi32_mask(any, any) != 0 {
                return false;
            }
        }
        true
    }
}

/// Mass below which the quick pass clears a row for [`check_topk_values`], whose exact loop
/// sums [`approx_exp`] as the quick pass does.
const CHECK_QUICK_MASS: f64 = MAX_ROW_MASS - 1e-4;

/// A quick pass over one row's log-probabilities without branches (it vectorizes): true when
/// none is NaN or above [`MAX_LOGPROB`], the row is non-increasing and the sum of
/// [`approx_exp`] of its values (f32, within ~1e-5 of the f64 sum) is below `mass_limit`.
/// Rows it does not clear take an exact, rule-by-rule loop, which gives the verdict and the
/// message (in `check_topk_values` and in `verify`).
#[inline]
pub(crate) fn row_values_are_clearly_fine(row: &[f32], mass_limit: f64) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the running CPU has AVX2, the one feature the function is compiled for.
        return unsafe { row_values_are_clearly_fine_avx2(row, mass_limit) };
    }
    row_values_are_clearly_fine_baseline(row, mass_limit)
}

/// The quick pass compiled for AVX2 (eight lanes for its sums instead of four), with the
/// same IEEE operations as the baseline build (no fused multiply-adds): the same verdict.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_values_are_clearly_fine_avx2(row: &[f32], mass_limit: f64) -> bool {
    row_values_are_clearly_fine_baseline(row, mass_limit)
}

#[inline(always)]
fn row_values_are_clearly_fine_baseline(row: &[f32], mass_limit: f64) -> bool {
    let mut bad = false;
    let mut acc = [0f32; 8];
    for c in row.chunks(8) {
        for (a, &v) in acc.iter_mut().zip(c) {
            bad |= v.is_nan() | (v > MAX_LOGPROB);
            *a += approx_exp(v);
        }
    }
    // Pairs of neighbours as two offset slices: this vectorizes, `windows(2)` did not.
    for (a, b) in row.iter().zip(row.iter().skip(1)) {
        bad |= b > a;
    }
    // The float32 sum is within ~1e-5 of the float64 one for K up to thousands; rows near
    // the limit are decided by the exact loop.
    !bad && f64::from(acc.iter().sum::<f32>()) < mass_limit
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
    // Where every row is shown distinct by the vector check, the stamps are skipped; else
    // they check every row and name the first repeated id.
    let distinct = rows_are_distinct_by_conflicts(ids, k);
    for (pos, (row_ids, row_lp)) in ids.chunks_exact(k).zip(logprobs.chunks_exact(k)).enumerate() {
        if !distinct {
            seen.next_row();
            for (j, &id) in row_ids.iter().enumerate() {
                if !seen.insert(id) {
                    return Err(bad(
                        pos,
                        format!("token id {id} appears twice (again at rank {j})"),
                    ));
                }
            }
        }
        if row_values_are_clearly_fine(row_lp, CHECK_QUICK_MASS) {
            continue;
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
            mass += f64::from(approx_exp(v));
        }
        if mass > MAX_ROW_MASS {
            return Err(bad(
                pos,
                format!(
                    "probabilities add up to {mass:.6}, more than 1 by over the {MAX_ROW_MASS_SLACK} that rounding may add: these are not log-probabilities of one distribution"
                ),
            ));
        }
    }
    Ok(())
}

/// Validate a sampled record from padded `ids [L, M]` / `counts [L, M]` (entries with
/// count 0 are padding) and optional `logprobs [L, M]`, and append it to `buf`; on any error
/// `buf` is left as it was.
#[allow(clippy::too_many_arguments)]
pub fn append_sampled(
    buf: &mut ChunkBuf,
    seen: &mut SeenIds,
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
    max_mass: Option<f64>,
) -> Result<()> {
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
    let l32 = u32::try_from(l).map_err(|_| Error::InvalidRecord {
        sample_id,
        msg: format!("{l} positions; a record holds at most 2^32 - 1"),
    })?;
    let mark = buf.mark();
    let r = append_sampled_rows(
        buf, seen, sample_id, input_ids, ids, m, counts, logprobs, n_draws, vocab, max_mass,
    );
    match r {
        Ok(()) => {
            buf.sample_ids.push(sample_id);
            buf.lengths.push(l32);
            Ok(())
        }
        Err(e) => {
            buf.rollback(mark);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn append_sampled_rows(
    buf: &mut ChunkBuf,
    seen: &mut SeenIds,
    sample_id: u64,
    input_ids: IdArray<'_>,
    ids: IdArray<'_>,
    m: usize,
    counts: IdArray<'_>,
    logprobs: Option<(&[f32], &[usize])>,
    n_draws: u32,
    vocab: u32,
    max_mass: Option<f64>,
) -> Result<()> {
    let l = input_ids.len();
    append_ids(&mut buf.input_ids, sample_id, input_ids, vocab, "input id", 0)?;
    let bad = |pos: usize, msg: String| Error::InvalidRecord {
        sample_id,
        msg: format!("position {pos}: {msg}"),
    };
    for pos in 0..l {
        seen.next_row();
        let mut total: u64 = 0;
        let mut n_ids = 0u32;
        let mut mass = 0.0f64;
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
            buf.ids.push(id);
            buf.counts.push(c as u32);
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
                buf.logprobs.push(v);
                mass += f64::from(v).exp();
            }
            n_ids += 1;
        }
        if let Some(limit) = max_mass
            && mass > limit
        {
            return Err(bad(
                pos,
                format!(
                    "the probabilities of the sampled ids add up to {mass:.6}, more than 1 by over the {MAX_ROW_MASS_SLACK} that rounding may add: these are not the log-probabilities of distinct ids of one distribution"
                ),
            ));
        }
        if total != u64::from(n_draws) {
            return Err(bad(
                pos,
                format!("counts add up to {total}, expected n = {n_draws} draws"),
            ));
        }
        buf.row_lens.push(n_ids);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The AVX2 build of the quick row check gives the baseline build's verdict, on rows
        /// near every rule's edge (NaN, positive, unsorted, mass near the limit).
        #[test]
        fn dispatched_quick_check_matches_the_baseline(
            row in proptest::collection::vec(
                proptest::prop_oneof![
                    -12.0f32..0.0,
                    proptest::num::f32::ANY,
                    proptest::sample::select(vec![0.0f32, -0.0, f32::NEG_INFINITY, f32::NAN,
                                                  1e-6, 2e-6, -std::f32::consts::LN_2, -1.0986123]),
                ],
                0..70),
            sort in proptest::bool::ANY,
        ) {
            let mut row = row;
            if sort {
                row.sort_by(|a, b| b.total_cmp(a));
            }
            proptest::prop_assert_eq!(
                row_values_are_clearly_fine(&row, CHECK_QUICK_MASS),
                row_values_are_clearly_fine_baseline(&row, CHECK_QUICK_MASS)
            );
        }
    }

    proptest::proptest! {
        /// The conflict check says "distinct" exactly when every row is, for every K it
        /// takes (where the CPU has AVX-512 CD), and never for others; a repeat anywhere
        /// (in one eighth of a row, across eighths, in any row) is seen, and the record
        /// check then names it as the stamps do.
        #[test]
        fn conflict_check_agrees_with_the_definition(
            eighths in 1usize..10,
            odd in 0usize..8,
            rows in 1usize..6,
            repeats in proptest::collection::vec((0usize..6, 0usize..80, 0usize..80), 0..3),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let k = eighths * 8 + if odd == 7 { 3 } else { 0 };
            let mut x = seed | 1;
            // Distinct ids per row: a random start and odd stride modulo 2^20.
            let mut ids: Vec<u32> = (0..rows)
                .flat_map(|_| {
                    crate::test_util::xorshift(&mut x);
                    let (a, b) = ((x >> 12) as u32, (x >> 40) as u32 | 1);
                    (0..k as u32).map(move |j| a.wrapping_add(j.wrapping_mul(b)) & 0xF_FFFF)
                })
                .collect();
            for &(r, from, to) in &repeats {
                let (r, from, to) = (r % rows, from % k, to % k);
                if from != to {
                    ids[r * k + to] = ids[r * k + from];
                }
            }
            let distinct = ids.chunks(k).all(|row| {
                let mut sorted = row.to_vec();
                sorted.sort_unstable();
                sorted.windows(2).all(|w| w[0] != w[1])
            });
            let by_conflicts = rows_are_distinct_by_conflicts(&ids, k);
            proptest::prop_assert!(!by_conflicts || distinct);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512cd")
                && k % 8 == 0
                && (16..=64).contains(&k)
            {
                proptest::prop_assert_eq!(by_conflicts, distinct);
            }
            let lp = vec![-5.0f32; ids.len()];
            let mut seen = SeenIds::new(1 << 20);
            let checked = check_topk_values(7, &ids, &lp, k, &mut seen);
            proptest::prop_assert_eq!(checked.is_ok(), distinct);
            if let Err(e) = checked {
                proptest::prop_assert!(e.to_string().contains("appears twice"), "{}", e);
            }
        }
    }

    #[test]
    fn stamps_wrap_around_without_false_repeats() {
        let mut seen = SeenIds::new(10);
        // Id 3 stamped once, then 2^16 - 1 rows without it: its stale stamp equals the
        // current one again unless the wrap clears the stamps.
        assert!(seen.row_is_distinct(&[3, 4]));
        for _ in 0..u16::MAX - 1 {
            assert!(seen.row_is_distinct(&[5, 6]));
        }
        for _ in 0..3 {
            assert!(seen.row_is_distinct(&[3, 7]));
        }
        assert!(!seen.row_is_distinct(&[8, 9, 8]));
        assert!(!seen.row_is_distinct(&[2, 10]), "an id past the vocabulary is refused");
    }

    fn topk(ids: &[i64], lp: &[f32], k: usize) -> Result<ChunkBuf> {
        let l = ids.len() / k;
        let input: Vec<i64> = vec![1; l];
        let mut seen = SeenIds::new(100);
        let mut buf = ChunkBuf::default();
        append_topk(
            &mut buf,
            &mut seen,
            7,
            IdArray::I64(&input),
            IdArray::I64(ids),
            &[l, k],
            lp,
            &[l, k],
            k as u32,
            100,
        )?;
        Ok(buf)
    }

    #[test]
    fn id_range_check_of_every_dtype_names_the_first_bad_entry() {
        let vocab = 300u32;
        let run = |arr: IdArray<'_>| {
            let mut out = vec![7u32];
            let r = append_ids(&mut out, 1, arr, vocab, "id", 2);
            (r.err().map(|e| e.to_string()), out)
        };
        let (err, out) = run(IdArray::I64(&[0, 299, 5]));
        assert!(err.is_none());
        assert_eq!(out, vec![7, 0, 299, 5]);
        for (arr, at) in [
            (IdArray::I64(&[0, 1, -1, 300]), "id -1 at position 1, rank 0"),
            (IdArray::I64(&[0, i64::MIN]), "id -9223372036854775808 at position 0, rank 1"),
            (IdArray::I32(&[3, 300]), "id 300 at position 0, rank 1"),
            (IdArray::I32(&[-2]), "id -2 at position 0, rank 0"),
            (IdArray::U32(&[1, 2, 4_000_000_000]), "id 4000000000 at position 1, rank 0"),
            (IdArray::U16(&[65535]), "id 65535 at position 0, rank 0"),
            (IdArray::U64(&[1, u64::MAX]), "id 18446744073709551615 at position 0, rank 1"),
        ] {
            let (err, out) = run(arr);
            let err = err.unwrap_or_default();
            assert!(err.contains(at), "{err}");
            assert_eq!(out, vec![7], "nothing appended on error");
        }
    }

    #[test]
    fn approx_exp_is_close() {
        let mut x = 0.0f32;
        while x > -80.0 {
            let (a, b) = (f64::from(approx_exp(x)), f64::from(x).exp());
            assert!((a - b).abs() <= 2e-4 * b, "{x}: {a} vs {b}");
            x -= 0.0137;
        }
        assert_eq!(approx_exp(-100.0), 0.0);
        assert_eq!(approx_exp(f32::NEG_INFINITY), 0.0);
        // Not log-probabilities, but the record check's quick pass sees them: no overflow.
        for x in [88.0f32, 1e3, f32::INFINITY] {
            assert!(approx_exp(x) > 1e38 && approx_exp(x).is_finite(), "{x}");
        }
        assert!(approx_exp(f32::NAN).is_nan());
    }

    /// The float-only floor inside `approx_exp` agrees with `f32::floor` on every input of
    /// a dense sweep, at integers of x log2(e) and one ulp either side of them.
    #[test]
    fn approx_exp_floor_is_exact() {
        let with_floor = |x: f32| {
            let t = x.clamp(-87.0, 88.0) * std::f32::consts::LOG2_E;
            let fl = t.floor();
            let f = t - fl;
            let p = 1.0 + f * (0.695_036 + f * (0.228_308_76 + f * 0.076_325));
            let e = f32::from_bits(((fl as i32 + 127) as u32) << 23) * p;
            if x < -87.0 { 0.0 } else { e }
        };
        let mut xs: Vec<f32> = (-(100 << 12)..(90 << 12)).map(|i| i as f32 / 4096.0).collect();
        for n in -130..=130 {
            let x = n as f32 / std::f32::consts::LOG2_E;
            xs.extend([x, x.next_down(), x.next_up()]);
        }
        for x in xs {
            assert_eq!(approx_exp(x).to_bits(), with_floor(x).to_bits(), "{x}");
        }
    }

    #[test]
    fn topk_rules() {
        let ok = topk(&[3, 4, 5, 6], &[-0.2, -2.0, -0.5, f32::NEG_INFINITY], 2).unwrap();
        assert_eq!((ok.num_records(), ok.positions(), ok.entries()), (1, 2, 4));
        let msg = |r: Result<ChunkBuf>| r.unwrap_err().to_string();
        assert!(msg(topk(&[3, 3], &[-0.2, -2.0], 2)).contains("appears twice"));
        assert!(msg(topk(&[3, 100], &[-0.1, -2.0], 2)).contains("outside the vocabulary"));
        assert!(msg(topk(&[3, -1], &[-0.1, -2.0], 2)).contains("outside the vocabulary"));
        assert!(msg(topk(&[3, 4], &[-2.0, -0.1], 2)).contains("not sorted"));
        assert!(msg(topk(&[3, 4], &[f32::NAN, -0.1], 2)).contains("NaN"));
        assert!(msg(topk(&[3, 4], &[f32::INFINITY, -0.1], 2)).contains("positive"));
        assert!(msg(topk(&[3, 4], &[0.5, -0.1], 2)).contains("positive"));
        assert!(msg(topk(&[3, 4], &[-0.1, -0.2], 2)).contains("add up to"));
        let mut seen = SeenIds::new(100);
        let mut buf = ChunkBuf::default();
        let e = append_topk(
            &mut buf,
            &mut seen,
            1,
            IdArray::I64(&[1]),
            IdArray::I64(&[1, 2]),
            &[2, 1],
            &[0.0, 0.0],
            &[1, 2],
            2,
            100,
        );
        assert!(e.unwrap_err().to_string().contains("topk_ids"));
    }

    #[test]
    fn failed_appends_leave_the_buffer_unchanged() {
        let mut seen = SeenIds::new(100);
        let mut buf = ChunkBuf::default();
        append_topk(
            &mut buf,
            &mut seen,
            1,
            IdArray::I64(&[1]),
            IdArray::I64(&[1, 2]),
            &[1, 2],
            &[-1.0, -2.0],
            &[1, 2],
            2,
            100,
        )
        .unwrap();
        let before = (buf.positions(), buf.entries(), buf.logprobs.len(), buf.num_records());
        let e = append_topk(
            &mut buf,
            &mut seen,
            2,
            IdArray::I64(&[1, 2]),
            IdArray::I64(&[1, 2, 3, 3]),
            &[2, 2],
            &[-1.0, -2.0, -1.0, -2.0],
            &[2, 2],
            2,
            100,
        );
        assert!(e.is_err());
        assert_eq!(before, (buf.positions(), buf.entries(), buf.logprobs.len(), buf.num_records()));
    }

    #[test]
    fn sampled_rules() {
        let mut seen = SeenIds::new(50);
        let mut buf = ChunkBuf::default();
        let input = [1i64, 2];
        let ids = [5i64, 6, -1, 7, -1, -1];
        let counts = [2i64, 1, 0, 3, 0, 0];
        append_sampled(
            &mut buf,
            &mut seen,
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
            Some(MAX_ROW_MASS),
        )
        .unwrap();
        assert_eq!(buf.row_lens, vec![2, 1]);
        assert_eq!(buf.ids, vec![5, 6, 7]);
        assert_eq!(buf.counts, vec![2, 1, 3]);
        let bad_counts = [2i64, 2, 0, 3, 0, 0];
        let e = append_sampled(
            &mut buf,
            &mut seen,
            2,
            IdArray::I64(&input),
            IdArray::I64(&ids),
            &[2, 3],
            IdArray::I64(&bad_counts),
            &[2, 3],
            None,
            3,
            50,
            false,
            Some(MAX_ROW_MASS),
        );
        assert!(e.unwrap_err().to_string().contains("more than n"));
        let dup = [5i64, 5, -1, 7, -1, -1];
        let e = append_sampled(
            &mut buf,
            &mut seen,
            2,
            IdArray::I64(&input),
            IdArray::I64(&dup),
            &[2, 3],
            IdArray::I64(&counts),
            &[2, 3],
            None,
            3,
            50,
            false,
            Some(MAX_ROW_MASS),
        );
        assert!(e.unwrap_err().to_string().contains("twice"));
        let lp = [-0.1f32, -1.0, 0.0, -0.2, 0.0, 0.0];
        let e = append_sampled(
            &mut buf,
            &mut seen,
            2,
            IdArray::I64(&input),
            IdArray::I64(&ids),
            &[2, 3],
            IdArray::I64(&counts),
            &[2, 3],
            Some((&lp, &[2, 3])),
            3,
            50,
            false,
            Some(MAX_ROW_MASS),
        );
        assert!(e.unwrap_err().to_string().contains("keeps no log-probabilities"));
        // The sampled ids' probabilities are those of distinct ids of one distribution: their
        // sum is at most 1 (and the rounding slack); unchecked where the caller says so (a
        // copy of decoded values, which a coarse codec may have rounded up further).
        let heavy = [-0.1f32, -0.1, 0.0, -0.2, 0.0, 0.0];
        let with_lp =
            |lp: &[f32], max_mass: Option<f64>, seen: &mut SeenIds, buf: &mut ChunkBuf| {
                append_sampled(
                    buf,
                    seen,
                    3,
                    IdArray::I64(&input),
                    IdArray::I64(&ids),
                    &[2, 3],
                    IdArray::I64(&counts),
                    &[2, 3],
                    Some((lp, &[2, 3])),
                    3,
                    50,
                    true,
                    max_mass,
                )
            };
        let e = with_lp(&heavy, Some(MAX_ROW_MASS), &mut seen, &mut buf).unwrap_err().to_string();
        assert!(
            e.contains("position 0: the probabilities of the sampled ids add up to 1.80"),
            "{e}"
        );
        assert_eq!(buf.num_records(), 1);
        with_lp(&heavy, None, &mut seen, &mut buf).unwrap();
        assert_eq!(buf.num_records(), 2);
        assert_eq!(buf.row_lens, vec![2, 1, 2, 1]);
    }
}
