//! Compiles `device/gpuio.cuh` (through `device/rings_test.cu`, which instantiates all of it) to PTX
//! with NVRTC for compute_80 and compute_90, and checks the PTX with ptxas for sm_80 and sm_90 — no
//! GPU needed. NVRTC is the `nvidia-cuda-nvrtc` pip wheel (or `NVRTC=/path/to/libnvrtc.so.N`); ptxas
//! comes from the `nvidia-cuda-nvcc` wheel (or `PTXAS=/path/to/ptxas`). Where either is missing the
//! step is skipped and the reason printed. Also checks that the header's constants are the ones
//! `src/rings/layout.rs` and `src/rings/line.rs` define.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

use gpuio_cuda::rings::kernels::{CacheArg, QueueArg, WORKLOADS_PTX};
use gpuio_cuda::rings::{code, layout, line};

const HEADER: &str = include_str!("../device/gpuio.cuh");
const KERNELS: &str = include_str!("../device/rings_test.cu");
const WORKLOADS: &str = include_str!("../device/workloads.cu");

fn site_dirs() -> Vec<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import site,sys; print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]+sys.path))",
        ])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Files under `dir/nvidia/*/{sub}` whose name starts with `prefix`.
fn wheel_files(sub: &str, prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for d in site_dirs() {
        let Ok(rd) = std::fs::read_dir(d.join("nvidia")) else {
            continue;
        };
        for pkg in rd.flatten() {
            let Ok(files) = std::fs::read_dir(pkg.path().join(sub)) else {
                continue;
            };
            for f in files.flatten() {
                if f.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(f.path());
                }
            }
        }
    }
    found.sort();
    found
}

fn find_nvrtc() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVRTC") {
        return Some(PathBuf::from(p));
    }
    wheel_files("lib", "libnvrtc.so.").into_iter().last()
}

fn find_ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PTXAS") {
        return Some(PathBuf::from(p));
    }
    wheel_files("bin", "ptxas").into_iter().next()
}

type Prog = *mut c_void;

type CreateFn = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type TextFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;

struct Nvrtc {
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: TextFn,
    ptx_size: SizeFn,
    ptx: TextFn,
    destroy: DestroyFn,
}

fn dlopen(path: &Path) -> Result<*mut c_void, String> {
    let c = CString::new(path.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; the handle is never closed (the library stays for the process).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a C string or null.
        let e = unsafe { libc::dlerror() };
        let why = if e.is_null() {
            "unknown".to_string()
        } else {
            // SAFETY: non-null C string from dlerror.
            unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
        };
        return Err(format!("dlopen {}: {why}", path.display()));
    }
    Ok(h)
}

fn load_nvrtc(path: &Path) -> Result<Nvrtc, String> {
    // libnvrtc loads its builtins library by name: load it first by path so that lookup finds it.
    if let Some(dir) = path.parent() {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for f in rd.flatten() {
                if f.file_name()
                    .to_string_lossy()
                    .starts_with("libnvrtc-builtins.so")
                {
                    let _ = dlopen(&f.path());
                }
            }
        }
    }
    let h = dlopen(path)?;
    let sym = |name: &str| -> Result<*mut c_void, String> {
        let c = CString::new(name).unwrap();
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(h, c.as_ptr()) };
        if p.is_null() {
            Err(format!("{name} not found in {}", path.display()))
        } else {
            Ok(p)
        }
    };
    // SAFETY: each symbol has the NVRTC C API signature named by the field it is cast to.
    unsafe {
        Ok(Nvrtc {
            create: std::mem::transmute::<*mut c_void, CreateFn>(sym("nvrtcCreateProgram")?),
            compile: std::mem::transmute::<*mut c_void, CompileFn>(sym("nvrtcCompileProgram")?),
            log_size: std::mem::transmute::<*mut c_void, SizeFn>(sym("nvrtcGetProgramLogSize")?),
            log: std::mem::transmute::<*mut c_void, TextFn>(sym("nvrtcGetProgramLog")?),
            ptx_size: std::mem::transmute::<*mut c_void, SizeFn>(sym("nvrtcGetPTXSize")?),
            ptx: std::mem::transmute::<*mut c_void, TextFn>(sym("nvrtcGetPTX")?),
            destroy: std::mem::transmute::<*mut c_void, DestroyFn>(sym("nvrtcDestroyProgram")?),
        })
    }
}

