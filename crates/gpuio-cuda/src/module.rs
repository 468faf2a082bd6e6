//! Kernels of a PTX module on a GPU ([`Device::load_module`](crate::Device::load_module) for
//! [`CudaDevice`](crate::cuda::CudaDevice)): the module JIT-compiled into the device's primary
//! context, its entry points looked up once, and launches queued on a stream of the module's own.
//!
//! The module holds its own reference on the primary context (as copy streams do), so it may outlive
//! the device handle. Waiting is bounded: [`KernelModule::synchronize`] polls the stream until a
//! deadline. A module whose kernel is still running when it is dropped (a wait that timed out) is
//! leaked with its stream and context reference: unloading code under a running kernel is undefined.
//! This module never decides what a kernel does; see `rings::kernels` for the ring workloads.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use gpuio::{Error, ErrorKind, Result};

use crate::cuda::check;
use crate::device::KernelModule;

/// A loaded module and its stream.
#[derive(Debug)]
pub(crate) struct CudaModule {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    module: sys::CUmodule,
    stream: sys::CUstream,
    functions: HashMap<String, sys::CUfunction>,
    /// Kernels were queued and not yet seen finished.
    running: bool,
}

// SAFETY: the handles are valid from any thread once the context is current there; every method
// makes it current first, and `&mut self` serializes launches and waits.
unsafe impl Send for CudaModule {}

impl CudaModule {
    pub(crate) fn load(
        dev: sys::CUdevice,
        ordinal: usize,
        ptx: &str,
        entries: &[&str],
    ) -> Result<CudaModule> {
        let mut ctx = std::ptr::null_mut();
        check(
            // SAFETY: out-param is a local; `dev` is a device of an initialized driver.
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
            "cuDevicePrimaryCtxRetain",
        )?;
        let mut m = CudaModule {
            ordinal,
            dev,
            ctx,
            module: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            functions: HashMap::new(),
            running: false,
        };
        // From here on, Drop releases whatever was made.
        m.bind()?;
        let image = CString::new(ptx)
            .map_err(|_| Error::invalid("a PTX image must not contain NUL bytes"))?;
        let unsupported = |what: &str, e: Error| {
            Error::new(
                ErrorKind::Unsupported,
                format!("cuda:{ordinal} cannot load the kernels: {what}: {e}"),
            )
        };
        check(
            // SAFETY: a NUL-terminated PTX image; out-param is a field.
            unsafe { sys::cuModuleLoadData(&mut m.module, image.as_ptr() as *const c_void) },
            "cuModuleLoadData (PTX JIT)",
        )
        .map_err(|e| unsupported("the driver refused the PTX", e))?;
        for &name in entries {
            let c = CString::new(name).map_err(|_| Error::invalid("a kernel name with NUL"))?;
            let mut f = std::ptr::null_mut();
            check(
                // SAFETY: a loaded module; out-param is a local.
                unsafe { sys::cuModuleGetFunction(&mut f, m.module, c.as_ptr()) },
                "cuModuleGetFunction",
            )
            .map_err(|e| unsupported(&format!("no entry `{name}`"), e))?;
            m.functions.insert(name.to_string(), f);
        }
        check(
            // SAFETY: out-param is a field.
            unsafe {
                sys::cuStreamCreate(
                    &mut m.stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                )
            },
            "cuStreamCreate",
        )?;
        Ok(m)
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: a context this module retained.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }
}

impl KernelModule for CudaModule {
    unsafe fn launch(
        &mut self,
        entry: &str,
        grid: u32,
        block: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let f = *self.functions.get(entry).ok_or_else(|| {
            Error::invalid(format!("kernel `{entry}` was not loaded with this module"))
        })?;
        self.bind()?;
        check(
            // SAFETY: per the caller, `params` matches the kernel's signature and the memory it
            // names outlives the launch; the function and stream belong to this module's context.
            unsafe {
                sys::cuLaunchKernel(
                    f,
                    grid.max(1),
                    1,
                    1,
                    block.max(1),
                    1,
                    1,
                    0,
                    self.stream,
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
        .map_err(|e| {
            e.with_context(format!(
                "launching {entry} on cuda:{} ({grid} blocks of {block})",
                self.ordinal
            ))
        })?;
        self.running = true;
        Ok(())
    }

    fn synchronize(&mut self, timeout: Duration) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        self.bind()?;
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_micros(20);
        loop {
            // SAFETY: a live stream of this context.
            let r = unsafe { sys::cuStreamQuery(self.stream) };
            if r != sys::CUresult::CUDA_ERROR_NOT_READY {
                self.running = false;
                return check(r, "a kernel on cuda's stream").map_err(|e| {
                    e.with_context(format!("a kernel on cuda:{} failed", self.ordinal))
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "the kernels on cuda:{} did not finish within {:.1} s",
                        self.ordinal,
                        timeout.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(2));
        }
    }

    fn running(&self) -> bool {
        self.running
    }
}

impl Drop for CudaModule {
    fn drop(&mut self) {
        if self.running {
            // A kernel that failed counts as finished; one still running after the wait is not.
            let _ = self.synchronize(Duration::from_secs(10));
            if self.running {
                // Leak the module, the stream and the context reference.
                return;
            }
        }
        if self.bind().is_err() {
            // SAFETY: retained in `load`.
            unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
            return;
        }
        // SAFETY: nothing of this module is queued any more; each handle is destroyed once, the
        // context reference released last.
        unsafe {
            if !self.stream.is_null() {
                sys::cuStreamDestroy_v2(self.stream);
            }
            if !self.module.is_null() {
                sys::cuModuleUnload(self.module);
            }
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}
