//! The staged store path (device → pinned staging → file) on the host-memory stand-in: the same
//! staging, ordering and error code that drives a GPU. Every store is checked byte for byte against
//! the whole file (the bytes around the stored range too), every failure must leave every staging
//! buffer back in its pool, and a failed save must leave the destination as it was with no
//! temporary file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;

use gpuio::backend::BackendKind;
use gpuio::{DirectMode, Engine, ErrorKind, OpenOptions};
use gpuio_cuda::device::{CopyKind, CopyRecord};
use gpuio_cuda::safetensors::{read_header, serialize};
use gpuio_cuda::store::encode_safetensors_header;
use gpuio_cuda::{Device, DeviceBuffer, Dtype, HostDevice, HostDeviceConfig, Loader, LoaderConfig};
use gpuio_testkit::{engines, faulty_engine, temp_files, working_kinds, Fault, FaultPlan, Rng};

const STAGING: usize = 64 << 10;

/// A loader onto a default stand-in device through a thread-pool engine (returned too: the loader's
/// queue needs it alive).
fn threads_loader(buffers: usize) -> (Engine, Loader) {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig::default()));
    let loader = Loader::new(&engine, device, cfg(buffers)).unwrap();
    (engine, loader)
}

fn cfg(buffers: usize) -> LoaderConfig {
    LoaderConfig {
        staging_buffers: buffers,
        staging_bytes: STAGING,
        timeline: true,
        ..LoaderConfig::default()
    }
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill(&mut v);
    v
}

fn open_rw(path: &Path) -> gpuio::File {
    OpenOptions::create()
        .direct(DirectMode::Auto)
        .open(path)
        .unwrap()
}

/// `data` on the loader's device: written to a file, loaded with `load_range`, read back and checked.
fn to_device(loader: &Loader, dir: &Path, name: &str, data: &[u8]) -> DeviceBuffer {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    let buf = DeviceBuffer::alloc(loader.device(), data.len()).unwrap();
    let f = gpuio::File::open(&path).unwrap();
    loader
        .load_range(&f, 0, &buf, 0, data.len() as u64)
        .unwrap();
    let mut back = vec![0u8; data.len()];
    buf.read(0, &mut back).unwrap();
    assert!(back == data, "the device does not hold the data to store");
    buf
}

/// Chunks a store of `len` bytes at file offset `offset` is cut into: boundaries at multiples of
/// the staging size counted from the page below `offset`.
fn expected_chunks(offset: u64, len: u64) -> usize {
    if len == 0 {
        return 0;
    }
    (offset % 4096 + len).div_ceil(STAGING as u64) as usize
}

/// `(src_offset, file_offset, len)` cases over a device buffer of `n` bytes: empty, one byte,
/// around a page, several chunks with an unaligned tail, unaligned source and file offsets.
fn cases(n: u64) -> Vec<(u64, u64, u64)> {
    vec![
        (0, 0, 0),
        (0, 0, 1),
        (3, 5, 1),
        (0, 0, 4095),
        (0, 0, 4096),
        (0, 0, n),
        (7, 4093, 3 * STAGING as u64 + 123),
        (4096, STAGING as u64, 2 * STAGING as u64),
        (1, 1, STAGING as u64 - 1),
        (100, 70_000, n - 100),
    ]
}

