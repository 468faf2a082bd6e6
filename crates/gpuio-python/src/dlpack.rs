//! DLPack export of loaded tensors: `gpuio.Tensor` with `__dlpack__` / `__dlpack_device__`, as the
//! Python array API standard specifies ("DLPack support" in the array API standard; the structs are
//! those of dlpack.h from github.com/dmlc/dlpack, v1.1). `__dlpack__(max_version=(1, x))` returns a
//! versioned capsule ("dltensor_versioned", `DLManagedTensorVersioned`); without `max_version`, or
//! below 1.0, the legacy one ("dltensor", `DLManagedTensor`) older consumers take.
//!
//! Lifetime: each export owns a clone of the model's `Arc`, released by the DLPack deleter — called by
//! the consumer when its tensor dies, or by the capsule's destructor if nobody consumed it — so the
//! device allocation lives until the last view of it, whichever framework holds it. The deleter
//! touches no Python object and so needs no GIL.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use gpuio_cuda::{DeviceTensor, Dtype, LoadedModel};
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tensor>()?;
    Ok(())
}

const K_DL_CPU: i32 = 1;
const K_DL_CUDA: i32 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

/// `DLPACK_FLAG_BITMASK_READ_ONLY` is not set: the memory is the model's own and writable.
const DLPACK_MAJOR: u32 = 1;
const DLPACK_MINOR: u32 = 1;

const NAME_LEGACY: &CStr = c"dltensor";
const NAME_VERSIONED: &CStr = c"dltensor_versioned";

/// What an export keeps alive: the model (its allocation) and the shape/stride arrays.
struct Ctx {
    _model: Arc<LoadedModel>,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// The DLPack type of a safetensors dtype (type codes of dlpack.h v1.1's `DLDataTypeCode`).
fn dl_dtype(d: Dtype) -> Option<DLDataType> {
    let (code, bits) = match d {
        Dtype::BOOL => (6, 8),
        Dtype::U8 => (1, 8),
        Dtype::U16 => (1, 16),
        Dtype::U32 => (1, 32),
        Dtype::U64 => (1, 64),
        Dtype::I8 => (0, 8),
        Dtype::I16 => (0, 16),
        Dtype::I32 => (0, 32),
        Dtype::I64 => (0, 64),
        Dtype::F16 => (2, 16),
        Dtype::F32 => (2, 32),
        Dtype::F64 => (2, 64),
        Dtype::BF16 => (4, 16),
        Dtype::C64 => (5, 64),
        Dtype::F8_E4M3 => (10, 8), // kDLFloat8_e4m3fn
        Dtype::F8_E5M2 => (12, 8), // kDLFloat8_e5m2
        Dtype::F8_E8M0 => (14, 8), // kDLFloat8_e8m0fnu
        _ => return None,
    };
    Some(DLDataType {
        code,
        bits,
        lanes: 1,
    })
}

/// One tensor of a loaded model, exported through DLPack. Attributes: `name`, `dtype` (safetensors
/// name), `shape`, `nbytes`, `data_ptr` (device address of the first byte), `device` ("cpu",
/// "cuda:N").
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct Tensor {
    model: Arc<LoadedModel>,
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    offset: u64,
    nbytes: u64,
    device: String,
    dl_device: DLDevice,
}

impl Tensor {
    pub(crate) fn new(model: Arc<LoadedModel>, device: &str, t: &DeviceTensor) -> PyResult<Tensor> {
        let dl_device = match device.strip_prefix("cuda:") {
            Some(n) => DLDevice {
                device_type: K_DL_CUDA,
                device_id: n.parse().unwrap_or(0),
            },
            None => DLDevice {
                device_type: K_DL_CPU,
                device_id: 0,
            },
        };
        Ok(Tensor {
            model,
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            offset: t.offset,
            nbytes: t.bytes,
            device: device.to_string(),
            dl_device,
        })
    }

