//! Pack entries onto the device (decompressed on the CPU into pinned staging, then copied) and the
//! programmed-I/O copy of small chunks, on the host-memory stand-in. Every load is checked byte for
//! byte against the source, and the copy log says which way each chunk travelled.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gpuio::ErrorKind;
use gpuio_cuda::{
    CopyKind, Device, DeviceBuffer, HostDevice, HostDeviceConfig, LoadPath, Loader, LoaderConfig,
};
use gpuio_pack::{pack_files, Codec, Pack, PackOptions};
use gpuio_testkit::{engines, Rng};

/// Compressible but not trivial bytes: runs of a random byte with random noise.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let b = rng.next_u32() as u8;
        let run = 1 + rng.below(64) as usize;
        for _ in 0..run.min(len - v.len()) {
            v.push(if rng.below(8) == 0 {
                rng.next_u32() as u8
            } else {
                b
            });
        }
    }
    v
}

fn make_pack(dir: &Path, codec: Codec, chunk: u32, entries: &[(&str, &[u8])]) -> PathBuf {
    let mut inputs = Vec::new();
    for (name, bytes) in entries {
        let p = dir.join(format!("in-{name}"));
        std::fs::write(&p, bytes).unwrap();
        inputs.push((name.to_string(), p));
    }
    let out = dir.join(format!("p-{}-{chunk}.gpk", codec.name()));
    let opts = PackOptions {
        codec,
        chunk_size: chunk,
        ..PackOptions::default()
    };
    pack_files(&inputs, &out, &opts, &mut |_, _| {}).unwrap();
    out
}

fn readback(buf: &DeviceBuffer, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    buf.read(off, &mut v).unwrap();
    v
}

fn cfg(buffers: usize, bytes: usize, pio: usize) -> LoaderConfig {
    LoaderConfig {
        staging_buffers: buffers,
        staging_bytes: bytes,
        pio_max_bytes: pio,
        ..LoaderConfig::default()
    }
}

#[test]
fn pack_entries_load_byte_exact_for_every_codec_range_and_staging_count() {
    let dir = tempfile::tempdir().unwrap();
    let big = data(1, 1_300_000);
    let small = data(2, 777);
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
        let path = make_pack(
            dir.path(),
            codec,
            64 << 10,
            &[("big", &big), ("small", &small)],
        );
        let pack = Pack::open(&path).unwrap();
        for (backend, engine) in engines() {
            for buffers in [1, 2, 3] {
                let dev = HostDevice::new(HostDeviceConfig::default());
                let device: Arc<dyn Device> = Arc::new(dev.clone());
                let loader =
                    Loader::new(&engine, device.clone(), cfg(buffers, 256 << 10, 0)).unwrap();
                let entry = pack.entry("big").unwrap();
                // Whole entry, then ranges starting and ending inside chunks.
                for (off, len) in [
                    (0u64, big.len()),
                    (1, 1),
                    (65_535, 200_000),
                    (1_000_001, 299_999),
                ] {
                    let buf = DeviceBuffer::alloc(&device, len + 3).unwrap();
                    let st = loader
                        .load_entry_range(&entry, off, &buf, 3, len as u64)
                        .unwrap();
                    let what = format!("{} {backend} n={buffers} {off}+{len}", codec.name());
                    assert_eq!(st.path, LoadPath::StagedPack, "{what}");
                    assert_eq!(st.bytes, len as u64);
                    assert_eq!(st.chunks, len.div_ceil(256 << 10), "{what}");
                    assert!(
                        readback(&buf, 3, len) == big[off as usize..off as usize + len],
                        "{what}: bytes differ"
                    );
                }
                let entry = pack.entry("small").unwrap();
                let buf = DeviceBuffer::alloc(&device, small.len()).unwrap();
                loader
                    .load_entry_range(&entry, 0, &buf, 0, small.len() as u64)
                    .unwrap();
                assert_eq!(readback(&buf, 0, small.len()), small);
                assert_eq!(
                    dev.reuse_violations(),
                    0,
                    "a staging buffer was reused under a copy"
                );
                assert_eq!(loader.staging_pool().unwrap().available(), buffers);
            }
        }
    }
}

