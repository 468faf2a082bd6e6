//! How I/O is issued: one [`Backend`] trait and three engines — [`uring`] (io_uring), [`threads`]
//! (a pread/pwrite worker pool) and [`mmap`] (copies out of a memory mapping) — plus the [`probe`] that
//! picks the best engine that works here and records why in an [`Explain`].
//!
//! A backend is a submission/completion queue pair: `push` requests, `submit_and_reap` to hand them to
//! the OS and collect completions. It issues each request exactly once and reports the raw outcome
//! (bytes or `-errno`); deciding what a short transfer or an errno means, and retrying, is the queue
//! engine's job, done once for every backend. A backend never allocates or frees the memory it moves:
//! requests carry raw pointers that the caller keeps alive until the matching completion is reaped.

pub mod mmap;
pub mod threads;
pub mod uring;

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::file::File;
use crate::mem::{BufferPool, Registration};

/// The kinds of engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Uring,
    Threads,
    Mmap,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Uring => "uring",
            BackendKind::Threads => "threads",
            BackendKind::Mmap => "mmap",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which engine to use: a specific one, or the best that works (`Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    #[default]
    Auto,
    Uring,
    Threads,
    Mmap,
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<BackendChoice> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "uring" | "io_uring" => Ok(BackendChoice::Uring),
            "threads" => Ok(BackendChoice::Threads),
            "mmap" => Ok(BackendChoice::Mmap),
            _ => Err(Error::invalid(format!(
                "backend '{s}' is not one of auto, uring, threads, mmap"
            ))),
        }
    }
}

/// `madvise` advice applied to mappings by the mmap engine (finding 226).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MmapAdvice {
    Normal,
    Sequential,
    #[default]
    Random,
    WillNeed,
}

/// Everything that configures an engine. Limits carry their unit in the name.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub choice: BackendChoice,
    /// Requests in flight at once (io_uring ring size, worker count for `threads`/`mmap`).
    pub queue_depth: usize,
    /// io_uring: a kernel thread polls the submission queue (saves syscalls, burns a core).
    pub sqpoll: bool,
    /// io_uring: poll for completions instead of interrupts. Only when asked: on devices without poll
    /// queues (virtio disks) such a ring never completes anything.
    pub iopoll: bool,
    /// io_uring: register pool buffers as fixed buffers when possible.
    pub fixed_buffers: bool,
    /// io_uring: register files (saves an fd lookup per request).
    pub registered_files: bool,
    /// io_uring: hand queued requests to the kernel every this many, rather than all at once per
    /// round. Devices that answer a batch at a time (virtio disks) stay busy when they receive work
    /// in small groups; see docs/BENCHMARKS.md ("submission batch").
    pub submit_batch_max: usize,
    /// io_uring: threads that copy large reads of memory-resident files (tmpfs, or warm in the page
    /// cache) on several cores; 0 turns them off. Default: the cores available, at most
    /// [`COPY_THREADS_MAX`].
    pub copy_threads: usize,
    /// io_uring: reads at least this large of memory-resident files go to the copy threads.
    pub copy_threads_min_bytes: usize,
    /// mmap: advice for each mapping.
    pub mmap_advice: MmapAdvice,
    /// mmap: prefault the whole mapping at map time (`MAP_POPULATE`).
    pub mmap_populate: bool,
}

/// Default for [`BackendConfig::submit_batch_max`], measured (docs/BENCHMARKS.md).
pub const SUBMIT_BATCH_DEFAULT: usize = 8;

/// Most copy threads an io_uring backend starts.
pub const COPY_THREADS_MAX: usize = 64;
/// Default for [`BackendConfig::copy_threads_min_bytes`], measured (docs/BENCHMARKS.md).
pub const COPY_THREADS_MIN_BYTES_DEFAULT: usize = 128 << 10;

/// The deepest queue a backend accepts.
pub const QUEUE_DEPTH_MAX: usize = 4096;

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            choice: BackendChoice::Auto,
            queue_depth: 64,
            sqpoll: false,
            iopoll: false,
            fixed_buffers: true,
            registered_files: true,
            submit_batch_max: SUBMIT_BATCH_DEFAULT,
            copy_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(COPY_THREADS_MAX),
            copy_threads_min_bytes: COPY_THREADS_MIN_BYTES_DEFAULT,
            mmap_advice: MmapAdvice::Random,
            mmap_populate: false,
        }
    }
}

impl BackendConfig {
    pub fn validate(&self) -> Result<()> {
        if self.queue_depth == 0 || self.queue_depth > QUEUE_DEPTH_MAX {
            return Err(Error::invalid(format!(
                "queue depth {} is out of range 1..={QUEUE_DEPTH_MAX}",
                self.queue_depth
            )));
        }
        if self.copy_threads > COPY_THREADS_MAX {
            return Err(Error::invalid(format!(
                "copy threads {} is out of range 0..={COPY_THREADS_MAX}",
                self.copy_threads
            )));
        }
        if self.submit_batch_max == 0 {
            return Err(Error::invalid("submission batch must be at least 1"));
        }
        Ok(())
    }
}

/// What a request does, without its memory (see [`IoKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    /// `fdatasync`-like flush of the file (ptr/len unused).
    Sync,
}

