//! The cache's core: the slots (one per line: state word, tag, buffer), the state every part of the
//! cache shares (`Inner`), [`PageCache`] and its construction, and the bounded back-off that every
//! wait for a busy line goes through.
//!
//! Slots are allocated once, in [`PageCache::new`], and never added or removed; a slot's buffer is
//! replaced only when the old one was lost with a command buffer the engine refused
//! (`slot_buffer`). Nothing here ever waits without a bound (`Backoff` gives up after
//! [`BUSY_WAIT_MAX`]) or holds a lock while it waits.

use std::fmt;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gpuio::{AlignedBuf, BufferPool, Engine, Error, ErrorKind, IoQueue, QueueDesc, Result, Wait};
use parking_lot::Mutex;

use crate::config::{BOUNCE_BYTES_MAX, LOADS_PER_CB_DIVISOR};
use crate::issue::PackJob;
use crate::share::Loading;
use crate::source::Source;
use crate::spread::{available_cores, Helpers};
use crate::stats::{Counters, Shard, SHARDS};
use crate::{CacheConfig, BUSY_WAIT_MAX, SOURCES_MAX};

#[repr(align(64))]
pub(crate) struct Slot {
    pub(crate) word: AtomicU64,
    /// `(source + 1) << 40 | line`, or 0.
    pub(crate) tag: AtomicU64,
    /// The line's bytes. Fixed while the line's buffer lives; replaced only by the slot's owner.
    pub(crate) ptr: AtomicPtr<u8>,
    /// The buffer itself, when it is not lent to the engine.
    pub(crate) buf: Mutex<Option<AlignedBuf>>,
    pub(crate) loading: Mutex<Option<Loading>>,
}

pub(crate) fn make_tag(src: u32, line: u64) -> u64 {
    ((src as u64 + 1) << 40) | line
}
pub(crate) fn tag_parts(tag: u64) -> (u32, u64) {
    (((tag >> 40) - 1) as u32, tag & ((1 << 40) - 1))
}

pub(crate) struct Inner {
    pub(crate) engine: Engine,
    pub(crate) queue: IoQueue,
    pub(crate) wb_queue: IoQueue,
    pub(crate) line_bytes: usize,
    pub(crate) line_shift: u32,
    pub(crate) align: usize,
    pub(crate) loads_per_cb: usize,
    /// Most adjacent lines one read fills (1: no coalescing).
    pub(crate) run_lines_max: usize,
    /// Bounce buffers for coalesced reads, `run_lines_max` lines each; `None` when not coalescing.
    pub(crate) bounce: Option<BufferPool>,
    pub(crate) slots: Box<[Slot]>,
    pub(crate) hand: AtomicUsize,
    pub(crate) sources: Box<[OnceLock<Arc<Source>>]>,
    pub(crate) next_source: Mutex<u32>,
    pub(crate) shards: Box<[Shard]>,
    pub(crate) counters: Counters,
    /// Write-back errors since the last flush: the first, and how many.
    pub(crate) wb_errors: Mutex<(Option<Error>, u64)>,
    pub(crate) pack_tx: OnceLock<crossbeam_channel::Sender<PackJob>>,
    /// [`CacheConfig::issue_threads`] as configured (0: chosen per source).
    pub(crate) issue_threads: usize,
    /// The most threads a gather issues from: `issue_threads`, or for 0 the available cores.
    pub(crate) issue_threads_max: usize,
    /// The issue helpers, started by the first gather that spreads (see `spread`).
    pub(crate) helpers: OnceLock<Helpers>,
}

/// A fixed budget of cache lines over files and pack entries. Cheap to clone (shared); `Send + Sync`.
#[derive(Clone)]
pub struct PageCache {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for PageCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageCache")
            .field("line_bytes", &self.inner.line_bytes)
            .field("lines", &self.inner.slots.len())
            .finish()
    }
}

/// Waits with growing pauses, up to [`BUSY_WAIT_MAX`].
pub(crate) struct Backoff {
    n: u32,
    start: Option<Instant>,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { n: 0, start: None }
    }
    pub(crate) fn wait(&mut self, what: &str) -> Result<()> {
        self.n += 1;
        if self.n < 16 {
            std::hint::spin_loop();
        } else if self.n < 48 {
            std::thread::yield_now();
        } else {
            let start = *self.start.get_or_insert_with(Instant::now);
            if start.elapsed() > BUSY_WAIT_MAX {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!("{what}: still busy after {BUSY_WAIT_MAX:?}"),
                ));
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        Ok(())
    }
}

