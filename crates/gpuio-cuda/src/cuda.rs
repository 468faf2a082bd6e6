//! The real device: an NVIDIA GPU through the CUDA driver API, loaded at run time (cudarc with
//! `dynamic-loading`), so this crate builds and its tests run where CUDA is absent.
//!
//! Every entry point first checks that the driver library can be loaded ([`driver_status`]); cudarc
//! itself would panic on the first call otherwise. Missing library, no GPU, an out-of-range ordinal
//! or a failing `cuInit` each become an [`ErrorKind::Unsupported`] error naming what was looked for.
//! A failed allocation is [`ErrorKind::OutOfMemory`].
//!
//! The copy stream is a non-blocking CUDA stream (its host → device copies run on the copy engines,
//! leaving the SMs to kernels, finding 493); each copy records an event, which is its [`Ticket`].
//!
//! Stream-ordered value writes (`cuStreamWriteValue64_v2`, or the v1 `cuStreamWriteValue64`) are
//! optional driver symbols: they are looked up in the loaded library by hand (cudarc's wrapper
//! panics on a missing symbol) and used only where the device's attribute says they work
//! ([`CudaDevice::stream_write_u64`] says which, or why not).

use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;
use gpuio::{Error, ErrorKind, Result};

use crate::device::{
    CopyStream, DeliveryDesc, Device, DevicePtr, HostToDevice, KernelModule, MemInfo, Pinned,
    Ticket,
};

/// Most copies a stream keeps events for before it waits on the oldest (bounds the event pool).
const EVENTS_MAX: usize = 256;

/// What the driver library looks like here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverStatus {
    /// Whether libcuda could be loaded and initialized.
    pub available: bool,
    /// Driver API version (`13000` for 13.0), when loaded.
    pub version: Option<i32>,
    /// Number of GPUs the driver sees.
    pub devices: usize,
    /// Why not, or what was found.
    pub reason: String,
}

/// The library names cudarc tries for the driver, versioned first as CUDA images ship them.
pub fn driver_library_names() -> Vec<String> {
    let mut names = Vec::new();
    for n in cudarc::get_lib_name_candidates("cuda") {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    // The names a Linux driver install actually has first (libcuda.so.1 is what the driver ships).
    names.sort_by_key(|n| match n.as_str() {
        "libcuda.so.1" => 0,
        "libcuda.so" => 1,
        _ => 2,
    });
    names
}

pub(crate) fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let e = cudarc::driver::DriverError(r);
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{r:?}"));
    let kind = match r {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::OutOfMemory,
        sys::CUresult::CUDA_ERROR_NO_DEVICE
        | sys::CUresult::CUDA_ERROR_INVALID_DEVICE
        | sys::CUresult::CUDA_ERROR_NOT_SUPPORTED
        | sys::CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => ErrorKind::Unsupported,
        sys::CUresult::CUDA_ERROR_INVALID_VALUE => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    };
    Err(Error::new(kind, format!("{what}: {text} ({r:?})")))
}

/// Loads and initializes the driver once; the outcome (with its reason) is remembered.
pub fn driver_status() -> DriverStatus {
    static STATUS: OnceLock<DriverStatus> = OnceLock::new();
    STATUS
        .get_or_init(|| {
            // SAFETY: only tries to dlopen candidate names; never calls into the library.
            if !unsafe { sys::is_culib_present() } {
                let names: Vec<String> = driver_library_names()
                    .into_iter()
                    .filter(|n| n.starts_with("libcuda.so"))
                    .collect();
                return DriverStatus {
                    available: false,
                    version: None,
                    devices: 0,
                    reason: format!(
                        "the CUDA driver library was not found (looked for {}; install the NVIDIA driver or add its directory to LD_LIBRARY_PATH)",
                        names.join(", ")
                    ),
                };
            }
            // SAFETY: the library is present; cuInit and the queries only write their out-params.
            unsafe {
                if let Err(e) = check(sys::cuInit(0), "cuInit") {
                    return DriverStatus {
                        available: false,
                        version: None,
                        devices: 0,
                        reason: format!("libcuda loaded but the driver did not initialize: {e}"),
                    };
                }
                let mut v = 0;
                let version = check(sys::cuDriverGetVersion(&mut v), "cuDriverGetVersion")
                    .ok()
                    .map(|_| v);
                let mut n = 0;
                let devices = match check(sys::cuDeviceGetCount(&mut n), "cuDeviceGetCount") {
                    Ok(()) => n.max(0) as usize,
                    Err(_) => 0,
                };
                DriverStatus {
                    available: devices > 0,
                    version,
                    devices,
                    reason: if devices > 0 {
                        format!("libcuda loaded, driver API {}, {devices} GPU(s)", fmt_version(version))
                    } else {
                        format!("libcuda loaded (driver API {}) but it sees no GPU", fmt_version(version))
                    },
                }
            }
        })
        .clone()
}

