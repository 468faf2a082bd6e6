//! `LocalQueue`: a queue its own thread submits and reaps. Every result is checked against a byte model
//! of the file, on every backend that starts here, on disk and on /dev/shm, direct and buffered; faults
//! are injected through the testkit's `FaultBackend` and each test asserts that its faults fired.

use std::time::{Duration, Instant};

use gpuio::backend::{BackendConfig, BackendKind};
use gpuio::{
    AlignedBuf, DirectMode, ErrorKind, File, IoBuffer, LocalConfig, LocalDone, LocalQueue,
    OpenOptions,
};
use gpuio_testkit::{
    choice_for, faulty_local_queue, memory_backed_dir, scratch_dir, within, working_kinds,
    FaultPlan, Place, Rng,
};

/// Far longer than anything here needs; reaching it means a hang.
const WAIT: Duration = Duration::from_secs(60);
const FILE_BYTES: usize = 4 << 20;

fn config(kind: BackendKind, depth: usize) -> LocalConfig {
    LocalConfig {
        backend: BackendConfig {
            choice: choice_for(kind),
            queue_depth: depth,
            ..BackendConfig::default()
        },
        ..LocalConfig::default()
    }
}

/// A file of `FILE_BYTES` random bytes in `dir`, opened read-write, and its bytes.
fn random_file(dir: &std::path::Path, direct: DirectMode, seed: u64) -> (File, Vec<u8>) {
    let mut model = vec![0u8; FILE_BYTES];
    Rng::new(seed).fill(&mut model);
    let path = dir.join("data.bin");
    std::fs::write(&path, &model).unwrap();
    let file = OpenOptions::read_write()
        .direct(direct)
        .open(&path)
        .unwrap();
    (file, model)
}

/// Fault runs alternate between the disk (O_DIRECT) and /dev/shm by seed.
fn place_of(seed: u64) -> Place {
    if seed % 2 == 0 {
        Place::Disk
    } else {
        Place::Shm
    }
}

/// Waits for everything in flight; returns what finished, in order.
fn drain(q: &mut LocalQueue) -> Vec<LocalDone> {
    let mut out = Vec::new();
    let deadline = Instant::now() + WAIT;
    while q.in_flight() > 0 {
        assert!(
            Instant::now() < deadline,
            "hung: {} in flight",
            q.in_flight()
        );
        q.wait(1, Duration::from_secs(5)).unwrap();
        while let Some(d) = q.pop() {
            out.push(d);
        }
    }
    while let Some(d) = q.pop() {
        out.push(d);
    }
    out
}

/// A random request: half of them block-aligned (direct where the file allows), half not.
fn random_range(rng: &mut Rng) -> (u64, usize) {
    if rng.chance(0.5) {
        let len = 4096 * rng.range(1, 17) as usize;
        let off = 4096 * rng.below(((FILE_BYTES - len) / 4096) as u64);
        (off, len)
    } else {
        let len = rng.range(1, 70_000) as usize;
        (rng.below((FILE_BYTES - len) as u64), len)
    }
}

