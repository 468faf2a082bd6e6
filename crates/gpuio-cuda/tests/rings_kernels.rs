//! The ring workloads' host side where no kernel can run: the host stand-in refuses to load them
//! with the reason, the device cache's arguments are checked before anything is allocated for a
//! kernel, and `rings::bench::run` fails first, saying why. (On a GPU, `gpuio rings` runs them:
//! scripts/bench-gpu.py, section `rings`; the argument layout is checked by tests/rings_nvrtc.rs.)

use std::sync::Arc;

use gpuio::ErrorKind;
use gpuio_cuda::rings::bench::{run, RingsBenchConfig};
use gpuio_cuda::rings::kernels::{DeviceCache, Workloads};
use gpuio_cuda::rings::{RingConfig, RingRegion};
use gpuio_cuda::{open_device, Device};

fn cpu() -> Arc<dyn Device> {
    open_device("cpu").unwrap()
}

#[test]
fn the_host_stand_in_runs_no_kernels() {
    let e = Workloads::load(&cpu()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("cpu runs no kernels"), "{e}");

    let engine = gpuio::Engine::new(gpuio::EngineConfig::default()).unwrap();
    let cfg = RingsBenchConfig {
        file: "/nonexistent/file".into(),
        ..RingsBenchConfig::default()
    };
    // The device is refused before the file is looked at.
    let e = run(&engine, &cpu(), &cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let bad = RingsBenchConfig {
        read_bytes: 1000,
        ..cfg
    };
    assert_eq!(
        run(&engine, &cpu(), &bad).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn device_cache_arguments_are_checked() {
    let device = cpu();
    let region = RingRegion::new(
        &device,
        RingConfig {
            completion_count: 64,
            ..RingConfig::default()
        },
    )
    .unwrap();
    // More slots than completion words, an empty file, a file of more than 2^32 lines.
    for (bytes, slots, base) in [
        (1 << 20, 65, 0),
        (1 << 20, 32, 40),
        (0, 8, 0),
        (1 << 45, 8, 0),
    ] {
        let e = DeviceCache::new(&region, 0, bytes, slots, base).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidInput,
            "{bytes} {slots} {base}: {e}"
        );
    }
    let no_lines = RingRegion::new(
        &device,
        RingConfig {
            line_bytes: 0,
            ..RingConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        DeviceCache::new(&no_lines, 0, 1 << 20, 8, 0)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    // A valid one: 256 lines of 4 KiB over a 1 MiB file, 64 slots; everything zero (INVALID, empty).
    let c = DeviceCache::new(&region, 0, 1 << 20, 64, 0).unwrap();
    let a = c.arg();
    assert_eq!((a.pages, a.slots, a.line_bytes), (256, 64, 4096));
    assert_eq!(c.window().1, 64 * 4096);
}

#[test]
fn gpu_bfs_checks_its_graph_before_the_device() {
    use gpuio_cuda::rings::bfs::{bfs, GpuBfsConfig};
    let engine = gpuio::Engine::new(gpuio::EngineConfig::default()).unwrap();
    let c = GpuBfsConfig::default();
    let edges = std::path::Path::new("/nonexistent.bel.dst");
    let e = bfs(&engine, &cpu(), edges, &[0, 1, 2], 5, &c).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidInput,
        "source out of range: {e}"
    );
    let e = bfs(&engine, &cpu(), edges, &[0], 0, &c).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "no vertices: {e}");
    let e = bfs(&engine, &cpu(), edges, &[0, 1, 2], 1, &c).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}