fn compile(n: &Nvrtc, arch: &str) -> Result<String, String> {
    compile_source(n, arch, "rings_test.cu", KERNELS)
}

fn compile_source(n: &Nvrtc, arch: &str, file: &str, source: &str) -> Result<String, String> {
    let src = CString::new(source).unwrap();
    let name = CString::new(file).unwrap();
    let hdr = CString::new(HEADER).unwrap();
    let hdr_name = CString::new("gpuio.cuh").unwrap();
    let headers = [hdr.as_ptr()];
    let names = [hdr_name.as_ptr()];
    let opts: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
    ]
    .into_iter()
    .map(|s| CString::new(s).unwrap())
    .collect();
    let optp: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: Prog = std::ptr::null_mut();
    // SAFETY: all strings are NUL-terminated and outlive the calls; `prog` is an out-parameter.
    unsafe {
        let r = (n.create)(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            names.as_ptr(),
        );
        if r != 0 {
            return Err(format!("nvrtcCreateProgram: {r}"));
        }
        let r = (n.compile)(prog, optp.len() as c_int, optp.as_ptr());
        let mut len = 0usize;
        (n.log_size)(prog, &mut len);
        let mut log = vec![0u8; len.max(1)];
        (n.log)(prog, log.as_mut_ptr() as *mut c_char);
        let log = String::from_utf8_lossy(&log)
            .trim_end_matches('\0')
            .to_string();
        if r != 0 {
            (n.destroy)(&mut prog);
            return Err(format!("NVRTC ({arch}) failed:\n{log}"));
        }
        (n.ptx_size)(prog, &mut len);
        let mut ptx = vec![0u8; len];
        (n.ptx)(prog, ptx.as_mut_ptr() as *mut c_char);
        (n.destroy)(&mut prog);
        Ok(String::from_utf8_lossy(&ptx)
            .trim_end_matches('\0')
            .to_string())
    }
}

