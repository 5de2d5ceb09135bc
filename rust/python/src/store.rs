//! Bindings of the store: writer, reader, verify. Argument conversion and GIL release only.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use logitcache_core::Error;
use logitcache_core::codec::LogprobCodec;
use logitcache_core::format::Kind;
use logitcache_core::manifest::{TeacherInfo, TokenizerInfo};
use logitcache_core::pool::{BufferPool, Pooled};
use logitcache_core::reader::{OpenOptions, Store};
use logitcache_core::record::{self, IdArray};
use logitcache_core::topk::{self, Logits};
use logitcache_core::writer::{Mode, StoreSpec, StoreWriter, WriterOptions};
use numpy::ndarray::{ArrayViewMutD, IxDyn};
use numpy::{
    Element, PyArray1, PyArrayDyn, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::IntoPyResult;

/// An integer array of any of the dtypes ids come in.
enum IntArr<'py> {
    I64(PyReadonlyArrayDyn<'py, i64>),
    I32(PyReadonlyArrayDyn<'py, i32>),
    U32(PyReadonlyArrayDyn<'py, u32>),
    U16(PyReadonlyArrayDyn<'py, u16>),
    U64(PyReadonlyArrayDyn<'py, u64>),
}

fn int_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<IntArr<'py>> {
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, i64>>() {
        return Ok(IntArr::I64(a));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, i32>>() {
        return Ok(IntArr::I32(a));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, u32>>() {
        return Ok(IntArr::U32(a));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, u16>>() {
        return Ok(IntArr::U16(a));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'py, u64>>() {
        return Ok(IntArr::U64(a));
    }
    Err(PyValueError::new_err(format!(
        "{name} must be a numpy array of int64, int32, uint32, uint16 or uint64"
    )))
}

fn contiguous<'a, T>(r: Result<&'a [T], numpy::AsSliceError>, name: &str) -> PyResult<&'a [T]> {
    r.map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

impl IntArr<'_> {
    fn view(&self, name: &str) -> PyResult<(IdArray<'_>, Vec<usize>)> {
        Ok(match self {
            IntArr::I64(a) => (IdArray::I64(contiguous(a.as_slice(), name)?), a.shape().to_vec()),
            IntArr::I32(a) => (IdArray::I32(contiguous(a.as_slice(), name)?), a.shape().to_vec()),
            IntArr::U32(a) => (IdArray::U32(contiguous(a.as_slice(), name)?), a.shape().to_vec()),
            IntArr::U16(a) => (IdArray::U16(contiguous(a.as_slice(), name)?), a.shape().to_vec()),
            IntArr::U64(a) => (IdArray::U64(contiguous(a.as_slice(), name)?), a.shape().to_vec()),
        })
    }
}

fn one_d(shape: &[usize], name: &str) -> PyResult<()> {
    if shape.len() == 1 {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!("{name} must be 1-D [L], got shape {shape:?}")))
    }
}

/// The store writer. Python users go through `logitcache.StoreWriter`.
#[pyclass(name = "StoreWriter", module = "logitcache._core")]
pub struct PyStoreWriter {
    inner: StoreWriter,
}

fn json_value(s: Option<String>) -> PyResult<Option<serde_json::Value>> {
    s.map(|s| {
        serde_json::from_str(&s)
            .map_err(|e| PyValueError::new_err(format!("metadata is not valid JSON: {e}")))
    })
    .transpose()
}

#[pymethods]
impl PyStoreWriter {
    #[new]
    #[pyo3(signature = (
        path, *, vocab_size, k, kind, codec, temperature, mode, teacher_name, teacher_fingerprint,
        tokenizer_name, tokenizer_fingerprint, metadata_json, chunk_positions, shard_bytes, zstd_level
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        vocab_size: u32,
        k: u32,
        kind: &str,
        codec: Option<&str>,
        temperature: f64,
        mode: &str,
        teacher_name: Option<String>,
        teacher_fingerprint: Option<String>,
        tokenizer_name: Option<String>,
        tokenizer_fingerprint: Option<String>,
        metadata_json: Option<String>,
        chunk_positions: usize,
        shard_bytes: u64,
        zstd_level: i32,
    ) -> PyResult<Self> {
        let kind = Kind::from_name(kind).ok_or_else(|| {
            PyValueError::new_err(format!("kind must be \"topk\" or \"sampled\", got {kind:?}"))
        })?;
        let logprobs = codec.map(LogprobCodec::parse).transpose().py_err()?;
        let teacher = (teacher_name.is_some() || teacher_fingerprint.is_some())
            .then_some(TeacherInfo { name: teacher_name, config_fingerprint: teacher_fingerprint });
        let tokenizer = (tokenizer_name.is_some() || tokenizer_fingerprint.is_some()).then_some(
            TokenizerInfo { name: tokenizer_name, vocab_fingerprint: tokenizer_fingerprint },
        );
        let spec = StoreSpec {
            kind,
            k,
            vocab_size,
            temperature,
            logprobs,
            teacher,
            tokenizer,
            metadata: json_value(metadata_json)?,
        };
        let mode = Mode::parse(mode).py_err()?;
        let opts = WriterOptions { zstd_level, chunk_positions, shard_bytes };
        let inner = py.detach(|| StoreWriter::open(&path, spec, mode, opts)).py_err()?;
        Ok(PyStoreWriter { inner })
    }

    /// Add a top-K record.
    fn add_topk(
        &mut self,
        py: Python<'_>,
        sample_id: u64,
        input_ids: &Bound<'_, PyAny>,
        topk_ids: &Bound<'_, PyAny>,
        topk_logprobs: PyReadonlyArrayDyn<'_, f32>,
    ) -> PyResult<()> {
        let inp = int_array(input_ids, "input_ids")?;
        let ids = int_array(topk_ids, "topk_ids")?;
        let (inp_v, inp_shape) = inp.view("input_ids")?;
        one_d(&inp_shape, "input_ids")?;
        let (ids_v, ids_shape) = ids.view("topk_ids")?;
        let lp_shape = topk_logprobs.shape().to_vec();
        let lp = contiguous(topk_logprobs.as_slice(), "topk_logprobs")?;
        let w = &mut self.inner;
        py.detach(|| {
            if w.params().kind != Kind::TopK {
                return Err(Error::invalid_argument(
                    "add",
                    "this is a sampled store; use add_sampled or add_logits",
                ));
            }
            let (k, vocab) = (w.params().k, w.params().vocab_size);
            w.add(sample_id, inp_v.len(), |buf, seen| {
                record::append_topk(
                    buf, seen, sample_id, inp_v, ids_v, &ids_shape, lp, &lp_shape, k, vocab,
                )
            })
        })
        .py_err()
    }

    /// Add a record from full logits `[L, V]`: `dtype` is "float32", "float16" or "bfloat16"
    /// (the half types as uint16 bit patterns). Top-K stores keep each row's top K; sampled
    /// stores the distinct ids of n draws per row (see logitcache_core::topk), keyed by `seed`.
    #[pyo3(signature = (sample_id, input_ids, logits, dtype, seed=0))]
    fn add_logits(
        &mut self,
        py: Python<'_>,
        sample_id: u64,
        input_ids: &Bound<'_, PyAny>,
        logits: &Bound<'_, PyAny>,
        dtype: &str,
        seed: u64,
    ) -> PyResult<()> {
        let inp = int_array(input_ids, "input_ids")?;
        let (inp_v, inp_shape) = inp.view("input_ids")?;
        one_d(&inp_shape, "input_ids")?;
        let f32_arr;
        let u16_arr;
        let (view, shape) = match dtype {
            "float32" => {
                f32_arr = logits.extract::<PyReadonlyArrayDyn<'_, f32>>()?;
                (Logits::F32(contiguous(f32_arr.as_slice(), "logits")?), f32_arr.shape().to_vec())
            }
            "float16" | "bfloat16" => {
                u16_arr = logits.extract::<PyReadonlyArrayDyn<'_, u16>>()?;
                let s = contiguous(u16_arr.as_slice(), "logits")?;
                let v = if dtype == "float16" { Logits::F16(s) } else { Logits::BF16(s) };
                (v, u16_arr.shape().to_vec())
            }
            other => {
                return Err(PyValueError::new_err(format!("unsupported logits dtype {other}")));
            }
        };
        let w = &mut self.inner;
        py.detach(|| {
            let p = w.params().clone();
            let l = inp_v.len();
            let v = p.vocab_size as usize;
            if shape != [l, v] {
                let hint = if shape.len() == 2 && shape[0] == l && shape[1] > v {
                    format!("; slice the logits to the first {v} columns or create the store with vocab_size={}", shape[1])
                } else {
                    String::new()
                };
                return Err(Error::invalid_argument(
                    "logits",
                    format!("has shape {shape:?}, expected [{l}, {v}] (input length, vocab_size){hint}"),
                ));
            }
            let t = w.manifest().temperature;
            if p.kind == Kind::Sampled {
                let r = topk::sample_from_logits(sample_id, view, l, v, p.k as usize, t, seed)?;
                let shape = [l, r.width];
                return w.add(sample_id, l, |buf, seen| {
                    record::append_sampled(
                        buf,
                        seen,
                        sample_id,
                        inp_v,
                        IdArray::U32(&r.ids),
                        &shape,
                        IdArray::U32(&r.counts),
                        &shape,
                        p.has_logprobs().then_some((&r.logprobs[..], &shape[..])),
                        p.k,
                        p.vocab_size,
                        p.has_logprobs(),
                        Some(record::MAX_ROW_MASS),
                    )
                });
            }
            let (ids, lps) = topk::topk_from_logits(sample_id, view, l, v, p.k as usize, t)?;
            let k = p.k as usize;
            w.add(sample_id, inp_v.len(), |buf, seen| {
                record::append_topk(
                    buf,
                    seen,
                    sample_id,
                    inp_v,
                    IdArray::U32(&ids),
                    &[l, k],
                    &lps,
                    &[l, k],
                    p.k,
                    p.vocab_size,
                )
            })
        })
        .py_err()
    }

    /// Add a sampled record from padded `ids [L, M]` / `counts [L, M]` (count 0 = padding).
    /// `check_mass=False` skips the check that a row's probabilities add up to at most 1 (and
    /// the rounding slack): for values decoded from a store, which a coarse codec may have
    /// rounded up by more.
    #[pyo3(signature = (sample_id, input_ids, ids, counts, logprobs=None, check_mass=true))]
    #[allow(clippy::too_many_arguments)]
    fn add_sampled(
        &mut self,
        py: Python<'_>,
        sample_id: u64,
        input_ids: &Bound<'_, PyAny>,
        ids: &Bound<'_, PyAny>,
        counts: &Bound<'_, PyAny>,
        logprobs: Option<PyReadonlyArrayDyn<'_, f32>>,
        check_mass: bool,
    ) -> PyResult<()> {
        let inp = int_array(input_ids, "input_ids")?;
        let ids = int_array(ids, "ids")?;
        let counts = int_array(counts, "counts")?;
        let (inp_v, inp_shape) = inp.view("input_ids")?;
        one_d(&inp_shape, "input_ids")?;
        let (ids_v, ids_shape) = ids.view("ids")?;
        let (counts_v, counts_shape) = counts.view("counts")?;
        let lp_shape = logprobs.as_ref().map(|a| a.shape().to_vec());
        let lp = match &logprobs {
            Some(a) => Some(contiguous(a.as_slice(), "logprobs")?),
            None => None,
        };
        let w = &mut self.inner;
        py.detach(|| {
            let p = w.params().clone();
            if p.kind != Kind::Sampled {
                return Err(Error::invalid_argument(
                    "add_sampled",
                    "this is a top-K store; use add or add_logits",
                ));
            }
            let lp_arg = match (lp, lp_shape.as_deref()) {
                (Some(v), Some(s)) => Some((v, s)),
                _ => None,
            };
            w.add(sample_id, inp_v.len(), |buf, seen| {
                record::append_sampled(
                    buf,
                    seen,
                    sample_id,
                    inp_v,
                    ids_v,
                    &ids_shape,
                    counts_v,
                    &counts_shape,
                    lp_arg,
                    p.k,
                    p.vocab_size,
                    p.has_logprobs(),
                    check_mass.then_some(record::MAX_ROW_MASS),
                )
            })
        })
        .py_err()
    }

    /// Copy the records of the store at `source` with these sample ids into this store as
    /// they are stored (see logitcache_core::copy); returns a report dict. `progress` as for
    /// [`verify`], with the stored bytes of the source gone through. `expect_shards`: the
    /// source's shard uids when the caller opened it (a store rewritten since is refused).
    #[pyo3(signature = (source, sample_ids, expect_shards=None, progress=None))]
    fn copy_from<'py>(
        &mut self,
        py: Python<'py>,
        source: PathBuf,
        sample_ids: PyReadonlyArray1<'py, u64>,
        expect_shards: Option<Vec<String>>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let keep: HashSet<u64> =
            contiguous(sample_ids.as_slice(), "sample_ids")?.iter().copied().collect();
        let w = &mut self.inner;
        let r = Progress::new(progress).run(py, |p| {
            logitcache_core::copy::copy_records(w, &source, &keep, expect_shards.as_deref(), p)
        })?;
        let d = PyDict::new(py);
        d.set_item("samples", r.samples)?;
        d.set_item("positions", r.positions)?;
        d.set_item("chunks_copied", r.chunks_copied)?;
        d.set_item("chunks_reencoded", r.chunks_reencoded)?;
        Ok(d)
    }

    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        let w = &mut self.inner;
        py.detach(|| w.commit()).py_err()
    }

    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        let w = &mut self.inner;
        py.detach(|| w.close()).py_err()
    }

    fn abort(&mut self, py: Python<'_>) {
        let w = &mut self.inner;
        py.detach(|| w.abort());
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    #[getter]
    fn num_samples(&self) -> usize {
        self.inner.num_samples()
    }

    #[getter]
    fn num_uncommitted(&self) -> usize {
        self.inner.num_uncommitted()
    }

    /// Whether the store holds `sample_id`, committed or added since the last commit.
    fn holds(&self, sample_id: u64) -> bool {
        self.inner.holds(sample_id)
    }

    /// Shard files of the replaced store that a commit could not delete (see
    /// StoreWriter::take_left_behind), as `{"file", "error"}` dicts; emptied by the call.
    fn take_left_behind<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        files_left(py, &self.inner.take_left_behind())
    }

    /// The manifest this writer will extend, as JSON.
    fn manifest_json(&self) -> PyResult<String> {
        serde_json::to_string(self.inner.manifest())
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

/// An open store. Python users go through `logitcache.open_store`.
#[pyclass(name = "Store", module = "logitcache._core", frozen)]
pub struct PyStore {
    inner: Arc<Store>,
}

#[pymethods]
impl PyStore {
    #[new]
    #[pyo3(signature = (path, *, mmap=None, expect_vocab_size=None, expect_tokenizer_name=None, expect_tokenizer_fingerprint=None, cache_chunks=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        mmap: Option<bool>,
        expect_vocab_size: Option<u32>,
        expect_tokenizer_name: Option<String>,
        expect_tokenizer_fingerprint: Option<String>,
        cache_chunks: Option<usize>,
    ) -> PyResult<Self> {
        let expect_tokenizer = (expect_tokenizer_name.is_some()
            || expect_tokenizer_fingerprint.is_some())
        .then_some(TokenizerInfo {
            name: expect_tokenizer_name,
            vocab_fingerprint: expect_tokenizer_fingerprint,
        });
        let opts = OpenOptions {
            mmap,
            expect_vocab_size,
            expect_tokenizer,
            cache_chunks,
            max_open_files: None,
        };
        let inner = py.detach(|| Store::open(&path, &opts)).py_err()?;
        Ok(PyStore { inner: Arc::new(inner) })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, sample_id: u64) -> bool {
        self.inner.contains(sample_id)
    }

    fn manifest_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.inner.manifest)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    #[getter]
    fn uses_mmap(&self) -> bool {
        self.inner.shards.first().is_some_and(|s| s.source.is_mmap())
    }

    #[getter]
    fn mapped_shards(&self) -> usize {
        self.inner.shards.iter().filter(|s| s.source.is_mmap()).count()
    }

    fn sample_ids<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        PyArray1::from_vec(py, self.inner.sample_ids())
    }

    fn sample_lengths<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        // int64, as a batch's lengths: torch has no comparisons of uint32 tensors.
        let lengths = self.inner.sample_lengths().into_iter().map(i64::from).collect();
        PyArray1::from_vec(py, lengths)
    }

    /// One record as a dict of numpy arrays (flat; the Python layer shapes them).
    fn get<'py>(&self, py: Python<'py>, sample_id: u64) -> PyResult<Bound<'py, PyDict>> {
        let store = Arc::clone(&self.inner);
        let rec = py.detach(move || store.get(sample_id)).py_err()?;
        let pool = self.inner.buffer_pool();
        let d = PyDict::new(py);
        let (n_inp, n_ids, n_lp) = (rec.input_ids.len(), rec.ids.len(), rec.logprobs.len());
        let (n_counts, n_rows) = (rec.counts.len(), rec.row_lens.len());
        d.set_item("input_ids", pooled_array(py, rec.input_ids, &[n_inp], pool)?)?;
        d.set_item("ids", pooled_array(py, rec.ids, &[n_ids], pool)?)?;
        d.set_item("logprobs", pooled_array(py, rec.logprobs, &[n_lp], pool)?)?;
        d.set_item("counts", pooled_array(py, rec.counts, &[n_counts], pool)?)?;
        d.set_item("row_lens", pooled_array(py, rec.row_lens, &[n_rows], pool)?)?;
        Ok(d)
    }

    /// Padded batch as a dict of numpy arrays (zero-copy from the decoded buffers).
    fn read_batch<'py>(
        &self,
        py: Python<'py>,
        sample_ids: PyReadonlyArray1<'py, u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.read_records(py, sample_ids, false)
    }

    /// Records one after the other, as a dict of numpy arrays (zero-copy, like read_batch).
    fn read_packed<'py>(
        &self,
        py: Python<'py>,
        sample_ids: PyReadonlyArray1<'py, u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        self.read_records(py, sample_ids, true)
    }
}