#[test]
fn device_ranges_store_byte_exact_with_1_2_3_staging_buffers_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let n = 5 * STAGING + 1000;
    let data = random_bytes(1, n);
    let mut ran = Vec::new();
    for (label, engine) in engines() {
        for buffers in 1..=3 {
            let dev = HostDevice::new(HostDeviceConfig::default());
            let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(buffers)).unwrap();
            let src = to_device(
                &loader,
                dir.path(),
                &format!("src-{label}-{buffers}"),
                &data,
            );
            for (i, &(src_off, off, len)) in cases(n as u64).iter().enumerate() {
                let what = format!(
                    "{label}, {buffers} buffers, case {i} {:?}",
                    (src_off, off, len)
                );
                let path = dir.path().join(format!("out-{label}-{buffers}-{i}"));
                // Even cases write into a file that has other bytes around the range (which must
                // stay); odd cases into a new empty file (which grows to the end of the range).
                let mut want = if i % 2 == 0 {
                    let bg = random_bytes(1000 + i as u64, (off + len) as usize + 5000);
                    std::fs::write(&path, &bg).unwrap();
                    bg
                } else if len == 0 {
                    Vec::new()
                } else {
                    vec![0u8; off as usize]
                };
                let (s, e) = (src_off as usize, (src_off + len) as usize);
                if len > 0 {
                    let at = off as usize;
                    want.resize(want.len().max(at + e - s), 0);
                    want[at..at + e - s].copy_from_slice(&data[s..e]);
                }
                let file = open_rw(&path);
                let stats = loader.store_range(&src, src_off, &file, off, len).unwrap();
                drop(file);
                let got = std::fs::read(&path).unwrap();
                assert_eq!(got.len(), want.len(), "{what}: file length");
                if let Some(p) = got.iter().zip(&want).position(|(a, b)| a != b) {
                    panic!("{what}: first wrong byte at file offset {p}");
                }
                assert_eq!(stats.bytes, len, "{what}");
                assert_eq!(stats.chunks, expected_chunks(off, len), "{what}: {stats:?}");
                assert_eq!(stats.timeline.len(), stats.chunks, "{what}");
                assert_eq!(
                    stats.timeline.iter().map(|t| t.len).sum::<u64>(),
                    len,
                    "{what}"
                );
                assert_eq!(
                    loader.staging_pool().unwrap().available(),
                    buffers,
                    "{what}"
                );
            }
            assert_eq!(dev.reuse_violations(), 0, "{label}");
            ran.push(label.clone());
        }
    }
    assert!(ran.iter().any(|l| l == "threads"), "{ran:?}");
    eprintln!("backends covered: {ran:?}");
}

/// The device → host copies of a store, in execution order.
fn d2h_copies(dev: &HostDevice) -> Vec<CopyRecord> {
    dev.copy_log()
        .into_iter()
        .filter(|c| c.kind == CopyKind::DeviceToHost)
        .collect()
}

#[test]
fn copies_and_writes_overlap_only_with_two_or_more_buffers_and_never_exceed_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let n = 8 * STAGING;
    let data = random_bytes(2, n);
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let mut overlapped = Vec::new();
    for buffers in 1..=3 {
        let dev = HostDevice::new(HostDeviceConfig {
            copy_delay: Duration::from_millis(15),
            ..HostDeviceConfig::default()
        });
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(buffers)).unwrap();
        let src = to_device(&loader, dir.path(), &format!("src{buffers}"), &data);
        let path = dir.path().join(format!("out{buffers}"));
        let stats = loader
            .store_range(&src, 0, &open_rw(&path), 0, n as u64)
            .unwrap();
        assert!(std::fs::read(&path).unwrap() == data, "{buffers} buffers");
        let log = d2h_copies(&dev);
        let tl = &stats.timeline;
        assert_eq!((log.len(), tl.len(), stats.chunks), (8, 8, 8));
        for (k, t) in tl.iter().enumerate() {
            assert_eq!(t.chunk, k);
            assert_eq!(t.file_offset, (k * STAGING) as u64);
            // Copies run in chunk order; a chunk is written only after its copy finished.
            assert_eq!(log[k].ticket, t.ticket, "chunk {k}");
            assert_eq!(log[k].len, STAGING);
            assert!(t.copy_queued <= log[k].started);
            assert!(t.write_issued >= log[k].finished, "chunk {k} written early");
            assert!(t.write_done >= t.write_issued);
        }
        // Each chunk holds a staging buffer from its copy's queueing to its write's end: never more
        // of those at once than there are buffers (ends sort before starts at the same instant).
        let mut events: Vec<(std::time::Instant, i32)> = tl
            .iter()
            .flat_map(|t| [(t.copy_queued, 1), (t.write_done, -1)])
            .collect();
        events.sort();
        let (mut live, mut most) = (0, 0);
        for (_, d) in events {
            live += d;
            most = most.max(live);
        }
        assert!(
            most <= buffers as i32,
            "{most} chunks in flight with {buffers} buffers"
        );
        // Did chunk k's write run while chunk k+1's copy was running (the intervals intersect)?
        let n_over = (0..tl.len() - 1)
            .filter(|&k| {
                log[k + 1].started < tl[k].write_done && tl[k].write_issued < log[k + 1].finished
            })
            .count();
        overlapped.push(n_over);
        if buffers == 1 {
            assert_eq!(n_over, 0, "one staging buffer cannot overlap: {tl:?}");
            for k in 0..tl.len() - 1 {
                assert!(
                    tl[k].write_done <= log[k + 1].started,
                    "one buffer: copy {} started before write {k} completed",
                    k + 1
                );
            }
        } else {
            assert!(
                most >= 2,
                "{buffers} buffers but never two chunks in flight"
            );
            assert!(
                n_over >= (tl.len() - 1) / 2,
                "{buffers} buffers overlapped only {n_over} of {} chunks: {tl:?}",
                tl.len() - 1
            );
        }
    }
    eprintln!("chunks whose write overlapped the next copy, 1/2/3 buffers: {overlapped:?}");
}