impl PageCache {
    /// Allocates every line now. Fails with `InvalidInput` for a bad configuration and with
    /// `WouldBlock` when the engine's memory budget cannot cover the lines.
    pub fn new(engine: &Engine, config: CacheConfig) -> Result<PageCache> {
        config.validate()?;
        let lines = (config.capacity_bytes / config.line_bytes as u64) as usize;
        let align = config.line_bytes.clamp(512, 4096);
        let budget = &engine.config().memory_budget;
        let mut slots = Vec::with_capacity(lines);
        // One slab for all lines: a separate aligned allocation per line would cost about twice the
        // capacity in memory, and time to match.
        for mut buf in AlignedBuf::carve(budget, lines, config.line_bytes, align, Wait::No)? {
            buf.prefault();
            slots.push(Slot {
                word: AtomicU64::new(0),
                tag: AtomicU64::new(0),
                ptr: AtomicPtr::new(buf.as_mut_ptr()),
                buf: Mutex::new(Some(buf)),
                loading: Mutex::new(None),
            });
        }
        let loads_per_cb = (config.queue_depth / LOADS_PER_CB_DIVISOR).clamp(1, 64);
        let desc = QueueDesc {
            command_buffers_max: lines / loads_per_cb + 64,
            bytes_in_flight_max: (lines as u64 * config.line_bytes as u64).max(64 << 20),
            ..QueueDesc::default()
        };
        let queue = engine.queue(desc.clone())?;
        let wb_queue = engine.queue(desc)?;
        // A run never spans more lines than a quarter of the cache, so that coalescing cannot take
        // the lines an earlier part of the same gather still needs.
        let run_lines_max =
            (config.coalesce_bytes / config.line_bytes).clamp(1, (lines / 4).max(1));
        // One bounce buffer per load the cache aims to have in flight, at most BOUNCE_BYTES_MAX in
        // all (memory besides the lines, charged to the engine's budget); when they are all busy a
        // gather waits for one (see `IssueCtx::load_run`). Not registered with the engine: a
        // registered pool lives as long as the engine, and caches come and go on one engine.
        let bounce = if run_lines_max > 1 {
            let run_bytes = run_lines_max * config.line_bytes;
            let count = config.queue_depth.min(BOUNCE_BYTES_MAX / run_bytes).max(2);
            Some(BufferPool::new(budget, run_bytes, count, align, Wait::No)?)
        } else {
            None
        };
        Ok(PageCache {
            inner: Arc::new(Inner {
                engine: engine.clone(),
                queue,
                wb_queue,
                line_bytes: config.line_bytes,
                line_shift: config.line_bytes.trailing_zeros(),
                align,
                loads_per_cb,
                run_lines_max,
                bounce,
                slots: slots.into_boxed_slice(),
                hand: AtomicUsize::new(0),
                sources: (0..SOURCES_MAX).map(|_| OnceLock::new()).collect(),
                next_source: Mutex::new(0),
                shards: (0..SHARDS).map(|_| Shard::default()).collect(),
                counters: Counters::default(),
                wb_errors: Mutex::new((None, 0)),
                pack_tx: OnceLock::new(),
                issue_threads: config.issue_threads,
                issue_threads_max: match config.issue_threads {
                    0 => available_cores(),
                    n => n,
                },
                helpers: OnceLock::new(),
            }),
        })
    }

    /// The engine the cache issues its I/O on.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn line_bytes(&self) -> usize {
        self.inner.line_bytes
    }
    pub fn capacity_lines(&self) -> usize {
        self.inner.slots.len()
    }
}

/// Makes sure the slot (Busy, ours) has its buffer; returns the bytes' address.
pub(crate) fn slot_buffer(inner: &Inner, slot: &Slot) -> Result<*mut u8> {
    let mut b = slot.buf.lock();
    if b.is_none() {
        let mut nb = AlignedBuf::new_in(
            &inner.engine.config().memory_budget,
            inner.line_bytes,
            inner.align,
            Wait::No,
        )?;
        slot.ptr.store(nb.as_mut_ptr(), Ordering::Release);
        *b = Some(nb);
    }
    Ok(slot.ptr.load(Ordering::Acquire))
}
