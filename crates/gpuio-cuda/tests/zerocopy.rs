//! Zero-copy mapping of safetensors files on the host-memory stand-in: tensors are read through the
//! device at their mapped addresses and checked against the file; bad files and devices that cannot
//! map fail before (or without leaving) any mapping.

use std::sync::Arc;

use gpuio::ErrorKind;
use gpuio_cuda::safetensors::serialize;
use gpuio_cuda::{map_safetensors, Device, Dtype, HostDevice, HostDeviceConfig, LoadPath};
use gpuio_testkit::Rng;

fn crc32c(b: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32
}

#[test]
fn mapped_tensors_read_back_as_in_the_file_and_unmap_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(11);
    let owned: Vec<(String, Vec<u64>, Vec<u8>)> = (0..9)
        .map(|i| {
            let n = rng.below(5000) as usize; // includes empty tensors
            (
                format!("t{i}"),
                vec![n as u64],
                (0..n * 2).map(|_| rng.next_u32() as u8).collect(),
            )
        })
        .collect();
    let views: Vec<(&str, Dtype, &[u64], &[u8])> = owned
        .iter()
        .map(|(n, s, b)| (n.as_str(), Dtype::F16, s.as_slice(), b.as_slice()))
        .collect();
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, serialize(&views, &[("k", "v")])).unwrap();

    let dev = HostDevice::new(HostDeviceConfig::default());
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let m = map_safetensors(&device, &path).unwrap();
    assert_eq!(m.stats.path, LoadPath::ZeroCopy);
    assert_eq!(dev.mapped_ranges(), 1);
    assert_eq!(
        dev.allocated_bytes(),
        0,
        "zero-copy allocates no device memory"
    );
    assert!(dev.copy_log().is_empty(), "zero-copy copies nothing");
    assert_eq!(m.metadata, vec![("k".to_string(), "v".to_string())]);
    for (t, (name, shape, bytes)) in m.tensors.iter().zip(&owned) {
        assert_eq!(
            (&t.name, &t.shape, t.bytes),
            (name, shape, bytes.len() as u64)
        );
        assert_eq!(m.crc32c(t).unwrap(), crc32c(bytes), "{name}");
    }
    // Device pointers are the mapping's addresses: body offset + tensor offset.
    let file = std::fs::read(&path).unwrap();
    let body = 8 + u64::from_le_bytes(file[..8].try_into().unwrap());
    assert!(m
        .tensors
        .iter()
        .all(|t| t.device_ptr == m.base() + body + t.offset));
    drop(m);
    assert_eq!(dev.mapped_ranges(), 0, "dropping the model unmaps it");
}

#[test]
fn a_device_that_cannot_map_host_memory_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    std::fs::write(&path, serialize(&[("w", Dtype::U8, &[3], &[1, 2, 3])], &[])).unwrap();
    let dev = HostDevice::new(HostDeviceConfig {
        no_host_mapping: true,
        ..HostDeviceConfig::default()
    });
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let e = map_safetensors(&device, &path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("zero-copy"), "{e}");
    assert_eq!(dev.mapped_ranges(), 0);
}

#[test]
fn a_damaged_file_is_refused_before_anything_is_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut img = serialize(&[("w", Dtype::F32, &[4], &[0u8; 16])], &[]);
    img.truncate(img.len() - 1);
    std::fs::write(&path, img).unwrap();
    let dev = HostDevice::new(HostDeviceConfig::default());
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let e = map_safetensors(&device, &path).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("m.safetensors"), "{e}");
    assert_eq!(dev.mapped_ranges(), 0);
}
