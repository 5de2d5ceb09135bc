//! Fused CPU kernels of the distillation losses (DESIGN.md "Losses" and the loss contract).
//!
//! Each function takes row-major `[N, V]` student logits (f32 or bfloat16 bits), the teacher
//! targets of the same N rows and a `valid` flag per row, and writes one f32 divergence per
//! row and, when asked, the gradient with respect to the logits (same dtype and shape) into
//! buffers the caller owns. Per row, one pass computes the log-sum-exp (and for the bucket
//! tail that of the complement), O(K) work gives the loss and the gradient coefficients, and
//! one more pass over the row (still in cache) writes the gradient. Rows run in parallel on
//! the shared pool ([`crate::threads`]); each row is computed by the same code whatever the
//! number of threads, so the results do not depend on it.
//!
//! Rows with `valid[r] == false` get 0 and a zero gradient row; their targets are not read.
//! Every argument is validated (shapes, ids in range and distinct per valid row, finite
//! teacher values, NaN/+inf student logits detected from the row's log-sum-exp) and a bad
//! one is reported as [`Error::InvalidArgument`] naming it; when several rows are bad the
//! lowest is reported.

mod dense;
mod divergence;
mod rowops;
mod simd;
mod sparse;

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

pub use divergence::{DIVERGENCE_NAMES, Divergence, PROB_FLOOR};
pub use sparse::Tail;

use crate::error::{Error, Result};
use crate::threads;
use dense::DenseRow;
use rowops::scale_in_place;
use simd::{Elem, Kernel, Simd, dispatch};
use sparse::{SampledRow, Scratch, TopKRow, TopKSettings};

/// Row-major logits: `f32`, or bfloat16 given as its 16-bit patterns.
#[derive(Clone, Copy, Debug)]
pub enum Logits<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

/// Where the gradient goes: the dtype of the student logits, their shape.
#[derive(Debug)]
pub enum GradOut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
}

/// Settings of [`sparse_kd`].
#[derive(Clone, Copy, Debug)]
pub struct SparseKdConfig {
    pub divergence: Divergence,
    pub tail: Tail,
    /// Student temperature `T` (> 0).
    pub temperature: f64,
    /// Capture temperature of the stored log-probabilities (> 0); must equal `temperature`
    /// for the bucket tail.
    pub teacher_temperature: f64,
}

fn check_temperature(arg: &str, t: f64) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid_argument(arg, format!("must be a finite number > 0, got {t}")))
    }
}

fn check_len(arg: &str, len: usize, rows: usize, cols: usize, what: &str) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(n) if n == len => Ok(()),
        _ => Err(Error::invalid_argument(
            arg,
            format!("expected {rows} x {cols} values ({rows} rows of {what}), got {len} values"),
        )),
    }
}

fn check_cols(arg: &str, cols: usize, what: &str) -> Result<()> {
    if cols == 0 {
        Err(Error::invalid_argument(arg, format!("needs at least one column ({what})")))
    } else {
        Ok(())
    }
}

impl Logits<'_> {
    fn len(&self) -> usize {
        match self {
            Logits::F32(x) => x.len(),
            Logits::Bf16(x) => x.len(),
        }
    }
}

impl GradOut<'_> {
    fn len(&self) -> usize {
        match self {
            GradOut::F32(x) => x.len(),
            GradOut::Bf16(x) => x.len(),
        }
    }
}

/// Rows per parallel task at least: short rows are batched so each task has some work.
const MIN_TASK_ELEMS: usize = 1 << 15;

