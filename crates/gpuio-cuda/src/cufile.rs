//! GPUDirect Storage (cuFile): whether `libcufile` can be loaded and its driver opened here (and why
//! not), and [`CufileReader`], a [`DirectRead`] that reads files straight into a GPU's memory.
//!
//! CUDA images ship `libcufile.so.0` (cudarc looks only for unversioned and `.so.N` names that do
//! not include it), so the library is opened by hand with `dlopen`, versioned name first, once per
//! process, and never closed (cuFile keeps global state). The C ABI declared here is that of
//! `cufile.h` (see the layout notes on each type; a unit test pins sizes and offsets).
//!
//! The reader opens the cuFile driver once per process and keeps it open; it registers each file
//! once (`cuFileHandleRegister` is expensive) and keeps a bounded number of registrations, keyed by
//! [`gpuio::File::id`]. cuFile needs an `O_DIRECT` descriptor: a buffered file is refused with
//! [`ErrorKind::Unsupported`] and the caller stages instead. Device buffers are not registered with
//! `cuFileBufRegister`: cuFile then pins through its own bounce buffers, which costs some speed but
//! no correctness, and leaves the caller's allocations untouched.
//!
//! Nothing here falls back to host memory on its own, and nothing panics where there is no GPU or no
//! libcufile: every failure is an [`Error`] carrying the cuFile error number and its meaning.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr, CString};
use std::fmt;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use gpuio::error::Op;
use gpuio::{Error, ErrorKind, File, Result};
use parking_lot::Mutex;

use crate::device::{DevicePtr, DirectRead};

/// Library names tried, in order (CUDA images and the nvidia-cufile wheels ship the versioned one).
pub const LIBRARY_NAMES: [&str; 2] = ["libcufile.so.0", "libcufile.so"];

/// Most files a [`CufileReader`] keeps registered; the least recently used is deregistered (once
/// no read uses it) to make room for another.
pub const HANDLES_MAX: usize = 64;

/// Most bytes asked of one `cuFileRead` call; longer reads are issued as several calls.
const READ_CALL_MAX: usize = 1 << 30;

/// Most times a read interrupted by a signal (EINTR) is retried before it is an error.
const EINTR_RETRIES_MAX: u32 = 16;

/// `CUFILEOP_BASE_ERR` in cufile.h: cuFile's own error numbers are above it.
const CUFILEOP_BASE_ERR: i64 = 5000;

/// Whether GPUDirect Storage can be used here, and why (not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CufileStatus {
    /// The library that loaded, if one did.
    pub library: Option<String>,
    /// Whether `cuFileDriverOpen` succeeded.
    pub usable: bool,
    /// Whether the nvidia-fs kernel module is loaded (true GDS); without it cuFile runs in
    /// compatibility mode, through host memory.
    pub nvidia_fs: bool,
    pub reasons: Vec<String>,
}

// ---- The C ABI (cufile.h) ------------------------------------------------------------------------

/// `CUfileError_t`: `{ CUfileOpError err; CUresult cu_err; }`, two C enums (4 bytes each): 8 bytes,
/// 4-aligned. `cu_err` is meaningful when `err` is `CU_FILE_CUDA_DRIVER_ERROR` (5011).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CuFileError {
    err: c_int,
    cu_err: c_int,
}

/// The `handle` union of `CUfileDescr_t`: `union { int fd; void *handle; }` (8 bytes on LP64).
#[repr(C)]
#[derive(Clone, Copy)]
union CuFileDescrHandle {
    fd: c_int,
    handle: *mut c_void,
}

/// `CUfileDescr_t`: `{ CUfileFileHandleType type; union { int fd; void *handle; } handle;
/// const CUfileFSOps_t *fs_ops; }`. On LP64: `type` at 0, 4 bytes of padding, `handle` at 8,
/// `fs_ops` at 16; 24 bytes, 8-aligned.
#[repr(C)]
struct CuFileDescr {
    kind: c_int,
    handle: CuFileDescrHandle,
    fs_ops: *const c_void,
}

/// `CU_FILE_HANDLE_TYPE_OPAQUE_FD` of `enum CUfileFileHandleType`: a Linux file descriptor.
const CU_FILE_HANDLE_TYPE_OPAQUE_FD: c_int = 1;

/// `CUfileHandle_t`: `void *`.
type CuFileHandle = *mut c_void;

