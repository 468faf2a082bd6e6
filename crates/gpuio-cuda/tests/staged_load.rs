//! The staged load path on the host-memory stand-in: the same staging, ordering and error code that
//! drives a GPU. Every load is checked byte for byte (CRC of each tensor read back from "device"
//! memory against the file), and every failure must leave nothing allocated and every staging buffer
//! back in its pool.

use std::sync::Arc;
use std::time::Duration;

mod common;

use common::{check_model, crc, random_model};
use gpuio::backend::BackendKind;
use gpuio::{Engine, ErrorKind};
use gpuio_cuda::safetensors::serialize;
use gpuio_cuda::{Device, DeviceBuffer, Dtype, HostDevice, HostDeviceConfig, Loader, LoaderConfig};
use gpuio_testkit::{engines, faulty_engine, FaultPlan};

fn cfg(buffers: usize, bytes: usize) -> LoaderConfig {
    LoaderConfig {
        staging_buffers: buffers,
        staging_bytes: bytes,
        timeline: true,
        ..LoaderConfig::default()
    }
}

#[test]
fn random_files_load_byte_exact_with_1_2_3_staging_buffers_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    for (label, engine) in engines() {
        for buffers in 1..=3 {
            let dev = HostDevice::new(HostDeviceConfig::default());
            let device: Arc<dyn Device> = Arc::new(dev.clone());
            let loader = Loader::new(&engine, device, cfg(buffers, 64 << 10)).unwrap();
            for seed in 0..3u64 {
                let (path, want) = random_model(dir.path(), seed * 10 + buffers as u64, 12, 9000);
                let model = loader.load_safetensors(&path).unwrap();
                check_model(&model, &want);
                assert!(
                    model.stats.chunks >= 2,
                    "{label}: too small to stage: {:?}",
                    model.stats
                );
                assert_eq!(model.stats.bytes, model.buffer.len() as u64);
                drop(model);
                assert_eq!(dev.allocated_bytes(), 0, "{label}");
            }
            assert_eq!(
                dev.reuse_violations(),
                0,
                "{label}: a staging buffer was reused too early"
            );
            assert_eq!(
                loader.staging_pool().unwrap().available(),
                buffers,
                "{label}"
            );
            assert_eq!(dev.pinned_bytes(), (buffers * (64 << 10)) as u64);
            drop(loader);
            assert_eq!(dev.pinned_bytes(), 0, "{label}: staging still pinned");
        }
    }
}

#[test]
fn copies_run_in_order_and_overlap_reads_only_with_two_or_more_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = random_model(dir.path(), 77, 8, 20_000);
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let mut overlapped = Vec::new();
    for buffers in 1..=3 {
        let dev = HostDevice::new(HostDeviceConfig {
            copy_delay: Duration::from_millis(15),
            ..HostDeviceConfig::default()
        });
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(buffers, 64 << 10)).unwrap();
        let model = loader.load_safetensors(&path).unwrap();
        check_model(&model, &want);
        assert_eq!(dev.reuse_violations(), 0);
        let log = dev.copy_log();
        let tl = &model.stats.timeline;
        assert_eq!(log.len(), tl.len());
        // Copies executed in queue order, to increasing, contiguous device offsets covering the body.
        let mut expect = model.buffer.ptr();
        for (i, c) in log.iter().enumerate() {
            assert_eq!(c.ticket, tl[i].ticket);
            assert_eq!(c.dst, expect, "copy {i} out of place");
            expect += c.len as u64;
        }
        assert_eq!(expect, model.buffer.ptr() + model.buffer.len() as u64);
        // Did the read of chunk k+1 start before the copy of chunk k finished?
        let n = (0..tl.len() - 1)
            .filter(|&k| tl[k + 1].read_issued < log[k].finished)
            .count();
        overlapped.push(n);
        if buffers == 1 {
            assert_eq!(n, 0, "one staging buffer cannot overlap: {tl:?}");
        } else {
            assert!(
                n >= tl.len() / 2,
                "{buffers} buffers overlapped only {n} of {} chunks",
                tl.len()
            );
        }
    }
    eprintln!("chunks whose next read overlapped their copy, 1/2/3 buffers: {overlapped:?}");
}

#[test]
fn read_faults_fail_the_load_and_release_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_model(dir.path(), 5, 10, 20_000);
    // The model is 8 chunks of 64 KiB; read through the page cache (it was just written, so it is
    // warm) that is 8 reads, so the 7th is the last one that surely happens.
    for nth in [1u64, 3, 7] {
        let plan = FaultPlan::none().with_fail_nth(nth, libc::EIO, false);
        let (engine, handle) = faulty_engine(nth, plan, BackendKind::Threads).unwrap();
        let dev = HostDevice::new(HostDeviceConfig {
            copy_delay: Duration::from_millis(2),
            ..HostDeviceConfig::default()
        });
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(2, 64 << 10)).unwrap();
        let e = loader.load_safetensors(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.to_string().contains("reading chunk"), "{e}");
        assert!(handle.counts().hard_errors() >= 1);
        assert_eq!(
            dev.allocated_bytes(),
            0,
            "device memory left after a read fault"
        );
        assert_eq!(
            loader.staging_pool().unwrap().available(),
            2,
            "staging buffer not returned"
        );
        // The loader still works once the fault is gone.
        handle.set_plan(FaultPlan::none());
        loader.load_safetensors(&path).unwrap();
    }
}