/// Assembles `ptx` with `ptxas` for `sm` (files `NAME-SM.ptx` / `.cubin` in `dir`); fails the test
/// with ptxas's message if it refuses.
fn assemble(ptxas: &Path, dir: &Path, name: &str, ptx: &str, sm: &str) {
    let p = dir.join(format!("{name}-{sm}.ptx"));
    std::fs::write(&p, ptx).unwrap();
    let out = std::process::Command::new(ptxas)
        .arg(format!("-arch={sm}"))
        .arg(&p)
        .arg("-o")
        .arg(dir.join(format!("{name}-{sm}.cubin")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ptxas {name} {sm}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn header_constants_match_the_rust_layout() {
    let has = |s: &str| assert!(HEADER.contains(s), "gpuio.cuh lacks `{s}`");
    has(&format!("MAGIC = {:#010x}u", layout::MAGIC));
    has(&format!("DEVICE_MAGIC = {:#010x}u", layout::DEVICE_MAGIC));
    has(&format!("VERSION_MAJOR = {}", layout::VERSION_MAJOR));
    has(&format!("VERSION_MINOR = {}", layout::VERSION_MINOR));
    has(&format!(
        "SLOT_FREE = {}, SLOT_CLAIMED = {}, SLOT_SUBMITTED = {}",
        layout::SLOT_FREE,
        layout::SLOT_CLAIMED,
        layout::SLOT_SUBMITTED
    ));
    has(&format!(
        "OP_READ = {}, OP_WRITE = {}, OP_FLUSH = {}, OP_FSYNC = {}",
        layout::OP_READ,
        layout::OP_WRITE,
        layout::OP_FLUSH,
        layout::OP_FSYNC
    ));
    for (n, v) in [
        ("E_IO", code::EIO),
        ("E_BADF", code::EBADF),
        ("E_AGAIN", code::EAGAIN),
        ("E_ACCES", code::EACCES),
        ("E_FAULT", code::EFAULT),
        ("E_BUSY", code::EBUSY),
        ("E_INVAL", code::EINVAL),
        ("E_NOSPC", code::ENOSPC),
        ("E_RANGE", code::ERANGE),
        ("E_NODATA", code::ENODATA),
        ("E_OVERFLOW", code::EOVERFLOW),
        ("E_SHUTDOWN", code::ESHUTDOWN),
        ("E_TIMEDOUT", code::ETIMEDOUT),
        ("E_CANCELED", code::ECANCELED),
    ] {
        has(&format!("{n} = {v}"));
    }
    has(&format!("PIN_MASK = {:#06X}u", line::PIN_MASK).replace("0X", "0x"));
    has(&format!("STATE_SHIFT = {}", line::STATE_SHIFT));
    has(&format!("REF = 1u << {}", line::REF.trailing_zeros()));
    has(&format!(
        "CLAIM_ATTEMPTS = {}",
        gpuio_cuda::rings::producer::CLAIM_ATTEMPTS
    ));
    has("static_assert(sizeof(RequestSlot) == 64");
    has("static_assert(sizeof(RegionHeader) == 128");
}

#[test]
fn gpuio_cuh_compiles_with_nvrtc_and_passes_ptxas() {
    let Some(lib) = find_nvrtc() else {
        eprintln!(
            "skipped: no NVRTC (pip install nvidia-cuda-nvrtc, or set NVRTC=/path/to/libnvrtc.so)"
        );
        return;
    };
    let n = match load_nvrtc(&lib) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("skipped: NVRTC at {} does not load: {e}", lib.display());
            return;
        }
    };
    let ptxas = find_ptxas();
    if ptxas.is_none() {
        eprintln!("ptxas step skipped: no ptxas (pip install nvidia-cuda-nvcc, or set PTXAS=...)");
    }
    let dir = tempfile::tempdir().unwrap();
    for (arch, sm) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        let ptx = compile(&n, arch).unwrap_or_else(|e| panic!("{e}"));
        for k in [
            "gpuio_rings_gather",
            "gpuio_rings_prefetch",
            "gpuio_rings_scale",
            "gpuio_rings_flush",
            "gpuio_rings_raw_reads",
        ] {
            assert!(ptx.contains(&format!(".entry {k}")), "{arch}: no entry {k}");
        }
        assert!(
            ptx.contains("st.release.sys"),
            "{arch}: the release store of the slot state"
        );
        assert!(ptx.contains("match.any.sync"), "{arch}: warp coalescing");
        assert!(ptx.contains("nanosleep"), "{arch}: bounded backoff");
        eprintln!(
            "NVRTC {}: {arch} ok ({} bytes of PTX)",
            lib.display(),
            ptx.len()
        );
        if let Some(ptxas) = &ptxas {
            assemble(ptxas, dir.path(), "rings_test", &ptx, sm);
            eprintln!("ptxas {}: {sm} ok", ptxas.display());
        }
    }
}