impl PyStore {
    fn read_records<'py>(
        &self,
        py: Python<'py>,
        sample_ids: PyReadonlyArray1<'py, u64>,
        packed: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let ids = contiguous(sample_ids.as_slice(), "sample_ids")?.to_vec();
        let store = Arc::clone(&self.inner);
        let b = py
            .detach(move || if packed { store.read_packed(&ids) } else { store.read_batch(&ids) })
            .py_err()?;
        let w = b.width;
        // Leading shape: [batch, max_len] padded, [positions] packed.
        let lead: Vec<usize> =
            if packed { vec![b.input_ids.len()] } else { vec![b.batch, b.max_len] };
        let with_width: Vec<usize> = lead.iter().copied().chain([w]).collect();
        let n_entries = b.ids.len();
        let pool = self.inner.buffer_pool();
        let d = PyDict::new(py);
        d.set_item("lengths", PyArray1::from_vec(py, b.lengths))?;
        d.set_item("input_ids", pooled_array(py, b.input_ids, &lead, pool)?)?;
        d.set_item("ids", pooled_array(py, b.ids, &with_width, pool)?)?;
        if !b.logprobs.is_empty() || (n_entries == 0 && self.inner.params.has_logprobs()) {
            d.set_item("logprobs", pooled_array(py, b.logprobs, &with_width, pool)?)?;
        }
        if self.inner.params.kind == Kind::Sampled {
            d.set_item("counts", pooled_array(py, b.counts, &with_width, pool)?)?;
        }
        Ok(d)
    }
}