/// Random reads, `n` of them, kept `depth` in flight, each compared with the model.
fn check_reads(q: &mut LocalQueue, file: &File, model: &[u8], rng: &mut Rng, n: usize) -> usize {
    let mut ranges = std::collections::HashMap::new();
    let (mut taken, mut checked) = (0usize, 0usize);
    while checked < n {
        while taken < n && q.room() > 0 {
            let (off, len) = random_range(rng);
            ranges.insert(taken as u64, (off, len));
            q.read(file, off, AlignedBuf::new(len, 4096).unwrap(), taken as u64)
                .unwrap();
            taken += 1;
        }
        assert!(q.wait(1, WAIT).unwrap() > 0, "no read finished in {WAIT:?}");
        while let Some(d) = q.pop() {
            let (off, len) = ranges[&d.user];
            assert_eq!(d.result.unwrap(), len, "read {off}+{len}");
            let buf = d.buf.unwrap();
            assert!(
                buf.as_aligned()[..] == model[off as usize..off as usize + len],
                "read {off}+{len}: wrong bytes"
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn reads_and_writes_are_byte_exact_on_every_backend_place_and_mode() {
    for kind in working_kinds() {
        for place in [Place::Disk, Place::Shm] {
            for direct in [DirectMode::Auto, DirectMode::Off] {
                let what = format!("{kind:?} {place:?} {direct:?}");
                let dir = scratch_dir(place);
                let (file, mut model) = random_file(dir.path(), direct, 1);
                let mut q = LocalQueue::new(config(kind, 16)).unwrap();
                assert_eq!(q.backend_kind(), kind, "{what}");
                let mut rng = Rng::new(7);
                // Writes of disjoint chunks, all in flight together, in a shuffled order; half of them
                // from a pool registered with this queue's ring.
                let pool = q.buffer_pool(64 << 10, 8).unwrap();
                let mut chunks: Vec<u64> = (0..48).map(|i| i * (80 << 10)).collect();
                for i in (1..chunks.len()).rev() {
                    chunks.swap(i, rng.below_usize(i + 1));
                }
                let mut pending = chunks.into_iter();
                let (mut writes, mut pooled_writes) = (0, 0);
                loop {
                    while q.room() > 0 {
                        let Some(off) = pending.next() else { break };
                        let pooled = (off % (160 << 10) == 0)
                            .then(|| pool.try_get().ok())
                            .flatten();
                        let (len, mut buf): (usize, IoBuffer) = if let Some(b) = pooled {
                            pooled_writes += 1;
                            (64 << 10, b.into())
                        } else {
                            let len = rng.range(1, 80 << 10) as usize;
                            (len, AlignedBuf::new(len, 4096).unwrap().into())
                        };
                        let bytes = &mut buf.as_aligned_mut()[..len];
                        rng.fill(bytes);
                        model[off as usize..off as usize + len].copy_from_slice(bytes);
                        q.write(&file, off, buf, off).unwrap();
                    }
                    if q.in_flight() == 0 {
                        break;
                    }
                    q.wait(1, WAIT).unwrap();
                    while let Some(d) = q.pop() {
                        let len = d.buf.as_ref().unwrap().len();
                        assert_eq!(d.result.unwrap(), len, "{what}: write at {}", d.user);
                        writes += 1;
                    }
                }
                assert_eq!(writes, 48, "{what}");
                assert!(
                    pooled_writes > 0,
                    "{what}: no write used the registered pool"
                );
                let n = check_reads(&mut q, &file, &model, &mut rng, 300);
                assert_eq!(n, 300, "{what}");
                // What the kernel has is what the model says, read by someone else.
                assert!(std::fs::read(file.path()).unwrap() == model, "{what}");
                let s = q.stats();
                assert!(
                    s.ops >= 348 && s.bytes_read > 0 && s.bytes_written > 0,
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn end_of_file_and_empty_requests() {
    let dir = scratch_dir(Place::Disk);
    let (file, model) = random_file(dir.path(), DirectMode::Auto, 2);
    for kind in working_kinds() {
        let mut q = LocalQueue::new(config(kind, 4)).unwrap();
        let tail = FILE_BYTES as u64 - 1000;
        q.read(&file, tail, AlignedBuf::new(4096, 4096).unwrap(), 1)
            .unwrap();
        q.read_upto(&file, tail, AlignedBuf::new(4096, 4096).unwrap(), 2)
            .unwrap();
        q.read(&file, 0, AlignedBuf::new(0, 4096).unwrap(), 3)
            .unwrap();
        let mut done = drain(&mut q);
        done.sort_by_key(|d| d.user);
        let e = done[0].result.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{kind:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("data.bin") && msg.contains(&tail.to_string()) && msg.contains("1000"),
            "{kind:?}: the error names the file, the offset and what was read: {msg}"
        );
        assert_eq!(*done[1].result.as_ref().unwrap(), 1000, "{kind:?}");
        let buf = done[1].buf.as_ref().unwrap().as_aligned();
        assert!(buf[..1000] == model[tail as usize..], "{kind:?}");
        assert_eq!(*done[2].result.as_ref().unwrap(), 0, "{kind:?}");
    }
}

#[test]
fn refused_requests_hand_their_buffer_back_with_the_reason() {
    let dir = scratch_dir(Place::Disk);
    let (file, _) = random_file(dir.path(), DirectMode::Auto, 3);
    let read_only = File::open(file.path()).unwrap();
    for kind in working_kinds() {
        let mut q = LocalQueue::new(config(kind, 2)).unwrap();
        let depth = q.depth();
        for i in 0..depth {
            q.read(&file, 0, AlignedBuf::new(4096, 4096).unwrap(), i as u64)
                .unwrap();
        }
        let r = q
            .read(&file, 8192, AlignedBuf::new(12288, 4096).unwrap(), 99)
            .unwrap_err();
        assert_eq!(
            r.error.kind(),
            ErrorKind::WouldBlock,
            "{kind:?}: {}",
            r.error
        );
        assert_eq!(
            r.buf.unwrap().len(),
            12288,
            "{kind:?}: the buffer comes back"
        );
        assert!(r.error.to_string().contains("data.bin"), "{}", r.error);

        let r = q
            .write(&read_only, 0, AlignedBuf::new(4096, 4096).unwrap(), 5)
            .unwrap_err();
        assert_eq!(r.error.kind(), ErrorKind::PermissionDenied, "{}", r.error);
        assert!(r.buf.is_some());
        let r = q.sync(&read_only, 6).unwrap_err();
        assert_eq!(r.error.kind(), ErrorKind::PermissionDenied, "{}", r.error);

        let r = q
            .read(
                &file,
                u64::MAX - 10,
                AlignedBuf::new(4096, 4096).unwrap(),
                7,
            )
            .unwrap_err();
        assert_eq!(r.error.kind(), ErrorKind::InvalidInput, "{}", r.error);
        assert!(r.buf.is_some());
        // Nothing refused was taken: only the first `depth` reads finish.
        let done = drain(&mut q);
        assert_eq!(done.len(), depth, "{kind:?}");
        assert!(done.iter().all(|d| d.result.is_ok()));
    }
}

#[test]
fn a_wait_never_outlasts_its_bound_or_the_work() {
    let mut q = LocalQueue::new(LocalConfig::default()).unwrap();
    let t = Instant::now();
    assert_eq!(q.wait(5, Duration::from_secs(30)).unwrap(), 0);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a wait with nothing in flight returns at once"
    );
    // A request held back by the fault wrapper: a short wait returns before it finishes.
    let (mut q, _faults) = faulty_local_queue(
        LocalConfig::default(),
        1,
        FaultPlan::none().with_delay(1.0, Duration::from_millis(400)),
    )
    .unwrap();
    let dir = scratch_dir(Place::Disk);
    let (file, _) = random_file(dir.path(), DirectMode::Auto, 4);
    q.read(&file, 0, AlignedBuf::new(4096, 4096).unwrap(), 1)
        .unwrap();
    let t = Instant::now();
    let n = q.wait(1, Duration::from_millis(1)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(n <= 1);
    assert_eq!(drain(&mut q).len() + n, 1);
}

#[test]
fn transient_errors_and_short_transfers_are_hidden_under_faults() {
    for kind in working_kinds() {
        for seed in 0..6u64 {
            let what = format!("{kind:?} seed {seed}");
            let dir = scratch_dir(place_of(seed));
            let (file, model) = random_file(dir.path(), DirectMode::Auto, seed);
            let (mut q, faults) =
                faulty_local_queue(config(kind, 8), seed, FaultPlan::benign(0.3)).unwrap();
            let mut rng = Rng::new(seed);
            check_reads(&mut q, &file, &model, &mut rng, 200);
            let c = faults.counts();
            assert!(c.eintr + c.eagain > 0 && c.short_reads > 0, "{what}: {c:?}");
            let s = q.stats();
            assert_eq!(
                s.retries,
                c.eintr + c.eagain,
                "{what}: every transient retried once"
            );
            assert_eq!(s.short_transfers, c.short_reads, "{what}");
        }
    }
}

#[test]
fn direct_transfers_the_kernel_refuses_are_redone_buffered() {
    let dir = scratch_dir(Place::Disk);
    let (file, model) = random_file(dir.path(), DirectMode::Auto, 5);
    assert!(file.is_direct(), "{}", file.direct_reason());
    let (mut q, faults) = faulty_local_queue(
        config(BackendKind::Threads, 8),
        5,
        FaultPlan::none().with_direct_einval(0.5),
    )
    .unwrap();
    check_reads(&mut q, &file, &model, &mut Rng::new(5), 200);
    let c = faults.counts();
    assert!(c.direct_einval > 0, "{c:?}");
    assert_eq!(q.stats().direct_fallbacks, c.direct_einval);
}

#[test]
fn eio_and_enospc_fail_their_request_naming_file_and_offset() {
    for kind in working_kinds() {
        for seed in 0..4u64 {
            hard_errors_are_reported(kind, seed);
        }
    }
}

/// Reads and writes under EIO, ENOSPC and benign faults: each request either moved every byte right
/// or failed naming the file and its offset, one failed request per hard fault.
fn hard_errors_are_reported(kind: BackendKind, seed: u64) {
    let what = format!("{kind:?} seed {seed}");
    let dir = scratch_dir(place_of(seed));
    let (file, model) = random_file(dir.path(), DirectMode::Auto, seed);
    let plan = FaultPlan::benign(0.1)
        .with_read_eio(0.2)
        .with_write_enospc(0.2);
    let (mut q, faults) = faulty_local_queue(config(kind, 8), seed, plan).unwrap();
    let mut rng = Rng::new(seed);
    let mut ranges = std::collections::HashMap::new();
    let mut done = Vec::new();
    for i in 0..200u64 {
        let (off, len) = random_range(&mut rng);
        ranges.insert(i, (off, len));
        let mut buf = AlignedBuf::new(len, 4096).unwrap();
        if i % 2 == 0 {
            q.read(&file, off, buf, i).unwrap();
        } else {
            // Writes put back the bytes the model has, so failed ones change nothing.
            buf.copy_from_slice(&model[off as usize..off as usize + len]);
            q.write(&file, off, buf, i).unwrap();
        }
        if q.room() == 0 {
            q.wait(1, WAIT).unwrap();
            done.extend(std::iter::from_fn(|| q.pop()));
        }
    }
    done.extend(drain(&mut q));
    assert_eq!(done.len(), 200, "{what}");
    let (mut eio, mut enospc) = (0, 0);
    for d in &done {
        let (off, len) = ranges[&d.user];
        match &d.result {
            Ok(n) => {
                assert_eq!(*n, len, "{what}");
                if d.user % 2 == 0 {
                    let b = d.buf.as_ref().unwrap().as_aligned();
                    assert!(b[..] == model[off as usize..off as usize + len], "{what}");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                // A short transfer continued before the fault names the offset it failed at.
                assert!(
                    msg.contains("data.bin") && msg.contains("offset"),
                    "{what}: {msg}"
                );
                match e.kind() {
                    ErrorKind::Io => eio += 1,
                    ErrorKind::NoSpace => enospc += 1,
                    k => panic!("{what}: unexpected {k:?}: {msg}"),
                }
            }
        }
    }
    let c = faults.counts();
    assert!(c.read_eio > 0 && c.write_enospc > 0, "{what}: {c:?}");
    assert_eq!(
        (eio, enospc),
        (c.read_eio, c.write_enospc),
        "{what}: one failed request per fault"
    );
    assert!(std::fs::read(file.path()).unwrap() == model, "{what}");
}

#[test]
fn persistent_eagain_exhausts_the_retries() {
    let dir = scratch_dir(Place::Disk);
    let (file, _) = random_file(dir.path(), DirectMode::Auto, 8);
    let cfg = LocalConfig {
        retries_max: 3,
        ..config(BackendKind::Threads, 4)
    };
    let (mut q, faults) = faulty_local_queue(cfg, 8, FaultPlan::none().with_eagain(1.0)).unwrap();
    q.read(&file, 4096, AlignedBuf::new(4096, 4096).unwrap(), 1)
        .unwrap();
    let done = drain(&mut q);
    let e = done[0].result.as_ref().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RetriesExhausted, "{e}");
    assert_eq!(faults.counts().eagain, 4, "the first try and 3 retries");
}

#[test]
fn dropping_a_queue_waits_for_what_the_kernel_still_holds() {
    within(60, || {
        let dir = scratch_dir(Place::Disk);
        let (file, _) = random_file(dir.path(), DirectMode::Auto, 9);
        let (mut q, faults) = faulty_local_queue(
            config(BackendKind::Threads, 16),
            9,
            FaultPlan::none().with_delay(1.0, Duration::from_millis(50)),
        )
        .unwrap();
        for i in 0..16u64 {
            q.read(&file, i * 4096, AlignedBuf::new(4096, 4096).unwrap(), i)
                .unwrap();
        }
        q.submit().unwrap();
        drop(q);
        // The wrapper reports a request only after its I/O: every one was reaped before the drop
        // returned, none left with the kernel.
        assert_eq!(faults.counts().reads, 16);
        assert!(faults.counts().delays > 0);
    });
}

#[test]
fn threads_each_with_their_own_queue_read_one_file() {
    let dir = scratch_dir(Place::Shm);
    let (file, model) = random_file(dir.path(), DirectMode::Auto, 10);
    let model = std::sync::Arc::new(model);
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let (file, model) = (file.clone(), model.clone());
            std::thread::spawn(move || {
                let kinds = working_kinds();
                let kind = kinds[t as usize % kinds.len()];
                let mut q = LocalQueue::new(config(kind, 32)).unwrap();
                check_reads(&mut q, &file, &model, &mut Rng::new(100 + t), 1000)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 1000);
    }
}

#[test]
fn small_transfers_of_memory_backed_files_are_served_when_taken() {
    let Some(dir) = memory_backed_dir() else {
        return;
    };
    let (file, model) = random_file(dir.path(), DirectMode::Auto, 11);
    for inline_max in [64 << 10, 0] {
        let cfg = LocalConfig {
            inline_max_bytes: inline_max,
            ..config(BackendKind::Uring, 8)
        };
        let mut q = match LocalQueue::new(cfg) {
            Ok(q) => q,
            Err(e) => {
                gpuio_testkit::backend_unavailable(BackendKind::Uring, &e);
                return;
            }
        };
        q.read(&file, 4096, AlignedBuf::new(8192, 4096).unwrap(), 1)
            .unwrap();
        if inline_max > 0 {
            // Served by `read` itself: finished before any wait.
            assert_eq!(q.in_flight(), 0);
            let d = q.pop().expect("finished when taken");
            assert_eq!(d.result.unwrap(), 8192);
            assert!(d.buf.unwrap().as_aligned()[..] == model[4096..4096 + 8192]);
            let s = q.stats();
            assert_eq!((s.inline_ops, s.ops), (1, 1));
            assert!(q.explain().to_string().contains("memory-backed"));
            // Larger ones go to the backend.
            q.read(&file, 0, AlignedBuf::new(128 << 10, 4096).unwrap(), 2)
                .unwrap();
            let d = drain(&mut q).pop().unwrap();
            assert_eq!(d.result.unwrap(), 128 << 10);
            assert_eq!(q.stats().inline_ops, 1);
        } else {
            let d = drain(&mut q).pop().unwrap();
            assert_eq!(d.result.unwrap(), 8192);
            assert_eq!(q.stats().inline_ops, 0, "inline serving off");
        }
    }
    // An end of file met on the calling thread is reported as the backend's would be.
    let mut q = LocalQueue::new(LocalConfig::default()).unwrap();
    let tail = FILE_BYTES as u64 - 100;
    q.read(&file, tail, AlignedBuf::new(4096, 4096).unwrap(), 3)
        .unwrap();
    let e = q.pop().unwrap().result.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
    assert!(e.to_string().contains(&tail.to_string()), "{e}");
}

/// A pool's fixed-buffer indices belong to the ring that registered it. Its buffers used on another
/// engine or queue go unregistered there (before, engine B used engine A's indices and the kernel
/// failed the read with EFAULT, "Bad address").
#[test]
fn pools_registered_elsewhere_are_used_unregistered() {
    if !gpuio_testkit::kind_works(BackendKind::Uring) {
        return;
    }
    let dir = scratch_dir(Place::Disk);
    let (file, model) = random_file(dir.path(), DirectMode::Auto, 12);
    let engine = |n: usize| {
        let e = gpuio::Engine::new(gpuio_testkit::test_config(BackendKind::Uring)).unwrap();
        // Registered pools of its own, so that foreign indices would land on real table entries.
        let own = e.buffer_pool(4096, n).unwrap();
        (e, own)
    };
    let (a, _a_own) = engine(2);
    let (b, _b_own) = engine(5);
    let from_a = a.buffer_pool(64 << 10, 2).unwrap();
    assert!(
        matches!(
            from_a.registration(),
            gpuio::mem::Registration::Fixed { .. }
        ),
        "{:?}",
        from_a.registration()
    );
    let mut local = LocalQueue::new(config(BackendKind::Uring, 4)).unwrap();
    let from_local = local.buffer_pool(64 << 10, 2).unwrap();
    // Engine B reads into a buffer of A's pool and of the local queue's pool.
    let q = b.queue(gpuio::QueueDesc::default()).unwrap();
    for (what, buf) in [
        ("engine A's pool", from_a.get()),
        ("the local queue's pool", from_local.get()),
    ] {
        let mut cb = q.command_buffer();
        let id = cb.load(&file, 65536, buf).unwrap();
        let mut done = cb
            .commit()
            .unwrap()
            .finish()
            .unwrap_or_else(|e| panic!("{what} on engine B: {e}"));
        let got = done.take_buffer(id).unwrap();
        assert!(got.as_aligned()[..] == model[65536..131072], "{what}");
    }
    // The local queue reads into a buffer of engine A's pool, and of its own (registered here).
    local.read(&file, 0, from_a.get(), 1).unwrap();
    local.read(&file, 131072, from_local.get(), 2).unwrap();
    let mut done = drain(&mut local);
    done.sort_by_key(|d| d.user);
    assert_eq!(done.len(), 2);
    for (d, off) in done.iter().zip([0usize, 131072]) {
        assert_eq!(*d.result.as_ref().unwrap(), 65536, "request {}", d.user);
        let b = d.buf.as_ref().unwrap().as_aligned();
        assert!(b[..] == model[off..off + 65536], "request {}", d.user);
    }
}
