//! Command buffers served on the committing thread (`queue::inline`): small loads and stores of
//! memory-backed files. What is served there, what is not, and that a result means the same as on
//! the engine thread (bytes, errors and their messages, barriers, callbacks, statistics).

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

/// Inline workers off: everything here is about the committing thread (tests/inline_workers.rs
/// covers the workers).
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