#[test]
fn write_faults_fail_the_store_with_the_file_and_offset_and_release_every_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let n = 5 * STAGING + 777;
    let data = random_bytes(3, n);
    for kind in working_kinds() {
        for (errno, want_kind) in [
            (libc::ENOSPC, ErrorKind::NoSpace),
            (libc::EIO, ErrorKind::Io),
        ] {
            for nth in [1u64, 3, 6] {
                let what = format!("{} errno {errno} on write {nth}", kind.name());
                let (engine, handle) = faulty_engine(nth, FaultPlan::none(), kind).unwrap();
                let dev = HostDevice::new(HostDeviceConfig {
                    copy_delay: Duration::from_millis(1),
                    ..HostDeviceConfig::default()
                });
                let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(2)).unwrap();
                let src = to_device(&loader, dir.path(), "src", &data);
                let path = dir
                    .path()
                    .join(format!("out-{}-{errno}-{nth}", kind.name()));
                let file = open_rw(&path);
                handle.set_plan(FaultPlan::none().with_fail_nth(nth, errno, false));
                let e = loader
                    .store_range(&src, 0, &file, 4000, n as u64)
                    .unwrap_err();
                let inj: Vec<_> = handle
                    .log()
                    .into_iter()
                    .filter(|i| matches!(i.fault, Fault::Errno { nth: true, .. }))
                    .collect();
                assert_eq!(inj.len(), 1, "{what}: {inj:?}");
                assert_eq!(e.kind(), want_kind, "{what}: {e}");
                assert_eq!(e.errno(), Some(errno), "{what}: {e}");
                assert_eq!(e.path(), Some(path.as_path()), "{what}: {e}");
                assert_eq!(e.offset(), Some(inj[0].offset), "{what}: {e}");
                // The context names the chunk holding the failed write (chunks start at 4000,
                // then at multiples of 64 KiB) and where that chunk starts in the file.
                let k = inj[0].offset / STAGING as u64;
                let start = (k * STAGING as u64).max(4000);
                let ctx = e.context().unwrap_or_default();
                assert!(
                    ctx.contains(&format!("writing chunk {k} "))
                        && ctx.contains(&format!("at file offset {start}")),
                    "{what}: {e}"
                );
                assert_eq!(loader.staging_pool().unwrap().available(), 2, "{what}");
                // The loader works once the fault is gone, and the bytes are exact.
                handle.set_plan(FaultPlan::none());
                loader.store_range(&src, 0, &file, 4000, n as u64).unwrap();
                let got = std::fs::read(&path).unwrap();
                assert_eq!(got.len(), 4000 + n, "{what}");
                assert!(
                    got[4000..] == data[..],
                    "{what}: bytes differ after a retry"
                );
            }
        }
    }
}