#[test]
fn a_damaged_pack_chunk_is_corrupt_and_nothing_is_left_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let big = data(3, 600_000);
    let path = make_pack(dir.path(), Codec::Lz4, 64 << 10, &[("big", &big)]);
    // Damage the stored bytes of chunk 4.
    let info = Pack::open(&path)
        .unwrap()
        .entry("big")
        .unwrap()
        .info()
        .clone();
    let c = info.chunks[4];
    let mut img = std::fs::read(&path).unwrap();
    img[c.file_offset as usize + c.stored_len as usize / 2] ^= 0x5a;
    std::fs::write(&path, img).unwrap();
    let pack = Pack::open(&path).unwrap();
    let entry = pack.entry("big").unwrap();
    let (_, engine) = engines().remove(0);
    let dev = HostDevice::new(HostDeviceConfig::default());
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let loader = Loader::new(&engine, device.clone(), cfg(2, 64 << 10, 0)).unwrap();
    let buf = DeviceBuffer::alloc(&device, big.len()).unwrap();
    let e = loader
        .load_entry_range(&entry, 0, &buf, 0, big.len() as u64)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("big") && msg.contains("chunk"), "{msg}");
    assert_eq!(loader.staging_pool().unwrap().available(), 2);
    // No copy of the damaged chunk's device range happened.
    let damaged = buf.ptr() + c.logical_offset;
    assert!(
        dev.copy_log().iter().all(|r| r.dst != damaged),
        "the damaged chunk was copied"
    );
    // Past the end of the entry: refused before anything is read.
    let e = loader
        .load_entry_range(&entry, 1, &buf, 0, big.len() as u64)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
}

#[test]
fn small_chunks_go_by_programmed_io_and_large_ones_by_dma() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(4, 1_000_000);
    let path = dir.path().join("f");
    std::fs::write(&path, &bytes).unwrap();
    for (backend, engine) in engines() {
        let file = gpuio::File::open(&path).unwrap();
        let dev = HostDevice::new(HostDeviceConfig::default());
        let device: Arc<dyn Device> = Arc::new(dev.clone());
        // 64 KiB staging, PIO up to 64 KiB: 100 000 bytes at offset 5 are two chunks (file offsets
        // 0 and 65536, page-aligned) of 65 531 and 34 469 bytes — both ≤ 64 KiB, so both PIO.
        let loader = Loader::new(&engine, device.clone(), cfg(2, 64 << 10, 64 << 10)).unwrap();
        let buf = DeviceBuffer::alloc(&device, bytes.len()).unwrap();
        let st = loader.load_range(&file, 5, &buf, 0, 100_000).unwrap();
        assert_eq!((st.pio_copies, st.dma_copies), (2, 0), "{backend}");
        assert_eq!(readback(&buf, 0, 100_000), bytes[5..100_005], "{backend}");
        assert!(dev
            .copy_log()
            .iter()
            .all(|r| r.kind == CopyKind::HostToDeviceMapped));

        // Threshold below the chunk size: full chunks by DMA, the short tail by PIO.
        let dev = HostDevice::new(HostDeviceConfig::default());
        let device: Arc<dyn Device> = Arc::new(dev.clone());
        let loader = Loader::new(&engine, device.clone(), cfg(3, 64 << 10, 4096)).unwrap();
        let buf = DeviceBuffer::alloc(&device, bytes.len()).unwrap();
        let len = 3 * 65536 + 1000;
        let st = loader.load_range(&file, 0, &buf, 0, len as u64).unwrap();
        assert_eq!((st.dma_copies, st.pio_copies), (3, 1), "{backend}");
        assert_eq!(readback(&buf, 0, len), bytes[..len]);
        let kinds: Vec<CopyKind> = dev.copy_log().iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                CopyKind::HostToDevice,
                CopyKind::HostToDevice,
                CopyKind::HostToDevice,
                CopyKind::HostToDeviceMapped
            ]
        );
        assert_eq!(dev.reuse_violations(), 0);
        assert!(!st.note.contains("programmed I/O"), "{}", st.note);
    }
}