/// `CUfileError_t cuFileDriverOpen(void)`, `CUfileError_t cuFileDriverClose_v2(void)` (cufile.h
/// `#define`s `cuFileDriverClose` to `cuFileDriverClose_v2`; older libraries export only the
/// former).
type DriverFn = unsafe extern "C" fn() -> CuFileError;
/// `CUfileError_t cuFileHandleRegister(CUfileHandle_t *fh, CUfileDescr_t *descr)`.
type HandleRegisterFn = unsafe extern "C" fn(*mut CuFileHandle, *mut CuFileDescr) -> CuFileError;
/// `void cuFileHandleDeregister(CUfileHandle_t fh)`.
type HandleDeregisterFn = unsafe extern "C" fn(CuFileHandle);
/// `ssize_t cuFileRead(CUfileHandle_t fh, void *devPtr_base, size_t size, off_t file_offset,
/// off_t devPtr_offset)`: bytes read; -1 with `errno` set; or minus a `CUfileOpError`.
type ReadFn =
    unsafe extern "C" fn(CuFileHandle, *mut c_void, usize, libc::off_t, libc::off_t) -> isize;

/// `enum CUfileOpError` of cufile.h: number, name and, for the numbers in the header's `CUFILE_OP`
/// table (5001–5034 but 5021), the header's own description; the others (5021, found in CUDA 12.0's
/// header only, and the batch and async errors from 5035) are described from their names.
const OP_ERRORS: [(i32, &str, &str); 48] = [
    (
        5001,
        "CU_FILE_DRIVER_NOT_INITIALIZED",
        "nvidia-fs driver is not loaded",
    ),
    (5002, "CU_FILE_DRIVER_INVALID_PROPS", "invalid property"),
    (
        5003,
        "CU_FILE_DRIVER_UNSUPPORTED_LIMIT",
        "property range error",
    ),
    (
        5004,
        "CU_FILE_DRIVER_VERSION_MISMATCH",
        "nvidia-fs driver version mismatch",
    ),
    (
        5005,
        "CU_FILE_DRIVER_VERSION_READ_ERROR",
        "nvidia-fs driver version read error",
    ),
    (
        5006,
        "CU_FILE_DRIVER_CLOSING",
        "driver shutdown in progress",
    ),
    (
        5007,
        "CU_FILE_PLATFORM_NOT_SUPPORTED",
        "GPUDirect Storage not supported on current platform",
    ),
    (
        5008,
        "CU_FILE_IO_NOT_SUPPORTED",
        "GPUDirect Storage not supported on current file",
    ),
    (
        5009,
        "CU_FILE_DEVICE_NOT_SUPPORTED",
        "GPUDirect Storage not supported on current GPU",
    ),
    (
        5010,
        "CU_FILE_NVFS_DRIVER_ERROR",
        "nvidia-fs driver ioctl error",
    ),
    (5011, "CU_FILE_CUDA_DRIVER_ERROR", "CUDA Driver API error"),
    (
        5012,
        "CU_FILE_CUDA_POINTER_INVALID",
        "invalid device pointer",
    ),
    (
        5013,
        "CU_FILE_CUDA_MEMORY_TYPE_INVALID",
        "invalid pointer memory type",
    ),
    (
        5014,
        "CU_FILE_CUDA_POINTER_RANGE_ERROR",
        "pointer range exceeds allocated address range",
    ),
    (
        5015,
        "CU_FILE_CUDA_CONTEXT_MISMATCH",
        "cuda context mismatch",
    ),
    (
        5016,
        "CU_FILE_INVALID_MAPPING_SIZE",
        "access beyond maximum pinned size",
    ),
    (
        5017,
        "CU_FILE_INVALID_MAPPING_RANGE",
        "access beyond mapped size",
    ),
    (5018, "CU_FILE_INVALID_FILE_TYPE", "unsupported file type"),
    (
        5019,
        "CU_FILE_INVALID_FILE_OPEN_FLAG",
        "unsupported file open flags",
    ),
    (5020, "CU_FILE_DIO_NOT_SET", "fd direct IO not set"),
    (5021, "CU_FILE_EXPECTED_FILE_MODE", "unexpected file mode"),
    (5022, "CU_FILE_INVALID_VALUE", "invalid arguments"),
    (
        5023,
        "CU_FILE_MEMORY_ALREADY_REGISTERED",
        "device pointer already registered",
    ),
    (
        5024,
        "CU_FILE_MEMORY_NOT_REGISTERED",
        "device pointer lookup failure",
    ),
    (
        5025,
        "CU_FILE_PERMISSION_DENIED",
        "driver or file access error",
    ),
    (
        5026,
        "CU_FILE_DRIVER_ALREADY_OPEN",
        "driver is already open",
    ),
    (
        5027,
        "CU_FILE_HANDLE_NOT_REGISTERED",
        "file descriptor is not registered",
    ),
    (
        5028,
        "CU_FILE_HANDLE_ALREADY_REGISTERED",
        "file descriptor is already registered",
    ),
    (5029, "CU_FILE_DEVICE_NOT_FOUND", "GPU device not found"),
    (5030, "CU_FILE_INTERNAL_ERROR", "internal error"),
    (
        5031,
        "CU_FILE_GETNEWFD_FAILED",
        "failed to obtain new file descriptor",
    ),
    (
        5033,
        "CU_FILE_NVFS_SETUP_ERROR",
        "NVFS driver initialization error",
    ),
    (
        5034,
        "CU_FILE_IO_DISABLED",
        "GPUDirect Storage disabled by config on current file",
    ),
    (
        5035,
        "CU_FILE_BATCH_SUBMIT_FAILED",
        "batch submission failed",
    ),
    (
        5036,
        "CU_FILE_GPU_MEMORY_PINNING_FAILED",
        "pinning GPU memory failed",
    ),
    (5037, "CU_FILE_BATCH_FULL", "batch is full"),
    (
        5038,
        "CU_FILE_ASYNC_NOT_SUPPORTED",
        "asynchronous I/O not supported",
    ),
    (
        5039,
        "CU_FILE_INTERNAL_BATCH_SETUP_ERROR",
        "internal batch setup error",
    ),
    (
        5040,
        "CU_FILE_INTERNAL_BATCH_SUBMIT_ERROR",
        "internal batch submit error",
    ),
    (
        5041,
        "CU_FILE_INTERNAL_BATCH_GETSTATUS_ERROR",
        "internal batch status error",
    ),
    (
        5042,
        "CU_FILE_INTERNAL_BATCH_CANCEL_ERROR",
        "internal batch cancel error",
    ),
    (5043, "CU_FILE_NOMEM_ERROR", "out of memory"),
    (5044, "CU_FILE_IO_ERROR", "I/O error"),
    (
        5045,
        "CU_FILE_INTERNAL_BUF_REGISTER_ERROR",
        "internal buffer registration error",
    ),
    (5046, "CU_FILE_HASH_OPR_ERROR", "internal hash table error"),
    (
        5047,
        "CU_FILE_INVALID_CONTEXT_ERROR",
        "invalid CUDA context",
    ),
    (
        5048,
        "CU_FILE_NVFS_INTERNAL_DRIVER_ERROR",
        "nvidia-fs internal driver error",
    ),
    (
        5049,
        "CU_FILE_BATCH_NOCOMPAT_ERROR",
        "batch I/O not available in compatibility mode",
    ),
];