#[test]
fn transient_faults_and_short_writes_still_store_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let n = 6 * STAGING + 4321;
    let data = random_bytes(4, n);
    let mut shorts = 0;
    for kind in working_kinds() {
        let plan = FaultPlan::benign(0.5).with_delay(0.3, Duration::from_millis(2));
        let (engine, handle) = faulty_engine(4, FaultPlan::none(), kind).unwrap();
        let loader = Loader::new(
            &engine,
            Arc::new(HostDevice::new(Default::default())),
            cfg(3),
        )
        .unwrap();
        let src = to_device(&loader, dir.path(), "src", &data);
        handle.set_plan(plan);
        let path = dir.path().join(format!("out-{}", kind.name()));
        loader
            .store_range(&src, 0, &open_rw(&path), 123, n as u64)
            .unwrap();
        shorts += handle.counts().short_writes;
        let got = std::fs::read(&path).unwrap();
        assert!(got[..123].iter().all(|&b| b == 0));
        assert!(got[123..] == data[..], "{}", kind.name());
    }
    assert!(shorts > 0, "no short write was injected");
}

#[test]
fn a_failed_device_to_host_copy_fails_the_store_and_releases_every_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let n = 6 * STAGING + 99;
    let data = random_bytes(5, n);
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    // Loading the data takes this many host → device copies first (file offset 0, 64 KiB chunks).
    let loads = n.div_ceil(STAGING) as u64;
    for j in [1u64, 2, 5] {
        let nth = loads + j;
        let dev = HostDevice::new(HostDeviceConfig {
            fail_copy_nth: Some(nth),
            copy_delay: Duration::from_millis(1),
            ..HostDeviceConfig::default()
        });
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(3)).unwrap();
        let src = to_device(&loader, dir.path(), "src", &data);
        assert_eq!(dev.copy_log().len() as u64, loads);
        let path = dir.path().join(format!("out{j}"));
        let e = loader
            .store_range(&src, 0, &open_rw(&path), 0, n as u64)
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains(&format!("injected failure of copy {nth}")),
            "{s}"
        );
        assert!(s.contains("device-to-host copy"), "{s}");
        assert!(s.contains("chunk"), "{s}");
        assert!(s.contains(&*path.display().to_string()), "{s}");
        assert_eq!(loader.staging_pool().unwrap().available(), 3, "copy {j}");
        assert_eq!(dev.allocated_bytes(), n as u64, "only the source buffer");
        // The stream's error is sticky (as on a GPU): a new loader on the same device works.
        drop(loader);
        assert_eq!(dev.pinned_bytes(), 0);
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(3)).unwrap();
        loader
            .store_range(&src, 0, &open_rw(&path), 0, n as u64)
            .unwrap();
        assert!(std::fs::read(&path).unwrap() == data, "copy {j}");
    }
}

#[test]
fn bad_ranges_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dev = HostDevice::new(HostDeviceConfig::default());
    let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(2)).unwrap();
    let src = to_device(&loader, dir.path(), "src", &random_bytes(6, 100));
    let path = dir.path().join("out");
    let file = open_rw(&path);
    for (src_off, off, len) in [
        (0, 0, 101),
        (50, 0, 51),
        (101, 0, 0),
        (u64::MAX, 0, 2),
        (0, u64::MAX - 1, 2),
        (0, i64::MAX as u64, 1),
    ] {
        let e = loader
            .store_range(&src, src_off, &file, off, len)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    let ro = gpuio::File::open(&path).unwrap();
    let e = loader.store_range(&src, 0, &ro, 0, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        0,
        "something was written"
    );
    assert_eq!(d2h_copies(&dev).len(), 0, "something was copied");
    assert_eq!(loader.staging_pool().unwrap().available(), 2);
}

