//! Which path a load takes and why: `PathChoice::{Auto, Staged, Direct}` on the host stand-in, with
//! and without a direct reader, with direct and buffered files. Every load is checked byte for byte.

use std::sync::Arc;

use gpuio::{DirectMode, Engine, EngineConfig, ErrorKind, OpenOptions};
use gpuio_cuda::loader::PathChoice;
use gpuio_cuda::{
    Device, DeviceBuffer, HostDevice, HostDeviceConfig, LoadPath, Loader, LoaderConfig,
};
use gpuio_testkit::Rng;

fn setup(direct_reads: bool, fail_nth: Option<u64>, path: PathChoice) -> (HostDevice, Loader) {
    let dev = HostDevice::new(HostDeviceConfig {
        direct_reads,
        fail_direct_read_nth: fail_nth,
        ..HostDeviceConfig::default()
    });
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let cfg = LoaderConfig {
        staging_bytes: 256 << 10,
        path,
        ..LoaderConfig::default()
    };
    (dev, Loader::new(&engine, device, cfg).unwrap())
}

fn file_with(dir: &std::path::Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let mut rng = Rng::new(len as u64);
    let bytes: Vec<u8> = (0..len).map(|_| rng.next_u32() as u8).collect();
    let p = dir.join("f");
    std::fs::write(&p, &bytes).unwrap();
    (p, bytes)
}

fn check(loader: &Loader, buf: &DeviceBuffer, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    buf.read(0, &mut got).unwrap();
    assert!(got == want, "bytes differ");
    // (Asking for the pool would make it on the direct path, which has none until it needs one.)
    if loader.has_staging() {
        assert_eq!(
            loader.staging_pool().unwrap().available(),
            loader.config().staging_buffers
        );
    }
}

#[test]
fn auto_without_a_direct_reader_stages_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (p, bytes) = file_with(dir.path(), 1_000_003);
    let (dev, loader) = setup(false, None, PathChoice::Auto);
    let file = gpuio::File::open(&p).unwrap();
    let buf = DeviceBuffer::alloc(loader.device(), bytes.len()).unwrap();
    let st = loader
        .load_range(&file, 0, &buf, 0, bytes.len() as u64)
        .unwrap();
    assert_eq!(st.path, LoadPath::Staged);
    assert!(st.note.contains("direct path unavailable"), "{}", st.note);
    assert_eq!(dev.direct_reads(), 0);
    check(&loader, &buf, &bytes);
}

#[test]
fn direct_without_a_reader_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (p, bytes) = file_with(dir.path(), 5000);
    let (_, loader) = setup(false, None, PathChoice::Direct);
    let file = gpuio::File::open(&p).unwrap();
    let buf = DeviceBuffer::alloc(loader.device(), bytes.len()).unwrap();
    let e = loader.load_range(&file, 0, &buf, 0, 5000).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(
        e.to_string().contains("no direct path") && e.to_string().contains("/f"),
        "{e}"
    );
}

#[test]
fn direct_reads_into_device_memory_with_no_staging() {
    let dir = tempfile::tempdir().unwrap();
    let (p, bytes) = file_with(dir.path(), 3_000_001);
    let (dev, loader) = setup(true, None, PathChoice::Direct);
    let file = gpuio::File::open(&p).unwrap();
    let buf = DeviceBuffer::alloc(loader.device(), bytes.len() - 7).unwrap();
    let st = loader
        .load_range(&file, 7, &buf, 0, bytes.len() as u64 - 7)
        .unwrap();
    assert_eq!(st.path, LoadPath::Direct);
    assert_eq!(st.staging_buffers, 0);
    assert!(dev.direct_reads() >= 1);
    assert!(
        dev.copy_log().is_empty(),
        "the direct path made a staging copy"
    );
    check(&loader, &buf, &bytes[7..]);
    assert!(
        !loader.has_staging(),
        "a direct-path loader made staging buffers it never used"
    );
    assert_eq!(dev.pinned_bytes(), 0);
    assert!(
        loader.pin_note().contains("direct path"),
        "{}",
        loader.pin_note()
    );
}

