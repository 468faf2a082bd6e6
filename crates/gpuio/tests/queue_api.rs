//! The command-queue semantics, through the public API only: end of file, barriers, serial queues,
//! priorities, cancellation, completions as futures, the bounds on queues, record-time errors, buffers
//! coming back, buffer pools, and shutting down with work outstanding.
//!
//! Tests whose outcome would otherwise depend on timing run on a *gated* backend: a real thread-pool
//! backend behind a gate that holds every request until the test opens it. While it is closed the test
//! can look at exactly what the engine handed to the backend (how many requests, how many bytes).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use gpuio::backend::{self, Backend, BackendKind, IoDone, IoRequest};
use gpuio::mem::Registration;
use gpuio::{
    AlignedBuf, BackendChoice, BackendConfig, BufferPool, CommandId, Completion, DirectMode,
    Engine, EngineConfig, ErrorKind, File, IoBuffer, IoQueue, MemoryBudget, OpenOptions, Priority,
    QueueDesc, QueueKind, Status,
};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------------
// Helpers.

/// `len` seeded pseudo-random bytes (xorshift64*).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Cheap distinct content for large files: each 8-byte word holds its own index, scrambled.
fn big_content(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, w) in v.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&((i as u64) ^ 0x5DEE_CE66_D1CE_4E5B).to_le_bytes());
    }
    v
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn zeroed(len: usize) -> AlignedBuf {
    AlignedBuf::new(len, 4096).unwrap()
}

fn buf_of(data: &[u8]) -> AlignedBuf {
    let mut b = zeroed(data.len());
    b.copy_from_slice(data);
    b
}

fn engine(choice: BackendChoice, queue_depth: usize, task_size_bytes: usize) -> Option<Engine> {
    let config = EngineConfig {
        backend: BackendConfig {
            choice,
            queue_depth,
            ..BackendConfig::default()
        },
        task_size_bytes,
        ..EngineConfig::default()
    };
    match Engine::new(config) {
        Ok(e) => Some(e),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            // A note, or a failure when io_uring is required (GPUIO_REQUIRE_URING=1).
            gpuio_testkit::choice_unavailable(choice, &e);
            None
        }
        Err(e) => panic!("{choice:?}: {e}"),
    }
}