/// A random safetensors file (see `common::random_model`).
fn random_model(dir: &Path, seed: u64, n: usize, max_elems: u64) -> PathBuf {
    common::random_model(dir, seed, n, max_elems).0
}

#[test]
fn a_loaded_model_saves_back_byte_for_byte_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    for (label, engine) in engines() {
        for buffers in [1, 3] {
            let dev = HostDevice::new(HostDeviceConfig::default());
            let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(buffers)).unwrap();
            for seed in 0..2u64 {
                let input = random_model(dir.path(), seed * 10 + buffers as u64, 10, 9000);
                let model = loader.load_safetensors(&input).unwrap();
                let out = dir
                    .path()
                    .join(format!("saved-{label}-{buffers}-{seed}.safetensors"));
                if seed == 1 {
                    std::fs::write(&out, b"an older version").unwrap(); // replaced whole
                }
                let stats = loader.save_safetensors(&model, &out).unwrap();
                let (a, b) = (std::fs::read(&input).unwrap(), std::fs::read(&out).unwrap());
                assert_eq!(a.len(), b.len(), "{label}");
                if let Some(p) = a.iter().zip(&b).position(|(x, y)| x != y) {
                    panic!("{label}, {buffers} buffers: saved file differs at byte {p}");
                }
                assert_eq!(stats.bytes, model.buffer.len() as u64);
                assert!(stats.chunks >= 2, "{label}: too small to stage: {stats:?}");
                assert_eq!(read_header(&out).unwrap(), read_header(&input).unwrap());
                assert!(temp_files(dir.path()).is_empty(), "{label}");
                assert_eq!(loader.staging_pool().unwrap().available(), buffers);
            }
        }
    }
}

#[test]
fn empty_and_tiny_models_save_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, loader) = threads_loader(2);
    let images = [
        serialize(&[], &[]),
        serialize(&[], &[("k", "v")]),
        serialize(&[("t", Dtype::U8, &[1], &[42])], &[]),
        serialize(
            &[("e", Dtype::F32, &[0], &[]), ("t", Dtype::U8, &[1], &[7])],
            &[],
        ),
    ];
    for (i, img) in images.iter().enumerate() {
        let input = dir.path().join(format!("in{i}.safetensors"));
        std::fs::write(&input, img).unwrap();
        let model = loader.load_safetensors(&input).unwrap();
        let out = dir.path().join(format!("out{i}.safetensors"));
        loader.save_safetensors(&model, &out).unwrap();
        assert_eq!(&std::fs::read(&out).unwrap(), img, "image {i}");
    }
}

#[test]
fn the_header_encoder_matches_serialize_and_refuses_tables_that_would_not_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_engine, loader) = threads_loader(2);
    // Several seeds, so that header lengths cover every remainder modulo 8 (padding).
    let mut pads = std::collections::BTreeSet::new();
    for seed in 40..72 {
        let input = random_model(dir.path(), seed, 7, 500);
        let img = std::fs::read(&input).unwrap();
        let model = loader.load_safetensors(&input).unwrap();
        let h = read_header(&input).unwrap();
        let header = encode_safetensors_header(&model.tensors, &model.metadata).unwrap();
        assert_eq!(header.len() as u64, h.body_offset, "seed {seed}");
        assert!(header[..] == img[..h.body_offset as usize], "seed {seed}");
        let json_end = img[..h.body_offset as usize]
            .iter()
            .rposition(|&b| b != b' ')
            .unwrap();
        pads.insert(h.body_offset as usize - 1 - json_end);
    }
    assert!(pads.len() >= 4, "padding lengths seen: {pads:?}");
    let input = random_model(dir.path(), 42, 7, 500);
    let model = loader.load_safetensors(&input).unwrap();

    let bad = |edit: &dyn Fn(&mut Vec<gpuio_cuda::DeviceTensor>)| {
        let mut t = model.tensors.clone();
        edit(&mut t);
        encode_safetensors_header(&t, &model.metadata).unwrap_err()
    };
    let gap = bad(&|t| t[1].offset += 1);
    assert_eq!(gap.kind(), ErrorKind::InvalidInput, "{gap}");
    assert!(gap.to_string().contains(&model.tensors[1].name), "{gap}");
    let size = bad(&|t| t.last_mut().unwrap().shape[0] += 1);
    assert_eq!(size.kind(), ErrorKind::InvalidInput, "{size}");
    let dup = bad(&|t| t[1].name = t[0].name.clone());
    assert_eq!(dup.kind(), ErrorKind::InvalidInput, "{dup}");
    let meta = bad(&|t| t[0].name = "__metadata__".into());
    assert_eq!(meta.kind(), ErrorKind::InvalidInput, "{meta}");

    // A model whose table does not describe its buffer is refused before anything is written.
    let mut broken = loader.load_safetensors(&input).unwrap();
    broken.tensors.pop();
    let out = dir.path().join("broken.safetensors");
    let e = loader.save_safetensors(&broken, &out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(!out.exists());
    assert!(temp_files(dir.path()).is_empty());
}