/// The owner of a batch or record array's memory (the numpy array's base object): when the
/// last array or view of it goes, the memory goes back to the store's pool for a later read
/// instead of to the allocator (see logitcache_core::pool).
#[pyclass(module = "logitcache._core", frozen)]
struct PooledBuffer {
    buf: PooledVec,
    pool: Arc<BufferPool>,
}

enum PooledVec {
    I32(Vec<i32>),
    U32(Vec<u32>),
    F32(Vec<f32>),
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        match &mut self.buf {
            PooledVec::I32(v) => self.pool.give(std::mem::take(v)),
            PooledVec::U32(v) => self.pool.give(std::mem::take(v)),
            PooledVec::F32(v) => self.pool.give(std::mem::take(v)),
        }
    }
}

/// Element types of pooled batch arrays.
trait PoolElement: Pooled + Element {
    fn wrap(v: Vec<Self>) -> PooledVec;
}

impl PoolElement for i32 {
    fn wrap(v: Vec<i32>) -> PooledVec {
        PooledVec::I32(v)
    }
}

impl PoolElement for u32 {
    fn wrap(v: Vec<u32>) -> PooledVec {
        PooledVec::U32(v)
    }
}

impl PoolElement for f32 {
    fn wrap(v: Vec<f32>) -> PooledVec {
        PooledVec::F32(v)
    }
}

