//! PyO3 bindings of logitcache: argument conversion, GIL release and error mapping only.

use pyo3::prelude::*;

// Decoding and encoding allocate and free buffers of a few MB per chunk; the system
// allocator returns them to the OS each time and pays for zeroed pages on the next one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod errors;
mod losses;
mod store;

use errors::IntoPyResult;

/// Resize the thread pool shared by batch reads, `add_logits` and the loss kernels.
#[pyfunction]
fn set_num_threads(py: Python<'_>, n: usize) -> PyResult<()> {
    py.detach(|| logitcache_core::threads::set_num_threads(n)).py_err()
}

/// Number of threads of the shared pool.
#[pyfunction]
fn get_num_threads(py: Python<'_>) -> PyResult<usize> {
    py.detach(logitcache_core::threads::num_threads).py_err()
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", logitcache_core::VERSION)?;
    errors::register(m)?;
    store::register(m)?;
    losses::register(m)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    Ok(())
}
