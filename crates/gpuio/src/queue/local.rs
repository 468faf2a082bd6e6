//! A queue that one application thread drives itself: it submits and reaps on its own backend (its own
//! io_uring ring), with no engine thread between it and the kernel — fio's model, and "a ring per
//! application thread" from the io_uring guides (Axboe, *Efficient IO with io_uring*, 2019).
//!
//! Why it exists: an [`Engine`](super::Engine) serves many queues from one thread, which is what
//! priorities, callbacks, futures and command buffers need, but every request then crosses from the
//! caller's thread to the engine's and every completion back. On storage that answers in a few
//! microseconds (a RAM-backed block device, NVMe arrays) that hand-off, and the engine thread competing
//! for a core with the caller and the kernel's workers, left the engine at 0.81–0.96 × fio on a
//! RAM-backed loop device (docs/BENCHMARKS.md, issue 11). A thread that keeps its own reads in flight
//! does better to submit and reap them itself.
//!
//! What it keeps from the engine: a bounded depth (requests beyond it are refused, with their buffer
//! handed back), buffer ownership until the last request on a buffer is reaped, the same decision table
//! for raw results ([`outcome::classify`]: transient errors retried, short transfers continued, a direct
//! transfer the kernel refuses redone buffered, each within the same bounds), typed errors naming file,
//! offset and length, an [`Explain`] of the backend chosen, and [`QueueStats`].
//! What it gives up: priorities between queues, command buffers and barriers, callbacks, futures and
//! cancellation. It is `!Send`: the ring may be used by the thread that made it only (it is set up
//! `SINGLE_ISSUER`).
//!
//! A request goes through the file's direct descriptor when its offset, length and buffer address are
//! aligned for direct I/O (stores: to the page, `plan::direct_block`), and through the buffered
//! descriptor otherwise — there is no bounce buffer here, so nothing is copied twice. A small load or store of a
//! memory-backed file (tmpfs) is a copy that never waits for a device; it is served when it is taken,
//! with `pread`/`pwrite` on the calling thread, as the engine's `commit` serves it (`queue::inline`,
//! [`LocalConfig::inline_max_bytes`]): io_uring would hand it to a kernel worker thread instead.
//!
//! This module must never wait except in [`LocalQueue::wait`] (bounded by its timeout) and on drop
//! (bounded by [`DROP_WAIT`]), and never hand back a buffer the kernel may still write.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use super::command::{CmdKind, CommandBuffer};
use super::engine::EngineConfig;
use super::inline::{self, InlineLimits, Transfer};
use super::outcome::{self, AfterShort, Attempt, Verdict};
use super::plan;
use super::stats::{QueueStats, Tally};
use crate::backend::{
    self, Backend, BackendConfig, BackendKind, Explain, IoDone, IoKind, IoOp, IoRequest, Span,
};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::file::File;
use crate::mem::{BufferPool, IoBuffer, MemoryBudget, Registration, Wait};
use parking_lot::Mutex;

/// How long dropping a queue waits for its requests in flight before it leaks their buffers rather
/// than free memory the kernel may still write.
pub const DROP_WAIT: Duration = Duration::from_secs(30);

/// How to make a [`LocalQueue`].
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The backend (its `queue_depth` is the most requests in flight).
    pub backend: BackendConfig,
    /// Retries of transient errors per request (as [`EngineConfig::retries_max`]).
    pub retries_max: u32,
    /// Continuations of short transfers per request (as [`EngineConfig::short_transfers_max`]).
    pub short_transfers_max: u32,
    /// Loads and stores of memory-backed files up to this size are served when taken, on the calling
    /// thread (as [`EngineConfig::inline_max_bytes`]); 0 sends everything to the backend.
    pub inline_max_bytes: usize,
}

impl LocalConfig {
    pub fn validate(&self) -> Result<()> {
        self.backend.validate()?;
        super::inline::check_max_bytes(self.inline_max_bytes)
    }
}

impl Default for LocalConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        LocalConfig {
            backend: engine.backend,
            retries_max: engine.retries_max,
            short_transfers_max: engine.short_transfers_max,
            inline_max_bytes: engine.inline_max_bytes,
        }
    }
}

