//! Command buffers served on the committing thread (`queue::inline`): small loads and stores of
//! memory-backed files. What is served there, what is not, and that a result means the same as on
//! the engine thread (bytes, errors and their messages, barriers, callbacks, statistics).
//!
//! Then the inline workers (`queue::workers`, `EngineConfig::inline_threads`), which take such
//! command buffers over when one is idle and the committing thread has other work outstanding: the
//! bytes, where callbacks run, serial queues, the queue's slot bound, errors, cancels and shutdown
//! with work in flight.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use gpuio::backend::BackendKind;
use gpuio::{
    AlignedBuf, Engine, EngineConfig, ErrorKind, File, OpenOptions, QueueDesc, QueueKind, Status,
};

const WAIT: Duration = Duration::from_secs(60);

/// A directory on tmpfs, or `None` (saying why) where `/dev/shm` is not memory-backed.
fn shm_dir() -> Option<tempfile::TempDir> {
    gpuio_testkit::memory_backed_dir()
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Inline workers off: the tests up to the workers' are about the committing thread.
fn engine(inline_max: usize) -> Engine {
    Engine::new(EngineConfig {
        inline_max_bytes: inline_max,
        inline_threads: 0,
        ..EngineConfig::default()
    })
    .unwrap()
}

#[test]
fn small_loads_and_stores_of_tmpfs_files_complete_inside_commit() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let path = write(dir.path(), "t", &bytes);
    let engine = engine(64 << 10);
    assert!(
        engine
            .explain()
            .reasons
            .iter()
            .any(|r| r.contains("committing thread")),
        "{}",
        engine.explain()
    );
    let q = engine.queue(QueueDesc::default()).unwrap();
    let file = File::open(&path).unwrap();
    assert!(file.is_memory_backed());
    let mut cb = q.command_buffer();
    let ids: Vec<_> = (0..16u64)
        .map(|i| {
            cb.load(
                &file,
                i * 4096 * 3 + 7,
                AlignedBuf::new(4096, 4096).unwrap(),
            )
            .unwrap()
        })
        .collect();
    let c = cb.commit().unwrap();
    assert!(c.status().is_complete(), "served inline: done at return");
    let mut done = c.finish().unwrap();
    for (i, id) in ids.iter().enumerate() {
        let off = i * 4096 * 3 + 7;
        assert_eq!(done.bytes(*id), 4096);
        assert_eq!(&done.take_buffer(*id).unwrap()[..], &bytes[off..off + 4096]);
    }
    // Stores, then a load of what they wrote.
    let rw = OpenOptions::read_write().open(&path).unwrap();
    let mut cb = q.command_buffer();
    let mut w = AlignedBuf::new(5000, 4096).unwrap();
    w.fill(0xAB);
    cb.store(&rw, 100, w).unwrap();
    cb.barrier();
    let back = cb
        .load(&rw, 100, AlignedBuf::new(5000, 4096).unwrap())
        .unwrap();
    let mut done = cb.commit().unwrap().finish().unwrap();
    assert!(done.take_buffer(back).unwrap().iter().all(|&b| b == 0xAB));
    let st = q.stats();
    assert_eq!(st.inline_ops, 18, "16 loads, 1 store, 1 load");
    assert_eq!(st.ops, st.inline_ops);
    assert_eq!(st.bytes_read, 17 * 4096 + 5000 - 4096);
    assert_eq!(st.bytes_written, 5000);
    assert_eq!(st.latency().samples, 18);
}