/// The name and meaning of a `CUfileOpError` number (`5001` → `CU_FILE_DRIVER_NOT_INITIALIZED`,
/// `nvidia-fs driver is not loaded`); `None` for numbers this build does not know.
pub fn op_error(code: i32) -> Option<(&'static str, &'static str)> {
    OP_ERRORS
        .binary_search_by_key(&code, |e| e.0)
        .ok()
        .map(|i| (OP_ERRORS[i].1, OP_ERRORS[i].2))
}

/// What a `CUfileOpError` means to a caller.
fn op_error_kind(code: i32) -> ErrorKind {
    match code {
        5001 | 5004 | 5007 | 5008 | 5009 | 5018 | 5019 | 5020 | 5021 | 5029 | 5034 | 5038
        | 5049 => ErrorKind::Unsupported,
        5002 | 5003 | 5012 | 5013 | 5014 | 5015 | 5016 | 5017 | 5022 | 5047 => {
            ErrorKind::InvalidInput
        }
        5025 => ErrorKind::PermissionDenied,
        5036 => ErrorKind::OutOfMemory,
        _ => ErrorKind::Io,
    }
}

/// An error for cuFile status `code` (and CUDA result `cu_err`, 0 when none) from `what`.
fn cufile_error(what: &str, code: i32, cu_err: i32) -> Error {
    let mut msg = match op_error(code) {
        Some((name, meaning)) => format!("{what} failed: cuFile error {code} {name} ({meaning})"),
        None => {
            format!("{what} failed: cuFile error {code} (not a CUfileOpError this build knows)")
        }
    };
    if cu_err != 0 {
        msg.push_str(&format!(" (CUDA result {cu_err})"));
    }
    Error::new(op_error_kind(code), msg)
}