/// `v` as a writeable numpy array of `shape`, without a copy, its memory owned by a
/// [`PooledBuffer`].
fn pooled_array<'py, T: PoolElement>(
    py: Python<'py>,
    mut v: Vec<T>,
    shape: &[usize],
    pool: &Arc<BufferPool>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    if shape.iter().product::<usize>() != v.len() {
        return Err(PyValueError::new_err(format!(
            "internal error: an array of {} values for shape {shape:?}",
            v.len()
        )));
    }
    let ptr = v.as_mut_ptr();
    // SAFETY: `ptr` points to v.len() initialized values, as many as `shape` holds (checked
    // above), laid out in C order, aligned as T. The view only carries pointer, shape and
    // strides into borrow_from_array. The values stay where they are while `owner` lives:
    // moving `v` into it moves the Vec's handle, not its heap buffer, and nothing touches
    // the Vec again until owner's Drop, which runs only when numpy has released its last
    // array based on owner (owner is their base object), so the pool never hands out memory
    // that an array still shows.
    let view = unsafe { ArrayViewMutD::from_shape_ptr(IxDyn(shape), ptr) };
    let owner = Bound::new(py, PooledBuffer { buf: T::wrap(v), pool: Arc::clone(pool) })?;
    // SAFETY: as above; owner becomes the base object of the array and keeps the memory.
    Ok(unsafe { PyArrayDyn::borrow_from_array(&view, owner.into_any()) })
}

