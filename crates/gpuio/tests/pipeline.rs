//! Pipelines end to end: the same random cases (lengths 0, 1, unaligned, several MiB; 1..6 slots; chunk
//! sizes down to one byte and unaligned) on every backend, direct and buffered, must give the input
//! transformed, in order, with memory bounded by the slots; three slots must overlap the stages where
//! one slot does not; and faults injected mid-stream (EIO on read, ENOSPC on write, EIO on the final
//! sync, short transfers, EINTR), compute errors, a source that shrinks and a panicking closure must
//! each stop the run with the stage and the slot's offset, leave the destination as it was, and leave no
//! temporary file. Every run has a time limit: a hang fails the test instead of stalling it.
//!
//! Reproduce the random cases with `GPUIO_PIPELINE_SEED=<seed>` (the seed is printed).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use gpuio::backend::BackendKind;
use gpuio::pipeline::{
    FileSink, FileSource, PipelineStats, Sink, SlotFuture, Source, Stage, SLOTS_MAX,
};
use gpuio::{
    DirectMode, Engine, EngineConfig, Error, ErrorKind, IoBuffer, Pipeline, PipelineError,
    QueueDesc,
};
use gpuio_testkit::{
    faulty_engine_with, kind_works, scratch_dir, temp_files, test_config, FaultHandle, FaultPlan,
    Place, Rng,
};

/// Far longer than any run here needs; reaching it means a hang.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread and fails the test if it does not return within [`LIMIT`] (a panic in
/// `f` is passed on).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no result after {LIMIT:?}: the pipeline hangs")
        }
    }
}

/// What the test closures do to each byte: depends on the byte's logical offset, so a slot computed
/// at the wrong offset or written out of order shows.
fn transform(offset: u64, b: u8) -> u8 {
    b ^ (offset.wrapping_mul(31) >> 3) as u8 ^ 0x5a
}

fn transform_slot(offset: u64, bytes: &mut [u8]) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = transform(offset + i as u64, *b);
    }
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// The backends every case runs on: io_uring where the kernel allows it, the thread pool, mmap.
fn kinds() -> Vec<BackendKind> {
    let kinds: Vec<BackendKind> = gpuio_testkit::ALL_KINDS
        .into_iter()
        .filter(|&k| kind_works(k))
        .collect();
    assert!(kinds.contains(&BackendKind::Threads));
    kinds
}

// ---------------------------------------------------------------------------------------------------
// Correctness.

