//! A software page cache over gpu-io files and pack entries (BaM / AGILE / GPUfs on the host).
//!
//! A [`PageCache`] holds a fixed budget of equal-size lines (a power of two, 512 B – 64 KiB, 4 KiB by
//! default), all allocated when it is made. Each line has a state word (Invalid, Busy, Ready,
//! Modified, pin counts and the clock's reference bit: see [`line`]) and a tag naming the source
//! line it holds. Each attached source has a page table, one `AtomicU32` per line of the source,
//! mapping a line number to the slot holding it (BaM's 4 bytes per line of storage): a lookup of a
//! resident line is an array index, one pin, and a tag check — no lock.
//!
//! - Misses are loaded through the engine's command queue (files: `CommandBuffer::load`, direct I/O
//!   when the file allows; pack entries: `Entry::load`). A miss on a line already being loaded joins
//!   that load (AGILE's share table) instead of issuing another.
//! - [`PageCache::gather`] groups a batch of ranges by line, serves resident lines at once, issues
//!   every miss as a load (several per command buffer) and returns: the caller works while they are
//!   in flight, and [`Gather::wait`] or `.await` collects the bytes.
//! - [`PageCache::gather_held`] does the same for a read-only source without copying: each row is a
//!   slice of the line that holds it, kept resident until the [`HeldRows`] are dropped.
//! - Replacement is the clock (second chance), skipping pinned and busy lines. Modified lines are
//!   written back (a `store`) when evicted and by [`PageCache::flush`]; a failed write-back keeps the
//!   line Modified, and `flush` reports the error. A failed read never leaves a line Ready.
//! - [`Array`] is BaM's typed array over a source; [`CachedFile`] a GPUfs-style file view.
//!
//! This crate never holds a lock while it waits for I/O, never waits without a bound (a cache whose
//! lines are all held returns [`ErrorKind::WouldBlock`]), and never runs I/O on the engine thread: a
//! load's completion callback only hands the line over and copies it to whoever asked for it.
//!
//! ```
//! use gpuio::{Engine, EngineConfig, File, OpenOptions};
//! use gpuio_cache::{Array, CacheConfig, PageCache};
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("table.bin");
//! # let v: Vec<u8> = (0..1000u64).flat_map(|i| i.to_le_bytes()).collect();
//! # std::fs::write(&path, v).unwrap();
//! let engine = Engine::new(EngineConfig::default())?;
//! let cache = PageCache::new(&engine, CacheConfig { capacity_bytes: 1 << 20, ..CacheConfig::default() })?;
//! let src = cache.attach_file(&OpenOptions::read_write().open(&path)?)?;
//! let table = Array::<u64>::new(&cache, src)?;
//! assert_eq!(table.get(7)?, 7);
//! assert_eq!(table.gather(&[999, 3, 500])?, vec![999, 3, 500]);
//! table.set(3, 42)?;
//! cache.flush(true)?;
//! # Ok::<(), gpuio::Error>(())
//! ```
//!
//! [`ErrorKind::WouldBlock`]: gpuio::ErrorKind::WouldBlock

mod access;
mod array;
mod cache;
mod clock;
mod config;
mod file;
mod gather;
mod held;
mod issue;
pub mod line;
mod share;
mod source;
mod spread;
mod stats;
mod writeback;

pub use array::{Array, ArrayGather, ArrayIter};
pub use cache::PageCache;
pub use clock::PinnedLines;
pub use config::{
    CacheConfig, BUSY_WAIT_MAX, COALESCE_BYTES_DEFAULT, COALESCE_BYTES_MAX, ISSUE_CHUNK_LINES,
    ISSUE_THREADS_MAX, LINES_MAX, SOURCES_MAX, SOURCE_LINES_MAX,
};
pub use file::CachedFile;
pub use gather::{Gather, GatherResult};
pub use held::{HeldGather, HeldRows};
pub use line::LineState;
pub use source::SourceId;
pub use stats::CacheStats;