/// The memory a read or write moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub ptr: *mut u8,
    pub len: usize,
    /// io_uring fixed-buffer index covering `ptr..ptr+len`, if registered.
    pub fixed: Option<u16>,
}

/// What a request does, with the memory it moves: a sync moves none, so it carries none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read(Span),
    Write(Span),
    /// `fdatasync`-like flush of the file.
    Sync,
}

impl IoKind {
    /// `op` over `span` (a sync ignores it).
    pub fn new(op: IoOp, span: Span) -> IoKind {
        match op {
            IoOp::Read => IoKind::Read(span),
            IoOp::Write => IoKind::Write(span),
            IoOp::Sync => IoKind::Sync,
        }
    }
}

/// One request handed to a backend.
///
/// The memory of its [`Span`] must stay valid (and, for reads, unaliased) until the completion carrying
/// `tag` has been reaped; that is why [`Backend::push`] is `unsafe`.
#[derive(Debug, Clone)]
pub struct IoRequest {
    pub kind: IoKind,
    /// The file; keeping it here also keeps its descriptors open while the request is in flight.
    pub file: File,
    /// Use the file's `O_DIRECT` descriptor (when it has one) rather than the buffered one.
    pub direct: bool,
    pub offset: u64,
    pub tag: u64,
}

// SAFETY: the pointer is only dereferenced by the backend under the contract of `Backend::push`.
unsafe impl Send for IoRequest {}

impl IoRequest {
    /// The descriptor this request goes to.
    pub fn fd(&self) -> std::os::fd::RawFd {
        if self.direct {
            self.file.fast_fd()
        } else {
            self.file.buffered_fd()
        }
    }

    pub fn op(&self) -> IoOp {
        match self.kind {
            IoKind::Read(_) => IoOp::Read,
            IoKind::Write(_) => IoOp::Write,
            IoKind::Sync => IoOp::Sync,
        }
    }

    /// The memory a read or write moves; `None` for a sync.
    pub fn span(&self) -> Option<&Span> {
        match &self.kind {
            IoKind::Read(s) | IoKind::Write(s) => Some(s),
            IoKind::Sync => None,
        }
    }

    pub fn span_mut(&mut self) -> Option<&mut Span> {
        match &mut self.kind {
            IoKind::Read(s) | IoKind::Write(s) => Some(s),
            IoKind::Sync => None,
        }
    }

    /// Bytes it moves (0 for a sync).
    pub fn len(&self) -> usize {
        self.span().map_or(0, |s| s.len)
    }

