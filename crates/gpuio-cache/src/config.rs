//! What a cache is made from: [`CacheConfig`], its validation, and the crate's fixed limits.
//!
//! This module only describes and checks a configuration: it never allocates lines or buffers,
//! never touches an engine and never does I/O (`PageCache::new`, in `cache.rs`, turns a valid one
//! into lines and queues).

use std::time::Duration;

use gpuio::{Error, Result};

/// Most sources one cache can have attached.
pub const SOURCES_MAX: usize = 4096;
/// Most lines one cache can hold.
pub const LINES_MAX: usize = 1 << 24;
/// Most lines of one source (its page table is 4 bytes per line).
pub const SOURCE_LINES_MAX: u64 = 1 << 32;
/// How long an operation waits for a line someone else has busy (a load or write-back in flight)
/// before giving up with [`ErrorKind::WouldBlock`].
///
/// [`ErrorKind::WouldBlock`]: gpuio::ErrorKind::WouldBlock
pub const BUSY_WAIT_MAX: Duration = Duration::from_secs(60);
/// Most memory for coalesced reads' bounce buffers (besides the lines).
pub(crate) const BOUNCE_BYTES_MAX: usize = 16 << 20;
/// Loads per command buffer are `queue_depth / LOADS_PER_CB_DIVISOR` (at least 1, at most 64).
pub(crate) const LOADS_PER_CB_DIVISOR: usize = 8;

/// How to make a [`PageCache`].
///
/// [`PageCache`]: crate::PageCache
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bytes per line: a power of two in 512..=65536.
    pub line_bytes: usize,
    /// Memory for lines; `capacity_bytes / line_bytes` lines are allocated up front (charged to the
    /// engine's memory budget).
    pub capacity_bytes: u64,
    /// Misses the cache aims to keep in flight: gather commits its misses in command buffers of
    /// `queue_depth / 8` loads (at least 1), so completions arrive in small groups while the engine
    /// keeps its own queue depth (`EngineConfig::backend.queue_depth`) full. Misses in flight are
    /// bounded by the number of lines.
    pub queue_depth: usize,
    /// Largest read a gather or prefetch issues for a run of adjacent missing lines of one file: the
    /// run is read once into a bounce buffer and copied into its lines, one I/O instead of one per
    /// line (a sorted frontier or a range scan misses line after line). `0` or anything up to one
    /// line turns this off. At most [`COALESCE_BYTES_MAX`]. Pack entries are not coalesced here:
    /// their reader already merges adjacent chunks.
    pub coalesce_bytes: usize,
    /// Threads one gather (or prefetch) may issue its misses from. A load of a memory-backed file
    /// (tmpfs, ramfs) is a copy the issuing thread does itself (`gpuio::EngineConfig::
    /// inline_max_bytes`), so a miss-bound gather of such a file runs at one core's copy rate unless
    /// its misses are spread: with more than one thread, the misses are cut into chunks of
    /// [`ISSUE_CHUNK_LINES`] lines that the calling thread and the cache's issue helpers take in turn.
    /// `0` (the default): one per available core (at most [`ISSUE_THREADS_MAX`]) for memory-backed
    /// files, and the calling thread alone for everything else, whose loads the engine completes
    /// asynchronously anyway. `1`: always the calling thread alone. `N > 1`: up to `N` threads for
    /// every source.
    pub issue_threads: usize,
}

/// Most threads one gather issues from ([`CacheConfig::issue_threads`]).
pub const ISSUE_THREADS_MAX: usize = 16;
/// Lines per chunk (at least; a chunk ends at a gap between missing lines, so that a run of adjacent
/// lines is coalesced by one thread) when a gather's misses are spread over threads: 64 misses of a
/// tmpfs file are about 0.2 ms of copying here, long next to a helper's wake-up (a few µs).
pub const ISSUE_CHUNK_LINES: usize = 64;

/// Largest [`CacheConfig::coalesce_bytes`].
pub const COALESCE_BYTES_MAX: usize = 4 << 20;
/// Default [`CacheConfig::coalesce_bytes`]: 128 KiB, where this machine's disk reaches its bandwidth
/// (docs/BENCHMARKS.md, the coalescing sweep).
pub const COALESCE_BYTES_DEFAULT: usize = 128 << 10;

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            line_bytes: 4096,
            capacity_bytes: 256 << 20,
            queue_depth: 64,
            coalesce_bytes: COALESCE_BYTES_DEFAULT,
            issue_threads: 0,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<()> {
        let l = self.line_bytes;
        if !l.is_power_of_two() || !(512..=65536).contains(&l) {
            return Err(Error::invalid(format!(
                "cache line size {l} must be a power of two in 512..=65536"
            )));
        }
        if self.capacity_bytes < l as u64 {
            return Err(Error::invalid(format!(
                "cache capacity {} bytes is smaller than one {l}-byte line",
                self.capacity_bytes
            )));
        }
        let lines = self.capacity_bytes / l as u64;
        if lines > LINES_MAX as u64 {
            return Err(Error::invalid(format!(
                "cache of {lines} lines exceeds the limit of {LINES_MAX}"
            )));
        }
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return Err(Error::invalid(format!(
                "cache queue depth {} is out of range 1..=4096",
                self.queue_depth
            )));
        }
        if self.coalesce_bytes > COALESCE_BYTES_MAX {
            return Err(Error::invalid(format!(
                "coalesced read size {} exceeds the limit of {COALESCE_BYTES_MAX} bytes",
                self.coalesce_bytes
            )));
        }
        if self.issue_threads > ISSUE_THREADS_MAX {
            return Err(Error::invalid(format!(
                "cache issue threads {} exceeds the limit of {ISSUE_THREADS_MAX}",
                self.issue_threads
            )));
        }
        Ok(())
    }
}
