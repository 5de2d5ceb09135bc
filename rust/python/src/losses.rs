//! Bindings of the loss kernels (`logitcache_core::kernels`): numpy views of contiguous torch
//! tensors in (bfloat16 as `uint16` views), values and gradient written into arrays the
//! caller allocated, the GIL released while the kernels run. No logic lives here.

use logitcache_core::Error;
use logitcache_core::kernels::{
    self, DenseKdConfig, Divergence, GradOut, Logits, SparseKdConfig, Tail,
};
use numpy::{AsSliceError, PyUntypedArrayMethods};
use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray1, PyReadwriteArray2};
use pyo3::prelude::*;

use crate::errors::{IntoPyResult, to_py};

fn bad(arg: &str, msg: impl Into<String>) -> PyErr {
    to_py(Error::invalid_argument(arg, msg))
}

fn contiguous(arg: &'static str) -> impl Fn(AsSliceError) -> PyErr {
    move |_| bad(arg, "must be C-contiguous")
}

/// A 2-D float32 array or a uint16 view of a bfloat16 one.
enum LogitsArray<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    Bf16(PyReadonlyArray2<'py, u16>),
}

impl<'py> LogitsArray<'py> {
    fn extract(obj: &Bound<'py, PyAny>, arg: &'static str) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
            return Ok(LogitsArray::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, u16>>() {
            return Ok(LogitsArray::Bf16(a));
        }
        Err(bad(arg, "must be a 2-D float32 array or a uint16 view of a bfloat16 one"))
    }

    fn cols(&self) -> usize {
        match self {
            LogitsArray::F32(a) => a.shape()[1],
            LogitsArray::Bf16(a) => a.shape()[1],
        }
    }

    fn slice(&self, arg: &'static str) -> PyResult<Logits<'_>> {
        Ok(match self {
            LogitsArray::F32(a) => Logits::F32(a.as_slice().map_err(contiguous(arg))?),
            LogitsArray::Bf16(a) => Logits::Bf16(a.as_slice().map_err(contiguous(arg))?),
        })
    }
}

/// The writable gradient array, of the student's dtype.
enum GradArray<'py> {
    F32(PyReadwriteArray2<'py, f32>),
    Bf16(PyReadwriteArray2<'py, u16>),
}

impl<'py> GradArray<'py> {
    fn extract(obj: Option<&Bound<'py, PyAny>>) -> PyResult<Option<Self>> {
        let Some(obj) = obj else { return Ok(None) };
        if let Ok(a) = obj.extract::<PyReadwriteArray2<'py, f32>>() {
            return Ok(Some(GradArray::F32(a)));
        }
        if let Ok(a) = obj.extract::<PyReadwriteArray2<'py, u16>>() {
            return Ok(Some(GradArray::Bf16(a)));
        }
        Err(bad("grad", "must be a writable 2-D float32 array or a uint16 view of a bfloat16 one"))
    }

    fn slice(&mut self) -> PyResult<GradOut<'_>> {
        Ok(match self {
            GradArray::F32(a) => GradOut::F32(a.as_slice_mut().map_err(contiguous("grad"))?),
            GradArray::Bf16(a) => GradOut::Bf16(a.as_slice_mut().map_err(contiguous("grad"))?),
        })
    }
}

/// Top-K targets: writes per-row values into `values` and, when given, the gradient with
/// respect to `student_logits` into `grad`.
#[pyfunction]
#[pyo3(signature = (
    student_logits, ids, logprobs, valid, values, grad, *,
    divergence, tail, temperature, teacher_temperature, beta, alpha
))]
#[allow(clippy::too_many_arguments)]
fn sparse_kd<'py>(
    py: Python<'py>,
    student_logits: &Bound<'py, PyAny>,
    ids: PyReadonlyArray2<'py, i64>,
    logprobs: PyReadonlyArray2<'py, f32>,
    valid: PyReadonlyArray1<'py, bool>,
    mut values: PyReadwriteArray1<'py, f32>,
    grad: Option<&Bound<'py, PyAny>>,
    divergence: &str,
    tail: &str,
    temperature: f64,
    teacher_temperature: f64,
    beta: f64,
    alpha: f64,
) -> PyResult<()> {
    let config = SparseKdConfig {
        divergence: Divergence::parse(divergence, beta, alpha).py_err()?,
        tail: Tail::parse(tail).py_err()?,
        temperature,
        teacher_temperature,
    };
    let student = LogitsArray::extract(student_logits, "student_logits")?;
    let mut grad = GradArray::extract(grad)?;
    let vocab = student.cols();
    let k = ids.shape()[1];
    let z = student.slice("student_logits")?;
    let ids = ids.as_slice().map_err(contiguous("ids"))?;
    let logprobs = logprobs.as_slice().map_err(contiguous("logprobs"))?;
    let valid = valid.as_slice().map_err(contiguous("valid"))?;
    let values = values.as_slice_mut().map_err(contiguous("values"))?;
    let grad = grad.as_mut().map(GradArray::slice).transpose()?;
    py.detach(|| kernels::sparse_kd(z, vocab, ids, logprobs, k, valid, &config, values, grad))
        .py_err()
}

