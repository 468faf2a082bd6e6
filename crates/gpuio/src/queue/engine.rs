//! The engine's public handle: [`Engine`] (a backend and the thread that drives it), its
//! [`EngineConfig`], and the messages the handle sends that thread. What the thread does with them —
//! scheduling, issuing, deciding what each raw result means — is in `driver.rs`.
//!
//! This module starts and stops the engine thread and talks to it only through its channel and
//! waker; it never touches the backend once the thread owns it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, unbounded, Sender};
use parking_lot::Mutex;

use super::command::{CbShared, Recorded};
use super::driver::Driver;
use super::inline::InlineLimits;
use super::workers::{InlineJob, Workers, INLINE_THREADS_MAX};
use super::{IoQueue, QueueDesc, QueueShared, Slots};
use crate::backend::{self, Backend, BackendConfig, BackendKind, Explain, Waker};
use crate::error::{Error, ErrorKind, Result};
use crate::mem::{BufferPool, IoBuffer, MemoryBudget, PageSize, Registration, Wait};
use crate::queue::stats::QueueStats;

/// Default size of the tasks a large command is split into. Measured: see docs/BENCHMARKS.md
/// ("task size"); 1 MiB reaches the disk's sequential bandwidth at QD 16 with the fewest requests.
pub const TASK_SIZE_DEFAULT: usize = 1 << 20;
/// Smallest and largest task sizes accepted.
pub const TASK_SIZE_MIN: usize = 4096;
pub const TASK_SIZE_MAX: usize = 64 << 20;
/// Default [`EngineConfig::inline_max_bytes`]: transfers of memory-backed files up to this size are
/// served on the committing thread. Measured: docs/BENCHMARKS.md ("inline").
pub const INLINE_MAX_BYTES_DEFAULT: usize = 64 << 10;
/// Largest [`EngineConfig::inline_max_bytes`] accepted: larger copies belong on the copy threads.
pub const INLINE_MAX_BYTES_MAX: usize = 16 << 20;
/// How long the engine waits for a completion before looking at new messages again.
pub(super) const REAP_WAIT: Duration = Duration::from_micros(500);
/// Consecutive backend failures (not I/O errors: the submission machinery itself) before giving up.
pub(super) const BACKEND_FAILURES_MAX: u32 = 100;

/// How to build an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub backend: BackendConfig,
    /// Large commands are split into tasks of at most this many bytes (a multiple of 4096).
    pub task_size_bytes: usize,
    /// Bounce buffers (each `task_size_bytes`, at least 64 KiB) for unaligned transfers.
    pub bounce_buffers: usize,
    /// Budget that the engine's own buffers and pools made by [`Engine::buffer_pool`] are charged to.
    pub memory_budget: MemoryBudget,
    /// Retries of a transient error per task.
    pub retries_max: u32,
    /// Continuations of short transfers per task.
    pub short_transfers_max: u32,
    pub page: PageSize,
    /// Loads and stores of at most this many bytes of a memory-backed file (tmpfs, ramfs) are done by
    /// `commit` itself on the committing thread, when the whole command buffer qualifies (see
    /// `queue::inline`): no hand-off to the engine thread or the kernel's workers. 0 turns it off.
    /// Engines on a custom backend ([`Engine::with_backend`]) never do this.
    pub inline_max_bytes: usize,
    /// Threads that serve such command buffers in the committing thread's place when one of them is
    /// idle (`queue::workers`), so one application thread's small transfers of memory-backed files
    /// run on several cores; a thread that finds none idle serves its own. Started on first use. 0:
    /// always the committing thread. Default: one fewer than the available cores, at most
    /// [`INLINE_THREADS_MAX`](super::INLINE_THREADS_MAX).
    pub inline_threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            backend: BackendConfig::default(),
            task_size_bytes: TASK_SIZE_DEFAULT,
            bounce_buffers: 16,
            memory_budget: MemoryBudget::new(4 << 30),
            retries_max: 8,
            short_transfers_max: 64,
            page: PageSize::K4,
            inline_max_bytes: INLINE_MAX_BYTES_DEFAULT,
            inline_threads: inline_threads_default(),
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<()> {
        self.backend.validate()?;
        let t = self.task_size_bytes;
        if !(TASK_SIZE_MIN..=TASK_SIZE_MAX).contains(&t) || t % 4096 != 0 {
            return Err(Error::invalid(format!(
                "task size {t} must be a multiple of 4096 in {TASK_SIZE_MIN}..={TASK_SIZE_MAX}"
            )));
        }
        super::inline::check_max_bytes(self.inline_max_bytes)?;
        if self.inline_threads > INLINE_THREADS_MAX {
            return Err(Error::invalid(format!(
                "inline worker count {} is above {INLINE_THREADS_MAX}",
                self.inline_threads
            )));
        }
        if self.bounce_buffers == 0 || self.bounce_buffers > 1024 {
            return Err(Error::invalid(format!(
                "bounce buffer count {} is out of range 1..=1024",
                self.bounce_buffers
            )));
        }
        Ok(())
    }

    pub(super) fn bounce_size(&self) -> usize {
        self.task_size_bytes.max(64 << 10)
    }
}

