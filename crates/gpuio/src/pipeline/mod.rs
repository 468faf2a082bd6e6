//! N-buffered streaming: read → compute → write with the three stages overlapped (findings 232, 245).
//!
//! A [`Pipeline`] moves a [`Source`] (a file range, a pack entry, any reader the engine serves) through
//! a compute stage (a closure given each filled [`Slot`]) into an optional [`Sink`] (a file, replaced
//! crash-safely), using a ring of N slot buffers (three by default) from a [`BufferPool`]. While
//! compute works on slot k, the reads of slots k+1.. are in flight and the write of slot k−1 drains,
//! so a run takes about max(read, compute, write) rather than their sum.
//!
//! - **Memory is bounded by the slots.** A read starts only when a slot is free; a slow stage stalls the
//!   others (counted in [`PipelineStats::slot_waits`]) instead of memory growing.
//! - **Output is in source order**, at consecutive offsets (compute may shorten or lengthen a slot with
//!   [`Slot::set_len`]).
//! - **Errors stop the pipeline cleanly**: nothing new starts, every operation in flight is waited
//!   for, the sink is aborted (a [`FileSink`] removes its temporary file: the destination keeps its
//!   previous contents), and the error comes back as a [`PipelineError`] naming the stage and the
//!   slot's logical offset.
//! - **Time is accounted per stage** ([`PipelineStats`]): *read busy* is the time during which at
//!   least one fill was in flight (from the source accepting it to its completion waking the driver:
//!   for a pack entry that includes decompression); *compute busy* is the time spent inside the
//!   closure; *write busy* is the time during which at least one write was in flight, plus the
//!   sink's finish (sync, rename, directory sync). *Wall* runs from the first fill to the end of the
//!   finish; a stage's idle time is wall minus its busy time. [`PipelineStats::overlap_efficiency`] is
//!   max(busy) ÷ wall: 1.0 when the pipeline runs at the pace of its slowest stage, 1/3 for three
//!   equal stages run one after another.
//!
//! One thread drives the pipeline — the caller's: it starts fills and writes (which the engine runs
//! asynchronously), runs the closure, and sleeps when it has nothing to do until a completion wakes
//! it. With one slot the stages run one after another (a serial baseline); with three, the steady
//! state is one read, one compute and one write at the same moment. Give the source and the sink a
//! concurrent queue ([`crate::QueueKind::Concurrent`], the default): on a serial one a write would
//! wait for the reads before it.
//!
//! ```
//! use gpuio::pipeline::{FileSink, FileSource, Pipeline};
//! use gpuio::{DirectMode, Engine, EngineConfig, QueueDesc};
//! # let dir = tempfile::tempdir().unwrap();
//! # let input = dir.path().join("in.bin");
//! # std::fs::write(&input, vec![0x0fu8; 3 << 20]).unwrap();
//! # let output = dir.path().join("out.bin");
//! let engine = Engine::new(EngineConfig::default())?;
//! let queue = engine.queue(QueueDesc::default())?;
//! let source = FileSource::open(&queue, &input, DirectMode::Auto)?;
//! let sink = FileSink::replace(&queue, &output, DirectMode::Auto)?; // crash-safe
//! let stats = Pipeline::new(&engine, source)
//!     .sink(sink)
//!     .slots(3)
//!     .chunk_size(1 << 20)
//!     .run(|slot| {
//!         // Runs on this thread for each slot in order, while other slots are read and written.
//!         slot.bytes_mut().iter_mut().for_each(|b| *b = !*b);
//!         Ok(())
//!     })?;
//! assert_eq!(stats.bytes_out, 3 << 20);
//! assert!(std::fs::read(&output)?.iter().all(|&b| b == 0xf0));
//! println!("{:.0} MB/s, overlap {:.2}", stats.bytes_per_sec() / 1e6, stats.overlap_efficiency());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod io;
mod timing;

