//! Memory crossing the Python boundary, both ways.
//!
//! **Python memory used by Rust** — [`HeldBuffer`]: a buffer-protocol export (`PyObject_GetBuffer`)
//! held until dropped, so the exporter can neither free nor resize the memory (a `bytearray` with
//! an export refuses to resize; numpy refuses to `resize` an exported array) and the object itself
//! stays alive (the view holds a reference). pyo3 offers this as `pyo3::buffer::PyBuffer`, but only
//! where the buffer protocol is in the limited API, i.e. for abi3 builds targeting CPython >= 3.11
//! (see "Buffer Protocol" in the CPython C-API docs and PEP 652's stable-ABI manifest). The module is
//! built abi3 for >= 3.9, so the two functions and the `Py_buffer` struct are declared here as the
//! C-API defines them: the symbols are exported by every CPython 3.x, and the struct's layout has
//! not changed since 3.3 and is frozen by the stable ABI from 3.11.
//!
//! **Rust memory seen by Python** — [`Memory`]: an owner object exposing numpy's
//! `__array_interface__` (version 3, see numpy's "The array interface protocol"). `numpy.asarray`
//! keeps the owner as the array's `base`, so the memory is freed only when the last array viewing it
//! is gone.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use gpuio::{AlignedBuf, BufferPool};
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyTuple};

/// `Py_buffer` as in CPython's `Include/pybuffer.h` (unchanged since 3.3).
#[repr(C)]
struct RawBuffer {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: isize,
    itemsize: isize,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut isize,
    strides: *mut isize,
    suboffsets: *mut isize,
    internal: *mut c_void,
}

extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut RawBuffer, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawBuffer);
}

const PYBUF_SIMPLE: c_int = 0;
const PYBUF_WRITABLE: c_int = 0x0001;

/// A held buffer export of a Python object: contiguous bytes at a fixed address until dropped.
pub(crate) struct HeldBuffer {
    // Boxed: CPython may keep pointers into the view (`internal`), so its address must not change.
    view: Box<RawBuffer>,
}

// SAFETY: the export pins the memory and holds a strong reference to the exporter; both are released
// in Drop with the GIL held, from whichever thread drops it. The raw pointer is only dereferenced by
// the code that asked for the export, and only while it is held.
unsafe impl Send for HeldBuffer {}
// SAFETY: shared access only reads the pointer and length.
unsafe impl Sync for HeldBuffer {}

impl HeldBuffer {
    /// Holds `obj`'s buffer, which must be C-contiguous (any item type: seen as bytes). `writable`
    /// asks for a writable one (a `bytes` object is refused with `BufferError`).
    pub(crate) fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<HeldBuffer> {
        let mut view = Box::new(RawBuffer {
            buf: std::ptr::null_mut(),
            obj: std::ptr::null_mut(),
            len: 0,
            itemsize: 0,
            readonly: 0,
            ndim: 0,
            format: std::ptr::null_mut(),
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            suboffsets: std::ptr::null_mut(),
            internal: std::ptr::null_mut(),
        });
        let flags = if writable {
            PYBUF_SIMPLE | PYBUF_WRITABLE
        } else {
            PYBUF_SIMPLE
        };
        // SAFETY: obj is a live object (we hold the GIL through `Bound`); view points to writable
        // storage of the right layout. PyBUF_SIMPLE asks for contiguous bytes: exporters that cannot
        // provide them fail with BufferError.
        let rc = unsafe { PyObject_GetBuffer(obj.as_ptr(), &mut *view, flags) };
        if rc != 0 {
            return Err(PyErr::take(obj.py())
                .unwrap_or_else(|| PyBufferError::new_err("object does not export a buffer")));
        }
        let held = HeldBuffer { view };
        if writable && held.view.readonly != 0 {
            return Err(PyBufferError::new_err("the buffer is read-only"));
        }
        if held.view.len < 0 || (held.view.len > 0 && held.view.buf.is_null()) {
            return Err(PyBufferError::new_err(
                "the object exported an invalid buffer",
            ));
        }
        Ok(held)
    }