#[test]
fn what_is_not_served_inline_goes_through_the_engine_unchanged() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let shm = write(dir.path(), "t", &bytes);
    let disk_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let disk = write(disk_dir.path(), "t", &bytes);
    let check = |engine: &Engine, file: &File, len: usize, sync: bool, want_inline: bool| {
        let q = engine.queue(QueueDesc::default()).unwrap();
        let mut cb = q.command_buffer();
        let id = cb
            .load(file, 0, AlignedBuf::new(len, 4096).unwrap())
            .unwrap();
        if sync {
            cb.sync(file).unwrap();
        }
        let mut done = cb.commit().unwrap().finish().unwrap();
        assert_eq!(&done.take_buffer(id).unwrap()[..], &bytes[..len]);
        let st = q.stats();
        assert_eq!(
            st.inline_ops > 0,
            want_inline,
            "{} len {len} sync {sync}: {st:?}",
            file.path().display()
        );
    };
    let e = engine(64 << 10);
    let shm_file = File::open(&shm).unwrap();
    check(&e, &shm_file, 64 << 10, false, true);
    // Larger than the limit, a file on a disk, or a sync in the command buffer: the engine's path.
    check(&e, &shm_file, (64 << 10) + 4096, false, false);
    check(&e, &File::open(&disk).unwrap(), 4096, false, false);
    let rw = OpenOptions::read_write().open(&shm).unwrap();
    check(&e, &rw, 4096, true, false);
    // Turned off.
    check(&engine(0), &shm_file, 4096, false, false);
    // A custom backend sees every transfer (fault injection relies on it).
    let cfg = gpuio_testkit::test_config(BackendKind::Threads);
    let (backend, explain) = gpuio::backend::probe(&cfg.backend).unwrap();
    let custom = Engine::with_backend(cfg, backend, explain).unwrap();
    check(&custom, &shm_file, 4096, false, false);
}

#[test]
fn a_serial_queue_with_work_in_flight_keeps_its_order() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(4 << 20);
    let shm = write(dir.path(), "t", &bytes);
    let e = engine(64 << 10);
    let q = e.queue(QueueDesc::serial()).unwrap();
    let file = File::open(&shm).unwrap();
    // A large load goes to the engine; the small one after it must wait for it (serial order).
    let mut big = q.command_buffer();
    big.load(&file, 0, AlignedBuf::new(4 << 20, 4096).unwrap())
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    big.on_complete(move |_| tx.send("big").unwrap());
    let big = big.commit().unwrap();
    let mut small = q.command_buffer();
    small
        .load(&file, 0, AlignedBuf::new(4096, 4096).unwrap())
        .unwrap();
    small.on_complete(move |_| tx2.send("small").unwrap());
    let small = small.commit().unwrap();
    assert!(small.wait_timeout(WAIT).unwrap().is_complete());
    assert!(big.wait_timeout(WAIT).unwrap().is_complete());
    let order: Vec<_> = rx.iter().take(2).collect();
    assert_eq!(order, ["big", "small"]);
}