/// `13.0` from `13000`.
pub fn fmt_version(v: Option<i32>) -> String {
    match v {
        Some(v) => format!("{}.{}", v / 1000, (v % 1000) / 10),
        None => "unknown".into(),
    }
}

/// `cuStreamWriteValue64_v2` / `cuStreamWriteValue64`: `(stream, addr, value, flags)` (cuda.h).
type WriteValue64Fn = unsafe extern "C" fn(
    sys::CUstream,
    sys::CUdeviceptr,
    sys::cuuint64_t,
    std::ffi::c_uint,
) -> sys::CUresult;

/// `CU_STREAM_WRITE_VALUE_DEFAULT`: the write waits for the stream's earlier work and flushes its
/// memory writes first (CUDA driver API, "Stream Memory Operations").
const CU_STREAM_WRITE_VALUE_DEFAULT: std::ffi::c_uint = 0;

/// A usable stream write: the entry point and the name it was found under.
#[derive(Clone, Copy)]
struct StreamWrite {
    f: WriteValue64Fn,
    symbol: &'static str,
}

/// One GPU, through its primary context.
pub struct CudaDevice {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    name: String,
    version: Option<i32>,
    /// Probed on first use: the stream write to use, or why there is none.
    stream_write: OnceLock<std::result::Result<StreamWrite, String>>,
}

