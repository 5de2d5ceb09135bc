//! The `logitcache.StoreError` hierarchy, created here and raised from every core error.
//!
//! Classes that are also a built-in error (a missing sample is a `KeyError`, an existing store
//! a `FileExistsError`, a bad record a `ValueError`) need two bases, which PyO3's
//! `create_exception!` cannot express, so the classes are made with Python's `type()` at
//! module initialisation and kept in a `PyOnceLock`.

use logitcache_core::Error;
use pyo3::exceptions::{
    PyException, PyFileExistsError, PyFileNotFoundError, PyIsADirectoryError, PyNotADirectoryError,
    PyOSError, PyPermissionError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// (name, doc, extra built-in base) of every class below `StoreError`.
const SUBCLASSES: &[(&str, &str, Option<&str>)] = &[
    ("CorruptStoreError", "Stored bytes fail a checksum, bound or structural check.", None),
    ("FormatVersionError", "The store was written by a newer format version.", None),
    (
        "StoreMismatchError",
        "The store does not match what the caller expects (vocabulary, tokenizer, configuration).",
        Some("ValueError"),
    ),
    ("MissingSampleError", "A sample id that is not in the store.", Some("KeyError")),
    ("DuplicateSampleError", "A sample id that is already in the store.", Some("ValueError")),
    (
        "InvalidRecordError",
        "A record that breaks the store's rules; nothing was written.",
        Some("ValueError"),
    ),
    ("StoreExistsError", "mode=\"x\" on a path that already exists.", Some("FileExistsError")),
    ("StoreLockedError", "Another live writer holds the store's lock.", None),
];

struct Classes {
    store_error: Py<PyType>,
    sub: Vec<Py<PyType>>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make_class<'py>(
    py: Python<'py>,
    name: &str,
    doc: &str,
    bases: Bound<'py, PyTuple>,
) -> PyResult<Bound<'py, PyType>> {
    let dict = PyDict::new(py);
    dict.set_item("__doc__", doc)?;
    dict.set_item("__module__", "logitcache")?;
    let ty = py.import("builtins")?.getattr("type")?.call1((name, bases, dict))?;
    Ok(ty.cast_into::<PyType>()?)
}

fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || {
        let store_error = make_class(
            py,
            "StoreError",
            "Base class of every error logitcache raises about a store.\n\n\
             Attributes (None where not known): file (the store directory, manifest or shard \
             file), shard (index in the manifest), chunk, offset (byte offset in the file), \
             sample_id.",
            PyTuple::new(py, [py.get_type::<PyException>()])?,
        )?;
        // Class-level defaults: an error raised from Python code (`raise StoreError(...)`)
        // has the attributes too, None as for a location not known.
        for attr in ["file", "shard", "chunk", "offset", "sample_id"] {
            store_error.setattr(attr, py.None())?;
        }
        let mut sub = Vec::with_capacity(SUBCLASSES.len());
        for (name, doc, extra) in SUBCLASSES {
            let mut bases = vec![store_error.clone()];
            if let Some(extra) = extra {
                bases.push(py.import("builtins")?.getattr(*extra)?.cast_into::<PyType>()?);
            }
            let ty = make_class(py, name, doc, PyTuple::new(py, bases)?)?;
            if *extra == Some("KeyError") {
                // KeyError prints its message as a repr (quoted, escaped), being meant for a
                // key; this one is a sentence.
                let plain = py.import("builtins")?.getattr("BaseException")?.getattr("__str__")?;
                ty.setattr("__str__", plain)?;
            }
            sub.push(ty.unbind());
        }
        Ok(Classes { store_error: store_error.unbind(), sub })
    })
}

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let c = classes(py)?;
    for ((n, _, _), ty) in SUBCLASSES.iter().zip(&c.sub) {
        if *n == name {
            return Ok(ty.bind(py).clone());
        }
    }
    Ok(c.store_error.bind(py).clone())
}

/// Add the hierarchy to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = classes(py)?;
    m.add("StoreError", c.store_error.bind(py))?;
    for ((name, _, _), ty) in SUBCLASSES.iter().zip(&c.sub) {
        m.add(*name, ty.bind(py))?;
    }
    Ok(())
}

fn raise(name: &str, msg: String) -> PyErr {
    Python::attach(|py| match class(py, name) {
        Ok(ty) => PyErr::from_type(ty, msg),
        Err(e) => e,
    })
}

/// Set `file`, `shard`, `chunk`, `offset` and `sample_id` on a `StoreError` (None where not
/// known), and `filename` / `errno` / `strerror` on an `OSError` with an OS error code, so
/// that callers need not parse messages.
fn with_location(err: PyErr, core: &Error) -> PyErr {
    Python::attach(|py| {
        let value = err.value(py);
        let loc = core.location();
        let file = loc.file.as_ref().map(|f| f.to_string_lossy().into_owned());
        let set = || -> PyResult<()> {
            if let Error::Io { op, source, .. } = core {
                // Python prints an OSError with a filename as "[Errno N] strerror: 'file'",
                // whatever its message: strerror must be set too, or it reads "None". An
                // error without an OS code keeps the message alone (it names the file).
                let Some(code) = source.raw_os_error() else { return Ok(()) };
                let text = source.to_string();
                let text = text.strip_suffix(&format!(" (os error {code})")).unwrap_or(&text);
                value.setattr("filename", file.clone())?;
                value.setattr("errno", code)?;
                value.setattr("strerror", format!("{op}: {text}"))?;
                return Ok(());
            }
            if !value.is_instance(classes(py)?.store_error.bind(py))? {
                return Ok(());
            }
            value.setattr("file", file.clone())?;
            value.setattr("shard", loc.shard)?;
            value.setattr("chunk", loc.chunk)?;
            value.setattr("offset", loc.offset)?;
            value.setattr("sample_id", loc.sample_id)?;
            Ok(())
        };
        match set() {
            Ok(()) => err,
            Err(e) => e,
        }
    })
}

/// Convert a core error into the Python exception a user expects.
pub fn to_py(err: Error) -> PyErr {
    let py_err = to_py_class(&err);
    with_location(py_err, &err)
}

fn to_py_class(err: &Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::InvalidArgument { .. } => PyValueError::new_err(msg),
        Error::InvalidRecord { .. } => raise("InvalidRecordError", msg),
        Error::DuplicateSample { .. } => raise("DuplicateSampleError", msg),
        Error::MissingSample { .. } => raise("MissingSampleError", msg),
        Error::Corrupt { .. } => raise("CorruptStoreError", msg),
        Error::UnsupportedVersion { .. } => raise("FormatVersionError", msg),
        Error::Mismatch { .. } => raise("StoreMismatchError", msg),
        Error::StoreExists { .. } => raise("StoreExistsError", msg),
        Error::Locked { .. } => raise("StoreLockedError", msg),
        Error::State(_) => raise("StoreError", msg),
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            std::io::ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
            std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(msg),
            std::io::ErrorKind::NotADirectory => PyNotADirectoryError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
    }
}

/// `?`-friendly conversion: `core_call().map_err(to_py)?` reads as `core_call().py()?`.
pub trait IntoPyResult<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for logitcache_core::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
