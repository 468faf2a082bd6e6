//! The `gpuio._gpuio` extension module: gpu-io for Python (pyo3, abi3 for CPython >= 3.9).
//!
//! The Python package (`python/gpuio`) re-exports what is here and adds the pure-Python parts
//! (exception classes, the asyncio bridge, safetensors dtype handling). Rules every binding follows:
//!
//! - The GIL is released (`Python::allow_threads`) whenever Rust waits for I/O.
//! - Python memory handed to an I/O (`pread(buf, ...)`) is held through the buffer protocol
//!   ([`buffer::HeldBuffer`]) for as long as the I/O can touch it; the engine itself only ever writes
//!   into its own aligned buffers, which are copied into the caller's buffer once complete.
//! - Memory gpu-io owns and Python sees (a `read` result, a loaded tensor) is exposed through numpy's
//!   `__array_interface__` by an owner object ([`buffer::Memory`]) that the array keeps alive as its
//!   `base`, so the memory lives exactly as long as the last view of it.
//! - Every `gpuio::Error` becomes the Python exception `gpuio._errors.from_parts` picks for its kind
//!   (FileNotFoundError, PermissionError, OSError with errno, gpuio.CorruptError, ...), whose `str()`
//!   is the error's one-line `Display`, the same line the CLI prints.

use std::sync::OnceLock;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyDict;

mod buffer;
mod cache;
mod dlpack;
mod file;
mod future;
mod pack;
mod stream;
mod tensors;
mod workloads;

/// The process-wide engine every binding uses (gpu-io's shared default: one engine thread, the probed
/// backend). Created on first use; an engine that cannot start is an error each time it is asked for.
pub(crate) fn engine() -> gpuio::Result<gpuio::Engine> {
    static ENGINE: OnceLock<gpuio::Engine> = OnceLock::new();
    if let Some(e) = ENGINE.get() {
        return Ok(e.clone());
    }
    let e = gpuio::Engine::shared_default()?;
    Ok(ENGINE.get_or_init(|| e).clone())
}

/// The queue used when a call is given no `queue=`: concurrent, normal priority.
pub(crate) fn default_queue() -> gpuio::Result<gpuio::IoQueue> {
    static QUEUE: OnceLock<gpuio::IoQueue> = OnceLock::new();
    if let Some(q) = QUEUE.get() {
        return Ok(q.clone());
    }
    let q = engine()?.queue(gpuio::QueueDesc::default())?;
    Ok(QUEUE.get_or_init(|| q).clone())
}

fn kind_name(k: gpuio::ErrorKind) -> &'static str {
    use gpuio::ErrorKind as K;
    match k {
        K::NotFound => "NotFound",
        K::PermissionDenied => "PermissionDenied",
        K::IsADirectory => "IsADirectory",
        K::InvalidInput => "InvalidInput",
        K::UnexpectedEof => "UnexpectedEof",
        K::Io => "Io",
        K::NoSpace => "NoSpace",
        K::Unsupported => "Unsupported",
        K::WouldBlock => "WouldBlock",
        K::Cancelled => "Cancelled",
        K::RetriesExhausted => "RetriesExhausted",
        K::Corrupt => "Corrupt",
        K::EngineStopped => "EngineStopped",
        K::OutOfMemory => "OutOfMemory",
        _ => "Io",
    }
}

/// Builds the Python exception for a gpu-io error (see `python/gpuio/_errors.py`).
pub(crate) fn to_py_err(py: Python<'_>, e: &gpuio::Error) -> PyErr {
    static FACTORY: GILOnceCell<PyObject> = GILOnceCell::new();
    let made = FACTORY
        .get_or_try_init(py, || -> PyResult<PyObject> {
            Ok(py.import("gpuio._errors")?.getattr("from_parts")?.unbind())
        })
        .and_then(|f| {
            let kw = PyDict::new(py);
            kw.set_item("kind", kind_name(e.kind()))?;
            kw.set_item("message", e.to_string())?;
            kw.set_item("errno", e.errno())?;
            kw.set_item("path", e.path().map(|p| p.to_string_lossy().into_owned()))?;
            kw.set_item("offset", e.offset())?;
            kw.set_item("length", e.range_len())?;
            f.bind(py).call((), Some(&kw))
        });
    match made {
        Ok(exc) => PyErr::from_value(exc),
        // The package's Python part is missing (the extension imported alone): still say what failed.
        Err(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// `gpuio::Result<T>` → `PyResult<T>` (needs the GIL to build the exception).
pub(crate) trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for gpuio::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py_err(py, &e))
    }
}

/// Which backend the engine uses and why (the text `gpuio info` prints).
#[pyfunction]
fn engine_info(py: Python<'_>) -> PyResult<String> {
    let e = engine().py_err(py)?;
    Ok(format!("{}", e.explain()))
}

#[pymodule]
fn _gpuio(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(engine_info, m)?)?;
    m.add_class::<buffer::Memory>()?;
    file::register(m)?;
    future::register(m)?;
    pack::register(m)?;
    cache::register(m)?;
    tensors::register(m)?;
    dlpack::register(m)?;
    stream::register(m)?;
    workloads::register(m)?;
    Ok(())
}