// SAFETY: a CUDA context may be used from any thread once made current there; every method makes it
// current first.
unsafe impl Send for CudaDevice {}
// SAFETY: as above; the driver API is thread-safe.
unsafe impl Sync for CudaDevice {}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .finish()
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Fails with [`ErrorKind::Unsupported`] (naming the libraries looked for)
    /// where there is no driver or no such GPU; never panics.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let st = driver_status();
        if !st.available {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("cuda:{ordinal} is unavailable: {}", st.reason),
            ));
        }
        if ordinal >= st.devices {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cuda:{ordinal} does not exist: the driver sees {} GPU(s) (cuda:0..cuda:{})",
                    st.devices,
                    st.devices.saturating_sub(1)
                ),
            ));
        }
        // SAFETY: the driver is initialized (driver_status); out-params are valid locals.
        unsafe {
            let mut dev = 0;
            check(sys::cuDeviceGet(&mut dev, ordinal as i32), "cuDeviceGet")?;
            let mut name = [0 as std::ffi::c_char; 256];
            check(
                sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev),
                "cuDeviceGetName",
            )?;
            let name = std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned();
            let mut ctx = std::ptr::null_mut();
            check(
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            Ok(Arc::new(CudaDevice {
                ordinal,
                dev,
                ctx,
                name,
                version: st.version,
                stream_write: OnceLock::new(),
            }))
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the programmed-I/O copy kernel loads here (the driver JIT-compiles the embedded PTX),
    /// or the driver's reason it does not.
    pub fn pio_status(&self) -> std::result::Result<(), String> {
        self.bind().map_err(|e| e.to_string())?;
        let k = crate::kernel::CopyKernel::load().map_err(|e| e.to_string())?;
        // SAFETY: loaded just above into this (current) context and never launched.
        unsafe { k.unload() };
        Ok(())
    }

    /// Whether the device can map host memory registered read-only (what zero-copy mapping of a
    /// read-only file needs: `CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED`).
    pub fn read_only_mapping_supported(&self) -> bool {
        let mut v = 0;
        // SAFETY: out-param is a local; dev is a valid device of an initialized driver.
        let r = unsafe {
            sys::cuDeviceGetAttribute(
                &mut v,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED,
                self.dev,
            )
        };
        r == sys::CUresult::CUDA_SUCCESS && v != 0
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is the retained primary context of a live device.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    /// An integer attribute of this device, or the driver's refusal.
    fn attribute(&self, a: sys::CUdevice_attribute) -> std::result::Result<i32, String> {
        let mut v = 0;
        // SAFETY: out-param is a local; dev is a valid device of an initialized driver.
        let r = unsafe { sys::cuDeviceGetAttribute(&mut v, a, self.dev) };
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(v)
        } else {
            Err(format!("cuDeviceGetAttribute({a:?}) failed ({r:?})"))
        }
    }

    /// Which stream write works here, probed once: `cuStreamWriteValue64_v2` (CUDA 11.7+) where
    /// `CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS` (122 in CUDA 12's cuda.h; `_V2` in 11.7
    /// and 11.8) is set; else the v1 `cuStreamWriteValue64` where both v1 attributes
    /// (`CAN_USE_STREAM_MEM_OPS_V1` = 92, `CAN_USE_64_BIT_STREAM_MEM_OPS_V1` = 93) are set (the v1
    /// memory operations are off unless the nvidia module was loaded with
    /// `NVreg_EnableStreamMemOPs=1`); else the reasons neither is usable.
    fn stream_write(&self) -> &std::result::Result<StreamWrite, String> {
        self.stream_write.get_or_init(|| {
            let lookup = |name: &'static str| -> Option<WriteValue64Fn> {
                // SAFETY: the driver library is loaded and initialized (this device exists); the
                // symbol, where present, has cuda.h's signature, which WriteValue64Fn spells.
                unsafe { sys::culib().get::<WriteValue64Fn>(name.as_bytes()) }
                    .ok()
                    .map(|s| *s)
            };
            let mut why = Vec::new();
            use sys::CUdevice_attribute as A;
            match lookup("cuStreamWriteValue64_v2") {
                Some(f) => match self.attribute(A::CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS) {
                    Ok(v) if v != 0 => {
                        return Ok(StreamWrite {
                            f,
                            symbol: "cuStreamWriteValue64_v2",
                        })
                    }
                    Ok(_) => why.push("the driver has cuStreamWriteValue64_v2 but CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS (122) is 0 on this device".to_string()),
                    Err(e) => why.push(e),
                },
                None => why.push("the driver has no cuStreamWriteValue64_v2 (CUDA 11.7+)".into()),
            }
            match lookup("cuStreamWriteValue64") {
                Some(f) => {
                    let ops = self.attribute(A::CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1);
                    let ops64 =
                        self.attribute(A::CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS_V1);
                    match (ops, ops64) {
                        (Ok(a), Ok(b)) if a != 0 && b != 0 => {
                            return Ok(StreamWrite {
                                f,
                                symbol: "cuStreamWriteValue64",
                            })
                        }
                        (Ok(a), Ok(b)) => why.push(format!(
                            "the v1 cuStreamWriteValue64 needs CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 (92) and CAN_USE_64_BIT_STREAM_MEM_OPS_V1 (93), which are {a} and {b} (the v1 memory operations are off unless the nvidia module is loaded with NVreg_EnableStreamMemOPs=1)"
                        )),
                        (Err(e), _) | (_, Err(e)) => why.push(e),
                    }
                }
                None => why.push("nor the v1 cuStreamWriteValue64".into()),
            }
            Err(why.join("; "))
        })
    }

    /// Whether the GPU can map page-locked host memory (`CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY`).
    pub fn maps_host_memory(&self) -> std::result::Result<bool, String> {
        self.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)
            .map(|v| v != 0)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: retained in open.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