/// Saves `model` through a faulty engine, expecting failure: the destination must be as before
/// (`old`: its bytes, or absent) and no temporary file left.
fn assert_failed_save_leaves_nothing(
    loader: &Loader,
    model: &gpuio_cuda::LoadedModel,
    dest: &Path,
    old: Option<&[u8]>,
    what: &str,
) -> gpuio::Error {
    let e = loader.save_safetensors(model, dest).unwrap_err();
    match old {
        Some(bytes) => assert!(
            std::fs::read(dest).unwrap() == bytes,
            "{what}: the destination changed"
        ),
        None => assert!(!dest.exists(), "{what}: a destination appeared"),
    }
    let dir = dest.parent().unwrap();
    assert!(
        temp_files(dir).is_empty(),
        "{what}: temp files {:?}",
        temp_files(dir)
    );
    assert_eq!(
        loader.staging_pool().unwrap().available(),
        loader.config().staging_buffers,
        "{what}"
    );
    assert!(
        e.to_string().contains(&*dest.display().to_string()),
        "{what}: {e}"
    );
    e
}

#[test]
fn a_failed_save_leaves_the_destination_untouched_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = random_model(dir.path(), 7, 10, 20_000);
    let want = std::fs::read(&input).unwrap();
    let old = b"the previous version".to_vec();
    for kind in working_kinds() {
        let (engine, handle) = faulty_engine(7, FaultPlan::none(), kind).unwrap();
        let loader = Loader::new(
            &engine,
            Arc::new(HostDevice::new(Default::default())),
            cfg(2),
        )
        .unwrap();
        let model = loader.load_safetensors(&input).unwrap();
        let existing = dir
            .path()
            .join(format!("existing-{}.safetensors", kind.name()));
        let absent = dir
            .path()
            .join(format!("absent-{}.safetensors", kind.name()));
        std::fs::write(&existing, &old).unwrap();
        let plans = [
            (
                "ENOSPC on the 1st write",
                FaultPlan::none().with_fail_nth(1, libc::ENOSPC, false),
            ),
            (
                "ENOSPC on the 4th write",
                FaultPlan::none().with_fail_nth(4, libc::ENOSPC, false),
            ),
            (
                "EIO on the 3rd write",
                FaultPlan::none().with_fail_nth(3, libc::EIO, false),
            ),
            ("EIO on every sync", FaultPlan::none().with_sync_eio(1.0)),
        ];
        for (name, plan) in plans {
            for (dest, before) in [(&existing, Some(old.as_slice())), (&absent, None)] {
                let what = format!("{}: {name}", kind.name());
                handle.set_plan(plan);
                handle.reset();
                let e = assert_failed_save_leaves_nothing(&loader, &model, dest, before, &what);
                assert!(handle.counts().hard_errors() >= 1, "{what}: no fault fired");
                assert!(
                    matches!(e.kind(), ErrorKind::NoSpace | ErrorKind::Io),
                    "{what}: {e}"
                );
            }
        }
        // With the faults gone the same loader saves the model exactly, replacing the old file.
        handle.set_plan(FaultPlan::none());
        loader.save_safetensors(&model, &existing).unwrap();
        assert!(std::fs::read(&existing).unwrap() == want, "{}", kind.name());
    }
}