/// Run `row_fn(row, grad_row, scratch)` for every valid row, in parallel on the shared pool;
/// invalid rows get 0 and zeros. Returns the error of the lowest failing row.
fn run_rows<E: Elem, F>(
    vocab: usize,
    valid: &[bool],
    values: &mut [f32],
    grad: Option<&mut [E]>,
    row_fn: F,
) -> Result<()>
where
    F: Fn(usize, Option<&mut [E]>, &mut Scratch) -> Result<f64> + Sync,
{
    let min_len = (MIN_TASK_ELEMS / vocab.max(1)).max(1);
    let one = |sc: &mut Scratch, row: usize, val: &mut f32, g: Option<&mut [E]>| {
        if !valid[row] {
            *val = 0.0;
            if let Some(g) = g {
                g.fill(E::from_f32(0.0));
            }
            return None;
        }
        match row_fn(row, g, sc) {
            Ok(d) => {
                *val = d as f32;
                None
            }
            Err(e) => Some((row, e)),
        }
    };
    let first_error = threads::install(|| match grad {
        Some(grad) => values
            .par_iter_mut()
            .zip(grad.par_chunks_mut(vocab))
            .enumerate()
            .with_min_len(min_len)
            .map_init(Scratch::default, |sc, (row, (val, g))| one(sc, row, val, Some(g)))
            .flatten()
            .min_by_key(|(row, _)| *row),
        None => values
            .par_iter_mut()
            .enumerate()
            .with_min_len(min_len)
            .map_init(Scratch::default, |sc, (row, val)| one(sc, row, val, None))
            .flatten()
            .min_by_key(|(row, _)| *row),
    })?;
    match first_error {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

fn check_grad(grad: &Option<GradOut<'_>>, student: &Logits<'_>) -> Result<()> {
    if let Some(g) = grad {
        let same_dtype = matches!(
            (g, student),
            (GradOut::F32(_), Logits::F32(_)) | (GradOut::Bf16(_), Logits::Bf16(_))
        );
        if !same_dtype {
            return Err(Error::invalid_argument("grad", "must have the dtype of student_logits"));
        }
        if g.len() != student.len() {
            return Err(Error::invalid_argument(
                "grad",
                format!(
                    "must have the shape of student_logits ({} values), got {} values",
                    student.len(),
                    g.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Per-row divergence between top-K teacher targets and the student (DESIGN.md "Losses",
/// tail modes `bucket` and `renormalize`), and optionally its gradient.
///
/// `student`: `[N, vocab]`; `ids`, `logprobs`: `[N, k]` (teacher rank order, log-probabilities
/// at `teacher_temperature`); `valid`: `[N]`; `values`: `[N]`; `grad`: `[N, vocab]`.
#[allow(clippy::too_many_arguments)]
pub fn sparse_kd(
    student: Logits<'_>,
    vocab: usize,
    ids: &[i64],
    logprobs: &[f32],
    k: usize,
    valid: &[bool],
    config: &SparseKdConfig,
    values: &mut [f32],
    grad: Option<GradOut<'_>>,
) -> Result<()> {
    let n = valid.len();
    check_cols("student_logits", vocab, "the vocabulary")?;
    check_len("student_logits", student.len(), n, vocab, "the vocabulary")?;
    check_cols("ids", k, "K")?;
    check_len("ids", ids.len(), n, k, "K ids")?;
    check_len("logprobs", logprobs.len(), n, k, "K log-probabilities")?;
    check_len("values", values.len(), n, 1, "one value")?;
    check_grad(&grad, &student)?;
    check_temperature("temperature", config.temperature)?;
    check_temperature("teacher_temperature", config.teacher_temperature)?;
    if config.tail == Tail::Bucket && config.temperature != config.teacher_temperature {
        return Err(Error::invalid_argument(
            "temperature",
            format!(
                "the bucket tail needs temperature == teacher_temperature (got {} and {}): \
                 re-tempering the teacher would need the tail mass outside the stored ids; \
                 use tail=\"renormalize\"",
                config.temperature, config.teacher_temperature
            ),
        ));
    }
    let settings = TopKSettings {
        divergence: config.divergence,
        tail: config.tail,
        temperature: config.temperature,
        teacher_temperature: config.teacher_temperature,
    };
    #[allow(clippy::too_many_arguments)]
    fn go<E: Elem>(
        z: &[E],
        vocab: usize,
        ids: &[i64],
        logprobs: &[f32],
        k: usize,
        valid: &[bool],
        settings: TopKSettings,
        values: &mut [f32],
        grad: Option<&mut [E]>,
    ) -> Result<()> {
        run_rows(vocab, valid, values, grad, |row, grad, scratch| {
            dispatch(TopKRow {
                row,
                z: &z[row * vocab..(row + 1) * vocab],
                ids: &ids[row * k..(row + 1) * k],
                logprobs: &logprobs[row * k..(row + 1) * k],
                grad,
                settings,
                scratch,
            })
        })
    }
    match (student, grad) {
        (Logits::F32(z), Some(GradOut::F32(g))) => {
            go(z, vocab, ids, logprobs, k, valid, settings, values, Some(g))
        }
        (Logits::F32(z), _) => go(z, vocab, ids, logprobs, k, valid, settings, values, None),
        (Logits::Bf16(z), Some(GradOut::Bf16(g))) => {
            go(z, vocab, ids, logprobs, k, valid, settings, values, Some(g))
        }
        (Logits::Bf16(z), _) => go(z, vocab, ids, logprobs, k, valid, settings, values, None),
    }
}

/// Per-row forward-KL estimate from sampled teacher ids (DESIGN.md "Losses", sampled):
/// `sum_j w_j (log p_j - log q_j)` with `w_j = count_j / sum(counts)`; without `logprobs`,
/// `log w_j` stands in for `log p_j`. Padding entries have count 0 (their id is not read).
///
/// `ids`, `counts`, `logprobs`: `[N, m]`; the rest as in [`sparse_kd`].
#[allow(clippy::too_many_arguments)]
pub fn sampled_kd(
    student: Logits<'_>,
    vocab: usize,
    ids: &[i64],
    counts: &[i64],
    logprobs: Option<&[f32]>,
    m: usize,
    valid: &[bool],
    temperature: f64,
    teacher_temperature: f64,
    values: &mut [f32],
    grad: Option<GradOut<'_>>,
) -> Result<()> {
    let n = valid.len();
    check_cols("student_logits", vocab, "the vocabulary")?;
    check_len("student_logits", student.len(), n, vocab, "the vocabulary")?;
    check_cols("ids", m, "sampled ids")?;
    check_len("ids", ids.len(), n, m, "sampled ids")?;
    check_len("counts", counts.len(), n, m, "counts")?;
    if let Some(lp) = logprobs {
        check_len("logprobs", lp.len(), n, m, "log-probabilities")?;
    }
    check_len("values", values.len(), n, 1, "one value")?;
    check_grad(&grad, &student)?;
    check_temperature("temperature", temperature)?;
    check_temperature("teacher_temperature", teacher_temperature)?;
    if temperature != teacher_temperature {
        return Err(Error::invalid_argument(
            "temperature",
            format!(
                "sampled targets need temperature == teacher_temperature (got {temperature} \
                 and {teacher_temperature}): the samples were drawn at the capture temperature"
            ),
        ));
    }
    #[allow(clippy::too_many_arguments)]
    fn go<E: Elem>(
        z: &[E],
        vocab: usize,
        ids: &[i64],
        counts: &[i64],
        logprobs: Option<&[f32]>,
        m: usize,
        valid: &[bool],
        temperature: f64,
        values: &mut [f32],
        grad: Option<&mut [E]>,
    ) -> Result<()> {
        run_rows(vocab, valid, values, grad, |row, grad, scratch| {
            let cols = row * m..(row + 1) * m;
            dispatch(SampledRow {
                row,
                z: &z[row * vocab..(row + 1) * vocab],
                ids: &ids[cols.clone()],
                counts: &counts[cols.clone()],
                logprobs: logprobs.map(|lp| &lp[cols]),
                grad,
                temperature,
                scratch,
            })
        })
    }
    let t = temperature;
    match (student, grad) {
        (Logits::F32(z), Some(GradOut::F32(g))) => {
            go(z, vocab, ids, counts, logprobs, m, valid, t, values, Some(g))
        }
        (Logits::F32(z), _) => go(z, vocab, ids, counts, logprobs, m, valid, t, values, None),
        (Logits::Bf16(z), Some(GradOut::Bf16(g))) => {
            go(z, vocab, ids, counts, logprobs, m, valid, t, values, Some(g))
        }
        (Logits::Bf16(z), _) => go(z, vocab, ids, counts, logprobs, m, valid, t, values, None),
    }
}

/// Settings of [`dense_kd`].
#[derive(Clone, Copy, Debug)]
pub struct DenseKdConfig {
    pub divergence: Divergence,
    /// Temperature `T` (> 0) of both the student and the teacher logits.
    pub temperature: f64,
}

/// Per-row divergence between full teacher logits (`[N, teacher_vocab]`,
/// `teacher_vocab <= vocab`; `P = softmax(t / T)` zero-padded to `vocab`) and the student,
/// and optionally its gradient.
#[allow(clippy::too_many_arguments)]
pub fn dense_kd(
    student: Logits<'_>,
    vocab: usize,
    teacher: Logits<'_>,
    teacher_vocab: usize,
    valid: &[bool],
    config: &DenseKdConfig,
    values: &mut [f32],
    grad: Option<GradOut<'_>>,
) -> Result<()> {
    let n = valid.len();
    check_cols("student_logits", vocab, "the vocabulary")?;
    check_len("student_logits", student.len(), n, vocab, "the vocabulary")?;
    check_cols("teacher_logits", teacher_vocab, "the teacher vocabulary")?;
    if teacher_vocab > vocab {
        return Err(Error::invalid_argument(
            "teacher_logits",
            format!(
                "the teacher vocabulary ({teacher_vocab}) is wider than the student's \
                 ({vocab}); a student may be padded, a teacher may not"
            ),
        ));
    }
    check_len("teacher_logits", teacher.len(), n, teacher_vocab, "the teacher vocabulary")?;
    check_len("values", values.len(), n, 1, "one value")?;
    check_grad(&grad, &student)?;
    check_temperature("temperature", config.temperature)?;

    #[allow(clippy::too_many_arguments)]
    fn go<E: Elem, T: Elem>(
        z: &[E],
        vocab: usize,
        t: &[T],
        tv: usize,
        valid: &[bool],
        divergence: Divergence,
        temperature: f64,
        values: &mut [f32],
        grad: Option<&mut [E]>,
    ) -> Result<()> {
        run_rows(vocab, valid, values, grad, |row, grad, _| {
            dispatch(DenseRow {
                row,
                z: &z[row * vocab..(row + 1) * vocab],
                t: &t[row * tv..(row + 1) * tv],
                grad,
                divergence,
                temperature,
            })
        })
    }
    #[allow(clippy::too_many_arguments)]
    fn with_teacher<E: Elem>(
        z: &[E],
        vocab: usize,
        teacher: Logits<'_>,
        tv: usize,
        valid: &[bool],
        config: &DenseKdConfig,
        values: &mut [f32],
        grad: Option<&mut [E]>,
    ) -> Result<()> {
        let (d, t) = (config.divergence, config.temperature);
        match teacher {
            Logits::F32(x) => go(z, vocab, x, tv, valid, d, t, values, grad),
            Logits::Bf16(x) => go(z, vocab, x, tv, valid, d, t, values, grad),
        }
    }
    let tv = teacher_vocab;
    match (student, grad) {
        (Logits::F32(z), Some(GradOut::F32(g))) => {
            with_teacher(z, vocab, teacher, tv, valid, config, values, Some(g))
        }
        (Logits::F32(z), _) => with_teacher(z, vocab, teacher, tv, valid, config, values, None),
        (Logits::Bf16(z), Some(GradOut::Bf16(g))) => {
            with_teacher(z, vocab, teacher, tv, valid, config, values, Some(g))
        }
        (Logits::Bf16(z), _) => with_teacher(z, vocab, teacher, tv, valid, config, values, None),
    }
}

/// One gradient row scaled in place.
struct ScaleRow<'a, E: Elem> {
    row: &'a mut [E],
    factor: f32,
}

impl<E: Elem> Kernel for ScaleRow<'_, E> {
    type Output = ();

    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        scale_in_place(s, self.row, self.factor);
    }
}

/// Multiply row `r` of `grad` (`[N, vocab]`) by `factors[r]` in place, rows in parallel on
/// the shared pool: the backward of the per-row values, `grad_output[:, None] * grad`,
/// without a second `[N, vocab]` buffer (bf16 rows are scaled in f32 and rounded once).
pub fn scale_rows(grad: GradOut<'_>, vocab: usize, factors: &[f32]) -> Result<()> {
    check_cols("grad", vocab, "the vocabulary")?;
    check_len("grad", grad.len(), factors.len(), vocab, "the vocabulary")?;
    fn go<E: Elem>(grad: &mut [E], vocab: usize, factors: &[f32]) -> Result<()> {
        let min_len = (MIN_TASK_ELEMS / vocab).max(1);
        threads::install(|| {
            grad.par_chunks_mut(vocab).zip(factors.par_iter()).with_min_len(min_len).for_each(
                |(row, &factor)| {
                    if factor != 1.0 {
                        dispatch(ScaleRow { row, factor });
                    }
                },
            );
        })
    }
    match grad {
        GradOut::F32(g) => go(g, vocab, factors),
        GradOut::Bf16(g) => go(g, vocab, factors),
    }
}