/// A Python progress callback called from Rust threads: at most every 100 ms besides the
/// last call (`done >= total`). An exception it raises, or Ctrl-C (see [`Progress::run`]),
/// asks the core to stop (its progress callback returns false) and is raised when it has.
struct Progress {
    callback: Option<Py<PyAny>>,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    failed: std::sync::Mutex<Option<PyErr>>,
    stop: std::sync::atomic::AtomicBool,
    /// Added to that exception when the work ran to its end all the same (see [`Self::changes`]).
    done_note: Option<String>,
}

impl Progress {
    fn new(callback: Option<Py<PyAny>>) -> Progress {
        Progress {
            callback,
            last: Default::default(),
            failed: Default::default(),
            stop: Default::default(),
            done_note: None,
        }
    }

    /// For work that changes the store at `path` (unless `dry_run`): a Ctrl-C or callback
    /// exception that came too late to stop it (after its last check, e.g. as it commits) is
    /// still raised, and says that the `op` is done, so that the caller does not take the
    /// store for unchanged.
    fn changes(mut self, op: &str, path: &std::path::Path, dry_run: bool) -> Progress {
        if !dry_run {
            self.done_note = Some(format!(
                "logitcache: this came too late to stop the {op}, which ran to its end: what \
                 it changed in {} stands",
                path.display()
            ));
        }
        self
    }