/// The error for a failed `cuFileHandleRegister`. Registration fails with
/// `CU_FILE_HANDLE_NOT_REGISTERED` (5027) when cuFile cannot serve the file's filesystem — seen on an
/// H200 with ext4 on a virtio disk, where libcufile logs "unable to get volume attributes" — and with
/// the nvidia-fs errors where that module is absent or broken. None of these is the file's fault:
/// they mean "no direct path for this file", so they are `Unsupported` and an automatic choice stages
/// instead (found on the first GPU check, issue 12).
fn register_error(code: i32, cu_err: i32) -> Error {
    let e = cufile_error("cuFileHandleRegister", code, cu_err);
    match code {
        5010 | 5027 | 5030 | 5033 | 5048 => e.with_kind(ErrorKind::Unsupported),
        _ => e,
    }
}

/// The error for a failed `cuFileRead` that returned `r < 0`, with `errno` as it was right after
/// the call: -1 is an OS error in `errno`; minus a number above `CUFILEOP_BASE_ERR` is a cuFile
/// error; any other negative value is taken as minus an errno.
fn read_failure(r: isize, errno: i32) -> Error {
    debug_assert!(r < 0);
    if r == -1 {
        return Error::from_errno(Op::Read, errno).with_context("cuFileRead");
    }
    let code = (r as i64).unsigned_abs();
    if code > CUFILEOP_BASE_ERR as u64 {
        cufile_error("cuFileRead", i32::try_from(code).unwrap_or(i32::MAX), 0).with_op(Op::Read)
    } else {
        Error::from_errno(Op::Read, code as i32).with_context("cuFileRead")
    }
}

// ---- Loading the library ---------------------------------------------------------------------------

/// The outcome of loading libcufile (once per process).
struct Library {
    /// The `dlopen` handle (0 when none loaded); never closed.
    handle: usize,
    name: Option<&'static str>,
    /// Loader errors other than "no such file".
    errors: Vec<String>,
}

fn dlerror_text() -> String {
    // SAFETY: dlerror returns a thread-local C string or null.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn library() -> &'static Library {
    static LIBRARY: OnceLock<Library> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let mut errors = Vec::new();
        for name in LIBRARY_NAMES {
            let Ok(c) = CString::new(name) else { continue };
            // SAFETY: dlopen of a library name; RTLD_LOCAL keeps its symbols to us.
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if h.is_null() {
                let why = dlerror_text();
                if !why.contains("No such file") {
                    errors.push(why);
                }
            } else {
                return Library {
                    handle: h as usize,
                    name: Some(name),
                    errors,
                };
            }
        }
        Library {
            handle: 0,
            name: None,
            errors,
        }
    })
}

/// The address of `name` in the loaded library, or null.
fn sym(lib: &Library, name: &str) -> *mut c_void {
    let Ok(c) = CString::new(name) else {
        return std::ptr::null_mut();
    };
    // SAFETY: lib.handle is a live handle from dlopen (never closed); c is NUL-terminated.
    unsafe { libc::dlsym(lib.handle as *mut c_void, c.as_ptr()) }
}

fn not_found_reason(lib: &Library) -> String {
    let mut why = format!(
        "libcufile not found (looked for {}): GPUDirect Storage unavailable; loads are staged",
        LIBRARY_NAMES.join(", ")
    );
    if !lib.errors.is_empty() {
        why.push_str(&format!(" ({})", lib.errors.join("; ")));
    }
    why
}

/// Whether the nvidia-fs kernel module is loaded: without it cuFile runs in compatibility mode,
/// through host memory.
pub fn nvidia_fs_loaded() -> bool {
    std::path::Path::new("/proc/driver/nvidia-fs").exists()
}

// ---- The driver, opened once per process --------------------------------------------------------

/// The cuFile entry points the reader uses, resolved once the driver is open.
#[derive(Debug)]
struct Driver {
    register: HandleRegisterFn,
    deregister: HandleDeregisterFn,
    read: ReadFn,
    nvidia_fs: bool,
}

/// The process's cuFile driver: opened by the first [`CufileReader`] and never closed (cuFile keeps
/// process-wide state; closing it under another reader would break that reader's handles).
static DRIVER: OnceLock<std::result::Result<Driver, Error>> = OnceLock::new();

fn driver() -> Result<&'static Driver> {
    DRIVER
        .get_or_init(open_driver)
        .as_ref()
        .map_err(Clone::clone)
}