#[test]
fn random_cases_give_the_input_transformed_in_order_on_every_backend() {
    let seed = std::env::var("GPUIO_PIPELINE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7069_7065);
    eprintln!("GPUIO_PIPELINE_SEED={seed}");
    let mut rng = Rng::new(seed);
    let mut cases: Vec<(usize, usize, usize)> = vec![
        (0, 3, 4096),
        (1, 1, 4096),
        (1, 6, 1),
        (4095, 2, 4096),
        (4097, 3, 4096),
        (10_000, 4, 1),
        (100_003, 3, 1000),
        (3 << 20, 3, 1 << 20),
        ((3 << 20) + 17, 5, (64 << 10) + 7),
    ];
    for _ in 0..10 {
        let len = match rng.below(4) {
            0 => rng.below_usize(8192),
            1 => rng.below_usize(300_000),
            _ => rng.below_usize(4 << 20),
        };
        let chunk = *rng.pick(&[512, 1000, 4096, 12_288, 65_536 + 3, 1 << 20, 3 << 20]);
        cases.push((len, 1 + rng.below_usize(6), chunk));
    }
    for kind in kinds() {
        for place in [Place::Disk, Place::Shm] {
            let label = format!("{kind}/{place:?}");
            let cases = cases.clone();
            within(&label.clone(), move || {
                let engine = Engine::new(test_config(kind)).unwrap();
                let queue = engine.queue(QueueDesc::default()).unwrap();
                let dir = scratch_dir(place);
                for (i, &(len, slots, chunk)) in cases.iter().enumerate() {
                    let what = format!("{label} case {i}: {len} bytes, {slots} slots of {chunk}");
                    let input = data(len, seed ^ i as u64);
                    let src = dir.path().join(format!("in{i}"));
                    let dst = dir.path().join(format!("out{i}"));
                    std::fs::write(&src, &input).unwrap();
                    if i % 2 == 1 {
                        std::fs::write(&dst, b"an older, different version").unwrap();
                    }
                    let source = FileSource::open(&queue, &src, DirectMode::Auto).unwrap();
                    let sink = FileSink::replace(&queue, &dst, DirectMode::Auto).unwrap();
                    let mut next = 0u64;
                    let stats = Pipeline::new(&engine, source)
                        .sink(sink)
                        .slots(slots)
                        .chunk_size(chunk)
                        .run(|slot| {
                            assert_eq!(slot.offset(), next, "{what}: slots in source order");
                            assert_eq!(slot.seq(), next / chunk as u64);
                            next += slot.len() as u64;
                            transform_slot(slot.offset(), slot.bytes_mut());
                            Ok(())
                        })
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let mut want = input.clone();
                    transform_slot(0, &mut want);
                    let got = std::fs::read(&dst).unwrap();
                    assert!(got == want, "{what}: output differs ({} bytes)", got.len());
                    assert_eq!(stats.bytes_in, len as u64, "{what}");
                    assert_eq!(stats.bytes_out, len as u64, "{what}");
                    assert_eq!(stats.chunks, (len as u64).div_ceil(chunk as u64), "{what}");
                    assert!(stats.slots_peak <= slots, "{what}: {stats:?}");
                    assert!(
                        temp_files(dir.path()).is_empty(),
                        "{what}: temporary files left"
                    );
                }
            });
        }
    }
}

#[test]
fn compute_may_resize_slots_and_output_stays_in_order() {
    let dir = scratch_dir(Place::Disk);
    let input = data(1_000_000, 5);
    let src = dir.path().join("in");
    let dst = dir.path().join("out");
    std::fs::write(&src, &input).unwrap();
    // Not a multiple of the page: each slot has room to grow past what was read.
    let chunk = 60_000;
    let out = within("resize", move || {
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let source = FileSource::open(&queue, &src, DirectMode::Auto).unwrap();
        let sink = FileSink::replace(&queue, &dst, DirectMode::Auto).unwrap();
        Pipeline::new(&engine, source)
            .sink(sink)
            .chunk_size(chunk)
            .run(|slot| {
                match slot.seq() % 3 {
                    0 => slot.set_len(slot.len() / 2 + 1)?, // shorter: unaligned output offsets
                    1 => slot.set_len(0)?,                  // nothing
                    _ => {
                        // Longer: a marker after the bytes read.
                        let n = slot.len();
                        slot.set_len(n + 10)?;
                        slot.bytes_mut()[n..].fill(0xee);
                    }
                }
                Ok(())
            })
            .unwrap();
        std::fs::read(&dst).unwrap()
    });
    let mut want = Vec::new();
    for (seq, c) in input.chunks(chunk).enumerate() {
        match seq % 3 {
            0 => want.extend_from_slice(&c[..c.len() / 2 + 1]),
            1 => {}
            _ => {
                want.extend_from_slice(c);
                want.extend_from_slice(&[0xee; 10]);
            }
        }
    }
    assert!(out == want, "{} bytes, {} expected", out.len(), want.len());
    // Past the capacity is refused, not written.
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let queue = engine.queue(QueueDesc::default()).unwrap();
    let source = FileSource::open(&queue, dir.path().join("in"), DirectMode::Auto).unwrap();
    let err = Pipeline::new(&engine, source)
        .chunk_size(chunk)
        .run(|slot| slot.set_len(slot.capacity() + 1))
        .unwrap_err();
    assert_eq!(err.stage(), Stage::Compute);
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn a_file_range_and_no_sink() {
    let dir = scratch_dir(Place::Disk);
    let input = data(500_000, 9);
    let src = dir.path().join("in");
    std::fs::write(&src, &input).unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let queue = engine.queue(QueueDesc::default()).unwrap();
    let file = gpuio::File::open(&src).unwrap();
    let mut got = Vec::new();
    let stats = Pipeline::new(
        &engine,
        FileSource::range(&queue, file.clone(), 1234, 300_000).unwrap(),
    )
    .chunk_size(65_536)
    .run(|slot| {
        got.extend_from_slice(slot.bytes());
        Ok(())
    })
    .unwrap();
    assert!(got[..] == input[1234..301_234]);
    assert!(stats.write.is_none());
    assert_eq!(stats.stages().len(), 2);
    let e = FileSource::range(&queue, file, 400_000, 100_001).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

// ---------------------------------------------------------------------------------------------------
// Back-pressure and overlap, with a synthetic source and sink whose operations take a fixed time.

/// The result a timer thread hands over, and the waker to wake when it does.
type Handover = Arc<Mutex<(Option<gpuio::Result<IoBuffer>>, Option<Waker>)>>;
/// What a sink was given: (offset, bytes) per write.
type Written = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// A future completed by a timer thread after `delay`.
struct Delayed(Handover);

impl Future for Delayed {
    type Output = gpuio::Result<IoBuffer>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.lock().unwrap();
        match s.0.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn delayed(buf: IoBuffer, delay: Duration, outstanding: Arc<AtomicUsize>) -> SlotFuture {
    let state: Handover = Arc::new(Mutex::new((None, None)));
    let s = state.clone();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        outstanding.fetch_sub(1, Ordering::SeqCst);
        let waker = {
            let mut g = s.lock().unwrap();
            g.0 = Some(Ok(buf));
            g.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    });
    Box::pin(Delayed(state))
}

/// `len` bytes, each fill taking `delay`; counts fills outstanding at once.
struct SlowSource {
    len: u64,
    delay: Duration,
    outstanding: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Source for SlowSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn fill(&mut self, offset: u64, mut buf: IoBuffer) -> gpuio::Result<SlotFuture> {
        transform_slot(offset, &mut buf); // "reads" bytes that depend on the offset
        let n = self.outstanding.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        Ok(delayed(buf, self.delay, self.outstanding.clone()))
    }
}

// Overlap, shown by order rather than by timing: a source and a sink whose operations complete only
// when the test says so, and a log of every event in the order it happened. Ratios of wall times are
// left to benchmarks (`scripts/bench-pipeline.sh`): on a loaded machine they prove little.

/// What happened, to which chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    FillIssued(u64),
    FillDone(u64),
    ComputeStart(u64),
    ComputeEnd(u64),
    WriteIssued(u64),
    WriteDone(u64),
}

/// Operations that complete when [`Gates::open`] is called for them (before or after they start),
/// logging each event.
#[derive(Default)]
struct GatesInner {
    log: Vec<Ev>,
    /// Started and not yet completed: (is a write, chunk) → the handover and its buffer.
    waiting: Vec<((bool, u64), Handover, IoBuffer)>,
    /// Opened before they started.
    opened: Vec<(bool, u64)>,
}

#[derive(Clone, Default)]
struct Gates(Arc<Mutex<GatesInner>>);

impl Gates {
    fn log(&self, e: Ev) {
        self.0.lock().unwrap().log.push(e);
    }
    fn events(&self) -> Vec<Ev> {
        self.0.lock().unwrap().log.clone()
    }
    /// Starts an operation that completes when opened (at once if it was opened already).
    fn start(&self, write: bool, chunk: u64, buf: IoBuffer) -> SlotFuture {
        let state: Handover = Arc::new(Mutex::new((None, None)));
        let mut g = self.0.lock().unwrap();
        g.log.push(if write {
            Ev::WriteIssued(chunk)
        } else {
            Ev::FillIssued(chunk)
        });
        if let Some(i) = g.opened.iter().position(|&k| k == (write, chunk)) {
            g.opened.remove(i);
            g.log.push(if write {
                Ev::WriteDone(chunk)
            } else {
                Ev::FillDone(chunk)
            });
            state.lock().unwrap().0 = Some(Ok(buf));
        } else {
            g.waiting.push(((write, chunk), state.clone(), buf));
        }
        Box::pin(Delayed(state))
    }
    /// Completes an operation (now if it started, else as soon as it starts).
    fn open(&self, write: bool, chunk: u64) {
        let waker = {
            let mut g = self.0.lock().unwrap();
            match g.waiting.iter().position(|(k, _, _)| *k == (write, chunk)) {
                None => {
                    g.opened.push((write, chunk));
                    return;
                }
                Some(i) => {
                    let (_, state, buf) = g.waiting.remove(i);
                    g.log.push(if write {
                        Ev::WriteDone(chunk)
                    } else {
                        Ev::FillDone(chunk)
                    });
                    let mut st = state.lock().unwrap();
                    st.0 = Some(Ok(buf));
                    st.1.take()
                }
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

const GATED_CHUNK: usize = 4096;

/// `chunks` chunks; fills gated (chunk 0's is open from the start when `open_all` is false).
struct GatedSource {
    gates: Gates,
    chunks: u64,
}

impl Source for GatedSource {
    fn len(&self) -> u64 {
        self.chunks * GATED_CHUNK as u64
    }
    fn fill(&mut self, offset: u64, mut buf: IoBuffer) -> gpuio::Result<SlotFuture> {
        transform_slot(offset, &mut buf); // "reads" bytes that depend on the offset
        Ok(self.gates.start(false, offset / GATED_CHUNK as u64, buf))
    }
}

/// Writes gated; remembers what it was given.
struct GatedSink {
    gates: Gates,
    written: Written,
    finished: Arc<Mutex<Option<u64>>>,
}

impl Sink for GatedSink {
    fn write(&mut self, offset: u64, buf: IoBuffer) -> gpuio::Result<SlotFuture> {
        self.written.lock().unwrap().push((offset, buf.to_vec()));
        Ok(self.gates.start(true, offset / GATED_CHUNK as u64, buf))
    }
    fn finish(&mut self, len: u64) -> gpuio::Result<()> {
        *self.finished.lock().unwrap() = Some(len);
        Ok(())
    }
}

/// Runs `chunks` chunks through `slots` slots. `serial`: every operation completes as soon as it
/// starts. Otherwise the fill of chunk k+1 and the write of chunk k-1 complete only when the compute of
/// chunk k ends (chunk 0's fill and the last chunk's write at once): a pipeline that overlaps its
/// stages runs through, one that waits for a stage before starting the next would hang (and fail).
/// Checks the bytes and their order; returns the stats and the event log.
fn gated_run(slots: usize, chunks: u64, serial: bool) -> (PipelineStats, Vec<Ev>) {
    within(&format!("gated run, {slots} slots"), move || {
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let gates = Gates::default();
        if serial {
            for k in 0..chunks {
                gates.open(false, k);
                gates.open(true, k);
            }
        } else {
            gates.open(false, 0);
            gates.open(true, chunks - 1);
        }
        let source = GatedSource {
            gates: gates.clone(),
            chunks,
        };
        let written = Arc::new(Mutex::new(Vec::new()));
        let finished = Arc::new(Mutex::new(None));
        let sink = GatedSink {
            gates: gates.clone(),
            written: written.clone(),
            finished: finished.clone(),
        };
        let g = gates.clone();
        let stats = Pipeline::new(&engine, source)
            .sink(sink)
            .slots(slots)
            .chunk_size(GATED_CHUNK)
            .run(move |slot| {
                let k = slot.offset() / GATED_CHUNK as u64;
                g.log(Ev::ComputeStart(k));
                // Undo the source's pattern: the sink must see the original zeros.
                transform_slot(slot.offset(), slot.bytes_mut());
                g.log(Ev::ComputeEnd(k));
                if !serial {
                    if k + 1 < chunks {
                        g.open(false, k + 1);
                    }
                    if k >= 1 {
                        g.open(true, k - 1);
                    }
                }
                Ok(())
            })
            .unwrap();
        let written = written.lock().unwrap();
        for (i, (off, bytes)) in written.iter().enumerate() {
            assert_eq!(*off, i as u64 * GATED_CHUNK as u64, "writes in order");
            assert!(
                bytes.iter().all(|&b| b == 0),
                "write {i} holds computed bytes"
            );
        }
        assert_eq!(written.len() as u64, chunks);
        assert_eq!(*finished.lock().unwrap(), Some(chunks * GATED_CHUNK as u64));
        (stats, gates.events())
    })
}

/// Where `e` is in `log`.
fn at(log: &[Ev], e: Ev) -> usize {
    log.iter()
        .position(|&x| x == e)
        .unwrap_or_else(|| panic!("{e:?} never happened: {log:?}"))
}

/// Most operations of the stages (fills and writes outstanding, plus a compute running) at any point
/// of the log.
fn most_in_flight(log: &[Ev]) -> (usize, usize, usize) {
    let (mut fills, mut computes, mut writes) = (0usize, 0usize, 0usize);
    let mut most = (0, 0, 0);
    for e in log {
        match e {
            Ev::FillIssued(_) => fills += 1,
            Ev::FillDone(_) => fills -= 1,
            Ev::ComputeStart(_) => computes += 1,
            Ev::ComputeEnd(_) => computes -= 1,
            Ev::WriteIssued(_) => writes += 1,
            Ev::WriteDone(_) => writes -= 1,
        }
        most = (most.0.max(fills), most.1.max(computes), most.2.max(writes));
    }
    most
}

/// Every chunk went fill → compute → write, each stage in source order.
fn check_chunk_order(log: &[Ev], chunks: u64) {
    for k in 0..chunks {
        let seq = [
            Ev::FillIssued(k),
            Ev::FillDone(k),
            Ev::ComputeStart(k),
            Ev::ComputeEnd(k),
            Ev::WriteIssued(k),
            Ev::WriteDone(k),
        ];
        for w in seq.windows(2) {
            assert!(at(log, w[0]) < at(log, w[1]), "{w:?} out of order: {log:?}");
        }
        if k >= 1 {
            for e in [Ev::FillIssued, Ev::ComputeStart, Ev::WriteIssued] {
                assert!(at(log, e(k - 1)) < at(log, e(k)), "{:?}: {log:?}", e(k));
            }
        }
    }
}

#[test]
fn three_slots_overlap_the_stages_and_one_slot_runs_them_in_turn() {
    let chunks = 12;
    // One slot: an operation starts only when the one before it ended — the next fill only after the
    // previous write is done.
    let (serial, log) = gated_run(1, chunks, true);
    check_chunk_order(&log, chunks);
    for k in 1..chunks {
        assert!(
            at(&log, Ev::WriteDone(k - 1)) < at(&log, Ev::FillIssued(k)),
            "one slot: fill {k} before write {} was done: {log:?}",
            k - 1
        );
    }
    assert_eq!(most_in_flight(&log), (1, 1, 1), "{log:?}");
    assert_eq!(serial.slots_peak, 1, "{serial:?}");

    // Three slots, with completions that need overlap to happen at all (see `gated_run`): while chunk
    // k computes, chunk k+1 is being read and chunk k-1 written.
    let (triple, log) = gated_run(3, chunks, false);
    check_chunk_order(&log, chunks);
    for k in 1..chunks - 1 {
        let (start, end) = (at(&log, Ev::ComputeStart(k)), at(&log, Ev::ComputeEnd(k)));
        assert!(
            at(&log, Ev::FillIssued(k + 1)) < start && at(&log, Ev::FillDone(k + 1)) > end,
            "fill {} not in flight while chunk {k} computed: {log:?}",
            k + 1
        );
        assert!(
            at(&log, Ev::WriteIssued(k - 1)) < start && at(&log, Ev::WriteDone(k - 1)) > end,
            "write {} not in flight while chunk {k} computed: {log:?}",
            k - 1
        );
    }
    let (fills, computes, writes) = most_in_flight(&log);
    assert!(fills <= 3 && writes <= 3 && computes == 1, "{log:?}");
    assert!(
        triple.slots_peak <= 3,
        "at most one buffer per slot: {triple:?}"
    );
    // The stats' bookkeeping, whatever the timing.
    for s in [&serial, &triple] {
        for (name, st) in s.stages() {
            assert_eq!(st.busy + st.idle, s.wall, "{name}: busy + idle = wall");
        }
        assert_eq!(s.chunks, chunks, "{s:?}");
    }
}

#[test]
fn a_slow_stage_stalls_the_reader_instead_of_taking_memory() {
    // Compute 25x slower than reading: the reader must wait for slots, never hold more.
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let used_before = engine.config().memory_budget.used_bytes();
    let peak = Arc::new(AtomicUsize::new(0));
    let source = SlowSource {
        len: 40 * 4096,
        delay: Duration::from_micros(200),
        outstanding: Arc::new(AtomicUsize::new(0)),
        peak: peak.clone(),
    };
    let stats = Pipeline::new(&engine, source)
        .slots(4)
        .chunk_size(4096)
        .run(|_| {
            std::thread::sleep(Duration::from_millis(5));
            Ok(())
        })
        .unwrap();
    assert!(
        stats.slots_peak <= 4 && peak.load(Ordering::SeqCst) <= 4,
        "{stats:?}"
    );
    assert!(
        stats.slot_waits >= 30,
        "the reader waited for slots: {stats:?}"
    );
    assert_eq!(
        engine.config().memory_budget.used_bytes(),
        used_before,
        "the run's slots are returned"
    );
    // A caller's pool: the same buffers serve run after run and all come back.
    let pool = engine.buffer_pool(8192, 6).unwrap();
    for run in 0..3 {
        let source = SlowSource {
            len: 100_000,
            delay: Duration::ZERO,
            outstanding: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
        };
        let stats = Pipeline::new(&engine, source)
            .pool(pool.clone())
            .slots(5)
            .run(|slot| {
                assert_eq!(slot.capacity(), 8192);
                Ok(())
            })
            .unwrap();
        assert_eq!(stats.chunk_size, 8192, "run {run}: the pool's buffer size");
        assert_eq!(pool.available(), 6, "run {run}");
    }
}

// ---------------------------------------------------------------------------------------------------
// Refusals.

#[test]
fn bad_configuration_is_refused_before_any_io() {
    let dir = scratch_dir(Place::Disk);
    let src = dir.path().join("in");
    std::fs::write(&src, data(10_000, 1)).unwrap();
    let dst = dir.path().join("out");
    std::fs::write(&dst, b"old").unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let queue = engine.queue(QueueDesc::default()).unwrap();
    let small_pool = engine.buffer_pool(4096, 2).unwrap();
    type Tweak = for<'a, 'b> fn(Pipeline<'a>, &'b gpuio::BufferPool) -> Pipeline<'a>;
    let tweaks: [(&str, Tweak); 6] = [
        ("slots 0", |p, _| p.slots(0)),
        ("slots too many", |p, _| p.slots(SLOTS_MAX + 1)),
        ("chunk 0", |p, _| p.chunk_size(0)),
        ("chunk absurd", |p, _| p.chunk_size(usize::MAX)),
        ("pool too few", |p, pool| p.pool(pool.clone()).slots(3)),
        ("pool too small", |p, pool| {
            p.pool(pool.clone()).slots(2).chunk_size(8192)
        }),
    ];
    for (what, tweak) in tweaks {
        let source = FileSource::open(&queue, &src, DirectMode::Auto).unwrap();
        let sink = FileSink::replace(&queue, &dst, DirectMode::Auto).unwrap();
        let mut called = false;
        let err = tweak(Pipeline::new(&engine, source).sink(sink), &small_pool)
            .run(|_| {
                called = true;
                Ok(())
            })
            .unwrap_err();
        assert_eq!(err.stage(), Stage::Setup, "{what}: {err}");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{what}: {err}");
        assert!(err.offset().is_none());
        assert!(!called, "{what}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"old", "{what}");
        assert!(
            temp_files(dir.path()).is_empty(),
            "{what}: temporary file left"
        );
    }
    // A budget too small for the slots is refused, not waited for.
    let cfg = EngineConfig {
        memory_budget: gpuio::MemoryBudget::new(32 << 20),
        ..EngineConfig::default()
    };
    let small = Engine::new(cfg).unwrap();
    let q = small.queue(QueueDesc::default()).unwrap();
    let err = Pipeline::new(
        &small,
        FileSource::open(&q, &src, DirectMode::Auto).unwrap(),
    )
    .slots(8)
    .chunk_size(8 << 20)
    .run(|_| Ok(()))
    .unwrap_err();
    assert_eq!(err.stage(), Stage::Setup, "{err}");
}

// ---------------------------------------------------------------------------------------------------
// Faults.

/// A source file, a destination holding an older version, and a faulty engine with a queue.
struct Faulty {
    dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    input: Vec<u8>,
    old: Vec<u8>,
}

const CHUNK: usize = 256 << 10;

fn faulty_files() -> Faulty {
    let dir = scratch_dir(Place::Disk);
    let input = data((2 << 20) + 123, 77);
    let old = data(300_000, 78);
    let src = dir.path().join("in");
    let dst = dir.path().join("out");
    std::fs::write(&src, &input).unwrap();
    std::fs::write(&dst, &old).unwrap();
    Faulty {
        dir,
        src,
        dst,
        input,
        old,
    }
}

fn fault_kinds() -> Vec<BackendKind> {
    [BackendKind::Uring, BackendKind::Threads]
        .into_iter()
        .filter(|&k| kind_works(k))
        .collect()
}

/// Copies `f.src` to `f.dst` on a faulty engine of `kind`; `at_slot(seq, handle)` runs in the compute
/// stage before each slot (to switch faults on mid-stream).
fn faulty_copy(
    f: &Faulty,
    kind: BackendKind,
    plan: FaultPlan,
    at_slot: fn(u64, &FaultHandle) -> gpuio::Result<()>,
) -> (Result<PipelineStats, PipelineError>, FaultHandle) {
    let (src, dst) = (f.src.clone(), f.dst.clone());
    within(&format!("faulty copy on {kind}"), move || {
        let (engine, handle) = faulty_engine_with(test_config(kind), 3, plan).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let source = FileSource::open(&queue, &src, DirectMode::Auto).unwrap();
        let sink = FileSink::replace(&queue, &dst, DirectMode::Auto).unwrap();
        let h = handle.clone();
        let r = Pipeline::new(&engine, source)
            .sink(sink)
            .chunk_size(CHUNK)
            .run(|slot| at_slot(slot.seq(), &h));
        (r, handle)
    })
}

/// The destination kept its older version and no temporary file is left.
fn untouched(f: &Faulty, what: &str) {
    assert!(
        std::fs::read(&f.dst).unwrap() == f.old,
        "{what}: the destination changed"
    );
    assert!(
        temp_files(f.dir.path()).is_empty(),
        "{what}: temporary files left: {:?}",
        temp_files(f.dir.path())
    );
}

/// The error's own offset lies in the slot it names (file offsets equal logical ones here).
fn offset_in_slot(err: &PipelineError, what: &str) {
    let slot = err
        .slot()
        .unwrap_or_else(|| panic!("{what}: no slot: {err}"));
    let off = err
        .error()
        .offset()
        .unwrap_or_else(|| panic!("{what}: no offset: {err}"));
    assert!(
        off >= slot.offset && off < slot.offset + slot.len,
        "{what}: offset {off} outside slot {slot:?}"
    );
    assert_eq!(slot.offset % CHUNK as u64, 0, "{what}");
    let shown = err.to_string();
    assert!(
        shown.contains(&format!("offset {}", slot.offset)),
        "{what}: {shown}"
    );
}

#[test]
fn eio_on_read_stops_with_the_slot_offset_and_keeps_the_destination() {
    for kind in fault_kinds() {
        let f = faulty_files();
        let (r, h) = faulty_copy(&f, kind, FaultPlan::none(), |seq, h| {
            if seq == 3 {
                h.set_plan(FaultPlan::none().with_read_eio(1.0));
            }
            Ok(())
        });
        let err = r.unwrap_err();
        let what = format!("{kind}: {err}");
        assert_eq!(err.stage(), Stage::Read, "{what}");
        assert_eq!(err.kind(), ErrorKind::Io, "{what}");
        // The reads of slots 4 and 5 were under way when the faults began (their later tasks fail),
        // and slot 6's started after.
        let off = err.offset().unwrap();
        assert!(off > 3 * CHUNK as u64 && off <= 6 * CHUNK as u64, "{what}");
        assert!(h.counts().read_eio > 0, "{what}: no fault fired");
        offset_in_slot(&err, &what);
        untouched(&f, &what);
        // Converted to the engine's error, it keeps kind and errno and says where.
        let e: Error = err.into();
        assert_eq!(e.errno(), Some(libc::EIO));
        assert!(
            e.to_string().starts_with("pipeline read stage, slot"),
            "{e}"
        );
    }
}

#[test]
fn enospc_on_write_stops_with_the_slot_offset_and_keeps_the_destination() {
    for kind in fault_kinds() {
        let f = faulty_files();
        let (r, h) = faulty_copy(&f, kind, FaultPlan::none(), |seq, h| {
            if seq == 2 {
                h.set_plan(FaultPlan::none().with_write_enospc(1.0));
            }
            Ok(())
        });
        let err = r.unwrap_err();
        let what = format!("{kind}: {err}");
        assert_eq!(err.stage(), Stage::Write, "{what}");
        assert_eq!(err.kind(), ErrorKind::NoSpace, "{what}");
        // Slot 2's write starts after the faults began; those of slots 0 and 1 may still have had
        // tasks to issue.
        assert!(err.offset().unwrap() <= 2 * CHUNK as u64, "{what}");
        assert!(h.counts().write_enospc > 0, "{what}: no fault fired");
        assert_eq!(
            err.error().path(),
            Some(f.dst.as_path()),
            "{what}: names the destination"
        );
        offset_in_slot(&err, &what);
        untouched(&f, &what);
    }
}

#[test]
fn eio_on_the_final_sync_keeps_the_destination() {
    for kind in fault_kinds() {
        let f = faulty_files();
        let (r, h) = faulty_copy(
            &f,
            kind,
            FaultPlan::none().with_sync_eio(1.0),
            |_, _| Ok(()),
        );
        let err = r.unwrap_err();
        let what = format!("{kind}: {err}");
        assert_eq!(err.stage(), Stage::Write, "{what}");
        assert_eq!(err.slot(), None, "{what}: finishing, no slot");
        assert_eq!(err.kind(), ErrorKind::Io, "{what}");
        assert!(h.counts().sync_eio > 0, "{what}");
        assert!(what.contains("finishing the output"), "{what}");
        untouched(&f, &what);
    }
}

#[test]
fn short_transfers_and_eintr_are_hidden() {
    for kind in fault_kinds() {
        let f = faulty_files();
        let (r, h) = faulty_copy(&f, kind, FaultPlan::benign(0.3), |_, _| Ok(()));
        let stats = r.unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(stats.bytes_out, f.input.len() as u64);
        assert!(std::fs::read(&f.dst).unwrap() == f.input, "{kind}");
        let c = h.counts();
        assert!(c.shorts() > 0 && c.eintr > 0, "{kind}: faults fired: {c:?}");
        assert!(temp_files(f.dir.path()).is_empty());
    }
}

#[test]
fn a_compute_error_names_its_slot_and_a_new_file_never_appears() {
    let f = faulty_files();
    std::fs::remove_file(&f.dst).unwrap();
    let (r, _) = faulty_copy(&f, BackendKind::Threads, FaultPlan::none(), |seq, _| {
        if seq == 5 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "the kernel rejected the batch",
            ));
        }
        Ok(())
    });
    let err = r.unwrap_err();
    assert_eq!(err.stage(), Stage::Compute);
    assert_eq!(err.offset(), Some(5 * CHUNK as u64));
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert_eq!(
        err.to_string(),
        format!(
            "pipeline compute stage, slot 5 at offset {} (+{CHUNK} bytes): the kernel rejected the batch",
            5 * CHUNK
        )
    );
    assert!(!f.dst.exists(), "no destination appears");
    assert!(temp_files(f.dir.path()).is_empty());
}

#[test]
fn a_source_that_shrinks_is_an_error_not_a_short_copy() {
    let f = faulty_files();
    let src = f.src.clone();
    let (src2, dst) = (f.src.clone(), f.dst.clone());
    let err = within("shrink", move || {
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let source = FileSource::open(&queue, &src2, DirectMode::Auto).unwrap();
        let sink = FileSink::replace(&queue, &dst, DirectMode::Auto).unwrap();
        Pipeline::new(&engine, source)
            .sink(sink)
            .slots(1) // nothing read ahead of the truncation
            .chunk_size(CHUNK)
            .run(|slot| {
                if slot.seq() == 1 {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&src)
                        .unwrap()
                        .set_len(CHUNK as u64 * 2 + 1000)
                        .unwrap();
                }
                Ok(())
            })
            .unwrap_err()
    });
    assert_eq!(err.stage(), Stage::Read, "{err}");
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    assert_eq!(err.offset(), Some(2 * CHUNK as u64), "{err}");
    untouched(&f, "shrink");
}

#[test]
fn a_panicking_closure_leaves_the_destination_and_no_temporary_file() {
    let f = faulty_files();
    let (src, dst) = (f.src.clone(), f.dst.clone());
    let joined = std::thread::spawn(move || {
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let source = FileSource::open(&queue, &src, DirectMode::Auto).unwrap();
        let sink = FileSink::replace(&queue, &dst, DirectMode::Auto).unwrap();
        let _ = Pipeline::new(&engine, source)
            .sink(sink)
            .chunk_size(CHUNK)
            .run(|slot| {
                assert!(slot.seq() < 4, "a bug in the compute stage");
                Ok(())
            });
    })
    .join();
    assert!(joined.is_err(), "the closure panicked");
    untouched(&f, "panic");
}

#[test]
fn stages_are_timed_where_they_happen() {
    // A compute stage of ~2 ms per slot over a fast source: compute dominates, reads are short.
    let dir = scratch_dir(Place::Disk);
    let src = dir.path().join("in");
    std::fs::write(&src, data(4 << 20, 3)).unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let queue = engine.queue(QueueDesc::default()).unwrap();
    let started = Instant::now();
    let stats = Pipeline::new(
        &engine,
        FileSource::open(&queue, &src, DirectMode::Auto).unwrap(),
    )
    .chunk_size(256 << 10)
    .run(|_| {
        std::thread::sleep(Duration::from_millis(2));
        Ok(())
    })
    .unwrap();
    assert!(stats.wall <= started.elapsed());
    assert!(stats.compute.busy >= Duration::from_millis(32), "{stats:?}");
    assert_eq!(stats.compute.ops, 16);
    assert_eq!(stats.read.ops, 16);
    assert!(stats.compute.busy > stats.read.busy, "{stats:?}");
    assert!(stats.overlap_efficiency() > 0.0 && stats.overlap_efficiency() <= 1.0);
}
