//! PyO3 bindings of logitcache: argument conversion, GIL release and error mapping only.

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", logitcache_core::VERSION)?;
    Ok(())
}