fn open_driver() -> std::result::Result<Driver, Error> {
    let lib = library();
    if lib.handle == 0 {
        return Err(Error::new(ErrorKind::Unsupported, not_found_reason(lib)));
    }
    let cuda = crate::cuda::driver_status();
    if !cuda.available {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("cuFile needs a GPU: {}", cuda.reason),
        ));
    }
    let names = [
        "cuFileDriverOpen",
        "cuFileHandleRegister",
        "cuFileHandleDeregister",
        "cuFileRead",
    ];
    let ptrs = names.map(|n| sym(lib, n));
    if let Some(i) = ptrs.iter().position(|p| p.is_null()) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} lacks {}: too old a cuFile library",
                lib.name.unwrap_or("libcufile"),
                names[i]
            ),
        ));
    }
    // SAFETY: each symbol has exactly this C signature in every cuFile release (cufile.h; the
    // types above), and each pointer was checked to be non-null.
    let (open, register, deregister, read) = unsafe {
        (
            std::mem::transmute::<*mut c_void, DriverFn>(ptrs[0]),
            std::mem::transmute::<*mut c_void, HandleRegisterFn>(ptrs[1]),
            std::mem::transmute::<*mut c_void, HandleDeregisterFn>(ptrs[2]),
            std::mem::transmute::<*mut c_void, ReadFn>(ptrs[3]),
        )
    };
    // SAFETY: no arguments; the library is loaded and the CUDA driver initialized.
    let r = unsafe { open() };
    if r.err != 0 {
        return Err(cufile_error("cuFileDriverOpen", r.err, r.cu_err)
            .with_context("opening the cuFile driver (see /etc/cufile.json and cufile.log)"));
    }
    Ok(Driver {
        register,
        deregister,
        read,
        nvidia_fs: nvidia_fs_loaded(),
    })
}

/// Probes libcufile: loads it, and when a GPU is usable opens and closes the cuFile driver (or,
/// when a [`CufileReader`] already keeps it open in this process, says so without touching it).
pub fn status() -> CufileStatus {
    let mut st = CufileStatus {
        library: None,
        usable: false,
        nvidia_fs: nvidia_fs_loaded(),
        reasons: Vec::new(),
    };
    let lib = library();
    let Some(name) = lib.name else {
        st.reasons.push(not_found_reason(lib));
        return st;
    };
    st.library = Some(name.to_string());
    if !st.nvidia_fs {
        st.reasons.push(
            "the nvidia-fs kernel module is not loaded (/proc/driver/nvidia-fs is absent): cuFile would run in compatibility mode, through host memory".into(),
        );
    }
    let driver = crate::cuda::driver_status();
    if !driver.available {
        st.reasons
            .push(format!("cuFile needs a GPU: {}", driver.reason));
        return st;
    }
    let compat = if st.nvidia_fs {
        ""
    } else {
        " (compatibility mode)"
    };
    if let Some(Ok(_)) = DRIVER.get() {
        st.usable = true;
        st.reasons.push(format!(
            "cuFileDriverOpen succeeded with {name}{compat}; the driver is kept open by this process's cuFile reader"
        ));
        return st;
    }
    let (open, close) = (
        sym(lib, "cuFileDriverOpen"),
        sym(lib, "cuFileDriverClose_v2"),
    );
    let close = if close.is_null() {
        sym(lib, "cuFileDriverClose")
    } else {
        close
    };
    if open.is_null() || close.is_null() {
        st.reasons
            .push("libcufile lacks cuFileDriverOpen/cuFileDriverClose".into());
        return st;
    }
    // SAFETY: the symbols have these C signatures in every cuFile release (cufile.h).
    let (open, close): (DriverFn, DriverFn) = unsafe {
        (
            std::mem::transmute::<*mut c_void, DriverFn>(open),
            std::mem::transmute::<*mut c_void, DriverFn>(close),
        )
    };
    // SAFETY: no arguments; the driver library is loaded and initialized.
    let r = unsafe { open() };
    if r.err != 0 {
        let what = match op_error(r.err) {
            Some((n, meaning)) => format!(" {n} ({meaning})"),
            None => String::new(),
        };
        st.reasons.push(format!(
            "cuFileDriverOpen failed: cuFile error {}{what} (CUDA result {}); see /etc/cufile.json and cufile.log",
            r.err, r.cu_err
        ));
        return st;
    }
    // SAFETY: opened just above.
    unsafe { close() };
    st.usable = true;
    st.reasons
        .push(format!("cuFileDriverOpen succeeded with {name}{compat}"));
    st
}

// ---- The reader --------------------------------------------------------------------------------

/// A retained primary context of one GPU, released on drop.
struct PrimaryCtx {
    dev: sys::CUdevice,
    /// `CUcontext` as an address.
    ctx: usize,
}

impl PrimaryCtx {
    fn retain(ordinal: usize, dev: sys::CUdevice) -> Result<PrimaryCtx> {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: only called once driver_status() has loaded and initialized the driver; the
        // out-param is a local.
        let r = unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::new(
                ErrorKind::Io,
                format!("cuDevicePrimaryCtxRetain for the cuFile reader of cuda:{ordinal}: {r:?}"),
            ));
        }
        Ok(PrimaryCtx {
            dev,
            ctx: ctx as usize,
        })
    }

    /// Makes the context current on the calling thread.
    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is a primary context this value retains.
        let r = unsafe { sys::cuCtxSetCurrent(self.ctx as sys::CUcontext) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Io, format!("cuCtxSetCurrent: {r:?}")))
        }
    }
}

