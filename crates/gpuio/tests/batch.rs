//! The batch API (`CommandBuffer::set_buffer`, `load_into`, `store_from`): many small transfers into
//! and out of one buffer, one commit, one completion with each command's result — on every backend,
//! on direct, buffered and tmpfs files, with unaligned offsets and lengths, into a registered pool
//! buffer, and under injected faults.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use gpuio::backend::BackendKind;
use gpuio::{AlignedBuf, DirectMode, ErrorKind, File, IoBuffer, OpenOptions, QueueDesc, Status};
use gpuio_testkit::{
    engine, faulty_engine_with, scratch_dir, test_config, working_kinds, FaultPlan, Place, Rng,
};

const WAIT: Duration = Duration::from_secs(60);

/// `len` bytes in which every 4-byte word holds its own offset (so any misplaced byte shows).
fn content(len: usize) -> Vec<u8> {
    (0..len.div_ceil(4) as u32)
        .flat_map(|i| (i * 4).to_le_bytes())
        .take(len)
        .collect()
}

/// Opens the same file four ways: direct (where the filesystem takes it), buffered, on tmpfs, warm.
fn files(dir: &Path, shm: &Path, data: &[u8]) -> Vec<(String, File)> {
    let disk = dir.join("t.bin");
    let mem = shm.join("t.bin");
    std::fs::write(&disk, data).unwrap();
    std::fs::write(&mem, data).unwrap();
    vec![
        (
            "cold (direct)".into(),
            OpenOptions::read().cold(true).open(&disk).unwrap(),
        ),
        (
            "buffered".into(),
            OpenOptions::read()
                .direct(DirectMode::Off)
                .open(&disk)
                .unwrap(),
        ),
        ("tmpfs".into(), File::open(&mem).unwrap()),
        ("warm".into(), File::open(&disk).unwrap()),
    ]
}

/// `n` random (file offset, length) requests, laid out one after another in the shared buffer at
/// random gaps. Returns the requests with their buffer offsets, and the buffer size needed.
fn plan(rng: &mut Rng, n: usize, file_len: usize) -> (Vec<(u64, usize, usize)>, usize) {
    let mut at = 0usize;
    let mut reqs = Vec::with_capacity(n);
    for _ in 0..n {
        let len = match rng.below(4) {
            0 => 1 + rng.below(100) as usize,
            1 => 4096,
            2 => 1 + rng.below(20_000) as usize,
            _ => 4096 * (1 + rng.below(8) as usize),
        };
        let off = rng.below((file_len - len) as u64);
        at += rng.below(64) as usize;
        reqs.push((off, len, at));
        at += len;
    }
    (reqs, at)
}

#[test]
fn random_batches_are_byte_exact_on_every_backend_and_file_kind() {
    let data = content(8 << 20);
    let dir = scratch_dir(Place::Disk);
    let shm = scratch_dir(Place::Shm);
    let mut rng = Rng::new(0xBA7C);
    for kind in working_kinds() {
        let engine = engine(kind).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        for (label, file) in files(dir.path(), shm.path(), &data) {
            for round in 0..4 {
                let n = 1 + rng.below(200) as usize;
                let (reqs, size) = plan(&mut rng, n, data.len());
                let mut cb = queue.command_buffer();
                cb.set_buffer(AlignedBuf::new(size.max(1), 4096).unwrap())
                    .unwrap();
                let ids: Vec<_> = reqs
                    .iter()
                    .map(|&(off, len, at)| cb.load_into(&file, off, at, len).unwrap())
                    .collect();
                let c = cb.commit().unwrap();
                let status = c.wait_timeout(WAIT).expect("batch hung");
                assert!(status.is_complete(), "{kind}/{label}/{round}: {status:?}");
                let (_, mut done) = c.wait_parts();
                let buf = done.take_shared_buffer().expect("shared buffer comes back");
                for (&(off, len, at), id) in reqs.iter().zip(ids) {
                    assert_eq!(done.bytes(id), len as u64, "{kind}/{label}");
                    assert!(
                        buf[at..at + len] == data[off as usize..off as usize + len],
                        "{kind}/{label}/{round}: {len} bytes at file offset {off} landed wrong"
                    );
                }
            }
        }
    }
}

