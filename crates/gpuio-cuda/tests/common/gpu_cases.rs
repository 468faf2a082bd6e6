//! The cases `tests/gpu.rs` runs on a real GPU, written once so `tests/mock_driver.rs` runs the very
//! same code under the mock driver: a case whose assertions can never hold (a PIO check on chunks
//! too large for programmed I/O) then fails in CI, not first on a GPU machine.

use std::path::Path;
use std::sync::Arc;

use gpuio::{Engine, EngineConfig, ErrorKind};
use gpuio_cuda::safetensors::serialize;
use gpuio_cuda::{Device, DeviceBuffer, Dtype, LoadPath, Loader, LoaderConfig, PathChoice};
use gpuio_testkit::Rng;

use super::crc;

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u32() as u8).collect()
}

/// Tensors of 3 B, 0 B, 4 KiB, 1 MiB, about 5 MB and 17 B in `dir/m.safetensors`.
pub fn model(dir: &Path) -> (std::path::PathBuf, Vec<(String, Vec<u8>)>) {
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

/// Staged loads with 1–3 staging buffers by DMA, then with every chunk small enough for programmed
/// I/O (64 KiB chunks under a 64 KiB limit; 1 MiB chunks under a 1 MiB limit): all copies are PIO
/// there, and every tensor is byte-exact in device memory.
pub fn staged_loads_with_dma_and_programmed_io(device: &Arc<dyn Device>, engine: &Engine) {
    let dir = tempfile::tempdir().unwrap();
    let (path, ts) = model(dir.path());
    // (staging buffers, bytes per staging buffer, PIO limit)
    let cases = [
        (1, 1 << 20, 0),
        (2, 1 << 20, 0),
        (3, 1 << 20, 0),
        (3, 64 << 10, 64 << 10),
        (2, 1 << 20, 1 << 20),
    ];
    for (buffers, staging, pio) in cases {
        let cfg = LoaderConfig {
            staging_buffers: buffers,
            staging_bytes: staging,
            pio_max_bytes: pio,
            path: PathChoice::Staged,
            ..LoaderConfig::default()
        };
        let loader = Loader::new(engine, device.clone(), cfg).unwrap();
        let m = loader.load_safetensors(&path).unwrap();
        let case = format!("{buffers} buffers of {staging} B, PIO up to {pio} B");
        assert_eq!(m.stats.path, LoadPath::Staged, "{case}");
        if pio >= staging {
            assert_eq!(
                (m.stats.pio_copies, m.stats.dma_copies),
                (m.stats.chunks, 0),
                "{case}: every chunk fits the PIO limit ({})",
                m.stats.note
            );
        } else {
            assert_eq!(m.stats.pio_copies, 0, "{case}");
        }
        for (t, (name, bytes)) in m.tensors.iter().zip(&ts) {
            assert_eq!(&t.name, name);
            assert_eq!(m.crc32c(t).unwrap(), crc(bytes), "{name}: {case}");
        }
    }
}

/// The file mapped into the device's address space reads back byte-exact.
pub fn zero_copy_mapping(device: &Arc<dyn Device>) {
    let dir = tempfile::tempdir().unwrap();
    let (path, ts) = model(dir.path());
    let m = gpuio_cuda::map_safetensors(device, &path).unwrap();
    for (t, (name, bytes)) in m.tensors.iter().zip(&ts) {
        assert_eq!(m.crc32c(t).unwrap(), crc(bytes), "{name}");
    }
}

/// The PIO/DMA sweep runs both kinds of copy at every size and checks them.
pub fn pio_dma_sweep(device: &Arc<dyn Device>) {
    let r = gpuio_cuda::sweep::pio_dma_sweep(device, &gpuio_cuda::sweep::sizes_up_to(1 << 20), 20)
        .unwrap();
    assert!(r.pio_unavailable.is_none(), "{:?}", r.pio_unavailable);
    assert_eq!(r.rows.len(), gpuio_cuda::sweep::sizes_up_to(1 << 20).len());
    for row in &r.rows {
        eprintln!(
            "{:>8} B  DMA {:7.2} us  PIO {:?}",
            row.bytes, row.dma_us, row.pio_us
        );
    }
}

/// Asking for twice the free memory is a typed error and leaks nothing.
pub fn out_of_device_memory(device: &Arc<dyn Device>) {
    let free = device.mem_info().unwrap().free_bytes;
    let e = DeviceBuffer::alloc(device, (free as usize).saturating_mul(2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    let after = device.mem_info().unwrap().free_bytes;
    assert!(
        after + (64 << 20) >= free,
        "free memory fell from {free} to {after}"
    );
}

/// A directory on a disk for files the direct path reads: `GPUIO_TEST_DIR`, else the build's
/// target temp directory where it exists (not on a machine the test binary was carried to), else
/// `/var/tmp`.
fn disk_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("GPUIO_TEST_DIR") {
        return d.into();
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if target.is_dir() {
        target.to_path_buf()
    } else {
        "/var/tmp".into()
    }
}

/// The direct path where the device has one: byte-exact, or refused as `Unsupported` for a file
/// cuFile cannot serve, in which case the automatic path stages the same file instead. Returns why
/// it did not run the direct load, if it did not.
pub fn direct_path_where_cufile_works(device: &Arc<dyn Device>) -> Option<String> {
    if let Err(why) = device.direct_reader() {
        return Some(format!("no direct path on {} ({why})", device.label()));
    }
    // On a disk, not in /tmp (tmpfs on some machines, which cuFile does not serve), and cold: a
    // file just written is warm in the page cache, and a warm file is read buffered, which cuFile
    // refuses.
    let dir = tempfile::tempdir_in(disk_dir()).unwrap();
    let (path, ts) = model(dir.path());
    drop(gpuio::OpenOptions::read().cold(true).open(&path).unwrap());
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let loader = |path| {
        let cfg = LoaderConfig {
            path,
            ..LoaderConfig::default()
        };
        Loader::new(&engine, device.clone(), cfg).unwrap()
    };
    let check = |m: &gpuio_cuda::LoadedModel| {
        for (t, (name, bytes)) in m.tensors.iter().zip(&ts) {
            assert_eq!(m.crc32c(t).unwrap(), crc(bytes), "{name}");
        }
    };
    match loader(PathChoice::Direct).load_safetensors(&path) {
        Ok(m) => {
            assert_eq!(m.stats.path, LoadPath::Direct);
            eprintln!("direct: {}", m.stats.note);
            check(&m);
            None
        }
        // A filesystem cuFile does not serve (tmpfs, O_DIRECT refused, no volume attributes) is a
        // clear refusal, and the automatic path stages instead of failing.
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            let m = loader(PathChoice::Auto).load_safetensors(&path).unwrap();
            assert_eq!(m.stats.path, LoadPath::Staged, "{}", m.stats.note);
            check(&m);
            Some(format!(
                "cuFile refused {}: {e}; auto staged: {}",
                path.display(),
                m.stats.note
            ))
        }
        Err(e) => panic!("direct load failed: {e}"),
    }
}