/// One fewer than the cores this process may use (the committing thread is one), at most
/// [`INLINE_THREADS_MAX`].
fn inline_threads_default() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .min(INLINE_THREADS_MAX)
}

pub(crate) enum Msg {
    Commit {
        queue: Arc<QueueShared>,
        cb: Arc<CbShared>,
        commands: Vec<Recorded>,
        shared_buf: Option<IoBuffer>,
        barriers: Vec<usize>,
    },
    Cancel(u64),
    RegisterPool(BufferPool, Sender<Registration>),
    /// The callback of a command buffer served on the committing thread, to run on the engine thread
    /// as every other callback does.
    RunCallback(super::command::Callback, super::command::Status),
}

struct EngineInner {
    tx: Option<Sender<Msg>>,
    /// Set while the engine thread waits in the backend; senders then wake it.
    waiting: Arc<AtomicBool>,
    waker: Option<Waker>,
    thread: Option<JoinHandle<()>>,
    explain: Explain,
    config: EngineConfig,
    /// The inline path's limits (`max_bytes` 0 on a custom backend).
    inline: InlineLimits,
    /// The inline workers, started by the first command buffer that could use one.
    workers: OnceLock<Workers>,
    next_id: AtomicU64,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        // Closing the channel tells the thread to finish outstanding work and exit.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            // The last handle can be dropped on the engine thread itself, by a completion callback
            // that owned a queue. A thread cannot join itself (std panics with EDEADLK); it exits on
            // its own once it has drained, so leave it detached.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// A backend and the thread that drives it. Cheap to clone (shared); the thread finishes outstanding
/// work and exits when the last handle (engine, queue or completion) is gone.
#[derive(Clone)]
pub struct Engine(Arc<EngineInner>);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.0.explain.backend)
            .finish()
    }
}

static SHARED: OnceLock<Mutex<Option<Engine>>> = OnceLock::new();

