//! GPUDirect Storage (cuFile) status: whether `libcufile` can be loaded and its driver opened here,
//! and why not. CUDA images ship `libcufile.so.0` (cudarc looks only for unversioned and `.so.N`
//! names that do not include it), so the library is opened by hand, versioned name first.
//!
//! Only the status probe is here so far; the cuFile read path (`cuFileHandleRegister`,
//! `cuFileBufRegister`, `cuFileRead`) is to be added and measured on a GPU machine.

use std::ffi::{c_int, c_void, CStr, CString};

/// Library names tried, in order (CUDA images and the nvidia-cufile wheels ship the versioned one).
pub const LIBRARY_NAMES: [&str; 2] = ["libcufile.so.0", "libcufile.so"];

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

/// `CUfileError_t`: the cuFile status and, for CUDA failures, the driver's result.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct CuFileError {
    err: c_int,
    cu_err: c_int,
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

/// Probes libcufile: loads it, and when a GPU is usable opens and closes the cuFile driver.
pub fn status() -> CufileStatus {
    let mut st = CufileStatus {
        library: None,
        usable: false,
        nvidia_fs: std::path::Path::new("/proc/driver/nvidia-fs").exists(),
        reasons: Vec::new(),
    };
    let mut handle = std::ptr::null_mut();
    let mut errors = Vec::new();
    for name in LIBRARY_NAMES {
        let c = CString::new(name).expect("static names have no NUL");
        // SAFETY: dlopen of a library name; RTLD_LOCAL keeps its symbols to us.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            let why = dlerror_text();
            if !why.contains("No such file") {
                errors.push(why);
            }
        } else {
            handle = h;
            st.library = Some(name.to_string());
            break;
        }
    }
    if handle.is_null() {
        let mut why = format!(
            "libcufile not found (looked for {}): GPUDirect Storage unavailable; loads are staged",
            LIBRARY_NAMES.join(", ")
        );
        if !errors.is_empty() {
            why.push_str(&format!(" ({})", errors.join("; ")));
        }
        st.reasons.push(why);
        return st;
    }
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
    let sym = |n: &str| {
        let c = CString::new(n).expect("static names have no NUL");
        // SAFETY: handle is a live library handle (never closed: cuFile keeps global state).
        unsafe { libc::dlsym(handle, c.as_ptr()) }
    };
    let (open, close) = (sym("cuFileDriverOpen"), sym("cuFileDriverClose_v2"));
    let close = if close.is_null() {
        sym("cuFileDriverClose")
    } else {
        close
    };
    if open.is_null() || close.is_null() {
        st.reasons
            .push("libcufile lacks cuFileDriverOpen/cuFileDriverClose".into());
        return st;
    }
    type OpenFn = unsafe extern "C" fn() -> CuFileError;
    // SAFETY: the symbols have these C signatures in every cuFile release (cufile.h).
    let (open, close): (OpenFn, OpenFn) = unsafe {
        (
            std::mem::transmute::<*mut c_void, OpenFn>(open),
            std::mem::transmute::<*mut c_void, OpenFn>(close),
        )
    };
    // SAFETY: no arguments; the driver library is loaded and initialized.
    let r = unsafe { open() };
    if r.err != 0 {
        st.reasons.push(format!(
            "cuFileDriverOpen failed: cuFile error {} (CUDA result {}); see /etc/cufile.json and cufile.log",
            r.err, r.cu_err
        ));
        return st;
    }
    // SAFETY: opened just above.
    unsafe { close() };
    st.usable = true;
    st.reasons.push(format!(
        "cuFileDriverOpen succeeded with {}{}",
        st.library.as_deref().unwrap_or("libcufile"),
        if st.nvidia_fs {
            ""
        } else {
            " (compatibility mode)"
        }
    ));
    st
}