/// Engines for every backend that runs here (io_uring may be disabled), queue depth 8, 16 KiB tasks.
fn all_engines() -> Vec<Engine> {
    [
        BackendChoice::Uring,
        BackendChoice::Threads,
        BackendChoice::Mmap,
    ]
    .into_iter()
    .filter_map(|c| engine(c, 8, 16 * KIB))
    .collect()
}

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`, instead of hanging.
fn with_deadline<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            t.join().unwrap();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked: re-raise its panic here.
            std::panic::resume_unwind(t.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("still running after {secs} s: hung"),
    }
}

/// Polls `cond` until it holds or `secs` pass.
fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

fn error_kinds(status: &Status) -> HashMap<usize, ErrorKind> {
    match status {
        Status::Error(v) => v
            .iter()
            .map(|e| (e.command.index(), e.error.kind()))
            .collect(),
        _ => HashMap::new(),
    }
}

// ---------------------------------------------------------------------------------------------------
// A gated backend: holds requests until opened, and measures what the engine hands it.

#[derive(Debug, Default)]
struct Gate {
    open: AtomicBool,
    /// Requests pushed and not yet released to the real backend.
    held: AtomicUsize,
    /// Requests pushed and not reaped, now and at most; bytes likewise.
    requests_now: AtomicUsize,
    requests_max: AtomicUsize,
    bytes_now: AtomicU64,
    bytes_max: AtomicU64,
    pushed_total: AtomicUsize,
    /// The file id of every request pushed, in order.
    log: Mutex<Vec<u64>>,
    /// Pushes ('P') and completions ('C') with the request's file offset, in order.
    events: Mutex<Vec<(char, u64)>>,
    /// Calls of `submit_and_reap`: the engine thread makes one or two per turn of its loop (see
    /// `Driver::run` in crates/gpuio/src/queue/driver.rs), after taking in every message sent.
    reaps: AtomicUsize,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
    fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }
    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
    /// Waits (bounded) until the engine thread has gone once more round its loop: taken in every
    /// message sent before this call (commits) and dispatched what it could. A call of
    /// `submit_and_reap` that started after this one began comes after a look at the messages in the
    /// same turn only if it is the turn's first call; each turn makes at most two, so three new calls
    /// include the first call of a turn that began after this one did. The gated backend keeps the loop
    /// turning while it holds requests (each call waits at most a millisecond then).
    fn engine_turned(&self) {
        let start = self.reaps.load(Ordering::SeqCst);
        eventually(10, "the engine thread to go round its loop", || {
            self.reaps.load(Ordering::SeqCst) >= start + 3
        });
    }
    fn events(&self) -> Vec<(char, u64)> {
        self.events.lock().unwrap().clone()
    }
}

struct Gated {
    inner: Box<dyn Backend>,
    gate: Arc<Gate>,
    held: VecDeque<IoRequest>,
    lens: HashMap<u64, u64>,
    /// File offset of each request by tag.
    offsets: HashMap<u64, u64>,
}

impl Backend for Gated {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn in_flight(&self) -> usize {
        self.held.len() + self.inner.in_flight()
    }
    fn attach_thread(&mut self) -> gpuio::Result<()> {
        self.inner.attach_thread()
    }
    unsafe fn push(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        if self.in_flight() >= self.queue_depth() {
            return Err(req);
        }
        let g = &self.gate;
        let n = g.requests_now.fetch_add(1, Ordering::SeqCst) + 1;
        g.requests_max.fetch_max(n, Ordering::SeqCst);
        let b = g.bytes_now.fetch_add(req.len() as u64, Ordering::SeqCst) + req.len() as u64;
        g.bytes_max.fetch_max(b, Ordering::SeqCst);
        g.pushed_total.fetch_add(1, Ordering::SeqCst);
        g.log.lock().unwrap().push(req.file.id());
        g.events.lock().unwrap().push(('P', req.offset));
        self.offsets.insert(req.tag, req.offset);
        self.lens.insert(req.tag, req.len() as u64);
        self.held.push_back(req);
        g.held.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn submit_and_reap(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<IoDone>,
    ) -> gpuio::Result<()> {
        self.gate.reaps.fetch_add(1, Ordering::SeqCst);
        if self.gate.open.load(Ordering::SeqCst) {
            while let Some(req) = self.held.pop_front() {
                // SAFETY: the engine's contract for `req` (memory valid until reaped) is passed on
                // unchanged; this wrapper reaps it only through the inner backend.
                if let Err(req) = unsafe { self.inner.push(req) } {
                    self.held.push_front(req);
                    break;
                }
                self.gate.held.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if self.inner.in_flight() == 0 {
            // Everything is held: behave like a wait that timed out.
            thread::sleep(timeout.unwrap_or(Duration::from_millis(1)));
            return Ok(());
        }
        let start = out.len();
        self.inner
            .submit_and_reap(min_complete.min(self.inner.in_flight()), timeout, out)?;
        for d in &out[start..] {
            if let Some(len) = self.lens.remove(&d.tag) {
                self.gate.requests_now.fetch_sub(1, Ordering::SeqCst);
                self.gate.bytes_now.fetch_sub(len, Ordering::SeqCst);
            }
            if let Some(off) = self.offsets.remove(&d.tag) {
                self.gate.events.lock().unwrap().push(('C', off));
            }
        }
        Ok(())
    }
    fn register_pool(&mut self, pool: &BufferPool) -> Registration {
        self.inner.register_pool(pool)
    }
    fn notes(&self) -> Vec<String> {
        self.inner.notes()
    }
}

/// A thread-pool engine behind a closed gate.
fn gated_engine(queue_depth: usize, task_size_bytes: usize) -> (Engine, Arc<Gate>) {
    let bc = BackendConfig {
        choice: BackendChoice::Threads,
        queue_depth,
        ..BackendConfig::default()
    };
    let (inner, explain) = backend::probe(&bc).unwrap();
    let gate = Arc::new(Gate::default());
    let gated = Gated {
        inner,
        gate: gate.clone(),
        held: VecDeque::new(),
        lens: HashMap::new(),
        offsets: HashMap::new(),
    };
    let config = EngineConfig {
        backend: bc,
        task_size_bytes,
        ..EngineConfig::default()
    };
    let e = Engine::with_backend(config, Box::new(gated), explain).unwrap();
    (e, gate)
}

// ---------------------------------------------------------------------------------------------------
// End of file.

#[test]
fn exact_load_past_eof_fails_naming_path_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(1, 10_000);
    let path = write_file(dir.path(), "ten-thousand.bin", &data);
    for engine in all_engines() {
        for mode in [DirectMode::Auto, DirectMode::Off] {
            let label = format!("{:?}/{mode:?}", engine.backend_kind());
            let file = OpenOptions::read().direct(mode).open(&path).unwrap();
            let q = engine.queue(QueueDesc::default()).unwrap();

            let mut cb = q.command_buffer();
            let id = cb.load(&file, 8192, zeroed(4096)).unwrap();
            let (status, mut done) = cb.commit().unwrap().wait_parts();
            let Status::Error(errors) = &status else {
                panic!("{label}: expected an error, got {status:?}");
            };
            assert_eq!(errors.len(), 1, "{label}: {errors:?}");
            assert_eq!(errors[0].command, id);
            let e = &errors[0].error;
            assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{label}: {e}");
            assert_eq!(e.path(), Some(path.as_path()), "{label}: {e}");
            assert_eq!(e.offset(), Some(8192), "{label}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains("8192"),
                "{label}: message names neither path nor offset: {msg}"
            );
            assert!(
                done.take_buffer(id).is_some(),
                "{label}: buffer back on failure"
            );

            // finish() reports the same error.
            let mut cb = q.command_buffer();
            cb.load(&file, 9999, zeroed(2)).unwrap();
            let e = cb.commit().unwrap().finish().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{label}: {e}");

            // Up-to loads report what arrived.
            let mut cb = q.command_buffer();
            let cross = cb.load_upto(&file, 8192, zeroed(4096)).unwrap();
            let cross_unaligned = cb
                .load_range(&file, 9000, zeroed(5007), 7, 5000, false)
                .unwrap();
            let at_eof = cb.load_upto(&file, 10_000, zeroed(100)).unwrap();
            let beyond = cb.load_upto(&file, 20_000, zeroed(4096)).unwrap();
            let far_beyond = cb.load_upto(&file, 1 << 40, zeroed(4096)).unwrap();
            let exact_to_eof = cb.load(&file, 5000, zeroed(5000)).unwrap();
            let mut done = cb.commit().unwrap().finish().unwrap();
            assert_eq!(done.bytes(cross), 1808, "{label}");
            assert_eq!(&done.take_buffer(cross).unwrap()[..1808], &data[8192..]);
            assert_eq!(done.bytes(cross_unaligned), 1000, "{label}");
            assert_eq!(
                &done.take_buffer(cross_unaligned).unwrap()[7..1007],
                &data[9000..]
            );
            assert_eq!(done.bytes(at_eof), 0, "{label}");
            assert_eq!(done.bytes(beyond), 0, "{label}");
            assert_eq!(done.bytes(far_beyond), 0, "{label}");
            assert_eq!(done.bytes(exact_to_eof), 5000, "{label}");
            assert_eq!(&done.take_buffer(exact_to_eof).unwrap()[..], &data[5000..]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Barriers.

#[test]
fn store_barrier_load_sees_the_stores() {
    let dir = tempfile::tempdir().unwrap();
    for engine in all_engines() {
        for mode in [DirectMode::Auto, DirectMode::Off] {
            let label = format!("{:?}/{mode:?}", engine.backend_kind());
            let mut model = pattern(2, 64 * KIB);
            let path = write_file(dir.path(), "barrier.bin", &model);
            let file = OpenOptions::read_write().direct(mode).open(&path).unwrap();
            let q = engine.queue(QueueDesc::default()).unwrap();
            for round in 0..4u64 {
                let b = pattern(10 + round, 30_000);
                let c = pattern(20 + round, 8192);
                let mut cb = q.command_buffer();
                let mut src = zeroed(30_005);
                src[5..].copy_from_slice(&b);
                cb.store_range(&file, 1000 + round, src, 5, 30_000).unwrap();
                cb.store(&file, 40_960, buf_of(&c)).unwrap();
                cb.barrier();
                let all = cb.load(&file, 0, zeroed(64 * KIB)).unwrap();
                let part = cb
                    .load_range(&file, 999 + round, zeroed(40_000), 1, 30_002, true)
                    .unwrap();
                let mut done = cb.commit().unwrap().finish().unwrap();
                let at = 1000 + round as usize;
                model[at..at + 30_000].copy_from_slice(&b);
                model[40_960..40_960 + 8192].copy_from_slice(&c);
                assert!(
                    done.take_buffer(all).unwrap()[..] == model[..],
                    "{label}: load after the barrier does not see the stores"
                );
                assert!(
                    done.take_buffer(part).unwrap()[1..30_003] == model[at - 1..at + 30_001],
                    "{label}: unaligned load after the barrier"
                );
            }
        }
    }
}

#[test]
fn failure_before_a_barrier_skips_the_later_stages() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3, 10_000);
    for engine in all_engines() {
        let label = format!("{:?}", engine.backend_kind());
        let path = write_file(dir.path(), "skip.bin", &data);
        let file = OpenOptions::read_write().open(&path).unwrap();
        let q = engine.queue(QueueDesc::default()).unwrap();
        let mut cb = q.command_buffer();
        let fails = cb.load(&file, 8192, zeroed(4096)).unwrap();
        let same_stage = cb.load(&file, 0, zeroed(4096)).unwrap();
        cb.barrier();
        let store = cb.store(&file, 0, buf_of(&[0xFF; 4096])).unwrap();
        let load = cb.load(&file, 0, zeroed(100)).unwrap();
        cb.barrier();
        let sync = cb.sync(&file).unwrap();
        let (status, mut done) = cb.commit().unwrap().wait_parts();
        let kinds = error_kinds(&status);
        assert_eq!(
            kinds,
            HashMap::from([
                (fails.index(), ErrorKind::UnexpectedEof),
                (store.index(), ErrorKind::Cancelled),
                (load.index(), ErrorKind::Cancelled),
                (sync.index(), ErrorKind::Cancelled),
            ]),
            "{label}: {status:?}"
        );
        // The command beside the failed one ran to completion.
        assert_eq!(done.bytes(same_stage), 4096, "{label}");
        assert_eq!(done.take_buffer(same_stage).unwrap()[..], data[..4096]);
        // Skipped commands moved nothing, and their buffers still come back.
        assert_eq!(done.bytes(store), 0, "{label}");
        assert_eq!(done.bytes(load), 0, "{label}");
        assert_eq!(done.take_buffer(store).unwrap().len(), 4096);
        assert!(done.take_buffer(load).is_some());
        assert!(done.take_buffer(sync).is_none(), "a sync has no buffer");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            data,
            "{label}: a skipped store wrote"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Serial queues.

#[test]
fn serial_queue_completes_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let data = big_content(4 * MIB);
    let path = write_file(dir.path(), "serial.bin", &data);
    let file = File::open(&path).unwrap();
    let engine = engine(BackendChoice::Threads, 4, 16 * KIB).unwrap();
    let q = engine.queue(QueueDesc::serial()).unwrap();
    assert_eq!(q.desc().kind, QueueKind::Serial);
    let (tx, rx) = mpsc::channel();
    let n = 12usize;
    let mut completions = Vec::new();
    for i in 0..n {
        // Earlier command buffers are larger: on a concurrent queue later ones would overtake them.
        let len = (n - i) * 256 * KIB;
        let mut cb = q.command_buffer();
        let id = cb.load(&file, (i * 4096) as u64, zeroed(len)).unwrap();
        let tx = tx.clone();
        cb.on_complete(move |s| {
            let _ = tx.send((i, s.is_complete()));
        });
        completions.push((cb.commit().unwrap(), id, i * 4096, len));
    }
    let order: Vec<(usize, bool)> = (0..n)
        .map(|_| rx.recv_timeout(Duration::from_secs(20)).expect("callback"))
        .collect();
    assert_eq!(
        order,
        (0..n).map(|i| (i, true)).collect::<Vec<_>>(),
        "completion order on a serial queue"
    );
    for (c, id, off, len) in completions {
        let mut done = c.finish().unwrap();
        assert!(done.take_buffer(id).unwrap()[..] == data[off..off + len]);
    }
}

#[test]
fn serial_queue_runs_one_command_buffer_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(4, 64 * KIB);
    let path = write_file(dir.path(), "serial-gated.bin", &data);
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&path)
        .unwrap();
    let (engine, gate) = gated_engine(8, 16 * KIB);
    for (desc, expect_held) in [(QueueDesc::serial(), 1), (QueueDesc::default(), 3)] {
        gate.close();
        let q = engine.queue(desc).unwrap();
        let cs: Vec<Completion> = (0..3)
            .map(|i| {
                let mut cb = q.command_buffer();
                cb.load(&file, i * 4096, zeroed(4096)).unwrap();
                cb.commit().unwrap()
            })
            .collect();
        eventually(5, "requests to reach the backend", || {
            gate.held() >= expect_held
        });
        // Every commit taken in and dispatched: a serial queue still holds back the later ones.
        gate.engine_turned();
        assert_eq!(
            gate.held(),
            expect_held,
            "{:?} queue: requests handed to the backend",
            q.desc().kind
        );
        gate.events.lock().unwrap().clear();
        gate.open();
        for c in cs {
            assert!(c.wait().is_complete());
        }
        let events = gate.events();
        if expect_held == 1 {
            // Serial: command buffer i+1 reaches the backend only after i completed.
            let want: Vec<(char, u64)> = (1..3u64)
                .flat_map(|i| [('C', (i - 1) * 4096), ('P', i * 4096)])
                .chain([('C', 2 * 4096)])
                .collect();
            assert_eq!(events, want, "serial queue: pushes and completions");
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Priorities.

/// A backlog of large loads on a low-priority queue, then one small load on a high-priority queue.
/// Returns (low completions when the small load was committed, low completions when it finished,
/// backlog size).
fn backlog_then_small(
    engine: &Engine,
    file: &File,
    backlog: usize,
    each: usize,
) -> (usize, usize, usize) {
    let low = engine
        .queue(QueueDesc {
            priority: Priority::Low,
            command_buffers_max: backlog,
            ..QueueDesc::default()
        })
        .unwrap();
    let high = engine
        .queue(QueueDesc::default().with_priority(Priority::High))
        .unwrap();
    let lows_done = Arc::new(AtomicUsize::new(0));
    // Record everything first, so that the commits follow each other closely.
    let recorded: Vec<_> = (0..backlog)
        .map(|i| {
            let mut cb = low.command_buffer();
            cb.load(file, (i * each) as u64, zeroed(each)).unwrap();
            let d = lows_done.clone();
            cb.on_complete(move |_| {
                d.fetch_add(1, Ordering::SeqCst);
            });
            cb
        })
        .collect();
    let mut cb = high.command_buffer();
    let id = cb.load(file, 12_288, zeroed(4096)).unwrap();
    let lows: Vec<_> = recorded
        .into_iter()
        .map(|cb| cb.commit().unwrap())
        .collect();
    let at_commit = lows_done.load(Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    let d = lows_done.clone();
    // The callback runs on the engine thread, in the order the engine finished command buffers.
    cb.on_complete(move |_| {
        let _ = tx.send(d.load(Ordering::SeqCst));
    });
    let small = cb.commit().unwrap();
    let at_done = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let mut done = small.finish().unwrap();
    assert_eq!(done.bytes(id), 4096);
    drop(done.take_buffer(id));
    for c in lows {
        assert!(c.wait().is_complete());
    }
    (at_commit, at_done, backlog)
}

#[test]
fn high_priority_overtakes_a_low_priority_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 * MIB;
    let path = write_file(dir.path(), "backlog.bin", &big_content(len));
    // Direct I/O, so the backlog really goes to the disk rather than out of the page cache.
    let file = OpenOptions::read().cold(true).open(&path).unwrap();
    let engines: Vec<Engine> = [BackendChoice::Uring, BackendChoice::Threads]
        .into_iter()
        .filter_map(|c| engine(c, 4, 16 * KIB))
        .collect();
    for engine in engines {
        let label = format!("{:?}", engine.backend_kind());
        let mut tries = 0;
        loop {
            tries += 1;
            let (at_commit, at_done, n) = backlog_then_small(&engine, &file, 64, MIB);
            if at_commit >= n / 2 && tries < 3 {
                // This thread was descheduled long enough for the backlog to drain: not a test of
                // priority. Try again.
                eprintln!("{label}: backlog drained before the high-priority commit; retrying");
                continue;
            }
            assert!(
                at_commit < n / 2,
                "{label}: the backlog kept draining before the high-priority load was committed"
            );
            assert!(
                at_done < n && at_done - at_commit <= n / 4,
                "{label}: the high-priority load finished after {at_done} of {n} low-priority \
                 loads ({at_commit} were done when it was committed)"
            );
            eprintln!("{label}: high priority done with {at_done} of {n} low loads done ({at_commit} at commit)");
            break;
        }
    }
}

/// On a gated backend (queue depth 2): a backlog of 8 loads of 256 KiB (16 tasks each) from file A on a
/// low-priority queue, then a small load of 8 tasks from file B — on a queue of `small` priority, or on
/// the backlog's own queue when `small` is `None`. Returns the low command buffers finished when the
/// small load finished, the backlog size, and the order in which requests reached the backend ('A'
/// or 'B').
fn gated_backlog(
    engine: &Engine,
    gate: &Arc<Gate>,
    a: &File,
    b: &File,
    small: Option<Priority>,
) -> (usize, usize, String) {
    gate.close();
    gate.log.lock().unwrap().clear();
    let n = 8;
    let low = engine
        .queue(QueueDesc::default().with_priority(Priority::Low))
        .unwrap();
    let other = engine
        .queue(QueueDesc::default().with_priority(small.unwrap_or(Priority::Low)))
        .unwrap();
    let lows_done = Arc::new(AtomicUsize::new(0));
    let lows: Vec<Completion> = (0..n)
        .map(|i| {
            let mut cb = low.command_buffer();
            cb.load(a, (i * 256 * KIB) as u64, zeroed(256 * KIB))
                .unwrap();
            let d = lows_done.clone();
            cb.on_complete(move |_| {
                d.fetch_add(1, Ordering::SeqCst);
            });
            cb.commit().unwrap()
        })
        .collect();
    eventually(5, "the backend to fill", || gate.held() == 2);
    let q = if small.is_some() { &other } else { &low };
    let mut cb = q.command_buffer();
    cb.load(b, 0, zeroed(128 * KIB)).unwrap();
    let (tx, rx) = mpsc::channel();
    let d = lows_done.clone();
    cb.on_complete(move |_| {
        let _ = tx.send(d.load(Ordering::SeqCst));
    });
    let small_done = cb.commit().unwrap();
    // The engine has taken the commit in before the gate opens.
    gate.engine_turned();
    gate.open();
    let at_done = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(small_done.wait().is_complete());
    for c in lows {
        assert!(c.wait().is_complete());
    }
    let log: String = gate
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|&id| if id == a.id() { 'A' } else { 'B' })
        .collect();
    (at_done, n, log)
}

#[test]
fn priority_and_round_robin_on_a_gated_backend() {
    let dir = tempfile::tempdir().unwrap();
    let content = big_content(2 * MIB);
    let open = |name: &str| {
        let p = write_file(dir.path(), name, &content);
        OpenOptions::read().direct(DirectMode::Off).open(p).unwrap()
    };
    let (a, b) = (open("a.bin"), open("b.bin"));
    let (engine, gate) = gated_engine(2, 16 * KIB);

    // High priority: every one of its requests goes out before any further low one.
    let (at_done, n, log) = gated_backlog(&engine, &gate, &a, &b, Some(Priority::High));
    assert_eq!(
        at_done, 0,
        "high priority finished after {at_done} of {n} low loads"
    );
    assert!(
        log.starts_with("AABBBBBBBBA"),
        "high priority: requests in the order {log}"
    );

    // Equal priority, separate queues: they share the backend, the small load is not starved.
    let (at_done, n, log) = gated_backlog(&engine, &gate, &a, &b, Some(Priority::Low));
    eprintln!("equal priority: requests in the order {log}");
    // Round-robin: after the two requests already in the backend, the queues take turns.
    assert!(
        log.rfind('B').is_some_and(|last| last <= 2 + 2 * 8),
        "equal priority: requests in the order {log}"
    );
    assert!(
        at_done <= 1,
        "equal priority: the small load waited for {at_done} of {n} low loads; requests in the \
         order {log}"
    );

    // Control: the same small load behind the backlog on one queue waits for it.
    let (at_done, n, log) = gated_backlog(&engine, &gate, &a, &b, None);
    assert!(
        at_done >= n - 1,
        "control: a small load behind the backlog finished after only {at_done} of {n}"
    );
    assert!(
        log.ends_with("BBBBBBBB") || log.ends_with("BBBBBBBBA"),
        "control: {log}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Cancellation.

#[test]
fn try_cancel_a_pending_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "cancel.bin", &big_content(MIB));
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&path)
        .unwrap();
    let (engine, gate) = gated_engine(2, 16 * KIB);
    let q = engine.queue(QueueDesc::default()).unwrap();

    let mut cb = q.command_buffer();
    let id = cb.load(&file, 0, zeroed(MIB)).unwrap();
    let c = cb.commit().unwrap();
    eventually(5, "the backend to fill", || gate.held() == 2);
    assert!(c.try_cancel(), "a pending command buffer can be cancelled");
    // Its two transfers are still in the backend: it stays pending until they drain.
    assert!(c.wait_timeout(Duration::from_millis(30)).is_none());
    gate.open();
    let status = c.wait();
    assert!(matches!(status, Status::Cancelled), "{status:?}");
    assert_eq!(
        status.first_error().map(|e| e.kind()),
        Some(ErrorKind::Cancelled)
    );
    assert!(!c.try_cancel(), "finished: nothing to cancel");
    assert_eq!(
        gate.pushed_total.load(Ordering::SeqCst),
        2,
        "no transfer was issued after the cancel"
    );
    let (_, mut done) = c.wait_parts();
    assert_eq!(
        done.take_buffer(id).unwrap().len(),
        MIB,
        "buffer back after cancel"
    );
    let e = {
        let mut cb = q.command_buffer();
        cb.load(&file, 0, zeroed(10)).unwrap();
        cb.commit().unwrap().finish()
    };
    assert!(e.is_ok(), "the queue works after a cancel: {e:?}");
}

#[test]
fn try_cancel_a_command_buffer_waiting_on_a_serial_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "cancel-serial.bin", &big_content(MIB));
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&path)
        .unwrap();
    let (engine, gate) = gated_engine(2, 16 * KIB);
    let q = engine.queue(QueueDesc::serial()).unwrap();
    let commit = |off: u64| {
        let mut cb = q.command_buffer();
        cb.load(&file, off, zeroed(64 * KIB)).unwrap();
        cb.commit().unwrap()
    };
    let first = commit(0);
    let second = commit(64 * KIB as u64);
    eventually(5, "the backend to fill", || gate.held() == 2);
    assert!(second.try_cancel());
    // It never started, so it finishes at once, although the gate is still closed.
    let s = second.wait_timeout(Duration::from_secs(5));
    assert!(matches!(s, Some(Status::Cancelled)), "{s:?}");
    assert!(first.status().is_pending());
    gate.open();
    assert!(first.wait().is_complete());
}

#[test]
fn try_cancel_with_real_io() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "cancel-real.bin", &big_content(16 * MIB));
    let file = File::open(&path).unwrap();
    let engine = engine(BackendChoice::Threads, 2, 16 * KIB).unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let mut cb = q.command_buffer();
    cb.load(&file, 0, zeroed(16 * MIB)).unwrap();
    let c = cb.commit().unwrap();
    let cancelled = c.try_cancel();
    let status = c.wait();
    if cancelled {
        assert!(matches!(status, Status::Cancelled), "{status:?}");
    } else {
        assert!(status.is_complete(), "{status:?}");
    }
    // A finished command buffer cannot be cancelled, and its status does not change.
    let mut cb = q.command_buffer();
    cb.load(&file, 0, zeroed(4096)).unwrap();
    let c = cb.commit().unwrap();
    assert!(c.wait().is_complete());
    assert!(!c.try_cancel());
    assert!(c.status().is_complete());
    assert!(c.finish().is_ok());
}

// ---------------------------------------------------------------------------------------------------
// Completion as a Future, with a hand-written executor.

struct ThreadWaker {
    thread: Thread,
    wakes: AtomicUsize,
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Polls `fut` to completion on this thread, parking between polls. Returns the output and the
/// number of polls.
fn block_on<F: Future + Unpin>(mut fut: F, waker: &Arc<ThreadWaker>) -> (F::Output, usize) {
    let w = Waker::from(waker.clone());
    let mut cx = Context::from_waker(&w);
    let mut polls = 0;
    loop {
        polls += 1;
        if let Poll::Ready(v) = Pin::new(&mut fut).poll(&mut cx) {
            return (v, polls);
        }
        thread::park();
    }
}

#[test]
fn completion_is_a_future() {
    with_deadline(20, || {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(5, 200 * KIB);
        let path = write_file(dir.path(), "future.bin", &data);
        let file = File::open(&path).unwrap();
        let (engine, gate) = gated_engine(4, 16 * KIB);
        let q = engine.queue(QueueDesc::default()).unwrap();
        let mut cb = q.command_buffer();
        let id = cb.load(&file, 100, zeroed(100 * KIB)).unwrap();
        let mut c = cb.commit().unwrap();

        let waker = Arc::new(ThreadWaker {
            thread: thread::current(),
            wakes: AtomicUsize::new(0),
        });
        // The gate is closed: the first poll must say Pending.
        {
            let w = Waker::from(waker.clone());
            let mut cx = Context::from_waker(&w);
            assert!(Pin::new(&mut c).poll(&mut cx).is_pending());
        }
        let g = gate.clone();
        let opener = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            g.open();
        });
        let (status, polls) = block_on(&mut c, &waker);
        opener.join().unwrap();
        assert!(status.is_complete(), "{status:?}");
        assert!(polls >= 1);
        assert!(
            waker.wakes.load(Ordering::SeqCst) >= 1,
            "completion woke the waker"
        );
        let mut done = c.finish().unwrap();
        assert!(done.take_buffer(id).unwrap()[..] == data[100..100 + 100 * KIB]);

        // Many completions on a real engine, polled round-robin by the same executor.
        let engine = engine_or_threads(BackendChoice::Uring);
        let q = engine.queue(QueueDesc::default()).unwrap();
        let mut pending: Vec<(Completion, CommandId, usize)> = (0..16)
            .map(|i| {
                let mut cb = q.command_buffer();
                let off = i * 12 * KIB + i;
                let id = cb.load(&file, off as u64, zeroed(12 * KIB)).unwrap();
                (cb.commit().unwrap(), id, off)
            })
            .collect();
        let w = Waker::from(waker.clone());
        let mut cx = Context::from_waker(&w);
        let mut finished = Vec::new();
        while !pending.is_empty() {
            let mut i = 0;
            while i < pending.len() {
                if let Poll::Ready(s) = Pin::new(&mut pending[i].0).poll(&mut cx) {
                    assert!(s.is_complete(), "{s:?}");
                    finished.push(pending.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            if !pending.is_empty() {
                thread::park_timeout(Duration::from_millis(100));
            }
        }
        for (c, id, off) in finished {
            let mut done = c.finish().unwrap();
            assert!(done.take_buffer(id).unwrap()[..] == data[off..off + 12 * KIB]);
        }
    });
}

fn engine_or_threads(choice: BackendChoice) -> Engine {
    engine(choice, 8, 16 * KIB)
        .or_else(|| engine(BackendChoice::Threads, 8, 16 * KIB))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------------
// Bounds.

#[test]
fn try_commit_would_block_when_the_queue_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "full.bin", &pattern(6, 64 * KIB));
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&path)
        .unwrap();
    let (engine, gate) = gated_engine(4, 16 * KIB);
    let q = engine
        .queue(QueueDesc {
            command_buffers_max: 2,
            ..QueueDesc::default()
        })
        .unwrap();
    let record = |q: &IoQueue| {
        let mut cb = q.command_buffer();
        cb.load(&file, 0, zeroed(4096)).unwrap();
        cb
    };
    let a = record(&q).try_commit().unwrap();
    let b = record(&q).commit().unwrap();
    let e = record(&q).try_commit().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    assert!(e.to_string().contains('2'), "names the bound: {e}");

    // A blocking commit waits for a slot.
    let (tx, rx) = mpsc::channel();
    let cb = record(&q);
    let waiter = thread::spawn(move || {
        let c = cb.commit();
        let _ = tx.send(());
        c.map(|c| c.wait())
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "commit returned while the queue was full"
    );
    gate.open();
    assert!(a.wait().is_complete());
    assert!(b.wait().is_complete());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("commit proceeds once a slot frees");
    assert!(waiter.join().unwrap().unwrap().is_complete());
    // No slot leaked: the bound is usable again in full.
    let c1 = record(&q).try_commit().unwrap();
    let c2 = record(&q).try_commit().unwrap();
    assert!(c1.wait().is_complete() && c2.wait().is_complete());
}

#[test]
fn bytes_in_flight_bound_is_respected() {
    let dir = tempfile::tempdir().unwrap();
    let data = big_content(MIB);
    let path = write_file(dir.path(), "bytes.bin", &data);
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&path)
        .unwrap();
    // (bound, requests the backend holds while closed, largest bytes in flight allowed)
    for (bound, held, bytes_max) in [
        (32 * KIB as u64, 2, 32 * KIB as u64),
        (1, 1, 16 * KIB as u64),
        (256 * MIB as u64, 8, 8 * 16 * KIB as u64),
    ] {
        let (engine, gate) = gated_engine(8, 16 * KIB);
        let q = engine
            .queue(QueueDesc {
                bytes_in_flight_max: bound,
                ..QueueDesc::default()
            })
            .unwrap();
        let mut cb = q.command_buffer();
        let whole = cb.load(&file, 0, zeroed(MIB)).unwrap();
        let unaligned = cb
            .load_range(&file, 777, zeroed(300_001), 1, 300_000, true)
            .unwrap();
        let c = cb.commit().unwrap();
        eventually(5, "the backend to receive work", || gate.held() >= held);
        // The engine has dispatched all it would: the bound holds the rest back.
        gate.engine_turned();
        assert_eq!(gate.held(), held, "bound {bound}: requests in the backend");
        gate.open();
        let mut done = c.finish().unwrap();
        assert!(done.take_buffer(whole).unwrap()[..] == data[..]);
        assert!(done.take_buffer(unaligned).unwrap()[1..300_001] == data[777..300_777]);
        let seen = gate.bytes_max.load(Ordering::SeqCst);
        assert!(
            seen <= bytes_max,
            "bound {bound}: {seen} bytes were in flight at once"
        );
        if bound == 1 {
            assert_eq!(gate.requests_max.load(Ordering::SeqCst), 1);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Errors at record time and bad configurations.

#[test]
fn record_time_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "ro.bin", &pattern(7, 8192));
    let engine = engine(BackendChoice::Threads, 4, 16 * KIB).unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let ro = File::open(&path).unwrap();
    let mut cb = q.command_buffer();
    let e = cb.store(&ro, 0, zeroed(4096)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    let e = cb.store_range(&ro, 10, zeroed(4096), 0, 10).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(cb.is_empty(), "failed records add no command");

    let rw = OpenOptions::read_write().open(&path).unwrap();
    for e in [
        cb.load_range(&ro, 0, zeroed(4096), 4000, 200, true)
            .unwrap_err(),
        cb.load_range(&ro, 0, zeroed(4096), 5000, 0, false)
            .unwrap_err(),
        cb.store_range(&rw, 0, zeroed(100), 1, 100).unwrap_err(),
        cb.load(&ro, u64::MAX - 10, zeroed(4096)).unwrap_err(),
        cb.store(&rw, i64::MAX as u64, zeroed(1)).unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    assert!(cb.is_empty());
    // The buffer is fine, and an empty command buffer commits and completes.
    assert!(cb.commit().unwrap().wait().is_complete());

    let bad = |f: &dyn Fn(&mut EngineConfig)| {
        let mut c = EngineConfig::default();
        f(&mut c);
        assert_eq!(
            c.validate().unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{c:?}"
        );
        Engine::new(c).unwrap_err().kind()
    };
    assert_eq!(bad(&|c| c.backend.queue_depth = 0), ErrorKind::InvalidInput);
    assert_eq!(
        bad(&|c| c.backend.queue_depth = 1 << 20),
        ErrorKind::InvalidInput
    );
    assert_eq!(bad(&|c| c.task_size_bytes = 0), ErrorKind::InvalidInput);
    assert_eq!(bad(&|c| c.task_size_bytes = 5000), ErrorKind::InvalidInput);
    assert_eq!(
        bad(&|c| c.task_size_bytes = 1 << 30),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        bad(&|c| c.task_size_bytes = usize::MAX),
        ErrorKind::InvalidInput
    );
    assert_eq!(bad(&|c| c.bounce_buffers = 0), ErrorKind::InvalidInput);
    for desc in [
        QueueDesc {
            command_buffers_max: 0,
            ..QueueDesc::default()
        },
        QueueDesc {
            bytes_in_flight_max: 0,
            ..QueueDesc::default()
        },
    ] {
        assert_eq!(
            engine.queue(desc).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Sync, and buffers coming back.

#[test]
fn sync_and_buffers_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sync.bin");
    for engine in all_engines() {
        let label = format!("{:?}", engine.backend_kind());
        let file = OpenOptions::create().truncate(true).open(&path).unwrap();
        let q = engine.queue(QueueDesc::default()).unwrap();
        let a = pattern(8, 10_000);
        let b = pattern(9, 8192);
        let mut cb = q.command_buffer();
        let sa = cb.store(&file, 0, buf_of(&a)).unwrap();
        let sb = cb.store(&file, 16_384, buf_of(&b)).unwrap();
        cb.barrier();
        let sync = cb.sync(&file).unwrap();
        assert_eq!(cb.len(), 3);
        let c = cb.commit().unwrap();
        assert_eq!(c.len(), 3);
        let mut done = c.finish().unwrap();
        assert_eq!(done.bytes(sa), 10_000, "{label}");
        assert_eq!(done.bytes(sb), 8192, "{label}");
        assert_eq!(done.bytes(sync), 0, "{label}");
        assert!(done.take_buffer(sync).is_none());
        let back = done.take_buffer(sa).expect("store buffer back");
        assert!(back[..] == a[..], "{label}: returned buffer unchanged");
        assert!(done.take_buffer(sa).is_none(), "taken once");
        let rest = done.into_buffers();
        assert_eq!(rest.len(), 3);
        assert!(rest[0].is_none() && rest[2].is_none());
        assert!(rest[1].as_ref().unwrap()[..] == b[..]);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 16_384 + 8192, "{label}");
        assert!(on_disk[..10_000] == a[..] && on_disk[16_384..] == b[..]);
        assert!(
            on_disk[10_000..16_384].iter().all(|&x| x == 0),
            "{label}: hole"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Buffer pools.

#[test]
fn engine_buffer_pool_feeds_loads() {
    let dir = tempfile::tempdir().unwrap();
    let data = big_content(MIB);
    let path = write_file(dir.path(), "pool.bin", &data);
    for engine in all_engines() {
        let kind = engine.backend_kind();
        let file = File::open(&path).unwrap();
        let pool = engine.buffer_pool(64 * KIB, 4).unwrap();
        let reg = pool.registration();
        match (&reg, kind) {
            (Registration::Fixed { .. }, BackendKind::Uring) => {}
            (Registration::Refused(why), _) => {
                assert!(!why.is_empty(), "{kind}: a refusal says why");
                if kind != BackendKind::Uring {
                    assert!(why.contains(kind.name()), "{kind}: {why}");
                }
            }
            (r, k) => panic!("{k}: unexpected registration {r:?}"),
        }
        eprintln!("{kind}: pool registration {reg:?}");
        let q = engine.queue(QueueDesc::default()).unwrap();
        let mut cb = q.command_buffer();
        let mut ids = Vec::new();
        for i in 0..3usize {
            let b = pool.get();
            assert_eq!(
                b.fixed_index().is_some(),
                matches!(reg, Registration::Fixed { .. }),
                "{kind}: fixed index iff registered"
            );
            let id = if i == 2 {
                cb.load_range(&file, 1000, b, 100, 60_000, true).unwrap()
            } else {
                cb.load(&file, (i * 64 * KIB) as u64, b).unwrap()
            };
            ids.push(id);
        }
        assert_eq!(pool.available(), 1);
        let mut done = cb.commit().unwrap().finish().unwrap();
        for (i, id) in ids.into_iter().enumerate() {
            let buf = done.take_buffer(id).unwrap();
            assert!(
                matches!(buf, IoBuffer::Pooled(_)),
                "{kind}: pooled comes back pooled"
            );
            if i == 2 {
                assert!(buf[100..60_100] == data[1000..61_000], "{kind}");
            } else {
                assert!(buf[..] == data[i * 64 * KIB..(i + 1) * 64 * KIB], "{kind}");
            }
        }
        drop(done);
        assert_eq!(pool.available(), 4, "{kind}: buffers returned to the pool");
    }
}

#[test]
fn engine_buffer_pool_is_charged_to_the_budget() {
    let config = EngineConfig {
        backend: BackendConfig {
            choice: BackendChoice::Threads,
            queue_depth: 4,
            ..BackendConfig::default()
        },
        task_size_bytes: 64 * KIB,
        bounce_buffers: 4,
        memory_budget: MemoryBudget::new(2 * MIB as u64),
        ..EngineConfig::default()
    };
    let budget = config.memory_budget.clone();
    let engine = Engine::new(config).unwrap();
    let used = budget.used_bytes();
    assert!(used > 0, "bounce buffers are charged");
    let e = engine.buffer_pool(MIB, 2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    assert_eq!(budget.used_bytes(), used, "a refused pool takes nothing");
    let pool = engine.buffer_pool(256 * KIB, 2).unwrap();
    assert_eq!(budget.used_bytes(), used + 512 * KIB as u64);
    drop(pool);
}

// ---------------------------------------------------------------------------------------------------
// Shutting down with work outstanding.

/// Counts panics on engine threads (the hook is process-wide, so install it once and chain).
fn engine_panics() -> &'static AtomicUsize {
    static COUNT: OnceLock<&'static AtomicUsize> = OnceLock::new();
    COUNT.get_or_init(|| {
        let count: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if thread::current().name() == Some("gpuio-engine") {
                count.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
        count
    })
}

#[test]
fn dropping_completion_queue_and_engine_drains_the_work() {
    let panics = engine_panics();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "drain.bin", &big_content(8 * MIB));
    for choice in [
        BackendChoice::Uring,
        BackendChoice::Threads,
        BackendChoice::Mmap,
    ] {
        let Some(engine) = engine(choice, 4, 16 * KIB) else {
            continue;
        };
        let file = File::open(&path).unwrap();
        let status = with_deadline(20, move || {
            let q = engine.queue(QueueDesc::default()).unwrap();
            let (tx, rx) = mpsc::channel();
            let mut cb = q.command_buffer();
            cb.load(&file, 0, zeroed(8 * MIB)).unwrap();
            cb.on_complete(move |s| {
                let _ = tx.send(s.clone());
            });
            let c = cb.commit().unwrap();
            drop(c);
            drop(q);
            // The last handle: waits for the engine thread, which finishes the load first.
            drop(engine);
            rx.try_recv()
                .expect("the work finished before the engine went away")
        });
        assert!(status.is_complete(), "{choice:?}: {status:?}");

        // The other order: engine and queue handles go first, the completion lives on.
        let engine = self::engine(choice, 4, 16 * KIB).unwrap();
        let file = File::open(&path).unwrap();
        let status = with_deadline(20, move || {
            let q = engine.queue(QueueDesc::default()).unwrap();
            let mut cb = q.command_buffer();
            cb.load(&file, 4096, zeroed(4 * MIB)).unwrap();
            let c = cb.commit().unwrap();
            drop(q);
            drop(engine);
            let s = c.wait();
            drop(c);
            s
        });
        assert!(status.is_complete(), "{choice:?}: {status:?}");
    }
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "an engine thread panicked"
    );
}

#[test]
fn last_handle_dropped_by_a_completion_callback() {
    // A callback that owns a queue (to commit follow-up work, say) can end up holding the last
    // handle to the engine; it then drops it on the engine thread itself.
    let panics = engine_panics();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "self-drop.bin", &pattern(11, 64 * KIB));
    let file = File::open(&path).unwrap();
    let engine = engine(BackendChoice::Threads, 4, 16 * KIB).unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    let (tx, rx) = mpsc::channel();
    let mut cb = q.command_buffer();
    cb.load(&file, 0, zeroed(64 * KIB)).unwrap();
    // Dropped with the callback, just after `q2` (a tuple's fields drop in order, also when unwinding):
    // its signal says the last handle has been dropped, and any panic in that drop has been counted.
    struct Dropped(mpsc::Sender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (dropped_tx, dropped_rx) = mpsc::channel();
    let captured = (q.clone(), Dropped(dropped_tx));
    cb.on_complete(move |s| {
        let captured = captured;
        // Wait until the test has dropped its own handles, so that `q2` is the last one.
        let _ = gate_rx.recv_timeout(Duration::from_secs(10));
        let _ = tx.send((s.is_complete(), captured.0.desc().kind));
    });
    drop(cb.commit().unwrap());
    drop(q);
    drop(engine);
    gate_tx.send(()).unwrap();
    let (ok, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(ok);
    // The callback's captures (the last engine handle among them) are dropped just after it returns.
    dropped_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the callback's captures were dropped");
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "dropping the last engine handle on the engine thread panicked"
    );
}