#[test]
fn errors_and_barriers_mean_what_they_mean_on_the_engine_thread() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(10_000);
    let shm = write(dir.path(), "t", &bytes);
    // The same command buffer on an inline engine and on one with the inline path off.
    let run = |e: &Engine| {
        let q = e.queue(QueueDesc::default()).unwrap();
        let file = File::open(&shm).unwrap();
        let mut cb = q.command_buffer();
        cb.load(&file, 0, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        // Past the end: exact loads fail, up-to loads stop short.
        cb.load(&file, 8000, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        let upto = cb
            .load_upto(&file, 8000, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        cb.barrier();
        cb.load(&file, 0, AlignedBuf::new(100, 4096).unwrap())
            .unwrap();
        let (status, done) = cb.commit().unwrap().wait_parts();
        let errors = match status {
            Status::Error(v) => v
                .into_iter()
                .map(|e| (e.command.index(), e.error.kind(), e.error.to_string()))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        (errors, done.bytes(upto), q.stats().inline_ops)
    };
    let (inline_errors, inline_upto, ops) = run(&engine(64 << 10));
    let (engine_errors, engine_upto, none) = run(&engine(0));
    assert!(ops > 0 && none == 0);
    assert_eq!(inline_upto, 2000);
    assert_eq!(engine_upto, 2000);
    assert_eq!(inline_errors, engine_errors);
    assert_eq!(inline_errors.len(), 2, "{inline_errors:?}");
    assert_eq!(inline_errors[0].0, 1);
    assert_eq!(inline_errors[0].1, ErrorKind::UnexpectedEof);
    assert!(inline_errors[0].2.contains(&shm.display().to_string()));
    assert_eq!(
        (inline_errors[1].0, inline_errors[1].1),
        (3, ErrorKind::Cancelled)
    );
}

#[test]
fn callbacks_run_on_the_engine_thread_unless_any_thread_is_allowed() {
    let Some(dir) = shm_dir() else { return };
    let shm = write(dir.path(), "t", &data(8192));
    let e = engine(64 << 10);
    let q = e
        .queue(QueueDesc {
            kind: QueueKind::Concurrent,
            ..QueueDesc::default()
        })
        .unwrap();
    let file = File::open(&shm).unwrap();
    let me = std::thread::current().id();
    let (tx, rx) = mpsc::channel();
    for any in [false, true] {
        let mut cb = q.command_buffer();
        cb.load(&file, 0, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        let tx = tx.clone();
        let f = move |s: &Status| {
            tx.send((s.is_complete(), std::thread::current().id()))
                .unwrap()
        };
        if any {
            cb.on_complete_any_thread(f);
        } else {
            cb.on_complete(f);
        }
        let c = cb.commit().unwrap();
        assert!(c.status().is_complete());
        let (ok, thread) = rx.recv_timeout(WAIT).unwrap();
        assert!(ok);
        assert_eq!(thread == me, any, "any_thread {any}");
    }
    assert_eq!(q.stats().inline_ops, 2);
}

#[test]
fn a_batch_into_one_buffer_is_served_inline() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let shm = write(dir.path(), "t", &bytes);
    let e = engine(64 << 10);
    let q = e.queue(QueueDesc::default()).unwrap();
    let file = File::open(&shm).unwrap();
    let mut cb = q.command_buffer();
    cb.set_buffer(AlignedBuf::new(64 * 1000, 4096).unwrap())
        .unwrap();
    let offs: Vec<u64> = (0..64u64)
        .map(|i| (i * 7919 * 13) % ((1 << 20) - 1000))
        .collect();
    for (i, &off) in offs.iter().enumerate() {
        cb.load_into(&file, off, i * 1000, 1000).unwrap();
    }
    let mut done = cb.commit().unwrap().finish().unwrap();
    let buf = done.take_shared_buffer().unwrap();
    for (i, &off) in offs.iter().enumerate() {
        assert_eq!(
            &buf[i * 1000..(i + 1) * 1000],
            &bytes[off as usize..off as usize + 1000]
        );
    }
    assert_eq!(q.stats().inline_ops, 64);
}

// The inline workers.

/// Inline workers on (`queue::workers`): up to `workers` of them.
fn engine_with_workers(workers: usize) -> Engine {
    Engine::new(EngineConfig {
        inline_threads: workers,
        ..EngineConfig::default()
    })
    .unwrap()
}

/// A completion to keep alive: with other work of the queue outstanding, a committing thread may
/// hand its command buffers to workers (a thread that commits and then waits never does).
fn keep_outstanding(q: &gpuio::IoQueue, file: &File) -> gpuio::Completion {
    let mut cb = q.command_buffer();
    cb.load(file, 0, AlignedBuf::new(4096, 4096).unwrap())
        .unwrap();
    cb.commit().unwrap()
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("").to_string()
}

/// Commits `n` command buffers of 8 loads of 8 KiB each on `q`, each callback (any thread) reporting
/// the thread it ran on; checks every byte. Returns the threads' names.
fn loads_report_threads(q: &gpuio::IoQueue, file: &File, bytes: &[u8], n: usize) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    let mut pending = Vec::new();
    for k in 0..n {
        let mut cb = q.command_buffer();
        let mut ids = Vec::new();
        for i in 0..8 {
            let off = ((k * 8 + i) * 8192 % (bytes.len() - 8192)) as u64;
            let id = cb
                .load(file, off, AlignedBuf::new(8192, 4096).unwrap())
                .unwrap();
            ids.push((id, off));
        }
        let tx = tx.clone();
        cb.on_complete_any_thread(move |s: &Status| {
            tx.send((s.is_complete(), thread_name())).unwrap()
        });
        pending.push((cb.commit().unwrap(), ids));
    }
    for (c, ids) in pending {
        let mut done = c.finish().unwrap();
        for (id, off) in ids {
            let buf = done.take_buffer(id).unwrap();
            assert_eq!(
                &buf[..],
                &bytes[off as usize..off as usize + 8192],
                "at {off}"
            );
        }
    }
    (0..n)
        .map(|_| {
            let (ok, name) = rx.recv_timeout(WAIT).unwrap();
            assert!(ok);
            name
        })
        .collect()
}

#[test]
fn an_idle_worker_serves_command_buffers_and_the_bytes_are_the_files() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(4 << 20);
    let file = File::open(write(dir.path(), "t", &bytes)).unwrap();
    let e = engine_with_workers(2);
    assert!(
        e.explain().to_string().contains("inline workers"),
        "{}",
        e.explain()
    );
    let q = e.queue(QueueDesc::default()).unwrap();
    // Some on the committing thread, some on workers. Workers start on first use and must be
    // scheduled before they can take anything, so rounds of 400 go on (bounded) until one has.
    let mut names: HashSet<String> = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut rounds = 0;
    while rounds == 0
        || (!names.iter().any(|n| n.starts_with("gpuio-inline-"))
            && std::time::Instant::now() < deadline)
    {
        names.extend(loads_report_threads(&q, &file, &bytes, 400));
        rounds += 1;
    }
    assert!(names.contains(&thread_name()), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("gpuio-inline-")),
        "{names:?}"
    );
    let st = q.stats();
    assert_eq!(st.inline_ops, rounds * 400 * 8, "{st:?}");
    assert_eq!(st.bytes_read, rounds * 400 * 8 * 8192);
}