#[test]
fn a_registered_pool_buffer_serves_a_whole_batch() {
    let data = content(1 << 20);
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("t.bin");
    std::fs::write(&path, &data).unwrap();
    // io_uring registers the pool's buffer; where it cannot start (and is not required, see
    // `gpuio_testkit::backend_unavailable`), the thread pool serves the same batch.
    let engine = match engine(BackendKind::Uring) {
        Ok(e) => e,
        Err(e) => {
            gpuio_testkit::backend_unavailable(BackendKind::Uring, &e);
            engine(BackendKind::Threads).unwrap()
        }
    };
    let queue = engine.queue(QueueDesc::default()).unwrap();
    let file = OpenOptions::read().cold(true).open(&path).unwrap();
    let pool = engine.buffer_pool(256 << 10, 1).unwrap();
    let mut cb = queue.command_buffer();
    cb.set_buffer(pool.get()).unwrap();
    // 64 aligned 4 KiB rows gathered from all over the file, in reverse.
    let ids: Vec<_> = (0..64u64)
        .map(|i| {
            cb.load_into(&file, (255 - i * 4) * 4096, i as usize * 4096, 4096)
                .unwrap()
        })
        .collect();
    let mut done = cb.commit().unwrap().finish().unwrap();
    let buf = done.take_shared_buffer().unwrap();
    assert!(matches!(buf, IoBuffer::Pooled(_)));
    for (i, id) in ids.into_iter().enumerate() {
        let off = (255 - i * 4) * 4096;
        assert_eq!(done.bytes(id), 4096);
        assert!(
            buf[i * 4096..(i + 1) * 4096] == data[off..off + 4096],
            "row {i}"
        );
    }
}

#[test]
fn stores_from_a_shared_buffer_then_loads_back() {
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("w.bin");
    let mut rng = Rng::new(7);
    for kind in working_kinds() {
        let engine = engine(kind).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let file = OpenOptions::create().truncate(true).open(&path).unwrap();
        let mut model = vec![0u8; 1 << 20];
        let mut src = AlignedBuf::new(64 << 10, 4096).unwrap();
        src.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7 + 3) as u8);
        // Stores may share source bytes (they only read the buffer).
        let mut cb = queue.command_buffer();
        let mut writes = Vec::new();
        for _ in 0..40 {
            let len = 1 + rng.below(8000) as usize;
            let at = rng.below((src.len() - len) as u64) as usize;
            // Disjoint file ranges, so the model does not depend on the order they land in.
            let off = writes.len() * 16384 + rng.below(1000) as usize;
            writes.push((off, at, len));
            model[off..off + len].copy_from_slice(&src[at..at + len]);
        }
        cb.set_buffer(src).unwrap();
        for (i, &(off, at, len)) in writes.iter().enumerate() {
            let id = cb.store_from(&file, off as u64, at, len).unwrap();
            assert_eq!(id.index(), i);
        }
        cb.barrier();
        cb.sync(&file).unwrap();
        let mut done = cb.commit().unwrap().finish().unwrap();
        assert!(done.take_shared_buffer().is_some());
        let end = writes.iter().map(|&(o, _, l)| o + l).max().unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), end, "{kind}");
        assert!(back == model[..end], "{kind}: stored bytes differ");
    }
}

#[test]
fn misuse_is_refused_with_a_reason() {
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("t.bin");
    std::fs::write(&path, content(1 << 16)).unwrap();
    let engine = engine(BackendKind::Threads).unwrap();
    let queue = engine.queue(QueueDesc::default()).unwrap();
    let file = File::open(&path).unwrap();

    // No shared buffer yet.
    let mut cb = queue.command_buffer();
    let e = cb.load_into(&file, 0, 0, 16).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("set_buffer"), "{e}");
    // A second shared buffer.
    cb.set_buffer(AlignedBuf::new(4096, 4096).unwrap()).unwrap();
    let e = cb
        .set_buffer(AlignedBuf::new(4096, 4096).unwrap())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // Past the buffer's end, naming the file and range.
    let e = cb.load_into(&file, 100, 4000, 200).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("t.bin"), "{e}");
    // Stores need a writable file.
    let e = cb.store_from(&file, 0, 0, 16).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);

    // Two loads into overlapping bytes: refused at commit, nothing issued.
    cb.load_into(&file, 0, 0, 100).unwrap();
    cb.load_into(&file, 0, 50, 100).unwrap();
    let e = cb.commit().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("overlap"), "{e}");
    // A load nested inside an earlier, longer load: refused too.
    let mut cb = queue.command_buffer();
    cb.set_buffer(AlignedBuf::new(4096, 4096).unwrap()).unwrap();
    cb.load_into(&file, 0, 0, 1000).unwrap();
    cb.load_into(&file, 0, 200, 10).unwrap();
    cb.load_into(&file, 0, 300, 10).unwrap();
    assert_eq!(cb.commit().unwrap_err().kind(), ErrorKind::InvalidInput);

    // Stores reading the same bytes are fine; adjacent loads are fine.
    let w = dir.path().join("w.bin");
    let wf = OpenOptions::create().open(&w).unwrap();
    let mut cb = queue.command_buffer();
    cb.set_buffer(AlignedBuf::new(4096, 4096).unwrap()).unwrap();
    cb.store_from(&wf, 0, 0, 100).unwrap();
    cb.store_from(&wf, 100, 0, 100).unwrap();
    cb.load_into(&file, 0, 100, 100).unwrap();
    cb.load_into(&file, 0, 200, 100).unwrap();
    // The two stores read the same bytes (allowed); the loads are adjacent, not overlapping.
    cb.commit().unwrap().finish().unwrap();
}

