//! The user's asynchronous API, modelled on Metal's `MTLIOCommandQueue` (finding 219) and going beyond
//! it: queues can write as well as read, and completions are futures too.
//!
//! - An [`Engine`] owns one backend and the thread that drives it. Every queue on an engine shares its
//!   queue depth, so priorities between queues mean something.
//! - An [`IoQueue`] has a kind ([`QueueKind::Serial`]: command buffers run one after another;
//!   [`QueueKind::Concurrent`]: they overlap), a [`Priority`], a bound on command buffers in flight and a
//!   bound on bytes in flight.
//! - A [`CommandBuffer`] records `load`s (file range → buffer), `store`s (buffer → file range), `sync`s
//!   and `barrier`s, then `commit`s, returning a [`Completion`]: `wait()`, `status()`, `try_cancel()`,
//!   a callback, and `std::future::Future` (no runtime needed).
//!
//! ```
//! use gpuio::{AlignedBuf, Engine, EngineConfig, File, OpenOptions, QueueDesc};
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("weights.bin");
//! # std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
//! let engine = Engine::new(EngineConfig::default())?;
//! let queue = engine.queue(QueueDesc::default())?;
//! let file = File::open(&path)?;
//!
//! let mut cb = queue.command_buffer();
//! let first = cb.load(&file, 0, AlignedBuf::new(1 << 20, 4096)?)?;
//! let rest = cb.load(&file, 1 << 20, AlignedBuf::new(2 << 20, 4096)?)?;
//! let mut done = cb.commit()?.finish()?;
//! assert_eq!(done.bytes(first), 1 << 20);
//! let buf = done.take_buffer(rest).unwrap();
//! assert!(buf.iter().all(|&b| b == 7));
//! # Ok::<(), gpuio::Error>(())
//! ```

mod command;
mod driver;
mod engine;
mod inline;
mod local;
mod outcome;
pub(crate) mod plan;
mod stats;
mod workers;

pub use command::{CommandBuffer, CommandError, CommandId, Completion, Finished, Status};
pub use engine::{Engine, EngineConfig, INLINE_MAX_BYTES_DEFAULT, TASK_SIZE_DEFAULT};
pub use local::{LocalConfig, LocalDone, LocalQueue, Refused, DROP_WAIT};
pub use stats::{LatencySummary, QueueStats};
pub use workers::INLINE_THREADS_MAX;

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, ErrorKind, Result};

/// Whether a queue's command buffers may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// Each command buffer starts after the previous one completed.
    Serial,
    /// Command buffers run side by side.
    #[default]
    Concurrent,
}

/// Scheduling priority. Higher-priority queues get free backend slots first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    Low = 0,
    #[default]
    Normal = 1,
    High = 2,
}

/// How to make an [`IoQueue`].
#[derive(Debug, Clone)]
pub struct QueueDesc {
    pub kind: QueueKind,
    pub priority: Priority,
    /// Command buffers committed and not yet complete; `commit` waits past this.
    pub command_buffers_max: usize,
    /// Bytes of this queue's tasks handed to the backend at once.
    pub bytes_in_flight_max: u64,
}

impl Default for QueueDesc {
    fn default() -> Self {
        QueueDesc {
            kind: QueueKind::Concurrent,
            priority: Priority::Normal,
            command_buffers_max: 64,
            bytes_in_flight_max: 256 << 20,
        }
    }
}

impl QueueDesc {
    pub fn serial() -> QueueDesc {
        QueueDesc {
            kind: QueueKind::Serial,
            ..QueueDesc::default()
        }
    }
    pub fn with_priority(mut self, p: Priority) -> QueueDesc {
        self.priority = p;
        self
    }
    fn validate(&self) -> Result<()> {
        if self.command_buffers_max == 0 || self.bytes_in_flight_max == 0 {
            return Err(Error::invalid(format!(
                "queue bounds must be non-zero (command_buffers_max {}, bytes_in_flight_max {})",
                self.command_buffers_max, self.bytes_in_flight_max
            )));
        }
        Ok(())
    }
}

/// A counting bound on committed command buffers.
#[derive(Debug)]
pub(crate) struct Slots {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }
    fn acquire(&self, wait: bool) -> Result<()> {
        let mut used = self.used.lock();
        while *used >= self.max {
            if !wait {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!(
                        "{} command buffers already in flight on this queue",
                        self.max
                    ),
                ));
            }
            self.freed.wait(&mut used);
        }
        *used += 1;
        Ok(())
    }
    /// Takes a slot if one is free, without waiting.
    pub(crate) fn try_acquire(&self) -> bool {
        let mut used = self.used.lock();
        if *used >= self.max {
            return false;
        }
        *used += 1;
        true
    }
    /// No command buffer of the queue is in flight.
    pub(crate) fn is_idle(&self) -> bool {
        *self.used.lock() == 0
    }
    pub(crate) fn release(&self) {
        *self.used.lock() -= 1;
        self.freed.notify_one();
    }
}

/// What a queue shares with the engine thread.
#[derive(Debug)]
pub(crate) struct QueueShared {
    pub id: u64,
    pub desc: QueueDesc,
    pub slots: Slots,
    pub stats: Mutex<QueueStats>,
    /// [`Completion`]s of the queue that exist (committed, not yet dropped): whether the committing
    /// thread has other work in flight, which decides whether an inline worker may take over.
    pub outstanding: std::sync::atomic::AtomicUsize,
}

/// A command queue on an [`Engine`]. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct IoQueue {
    engine: Engine,
    shared: Arc<QueueShared>,
}

impl IoQueue {
    /// A queue on the process-wide default engine (made on first use with [`EngineConfig::default`]).
    pub fn new(desc: QueueDesc) -> Result<IoQueue> {
        Engine::shared_default()?.queue(desc)
    }

    pub fn desc(&self) -> &QueueDesc {
        &self.shared.desc
    }
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
    /// A new, empty command buffer for this queue.
    pub fn command_buffer(&self) -> CommandBuffer {
        CommandBuffer::new(self.clone())
    }
    /// Counters and latency of this queue's I/O so far.
    pub fn stats(&self) -> QueueStats {
        self.shared.stats.lock().clone()
    }
    /// Clears the statistics (e.g. after a warm-up).
    pub fn reset_stats(&self) {
        self.shared.stats.lock().reset();
    }
}