#[test]
fn without_host_mapping_small_copies_fall_back_to_dma_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(5, 10_000);
    let path = dir.path().join("f");
    std::fs::write(&path, &bytes).unwrap();
    let file = gpuio::File::open(&path).unwrap();
    let (_, engine) = engines().remove(0);
    let dev = HostDevice::new(HostDeviceConfig {
        no_host_mapping: true,
        ..HostDeviceConfig::default()
    });
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let loader = Loader::new(&engine, device.clone(), cfg(2, 64 << 10, 1 << 20)).unwrap();
    let buf = DeviceBuffer::alloc(&device, bytes.len()).unwrap();
    let st = loader
        .load_range(&file, 0, &buf, 0, bytes.len() as u64)
        .unwrap();
    assert_eq!((st.pio_copies, st.dma_copies), (0, 1));
    assert!(st.note.contains("not mapped"), "{}", st.note);
    assert_eq!(readback(&buf, 0, bytes.len()), bytes);
}

#[test]
fn a_failed_programmed_io_copy_is_an_error_and_releases_everything() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(6, 300_000);
    let path = dir.path().join("f");
    std::fs::write(&path, &bytes).unwrap();
    let file = gpuio::File::open(&path).unwrap();
    let (_, engine) = engines().remove(0);
    let dev = HostDevice::new(HostDeviceConfig {
        fail_copy_nth: Some(2),
        ..HostDeviceConfig::default()
    });
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let loader = Loader::new(&engine, device.clone(), cfg(2, 64 << 10, 64 << 10)).unwrap();
    let buf = DeviceBuffer::alloc(&device, bytes.len()).unwrap();
    let e = loader
        .load_range(&file, 0, &buf, 0, bytes.len() as u64)
        .unwrap_err();
    assert!(e.to_string().contains("injected failure of copy 2"), "{e}");
    assert_eq!(loader.staging_pool().unwrap().available(), 2);
    drop(buf);
    assert_eq!(dev.allocated_bytes(), 0);
}

#[test]
fn a_safetensors_file_inside_a_pack_loads_with_its_tensor_table() {
    use gpuio_cuda::safetensors::serialize;
    use gpuio_cuda::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let a = data(7, 300_001);
    let b = data(8, 4_000);
    let img = serialize(
        &[
            ("a", Dtype::U8, &[300_001], &a),
            ("b", Dtype::F32, &[1000], &b),
        ],
        &[("format", "pt")],
    );
    // A truncated copy: its header promises more body than the entry holds.
    let short = &img[..img.len() - 10];
    let path = make_pack(
        dir.path(),
        Codec::Zstd,
        32 << 10,
        &[("m.safetensors", &img), ("short.safetensors", short)],
    );
    let pack = Pack::open(&path).unwrap();
    let (_, engine) = engines().remove(0);
    let dev = HostDevice::new(HostDeviceConfig::default());
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let loader = Loader::new(&engine, device.clone(), cfg(3, 64 << 10, 0)).unwrap();
    let m = loader
        .load_safetensors_entry(&pack.entry("m.safetensors").unwrap())
        .unwrap();
    assert_eq!(m.stats.path, LoadPath::StagedPack);
    assert_eq!(m.metadata, vec![("format".into(), "pt".into())]);
    let crc = |b: &[u8]| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32;
    assert_eq!(m.tensors.len(), 2);
    assert_eq!(m.crc32c(&m.tensors[0]).unwrap(), crc(&a));
    assert_eq!(m.crc32c(&m.tensors[1]).unwrap(), crc(&b));
    drop(m);
    let calls = dev.alloc_calls();
    let e = loader
        .load_safetensors_entry(&pack.entry("short.safetensors").unwrap())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("short.safetensors"), "{e}");
    assert_eq!(dev.alloc_calls(), calls, "nothing allocated for a bad file");
}