    /// The core's progress callback: false once the work should stop.
    fn call(&self, done: u64, total: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.stop.load(Relaxed) {
            return false;
        }
        let Some(cb) = &self.callback else { return true };
        let Ok(mut last) = self.last.lock() else { return true };
        let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(100));
        if !(due || done >= total) {
            return true;
        }
        *last = Some(std::time::Instant::now());
        Python::attach(|py| {
            if let Err(e) = cb.call1(py, (done, total)) {
                self.fail(e);
            }
        });
        !self.stop.load(Relaxed)
    }

    /// Keep the first exception, and ask the work to stop.
    fn fail(&self, e: PyErr) {
        if let Ok(mut failed) = self.failed.lock()
            && failed.is_none()
        {
            *failed = Some(e);
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Run `work` (long core work that reports through the callback it is given) on a thread
    /// of its own while this thread, without the GIL between its checks, watches for Ctrl-C:
    /// Python runs signal handlers on the main thread only, and the work would otherwise
    /// run to its end (and commit) with the KeyboardInterrupt waiting. The exception of a
    /// signal handler or of the Python callback is raised first, else the work's error.
    fn run<T: Send>(
        self,
        py: Python<'_>,
        work: impl FnOnce(logitcache_core::progress::Progress<'_>) -> logitcache_core::Result<T> + Send,
    ) -> PyResult<T> {
        use std::sync::{Condvar, Mutex};
        let finished = (Mutex::new(false), Condvar::new());
        let outcome = std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let r = work(&|d, t| self.call(d, t));
                if let Ok(mut f) = finished.0.lock() {
                    *f = true;
                }
                finished.1.notify_all();
                r
            });
            loop {
                let done = py.detach(|| {
                    let Ok(guard) = finished.0.lock() else { return true };
                    let wait = std::time::Duration::from_millis(50);
                    finished.1.wait_timeout_while(guard, wait, |f| !*f).map_or(true, |(g, _)| *g)
                });
                if done || worker.is_finished() {
                    break;
                }
                if let Err(e) = py.check_signals() {
                    self.fail(e);
                }
            }
            // A Ctrl-C of the work's last moments (its commit, say) is taken here, not by
            // Python after the call returns, so that it gets the note of work done.
            if let Err(e) = py.check_signals() {
                self.fail(e);
            }
            worker.join()
        });
        let r = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        if let Some(e) = self.failed.into_inner().ok().flatten() {
            if let (Ok(_), Some(note)) = (&r, &self.done_note) {
                // add_note is Python 3.11+; on 3.10 the exception goes without it.
                let _ = e.value(py).call_method1("add_note", (note,));
            }
            return Err(e);
        }
        r.py_err()
    }
}

/// Check every checksum and decoded value of a store; returns a report dict. `progress`,
/// if given, is called as `progress(done, total)` (see verify_with_progress) from the
/// verifying threads, at most every 100 ms besides the last call; an exception it raises,
/// or Ctrl-C, stops the work at its next shard or chunk and is raised (see
/// [`Progress::run`]). So for the other long operations below.
#[pyfunction]
#[pyo3(signature = (path, progress=None))]
fn verify<'py>(
    py: Python<'py>,
    path: PathBuf,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let r = Progress::new(progress)
        .run(py, |p| logitcache_core::verify::verify_with_progress(&path, p))?;
    let d = PyDict::new(py);
    d.set_item("ok", r.ok())?;
    d.set_item("problems", r.problems)?;
    d.set_item("orphans", r.orphans)?;
    d.set_item("writer", r.writer)?;
    d.set_item("manifest_ok", r.manifest_ok)?;
    d.set_item("shards", r.shards)?;
    d.set_item("chunks", r.chunks)?;
    d.set_item("samples", r.samples)?;
    d.set_item("positions", r.positions)?;
    d.set_item("bytes", r.bytes)?;
    Ok(d)
}