#[test]
fn without_workers_or_on_a_serial_queue_the_committing_thread_serves() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let file = File::open(write(dir.path(), "t", &bytes)).unwrap();
    let me = thread_name();
    let e = engine_with_workers(0);
    let q = e.queue(QueueDesc::default()).unwrap();
    for name in loads_report_threads(&q, &file, &bytes, 50) {
        assert_eq!(name, me);
    }
    let e = engine_with_workers(2);
    let serial = e
        .queue(QueueDesc {
            kind: QueueKind::Serial,
            ..QueueDesc::default()
        })
        .unwrap();
    for name in loads_report_threads(&serial, &file, &bytes, 50) {
        assert_eq!(
            name, me,
            "a serial queue's order is kept by serving on its own thread"
        );
    }
}

#[test]
fn a_thread_that_commits_then_waits_serves_its_own_command_buffers() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let file = File::open(write(dir.path(), "t", &bytes)).unwrap();
    let e = engine_with_workers(2);
    let q = e.queue(QueueDesc::default()).unwrap();
    let me = thread_name();
    // Nothing else outstanding at each commit: a hand-off would only add a wake-up to the wait.
    for k in 0..300u64 {
        let mut cb = q.command_buffer();
        cb.load(
            &file,
            (k % 128) * 8192,
            AlignedBuf::new(8192, 4096).unwrap(),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel();
        cb.on_complete_any_thread(move |_| tx.send(thread_name()).unwrap());
        let c = cb.commit().unwrap();
        assert!(c.status().is_complete(), "served inside commit");
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), me);
    }
}

#[test]
fn engine_thread_callbacks_still_run_on_the_engine_thread() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let file = File::open(write(dir.path(), "t", &bytes)).unwrap();
    let e = engine_with_workers(2);
    let q = e.queue(QueueDesc::default()).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut completions = Vec::new();
    for k in 0..200u64 {
        let mut cb = q.command_buffer();
        cb.load(&file, k * 4096, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        let tx = tx.clone();
        cb.on_complete(move |s: &Status| tx.send((s.is_complete(), thread_name())).unwrap());
        completions.push(cb.commit().unwrap());
    }
    for c in completions {
        assert!(c.wait().is_complete());
    }
    for _ in 0..200 {
        let (ok, name) = rx.recv_timeout(WAIT).unwrap();
        assert!(ok);
        assert_eq!(name, "gpuio-engine");
    }
}

#[test]
fn a_full_queue_serves_on_the_committing_thread_instead_of_failing() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let file = File::open(write(dir.path(), "t", &bytes)).unwrap();
    let e = engine_with_workers(2);
    // One slot: while one command buffer is with a worker, the next must not fail with WouldBlock.
    let q = e
        .queue(QueueDesc {
            command_buffers_max: 1,
            ..QueueDesc::default()
        })
        .unwrap();
    let names = loads_report_threads(&q, &file, &bytes, 300);
    assert_eq!(names.len(), 300);
}