/// A request the queue did not take, with its buffer handed back.
#[derive(Debug)]
pub struct Refused {
    pub buf: Option<IoBuffer>,
    pub error: Error,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Refused {}

impl From<Refused> for Error {
    fn from(r: Refused) -> Error {
        r.error
    }
}

/// A finished request.
#[derive(Debug)]
pub struct LocalDone {
    /// The value the caller gave with the request.
    pub user: u64,
    /// Bytes transferred (a `read_upto` may stop at the end of the file), or why it failed.
    pub result: Result<usize>,
    /// The request's buffer, handed back (`None` for a sync).
    pub buf: Option<IoBuffer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read { exact: bool },
    Write,
    Sync,
}

/// One request in flight; its slot index is its backend tag.
struct Slot {
    user: u64,
    kind: Kind,
    file: File,
    /// Where the request started, for its error messages.
    offset: u64,
    len: usize,
    buf: Option<IoBuffer>,
    fixed: Option<u16>,
    /// Bytes done so far; the next attempt starts here.
    done: usize,
    direct: bool,
    block: u64,
    retries: u32,
    shorts: u32,
    /// When its current attempt was pushed.
    started: Instant,
}

impl Kind {
    fn io_op(self) -> IoOp {
        match self {
            Kind::Read { .. } => IoOp::Read,
            Kind::Write => IoOp::Write,
            Kind::Sync => IoOp::Sync,
        }
    }

    /// The operation its errors name.
    fn op(self) -> Op {
        match self {
            Kind::Read { .. } => Op::Read,
            Kind::Write => Op::Write,
            Kind::Sync => Op::Sync,
        }
    }
}

impl Slot {
    fn base(&mut self) -> *mut u8 {
        self.buf
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.as_aligned_mut().as_mut_ptr())
    }
}

/// A queue driven by the thread that owns it. See the module docs.
///
/// ```
/// use gpuio::{AlignedBuf, File, LocalConfig, LocalQueue};
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("table.bin");
/// # std::fs::write(&path, vec![3u8; 1 << 20]).unwrap();
/// let mut queue = LocalQueue::new(LocalConfig::default())?;
/// let file = File::open(&path)?;
/// for i in 0..16u64 {
///     queue.read(&file, i * 4096, AlignedBuf::new(4096, 4096)?, i)?;
/// }
/// let mut rows = 0;
/// while rows < 16 {
///     queue.wait(1, std::time::Duration::from_secs(10))?;
///     while let Some(done) = queue.pop() {
///         assert_eq!(done.result?, 4096);
///         assert!(done.buf.unwrap().as_aligned().iter().all(|&b| b == 3));
///         rows += 1;
///     }
/// }
/// # Ok::<(), gpuio::Error>(())
/// ```
pub struct LocalQueue {
    backend: Box<dyn Backend>,
    explain: Explain,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Slots to push to the backend (new requests, retries, continuations), in order.
    ready: VecDeque<u32>,
    /// Pushed and not yet reaped.
    pushed: usize,
    /// Finished and not yet popped, with the slot each holds until then (so that requests finished
    /// and not collected count against the depth too, and memory stays bounded).
    finished: VecDeque<(u32, LocalDone)>,
    reaped: Vec<IoDone>,
    /// Pools registered with this queue's ring: only their buffers' fixed indices mean anything here.
    pools: Vec<BufferPool>,
    /// Transfers served on the calling thread (`max_bytes` 0: none), and the bounds on retries and
    /// short transfers every request keeps to.
    inline: InlineLimits,
    /// Behind a lock only because the inline path counts through a [`Tally`]; never contended.
    stats: Mutex<QueueStats>,
    /// `!Send`: the ring belongs to the thread that made it.
    _owner_thread: PhantomData<*mut ()>,
}

impl std::fmt::Debug for LocalQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalQueue")
            .field("backend", &self.explain.backend)
            .field("depth", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .field("finished", &self.finished.len())
            .finish()
    }
}

impl LocalQueue {
    /// Builds the backend `config` asks for (probed as [`Engine::new`](super::Engine::new) does) and binds
    /// it to the calling thread.
    pub fn new(config: LocalConfig) -> Result<LocalQueue> {
        config.validate()?;
        let (backend, explain) = backend::probe(&config.backend)?;
        LocalQueue::start(config, backend, explain, true)
    }

    /// A queue on a backend built elsewhere (a fault-injecting wrapper in tests, say); `config.backend`
    /// is not used. Binds it to the calling thread. Every transfer goes through that backend: none is
    /// served on the calling thread.
    pub fn with_backend(
        config: LocalConfig,
        backend: Box<dyn Backend>,
        explain: Explain,
    ) -> Result<LocalQueue> {
        LocalQueue::start(config, backend, explain, false)
    }