impl Device for CudaDevice {
    fn label(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }
    fn description(&self) -> String {
        format!("{}, driver API {}", self.name, fmt_version(self.version))
    }
    fn alloc_raw(&self, bytes: usize) -> Result<DevicePtr> {
        self.bind()?;
        let mut p = 0;
        // SAFETY: out-param is a local.
        check(unsafe { sys::cuMemAlloc_v2(&mut p, bytes) }, "cuMemAlloc").map_err(|e| {
            e.with_context(format!("allocating {bytes} bytes on cuda:{}", self.ordinal))
        })?;
        Ok(p)
    }
    unsafe fn free_raw(&self, ptr: DevicePtr, _bytes: usize) {
        if self.bind().is_ok() {
            // SAFETY: the caller promises ptr is a live allocation with no pending copies.
            unsafe { sys::cuMemFree_v2(ptr) };
        }
    }
    unsafe fn pin_host(&self, ptr: *mut u8, len: usize) -> Result<Option<Pinned>> {
        self.bind()?;
        // PORTABLE: usable from every context; DEVICEMAP: kernels may read it in place (the
        // programmed-I/O copy). Not WRITECOMBINED: the CPU reads staging buffers when it decompresses
        // pack chunks into them.
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
        check(
            // SAFETY: the caller keeps the range allocated until unpin_host.
            unsafe { sys::cuMemHostRegister_v2(ptr as *mut c_void, len, flags) },
            "cuMemHostRegister(PORTABLE | DEVICEMAP)",
        )?;
        let mut d = 0;
        // SAFETY: registered just above; out-param is a local.
        let mapped = check(
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, ptr as *mut c_void, 0) },
            "cuMemHostGetDevicePointer",
        )
        .ok()
        .map(|_| d);
        Ok(Some(Pinned { mapped }))
    }
    unsafe fn unpin_host(&self, ptr: *mut u8, _len: usize) {
        if self.bind().is_ok() {
            // SAFETY: registered by pin_host / map_host_read_only.
            unsafe { sys::cuMemHostUnregister(ptr as *mut c_void) };
        }
    }
    fn copy_stream(&self) -> Result<Box<dyn CopyStream>> {
        // The stream holds the primary context itself: a loader may outlive its last device handle,
        // and the context (with the stream, its events and its module) dies with the last release.
        let mut ctx = std::ptr::null_mut();
        check(
            // SAFETY: out-param is a local; dev is a valid device of an initialized driver.
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, self.dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        let release = || {
            // SAFETY: retained just above.
            unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
        };
        // SAFETY: ctx was just retained.
        if let Err(e) = check(unsafe { sys::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent") {
            release();
            return Err(e);
        }
        let mut s = std::ptr::null_mut();
        let created = check(
            // SAFETY: out-param is a local.
            unsafe {
                sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
            },
            "cuStreamCreate",
        );
        if let Err(e) = created {
            release();
            return Err(e);
        }
        Ok(Box::new(CudaStream {
            ctx,
            dev: self.dev,
            write: self.stream_write().clone(),
            kernel: None,
            stream: s,
            pending: VecDeque::new(),
            spare: Vec::new(),
            next: 1,
            done: 0,
        }))
    }
    fn load_module(&self, ptx: &str, entries: &[&str]) -> Result<Box<dyn KernelModule>> {
        Ok(Box::new(crate::module::CudaModule::load(
            self.dev,
            self.ordinal,
            ptx,
            entries,
        )?))
    }
    unsafe fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        check(
            // SAFETY: the caller promises the device range is live and quiet; dst is a valid slice.
            unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr() as *mut c_void, src, dst.len()) },
            "cuMemcpyDtoH",
        )
    }
    fn mem_info(&self) -> Result<MemInfo> {
        self.bind()?;
        let (mut free, mut total) = (0, 0);
        check(
            // SAFETY: out-params are locals.
            unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
            "cuMemGetInfo",
        )?;
        Ok(MemInfo {
            free_bytes: free as u64,
            total_bytes: total as u64,
        })
    }
    unsafe fn map_host_read_only(&self, ptr: *const u8, len: usize) -> Result<DevicePtr> {
        self.bind()?;
        if !self.read_only_mapping_supported() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "cuda:{} cannot map host memory read-only (CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED is 0), which a zero-copy mapping of a read-only file needs; copy it instead (--path staged)",
                    self.ordinal
                ),
            ));
        }
        let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_READ_ONLY;
        // SAFETY: the caller keeps the range mapped; the driver pins it and maps it for the device.
        unsafe {
            check(
                sys::cuMemHostRegister_v2(ptr as *mut c_void, len, flags),
                "cuMemHostRegister(DEVICEMAP | READ_ONLY)",
            )
            .map_err(|e| {
                e.with_context(format!(
                    "mapping {len} bytes of host memory read-only into cuda:{}",
                    self.ordinal
                ))
            })?;
            let mut d = 0;
            if let Err(e) = check(
                sys::cuMemHostGetDevicePointer_v2(&mut d, ptr as *mut c_void, 0),
                "cuMemHostGetDevicePointer",
            ) {
                sys::cuMemHostUnregister(ptr as *mut c_void);
                return Err(e);
            }
            Ok(d)
        }
    }
    unsafe fn unmap_host(&self, ptr: *const u8, _len: usize) {
        if self.bind().is_ok() {
            // SAFETY: registered by map_host_read_only.
            unsafe { sys::cuMemHostUnregister(ptr as *mut c_void) };
        }
    }
    fn direct_reader_slower(&self) -> Option<String> {
        (!crate::cufile::nvidia_fs_loaded()).then(|| {
            "cuFile would run in compatibility mode (the nvidia-fs module is not loaded: /proc/driver/nvidia-fs is absent), through host memory, which is slower than staging; the cuFile driver was not opened".to_string()
        })
    }
    fn direct_reader(&self) -> std::result::Result<Arc<dyn crate::device::DirectRead>, String> {
        // The reader opens the cuFile driver itself (once per process) and says why when it cannot;
        // probing with `cufile::status()` first would open and close it once more.
        crate::cufile::CufileReader::new(self.ordinal, self.dev)
            .map(|r| Arc::new(r) as Arc<dyn crate::device::DirectRead>)
            .map_err(|e| e.to_string())
    }
    fn stream_write_u64(&self) -> std::result::Result<String, String> {
        self.stream_write()
            .as_ref()
            .map(|w| {
                format!(
                    "{} on the copy stream: the GPU writes the word after the stream's earlier copies, with no host wait",
                    w.symbol
                )
            })
            .map_err(Clone::clone)
    }
    fn can_map_host_memory(&self) -> std::result::Result<bool, String> {
        self.maps_host_memory()
    }
}