#[test]
fn a_direct_path_loader_makes_its_staging_buffers_when_a_store_needs_them() {
    let dir = tempfile::tempdir().unwrap();
    let (p, bytes) = file_with(dir.path(), 1_500_000);
    let (dev, loader) = setup(true, None, PathChoice::Direct);
    let file = gpuio::File::open(&p).unwrap();
    let buf = DeviceBuffer::alloc(loader.device(), bytes.len()).unwrap();
    loader
        .load_range(&file, 0, &buf, 0, bytes.len() as u64)
        .unwrap();
    assert!(!loader.has_staging());
    // Device → file goes through staging: made now, once, page-locked like a staged loader's.
    let out_path = dir.path().join("out");
    let out = OpenOptions::create().open(&out_path).unwrap();
    loader
        .store_range(&buf, 0, &out, 0, bytes.len() as u64)
        .unwrap();
    assert!(loader.has_staging());
    assert!(
        loader.pin_note().contains("page-locked"),
        "{}",
        loader.pin_note()
    );
    let pinned = dev.pinned_bytes();
    assert_eq!(
        pinned,
        (loader.config().staging_buffers * loader.config().staging_bytes) as u64
    );
    loader
        .store_range(&buf, 0, &out, 0, bytes.len() as u64)
        .unwrap();
    assert_eq!(dev.pinned_bytes(), pinned, "made once");
    assert!(std::fs::read(&out_path).unwrap() == bytes);
    assert_eq!(
        loader.staging_pool().unwrap().available(),
        loader.config().staging_buffers
    );
    drop(loader);
    assert_eq!(dev.pinned_bytes(), 0, "unpinned with the loader");
}

#[test]
fn auto_takes_the_direct_path_only_for_direct_files() {
    let dir = tempfile::tempdir().unwrap();
    let (p, bytes) = file_with(dir.path(), 700_000);
    let (dev, loader) = setup(true, None, PathChoice::Auto);
    // A buffered file: staged, and the note says so.
    let buffered = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&p)
        .unwrap();
    let buf = DeviceBuffer::alloc(loader.device(), bytes.len()).unwrap();
    let st = loader
        .load_range(&buffered, 0, &buf, 0, bytes.len() as u64)
        .unwrap();
    assert_eq!(st.path, LoadPath::Staged);
    assert!(st.note.contains("not open O_DIRECT"), "{}", st.note);
    assert_eq!(dev.direct_reads(), 0);
    check(&loader, &buf, &bytes);
    // A direct file (where the filesystem allows O_DIRECT): direct.
    let file = gpuio::File::open(&p).unwrap();
    if !file.is_direct() {
        eprintln!(
            "skipped the O_DIRECT half: {} ({})",
            p.display(),
            file.direct_reason()
        );
        return;
    }
    let buf = DeviceBuffer::alloc(loader.device(), bytes.len()).unwrap();
    let st = loader
        .load_range(&file, 0, &buf, 0, bytes.len() as u64)
        .unwrap();
    assert_eq!(st.path, LoadPath::Direct, "{}", st.note);
    check(&loader, &buf, &bytes);
}

#[test]
fn a_failing_direct_read_is_an_error_not_a_silent_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let (p, bytes) = file_with(dir.path(), 2_000_000);
    let (dev, loader) = setup(true, Some(1), PathChoice::Direct);
    let file = gpuio::File::open(&p).unwrap();
    let buf = DeviceBuffer::alloc(loader.device(), bytes.len()).unwrap();
    let e = loader
        .load_range(&file, 0, &buf, 0, bytes.len() as u64)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(
        e.to_string().contains("injected failure of direct read 1"),
        "{e}"
    );
    assert!(
        dev.copy_log().is_empty(),
        "an I/O error must not fall back to staging"
    );
}