/// Repair a damaged store (see logitcache_core::repair); returns a report dict. `progress`
/// as for [`verify`], during the check of the store.
#[pyfunction]
#[pyo3(signature = (path, dry_run=false, remove_damaged=false, progress=None))]
fn repair<'py>(
    py: Python<'py>,
    path: PathBuf,
    dry_run: bool,
    remove_damaged: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    use logitcache_core::repair::{RepairOptions, repair_with_progress};
    let opts = RepairOptions { dry_run, remove_damaged };
    let r = Progress::new(progress)
        .changes("repair", &path, dry_run)
        .run(py, |p| repair_with_progress(&path, opts, p))?;
    let shards = PyList::empty(py);
    for s in &r.repairs {
        let e = PyDict::new(py);
        e.set_item("file", &s.file)?;
        e.set_item("problems", &s.problems)?;
        e.set_item("new_file", &s.new_file)?;
        e.set_item("chunks_kept", s.chunks_kept)?;
        e.set_item("chunks_lost", s.chunks_lost)?;
        e.set_item("samples_lost", s.samples_lost)?;
        e.set_item("positions_lost", s.positions_lost)?;
        e.set_item("lost_ids_known", s.lost_ids_known)?;
        shards.append(e)?;
    }
    let d = PyDict::new(py);
    d.set_item("sound", r.sound())?;
    d.set_item("committed", r.committed)?;
    d.set_item("shards", r.shards)?;
    d.set_item("repairs", shards)?;
    d.set_item("lost_sample_ids", PyArray1::from_vec(py, r.lost_sample_ids))?;
    d.set_item("samples_lost", r.samples_lost)?;
    d.set_item("positions_lost", r.positions_lost)?;
    d.set_item("removed", r.removed)?;
    d.set_item("left_behind", files_left(py, &r.left_behind)?)?;
    Ok(d)
}

/// A report's `left_behind`: a list of `{"file": ..., "error": ...}` dicts.
fn files_left<'py>(
    py: Python<'py>,
    files: &[logitcache_core::clean::FileLeft],
) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for f in files {
        let e = PyDict::new(py);
        e.set_item("file", &f.file)?;
        e.set_item("error", &f.error)?;
        out.append(e)?;
    }
    Ok(out)
}

/// Merge stores of the same configuration into one (see logitcache_core::merge); returns a
/// report dict. `progress` as for [`verify`], with the bytes of shard files placed.
#[pyfunction]
#[pyo3(signature = (path, sources, append=false, copy=false, dry_run=false, progress=None))]
fn merge<'py>(
    py: Python<'py>,
    path: PathBuf,
    sources: Vec<PathBuf>,
    append: bool,
    copy: bool,
    dry_run: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    use logitcache_core::merge::{MergeOptions, merge_with_progress};
    let opts = MergeOptions { append, copy, dry_run };
    let r = Progress::new(progress)
        .changes("merge", &path, dry_run)
        .run(py, |p| merge_with_progress(&path, &sources, opts, p))?;
    let merged = PyList::empty(py);
    for s in &r.sources {
        let e = PyDict::new(py);
        e.set_item("path", &s.path)?;
        e.set_item("shards", s.shards)?;
        e.set_item("samples", s.samples)?;
        e.set_item("positions", s.positions)?;
        e.set_item("bytes", s.bytes)?;
        e.set_item("duplicates", &s.duplicates)?;
        merged.append(e)?;
    }
    let d = PyDict::new(py);
    d.set_item("sources", merged)?;
    d.set_item("shards_linked", r.shards_linked)?;
    d.set_item("shards_copied", r.shards_copied)?;
    d.set_item("num_samples", r.num_samples)?;
    d.set_item("num_positions", r.num_positions)?;
    d.set_item("metadata_conflicts", r.metadata_conflicts)?;
    d.set_item("duplicates", r.duplicates)?;
    Ok(d)
}

/// Remove samples from a store in place (see logitcache_core::remove); returns a report
/// dict. `progress` as for [`verify`], with the bytes of the shards that held them.
#[pyfunction]
#[pyo3(signature = (path, sample_ids, dry_run=false, missing_ok=false, progress=None))]
fn remove_samples<'py>(
    py: Python<'py>,
    path: PathBuf,
    sample_ids: PyReadonlyArray1<'py, u64>,
    dry_run: bool,
    missing_ok: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    use logitcache_core::remove::{RemoveOptions, remove_samples_with_progress};
    let ids = contiguous(sample_ids.as_slice(), "sample_ids")?.to_vec();
    let opts = RemoveOptions { dry_run, missing_ok };
    let r = Progress::new(progress)
        .changes("removal", &path, dry_run)
        .run(py, |p| remove_samples_with_progress(&path, &ids, opts, p))?;
    let shards = PyList::empty(py);
    for s in &r.shards {
        let e = PyDict::new(py);
        e.set_item("file", &s.file)?;
        e.set_item("new_file", &s.new_file)?;
        e.set_item("samples_removed", s.samples_removed)?;
        e.set_item("positions_removed", s.positions_removed)?;
        e.set_item("samples_kept", s.samples_kept)?;
        e.set_item("chunks_copied", s.chunks_copied)?;
        e.set_item("chunks_reencoded", s.chunks_reencoded)?;
        e.set_item("chunks_dropped", s.chunks_dropped)?;
        shards.append(e)?;
    }
    let d = PyDict::new(py);
    d.set_item("shards", shards)?;
    d.set_item("samples_removed", r.samples_removed)?;
    d.set_item("positions_removed", r.positions_removed)?;
    d.set_item("missing_ids", PyArray1::from_vec(py, r.missing_ids))?;
    d.set_item("num_samples", r.num_samples)?;
    d.set_item("num_positions", r.num_positions)?;
    d.set_item("bytes_before", r.bytes_before)?;
    d.set_item("bytes_after", r.bytes_after)?;
    d.set_item("committed", r.committed)?;
    d.set_item("left_behind", files_left(py, &r.left_behind)?)?;
    Ok(d)
}

