//! The real-GPU code (`gpuio_cuda::cuda`, `gpuio_cuda::kernel`) run against a mock CUDA driver.
//!
//! `tests/mock_libcuda.c` is a small C library exporting exactly the driver entry points this crate
//! calls through cudarc, with host memory standing in for the GPU. It checks the host-side wiring:
//! a context current on the calling thread, device addresses inside live allocations (device and
//! mapped addresses are deliberately not host addresses), flags from the documented sets, kernel
//! parameters and launch geometry, event and stream handles. Queued work runs only when something
//! waits for it, so a staging buffer reused before its copy was waited for shows up as wrong bytes;
//! streams and events die with the context generation they were made in; a queued copy whose
//! page-locked host range was unregistered before it ran is a fault; registrations may not overlap
//! at all; device attributes have an H100's values and an unmodelled one is a refused call.
//! `tests/mock_libcufile.c` beside it models cuFile (compatibility mode: reads through host
//! memory) with injectable refusals (`MOCK_CUFILE_REGISTER_ERROR=5027`) and read errors.
//! It is *not* a GPU: the kernel is a memcpy, nothing runs in parallel, timings mean nothing, and it
//! says nothing about the PTX (see `kernel::tests` for that).
//!
//! cudarc loads the driver once per process and `driver_status()` is cached per process, so each
//! scenario runs in a child process: the parent test compiles the mocks with `cc` into a temporary
//! directory as `libcuda.so.1` (plus a `libcuda.so` link) and `libcufile.so.0`, then re-runs this
//! test executable with `LD_LIBRARY_PATH` pointing there, `GPUIO_MOCK_CHILD=1`, and
//! `--exact child_<scenario>`.