pub use io::{FileSink, FileSource, Sink, SlotFuture, Source};

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::mem::{BufferPool, IoBuffer, MemoryBudget, Wait};
use crate::queue::Engine;
use timing::{Busy, Op, Signal};

/// Slots when [`Pipeline::slots`] is not called: one reading, one computing, one writing.
pub const SLOTS_DEFAULT: usize = 3;
/// Most slots a pipeline takes.
pub const SLOTS_MAX: usize = 64;
/// Bytes per slot when [`Pipeline::chunk_size`] is not called (and no pool is given).
pub const CHUNK_SIZE_DEFAULT: usize = 4 << 20;
/// Largest chunk accepted.
pub const CHUNK_SIZE_MAX: usize = 256 << 20;

/// The part of a pipeline an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Stage {
    /// Checking the configuration and taking the slots' memory, before any I/O.
    Setup,
    /// The source filling a slot.
    Read,
    /// The compute closure.
    Compute,
    /// The sink writing a slot, or finishing the output.
    Write,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Setup => "setup",
            Stage::Read => "read",
            Stage::Compute => "compute",
            Stage::Write => "write",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which part of the source a slot holds: the `seq`-th chunk, logical bytes `offset..offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRange {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
}

/// Why a pipeline stopped: the stage, the slot it was working on (none for setup and for finishing the
/// output), and the underlying error (whose own offset, if any, is where the I/O failed: a file offset
/// for a file, a pack-file offset for a pack entry).
#[derive(Debug, Clone)]
pub struct PipelineError {
    stage: Stage,
    slot: Option<SlotRange>,
    error: Error,
}

impl PipelineError {
    fn new(stage: Stage, slot: Option<SlotRange>, error: Error) -> PipelineError {
        PipelineError { stage, slot, error }
    }
    fn setup(error: Error) -> PipelineError {
        PipelineError::new(Stage::Setup, None, error)
    }
    pub fn stage(&self) -> Stage {
        self.stage
    }
    pub fn slot(&self) -> Option<SlotRange> {
        self.slot
    }
    /// The logical source offset of the slot that failed.
    pub fn offset(&self) -> Option<u64> {
        self.slot.map(|s| s.offset)
    }
    pub fn kind(&self) -> ErrorKind {
        self.error.kind()
    }
    pub fn error(&self) -> &Error {
        &self.error
    }
    fn context(&self) -> String {
        match (self.stage, self.slot) {
            (Stage::Setup, _) => "pipeline setup".to_string(),
            (stage, Some(s)) => format!(
                "pipeline {stage} stage, slot {} at offset {} (+{} bytes)",
                s.seq, s.offset, s.len
            ),
            (stage, None) => format!("pipeline {stage} stage, finishing the output"),
        }
    }
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context(), self.error)
    }
}

impl std::error::Error for PipelineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<PipelineError> for Error {
    /// The underlying error (kind, errno, file and range kept) with the stage and slot as its context.
    fn from(e: PipelineError) -> Error {
        let ctx = e.context();
        e.error.with_context(ctx)
    }
}

/// A filled slot, handed to the compute closure: its place in the source, and its bytes to read or
/// transform in place. What it holds when the closure returns (`len()` bytes) is what the sink writes.
#[derive(Debug)]
pub struct Slot<'a> {
    range: SlotRange,
    buf: &'a mut IoBuffer,
}

impl Slot<'_> {
    /// Chunk number, from 0, in source order.
    pub fn seq(&self) -> u64 {
        self.range.seq
    }
    /// Logical source offset of the slot's first byte.
    pub fn offset(&self) -> u64 {
        self.range.offset
    }
    /// The part of the source this slot was filled from.
    pub fn range(&self) -> SlotRange {
        self.range
    }
    /// Bytes the slot holds now (the bytes read, unless the closure changed it).
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..]
    }
    /// Most bytes the slot can hold (the chunk size, rounded up to the page).
    pub fn capacity(&self) -> usize {
        self.buf.as_aligned().capacity()
    }
    /// Sets how many bytes the sink writes from this slot (up to [`capacity`](Self::capacity); bytes
    /// past what was read hold earlier contents of the buffer). Zero writes nothing.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        self.buf.as_aligned_mut().set_len(len)
    }
}

/// One stage's time (see the module docs for what counts as busy).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageStats {
    pub busy: Duration,
    /// Wall time minus busy time.
    pub idle: Duration,
    /// Operations: fills, closure calls, or writes (the finish counts as one write).
    pub ops: u64,
}

/// What a pipeline run did and where its time went.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineStats {
    pub slots: usize,
    pub chunk_size: usize,
    /// Slots filled (chunks of the source).
    pub chunks: u64,
    /// Bytes read from the source.
    pub bytes_in: u64,
    /// Bytes handed to the sink (0 without one).
    pub bytes_out: u64,
    /// From the first fill to the end of the sink's finish.
    pub wall: Duration,
    pub read: StageStats,
    pub compute: StageStats,
    /// `None` without a sink.
    pub write: Option<StageStats>,
    /// Times the next read had to wait because every slot was taken (back-pressure).
    pub slot_waits: u64,
    /// Most slots taken at once (never more than `slots`).
    pub slots_peak: usize,
}

impl PipelineStats {
    /// Each stage by name, in pipeline order (`write` only with a sink).
    pub fn stages(&self) -> Vec<(&'static str, StageStats)> {
        let mut v = vec![("read", self.read), ("compute", self.compute)];
        if let Some(w) = self.write {
            v.push(("write", w));
        }
        v
    }
    /// The busiest stage's busy time divided by wall time (0 for an empty run).
    pub fn overlap_efficiency(&self) -> f64 {
        let max = self
            .stages()
            .iter()
            .map(|(_, s)| s.busy)
            .max()
            .unwrap_or_default();
        if self.wall.is_zero() {
            return 0.0;
        }
        (max.as_secs_f64() / self.wall.as_secs_f64()).min(1.0)
    }
    /// Source bytes per second of wall time.
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes_in as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// A read → compute → write stream over N slots; see the module docs.
///
/// Without a sink the closure is the consumer: here it sums a 64 KiB range of a file, four slots of
/// 16 KiB, reading ahead while it sums.
///
/// ```
/// use gpuio::pipeline::{FileSource, Pipeline};
/// use gpuio::{Engine, EngineConfig, File, QueueDesc};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("table.bin");
/// # std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
/// let engine = Engine::new(EngineConfig::default())?;
/// let queue = engine.queue(QueueDesc::default())?;
/// let source = FileSource::range(&queue, File::open(&path)?, 4096, 64 << 10)?;
/// let mut sum = 0u64;
/// let stats = Pipeline::new(&engine, source)
///     .slots(4)
///     .chunk_size(16 << 10)
///     .run(|slot| {
///         sum += slot.bytes().iter().map(|&b| u64::from(b)).sum::<u64>();
///         Ok(())
///     })?;
/// assert_eq!((sum, stats.chunks, stats.write), (64 << 10, 4, None));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Pipeline<'a> {
    budget: MemoryBudget,
    page: usize,
    source: Box<dyn Source + 'a>,
    sink: Option<Box<dyn Sink + 'a>>,
    slots: usize,
    chunk_size: Option<usize>,
    pool: Option<BufferPool>,
}

