//! Inline workers (`queue::workers`, `EngineConfig::inline_threads`): command buffers of small
//! memory-backed transfers handed to an idle worker instead of being served on the committing
//! thread. The bytes, where callbacks run, serial queues, the queue's slot bound, errors, cancels and
//! shutdown with work in flight.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

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

fn engine(workers: usize) -> Engine {
    Engine::new(EngineConfig {
        inline_threads: workers,
        ..EngineConfig::default()
    })
    .unwrap()
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
    let e = engine(2);
    assert!(
        e.explain().to_string().contains("inline workers"),
        "{}",
        e.explain()
    );
    let q = e.queue(QueueDesc::default()).unwrap();
    let names: HashSet<String> = loads_report_threads(&q, &file, &bytes, 400)
        .into_iter()
        .collect();
    // Some on the committing thread, some on workers (they spin when idle, so with 400 command
    // buffers one is certain to be claimed).
    assert!(names.contains(&thread_name()), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("gpuio-inline-")),
        "{names:?}"
    );
    let st = q.stats();
    assert_eq!(st.inline_ops, 400 * 8, "{st:?}");
    assert_eq!(st.bytes_read, 400 * 8 * 8192);
}

#[test]
fn without_workers_or_on_a_serial_queue_the_committing_thread_serves() {
    let Some(dir) = shm_dir() else { return };
    let bytes = data(1 << 20);
    let file = File::open(write(dir.path(), "t", &bytes)).unwrap();
    let me = thread_name();
    let e = engine(0);
    let q = e.queue(QueueDesc::default()).unwrap();
    for name in loads_report_threads(&q, &file, &bytes, 50) {
        assert_eq!(name, me);
    }
    let e = engine(2);
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
    let e = engine(2);
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
    let e = engine(2);
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
    let e = engine(2);
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
    let e = engine(2);
    let q = e.queue(QueueDesc::default()).unwrap();
    // A completion kept alive: the thread has other work outstanding, so hand-offs are allowed.
    let mut cb = q.command_buffer();
    cb.load(&file, 0, AlignedBuf::new(4096, 4096).unwrap())
        .unwrap();
    let _outstanding = cb.commit().unwrap();
    let mut seen_worker = false;
    for _ in 0..300 {
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
    let e = engine(2);
    let q = e.queue(QueueDesc::default()).unwrap();
    // Other work outstanding, so that command buffers are handed to workers at all.
    let mut cb = q.command_buffer();
    cb.load(&file, 0, AlignedBuf::new(4096, 4096).unwrap())
        .unwrap();
    let _outstanding = cb.commit().unwrap();
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
        let e = engine(3);
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
