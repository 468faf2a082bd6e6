//! The same loads, stores and copies on a real GPU (`cuda:0`), byte for byte. Each test skips, saying
//! why, where the driver or a GPU is missing (CI, the development machines); on a GPU machine run
//! the compiled test binary (see scripts/bench-gpu.sh, which carries and runs it).

use std::path::Path;
use std::sync::Arc;

use gpuio::{Engine, EngineConfig};
use gpuio_cuda::safetensors::serialize;
use gpuio_cuda::{cuda, Device, DeviceBuffer, Dtype, LoadPath, Loader, LoaderConfig};
use gpuio_testkit::Rng;

fn gpu() -> Option<Arc<dyn Device>> {
    match cuda::CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no GPU here ({e})");
            None
        }
    }
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u32() as u8).collect()
}

fn crc32c(b: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32
}

fn model(dir: &Path) -> (std::path::PathBuf, Vec<(String, Vec<u8>)>) {
    let ts: Vec<(String, Vec<u8>)> = [3usize, 0, 4096, 1 << 20, 5_000_001, 17]
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("t{i}"), random(i as u64 + 1, n)))
        .collect();
    let shapes: Vec<[u64; 1]> = ts.iter().map(|(_, b)| [b.len() as u64]).collect();
    let views: Vec<(&str, Dtype, &[u64], &[u8])> = ts
        .iter()
        .zip(&shapes)
        .map(|((n, b), s)| (n.as_str(), Dtype::U8, &s[..], b.as_slice()))
        .collect();
    let p = dir.join("m.safetensors");
    std::fs::write(&p, serialize(&views, &[("format", "pt")])).unwrap();
    (p, ts)
}

#[test]
fn staged_loads_with_dma_and_programmed_io_are_byte_exact() {
    let Some(device) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, ts) = model(dir.path());
    let engine = Engine::new(EngineConfig::default()).unwrap();
    for (buffers, pio) in [(1, 0), (2, 0), (3, 0), (3, 64 << 10), (2, 1 << 20)] {
        let cfg = LoaderConfig {
            staging_buffers: buffers,
            staging_bytes: 1 << 20,
            pio_max_bytes: pio,
            ..LoaderConfig::default()
        };
        let loader = Loader::new(&engine, device.clone(), cfg).unwrap();
        let m = loader.load_safetensors(&path).unwrap();
        assert_eq!(m.stats.path, LoadPath::Staged);
        if pio > 0 {
            assert!(m.stats.pio_copies > 0, "no PIO copy: {}", m.stats.note);
        }
        for (t, (name, bytes)) in m.tensors.iter().zip(&ts) {
            assert_eq!(&t.name, name);
            assert_eq!(
                m.crc32c(t).unwrap(),
                crc32c(bytes),
                "{name} n={buffers} pio={pio}"
            );
        }
    }
}

#[test]
fn zero_copy_mapping_reads_the_file_through_the_device() {
    let Some(device) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, ts) = model(dir.path());
    let m = gpuio_cuda::map_safetensors(&device, &path).unwrap();
    for (t, (name, bytes)) in m.tensors.iter().zip(&ts) {
        assert_eq!(m.crc32c(t).unwrap(), crc32c(bytes), "{name}");
    }
}

#[test]
fn the_pio_dma_sweep_runs_and_checks_its_copies() {
    let Some(device) = gpu() else { return };
    let r = gpuio_cuda::sweep::pio_dma_sweep(&device, &gpuio_cuda::sweep::sizes_up_to(1 << 20), 20)
        .unwrap();
    assert!(r.pio_unavailable.is_none(), "{:?}", r.pio_unavailable);
    for row in &r.rows {
        eprintln!(
            "{:>8} B  DMA {:7.2} us  PIO {:?}",
            row.bytes, row.dma_us, row.pio_us
        );
    }
}

#[test]
fn out_of_device_memory_is_a_typed_error_and_releases_everything() {
    let Some(device) = gpu() else { return };
    let free = device.mem_info().unwrap().free_bytes;
    let e = DeviceBuffer::alloc(&device, (free as usize).saturating_mul(2)).unwrap_err();
    assert_eq!(e.kind(), gpuio::ErrorKind::OutOfMemory, "{e}");
    let after = device.mem_info().unwrap().free_bytes;
    assert!(
        after + (64 << 20) >= free,
        "free memory fell from {free} to {after}"
    );
}

#[test]
fn the_direct_path_through_cufile_is_byte_exact_where_cufile_works() {
    let Some(device) = gpu() else { return };
    if let Err(why) = device.direct_reader() {
        eprintln!("skipped: no direct path on cuda:0 ({why})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (path, ts) = model(dir.path());
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let cfg = LoaderConfig {
        path: gpuio_cuda::PathChoice::Direct,
        ..LoaderConfig::default()
    };
    let loader = Loader::new(&engine, device.clone(), cfg).unwrap();
    match loader.load_safetensors(&path) {
        Ok(m) => {
            assert_eq!(m.stats.path, LoadPath::Direct);
            eprintln!("direct: {}", m.stats.note);
            for (t, (name, bytes)) in m.tensors.iter().zip(&ts) {
                assert_eq!(m.crc32c(t).unwrap(), crc32c(bytes), "{name}");
            }
        }
        // A filesystem cuFile does not serve (tmpfs, O_DIRECT refused) is a clear refusal.
        Err(e) if e.kind() == gpuio::ErrorKind::Unsupported => {
            eprintln!("skipped: cuFile refused {}: {e}", path.display())
        }
        Err(e) => panic!("direct load failed: {e}"),
    }
}