    fn fill(&self, ctx: &mut Ctx) -> PyResult<DLTensor> {
        let dtype = dl_dtype(self.dtype).ok_or_else(|| {
            PyBufferError::new_err(format!(
                "tensor '{}': DLPack has no type for safetensors dtype {}",
                self.name, self.dtype
            ))
        })?;
        ctx.shape = self.shape.iter().map(|&s| s as i64).collect();
        // Compact row-major strides in elements (given explicitly: NULL strides are deprecated).
        let mut strides = vec![1i64; ctx.shape.len()];
        for i in (0..ctx.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * ctx.shape[i + 1].max(1);
        }
        ctx.strides = strides;
        Ok(DLTensor {
            // The allocation's first byte (CUDA allocations are 256-byte aligned, as dlpack.h asks),
            // the tensor at byte_offset.
            data: self.model.buffer.ptr() as usize as *mut c_void,
            device: self.dl_device,
            ndim: ctx.shape.len() as i32,
            dtype,
            shape: ctx.shape.as_mut_ptr(),
            strides: ctx.strides.as_mut_ptr(),
            byte_offset: self.offset,
        })
    }
}

unsafe extern "C" fn delete_legacy(p: *mut DLManagedTensor) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` and its manager_ctx were made by Box::into_raw in `__dlpack__` and are freed once:
    // DLPack calls the deleter exactly once, by the consumer or by our capsule destructor.
    unsafe {
        drop(Box::from_raw((*p).manager_ctx.cast::<Ctx>()));
        drop(Box::from_raw(p));
    }
}

unsafe extern "C" fn delete_versioned(p: *mut DLManagedTensorVersioned) {
    if p.is_null() {
        return;
    }
    // SAFETY: as in delete_legacy.
    unsafe {
        drop(Box::from_raw((*p).manager_ctx.cast::<Ctx>()));
        drop(Box::from_raw(p));
    }
}

/// Capsule destructors: a capsule still carrying its original name was never consumed (a consumer
/// renames it "used_dltensor[_versioned]" and calls the deleter itself), so the export is ours to
/// delete.
unsafe extern "C" fn capsule_legacy(cap: *mut ffi::PyObject) {
    // SAFETY: called by CPython with a live capsule; IsValid/GetPointer with a matching name never
    // set an exception.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, NAME_LEGACY.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(cap, NAME_LEGACY.as_ptr()).cast::<DLManagedTensor>();
            if let Some(d) = (*p).deleter {
                d(p);
            }
        }
    }
}

unsafe extern "C" fn capsule_versioned(cap: *mut ffi::PyObject) {
    // SAFETY: as in capsule_legacy.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, NAME_VERSIONED.as_ptr()) == 1 {
            let p = ffi::PyCapsule_GetPointer(cap, NAME_VERSIONED.as_ptr())
                .cast::<DLManagedTensorVersioned>();
            if let Some(d) = (*p).deleter {
                d(p);
            }
        }
    }
}

#[pymethods]
impl Tensor {
    /// Exports the tensor as a DLPack capsule (no copy). `max_version`: the highest DLPack version the
    /// consumer understands; (1, x) or more gets a versioned capsule, otherwise a legacy one.
    /// `stream` is accepted and ignored: a load has finished (its copy stream synchronized) before
    /// its tensors exist. `dl_device` must be this tensor's device (or None); `copy=True` is refused.
    #[pyo3(signature = (*, stream = None, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<PyObject>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<PyObject> {
        let _ = stream;
        if let Some((t, id)) = dl_device {
            if (t, id) != (self.dl_device.device_type, self.dl_device.device_id) {
                return Err(PyBufferError::new_err(format!(
                    "tensor '{}' is on {}: cannot export it to DLPack device ({t}, {id})",
                    self.name, self.device
                )));
            }
        }
        if copy == Some(true) {
            return Err(PyValueError::new_err(
                "gpuio tensors are exported without a copy (copy=True is not supported)",
            ));
        }
        let mut ctx = Box::new(Ctx {
            _model: self.model.clone(),
            shape: Vec::new(),
            strides: Vec::new(),
        });
        let dl = self.fill(&mut ctx)?;
        let versioned = max_version.is_some_and(|(major, _)| major >= 1);
        let cap = if versioned {
            let m = Box::into_raw(Box::new(DLManagedTensorVersioned {
                version: DLPackVersion {
                    major: DLPACK_MAJOR,
                    minor: DLPACK_MINOR,
                },
                manager_ctx: Box::into_raw(ctx).cast(),
                deleter: Some(delete_versioned),
                flags: 0,
                dl_tensor: dl,
            }));
            // SAFETY: m is a valid pointer; the capsule owns it until consumed.
            let cap = unsafe {
                ffi::PyCapsule_New(m.cast(), NAME_VERSIONED.as_ptr(), Some(capsule_versioned))
            };
            if cap.is_null() {
                // SAFETY: not handed to anyone.
                unsafe { delete_versioned(m) };
            }
            cap
        } else {
            let m = Box::into_raw(Box::new(DLManagedTensor {
                dl_tensor: dl,
                manager_ctx: Box::into_raw(ctx).cast(),
                deleter: Some(delete_legacy),
            }));
            // SAFETY: as above.
            let cap =
                unsafe { ffi::PyCapsule_New(m.cast(), NAME_LEGACY.as_ptr(), Some(capsule_legacy)) };
            if cap.is_null() {
                // SAFETY: not handed to anyone.
                unsafe { delete_legacy(m) };
            }
            cap
        };
        // SAFETY: a new reference or NULL with an exception set.
        unsafe { Bound::from_owned_ptr_or_err(py, cap) }.map(Bound::unbind)
    }

    /// `(device_type, device_id)` as DLPack numbers them: (1, 0) for the host, (2, N) for cuda:N.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (self.dl_device.device_type, self.dl_device.device_id)
    }

    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The safetensors dtype name ("F32", "BF16", ...).
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    #[getter]
    fn shape(&self) -> Vec<u64> {
        self.shape.clone()
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// Device address of the tensor's first byte.
    #[getter]
    fn data_ptr(&self) -> u64 {
        self.model.buffer.ptr() + self.offset
    }

    /// "cpu" or "cuda:N".
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    fn __repr__(&self) -> String {
        format!(
            "<gpuio.Tensor {:?} {} {:?} on {}>",
            self.name, self.dtype, self.shape, self.device
        )
    }
}