    fn start(
        config: LocalConfig,
        mut backend: Box<dyn Backend>,
        mut explain: Explain,
        inline_allowed: bool,
    ) -> Result<LocalQueue> {
        config.validate()?;
        backend.attach_thread()?;
        let inline = InlineLimits::new(
            inline_allowed,
            config.inline_max_bytes,
            config.retries_max,
            config.short_transfers_max,
        );
        if inline.max_bytes > 0 {
            explain.reasons.push(format!(
                "loads and stores of memory-backed files up to {} served when taken, on the calling thread",
                crate::size::format_bytes(inline.max_bytes as f64)
            ));
        }
        explain
            .reasons
            .push("requests submitted and reaped on the application's thread (LocalQueue)".into());
        let depth = backend.queue_depth();
        Ok(LocalQueue {
            backend,
            explain,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            ready: VecDeque::with_capacity(depth),
            pushed: 0,
            finished: VecDeque::with_capacity(depth),
            reaped: Vec::with_capacity(depth),
            pools: Vec::new(),
            inline,
            stats: Mutex::new(QueueStats::default()),
            _owner_thread: PhantomData,
        })
    }

    /// Which backend serves this queue, and why.
    pub fn explain(&self) -> &Explain {
        &self.explain
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.explain.backend
    }

    /// The most requests taken and not yet popped.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Requests taken and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() - self.finished.len()
    }

    /// Requests finished and waiting in [`pop`](Self::pop).
    pub fn finished(&self) -> usize {
        self.finished.len()
    }

    /// Requests that can be taken now: the depth less those in flight and those finished and not
    /// yet popped.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// What this queue has done (`inline_ops`: transfers served on the calling thread).
    pub fn stats(&self) -> QueueStats {
        self.stats.lock().clone()
    }

    /// `count` recycled buffers of `buf_size` bytes (page-aligned), registered with this queue's ring
    /// as fixed buffers where the kernel allows (see [`BufferPool::registration`] for why not).
    /// Only buffers of pools made here use fixed buffers on this queue.
    pub fn buffer_pool(&mut self, buf_size: usize, count: usize) -> Result<BufferPool> {
        let pool = BufferPool::new(&MemoryBudget::unlimited(), buf_size, count, 4096, Wait::No)?;
        let reg = self.backend.register_pool(&pool);
        if let Registration::Fixed { .. } = reg {
            self.pools.push(pool.clone());
        }
        pool.set_registration(reg);
        Ok(pool)
    }

    /// Reads exactly `buf.len()` bytes at `offset` into `buf`; the end of the file first is an
    /// [`ErrorKind::UnexpectedEof`] error. `user` comes back with the result.
    pub fn read(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
        user: u64,
    ) -> std::result::Result<(), Refused> {
        self.take(
            Kind::Read { exact: true },
            file,
            offset,
            Some(buf.into()),
            user,
        )
    }

    /// Reads up to `buf.len()` bytes at `offset`, stopping at the end of the file.
    pub fn read_upto(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
        user: u64,
    ) -> std::result::Result<(), Refused> {
        self.take(
            Kind::Read { exact: false },
            file,
            offset,
            Some(buf.into()),
            user,
        )
    }

    /// Writes all of `buf` at `offset`.
    pub fn write(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
        user: u64,
    ) -> std::result::Result<(), Refused> {
        self.take(Kind::Write, file, offset, Some(buf.into()), user)
    }

    /// Flushes the file's written data (`fdatasync`). Requests taken before it are not ordered before
    /// it: wait for the writes that must be durable first.
    pub fn sync(&mut self, file: &File, user: u64) -> std::result::Result<(), Refused> {
        self.take(Kind::Sync, file, 0, None, user)
    }

    fn take(
        &mut self,
        kind: Kind,
        file: &File,
        offset: u64,
        buf: Option<IoBuffer>,
        user: u64,
    ) -> std::result::Result<(), Refused> {
        let op = kind.op();
        let len = buf.as_ref().map_or(0, |b| b.len());
        let checked = match &buf {
            Some(b) => CommandBuffer::check_range(file, op, offset, len as u64, b, 0),
            None => Ok(()),
        }
        .and_then(|()| match kind {
            Kind::Write | Kind::Sync => CommandBuffer::check_writable(file, offset, len as u64),
            Kind::Read { .. } => Ok(()),
        });
        if let Err(error) = checked {
            return Err(Refused { buf, error });
        }
        let Some(index) = self.free.pop() else {
            let error = Error::new(
                ErrorKind::WouldBlock,
                format!(
                    "local queue full: {} requests in flight, its depth; wait for some first",
                    self.slots.len()
                ),
            )
            .with_op(op)
            .with_path(file.path())
            .with_range(offset, len as u64);
            return Err(Refused { buf, error });
        };
        let align = file.align();
        let block = plan::direct_block(align, kind == Kind::Write);
        let addr = buf.as_ref().map_or(0, |b| b.as_aligned().as_ptr() as usize);
        let direct = file.is_direct()
            && self.explain.backend != BackendKind::Mmap
            && offset % block == 0
            && (len as u64) % block == 0
            && addr % (align.mem_align as usize).max(1) == 0;
        let fixed = buf.as_ref().and_then(|b| b.fixed_index_among(&self.pools));
        self.slots[index as usize] = Some(Slot {
            user,
            kind,
            file: file.clone(),
            offset,
            len,
            buf,
            fixed,
            done: 0,
            direct,
            block,
            retries: 0,
            shorts: 0,
            started: Instant::now(),
        });
        if len == 0 && kind != Kind::Sync {
            self.finish(index, Ok(0));
        } else if self.serves_inline(kind, file, len) {
            self.serve_inline(index);
        } else {
            self.ready.push_back(index);
        }
        Ok(())
    }

    fn serves_inline(&self, kind: Kind, file: &File, len: usize) -> bool {
        kind != Kind::Sync && len <= self.inline.max_bytes && file.is_memory_backed()
    }

    /// Serves a taken request on this thread, now (see the module docs).
    fn serve_inline(&mut self, index: u32) {
        let slot = self.slots[index as usize].as_mut().expect("a taken slot");
        let ptr = slot.base();
        let t = Transfer {
            kind: match slot.kind {
                Kind::Read { exact } => CmdKind::Load { exact },
                _ => CmdKind::Store,
            },
            file: &slot.file,
            offset: slot.offset,
            len: slot.len as u64,
        };
        let mut tally = Tally::new();
        let mut clock = Instant::now();
        let (bytes, error) =
            inline::transfer(&self.inline, &t, ptr, &mut tally, &self.stats, &mut clock);
        tally.flush(&self.stats);
        let result = match error {
            Some(e) => Err(e),
            None => Ok(bytes as usize),
        };
        self.finish(index, result);
    }

    /// Hands every request taken so far to the kernel without waiting, and collects what has finished.
    pub fn submit(&mut self) -> Result<()> {
        self.push_ready();
        self.reap(0, Some(Duration::ZERO))
    }

    /// Submits what was taken and waits until [`pop`](Self::pop) has at least `min` finished requests
    /// to give, or `timeout` passes; returns how many it has. `min` is capped at what is in flight
    /// plus what already finished, so a wait never outlasts the work.
    pub fn wait(&mut self, min: usize, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let want = min.min(self.in_flight() + self.finished.len());
        loop {
            let pushed = self.push_ready();
            let left = deadline.saturating_duration_since(Instant::now());
            if self.finished.len() >= want || left.is_zero() {
                if pushed > 0 {
                    // Hand them to the kernel now rather than at the next call.
                    self.reap(0, Some(Duration::ZERO))?;
                }
                return Ok(self.finished.len());
            }
            // Submits what was pushed and waits, in one system call.
            self.reap(1, Some(left))?;
        }
    }

    /// The next finished request, in the order they finished; its place in the queue is free again.
    pub fn pop(&mut self) -> Option<LocalDone> {
        let (index, done) = self.finished.pop_front()?;
        self.free.push(index);
        Some(done)
    }

    /// Pushes ready requests to the backend while it has room; returns how many.
    fn push_ready(&mut self) -> usize {
        let mut pushed = 0;
        while let Some(&index) = self.ready.front() {
            let slot = self.slots[index as usize]
                .as_mut()
                .expect("a ready slot is taken");
            let kind = match slot.kind {
                Kind::Sync => IoKind::Sync,
                _ => IoKind::new(
                    slot.kind.io_op(),
                    Span {
                        // SAFETY: done < len <= the buffer's length: the pointer stays inside it.
                        ptr: unsafe { slot.base().add(slot.done) },
                        len: slot.len - slot.done,
                        fixed: slot.fixed,
                    },
                ),
            };
            let req = IoRequest {
                kind,
                file: slot.file.clone(),
                direct: slot.direct,
                offset: slot.offset + slot.done as u64,
                tag: index as u64,
            };
            slot.started = Instant::now();
            // SAFETY: the buffer is owned by the slot, which is only emptied once this tag's completion
            // has been reaped (`complete`), or leaked on drop if it never is.
            match unsafe { self.backend.push(req) } {
                Ok(()) => {
                    self.ready.pop_front();
                    self.pushed += 1;
                    pushed += 1;
                }
                Err(_) => break,
            }
        }
        pushed
    }

    fn reap(&mut self, min: usize, timeout: Option<Duration>) -> Result<()> {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.clear();
        let r = self.backend.submit_and_reap(min, timeout, &mut reaped);
        let now = Instant::now();
        for d in reaped.drain(..) {
            self.pushed -= 1;
            self.complete(d, now);
        }
        self.reaped = reaped;
        r
    }

    /// Applies the decision table to one raw result.
    fn complete(&mut self, d: IoDone, now: Instant) {
        let index = d.tag as u32;
        let slot = self.slots[index as usize]
            .as_mut()
            .expect("a reaped tag's slot is taken");
        let mut stats = self.stats.lock();
        let s = &mut *stats;
        s.ops += 1;
        s.record_latency(now.saturating_duration_since(slot.started));
        if d.result > 0 {
            match slot.kind {
                Kind::Read { .. } => s.bytes_read += d.result as u64,
                Kind::Write => s.bytes_written += d.result as u64,
                Kind::Sync => {}
            }
        }
        let attempt = Attempt {
            op: slot.kind.io_op(),
            len: slot.len - slot.done,
            direct: slot.direct,
            block: slot.block,
            retries: slot.retries,
            retries_max: self.inline.retries_max,
            shorts: slot.shorts,
            shorts_max: self.inline.shorts_max,
            cancelled: false,
        };
        let op = slot.kind.op();
        let at = slot.offset + slot.done as u64;
        let rest = (slot.len - slot.done) as u64;
        let end: Option<Result<usize>> = match outcome::classify(&attempt, d.result) {
            Verdict::Complete { n } => {
                slot.done += n;
                Some(Ok(slot.done))
            }
            Verdict::EndOfFile => Some(match slot.kind {
                Kind::Read { exact: true } => {
                    Err(outcome::eof_error(slot.done as u64, slot.len as u64)
                        .with_path(slot.file.path())
                        .with_range(slot.offset, slot.len as u64))
                }
                _ => Ok(slot.done),
            }),
            Verdict::Retry => {
                slot.retries += 1;
                s.retries += 1;
                None
            }
            Verdict::RedoBuffered => {
                slot.direct = false;
                s.direct_fallbacks += 1;
                None
            }
            Verdict::Fail(f) => Some(Err(outcome::failure_error(op, f)
                .with_path(slot.file.path())
                .with_range(at, rest))),
            Verdict::Short { n, direct, then } => {
                slot.shorts += 1;
                s.short_transfers += 1;
                slot.done += n;
                slot.direct = direct;
                match then {
                    AfterShort::Continue | AfterShort::Stop => None,
                    AfterShort::GiveUp => Some(Err(outcome::shorts_error(op, slot.shorts)
                        .with_path(slot.file.path())
                        .with_range(at + n as u64, rest - n as u64))),
                }
            }
        };
        drop(stats);
        match end {
            None => self.ready.push_back(index),
            Some(result) => self.finish(index, result),
        }
    }

    fn finish(&mut self, index: u32, result: Result<usize>) {
        let slot = self.slots[index as usize]
            .take()
            .expect("a finishing slot is taken");
        self.finished.push_back((
            index,
            LocalDone {
                user: slot.user,
                result,
                buf: slot.buf,
            },
        ));
    }
}

impl Drop for LocalQueue {
    fn drop(&mut self) {
        // Requests not yet pushed never reach the kernel; those pushed must be reaped before their
        // buffers are freed.
        self.ready.clear();
        let deadline = Instant::now() + DROP_WAIT;
        while self.pushed > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.reap(1, Some(left)).is_err() {
                break;
            }
            self.ready.clear();
        }
        if self.pushed > 0 {
            // The kernel may still write these buffers: leak them (and the files they name) rather
            // than free memory under it. The ring is closed with them outstanding; the kernel cancels
            // or finishes them on its own.
            for slot in self.slots.iter_mut() {
                if let Some(slot) = slot.take() {
                    std::mem::forget(slot);
                }
            }
        }
    }
}