/// A non-blocking stream and the events recorded after its copies. It holds a reference to the
/// device's primary context (released last in Drop) and its own copy kernel module.
struct CudaStream {
    ctx: sys::CUcontext,
    dev: sys::CUdevice,
    /// The stream write to use, or why there is none (the device's probe).
    write: std::result::Result<StreamWrite, String>,
    /// The programmed-I/O kernel, loaded on first use (or the reason it could not be).
    kernel: Option<std::result::Result<crate::kernel::CopyKernel, Error>>,
    stream: sys::CUstream,
    /// (ticket, event) of copies not yet known to be done, in order.
    pending: VecDeque<(Ticket, sys::CUevent)>,
    spare: Vec<sys::CUevent>,
    next: Ticket,
    done: Ticket,
}

// SAFETY: CUDA streams and events may be used from any thread with the context current.
unsafe impl Send for CudaStream {}

impl fmt::Debug for CudaStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaStream")
            .field("next", &self.next)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl CudaStream {
    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is the primary context this stream retained.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }
    /// The deliveries kernel's function, its module loaded into the context on first use (made
    /// current first).
    fn deliver_function(&mut self) -> Result<sys::CUfunction> {
        self.bind()?;
        match self
            .kernel
            .get_or_insert_with(crate::kernel::CopyKernel::load)
        {
            Ok(k) => Ok(k.deliver_function()),
            Err(e) => Err(e.clone()),
        }
    }
    fn event(&mut self) -> Result<sys::CUevent> {
        if let Some(e) = self.spare.pop() {
            return Ok(e);
        }
        let mut e = std::ptr::null_mut();
        check(
            // SAFETY: out-param is a local.
            unsafe {
                sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            },
            "cuEventCreate",
        )?;
        Ok(e)
    }
    /// Retires pending events up to `ticket`, waiting (`block`) or only polling.
    fn retire(&mut self, ticket: Ticket, block: bool) -> Result<bool> {
        self.bind()?;
        while self.done < ticket {
            let Some(&(t, ev)) = self.pending.front() else {
                return Ok(true);
            };
            // SAFETY: ev is a live event owned by this stream.
            let r = unsafe {
                if block {
                    sys::cuEventSynchronize(ev)
                } else {
                    sys::cuEventQuery(ev)
                }
            };
            if r == sys::CUresult::CUDA_ERROR_NOT_READY {
                return Ok(false);
            }
            check(r, "waiting for a host-to-device copy")?;
            self.pending.pop_front();
            self.spare.push(ev);
            self.done = t;
        }
        Ok(true)
    }
}