impl fmt::Debug for Pipeline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("len", &self.source.len())
            .field("sink", &self.sink.is_some())
            .field("slots", &self.slots)
            .field("chunk_size", &self.chunk_size)
            .field("pool", &self.pool)
            .finish()
    }
}

impl<'a> Pipeline<'a> {
    /// A pipeline reading `source`, its slot memory charged to `engine`'s memory budget.
    pub fn new(engine: &Engine, source: impl Source + 'a) -> Pipeline<'a> {
        Pipeline {
            budget: engine.config().memory_budget.clone(),
            page: engine.config().page.bytes(),
            source: Box::new(source),
            sink: None,
            slots: SLOTS_DEFAULT,
            chunk_size: None,
            pool: None,
        }
    }

    /// Where the results go (default: nowhere; the closure is the consumer).
    pub fn sink(mut self, sink: impl Sink + 'a) -> Pipeline<'a> {
        self.sink = Some(Box::new(sink));
        self
    }

    /// Slot buffers, 1..=[`SLOTS_MAX`]: 1 runs the stages one after another, 3 (the default) overlaps
    /// all three; more absorb jitter in the stages' speeds.
    pub fn slots(mut self, n: usize) -> Pipeline<'a> {
        self.slots = n;
        self
    }

    /// Bytes per slot, 1..=[`CHUNK_SIZE_MAX`] (default [`CHUNK_SIZE_DEFAULT`], or the pool's buffer
    /// size). Multiples of 4096 keep every transfer direct.
    pub fn chunk_size(mut self, bytes: usize) -> Pipeline<'a> {
        self.chunk_size = Some(bytes);
        self
    }