#[test]
fn one_failed_request_fails_only_its_command() {
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("t.bin");
    let data = content(100_000);
    std::fs::write(&path, &data).unwrap();
    for kind in working_kinds() {
        let engine = engine(kind).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let file = File::open(&path).unwrap();
        let mut cb = queue.command_buffer();
        cb.set_buffer(AlignedBuf::new(3 * 4096, 4096).unwrap())
            .unwrap();
        let a = cb.load_into(&file, 0, 0, 4096).unwrap();
        let past = cb.load_into(&file, 99_000, 4096, 4096).unwrap(); // 1,000 bytes short
        let c = cb.load_into(&file, 50_000, 8192, 4096).unwrap();
        let (status, mut done) = cb.commit().unwrap().wait_parts();
        let Status::Error(errors) = status else {
            panic!("{kind}: expected one error, got {status:?}")
        };
        assert_eq!(errors.len(), 1, "{kind}: {errors:?}");
        assert_eq!(errors[0].command, past);
        assert_eq!(errors[0].error.kind(), ErrorKind::UnexpectedEof);
        let msg = errors[0].error.to_string();
        assert!(
            msg.contains("t.bin") && msg.contains("99000"),
            "{kind}: {msg}"
        );
        assert_eq!(done.bytes(a), 4096);
        assert_eq!(done.bytes(c), 4096);
        let buf = done
            .take_shared_buffer()
            .expect("buffer back on failure too");
        assert!(buf[..4096] == data[..4096]);
        assert!(buf[8192..] == data[50_000..54_096]);
    }
}

#[test]
fn batches_under_injected_faults_are_exact_or_fail_naming_the_file() {
    let data = content(4 << 20);
    let dir = scratch_dir(Place::Disk);
    let shm = scratch_dir(Place::Shm);
    let disk_path = dir.path().join("t.bin");
    let shm_path = shm.path().join("t.bin");
    std::fs::write(&disk_path, &data).unwrap();
    std::fs::write(&shm_path, &data).unwrap();
    let mut tally: HashMap<&str, usize> = HashMap::new();
    for kind in working_kinds() {
        for seed in 0..12u64 {
            let plan = FaultPlan::chaos(0.15, if seed % 3 == 0 { 0.02 } else { 0.0 });
            let (engine, faults) = faulty_engine_with(test_config(kind), seed, plan).unwrap();
            let queue = engine.queue(QueueDesc::default()).unwrap();
            let path = if seed % 2 == 0 { &disk_path } else { &shm_path };
            let file = OpenOptions::read().cold(seed % 4 == 0).open(path).unwrap();
            let mut rng = Rng::new(seed);
            let (reqs, size) = plan_reqs(&mut rng, data.len());
            let mut cb = queue.command_buffer();
            cb.set_buffer(AlignedBuf::new(size, 4096).unwrap()).unwrap();
            let ids: Vec<_> = reqs
                .iter()
                .map(|&(off, len, at)| cb.load_into(&file, off, at, len).unwrap())
                .collect();
            let c = cb.commit().unwrap();
            assert!(c.wait_timeout(WAIT).is_some(), "{kind}/seed {seed}: hung");
            let (status, mut done) = c.wait_parts();
            let failed: HashMap<usize, String> = match &status {
                Status::Complete => HashMap::new(),
                Status::Error(v) => v
                    .iter()
                    .map(|e| (e.command.index(), e.error.to_string()))
                    .collect(),
                other => panic!("{kind}/seed {seed}: {other:?}"),
            };
            let buf = done.take_shared_buffer().unwrap();
            for (i, (&(off, len, at), id)) in reqs.iter().zip(ids).enumerate() {
                if let Some(msg) = failed.get(&i) {
                    assert!(msg.contains("t.bin"), "{kind}/seed {seed}: {msg}");
                    *tally.entry("failed").or_default() += 1;
                    continue;
                }
                assert_eq!(done.bytes(id), len as u64);
                assert!(
                    buf[at..at + len] == data[off as usize..off as usize + len],
                    "{kind}/seed {seed}: request {i} ({len} bytes at {off}) wrong under faults"
                );
                *tally.entry("exact").or_default() += 1;
            }
            let counts = faults.counts();
            *tally.entry("faults").or_default() += counts.total() as usize;
        }
    }
    assert!(
        tally.get("faults").copied().unwrap_or(0) > 0,
        "no fault fired: {tally:?}"
    );
    assert!(tally.get("exact").copied().unwrap_or(0) > 0, "{tally:?}");
    eprintln!("batches under faults: {tally:?}");
}

fn plan_reqs(rng: &mut Rng, file_len: usize) -> (Vec<(u64, usize, usize)>, usize) {
    plan(rng, 64, file_len)
}