impl CudaStream {
    /// Queues `op` (which enqueues work on `self.stream`, any number of operations) followed by one
    /// event: the work's ticket. The context is bound once for all of it.
    fn enqueue(&mut self, op: impl FnOnce(sys::CUstream) -> Result<()>) -> Result<Ticket> {
        self.bind()?;
        if self.pending.len() >= EVENTS_MAX {
            let oldest = self.pending.front().map_or(0, |p| p.0);
            self.retire(oldest, true)?;
        }
        let ev = self.event()?;
        if let Err(e) = op(self.stream) {
            self.spare.push(ev);
            return Err(e);
        }
        // SAFETY: a live event and stream.
        let recorded = unsafe { sys::cuEventRecord(ev, self.stream) };
        if let Err(e) = check(recorded, "cuEventRecord") {
            self.spare.push(ev);
            return Err(e);
        }
        let t = self.next;
        self.next += 1;
        self.pending.push_back((t, ev));
        Ok(t)
    }
}

impl CopyStream for CudaStream {
    unsafe fn copy_h2d_async(
        &mut self,
        src: *const u8,
        len: usize,
        dst: DevicePtr,
    ) -> Result<Ticket> {
        self.enqueue(|s| {
            // SAFETY: the caller keeps src valid until the ticket completes and dst inside an
            // allocation.
            check(
                unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, s) },
                "cuMemcpyHtoDAsync",
            )
        })
    }
    unsafe fn copy_d2h_async(
        &mut self,
        src: DevicePtr,
        dst: *mut u8,
        len: usize,
    ) -> Result<Ticket> {
        self.enqueue(|s| {
            // SAFETY: the caller keeps dst valid and src inside an allocation until the ticket
            // completes.
            check(
                unsafe { sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, s) },
                "cuMemcpyDtoHAsync",
            )
        })
    }
    unsafe fn copy_h2d_mapped_async(
        &mut self,
        _src_host: *const u8,
        src_mapped: DevicePtr,
        len: usize,
        dst: DevicePtr,
    ) -> Result<Ticket> {
        // The kernel is loaded into the current context: make it this stream's first.
        self.bind()?;
        let kernel = match self
            .kernel
            .get_or_insert_with(crate::kernel::CopyKernel::load)
        {
            Ok(k) => k.function(),
            Err(e) => return Err(e.clone()),
        };
        self.enqueue(|s| {
            // SAFETY: src_mapped is the device address of pinned, mapped host memory the caller keeps
            // valid; dst lies inside an allocation; the kernel touches exactly len bytes of each.
            unsafe { crate::kernel::launch(kernel, s, src_mapped, dst, len as u64) }
        })
    }
    unsafe fn copy_h2d_many(&mut self, copies: &[HostToDevice]) -> Result<Option<Ticket>> {
        if copies.is_empty() {
            return Ok(None);
        }
        // One context bind and one event for the lot: per copy only the driver's own call.
        self.enqueue(|s| {
            for c in copies {
                // SAFETY: per the caller, each source stays valid until the ticket completes and
                // each destination lies inside an allocation.
                let r =
                    unsafe { sys::cuMemcpyHtoDAsync_v2(c.dst, c.src as *const c_void, c.len, s) };
                check(r, "cuMemcpyHtoDAsync")?;
            }
            Ok(())
        })
        .map(Some)
    }
    unsafe fn write_u64_many(&mut self, words: &[(DevicePtr, u64)]) -> Result<Option<Ticket>> {
        if words.is_empty() {
            return Ok(None);
        }
        let w = match &self.write {
            Ok(w) => *w,
            Err(why) => return Err(Error::new(ErrorKind::Unsupported, why.clone())),
        };
        self.enqueue(|s| {
            for &(dst, value) in words {
                // SAFETY: per the caller, each dst..dst+8 lies in a live allocation, 8-aligned; the
                // entry point was found in the loaded driver and its device attribute checked.
                let r = unsafe { (w.f)(s, dst, value, CU_STREAM_WRITE_VALUE_DEFAULT) };
                check(r, w.symbol)?;
            }
            Ok(())
        })
        .map(Some)
    }
    unsafe fn deliver_async(
        &mut self,
        _descs_host: *const DeliveryDesc,
        descs_mapped: DevicePtr,
        n: usize,
    ) -> Result<Ticket> {
        let n = u32::try_from(n)
            .map_err(|_| Error::invalid(format!("{n} deliveries in one launch")))?;
        let kernel = self.deliver_function()?;
        self.enqueue(|s| {
            // SAFETY: per the caller, the descriptors (mapped pinned host memory) and what they name
            // stay valid until the ticket completes.
            unsafe { crate::kernel::launch_deliver(kernel, s, descs_mapped, n) }
        })
    }
    unsafe fn write_u64_async(&mut self, dst: DevicePtr, value: u64) -> Result<Ticket> {
        let w = match &self.write {
            Ok(w) => *w,
            Err(why) => return Err(Error::new(ErrorKind::Unsupported, why.clone())),
        };
        self.enqueue(|s| {
            // SAFETY: the caller promises dst..dst+8 lies in a live allocation, 8-aligned; the entry
            // point was found in the loaded driver and its device attribute checked.
            check(
                unsafe { (w.f)(s, dst, value, CU_STREAM_WRITE_VALUE_DEFAULT) },
                w.symbol,
            )
        })
    }
    fn preload_deliver(&mut self) -> Result<()> {
        // An empty launch (it reads no descriptor) makes the driver load the code now, while no
        // kernel of ours is waiting on this stream.
        // SAFETY: zero deliveries: the launch touches no memory.
        let t = unsafe { self.deliver_async(std::ptr::null(), 0, 0)? };
        self.wait(t)
    }
    fn is_done(&mut self, ticket: Ticket) -> Result<bool> {
        self.retire(ticket, false)
    }
    fn wait(&mut self, ticket: Ticket) -> Result<()> {
        self.retire(ticket, true).map(|_| ())
    }
    fn synchronize(&mut self) -> Result<()> {
        self.bind()?;
        check(
            // SAFETY: a live stream.
            unsafe { sys::cuStreamSynchronize(self.stream) },
            "cuStreamSynchronize",
        )?;
        self.retire(self.next - 1, true).map(|_| ())
    }
}

impl Drop for CudaStream {
    fn drop(&mut self) {
        if self.bind().is_err() {
            // SAFETY: retained in copy_stream; nothing else of this stream can be freed without it.
            unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
            return;
        }
        // SAFETY: a live stream and its events in the context this stream retained; synchronize
        // first so no copy reads freed memory and no launch of the kernel is still queued; the
        // context is released last.
        unsafe {
            sys::cuStreamSynchronize(self.stream);
            for (_, e) in self.pending.drain(..) {
                sys::cuEventDestroy_v2(e);
            }
            for e in self.spare.drain(..) {
                sys::cuEventDestroy_v2(e);
            }
            sys::cuStreamDestroy_v2(self.stream);
            if let Some(Ok(k)) = self.kernel.take() {
                k.unload();
            }
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}