#[test]
fn transient_faults_and_short_reads_still_load_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = random_model(dir.path(), 6, 10, 20_000);
    let plan = FaultPlan::benign(0.2).with_delay(0.3, Duration::from_millis(3));
    let (engine, handle) = faulty_engine(6, plan, BackendKind::Threads).unwrap();
    let dev = HostDevice::new(HostDeviceConfig::default());
    let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(3, 64 << 10)).unwrap();
    let model = loader.load_safetensors(&path).unwrap();
    check_model(&model, &want);
    assert!(handle.counts().total() > 0, "no fault was injected");
}

#[test]
fn out_of_device_memory_is_typed_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, want_a) = random_model(dir.path(), 8, 6, 5000);
    let (b, _) = random_model(dir.path(), 9, 6, 5000);
    let len_a = std::fs::metadata(&a).unwrap().len();
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    // Room for the first model and not for a second.
    let dev = HostDevice::new(HostDeviceConfig {
        capacity_bytes: Some(len_a + len_a / 4),
        ..HostDeviceConfig::default()
    });
    let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(2, 64 << 10)).unwrap();
    let model_a = loader.load_safetensors(&a).unwrap();
    let held = dev.allocated_bytes();
    let e = loader.load_safetensors(&b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    assert!(e.to_string().contains(&*b.display().to_string()), "{e}");
    assert_eq!(dev.allocated_bytes(), held, "the failed load kept memory");
    assert_eq!(loader.staging_pool().unwrap().available(), 2);
    check_model(&model_a, &want_a); // the first model is intact
    drop(model_a);
    assert_eq!(dev.allocated_bytes(), 0);
}

#[test]
fn a_copy_failing_mid_load_releases_device_and_staging_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (path, want) = random_model(dir.path(), 10, 10, 20_000);
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    for nth in [1u64, 2, 4] {
        let dev = HostDevice::new(HostDeviceConfig {
            fail_copy_nth: Some(nth),
            copy_delay: Duration::from_millis(1),
            ..HostDeviceConfig::default()
        });
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(3, 64 << 10)).unwrap();
        let e = loader.load_safetensors(&path).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("injected failure of copy {nth}")),
            "{e}"
        );
        assert_eq!(dev.allocated_bytes(), 0);
        assert_eq!(loader.staging_pool().unwrap().available(), 3);
        drop(loader);
        assert_eq!(dev.pinned_bytes(), 0);
    }
    // A healthy device afterwards loads the same file.
    let dev = HostDevice::new(HostDeviceConfig::default());
    let loader = Loader::new(&engine, Arc::new(dev), cfg(3, 64 << 10)).unwrap();
    check_model(&loader.load_safetensors(&path).unwrap(), &want);
}

#[test]
fn a_bad_file_allocates_nothing_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = random_model(dir.path(), 11, 4, 1000);
    let mut img = std::fs::read(&path).unwrap();
    img.truncate(img.len() - 3);
    std::fs::write(&path, &img).unwrap();
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dev = HostDevice::new(HostDeviceConfig::default());
    let loader = Loader::new(&engine, Arc::new(dev.clone()), LoaderConfig::default()).unwrap();
    let e = loader.load_safetensors(&path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("truncated body"), "{e}");
    assert_eq!(dev.alloc_calls(), 0);
}

#[test]
fn empty_and_tiny_models_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dev = HostDevice::new(HostDeviceConfig::default());
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let loader = Loader::new(&engine, device.clone(), LoaderConfig::default()).unwrap();
    let p = dir.path().join("empty.safetensors");
    std::fs::write(&p, serialize(&[], &[])).unwrap();
    let m = loader.load_safetensors(&p).unwrap();
    assert!(m.tensors.is_empty() && m.buffer.is_empty());
    let p = dir.path().join("tiny.safetensors");
    std::fs::write(&p, serialize(&[("t", Dtype::U8, &[1], &[42])], &[])).unwrap();
    let m = loader.load_safetensors(&p).unwrap();
    assert_eq!(m.crc32c(&m.tensors[0]).unwrap(), crc(&[42]));
    // load_range checks that the range fits the buffer.
    let buf = DeviceBuffer::alloc(&device, 16).unwrap();
    let f = gpuio::File::open(&p).unwrap();
    let e = loader.load_range(&f, 0, &buf, 8, 9).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let mut out = [0u8; 4];
    let e = buf.read(14, &mut out).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidInput,
        "a read past the buffer's end: {e}"
    );
    let e = Loader::new(&engine, device, cfg(0, 64 << 10)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "no staging buffers: {e}");
}

#[test]
fn cuda_without_a_driver_is_a_typed_error_naming_the_library() {
    let st = gpuio_cuda::cuda::driver_status();
    if st.available {
        eprintln!(
            "skipped: a CUDA driver and GPU are present here ({}); the GPU tests cover it",
            st.reason
        );
        return;
    }
    let e = gpuio_cuda::open_device("cuda:0").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let s = e.to_string();
    assert!(s.contains("cuda:0"), "{s}");
    if !st.reason.contains("libcuda loaded") {
        assert!(s.contains("libcuda.so.1"), "{s}");
    }
    assert!(gpuio_cuda::open_device("cuda:x").is_err());
    assert!(gpuio_cuda::open_device("tpu").is_err());
}

#[test]
fn on_a_gpu_the_same_loads_are_byte_exact() {
    let st = gpuio_cuda::cuda::driver_status();
    if !st.available {
        eprintln!("skipped: no usable GPU here: {}", st.reason);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(gpuio::EngineConfig::default()).unwrap();
    let device = gpuio_cuda::open_device("cuda:0").unwrap();
    for buffers in 1..=3 {
        let loader = Loader::new(&engine, device.clone(), cfg(buffers, 64 << 10)).unwrap();
        let (path, want) = random_model(dir.path(), 100 + buffers as u64, 12, 20_000);
        check_model(&loader.load_safetensors(&path).unwrap(), &want);
    }
}