    /// Takes the slots from `pool` (at least `slots` buffers of at least the chunk size), e.g. one from
    /// [`Engine::buffer_pool`], registered with io_uring and reused across runs. Without one, each run
    /// makes an unregistered pool of exactly `slots` buffers and frees it at the end (a registered
    /// pool lives as long as its engine, so making one per run would hold memory run after run). Share
    /// a pool only between pipelines that run one after another: if another user holds its buffers,
    /// the pipeline waits for them.
    pub fn pool(mut self, pool: BufferPool) -> Pipeline<'a> {
        self.pool = Some(pool);
        self
    }

    fn setup(&mut self) -> Result<(usize, BufferPool)> {
        if !(1..=SLOTS_MAX).contains(&self.slots) {
            return Err(Error::invalid(format!(
                "slots {} is out of range 1..={SLOTS_MAX}",
                self.slots
            )));
        }
        let chunk = self
            .chunk_size
            .or(self.pool.as_ref().map(BufferPool::buf_size))
            .unwrap_or(CHUNK_SIZE_DEFAULT);
        if !(1..=CHUNK_SIZE_MAX).contains(&chunk) {
            return Err(Error::invalid(format!(
                "chunk size {chunk} is out of range 1..={CHUNK_SIZE_MAX}"
            )));
        }
        let pool = match self.pool.take() {
            Some(p) if p.buf_size() < chunk || p.count() < self.slots => {
                return Err(Error::invalid(format!(
                    "the pool's {} buffers of {} bytes cannot hold {} slots of {chunk} bytes",
                    p.count(),
                    p.buf_size(),
                    self.slots
                )))
            }
            Some(p) => p,
            None => BufferPool::new(&self.budget, chunk, self.slots, self.page, Wait::No)?,
        };
        Ok((chunk, pool))
    }

    /// Runs the pipeline to the end of the source, calling `compute` on each filled slot in source
    /// order on this thread. Returns what it did, or the first error (after stopping cleanly: see the
    /// module docs).
    pub fn run<F>(mut self, mut compute: F) -> Result<PipelineStats, PipelineError>
    where
        F: FnMut(&mut Slot<'_>) -> Result<()>,
    {
        let (chunk, pool) = match self.setup() {
            Ok(v) => v,
            Err(e) => {
                if let Some(sink) = self.sink.as_mut() {
                    sink.abort();
                }
                return Err(PipelineError::setup(e));
            }
        };
        let mut run = Run {
            total: self.source.len(),
            source: self.source,
            sink: self.sink,
            pool,
            slots: self.slots,
            chunk,
            signal: Arc::new(Signal::default()),
            reads: VecDeque::new(),
            writes: VecDeque::new(),
            next_offset: 0,
            next_seq: 0,
            out_offset: 0,
            in_use: 0,
            stalled: false,
            stats: PipelineStats {
                slots: self.slots,
                chunk_size: chunk,
                chunks: 0,
                bytes_in: 0,
                bytes_out: 0,
                wall: Duration::ZERO,
                read: StageStats::default(),
                compute: StageStats::default(),
                write: None,
                slot_waits: 0,
                slots_peak: 0,
            },
            read_busy: Busy::default(),
            write_busy: Busy::default(),
        };
        let started = Instant::now();
        let result = run.stream(&mut compute).and_then(|()| run.finish());
        if let Err(e) = result {
            run.stop();
            return Err(e);
        }
        Ok(run.into_stats(started.elapsed()))
    }
}