#[test]
fn errors_on_a_worker_name_the_file_and_range_and_barriers_hold() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(64 << 10);
    let path = write(dir.path(), "short", &bytes);
    let file = File::open(&path).unwrap();
    let e = engine_with_workers(2);
    let q = e.queue(QueueDesc::default()).unwrap();
    let _outstanding = keep_outstanding(&q, &file);
    let mut seen_worker = false;
    // Workers start on first use and must be scheduled before they can take anything: go on
    // (bounded) until one has served a command buffer, so that its errors are checked even on a
    // loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut k = 0;
    while k < 300 || (!seen_worker && std::time::Instant::now() < deadline) {
        k += 1;
        let mut cb = q.command_buffer();
        // Past the end: an exact load fails with UnexpectedEof; the command after the barrier is skipped.
        cb.load(&file, 60 << 10, AlignedBuf::new(8192, 4096).unwrap())
            .unwrap();
        cb.barrier();
        cb.load(&file, 0, AlignedBuf::new(4096, 4096).unwrap())
            .unwrap();
        let (tx, rx) = mpsc::channel();
        cb.on_complete_any_thread(move |_| tx.send(thread_name()).unwrap());
        let status = cb.commit().unwrap().wait();
        seen_worker |= rx.recv_timeout(WAIT).unwrap().starts_with("gpuio-inline-");
        let Status::Error(errs) = status else {
            panic!("{status:?}")
        };
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].error.kind(), ErrorKind::UnexpectedEof);
        let msg = errs[0].error.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("61440"), "{msg}");
        assert_eq!(errs[1].error.kind(), ErrorKind::Cancelled);
    }
    assert!(
        seen_worker,
        "no command buffer went to a worker: the worker's errors were not tested"
    );
}

#[test]
fn a_cancel_either_stops_a_handed_command_buffer_or_comes_too_late_and_buffers_return() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let file = File::open(write(dir.path(), "t", &bytes)).unwrap();
    let e = engine_with_workers(2);
    let q = e.queue(QueueDesc::default()).unwrap();
    let _outstanding = keep_outstanding(&q, &file);
    let (mut cancelled, mut complete) = (0, 0);
    // Whether a cancel lands before a worker starts is a race of microseconds: go on (bounded)
    // until one has, so that both outcomes are checked even on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut k = 0u64;
    while k < 500 || (cancelled == 0 && std::time::Instant::now() < deadline) {
        k += 1;
        let mut cb = q.command_buffer();
        let id = cb
            .load(&file, (k % 64) * 8192, AlignedBuf::new(8192, 4096).unwrap())
            .unwrap();
        let c = cb.commit().unwrap();
        let asked = c.try_cancel();
        let (status, mut done) = c.wait_parts();
        // The buffer comes back either way.
        let buf = done.take_buffer(id).expect("the buffer came back");
        match status {
            Status::Cancelled => {
                assert!(asked);
                cancelled += 1;
            }
            Status::Complete => {
                assert_eq!(&buf[..], &bytes[(k % 64) as usize * 8192..][..8192]);
                complete += 1;
            }
            s => panic!("{s:?}"),
        }
    }
    assert_eq!(cancelled + complete, k);
    assert!(
        cancelled > 0,
        "no cancel reached a handed-over command buffer: that path was not tested"
    );
    eprintln!("{cancelled} cancelled before a worker started them, {complete} complete");
}

#[test]
fn dropping_the_engine_with_command_buffers_on_workers_finishes_them() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(4 << 20);
    let path = write(dir.path(), "t", &bytes);
    for _ in 0..20 {
        let file = OpenOptions::read().open(&path).unwrap();
        let e = engine_with_workers(3);
        let q = e.queue(QueueDesc::default()).unwrap();
        let completions: Vec<_> = (0..64u64)
            .map(|k| {
                let mut cb = q.command_buffer();
                cb.load(&file, k * 65536, AlignedBuf::new(65536, 4096).unwrap())
                    .unwrap();
                cb.commit().unwrap()
            })
            .collect();
        drop(q);
        drop(e);
        for c in completions {
            let status = c
                .wait_timeout(WAIT)
                .expect("a command buffer never finished");
            assert!(status.is_complete(), "{status:?}");
        }
    }
}