use std::ffi::{c_long, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::mock::{
    assert_all_released, assert_clean_calls, counter, is_child, last_bad, run_child,
};
use common::{check_model, crc, random_model};
use gpuio::backend::BackendKind;
use gpuio::{DirectMode, Engine, ErrorKind, OpenOptions};
use gpuio_cuda::cuda::{driver_status, CudaDevice};
use gpuio_cuda::sweep::{pio_dma_sweep, sizes_up_to};
use gpuio_cuda::{
    open_and_load, Checkpoint, Device, DeviceBuffer, LoadPath, Loader, LoaderConfig, PathChoice,
};

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

/// A sharded checkpoint through one loader, its set-up on a helper thread (which must make the
/// context current itself) or not; every shard's bytes checked; everything released after.
#[test]
fn mock_sharded_checkpoint() {
    run_child("child_sharded_checkpoint", &[]);
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

/// A counter of the loaded mock libcufile.
fn cufile_counter(name: &str) -> i64 {
    // SAFETY: RTLD_NOLOAD only looks the library up among those already loaded.
    let lib = unsafe {
        libc::dlopen(
            c"libcufile.so.0".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_NOLOAD,
        )
    };
    assert!(!lib.is_null(), "libcufile is not loaded in this process");
    let sym = CString::new(name).unwrap();
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    let f = unsafe { libc::dlsym(lib, sym.as_ptr()) };
    assert!(
        !f.is_null(),
        "{name} missing: the loaded libcufile is not the mock"
    );
    // SAFETY: every mock_cufile_* counter is `long f(void)`.
    let f: extern "C" fn() -> c_long = unsafe { std::mem::transmute(f) };
    f() as i64
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
    // The mock cuFile serves the file, so the direct load runs and is checked.
    let why = common::gpu_cases::direct_path_where_cufile_works(&device);
    assert_eq!(
        why, None,
        "the direct load did not run under the mock cuFile"
    );
    assert!(cufile_counter("mock_cufile_reads") > 0);
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
        assert_eq!(loader.staging_pool().unwrap().available(), buffers);
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
    assert_eq!(loader.staging_pool().unwrap().available(), 2);
    // The failure left the device usable.
    check_model(&model, &want);
    drop(model);
    drop(loader);
    assert_all_released();
}

#[test]
fn child_sharded_checkpoint() {
    if !is_child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();
    let device = open();
    let (index, paths, want) = common::random_shards(dir.path(), 40, 4, 10, 9000);
    let ckpt = Checkpoint::open(&[index]).unwrap();
    assert_eq!(ckpt.shards.len(), 4);
    for overlap in [true, false] {
        let (loader, c) = open_and_load(&engine, &device, cfg(3, 0), &ckpt, overlap).unwrap();
        assert_eq!(counter("mock_registered"), 3, "staging pinned once");
        assert_eq!(c.paths, paths);
        assert_eq!(c.tensor_count(), want.len());
        for (name, bytes) in &want {
            let (m, t) = c
                .shards
                .iter()
                .find_map(|m| m.tensors.iter().find(|t| &t.name == name).map(|t| (m, t)))
                .unwrap();
            assert_eq!(m.crc32c(t).unwrap(), crc(bytes), "{name}");
        }
        eprintln!(
            "mock libcuda, {} bytes in 4 shards, overlap {overlap}: {:?}",
            c.bytes(),
            c.phases
        );
        drop((loader, c));
        assert_clean_calls();
        assert_all_released();
    }
    // A corrupt shard is refused before anything is allocated or pinned.
    let mut img = std::fs::read(&paths[2]).unwrap();
    img.truncate(img.len() - 1);
    std::fs::write(&paths[2], &img).unwrap();
    let e = Checkpoint::from_files(&paths).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(counter("mock_allocated_bytes"), 0);
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

// ---- cuFile under the mock libcufile ----

#[test]
fn mock_cufile_direct_load() {
    run_child("child_cufile_direct_load", &[]);
}

#[test]
fn mock_cufile_refuses_a_filesystem() {
    run_child(
        "child_cufile_refuses_a_filesystem",
        &[("MOCK_CUFILE_REGISTER_ERROR", "5027")],
    );
}

#[test]
fn mock_cufile_read_error() {
    run_child(
        "child_cufile_read_error",
        &[("MOCK_CUFILE_READ_ERRNO", "5")],
    );
}

/// A cold model on a disk (cuFile refuses buffered files; a file just written is warm).
fn cold_model(dir: &Path, seed: u64) -> (PathBuf, Vec<(String, Vec<u8>)>, gpuio::File) {
    let (path, want) = random_model(dir, seed, 10, 40_000);
    let file = OpenOptions::read()
        .direct(DirectMode::On)
        .cold(true)
        .open(&path)
        .unwrap();
    (path, want, file)
}

fn direct_loader(engine: &Engine, device: &Arc<dyn Device>) -> Loader {
    let cfg = LoaderConfig {
        path: PathChoice::Direct,
        ..LoaderConfig::default()
    };
    Loader::new(engine, device.clone(), cfg).unwrap()
}

#[test]
fn child_cufile_direct_load() {
    if !is_child() {
        return;
    }
    let st = gpuio_cuda::cufile::status();
    assert!(st.usable, "{st:?}");
    assert_eq!(st.library.as_deref(), Some("libcufile.so.0"));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let engine = engine();
    let device = open();
    let reader = device.direct_reader().unwrap();
    // No nvidia-fs here: compatibility mode, which the automatic choice does not prefer.
    assert!(!reader.bypasses_host(), "{}", reader.describe());
    drop(reader);
    let loader = direct_loader(&engine, &device);
    for seed in 0..3 {
        let (path, want, file) = cold_model(dir.path(), seed);
        let header = gpuio_cuda::safetensors::read_header(&path).unwrap();
        let buf = DeviceBuffer::alloc(&device, header.body_len as usize).unwrap();
        let reads = cufile_counter("mock_cufile_reads");
        let st = loader
            .load_range(&file, header.body_offset, &buf, 0, header.body_len)
            .unwrap();
        assert_eq!(st.path, LoadPath::Direct, "{}", st.note);
        assert_eq!(st.read_mode, "O_DIRECT");
        assert!(cufile_counter("mock_cufile_reads") > reads);
        for (name, bytes) in &want {
            let t = header.tensors.iter().find(|t| &t.name == name).unwrap();
            let mut got = vec![0u8; bytes.len()];
            buf.read(t.begin as usize, &mut got).unwrap();
            assert!(&got == bytes, "{name}: device bytes differ");
        }
    }
    assert_eq!(cufile_counter("mock_cufile_bad_calls"), 0);
    drop(loader);
    // Every registration is given back with the reader.
    assert_eq!(cufile_counter("mock_cufile_live_handles"), 0);
    assert_clean_calls();
    drop(device);
    assert_all_released();
}

/// A direct load of a cold model that the mock cuFile fails (as the parent's environment injects):
/// returns the error and the model's path, after checking that nothing stays registered, allocated
/// or refused.
fn failed_direct_load(seed: u64) -> (gpuio::Error, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let engine = engine();
    let device = open();
    let loader = direct_loader(&engine, &device);
    let (path, _, file) = cold_model(dir.path(), seed);
    let header = gpuio_cuda::safetensors::read_header(&path).unwrap();
    let buf = DeviceBuffer::alloc(&device, header.body_len as usize).unwrap();
    let e = loader
        .load_range(&file, header.body_offset, &buf, 0, header.body_len)
        .unwrap_err();
    drop((buf, loader, file));
    assert_eq!(cufile_counter("mock_cufile_live_handles"), 0);
    assert_clean_calls();
    drop(device);
    assert_all_released();
    (e, path)
}

#[test]
fn child_cufile_refuses_a_filesystem() {
    if !is_child() {
        return;
    }
    // cuFileHandleRegister fails with 5027, as on ext4 over virtio on an H200 machine: the direct
    // path says the file cannot be served (Unsupported), so an automatic choice would stage.
    let (e, path) = failed_direct_load(7);
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("CU_FILE_HANDLE_NOT_REGISTERED"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn child_cufile_read_error() {
    if !is_child() {
        return;
    }
    // cuFileRead fails with EIO: an I/O error naming the file, and nothing left behind.
    let (e, path) = failed_direct_load(8);
    assert_eq!(
        (e.kind(), e.errno()),
        (ErrorKind::Io, Some(libc::EIO)),
        "{e}"
    );
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

// ---- the mock catches what a GPU would ----

#[test]
fn mock_catches_driver_misuse() {
    run_child("child_mock_catches_driver_misuse", &[]);
}

#[test]
fn mock_read_only_mapping_unsupported() {
    run_child(
        "child_read_only_mapping_unsupported",
        &[("MOCK_CUDA_ATTR_113", "0")],
    );
}

/// Raw driver calls, each a mistake the mock must report: a stream of a reset context, an async
/// copy whose page-locked source was unregistered before it ran, a registration that encloses a
/// registered range, and an attribute it does not model.
#[test]
fn child_mock_catches_driver_misuse() {
    if !is_child() {
        return;
    }
    use cudarc::driver::sys::{self, CUresult};
    use std::ptr::null_mut;
    let ok = CUresult::CUDA_SUCCESS;
    // SAFETY: raw calls on a mock driver, with live locals as out-params and buffers kept alive
    // for every call that reads them.
    unsafe {
        assert_eq!(sys::cuInit(0), ok);
        let mut ctx = null_mut();
        assert_eq!(sys::cuDevicePrimaryCtxRetain(&mut ctx, 0), ok);
        assert_eq!(sys::cuCtxSetCurrent(ctx), ok);
        let mut stream = null_mut();
        assert_eq!(sys::cuStreamCreate(&mut stream, 1), ok);
        // The last release resets the context; the stream made in it is dead after.
        assert_eq!(sys::cuDevicePrimaryCtxRelease_v2(0), ok);
        assert_eq!(sys::cuDevicePrimaryCtxRetain(&mut ctx, 0), ok);
        assert_eq!(sys::cuCtxSetCurrent(ctx), ok);
        assert_eq!(
            sys::cuStreamSynchronize(stream),
            CUresult::CUDA_ERROR_INVALID_HANDLE
        );
        assert_eq!(counter("mock_bad_calls"), 1, "{}", last_bad());

        let mut stream = null_mut();
        assert_eq!(sys::cuStreamCreate(&mut stream, 1), ok);
        let mut host = vec![7u8; 1 << 16];
        let mut dev = 0;
        assert_eq!(sys::cuMemAlloc_v2(&mut dev, host.len()), ok);
        let p = host.as_mut_ptr() as *mut std::ffi::c_void;
        // A registration enclosing a registered range (neither end point inside it).
        let mid = p.add(4096);
        assert_eq!(sys::cuMemHostRegister_v2(mid, 4096, 0), ok);
        assert_eq!(
            sys::cuMemHostRegister_v2(p, host.len(), 0),
            CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
        );
        assert_eq!(counter("mock_bad_calls"), 2, "{}", last_bad());

        // An attribute the mock does not model is refused, so new queries get a real value.
        let mut v = 0;
        assert_eq!(
            sys::cuDeviceGetAttribute(
                &mut v,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                0
            ),
            ok
        );
        assert_eq!(v, 132);
        assert_ne!(
            sys::cuDeviceGetAttribute(
                &mut v,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PITCH,
                0
            ),
            ok
        );
        assert_eq!(counter("mock_bad_calls"), 3, "{}", last_bad());
        assert_eq!(sys::cuMemHostUnregister(mid), ok);

        // Last, as it leaves the context with a sticky error (as on a GPU):
        // an async copy from page-locked memory unregistered before the copy ran.
        assert_eq!(sys::cuMemHostRegister_v2(p, host.len(), 0), ok);
        assert_eq!(sys::cuMemcpyHtoDAsync_v2(dev, p, host.len(), stream), ok);
        assert_eq!(sys::cuMemHostUnregister(p), ok);
        assert_eq!(
            sys::cuStreamSynchronize(stream),
            CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
        );
        assert_eq!(counter("mock_faults"), 1);
    }
}

#[test]
fn child_read_only_mapping_unsupported() {
    if !is_child() {
        return;
    }
    // MOCK_CUDA_ATTR_113=0: a device that cannot map host memory read-only. Zero-copy is refused
    // with the reason, before any registration.
    let dir = tempfile::tempdir().unwrap();
    let device = open();
    let (path, _) = random_model(dir.path(), 4, 6, 3000);
    let e = gpuio_cuda::map_safetensors(&device, &path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    assert_eq!(counter("mock_registered"), 0);
    assert_clean_calls();
    drop(device);
    assert_all_released();
}