    /// Whether it moves no bytes (a sync, or an empty transfer).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The raw outcome of one request: bytes transferred, or a negative errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDone {
    pub tag: u64,
    pub result: i64,
}

/// Ends a wait in [`Backend::submit_and_reap`] early, from any thread (new work has arrived).
pub type Waker = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The tag backends use internally for wake-ups; never used by a request, never reported.
pub const WAKE_TAG: u64 = u64::MAX;

/// An I/O engine. See the module docs for the contract.
pub trait Backend: Send {
    fn kind(&self) -> BackendKind;
    /// The most requests it keeps in flight.
    fn queue_depth(&self) -> usize;
    /// Requests pushed and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Called once by the thread that will drive this backend, before its first `push`. A backend whose
    /// kernel object may be used by one thread only (an io_uring ring set up `SINGLE_ISSUER`) binds to
    /// the calling thread here; every later call must come from it.
    fn attach_thread(&mut self) -> Result<()> {
        Ok(())
    }
    /// Queues `req` for the next submission. Returns it back if the engine is full.
    ///
    /// # Safety
    /// `req.ptr..req.ptr+req.len` must stay valid until the completion with `req.tag` is reaped by
    /// [`Backend::submit_and_reap`]; for reads nothing else may access that memory meanwhile.
    unsafe fn push(&mut self, req: IoRequest) -> std::result::Result<(), IoRequest>;
    /// Submits everything pushed, waits until at least `min_complete` completions are available or
    /// `timeout` passes, and appends every available completion to `out`.
    fn submit_and_reap(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<IoDone>,
    ) -> Result<()>;
    /// A handle that makes a current or next wait in `submit_and_reap` return early, if the backend
    /// has one (otherwise waits end only by completion or timeout).
    fn waker(&self) -> Option<Waker> {
        None
    }
    /// Offers a pool's buffers for registration; says how it went.
    fn register_pool(&mut self, _pool: &BufferPool) -> Registration {
        Registration::Refused(format!("the {} backend has no fixed buffers", self.kind()))
    }
    /// Facts about how this engine was set up (registration refused, SQPOLL on, ...).
    fn notes(&self) -> Vec<String>;
}

/// Which engine runs and why: the answer to "why is it not faster?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explain {
    pub backend: BackendKind,
    /// One line per decision, in the order taken.
    pub reasons: Vec<String>,
}

impl fmt::Display for Explain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "backend: {}", self.backend)?;
        for r in &self.reasons {
            writeln!(f, "  - {r}")?;
        }
        Ok(())
    }
}

/// Builds the engine `config` asks for: for `Auto`, io_uring if it works here, else the thread pool,
/// with the reason recorded.
pub fn probe(config: &BackendConfig) -> Result<(Box<dyn Backend>, Explain)> {
    config.validate()?;
    let mut reasons = Vec::new();
    let backend: Box<dyn Backend> = match config.choice {
        BackendChoice::Uring => {
            reasons.push("io_uring chosen explicitly".into());
            Box::new(uring::UringBackend::new(config)?)
        }
        BackendChoice::Threads => {
            reasons.push("thread pool chosen explicitly".into());
            Box::new(threads::new(config)?)
        }
        BackendChoice::Mmap => {
            reasons.push("mmap chosen explicitly".into());
            Box::new(mmap::new(config)?)
        }
        BackendChoice::Auto => match uring::UringBackend::new(config) {
            Ok(b) => {
                reasons.push(
                    "io_uring available: ring set up and every needed opcode supported".into(),
                );
                Box::new(b)
            }
            Err(e) => {
                reasons.push(format!(
                    "io_uring refused ({e}); falling back to the pread/pwrite thread pool"
                ));
                Box::new(threads::new(config)?)
            }
        },
    };
    reasons.extend(backend.notes());
    let explain = Explain {
        backend: backend.kind(),
        reasons,
    };
    Ok((backend, explain))
}