    pub(crate) fn len(&self) -> usize {
        self.view.len as usize
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.view.buf.cast()
    }

    /// The bytes (for reading). The caller must not hold the slice past the export (it cannot: the
    /// slice borrows `self`).
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.len() == 0 {
            return &[];
        }
        // SAFETY: the export holds `len` contiguous bytes at `buf` for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len()) }
    }

    /// Copies `src` to the start of the buffer (`src.len() <= self.len()`).
    ///
    /// Python code running at the same time may read or write the same bytes (the GIL is released
    /// while I/O completes, as `io.RawIOBase.readinto` does); that yields unspecified bytes, never an
    /// access outside the export.
    pub(crate) fn copy_in(&self, src: &[u8]) {
        assert!(src.len() <= self.len(), "copy past the held buffer");
        if src.is_empty() {
            return;
        }
        // SAFETY: the export is writable (checked in `get` for writable holds; copy_in is only called
        // on those), holds at least src.len() bytes, and cannot overlap the engine's own buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr(), src.len()) }
    }
}

impl Drop for HeldBuffer {
    fn drop(&mut self) {
        Python::with_gil(|_| {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer and is released once.
            unsafe { PyBuffer_Release(&mut *self.view) }
        });
    }
}

/// What keeps memory shown to Python alive.
pub(crate) enum Owner {
    Aligned(#[allow(dead_code)] AlignedBuf),
    Bytes(#[allow(dead_code)] Vec<u8>),
    /// Something shared (a loaded model's device buffer, a pipeline's buffer pool).
    Shared(#[allow(dead_code)] Arc<dyn Send + Sync>),
    Pool(#[allow(dead_code)] BufferPool),
}

/// Memory owned by gpu-io that numpy arrays view (through `__array_interface__`); it is freed when
/// the last array that views it is gone. Not made from Python.
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct Memory {
    ptr: usize,
    len: usize,
    readonly: bool,
    _owner: Owner,
}

impl Memory {
    /// Shows `len` bytes at `ptr`, kept alive by `owner`. The caller guarantees that `owner` keeps
    /// `ptr..ptr + len` allocated for as long as it lives.
    pub(crate) fn new(ptr: *const u8, len: usize, readonly: bool, owner: Owner) -> Memory {
        Memory {
            ptr: ptr as usize,
            len,
            readonly,
            _owner: owner,
        }
    }

    pub(crate) fn from_aligned(buf: AlignedBuf, len: usize) -> Memory {
        let len = len.min(buf.len());
        Memory::new(buf.as_ptr(), len, false, Owner::Aligned(buf))
    }

    pub(crate) fn from_vec(v: Vec<u8>) -> Memory {
        Memory::new(v.as_ptr(), v.len(), false, Owner::Bytes(v))
    }
}

#[pymethods]
impl Memory {
    /// numpy's array interface (version 3): a 1-D uint8 array over this memory.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("version", 3)?;
        d.set_item("shape", (self.len,))?;
        d.set_item("typestr", "|u1")?;
        // numpy refuses a NULL data pointer for a non-empty array and accepts any for an empty one.
        let ptr = if self.ptr == 0 { 1 } else { self.ptr };
        d.set_item("data", (ptr, self.readonly))?;
        Ok(d)
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!("<gpuio.Memory {} bytes at {:#x}>", self.len, self.ptr)
    }
}

/// A numpy uint8 array viewing `mem` (its base keeps `mem` alive).
pub(crate) fn to_numpy<'py>(py: Python<'py>, mem: Memory) -> PyResult<Bound<'py, PyAny>> {
    static ASARRAY: GILOnceCell<PyObject> = GILOnceCell::new();
    let asarray = ASARRAY.get_or_try_init(py, || -> PyResult<PyObject> {
        Ok(py.import("numpy")?.getattr("asarray")?.unbind())
    })?;
    let owner = Bound::new(py, mem)?;
    asarray.bind(py).call1(PyTuple::new(py, [owner])?)
}