/// `static_assert`s that the device structs a kernel takes by value have the Rust structs' sizes and
/// field offsets (`src/rings/kernels.rs` builds them byte for byte).
fn layout_asserts() -> String {
    use std::mem::{offset_of, size_of};
    let mut out = String::from("#include \"gpuio.cuh\"\n");
    let mut a = |ty: &str, field: &str, off: usize| {
        out.push_str(&format!(
            "static_assert(__builtin_offsetof({ty}, {field}) == {off}, \"{ty}::{field} at {off}\");\n"
        ));
    };
    a("gpuio::Queue", "header", offset_of!(QueueArg, header));
    a("gpuio::Queue", "slots", offset_of!(QueueArg, slots));
    a("gpuio::Queue", "tails", offset_of!(QueueArg, tails));
    a(
        "gpuio::Queue",
        "completions",
        offset_of!(QueueArg, completions),
    );
    a(
        "gpuio::Queue",
        "ring_count",
        offset_of!(QueueArg, ring_count),
    );
    a(
        "gpuio::Queue",
        "slots_per_ring",
        offset_of!(QueueArg, slots_per_ring),
    );
    a(
        "gpuio::Queue",
        "completion_count",
        offset_of!(QueueArg, completion_count),
    );
    a(
        "gpuio::RingTail",
        "tail",
        offset_of!(layout::RingTail, tail),
    );
    a(
        "gpuio::RingTail",
        "taken",
        offset_of!(layout::RingTail, taken),
    );
    a("gpuio::CacheDesc", "q", offset_of!(CacheArg, q));
    a("gpuio::CacheDesc", "page", offset_of!(CacheArg, page));
    a("gpuio::CacheDesc", "slot_of", offset_of!(CacheArg, slot_of));
    a("gpuio::CacheDesc", "owner", offset_of!(CacheArg, owner));
    a("gpuio::CacheDesc", "hand", offset_of!(CacheArg, hand));
    a("gpuio::CacheDesc", "tags", offset_of!(CacheArg, tags));
    a("gpuio::CacheDesc", "lines", offset_of!(CacheArg, lines));
    a(
        "gpuio::CacheDesc",
        "file_bytes",
        offset_of!(CacheArg, file_bytes),
    );
    a("gpuio::CacheDesc", "pages", offset_of!(CacheArg, pages));
    a("gpuio::CacheDesc", "slots", offset_of!(CacheArg, slots));
    a(
        "gpuio::CacheDesc",
        "line_bytes",
        offset_of!(CacheArg, line_bytes),
    );
    a("gpuio::CacheDesc", "file_id", offset_of!(CacheArg, file_id));
    a(
        "gpuio::CacheDesc",
        "completion_base",
        offset_of!(CacheArg, completion_base),
    );
    for (ty, size) in [
        ("gpuio::Queue", size_of::<QueueArg>()),
        ("gpuio::CacheDesc", size_of::<CacheArg>()),
        ("gpuio::RingTail", size_of::<layout::RingTail>()),
        ("gpuio::array<unsigned int>", size_of::<CacheArg>()),
    ] {
        out.push_str(&format!(
            "static_assert(sizeof({ty}) == {size}, \"sizeof({ty}) == {size}\");\n"
        ));
    }
    out.push_str("extern \"C\" __global__ void layout_check() {}\n");
    out
}

/// The workload kernels compile from source and pass ptxas, their argument structs have the Rust
/// layout, and the embedded PTX (`device/workloads.ptx`) has every entry the host launches at an
/// ISA version older drivers accept.
#[test]
fn workloads_compile_and_their_arguments_match_the_rust_layout() {
    for e in gpuio_cuda::rings::kernels::ENTRIES {
        assert!(
            WORKLOADS_PTX.contains(&format!(".entry {e}(")),
            "the embedded PTX lacks {e}: regenerate it with scripts/gen-ptx.sh"
        );
        assert!(
            WORKLOADS.contains(&format!("void {e}(")),
            "workloads.cu lacks {e}"
        );
    }
    // And the other way: every kernel of the PTX is loaded. The BFS kernel once was not, so its
    // launch failed on the GPU with "was not loaded with this module" (docs/gpu-runs/2026-11-28-h200-run5).
    let in_ptx: Vec<&str> = WORKLOADS_PTX
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap().trim())
        .collect();
    assert_eq!(
        in_ptx.len(),
        gpuio_cuda::rings::kernels::ENTRIES.len(),
        "{in_ptx:?}"
    );
    for e in &in_ptx {
        assert!(
            gpuio_cuda::rings::kernels::ENTRIES.contains(e),
            "{e} is in workloads.ptx but not in kernels::ENTRIES: Workloads::load would not load it"
        );
    }
    assert!(WORKLOADS_PTX.contains(".version 7.0"));
    let Some(lib) = find_nvrtc() else {
        eprintln!(
            "skipped the compile: no NVRTC (pip install nvidia-cuda-nvrtc, or set NVRTC=/path/to/libnvrtc.so)"
        );
        return;
    };
    let n = match load_nvrtc(&lib) {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "skipped the compile: NVRTC at {} does not load: {e}",
                lib.display()
            );
            return;
        }
    };
    let asserts = layout_asserts();
    let dir = tempfile::tempdir().unwrap();
    for (arch, sm) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        compile_source(&n, arch, "layout_check.cu", &asserts).unwrap_or_else(|e| panic!("{e}"));
        let ptx =
            compile_source(&n, arch, "workloads.cu", WORKLOADS).unwrap_or_else(|e| panic!("{e}"));
        for e in gpuio_cuda::rings::kernels::ENTRIES {
            assert!(
                ptx.contains(&format!(".entry {e}(")),
                "{arch}: no entry {e}"
            );
        }
        if let Some(ptxas) = find_ptxas() {
            assemble(&ptxas, dir.path(), "workloads", &ptx, sm);
        }
    }
}