impl Drop for PrimaryCtx {
    fn drop(&mut self) {
        // SAFETY: retained in PrimaryCtx::retain, released once.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

/// One file registered with cuFile. Holds the file open (the registration refers to its
/// descriptor); deregistered when the last user drops it.
struct Registered {
    /// `CUfileHandle_t` as an address.
    handle: usize,
    deregister: HandleDeregisterFn,
    /// Dropped after the deregistration, so the descriptor outlives its handle.
    file: File,
}

impl Drop for Registered {
    fn drop(&mut self) {
        // SAFETY: registered in CufileReader::handle_for and deregistered once, here; no read uses
        // it (readers hold an Arc to it for the duration of a call).
        unsafe { (self.deregister)(self.handle as CuFileHandle) };
    }
}

/// Registered files by [`File::id`], with the tick of their last use (for eviction).
#[derive(Default)]
struct HandleCache {
    map: HashMap<u64, (Arc<Registered>, u64)>,
    tick: u64,
}

/// Reads files straight into one GPU's memory through cuFile. Made by
/// [`Device::direct_reader`](crate::device::Device::direct_reader) of a
/// [`CudaDevice`](crate::cuda::CudaDevice) where [`status`] says cuFile is usable.
pub struct CufileReader {
    ordinal: usize,
    driver: &'static Driver,
    /// Declared before `ctx`: handles are deregistered before the context is released.
    handles: Mutex<HandleCache>,
    ctx: PrimaryCtx,
}

impl fmt::Debug for CufileReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CufileReader")
            .field("device", &format_args!("cuda:{}", self.ordinal))
            .field("nvidia_fs", &self.driver.nvidia_fs)
            .field("registered_files", &self.registered_files())
            .finish()
    }
}

/// cuFile reads need the `O_DIRECT` descriptor; a buffered file is refused so the caller stages it.
fn require_direct(file: &File) -> Result<()> {
    if file.is_direct() {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unsupported,
        format!(
            "cuFile reads need a file opened with O_DIRECT, and this one is buffered ({}); stage it through host memory instead",
            file.direct_reason()
        ),
    )
    .with_op(Op::Read)
    .with_path(file.path()))
}

impl CufileReader {
    /// A reader into GPU `ordinal` (driver device `dev`): retains the GPU's primary context and opens
    /// the cuFile driver (once per process). Fails with [`ErrorKind::Unsupported`], saying why, where
    /// there is no CUDA driver, no GPU or no usable libcufile; never panics.
    pub fn new(ordinal: usize, dev: i32) -> Result<CufileReader> {
        let cuda = crate::cuda::driver_status();
        if !cuda.available {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("cuFile on cuda:{ordinal} needs a GPU: {}", cuda.reason),
            ));
        }
        // Load libcufile before touching the GPU, so its absence is the error reported.
        let lib = library();
        if lib.handle == 0 {
            return Err(Error::new(ErrorKind::Unsupported, not_found_reason(lib)));
        }
        let ctx = PrimaryCtx::retain(ordinal, dev)?;
        ctx.bind()?;
        let driver = driver().map_err(|e| e.with_context(format!("cuFile on cuda:{ordinal}")))?;
        Ok(CufileReader {
            ordinal,
            driver,
            handles: Mutex::new(HandleCache::default()),
            ctx,
        })
    }

    /// Files registered with cuFile now (at most [`HANDLES_MAX`]).
    pub fn registered_files(&self) -> usize {
        self.handles.lock().map.len()
    }

    /// Deregisters `file` (once no read uses it) and lets go of its descriptor; whether it was
    /// registered.
    pub fn release(&self, file: &File) -> bool {
        self.handles.lock().map.remove(&file.id()).is_some()
    }

    /// The registration of `file`, made on first use. Registration happens under the cache lock,
    /// so one file is never registered twice.
    fn handle_for(&self, file: &File) -> Result<Arc<Registered>> {
        let mut cache = self.handles.lock();
        cache.tick += 1;
        let tick = cache.tick;
        if let Some((reg, used)) = cache.map.get_mut(&file.id()) {
            *used = tick;
            return Ok(reg.clone());
        }
        if cache.map.len() >= HANDLES_MAX {
            let oldest = cache.map.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(&id) = oldest.map(|(id, _)| id) {
                // Dropping our Arc deregisters it now, or when the last read using it returns.
                cache.map.remove(&id);
            }
        }
        // SAFETY: an all-zero CUfileDescr_t is valid (integers, a union of int and pointer, and a
        // null pointer); cufile.h users memset it to zero the same way.
        let mut descr: CuFileDescr = unsafe { std::mem::zeroed() };
        descr.kind = CU_FILE_HANDLE_TYPE_OPAQUE_FD;
        descr.handle = CuFileDescrHandle { fd: file.fast_fd() };
        descr.fs_ops = std::ptr::null();
        let mut handle: CuFileHandle = std::ptr::null_mut();
        // SAFETY: both pointers are valid locals for the call; the descriptor is an open O_DIRECT
        // fd (checked by the caller) kept open by the `file` clone stored with the handle.
        let r = unsafe { (self.driver.register)(&mut handle, &mut descr) };
        if r.err != 0 {
            return Err(register_error(r.err, r.cu_err)
                .with_op(Op::Open)
                .with_path(file.path()));
        }
        let reg = Arc::new(Registered {
            handle: handle as usize,
            deregister: self.driver.deregister,
            file: file.clone(),
        });
        cache.map.insert(file.id(), (reg.clone(), tick));
        Ok(reg)
    }
}