/// Sampled targets (forward KL estimator); `logprobs` may be None.
#[pyfunction]
#[pyo3(signature = (
    student_logits, ids, counts, logprobs, valid, values, grad, *,
    temperature, teacher_temperature
))]
#[allow(clippy::too_many_arguments)]
fn sampled_kd<'py>(
    py: Python<'py>,
    student_logits: &Bound<'py, PyAny>,
    ids: PyReadonlyArray2<'py, i64>,
    counts: PyReadonlyArray2<'py, i64>,
    logprobs: Option<PyReadonlyArray2<'py, f32>>,
    valid: PyReadonlyArray1<'py, bool>,
    mut values: PyReadwriteArray1<'py, f32>,
    grad: Option<&Bound<'py, PyAny>>,
    temperature: f64,
    teacher_temperature: f64,
) -> PyResult<()> {
    let student = LogitsArray::extract(student_logits, "student_logits")?;
    let mut grad = GradArray::extract(grad)?;
    let vocab = student.cols();
    let m = ids.shape()[1];
    let z = student.slice("student_logits")?;
    let ids = ids.as_slice().map_err(contiguous("ids"))?;
    let counts = counts.as_slice().map_err(contiguous("counts"))?;
    let logprobs =
        logprobs.as_ref().map(|a| a.as_slice().map_err(contiguous("logprobs"))).transpose()?;
    let valid = valid.as_slice().map_err(contiguous("valid"))?;
    let values = values.as_slice_mut().map_err(contiguous("values"))?;
    let grad = grad.as_mut().map(GradArray::slice).transpose()?;
    py.detach(|| {
        kernels::sampled_kd(
            z,
            vocab,
            ids,
            counts,
            logprobs,
            m,
            valid,
            temperature,
            teacher_temperature,
            values,
            grad,
        )
    })
    .py_err()
}

/// Dense teacher logits (`teacher_logits` may be narrower than the student's vocabulary).
#[pyfunction]
#[pyo3(signature = (
    student_logits, teacher_logits, valid, values, grad, *,
    divergence, temperature, beta, alpha
))]
#[allow(clippy::too_many_arguments)]
fn dense_kd<'py>(
    py: Python<'py>,
    student_logits: &Bound<'py, PyAny>,
    teacher_logits: &Bound<'py, PyAny>,
    valid: PyReadonlyArray1<'py, bool>,
    mut values: PyReadwriteArray1<'py, f32>,
    grad: Option<&Bound<'py, PyAny>>,
    divergence: &str,
    temperature: f64,
    beta: f64,
    alpha: f64,
) -> PyResult<()> {
    let config = DenseKdConfig {
        divergence: Divergence::parse(divergence, beta, alpha).py_err()?,
        temperature,
    };
    let student = LogitsArray::extract(student_logits, "student_logits")?;
    let teacher = LogitsArray::extract(teacher_logits, "teacher_logits")?;
    let mut grad = GradArray::extract(grad)?;
    let (vocab, teacher_vocab) = (student.cols(), teacher.cols());
    let z = student.slice("student_logits")?;
    let t = teacher.slice("teacher_logits")?;
    let valid = valid.as_slice().map_err(contiguous("valid"))?;
    let values = values.as_slice_mut().map_err(contiguous("values"))?;
    let grad = grad.as_mut().map(GradArray::slice).transpose()?;
    py.detach(|| kernels::dense_kd(z, vocab, t, teacher_vocab, valid, &config, values, grad))
        .py_err()
}

/// Multiply row `r` of `grad` by `factors[r]` in place (the backward of per-row values).
#[pyfunction]
fn scale_rows<'py>(
    py: Python<'py>,
    grad: &Bound<'py, PyAny>,
    factors: PyReadonlyArray1<'py, f32>,
) -> PyResult<()> {
    let mut grad = GradArray::extract(Some(grad))?;
    let vocab = match &grad {
        Some(GradArray::F32(a)) => a.shape()[1],
        Some(GradArray::Bf16(a)) => a.shape()[1],
        None => 0,
    };
    let factors = factors.as_slice().map_err(contiguous("factors"))?;
    let Some(grad) = grad.as_mut().map(GradArray::slice).transpose()? else {
        return Err(bad("grad", "is required"));
    };
    py.detach(|| kernels::scale_rows(grad, vocab, factors)).py_err()
}

/// Add the loss kernels to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sparse_kd, m)?)?;
    m.add_function(wrap_pyfunction!(sampled_kd, m)?)?;
    m.add_function(wrap_pyfunction!(dense_kd, m)?)?;
    m.add_function(wrap_pyfunction!(scale_rows, m)?)?;
    Ok(())
}