#[test]
fn a_copy_failing_during_a_save_leaves_the_destination_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let input = random_model(dir.path(), 8, 10, 20_000);
    let h = read_header(&input).unwrap();
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    // The load's host → device copies come first: chunks from the page below the body's offset.
    let loads = (h.body_offset % 4096 + h.body_len).div_ceil(STAGING as u64);
    let dest = dir.path().join("dest.safetensors");
    let old = b"keep me".to_vec();
    std::fs::write(&dest, &old).unwrap();
    for j in [1u64, 3] {
        let dev = HostDevice::new(HostDeviceConfig {
            fail_copy_nth: Some(loads + j),
            ..HostDeviceConfig::default()
        });
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(3)).unwrap();
        let model = loader.load_safetensors(&input).unwrap();
        assert_eq!(model.stats.chunks as u64, loads);
        let e = assert_failed_save_leaves_nothing(&loader, &model, &dest, Some(&old), "copy");
        assert!(
            e.to_string()
                .contains(&format!("injected failure of copy {}", loads + j)),
            "{e}"
        );
    }
}

#[test]
fn on_a_gpu_stores_and_saves_are_byte_exact() {
    let st = gpuio_cuda::cuda::driver_status();
    if !st.available {
        eprintln!("skipped: no usable GPU here: {}", st.reason);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(gpuio::EngineConfig::default()).unwrap();
    let device: Arc<dyn Device> = gpuio_cuda::open_device("cuda:0").unwrap();
    let data = random_bytes(9, 5 * STAGING + 1000);
    for buffers in 1..=3 {
        let loader = Loader::new(&engine, device.clone(), cfg(buffers)).unwrap();
        let src = to_device(&loader, dir.path(), "src", &data);
        let path = dir.path().join(format!("out{buffers}"));
        loader
            .store_range(&src, 7, &open_rw(&path), 4093, data.len() as u64 - 7)
            .unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got[4093..] == data[7..], "{buffers} buffers");
        let input = random_model(dir.path(), 100 + buffers as u64, 12, 20_000);
        let model = loader.load_safetensors(&input).unwrap();
        let out = dir.path().join(format!("saved{buffers}.safetensors"));
        loader.save_safetensors(&model, &out).unwrap();
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&input).unwrap());
    }
}

#[test]
fn an_unchanged_model_keeps_its_original_header_and_a_changed_one_is_re_encoded() {
    let dir = tempfile::tempdir().unwrap();
    // A header no writer of ours would produce: unpadded, tensors listed out of body order, spaces.
    let json = br#"{ "b": {"dtype":"U8","shape":[2],"data_offsets":[3,5]}, "a": {"dtype":"U8","shape":[3],"data_offsets":[0,3]} }"#;
    let mut img = (json.len() as u64).to_le_bytes().to_vec();
    img.extend_from_slice(json);
    img.extend_from_slice(&[1, 2, 3, 4, 5]);
    let input = dir.path().join("odd.safetensors");
    std::fs::write(&input, &img).unwrap();
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig::default()));
    let loader = Loader::new(&engine, device, cfg(2)).unwrap();
    let mut model = loader.load_safetensors(&input).unwrap();
    let out = dir.path().join("same.safetensors");
    loader.save_safetensors(&model, &out).unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        img,
        "unchanged model, same bytes"
    );

    model.tensors[1].name = "renamed".into();
    let out2 = dir.path().join("renamed.safetensors");
    loader.save_safetensors(&model, &out2).unwrap();
    let saved = std::fs::read(&out2).unwrap();
    assert_ne!(saved, img);
    let h = read_header(&out2).unwrap();
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "renamed"]);
    assert_eq!(&saved[saved.len() - 5..], &[1, 2, 3, 4, 5]);
}
