//! gpu-io: moves bytes between storage and (accelerator) memory at the speed of the hardware.
//!
//! Layers, bottom to top; each uses only those below it:
//!
//! 1. [`error`] — one [`Error`] with a matchable [`ErrorKind`] and file/offset/errno context.
//! 2. [`mem`] — aligned buffers, recycled [`BufferPool`]s, a [`MemoryBudget`].
//! 3. [`backend`] — how I/O is issued: io_uring, a pread thread pool, or mmap; [`backend::probe`]
//!    picks one and explains why.
//! 4. [`file`] — where bytes live: a [`File`] with its direct-I/O capability.
//! 5. [`queue`] — the asynchronous API: [`Engine`], [`IoQueue`], [`CommandBuffer`], [`Completion`];
//!    and [`LocalQueue`], a ring one application thread submits and reaps itself.
//! 6. [`pipeline`] — N-buffered read → compute → write streams over the queue: [`Pipeline`].
//!
//! Beside [`file`]: [`replace`], crash-safe replacement of a file ([`ReplaceFile`]: temporary file,
//! fsync, rename, directory fsync).
//!
//! See the [`queue`] module for an example.

// The README's example is compiled as a doc test so that it cannot rot.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod backend;
pub mod error;
pub mod file;
pub mod input;
pub mod mem;
pub mod pipeline;
pub mod queue;
pub mod replace;
pub mod residency;
pub mod size;

pub use backend::{BackendChoice, BackendConfig, BackendKind, Explain, MmapAdvice};
pub use error::{Error, ErrorKind, Result};
pub use file::{DirectMode, File, OpenOptions};
pub use mem::{AlignedBuf, BufferPool, IoBuffer, MemoryBudget, PageSize, PooledBuf, Wait};
pub use pipeline::{Pipeline, PipelineError, PipelineStats};
pub use queue::{
    CommandBuffer, CommandError, CommandId, Completion, Engine, EngineConfig, Finished, IoQueue,
    LocalConfig, LocalDone, LocalQueue, Priority, QueueDesc, QueueKind, QueueStats, Refused,
    Status, INLINE_MAX_BYTES_DEFAULT,
};
pub use replace::ReplaceFile;