impl Engine {
    /// Probes for the best backend `config` allows and starts the engine thread.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        let (backend, explain) = backend::probe(&config.backend)?;
        Engine::start(config, backend, explain, true)
    }

    /// Starts an engine on a backend built elsewhere (a fault-injecting wrapper in tests, say). Every
    /// transfer goes through that backend: none is served on the committing thread.
    pub fn with_backend(
        config: EngineConfig,
        backend: Box<dyn Backend>,
        explain: Explain,
    ) -> Result<Engine> {
        Engine::start(config, backend, explain, false)
    }

    fn start(
        config: EngineConfig,
        mut backend: Box<dyn Backend>,
        mut explain: Explain,
        inline_allowed: bool,
    ) -> Result<Engine> {
        config.validate()?;
        let inline = InlineLimits::new(
            inline_allowed,
            config.inline_max_bytes,
            config.retries_max,
            config.short_transfers_max,
        );
        explain.reasons.push(match inline.max_bytes {
            0 if !inline_allowed => {
                "every transfer goes through the backend (custom backend)".to_string()
            }
            0 => "every transfer goes through the backend (inline transfers turned off)".to_string(),
            n => format!(
                "loads and stores of up to {n} bytes of memory-backed files (tmpfs, ramfs) are done on the committing thread, or by one of {} inline workers when one is idle and the thread has other work outstanding: a page-cache copy costs less than a hand-off to the engine thread",
                config.inline_threads
            ),
        });
        let bounce = BufferPool::new(
            &config.memory_budget,
            config.bounce_size(),
            config.bounce_buffers,
            config.page.bytes(),
            Wait::No,
        )?;
        let reg = backend.register_pool(&bounce);
        explain.reasons.push(match &reg {
            Registration::Fixed { .. } => {
                "bounce buffers registered as io_uring fixed buffers".into()
            }
            Registration::Refused(why) => format!("bounce buffers not registered: {why}"),
            Registration::None => "bounce buffers not registered".into(),
        });
        bounce.set_registration(reg);
        let (tx, rx) = unbounded::<Msg>();
        let waker = backend.waker();
        if waker.is_none() {
            explain.reasons.push(format!(
                "the backend cannot be woken: work committed during a wait starts within {} µs",
                REAP_WAIT.as_micros()
            ));
        }
        let waiting = Arc::new(AtomicBool::new(false));
        let driver = Driver::new(backend, rx, &config, bounce, waiting.clone());
        let (attached_tx, attached_rx) = bounded(1);
        let thread = std::thread::Builder::new()
            .name("gpuio-engine".into())
            .spawn(move || driver.run(attached_tx))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("cannot start engine thread: {e}"),
                )
            })?;
        // The backend binds to the engine thread before anything is committed; if it cannot, the
        // engine is unusable and says why now rather than at the first command.
        match attached_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::new(
                    ErrorKind::EngineStopped,
                    "the engine thread ended while starting",
                ));
            }
        }
        Ok(Engine(Arc::new(EngineInner {
            tx: Some(tx),
            waiting,
            waker,
            thread: Some(thread),
            explain,
            config,
            inline,
            workers: OnceLock::new(),
            next_id: AtomicU64::new(1),
        })))
    }

    /// The process-wide engine used by [`IoQueue::new`], made on first use.
    pub fn shared_default() -> Result<Engine> {
        let cell = SHARED.get_or_init(|| Mutex::new(None));
        let mut slot = cell.lock();
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let e = Engine::new(EngineConfig::default())?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// Which backend runs and why.
    pub fn explain(&self) -> &Explain {
        &self.0.explain
    }
    pub fn backend_kind(&self) -> BackendKind {
        self.0.explain.backend
    }
    pub fn config(&self) -> &EngineConfig {
        &self.0.config
    }

    /// A new queue on this engine.
    pub fn queue(&self, desc: QueueDesc) -> Result<IoQueue> {
        desc.validate()?;
        Ok(IoQueue {
            engine: self.clone(),
            shared: Arc::new(QueueShared {
                id: self.next_id(),
                slots: Slots::new(desc.command_buffers_max),
                desc,
                stats: Mutex::new(QueueStats::default()),
                outstanding: AtomicUsize::new(0),
            }),
        })
    }

    /// `count` recycled buffers of `buf_size` bytes, charged to the engine's memory budget (fails with
    /// [`ErrorKind::WouldBlock`] if it is exhausted) and registered with the backend where it can
    /// (see [`BufferPool::registration`] for why not). A registered pool lives as long as the engine.
    pub fn buffer_pool(&self, buf_size: usize, count: usize) -> Result<BufferPool> {
        self.buffer_pool_timed(buf_size, count)
            .map(|(pool, _, _)| pool)
    }

    /// Like [`buffer_pool`](Self::buffer_pool), also saying how long its two steps took: allocating
    /// the buffers (pre-faulted, so this is the kernel zeroing pages) and registering them with the
    /// backend (io_uring pins every page). A loader reports them as separate set-up phases.
    pub fn buffer_pool_timed(
        &self,
        buf_size: usize,
        count: usize,
    ) -> Result<(BufferPool, std::time::Duration, std::time::Duration)> {
        let t = std::time::Instant::now();
        let pool = BufferPool::new(
            &self.0.config.memory_budget,
            buf_size,
            count,
            self.0.config.page.bytes(),
            Wait::No,
        )?;
        let (tx, rx) = bounded(1);
        let alloc = t.elapsed();
        let t = std::time::Instant::now();
        self.send(Msg::RegisterPool(pool.clone(), tx))?;
        let reg = rx.recv().map_err(|_| {
            Error::new(
                ErrorKind::EngineStopped,
                "engine stopped during registration",
            )
        })?;
        pool.set_registration(reg);
        Ok((pool, alloc, t.elapsed()))
    }

    pub(crate) fn inline_limits(&self) -> &InlineLimits {
        &self.0.inline
    }

    /// Hands `job` (a command buffer of a concurrent queue, holding one of its slots) to an idle
    /// inline worker; gives it back (`Some`) when none is idle.
    pub(crate) fn hand_inline(&self, job: InlineJob) -> Option<InlineJob> {
        match self.inline_workers() {
            Some(w) => w.try_hand(job),
            None => Some(job),
        }
    }

    /// Whether an inline worker is idle now (a hint for whether to try [`Engine::hand_inline`]).
    pub(crate) fn inline_worker_idle(&self) -> bool {
        self.inline_workers().is_some_and(Workers::any_idle)
    }

    fn inline_workers(&self) -> Option<&Workers> {
        let n = self.0.config.inline_threads;
        if n == 0 || self.0.inline.max_bytes == 0 {
            return None;
        }
        let w = self.0.workers.get_or_init(|| Workers::start(n));
        (w.started() > 0).then_some(w)
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.0.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn send(&self, msg: Msg) -> Result<()> {
        self.send_or_return(msg)
            .map_err(|_| Error::new(ErrorKind::EngineStopped, "the engine thread has stopped"))
    }

    /// Like [`send`](Self::send), but gives the message back when the engine thread has stopped.
    pub(crate) fn send_or_return(&self, msg: Msg) -> std::result::Result<(), Box<Msg>> {
        self.0
            .tx
            .as_ref()
            .expect("sender lives until drop")
            .send(msg)
            .map_err(|e| Box::new(e.0))?;
        // Pairs with the engine's store-then-check in `Driver::reap`: either it sees this message
        // before waiting, or we see it waiting and wake it.
        if self.0.waiting.load(Ordering::SeqCst) {
            if let Some(w) = &self.0.waker {
                w();
            }
        }
        Ok(())
    }
}
