//! Counters: [`CacheStats`], the per-thread shards that keep the hot hit / miss counters off one
//! shared cache line, and the cache-wide counters of rarer events.
//!
//! Counting is `Relaxed` and never orders anything: no decision of the cache may ever depend on a
//! counter, and a snapshot taken while operations run is not atomic across counters.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::PageCache;

/// Counters since the cache was made or [`PageCache::reset_stats`]. An access is one line touched by
/// one request (a gather touching a line with several of its ranges counts it once).
#[derive(Clone, Debug, Default)]
pub struct CacheStats {
    pub accesses: u64,
    pub hits: u64,
    pub misses: u64,
    /// Misses that joined a load already in flight instead of issuing one.
    pub joined: u64,
    /// Reads issued to sources (one read may fill several adjacent lines: see `lines_loaded`).
    pub reads_issued: u64,
    /// Lines filled by those reads.
    pub lines_loaded: u64,
    pub writes_issued: u64,
    pub evictions: u64,
    /// Bytes loaded from sources.
    pub bytes_read: u64,
    /// Bytes asked for by reads and gathers.
    pub bytes_requested: u64,
    /// Chunks of gathers' misses that the cache's issue helpers issued (see
    /// [`CacheConfig::issue_threads`](crate::CacheConfig::issue_threads)); the calling threads
    /// issued the rest.
    pub helper_chunks: u64,
}

impl CacheStats {
    pub fn hit_rate(&self) -> f64 {
        if self.accesses == 0 {
            0.0
        } else {
            self.hits as f64 / self.accesses as f64
        }
    }
    /// Bytes read from storage per byte requested.
    pub fn read_amplification(&self) -> f64 {
        if self.bytes_requested == 0 {
            0.0
        } else {
            self.bytes_read as f64 / self.bytes_requested as f64
        }
    }
}

pub(crate) const SHARDS: usize = 64;

/// Hot counters, one cache line per shard so that threads do not share one.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct Shard {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) bytes_requested: AtomicU64,
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static THREAD_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

pub(crate) fn shard_index() -> usize {
    THREAD_SHARD.with(|c| {
        let v = c.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_THREAD.fetch_add(1, Ordering::Relaxed) % SHARDS;
        c.set(v);
        v
    })
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) joined: AtomicU64,
    pub(crate) reads_issued: AtomicU64,
    pub(crate) lines_loaded: AtomicU64,
    pub(crate) writes_issued: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) helper_chunks: AtomicU64,
}

impl PageCache {
    pub fn stats(&self) -> CacheStats {
        let (mut hits, mut misses, mut req) = (0, 0, 0);
        for s in self.inner.shards.iter() {
            hits += s.hits.load(Ordering::Relaxed);
            misses += s.misses.load(Ordering::Relaxed);
            req += s.bytes_requested.load(Ordering::Relaxed);
        }
        let c = &self.inner.counters;
        CacheStats {
            accesses: hits + misses,
            hits,
            misses,
            joined: c.joined.load(Ordering::Relaxed),
            reads_issued: c.reads_issued.load(Ordering::Relaxed),
            lines_loaded: c.lines_loaded.load(Ordering::Relaxed),
            writes_issued: c.writes_issued.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_requested: req,
            helper_chunks: c.helper_chunks.load(Ordering::Relaxed),
        }
    }

    pub fn reset_stats(&self) {
        for s in self.inner.shards.iter() {
            s.hits.store(0, Ordering::Relaxed);
            s.misses.store(0, Ordering::Relaxed);
            s.bytes_requested.store(0, Ordering::Relaxed);
        }
        let c = &self.inner.counters;
        for a in [
            &c.joined,
            &c.reads_issued,
            &c.lines_loaded,
            &c.writes_issued,
            &c.evictions,
            &c.bytes_read,
            &c.helper_chunks,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }
}