impl DirectRead for CufileReader {
    fn bypasses_host(&self) -> bool {
        self.driver.nvidia_fs
    }

    fn describe(&self) -> String {
        if self.driver.nvidia_fs {
            "cuFile (GPUDirect Storage)".into()
        } else {
            "cuFile (compatibility mode: nvidia-fs not loaded, bytes go through host memory)".into()
        }
    }

    unsafe fn read(&self, file: &File, offset: u64, dst: DevicePtr, len: usize) -> Result<usize> {
        require_direct(file)?;
        if len == 0 {
            return Ok(0);
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(Error::invalid(format!(
                "{len} bytes at offset {offset} run past the largest file offset"
            ))
            .with_path(file.path()));
        }
        self.ctx.bind()?;
        let reg = self.handle_for(file)?;
        debug_assert_eq!(reg.file.id(), file.id());
        let mut done = 0usize;
        let mut interrupted = 0u32;
        // Every pass makes progress, ends the loop, or uses up one of a bounded number of retries.
        while done < len {
            let want = (len - done).min(READ_CALL_MAX);
            let at = offset + done as u64;
            // SAFETY: the handle is registered (and kept so by `reg`); the caller promises
            // dst..dst+len is a live allocation of this reader's GPU that nothing else touches
            // during the call, and done + want <= len; offsets fit off_t (checked above).
            let r = unsafe {
                (self.driver.read)(
                    reg.handle as CuFileHandle,
                    dst as usize as *mut c_void,
                    want,
                    at as libc::off_t,
                    done as libc::off_t,
                )
            };
            if r > 0 {
                let n = r as usize;
                if n > want {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("cuFileRead returned {n} bytes for a read of {want}"),
                    )
                    .with_op(Op::Read)
                    .with_path(file.path())
                    .with_range(at, want as u64));
                }
                done += n;
                continue;
            }
            if r == 0 {
                break; // end of file
            }
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if r == -1 && errno == libc::EINTR && interrupted < EINTR_RETRIES_MAX {
                interrupted += 1;
                continue;
            }
            return Err(read_failure(r, errno)
                .with_path(file.path())
                .with_range(at, (len - done) as u64)
                .with_context(format!("cuFile read into cuda:{}", self.ordinal)));
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn abi_layouts_match_cufile_h_on_lp64() {
        // CUfileDescr_t: enum (4) + padding (4) + union { int; void * } (8) + pointer (8).
        assert_eq!(size_of::<CuFileDescr>(), 24);
        assert_eq!(align_of::<CuFileDescr>(), 8);
        assert_eq!(offset_of!(CuFileDescr, kind), 0);
        assert_eq!(offset_of!(CuFileDescr, handle), 8);
        assert_eq!(offset_of!(CuFileDescr, fs_ops), 16);
        assert_eq!(size_of::<CuFileDescrHandle>(), 8);
        assert_eq!(align_of::<CuFileDescrHandle>(), 8);
        // CUfileError_t: two C enums.
        assert_eq!(size_of::<CuFileError>(), 8);
        assert_eq!(align_of::<CuFileError>(), 4);
        assert_eq!(offset_of!(CuFileError, cu_err), 4);
        // cuFileRead's off_t is 64-bit, its ssize_t pointer-sized.
        assert_eq!(size_of::<libc::off_t>(), 8);
        assert_eq!(size_of::<isize>(), size_of::<libc::ssize_t>());
        assert_eq!(CU_FILE_HANDLE_TYPE_OPAQUE_FD, 1);
    }

