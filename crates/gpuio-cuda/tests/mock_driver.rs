//! The real-GPU code (`gpuio_cuda::cuda`, `gpuio_cuda::kernel`) run against a mock CUDA driver.
//!
//! `tests/mock_libcuda.c` is a small C library exporting exactly the driver entry points this crate
//! calls through cudarc, with host memory standing in for the GPU. It checks the host-side wiring:
//! a context current on the calling thread, device addresses inside live allocations (device and
//! mapped addresses are deliberately not host addresses), flags from the documented sets, kernel
//! parameters and launch geometry, event and stream handles. Queued work runs only when something
//! waits for it, so a staging buffer reused before its copy was waited for shows up as wrong bytes.
//! It is *not* a GPU: the kernel is a memcpy, nothing runs in parallel, timings mean nothing, and it
//! says nothing about the PTX (see `kernel::tests` for that).
//!
//! cudarc loads the driver once per process and `driver_status()` is cached per process, so each
//! scenario runs in a child process: the parent test compiles the mock with `cc` into a temporary
//! directory as `libcuda.so.1` (plus a `libcuda.so` link), then re-runs this test executable with
//! `LD_LIBRARY_PATH` pointing there, `GPUIO_MOCK_CHILD=1`, and `--exact child_<scenario>`.

use std::ffi::{c_char, c_long, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

mod common;

use common::{check_model, crc, random_model};
use gpuio::backend::BackendKind;
use gpuio::{DirectMode, Engine, ErrorKind, OpenOptions};
use gpuio_cuda::cuda::{driver_status, CudaDevice};
use gpuio_cuda::sweep::{pio_dma_sweep, sizes_up_to};
use gpuio_cuda::{Device, DeviceBuffer, LoadPath, Loader, LoaderConfig, PathChoice};

/// Set in the child processes only; the `child_*` tests do nothing without it.
const CHILD_ENV: &str = "GPUIO_MOCK_CHILD";

// ---- parent side: build the mock, run one child scenario under it ----

/// Compiles the mock into `dir`; `None` (saying why) where there is no C compiler.
fn build_mock(dir: &Path) -> Option<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mock_libcuda.c");
    let lib = dir.join("libcuda.so.1");
    let out = match Command::new("cc")
        .args([
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wl,-soname,libcuda.so.1",
            "-o",
        ])
        .arg(&lib)
        .arg(&src)
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var("GPUIO_REQUIRE_CC").is_ok_and(|v| v == "1") => {
            panic!("GPUIO_REQUIRE_CC=1 but the C compiler `cc` cannot run: {e}")
        }
        Err(e) => {
            eprintln!(
                "skipped: no C compiler `cc` to build the mock libcuda ({e}); set GPUIO_REQUIRE_CC=1 to fail instead"
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "building the mock libcuda failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // cudarc tries `libcuda.so` first: the same file, so both names are one loaded library.
    std::os::unix::fs::symlink("libcuda.so.1", dir.join("libcuda.so")).unwrap();
    Some(())
}

/// Runs `child` in a child process under the mock (with `env` set from the start) and asserts that
/// it ran and passed.
fn run_child(child: &str, env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    if build_mock(dir.path()).is_none() {
        return;
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", child, "--nocapture", "--test-threads", "1"])
        .env("LD_LIBRARY_PATH", dir.path())
        .env(CHILD_ENV, "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{child} failed under the mock driver ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // A filter that matched nothing also "succeeds": make sure the scenario really ran.
    assert!(
        stdout.contains("1 passed"),
        "{child} did not run in the child:\n{stdout}\n{stderr}"
    );
}

#[test]
fn mock_open_and_status() {
    run_child("child_open_and_status", &[]);
}

#[test]
fn mock_staged_load_dma() {
    run_child("child_staged_load_dma", &[]);
}

#[test]
fn mock_staged_load_pio() {
    run_child("child_staged_load_pio", &[]);
}

#[test]
fn mock_zero_copy() {
    run_child("child_zero_copy", &[]);
}

#[test]
fn mock_store_round_trip() {
    run_child("child_store_round_trip", &[]);
}

#[test]
fn mock_pio_dma_sweep() {
    run_child("child_pio_dma_sweep", &[]);
}

#[test]
fn mock_out_of_memory() {
    run_child("child_out_of_memory", &[("MOCK_CUDA_MEM_LIMIT", "200000")]);
}

/// The real-GPU cases of `tests/gpu.rs`, verbatim, under the mock driver.
#[test]
fn mock_runs_the_gpu_cases() {
    run_child("child_gpu_cases", &[("MOCK_CUDA_MEM_LIMIT", "268435456")]);
}

/// Regression: the copy kernel's handle was cached per context address and outlived the primary
/// context's reset on its last release (a stale handle on the next open).
#[test]
fn mock_reopen_after_last_release() {
    run_child("child_reopen_after_last_release", &[]);
}

/// Regression: a loader holding the last device handle released the primary context before its
/// stream, which then destroyed its stream and events in a reset context.
#[test]
fn mock_loader_holds_the_last_device_handle() {
    run_child("child_loader_holds_the_last_device_handle", &[]);
}

// ---- child side ----

/// Whether this process is a child started by [`run_child`]. The `child_*` tests return at once
/// (passing, doing nothing) in a normal test run, where no mock driver is loaded.
fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The loaded mock library (the one cudarc opened), for its counters.
fn mock() -> *mut libc::c_void {
    // SAFETY: RTLD_NOLOAD only looks the library up among those already loaded.
    let lib = unsafe { libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    assert!(!lib.is_null(), "libcuda is not loaded in this process");
    lib
}

fn counter(name: &str) -> i64 {
    let sym = CString::new(name).unwrap();
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    let f = unsafe { libc::dlsym(mock(), sym.as_ptr()) };
    assert!(
        !f.is_null(),
        "{name} missing: the loaded libcuda is not the mock"
    );
    // SAFETY: every mock_* counter is `long f(void)`.
    let f: extern "C" fn() -> c_long = unsafe { std::mem::transmute(f) };
    f() as i64
}

/// The mock's account of the last call it refused.
fn last_bad() -> String {
    // SAFETY: as in `counter`; mock_last_bad is `const char *f(void)` returning a static string.
    unsafe {
        let f = libc::dlsym(mock(), c"mock_last_bad".as_ptr());
        assert!(!f.is_null());
        let f: extern "C" fn() -> *const c_char = std::mem::transmute(f);
        CStr::from_ptr(f()).to_string_lossy().into_owned()
    }
}

/// No call was refused and no queued copy touched memory outside an allocation.
fn assert_clean_calls() {
    assert_eq!(counter("mock_bad_calls"), 0, "refused call: {}", last_bad());
    assert_eq!(counter("mock_faults"), 0, "a queued copy faulted");
}

/// Everything the device handed out has been given back.
fn assert_all_released() {
    assert_eq!(counter("mock_allocated_bytes"), 0, "device memory leaked");
    assert_eq!(counter("mock_registered"), 0, "host memory left registered");
    assert_eq!(counter("mock_live_streams"), 0, "stream leaked");
    assert_eq!(counter("mock_live_events"), 0, "event leaked");
    assert_eq!(counter("mock_live_modules"), 0, "kernel module left loaded");
}

fn open() -> Arc<dyn Device> {
    CudaDevice::open(0).unwrap()
}

fn engine() -> Engine {
    gpuio_testkit::engine(BackendKind::Threads).unwrap()
}

fn cfg(buffers: usize, pio_max_bytes: usize) -> LoaderConfig {
    LoaderConfig {
        staging_buffers: buffers,
        staging_bytes: 64 << 10,
        pio_max_bytes,
        path: PathChoice::Staged,
        ..LoaderConfig::default()
    }
}

#[test]
fn child_gpu_cases() {
    if !is_child() {
        return;
    }
    let device = open();
    let engine = engine();
    common::gpu_cases::staged_loads_with_dma_and_programmed_io(&device, &engine);
    common::gpu_cases::zero_copy_mapping(&device);
    common::gpu_cases::pio_dma_sweep(&device);
    common::gpu_cases::out_of_device_memory(&device);
    let why = common::gpu_cases::direct_path_where_cufile_works(&device);
    assert!(
        why.is_some(),
        "the mock models no cuFile, yet a direct load ran"
    );
    assert_clean_calls();
}

#[test]
fn child_open_and_status() {
    if !is_child() {
        return;
    }
    let st = driver_status();
    assert!(st.available, "{st:?}");
    assert_eq!((st.version, st.devices), (Some(13000), 1), "{st:?}");
    let e = CudaDevice::open(1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let dev = CudaDevice::open(0).unwrap();
    assert_eq!(dev.name(), "Mock GPU");
    assert_eq!(dev.label(), "cuda:0");
    assert!(dev.description().contains("13.0"), "{}", dev.description());
    assert!(dev.read_only_mapping_supported());
    dev.pio_status().unwrap();
    let m = dev.mem_info().unwrap();
    assert!(m.free_bytes > 0 && m.free_bytes <= m.total_bytes, "{m:?}");
    assert_eq!(counter("mock_ctx_refs"), 1);
    assert_clean_calls();
    drop(dev);
    assert_eq!(counter("mock_ctx_refs"), 0, "primary context not released");
}

#[test]
fn child_staged_load_dma() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let device = open();
    for buffers in 1..=3 {
        let loader = Loader::new(&engine, device.clone(), cfg(buffers, 0)).unwrap();
        assert_eq!(
            counter("mock_registered") as usize,
            buffers,
            "staging not pinned"
        );
        for seed in 0..3u64 {
            let (path, want) = random_model(dir.path(), seed * 10 + buffers as u64, 12, 9000);
            let model = loader.load_safetensors(&path).unwrap();
            assert_eq!(model.stats.path, LoadPath::Staged);
            assert!(model.stats.chunks >= 2, "{:?}", model.stats);
            assert_eq!(model.stats.pio_copies, 0);
            check_model(&model, &want);
        }
        assert_eq!(loader.staging_pool().available(), buffers);
        drop(loader);
        assert_clean_calls();
        assert_all_released();
    }
    assert_eq!(counter("mock_kernel_launches"), 0);
    assert!(counter("mock_dma_copies") > 0);
}

#[test]
fn child_staged_load_pio() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let device = open();
    for buffers in 1..=3 {
        // Every chunk (at most one 64 KiB staging buffer) is small enough for the kernel.
        let loader = Loader::new(&engine, device.clone(), cfg(buffers, 64 << 10)).unwrap();
        for seed in 0..3u64 {
            let (path, want) = random_model(dir.path(), seed * 10 + buffers as u64, 12, 9000);
            let launched = counter("mock_kernel_launches");
            let model = loader.load_safetensors(&path).unwrap();
            check_model(&model, &want);
            assert!(model.stats.pio_copies > 0, "{:?}", model.stats);
            assert_eq!(model.stats.dma_copies, 0, "{:?}", model.stats);
            assert!(model.stats.note.is_empty(), "{}", model.stats.note);
            assert_eq!(
                counter("mock_kernel_launches") - launched,
                model.stats.pio_copies as i64,
                "kernel launches vs PIO copies"
            );
        }
        drop(loader);
        assert_clean_calls();
        assert_all_released();
    }
}

#[test]
fn child_zero_copy() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let device = open();
    let (path, want) = random_model(dir.path(), 3, 10, 5000);
    let mapped = gpuio_cuda::map_safetensors(&device, &path).unwrap();
    assert_eq!(mapped.stats.path, LoadPath::ZeroCopy);
    assert_eq!(counter("mock_registered"), 1);
    for (name, bytes) in &want {
        let t = mapped.tensors.iter().find(|t| &t.name == name).unwrap();
        assert_eq!(mapped.crc32c(t).unwrap(), crc(bytes), "{name}");
    }
    drop(mapped);
    assert_clean_calls();
    assert_all_released();
}

fn open_rw(path: &Path) -> gpuio::File {
    OpenOptions::create()
        .direct(DirectMode::Auto)
        .open(path)
        .unwrap()
}

#[test]
fn child_store_round_trip() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let device = open();
    for buffers in 1..=3 {
        let loader = Loader::new(&engine, device.clone(), cfg(buffers, 0)).unwrap();
        let (path, _) = random_model(dir.path(), 40 + buffers as u64, 12, 9000);
        let model = loader.load_safetensors(&path).unwrap();
        // The whole model back to a file: byte-identical to the one it was loaded from.
        let saved: PathBuf = dir.path().join(format!("saved{buffers}.safetensors"));
        let stats = loader.save_safetensors(&model, &saved).unwrap();
        assert!(stats.chunks >= 2, "{stats:?}");
        assert_eq!(
            std::fs::read(&saved).unwrap(),
            std::fs::read(&path).unwrap()
        );
        // A range at unaligned device and file offsets.
        let file = std::fs::read(&path).unwrap();
        let body = &file[file.len() - model.buffer.len()..];
        let (off, len) = (1234u64, model.buffer.len() as u64 - 5000);
        let out = dir.path().join(format!("range{buffers}"));
        loader
            .store_range(&model.buffer, off, &open_rw(&out), 777, len)
            .unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len() as u64, 777 + len);
        assert!(
            got[777..] == body[off as usize..(off + len) as usize],
            "stored range differs"
        );
        drop(model);
        drop(loader);
        assert_clean_calls();
        assert_all_released();
    }
}

#[test]
fn child_pio_dma_sweep() {
    if !is_child() {
        return;
    }
    let device = open();
    let sizes = sizes_up_to(64 << 10);
    let r = pio_dma_sweep(&device, &sizes, 3).unwrap();
    assert_eq!(r.pio_unavailable, None);
    assert_eq!(r.rows.len(), sizes.len());
    assert!(
        r.rows.iter().all(|row| row.pio_us.is_some()),
        "{:?}",
        r.rows
    );
    assert!(counter("mock_kernel_launches") >= sizes.len() as i64 * 4);
    assert_clean_calls();
    assert_all_released();
}

#[test]
fn child_out_of_memory() {
    if !is_child() {
        return;
    }
    // MOCK_CUDA_MEM_LIMIT=200000 (set by the parent): room for a small model, not a large one.
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let device = open();
    let e = DeviceBuffer::alloc(&device, 200_001).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    let loader = Loader::new(&engine, device.clone(), cfg(2, 0)).unwrap();
    let (small, want) = random_model(dir.path(), 1, 4, 1000);
    assert!(std::fs::metadata(&small).unwrap().len() < 200_000);
    let model = loader.load_safetensors(&small).unwrap();
    check_model(&model, &want);
    let (large, _) = random_model(dir.path(), 2, 12, 20_000);
    assert!(std::fs::metadata(&large).unwrap().len() > 200_000);
    let e = loader.load_safetensors(&large).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    assert_eq!(loader.staging_pool().available(), 2);
    // The failure left the device usable.
    check_model(&model, &want);
    drop(model);
    drop(loader);
    assert_all_released();
}

/// Dropping every handle releases the primary context, which resets it (its modules go with it);
/// a device opened again afterwards must still be able to launch the copy kernel.
#[test]
fn child_reopen_after_last_release() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let (path, want) = random_model(dir.path(), 9, 8, 5000);
    for round in 0..2 {
        let device = open();
        let loader = Loader::new(&engine, device.clone(), cfg(2, 64 << 10)).unwrap();
        let model = loader.load_safetensors(&path).unwrap();
        check_model(&model, &want);
        assert!(
            model.stats.pio_copies > 0,
            "round {round}: {:?}",
            model.stats
        );
        assert!(
            model.stats.note.is_empty(),
            "round {round}: {}",
            model.stats.note
        );
        drop(model);
        // The loader goes first here (see child_loader_holds_the_last_device_handle for the other
        // order).
        drop(loader);
        drop(device);
        assert_eq!(counter("mock_ctx_refs"), 0, "round {round}");
        assert_clean_calls();
        assert_all_released();
    }
}

/// A loader holding the only handle to its device: dropping it must not use the stream after the
/// primary context it lives in was released.
#[test]
fn child_loader_holds_the_last_device_handle() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let (path, want) = random_model(dir.path(), 9, 8, 5000);
    let loader = Loader::new(&engine, open(), cfg(2, 0)).unwrap();
    let model = loader.load_safetensors(&path).unwrap();
    check_model(&model, &want);
    drop(model);
    drop(loader);
    assert_eq!(counter("mock_ctx_refs"), 0);
    assert_clean_calls();
    assert_all_released();
}