/// The state of one run.
struct Run<'a> {
    source: Box<dyn Source + 'a>,
    sink: Option<Box<dyn Sink + 'a>>,
    pool: BufferPool,
    total: u64,
    slots: usize,
    chunk: usize,
    signal: Arc<Signal>,
    /// Fills in flight or done and not yet computed, in source order.
    reads: VecDeque<Op>,
    /// Writes in issue order; a finished one stays until those before it finish (for timing).
    writes: VecDeque<Op>,
    next_offset: u64,
    next_seq: u64,
    out_offset: u64,
    /// Slot buffers held: filling, computing, or writing.
    in_use: usize,
    /// The next read is waiting for a slot (counted once per wait).
    stalled: bool,
    stats: PipelineStats,
    read_busy: Busy,
    write_busy: Busy,
}

impl Run<'_> {
    /// Reads, computes and writes every slot; returns when every write has finished.
    fn stream(
        &mut self,
        compute: &mut dyn FnMut(&mut Slot<'_>) -> Result<()>,
    ) -> Result<(), PipelineError> {
        loop {
            self.signal.reset();
            let mut progress = self.reap_writes()?;
            progress |= self.start_reads()?;
            if self.compute_front(compute)? {
                // Start the reads this slot's write-out made room for before anything else.
                continue;
            }
            if self.next_offset >= self.total && self.reads.is_empty() && self.writes.is_empty() {
                return Ok(());
            }
            if !progress {
                self.signal.wait();
            }
        }
    }

    /// Polls the writes: frees the slots of finished ones, times them in issue order, fails on the
    /// first error. Returns whether any finished.
    fn reap_writes(&mut self) -> Result<bool, PipelineError> {
        let mut progress = false;
        for w in self.writes.iter_mut() {
            // `take` gives each result once, also of a write that finished as it started.
            if !w.poll() {
                continue;
            }
            match w.take() {
                Some(Ok(buf)) => {
                    drop(buf); // back to the pool
                    self.in_use -= 1;
                    progress = true;
                }
                Some(Err(e)) => return Err(PipelineError::new(Stage::Write, Some(w.range), e)),
                None => {}
            }
        }
        while self.writes.front().is_some_and(Op::finished) {
            let w = self.writes.pop_front().expect("front exists");
            self.write_busy
                .add(w.started, w.done_at.unwrap_or_else(Instant::now));
        }
        Ok(progress)
    }

    /// Starts fills while slots are free. Returns whether any started.
    fn start_reads(&mut self) -> Result<bool, PipelineError> {
        let mut progress = false;
        while self.next_offset < self.total && self.in_use < self.slots {
            let mut buf = match self.pool.try_get() {
                Ok(b) => b,
                // Someone else holds the pool's buffers: wait for them only if nothing of ours is in
                // flight (else one of our completions frees a slot first).
                Err(_) if self.in_use == 0 => self.pool.get(),
                Err(_) => break,
            };
            let len = (self.total - self.next_offset).min(self.chunk as u64);
            let range = SlotRange {
                seq: self.next_seq,
                offset: self.next_offset,
                len,
            };
            let fail = |e| PipelineError::new(Stage::Read, Some(range), e);
            buf.set_len(len as usize).map_err(fail)?;
            let started = Instant::now();
            let fut = self.source.fill(range.offset, buf.into()).map_err(fail)?;
            self.reads
                .push_back(Op::start(range, started, fut, &self.signal));
            self.in_use += 1;
            self.stats.slots_peak = self.stats.slots_peak.max(self.in_use);
            self.next_offset += len;
            self.next_seq += 1;
            self.stalled = false;
            progress = true;
        }
        if self.next_offset < self.total && self.in_use >= self.slots && !self.stalled {
            self.stalled = true;
            self.stats.slot_waits += 1;
        }
        Ok(progress)
    }

    /// If the oldest fill has finished: runs the closure on it and starts its write. Returns whether it
    /// did.
    fn compute_front(
        &mut self,
        compute: &mut dyn FnMut(&mut Slot<'_>) -> Result<()>,
    ) -> Result<bool, PipelineError> {
        let Some(front) = self.reads.front_mut() else {
            return Ok(false);
        };
        if !front.poll() {
            return Ok(false);
        }
        let mut op = self.reads.pop_front().expect("front exists");
        self.read_busy
            .add(op.started, op.done_at.unwrap_or_else(Instant::now));
        let range = op.range;
        let mut buf = match op.take() {
            Some(Ok(buf)) => buf,
            Some(Err(e)) => return Err(PipelineError::new(Stage::Read, Some(range), e)),
            None => {
                return Err(PipelineError::new(
                    Stage::Read,
                    Some(range),
                    Error::invalid("a fill finished without a result"),
                ))
            }
        };
        self.stats.chunks += 1;
        self.stats.bytes_in += range.len;
        let t = Instant::now();
        let r = compute(&mut Slot {
            range,
            buf: &mut buf,
        });
        self.stats.compute.busy += t.elapsed();
        self.stats.compute.ops += 1;
        r.map_err(|e| PipelineError::new(Stage::Compute, Some(range), e))?;
        let n = buf.len() as u64;
        match self.sink.as_mut() {
            Some(sink) if n > 0 => {
                let started = Instant::now();
                let fut = sink
                    .write(self.out_offset, buf)
                    .map_err(|e| PipelineError::new(Stage::Write, Some(range), e))?;
                self.writes
                    .push_back(Op::start(range, started, fut, &self.signal));
                self.out_offset += n;
                self.stats.bytes_out += n;
            }
            _ => {
                drop(buf);
                self.in_use -= 1;
            }
        }
        Ok(true)
    }

    /// The sink's finish, timed as write work.
    fn finish(&mut self) -> Result<(), PipelineError> {
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        let t = Instant::now();
        let r = sink.finish(self.out_offset);
        self.write_busy.add(t, Instant::now());
        r.map_err(|e| PipelineError::new(Stage::Write, None, e))
    }

    /// After an error: starts nothing more, waits for every operation in flight (their results no
    /// longer matter), then aborts the sink.
    fn stop(&mut self) {
        loop {
            self.signal.reset();
            let mut pending = false;
            for op in self.reads.iter_mut().chain(self.writes.iter_mut()) {
                if !op.poll() {
                    pending = true;
                }
                drop(op.take());
            }
            if !pending {
                break;
            }
            self.signal.wait();
        }
        self.reads.clear();
        self.writes.clear();
        if let Some(sink) = self.sink.as_mut() {
            sink.abort();
        }
    }

    fn into_stats(mut self, wall: Duration) -> PipelineStats {
        let stage = |busy: Duration, ops: u64| StageStats {
            busy: busy.min(wall),
            idle: wall.saturating_sub(busy),
            ops,
        };
        self.stats.wall = wall;
        self.stats.read = stage(self.read_busy.total, self.read_busy.count);
        self.stats.compute = stage(self.stats.compute.busy, self.stats.compute.ops);
        if self.sink.is_some() {
            self.stats.write = Some(stage(self.write_busy.total, self.write_busy.count));
        }
        self.stats
    }
}