    #[test]
    fn the_fd_lands_in_the_first_bytes_of_the_union() {
        // SAFETY: all-zero is a valid descriptor (see handle_for).
        let mut d: CuFileDescr = unsafe { std::mem::zeroed() };
        d.handle = CuFileDescrHandle { fd: 0x1234_5678 };
        // SAFETY: d is a live, initialized 24-byte value; read as bytes.
        let bytes: [u8; size_of::<CuFileDescr>()] = unsafe { std::mem::transmute(d) };
        let at = offset_of!(CuFileDescr, handle);
        assert_eq!(&bytes[at..at + 4], &0x1234_5678i32.to_ne_bytes());
    }

    #[test]
    fn op_error_table_is_sorted_unique_and_from_the_header() {
        for w in OP_ERRORS.windows(2) {
            assert!(w[0].0 < w[1].0, "{} then {}", w[0].0, w[1].0);
        }
        assert_eq!(
            op_error(5001),
            Some((
                "CU_FILE_DRIVER_NOT_INITIALIZED",
                "nvidia-fs driver is not loaded"
            ))
        );
        assert_eq!(op_error(5020).map(|e| e.0), Some("CU_FILE_DIO_NOT_SET"));
        assert_eq!(op_error(5034).map(|e| e.0), Some("CU_FILE_IO_DISABLED"));
        assert_eq!(op_error(5032), None, "5032 is not in cufile.h");
        assert_eq!(op_error(0), None);
        for (code, name, _) in OP_ERRORS {
            assert!(code > CUFILEOP_BASE_ERR as i32 && name.starts_with("CU_FILE_"));
        }
    }

    #[test]
    fn errors_carry_the_number_name_and_a_kind() {
        let e = cufile_error("cuFileHandleRegister", 5020, 0);
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let s = e.to_string();
        assert!(
            s.contains("5020") && s.contains("CU_FILE_DIO_NOT_SET"),
            "{s}"
        );
        // A filesystem cuFile cannot serve: the automatic path stages instead of failing.
        let e = register_error(5027, 0);
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(
            e.to_string().contains("CU_FILE_HANDLE_NOT_REGISTERED"),
            "{e}"
        );
        assert_eq!(register_error(5025, 0).kind(), ErrorKind::PermissionDenied);
        let e = cufile_error("cuFileRead", 5011, 700);
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("CUDA result 700"), "{e}");
        let e = cufile_error("cuFileRead", 5999, 0);
        assert!(e.to_string().contains("5999"), "{e}");

        let e = read_failure(-5012, 0);
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(
            e.to_string().contains("CU_FILE_CUDA_POINTER_INVALID"),
            "{e}"
        );
        let e = read_failure(-1, libc::EIO);
        assert_eq!((e.kind(), e.errno()), (ErrorKind::Io, Some(libc::EIO)));
        let e = read_failure(-(libc::EINVAL as isize), 0);
        assert_eq!(
            (e.kind(), e.errno()),
            (ErrorKind::InvalidInput, Some(libc::EINVAL))
        );
    }

    #[test]
    fn buffered_files_are_refused_direct_ones_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let buffered = gpuio::OpenOptions::read()
            .direct(gpuio::DirectMode::Off)
            .open(&path)
            .unwrap();
        let e = require_direct(&buffered).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert_eq!(e.path(), Some(path.as_path()));
        assert!(e.to_string().contains("O_DIRECT"), "{e}");
        match gpuio::OpenOptions::read()
            .direct(gpuio::DirectMode::On)
            .open(&path)
        {
            Ok(direct) => require_direct(&direct).unwrap(),
            Err(e) => eprintln!("skipping the O_DIRECT half: {e}"),
        }
    }

    #[test]
    fn without_libcufile_status_is_unusable_and_names_the_library() {
        let st = status();
        if library().handle != 0 {
            eprintln!("skipped: libcufile is installed here ({:?})", st.library);
            return;
        }
        assert!(!st.usable);
        assert_eq!(st.library, None);
        assert!(
            st.reasons.iter().any(|r| r.contains("libcufile.so.0")),
            "{:?}",
            st.reasons
        );
    }

    #[test]
    fn without_a_gpu_the_cuda_reader_path_is_an_error_not_a_panic() {
        match crate::cuda::CudaDevice::open(0) {
            Ok(d) => {
                eprintln!("skipped: a GPU is present ({})", d.name());
                return;
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}"),
        }
        let e = CufileReader::new(0, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(!e.to_string().is_empty());
        assert!(driver().is_err(), "the cuFile driver opened without a GPU");
    }
}