/// Delete a store's orphan shard files and temporary manifests (see
/// logitcache_core::clean); returns a report dict.
#[pyfunction]
#[pyo3(signature = (path, dry_run=false))]
fn clean<'py>(py: Python<'py>, path: PathBuf, dry_run: bool) -> PyResult<Bound<'py, PyDict>> {
    let r = py.detach(|| logitcache_core::clean::clean_store(&path, dry_run)).py_err()?;
    let d = PyDict::new(py);
    d.set_item("deleted", r.deleted)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("kept", r.kept)?;
    d.set_item("dry_run", r.dry_run)?;
    Ok(d)
}

/// Rebuild a damaged or deleted manifest from the shard files (see
/// logitcache_core::rebuild); returns a report dict. `progress` as for [`verify`], with
/// the bytes of the shard files read.
#[pyfunction]
#[pyo3(signature = (
    path, *, dry_run=false, teacher_name=None, teacher_fingerprint=None, tokenizer_name=None,
    tokenizer_fingerprint=None, metadata_json=None, progress=None
))]
#[allow(clippy::too_many_arguments)]
fn rebuild_manifest<'py>(
    py: Python<'py>,
    path: PathBuf,
    dry_run: bool,
    teacher_name: Option<String>,
    teacher_fingerprint: Option<String>,
    tokenizer_name: Option<String>,
    tokenizer_fingerprint: Option<String>,
    metadata_json: Option<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    use logitcache_core::rebuild::RebuildOptions;
    let opts = RebuildOptions {
        dry_run,
        teacher: (teacher_name.is_some() || teacher_fingerprint.is_some())
            .then_some(TeacherInfo { name: teacher_name, config_fingerprint: teacher_fingerprint }),
        tokenizer: (tokenizer_name.is_some() || tokenizer_fingerprint.is_some()).then_some(
            TokenizerInfo { name: tokenizer_name, vocab_fingerprint: tokenizer_fingerprint },
        ),
        metadata: json_value(metadata_json)?,
    };
    let r = Progress::new(progress)
        .changes("rebuild", &path, opts.dry_run)
        .run(py, |p| logitcache_core::rebuild::rebuild_manifest(&path, &opts, p))?;
    let shards = PyList::empty(py);
    for s in &r.shards {
        let e = PyDict::new(py);
        e.set_item("file", &s.file)?;
        e.set_item("num_samples", s.num_samples)?;
        e.set_item("num_positions", s.num_positions)?;
        e.set_item("num_chunks", s.num_chunks)?;
        e.set_item("bytes", s.bytes)?;
        shards.append(e)?;
    }
    let left_out = PyList::empty(py);
    for l in &r.left_out {
        let e = PyDict::new(py);
        e.set_item("file", &l.file)?;
        e.set_item("problem", &l.problem)?;
        left_out.append(e)?;
    }
    let d = PyDict::new(py);
    d.set_item("committed", r.committed)?;
    d.set_item("manifest_problem", &r.manifest_problem)?;
    d.set_item("configuration", &r.configuration)?;
    d.set_item("shards", shards)?;
    d.set_item("left_out", left_out)?;
    d.set_item("num_samples", r.num_samples)?;
    d.set_item("num_positions", r.num_positions)?;
    d.set_item("kept_damaged", &r.kept_damaged)?;
    Ok(d)
}

/// The committed manifest of the store at `path` (envelope, checksum and version checked)
/// as JSON, without opening the shards: what `info` shows of a store that does not open.
#[pyfunction]
fn read_manifest(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let m = py.detach(|| logitcache_core::manifest::Manifest::read_committed(&path)).py_err()?;
    serde_json::to_string(&m).map_err(|e| PyValueError::new_err(e.to_string()))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(repair, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(rebuild_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(remove_samples, m)?)?;
    m.add_function(wrap_pyfunction!(clean, m)?)?;
    m.add_class::<PyStoreWriter>()?;
    m.add_class::<PyStore>()?;
    Ok(())
}
