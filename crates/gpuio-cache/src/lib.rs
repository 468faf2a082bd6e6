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

mod array;
mod file;
pub mod line;

pub use array::{Array, ArrayGather, ArrayIter};
pub use file::CachedFile;
pub use line::LineState;

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use gpuio::{
    AlignedBuf, BufferPool, CommandBuffer, CommandId, Completion, Engine, Error, ErrorKind, File,
    Finished, IoBuffer, IoQueue, QueueDesc, Result, Status, Wait,
};
use gpuio_pack::{Entry, PackLoad};
use parking_lot::{Condvar, Mutex};

/// Most sources one cache can have attached.
pub const SOURCES_MAX: usize = 4096;
/// Most lines one cache can hold.
pub const LINES_MAX: usize = 1 << 24;
/// Most lines of one source (its page table is 4 bytes per line).
pub const SOURCE_LINES_MAX: u64 = 1 << 32;
/// How long an operation waits for a line someone else has busy (a load or write-back in flight)
/// before giving up with [`ErrorKind::WouldBlock`].
pub const BUSY_WAIT_MAX: Duration = Duration::from_secs(60);
/// Most memory for coalesced reads' bounce buffers (besides the lines).
const BOUNCE_BYTES_MAX: usize = 16 << 20;
/// Loads per command buffer are `queue_depth / LOADS_PER_CB_DIVISOR` (at least 1, at most 64).
const LOADS_PER_CB_DIVISOR: usize = 8;

/// How to make a [`PageCache`].
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
}

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
        Ok(())
    }
}

/// Names a source (file or pack entry) attached to a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceId(u32);

impl SourceId {
    pub fn index(self) -> u32 {
        self.0
    }
}

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

// ---------------------------------------------------------------------------------------------------
// Internals.

const SHARDS: usize = 64;

/// Hot counters, one cache line per shard so that threads do not share one.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_requested: AtomicU64,
}

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static THREAD_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn shard_index() -> usize {
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
struct Counters {
    joined: AtomicU64,
    reads_issued: AtomicU64,
    lines_loaded: AtomicU64,
    writes_issued: AtomicU64,
    evictions: AtomicU64,
    bytes_read: AtomicU64,
}

enum Backing {
    File(File),
    Entry(Entry),
}

struct Source {
    backing: Backing,
    len: u64,
    writable: bool,
    /// Line number → slot + 1 (0: not resident).
    table: Box<[AtomicU32]>,
}

impl Source {
    fn line_len(&self, line: u64, line_bytes: usize) -> usize {
        let start = line * line_bytes as u64;
        (self.len - start).min(line_bytes as u64) as usize
    }
}

/// One piece of a request that a line serves: bytes `[line_off, line_off + len)` of the line go to
/// `out_off` of the requester's buffer.
#[derive(Clone, Copy)]
struct Piece {
    line_off: u32,
    out_off: usize,
    len: u32,
}

/// Who waits for a line being loaded, and where its bytes go.
struct Consumer {
    gather: Arc<GatherShared>,
    pieces: Vec<Piece>,
}

/// A load in flight on a slot: joiners add themselves here (the share table).
struct Loading {
    tag: u64,
    consumers: Vec<Consumer>,
}

#[repr(align(64))]
struct Slot {
    word: AtomicU64,
    /// `(source + 1) << 40 | line`, or 0.
    tag: AtomicU64,
    /// The line's bytes. Fixed while the line's buffer lives; replaced only by the slot's owner.
    ptr: AtomicPtr<u8>,
    /// The buffer itself, when it is not lent to the engine.
    buf: Mutex<Option<AlignedBuf>>,
    loading: Mutex<Option<Loading>>,
}

fn make_tag(src: u32, line: u64) -> u64 {
    ((src as u64 + 1) << 40) | line
}
fn tag_parts(tag: u64) -> (u32, u64) {
    (((tag >> 40) - 1) as u32, tag & ((1 << 40) - 1))
}

struct Inner {
    engine: Engine,
    queue: IoQueue,
    wb_queue: IoQueue,
    line_bytes: usize,
    line_shift: u32,
    align: usize,
    loads_per_cb: usize,
    /// Most adjacent lines one read fills (1: no coalescing).
    run_lines_max: usize,
    /// Bounce buffers for coalesced reads, `run_lines_max` lines each; `None` when not coalescing.
    bounce: Option<BufferPool>,
    slots: Box<[Slot]>,
    hand: AtomicUsize,
    sources: Box<[OnceLock<Arc<Source>>]>,
    next_source: Mutex<u32>,
    shards: Box<[Shard]>,
    counters: Counters,
    /// Write-back errors since the last flush: the first, and how many.
    wb_errors: Mutex<(Option<Error>, u64)>,
    pack_tx: OnceLock<crossbeam_channel::Sender<PackJob>>,
}

struct PackJob {
    inner: Arc<Inner>,
    slot: u32,
    load: PackLoad,
}

/// A fixed budget of cache lines over files and pack entries. Cheap to clone (shared); `Send + Sync`.
#[derive(Clone)]
pub struct PageCache {
    inner: Arc<Inner>,
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
struct Backoff {
    n: u32,
    start: Option<Instant>,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { n: 0, start: None }
    }
    fn wait(&mut self, what: &str) -> Result<()> {
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
            }),
        })
    }

    /// The engine the cache issues its I/O on.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    fn attach(&self, backing: Backing, len: u64, writable: bool) -> Result<SourceId> {
        let lines = len.div_ceil(self.inner.line_bytes as u64);
        if lines > SOURCE_LINES_MAX {
            return Err(Error::invalid(format!(
                "source of {len} bytes has {lines} lines; the limit is {SOURCE_LINES_MAX}"
            )));
        }
        let mut next = self.inner.next_source.lock();
        if *next as usize >= SOURCES_MAX {
            return Err(Error::invalid(format!(
                "a cache takes at most {SOURCES_MAX} sources"
            )));
        }
        let table: Box<[AtomicU32]> = (0..lines).map(|_| AtomicU32::new(0)).collect();
        let id = *next;
        let _ = self.inner.sources[id as usize].set(Arc::new(Source {
            backing,
            len,
            writable,
            table,
        }));
        *next += 1;
        Ok(SourceId(id))
    }

    /// Attaches a file; writable through the cache iff the file was opened for writing. Its length
    /// is taken now and does not change (the cache never extends a file).
    pub fn attach_file(&self, file: &File) -> Result<SourceId> {
        let len = file.len()?;
        self.attach(Backing::File(file.clone()), len, file.is_writable())
    }

    /// Attaches a pack entry (read-only).
    pub fn attach_entry(&self, entry: &Entry) -> Result<SourceId> {
        self.attach(Backing::Entry(entry.clone()), entry.len(), false)
    }

    fn source(&self, src: SourceId) -> Result<&Arc<Source>> {
        self.inner
            .sources
            .get(src.0 as usize)
            .and_then(|s| s.get())
            .ok_or_else(|| Error::invalid(format!("source {} is not attached", src.0)))
    }

    /// The source's length in bytes (0 for an unknown source).
    pub fn len(&self, src: SourceId) -> u64 {
        self.source(src).map_or(0, |s| s.len)
    }

    /// Whether writes through the cache are allowed on `src`.
    pub fn is_writable(&self, src: SourceId) -> bool {
        self.source(src).is_ok_and(|s| s.writable)
    }

    pub fn line_bytes(&self) -> usize {
        self.inner.line_bytes
    }
    pub fn capacity_lines(&self) -> usize {
        self.inner.slots.len()
    }

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
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }

    /// The state of the line holding `offset` of `src`, if that line is in the cache (diagnostics
    /// and tests).
    pub fn resident_state(&self, src: SourceId, offset: u64) -> Option<LineState> {
        let s = self.source(src).ok()?;
        let line = offset >> self.inner.line_shift;
        let e = s.table.get(line as usize)?.load(Ordering::Acquire);
        if e == 0 {
            return None;
        }
        let slot = &self.inner.slots[e as usize - 1];
        (slot.tag.load(Ordering::Acquire) == make_tag(src.0, line))
            .then(|| line::state(slot.word.load(Ordering::Acquire)))
    }

    fn check_range(&self, s: &Source, src: SourceId, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > s.len) {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "source {} is {} bytes: cannot access {len} bytes at offset {offset}",
                    src.0, s.len
                ),
            )
            .with_range(offset, len));
        }
        Ok(())
    }

    /// Copies `[offset, offset + out.len())` of `src` into `out`, loading missing lines (blocking).
    /// `UnexpectedEof` if the range passes the end of the source.
    pub fn read(&self, src: SourceId, offset: u64, out: &mut [u8]) -> Result<()> {
        let s = self.source(src)?;
        self.check_range(s, src, offset, out.len() as u64)?;
        let shard = &self.inner.shards[shard_index()];
        shard
            .bytes_requested
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        let lb = self.inner.line_bytes;
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let line = pos >> self.inner.line_shift;
            let off = (pos & (lb as u64 - 1)) as usize;
            let n = (lb - off).min(out.len() - done);
            if self.try_hit_copy(s, src.0, line, off, &mut out[done..done + n]) {
                shard.hits.fetch_add(1, Ordering::Relaxed);
                done += n;
                continue;
            }
            // A miss: gather the rest in one go (it counts its own accesses).
            let rest = (out.len() - done) as u64;
            let g = self.gather_inner(src, s, &[(pos, rest as usize)], false, Vec::new())?;
            let r = g.wait()?;
            r.copy_to(0, &mut out[done..]);
            return Ok(());
        }
        Ok(())
    }

    /// The hit path: if `line` of `src` is resident and readable right now, pins it, runs `read` on
    /// the address of its bytes, marks it recently used, unpins it and returns `true`.
    #[inline]
    fn with_resident(&self, s: &Source, src: u32, line: u64, read: impl FnOnce(*const u8)) -> bool {
        let Some(e) = s.table.get(line as usize) else {
            return false;
        };
        let e = e.load(Ordering::Acquire);
        if e == 0 {
            return false;
        }
        let slot = &self.inner.slots[e as usize - 1];
        let seen = line::pin(&slot.word);
        let ok = line::readable(seen) && slot.tag.load(Ordering::Acquire) == make_tag(src, line);
        if ok {
            read(slot.ptr.load(Ordering::Acquire).cast_const());
            line::touch(&slot.word, seen);
        }
        line::unpin(&slot.word);
        ok
    }

    /// Copies `out.len()` bytes at `off` of a resident line (see [`Self::with_resident`]).
    #[inline]
    fn try_hit_copy(&self, s: &Source, src: u32, line: u64, off: usize, out: &mut [u8]) -> bool {
        self.with_resident(s, src, line, |p| {
            // SAFETY: the slot is pinned and readable (no writer, not Busy), so its buffer lives and
            // nobody writes it; off + out.len() <= line_bytes by construction.
            unsafe { std::ptr::copy_nonoverlapping(p.add(off), out.as_mut_ptr(), out.len()) };
        })
    }

    /// Writes `data` at `offset` of `src` into the cache (write-back: lines become Modified and reach
    /// the source on eviction or [`flush`](Self::flush)). The range must lie within the source
    /// (`InvalidInput` otherwise); `PermissionDenied` on read-only sources. Lines written whole are
    /// not read first.
    pub fn write(&self, src: SourceId, offset: u64, data: &[u8]) -> Result<()> {
        let s = self.source(src)?;
        if !s.writable {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("source {} is read-only", src.0),
            )
            .with_range(offset, data.len() as u64));
        }
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > s.len)
        {
            return Err(Error::invalid(format!(
                "write of {} bytes at offset {offset} passes the end of source {} ({} bytes): the cache never extends a source",
                data.len(),
                src.0,
                s.len
            )));
        }
        let lb = self.inner.line_bytes;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let line = pos >> self.inner.line_shift;
            let off = (pos & (lb as u64 - 1)) as usize;
            let n = (lb - off).min(data.len() - done);
            self.write_line(s, src, line, off, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_line(
        &self,
        s: &Arc<Source>,
        src: SourceId,
        line: u64,
        off: usize,
        data: &[u8],
    ) -> Result<()> {
        let inner = &*self.inner;
        let want = make_tag(src.0, line);
        let whole = off == 0 && data.len() == s.line_len(line, inner.line_bytes);
        let shard = &inner.shards[shard_index()];
        let mut backoff = Backoff::new();
        let mut counted = false;
        loop {
            let pte = &s.table[line as usize];
            let e = pte.load(Ordering::Acquire);
            if e != 0 {
                let slot = &inner.slots[e as usize - 1];
                let seen = line::pin(&slot.word);
                if slot.tag.load(Ordering::Acquire) == want
                    && line::readable(seen)
                    && line::try_begin_write(&slot.word)
                {
                    {
                        // Readers that pinned before WRITER was set finish their copy; new ones
                        // back off. Both take nanoseconds, unless a reader's thread is descheduled.
                        let mut spins = 0u32;
                        while !line::writer_alone(&slot.word) {
                            spins += 1;
                            if spins < 64 {
                                std::hint::spin_loop();
                            } else {
                                std::thread::yield_now();
                            }
                        }
                        let p = slot.ptr.load(Ordering::Acquire);
                        // SAFETY: we hold WRITER and the only pin: nobody else reads or writes the
                        // bytes, and the buffer lives; off + len <= line_bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(off), data.len())
                        };
                        line::end_write(&slot.word);
                        if !counted {
                            shard.hits.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(());
                    }
                }
                line::unpin(&slot.word);
                backoff.wait("write to a cache line")?;
                continue;
            }
            if !counted {
                shard.misses.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            if whole {
                // No need to read what is overwritten whole: take a slot and fill it.
                let mut ctx = IssueCtx::new(&self.inner, s, src);
                let i = self.allocate(&mut ctx)?;
                let slot = &inner.slots[i];
                slot.tag.store(want, Ordering::Release);
                if pte
                    .compare_exchange(0, i as u32 + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let p = slot_buffer(&self.inner, slot)?;
                    // SAFETY: the slot is Busy and ours; the buffer is line_bytes long.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                    line::publish(&slot.word, LineState::Modified, true);
                    return Ok(());
                }
                slot.tag.store(0, Ordering::Release);
                line::publish(&slot.word, LineState::Invalid, false);
                continue;
            }
            // Read-modify-write: load the line, then write it as a hit.
            let g = self.load_lines(src, s, &[line])?;
            g.wait()?;
        }
    }

    /// Starts loading many small ranges; returns at once with the misses in flight. Resident lines
    /// are copied now; ranges are grouped by line so that each line is loaded at most once; a line
    /// already being loaded (by anyone) is joined. `UnexpectedEof` if a range passes the end.
    ///
    /// A gather that needs more distinct missing lines than the cache has free waits, while issuing,
    /// for its own earlier loads to finish (each line's bytes are copied out as its load completes,
    /// so lines are not held while a `Gather` is pending).
    pub fn gather(&self, src: SourceId, ranges: &[(u64, usize)]) -> Result<Gather> {
        self.gather_into(src, ranges, Vec::new())
    }

    /// [`gather`](Self::gather) into `buf`'s memory: pass the bytes of an earlier result
    /// ([`GatherResult::into_bytes`]) so that a loop of gathers does not fault in fresh pages for
    /// every batch (measured: ~10 % of a BFS's CPU time).
    pub fn gather_into(
        &self,
        src: SourceId,
        ranges: &[(u64, usize)],
        buf: Vec<u8>,
    ) -> Result<Gather> {
        let s = self.source(src)?;
        self.gather_inner(src, s, ranges, true, buf)
    }

    /// Starts loading `[offset, offset + len)` into the cache (clamped to the source's end), without
    /// copying anything out; the returned `Gather` has no ranges.
    pub fn prefetch(&self, src: SourceId, offset: u64, len: u64) -> Result<Gather> {
        let s = self.source(src)?;
        let end = offset.saturating_add(len).min(s.len);
        if offset >= end {
            return Ok(Gather::ready(Vec::new(), vec![0]));
        }
        let first = offset >> self.inner.line_shift;
        let last = (end - 1) >> self.inner.line_shift;
        let lines: Vec<u64> = (first..=last).collect();
        self.load_lines(src, s, &lines)
    }

    fn load_lines(&self, src: SourceId, s: &Arc<Source>, lines: &[u64]) -> Result<Gather> {
        let shared = GatherShared::new(Vec::new(), vec![0]);
        let mut ctx = IssueCtx::new(&self.inner, s, src);
        let shard = &self.inner.shards[shard_index()];
        for &line in lines {
            self.request_line(&mut ctx, &shared, line, &[], shard)?;
        }
        ctx.commit()?;
        shared.issued();
        Ok(Gather { shared })
    }

    fn gather_inner(
        &self,
        src: SourceId,
        s: &Arc<Source>,
        ranges: &[(u64, usize)],
        count_bytes: bool,
        mut buf: Vec<u8>,
    ) -> Result<Gather> {
        let lb = self.inner.line_bytes;
        let mut bounds = Vec::with_capacity(ranges.len() + 1);
        let mut total = 0usize;
        bounds.push(0);
        for &(off, len) in ranges {
            self.check_range(s, src, off, len as u64)?;
            total = total
                .checked_add(len)
                .ok_or_else(|| Error::invalid("gather ranges overflow"))?;
            bounds.push(total);
        }
        let shard = &self.inner.shards[shard_index()];
        if count_bytes {
            shard
                .bytes_requested
                .fetch_add(total as u64, Ordering::Relaxed);
        }
        // Cut into per-line pieces, sorted by line (dedupe).
        let mut pieces: Vec<(u64, Piece)> = Vec::with_capacity(ranges.len());
        for (i, &(off, len)) in ranges.iter().enumerate() {
            let mut done = 0usize;
            while done < len {
                let pos = off + done as u64;
                let line = pos >> self.inner.line_shift;
                let loff = (pos & (lb as u64 - 1)) as usize;
                let n = (lb - loff).min(len - done);
                pieces.push((
                    line,
                    Piece {
                        line_off: loff as u32,
                        out_off: bounds[i] + done,
                        len: n as u32,
                    },
                ));
                done += n;
            }
        }
        pieces.sort_unstable_by_key(|p| p.0);
        // Pass 1: hits straight into the buffer, before it is shared.
        // Every byte of `buf[..total]` is written by exactly one piece before the gather completes,
        // so reused bytes need no zeroing; only growth is zeroed.
        if buf.len() >= total {
            buf.truncate(total);
        } else {
            buf.resize(total, 0);
        }
        let mut missing: Vec<(u64, Vec<Piece>)> = Vec::new();
        let mut i = 0;
        while i < pieces.len() {
            let line = pieces[i].0;
            let mut j = i;
            while j < pieces.len() && pieces[j].0 == line {
                j += 1;
            }
            if self.try_hit_pieces(s, src.0, line, &pieces[i..j], &mut buf) {
                shard.hits.fetch_add(1, Ordering::Relaxed);
            } else {
                missing.push((line, pieces[i..j].iter().map(|p| p.1).collect()));
            }
            i = j;
        }
        let shared = GatherShared::new(buf, bounds);
        if !missing.is_empty() {
            let mut ctx = IssueCtx::new(&self.inner, s, src);
            for (line, ps) in &missing {
                if let Err(e) = self.request_line(&mut ctx, &shared, *line, ps, shard) {
                    // Loads already issued finish on their own; the gather reports the error.
                    let _ = ctx.commit();
                    shared.fail(e.clone());
                    shared.issued();
                    return Err(e);
                }
            }
            ctx.commit()?;
        }
        shared.issued();
        Ok(Gather { shared })
    }

    fn try_hit_pieces(
        &self,
        s: &Source,
        src: u32,
        line: u64,
        pieces: &[(u64, Piece)],
        out: &mut [u8],
    ) -> bool {
        self.with_resident(s, src, line, |p| {
            for (_, pc) in pieces {
                let dst = &mut out[pc.out_off..pc.out_off + pc.len as usize];
                // SAFETY: pinned and readable, as in try_hit_copy; the piece lies within the line.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        p.add(pc.line_off as usize),
                        dst.as_mut_ptr(),
                        dst.len(),
                    )
                };
            }
        })
    }

    /// Serves, joins or issues one line for a pending gather.
    fn request_line(
        &self,
        ctx: &mut IssueCtx<'_>,
        shared: &Arc<GatherShared>,
        line: u64,
        pieces: &[Piece],
        shard: &Shard,
    ) -> Result<()> {
        let inner = &*self.inner;
        let s = ctx.source;
        let want = make_tag(ctx.src.0, line);
        let pte = &s.table[line as usize];
        let mut backoff = Backoff::new();
        loop {
            let e = pte.load(Ordering::Acquire);
            if e != 0 {
                let slot = &inner.slots[e as usize - 1];
                let seen = line::pin(&slot.word);
                let tag_ok = slot.tag.load(Ordering::Acquire) == want;
                if tag_ok && line::readable(seen) {
                    let p = slot.ptr.load(Ordering::Acquire);
                    shared.copy_from(p, pieces);
                    line::touch(&slot.word, seen);
                    line::unpin(&slot.word);
                    shard.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if tag_ok && line::state(seen) == LineState::Busy {
                    let mut l = slot.loading.lock();
                    if let Some(ld) = l.as_mut().filter(|ld| ld.tag == want) {
                        shared.add_pending();
                        ld.consumers.push(Consumer {
                            gather: shared.clone(),
                            pieces: pieces.to_vec(),
                        });
                        drop(l);
                        line::unpin(&slot.word);
                        shard.misses.fetch_add(1, Ordering::Relaxed);
                        inner.counters.joined.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                }
                line::unpin(&slot.word);
                // Busy with something else (write-back, reassignment) or stale: wait and look again.
                ctx.commit()?;
                backoff.wait("read of a cache line")?;
                continue;
            }
            let i = self.allocate(ctx)?;
            let slot = &inner.slots[i];
            slot.tag.store(want, Ordering::Release);
            shared.add_pending();
            *slot.loading.lock() = Some(Loading {
                tag: want,
                consumers: vec![Consumer {
                    gather: shared.clone(),
                    pieces: pieces.to_vec(),
                }],
            });
            if pte
                .compare_exchange(0, i as u32 + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                shard.misses.fetch_add(1, Ordering::Relaxed);
                ctx.add_load(i as u32, line)?;
                return Ok(());
            }
            // Someone else started this line first: give the slot back and join theirs.
            *slot.loading.lock() = None;
            shared.sub_pending();
            slot.tag.store(0, Ordering::Release);
            line::publish(&slot.word, LineState::Invalid, false);
        }
    }

    /// The clock: claims a slot (Busy, ours), writing back a Modified victim first and unmapping it.
    fn allocate(&self, ctx: &mut IssueCtx<'_>) -> Result<usize> {
        let inner = &*self.inner;
        let n = inner.slots.len();
        let mut backoff = Backoff::new();
        loop {
            let mut held = 0usize;
            let mut wb_err: Option<Error> = None;
            for _ in 0..2 * n + 2 {
                let i = inner.hand.fetch_add(1, Ordering::Relaxed) % n;
                let slot = &inner.slots[i];
                let w = slot.word.load(Ordering::Acquire);
                if !line::claimable(w) {
                    if line::held(w) > 0 && line::active(w) == 0 {
                        held += 1;
                    }
                    continue;
                }
                if w & line::REF != 0 {
                    line::clear_ref(&slot.word);
                    continue;
                }
                let Some(prev) = line::try_claim(&slot.word) else {
                    continue;
                };
                if prev == LineState::Modified {
                    if let Err(e) = self.write_back_one(i) {
                        self.record_wb_error(&e);
                        self.write_back_failed(i);
                        wb_err = Some(e);
                        continue;
                    }
                }
                let old = slot.tag.load(Ordering::Acquire);
                if old != 0 {
                    let (osrc, oline) = tag_parts(old);
                    if let Some(os) = inner.sources[osrc as usize].get() {
                        let _ = os.table[oline as usize].compare_exchange(
                            i as u32 + 1,
                            0,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                    if prev != LineState::Invalid {
                        inner.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    slot.tag.store(0, Ordering::Release);
                }
                return Ok(i);
            }
            if let Some(e) = wb_err {
                return Err(e.with_kind(ErrorKind::Io));
            }
            if held >= n {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!("all {n} lines are pinned"),
                ));
            }
            // Lines are busy (loads or write-backs in flight): let ours go, then wait for some.
            ctx.commit()?;
            backoff.wait("cache allocation")?;
        }
    }

    /// A write-back of slot `i` (Busy, ours) failed: the line stays Modified — unless its buffer was
    /// lost with a command buffer the engine refused, when its bytes are gone and it is dropped.
    fn write_back_failed(&self, i: usize) {
        let slot = &self.inner.slots[i];
        if slot.buf.lock().is_some() {
            line::publish(&slot.word, LineState::Modified, false);
            return;
        }
        let tag = slot.tag.load(Ordering::Acquire);
        if tag != 0 {
            let (sid, line) = tag_parts(tag);
            if let Some(s) = self.inner.sources[sid as usize].get() {
                let _ = s.table[line as usize].compare_exchange(
                    i as u32 + 1,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        slot.tag.store(0, Ordering::Release);
        line::publish(&slot.word, LineState::Invalid, false);
    }

    fn record_wb_error(&self, e: &Error) {
        let mut g = self.inner.wb_errors.lock();
        if g.0.is_none() {
            g.0 = Some(e.clone());
        }
        g.1 += 1;
    }

    /// Writes back one slot we hold Busy (blocking). The buffer comes back on failure too.
    fn write_back_one(&self, i: usize) -> Result<()> {
        self.write_back_many(&[i]).pop().unwrap_or(Ok(()))
    }

    /// Writes back the given slots (each Busy and ours), in command buffers of up to 64 stores.
    fn write_back_many(&self, slots: &[usize]) -> Vec<Result<()>> {
        let inner = &*self.inner;
        let mut results = Vec::with_capacity(slots.len());
        for chunk in slots.chunks(64) {
            let mut cb = inner.wb_queue.command_buffer();
            let mut ids: Vec<Option<Result<CommandId>>> = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let slot = &inner.slots[i];
                let (sid, line) = tag_parts(slot.tag.load(Ordering::Acquire));
                let r = (|| {
                    let s = inner.sources[sid as usize]
                        .get()
                        .ok_or_else(|| Error::invalid("write-back of a line with no source"))?;
                    let Backing::File(f) = &s.backing else {
                        return Err(Error::invalid("write-back to a read-only source"));
                    };
                    slot_buffer(&self.inner, slot)?;
                    let buf = slot.buf.lock().take().expect("buffer ensured");
                    let len = s.line_len(line, inner.line_bytes);
                    cb.store_range(f, line * inner.line_bytes as u64, buf, 0, len as u64)
                })();
                ids.push(Some(r));
            }
            let n_ok = ids.iter().filter(|r| matches!(r, Some(Ok(_)))).count();
            inner
                .counters
                .writes_issued
                .fetch_add(n_ok as u64, Ordering::Relaxed);
            let (status, mut fin, commit_err) = if cb.is_empty() {
                (Status::Complete, Finished::default(), None)
            } else {
                match cb.commit() {
                    Ok(c) => {
                        let (st, fin) = c.wait_parts();
                        (st, fin, None)
                    }
                    Err(e) => (Status::Complete, Finished::default(), Some(e)),
                }
            };
            for (k, &i) in chunk.iter().enumerate() {
                let r = match ids[k].take().expect("one result per slot") {
                    Err(e) => Err(e),
                    Ok(id) => {
                        if let Some(b) = fin.take_buffer(id) {
                            let mut b = b.into_owned();
                            if let Ok(b) = b.as_mut() {
                                self.inner.slots[i]
                                    .ptr
                                    .store(b.as_mut_ptr(), Ordering::Release);
                            }
                            *self.inner.slots[i].buf.lock() = b.ok();
                        }
                        match &commit_err {
                            Some(e) => Err(e.clone()),
                            None => command_result(&status, id),
                        }
                    }
                };
                results.push(r);
            }
        }
        results
    }

    /// Writes back every Modified line (and with `fsync`, `fdatasync`s every writable file source).
    /// Returns the first error of this flush, or else of a write-back that failed since the last
    /// flush (an eviction's): failed lines stay Modified and the next flush tries them again.
    pub fn flush(&self, fsync: bool) -> Result<()> {
        self.flush_filter(None, fsync)
    }

    /// Like [`flush`](Self::flush), for one source only (earlier eviction errors are reported too).
    pub fn flush_source(&self, src: SourceId, fsync: bool) -> Result<()> {
        self.source(src)?;
        self.flush_filter(Some(src.0), fsync)
    }

    fn flush_filter(&self, only: Option<u32>, fsync: bool) -> Result<()> {
        let inner = &*self.inner;
        let mut first: Option<Error> = None;
        let mut backoff = Backoff::new();
        let matches = |slot: &Slot| {
            let t = slot.tag.load(Ordering::Acquire);
            t != 0 && only.is_none_or(|s| tag_parts(t).0 == s)
        };
        let mut pending: Vec<usize> = (0..inner.slots.len())
            .filter(|&i| {
                let s = &inner.slots[i];
                line::state(s.word.load(Ordering::Acquire)) == LineState::Modified && matches(s)
            })
            .collect();
        while !pending.is_empty() {
            let mut claimed = Vec::new();
            let mut later = Vec::new();
            for &i in &pending {
                let slot = &inner.slots[i];
                let w = slot.word.load(Ordering::Acquire);
                if line::state(w) != LineState::Modified || !matches(slot) {
                    continue; // written back or evicted meanwhile
                }
                if line::try_claim_writeback(&slot.word) {
                    claimed.push(i);
                } else {
                    later.push(i);
                }
            }
            let results = self.write_back_many(&claimed);
            for (&i, r) in claimed.iter().zip(results) {
                let slot = &inner.slots[i];
                match r {
                    Ok(()) => line::publish(&slot.word, LineState::Ready, false),
                    Err(e) => {
                        self.write_back_failed(i);
                        first.get_or_insert(e);
                    }
                }
            }
            pending = later;
            if !pending.is_empty() {
                backoff.wait("flush of a cache line")?;
            }
        }
        let earlier = std::mem::take(&mut *inner.wb_errors.lock());
        if let (None, Some(e)) = (&first, earlier.0) {
            first = Some(Error::new(
                e.kind(),
                format!(
                    "{} write-back(s) failed since the last flush; first: {e}",
                    earlier.1
                ),
            ));
        }
        if fsync && first.is_none() {
            let mut cb = inner.wb_queue.command_buffer();
            for (k, s) in inner.sources.iter().enumerate() {
                let Some(s) = s.get() else { break };
                if only.is_some_and(|o| o as usize != k) || !s.writable {
                    continue;
                }
                if let Backing::File(f) = &s.backing {
                    cb.sync(f)?;
                }
            }
            if !cb.is_empty() {
                cb.commit()?.finish()?;
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Keeps the lines of `[offset, offset + len)` resident until the returned guard is dropped
    /// (loading them if needed). The clock never takes a held line; a cache whose lines are all held
    /// fails further misses with `WouldBlock`.
    pub fn pin(&self, src: SourceId, offset: u64, len: u64) -> Result<PinnedLines> {
        let s = self.source(src)?.clone();
        self.check_range(&s, src, offset, len)?;
        let mut guard = PinnedLines {
            cache: self.clone(),
            slots: Vec::new(),
        };
        if len == 0 {
            return Ok(guard);
        }
        let first = offset >> self.inner.line_shift;
        let last = (offset + len - 1) >> self.inner.line_shift;
        for line in first..=last {
            let want = make_tag(src.0, line);
            let mut tries = 0;
            loop {
                let e = s.table[line as usize].load(Ordering::Acquire);
                if e != 0 {
                    let slot = &self.inner.slots[e as usize - 1];
                    let seen = line::pin(&slot.word);
                    if line::readable(seen) && slot.tag.load(Ordering::Acquire) == want {
                        line::hold(&slot.word);
                        line::unpin(&slot.word);
                        guard.slots.push(e - 1);
                        break;
                    }
                    line::unpin(&slot.word);
                }
                tries += 1;
                if tries > 1000 {
                    return Err(Error::new(
                        ErrorKind::WouldBlock,
                        "line was evicted before it could be held, 1000 times",
                    ));
                }
                self.load_lines(src, &s, &[line])?.wait()?;
            }
        }
        Ok(guard)
    }

    fn pack_sender(&self) -> &crossbeam_channel::Sender<PackJob> {
        self.inner.pack_tx.get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<PackJob>();
            std::thread::Builder::new()
                .name("gpuio-cache-pack".into())
                .spawn(move || {
                    for job in rx {
                        let (r, buf) = job.load.wait_parts();
                        finish_line(&job.inner, job.slot, r, buf);
                    }
                })
                .expect("spawn the pack completion thread");
            tx
        })
    }
}

/// The result of one command of a finished command buffer.
fn command_result(status: &Status, id: CommandId) -> Result<()> {
    match status {
        Status::Complete | Status::Pending => Ok(()),
        Status::Cancelled => Err(Error::new(ErrorKind::Cancelled, "command buffer cancelled")),
        Status::Error(list) => match list.iter().find(|e| e.command == id) {
            Some(e) => Err(e.error.clone()),
            None => Ok(()),
        },
    }
}

/// Records loads and commits them in command buffers of `loads_per_cb` reads. Adjacent missing lines
/// of a file are collected into a run and read together (see [`CacheConfig::coalesce_bytes`]).
struct IssueCtx<'a> {
    inner: &'a Arc<Inner>,
    source: &'a Arc<Source>,
    src: SourceId,
    cb: Option<CommandBuffer>,
    issued: Vec<Issued>,
    /// Adjacent lines waiting to be read together: (slot, line), lines ascending by one.
    run: Vec<(u32, u64)>,
}

/// A read recorded in the current command buffer.
enum Issued {
    /// One line read straight into its slot's buffer.
    Line(u32, CommandId),
    /// Adjacent lines read into one bounce buffer: their slots and lengths, in file order.
    Run(CommandId, Vec<(u32, u32)>),
}

impl Issued {
    fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        let (one, many) = match self {
            Issued::Line(i, _) => (Some(*i), &[][..]),
            Issued::Run(_, lines) => (None, &lines[..]),
        };
        one.into_iter().chain(many.iter().map(|&(i, _)| i))
    }
}

impl<'a> IssueCtx<'a> {
    fn new(inner: &'a Arc<Inner>, source: &'a Arc<Source>, src: SourceId) -> IssueCtx<'a> {
        IssueCtx {
            inner,
            source,
            src,
            cb: None,
            issued: Vec::new(),
            run: Vec::new(),
        }
    }

    /// Issues a load of `line` into slot `i` (Busy, ours, tag and page table set) — now, or with
    /// the next lines when they follow it.
    fn add_load(&mut self, i: u32, line: u64) -> Result<()> {
        if self.inner.run_lines_max <= 1 || !matches!(self.source.backing, Backing::File(_)) {
            return self.load_line(i, line);
        }
        if let Some(&(_, last)) = self.run.last() {
            if line == last + 1 && self.run.len() < self.inner.run_lines_max {
                self.run.push((i, line));
                return Ok(());
            }
            if let Err(e) = self.flush_run() {
                finish_line(self.inner, i, Err(e.clone()), None);
                return Err(e);
            }
        }
        self.run.push((i, line));
        Ok(())
    }

    /// Issues the run collected so far.
    fn flush_run(&mut self) -> Result<()> {
        let run = std::mem::take(&mut self.run);
        match run.len() {
            0 => Ok(()),
            1 => self.load_line(run[0].0, run[0].1),
            _ => self.load_run(run),
        }
    }

    /// Reads adjacent lines with one read into a bounce buffer; [`Batch::finish`] copies each line
    /// into its slot. With every bounce buffer in flight, the reads recorded so far are committed
    /// and this waits (at most [`BUSY_WAIT_MAX`]) for one to come back: back-pressure, like a gather
    /// that needs more lines than are free. (Reading the run line by line instead was measured: a
    /// BFS level then issued almost every run as single lines, and coalescing bought nothing.)
    fn load_run(&mut self, run: Vec<(u32, u64)>) -> Result<()> {
        let inner = self.inner;
        let Backing::File(file) = &self.source.backing else {
            unreachable!("only file lines are collected into runs")
        };
        let pool = inner
            .bounce
            .as_ref()
            .expect("runs are collected only with bounce buffers");
        let bounce = match pool.try_get() {
            Ok(b) => Ok(b),
            Err(_) => self
                .commit_issued()
                .and_then(|()| pool.get_timeout(BUSY_WAIT_MAX)),
        };
        let bounce = match bounce {
            Ok(b) => b,
            Err(e) => {
                // Lines not issued must not stay Busy.
                fail_lines(inner, run.iter().map(|r| r.0), &e);
                return Err(e);
            }
        };
        // The lines keep their own buffers (the bytes are copied in); a buffer lost with a refused
        // command buffer is replaced now.
        for &(i, _) in &run {
            if let Err(e) = slot_buffer(inner, &inner.slots[i as usize]) {
                fail_lines(inner, run.iter().map(|r| r.0), &e);
                return Err(e);
            }
        }
        let lines: Vec<(u32, u32)> = run
            .iter()
            .map(|&(i, line)| (i, self.source.line_len(line, inner.line_bytes) as u32))
            .collect();
        let total: u64 = lines.iter().map(|&(_, n)| n as u64).sum();
        let offset = run[0].1 * inner.line_bytes as u64;
        let c = &inner.counters;
        c.reads_issued.fetch_add(1, Ordering::Relaxed);
        c.lines_loaded
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        c.bytes_read.fetch_add(total, Ordering::Relaxed);
        let cb = self.cb.get_or_insert_with(|| inner.queue.command_buffer());
        match cb.load_range(file, offset, bounce, 0, total, true) {
            Ok(id) => self.issued.push(Issued::Run(id, lines)),
            Err(e) => fail_lines(inner, lines.iter().map(|l| l.0), &e),
        }
        self.commit_if_full()
    }

    /// Reads one line straight into its slot's buffer.
    fn load_line(&mut self, i: u32, line: u64) -> Result<()> {
        let inner = self.inner;
        let slot = &inner.slots[i as usize];
        let len = self.source.line_len(line, inner.line_bytes);
        let offset = line * inner.line_bytes as u64;
        let buf = {
            let mut b = slot.buf.lock();
            match b.take() {
                Some(b) => b,
                None => {
                    let mut nb = AlignedBuf::new_in(
                        &inner.engine.config().memory_budget,
                        inner.line_bytes,
                        inner.align,
                        Wait::No,
                    )
                    .inspect_err(|e| finish_line(inner, i, Err(e.clone()), None))?;
                    slot.ptr.store(nb.as_mut_ptr(), Ordering::Release);
                    nb
                }
            }
        };
        let c = &inner.counters;
        c.reads_issued.fetch_add(1, Ordering::Relaxed);
        c.lines_loaded.fetch_add(1, Ordering::Relaxed);
        c.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        match &self.source.backing {
            Backing::Entry(entry) => {
                match entry.load_range(&inner.queue, offset, buf, 0, len as u64) {
                    Ok(load) => {
                        let tx = PageCache {
                            inner: inner.clone(),
                        };
                        let job = PackJob {
                            inner: inner.clone(),
                            slot: i,
                            load,
                        };
                        if let Err(e) = tx.pack_sender().send(job) {
                            let job = e.into_inner();
                            let (r, b) = job.load.wait_parts();
                            finish_line(inner, i, r, b);
                        }
                    }
                    Err(e) => finish_line(inner, i, Err(e), None),
                }
                Ok(())
            }
            Backing::File(file) => {
                let cb = self.cb.get_or_insert_with(|| inner.queue.command_buffer());
                match cb.load_range(file, offset, buf, 0, len as u64, true) {
                    Ok(id) => self.issued.push(Issued::Line(i, id)),
                    Err(e) => finish_line(inner, i, Err(e), None),
                }
                self.commit_if_full()
            }
        }
    }

    fn commit_if_full(&mut self) -> Result<()> {
        if self.issued.len() >= self.inner.loads_per_cb {
            self.commit_issued()?;
        }
        Ok(())
    }

    /// Commits every load recorded so far, the pending run included.
    fn commit(&mut self) -> Result<()> {
        self.flush_run()?;
        self.commit_issued()
    }

    fn commit_issued(&mut self) -> Result<()> {
        let Some(mut cb) = self.cb.take() else {
            return Ok(());
        };
        let issued = std::mem::take(&mut self.issued);
        if issued.is_empty() {
            return Ok(());
        }
        let batch = Arc::new(Batch {
            inner: self.inner.clone(),
            issued,
            cell: Mutex::new(Cell2::Empty),
        });
        let b2 = batch.clone();
        cb.on_complete(move |_| {
            let mut c = b2.cell.lock();
            match std::mem::replace(&mut *c, Cell2::Finished) {
                Cell2::Holding(comp) => {
                    drop(c);
                    b2.finish(comp);
                }
                _ => *c = Cell2::Done,
            }
        });
        match cb.commit() {
            Ok(comp) => {
                let mut c = batch.cell.lock();
                match *c {
                    Cell2::Done => {
                        *c = Cell2::Finished;
                        drop(c);
                        batch.finish(comp);
                    }
                    _ => *c = Cell2::Holding(comp),
                }
                Ok(())
            }
            Err(e) => {
                // The buffers went with the command buffer: the slots get new ones when next used.
                fail_lines(
                    &batch.inner,
                    batch.issued.iter().flat_map(Issued::slots),
                    &e,
                );
                Err(e)
            }
        }
    }
}

impl Drop for IssueCtx<'_> {
    fn drop(&mut self) {
        // Every recorded load must be committed or failed, or its line would stay Busy.
        // Errors here were already given to the lines' consumers by whoever failed.
        if !self.run.is_empty() || (self.cb.is_some() && !self.issued.is_empty()) {
            let _ = self.flush_run();
            let _ = self.commit_issued();
        }
    }
}

enum Cell2 {
    Empty,
    Holding(Completion),
    Done,
    Finished,
}

/// One committed command buffer of loads.
struct Batch {
    inner: Arc<Inner>,
    issued: Vec<Issued>,
    cell: Mutex<Cell2>,
}

impl Batch {
    fn finish(&self, comp: Completion) {
        let (status, mut fin) = comp.wait_parts();
        let inner = &*self.inner;
        for it in &self.issued {
            match it {
                Issued::Line(i, id) => {
                    let buf = fin.take_buffer(*id);
                    finish_line(inner, *i, command_result(&status, *id), buf);
                }
                Issued::Run(id, lines) => {
                    let r = command_result(&status, *id);
                    let bounce = fin.take_buffer(*id);
                    let r = match (r, &bounce) {
                        (Ok(()), None) => Err(Error::new(
                            ErrorKind::Io,
                            "a coalesced read's buffer did not come back from the engine",
                        )),
                        (r, _) => r,
                    };
                    let mut from = bounce.as_ref().map(|b| b.as_aligned().as_ptr());
                    for &(i, len) in lines {
                        if let (Ok(()), Some(p)) = (&r, from) {
                            let slot = &inner.slots[i as usize];
                            // SAFETY: the slot is Busy and ours, its buffer (line_bytes ≥ len) was
                            // made sure of before the read; the bounce buffer holds every line of
                            // the run back to back, `len` bytes of this one at `p`.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    p,
                                    slot.ptr.load(Ordering::Acquire),
                                    len as usize,
                                );
                                from = Some(p.add(len as usize));
                            }
                        }
                        finish_line(inner, i, r.clone(), None);
                    }
                    // The bounce buffer goes back to its pool when `bounce` drops here.
                }
            }
        }
    }
}

/// Fails the loads of these slots (Busy, ours): each line becomes Invalid, its waiters get `e`.
fn fail_lines(inner: &Inner, slots: impl Iterator<Item = u32>, e: &Error) {
    for i in slots {
        finish_line(inner, i, Err(e.clone()), None);
    }
}

/// Makes sure the slot (Busy, ours) has its buffer; returns the bytes' address.
fn slot_buffer(inner: &Inner, slot: &Slot) -> Result<*mut u8> {
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

/// A load of slot `i` ended: the buffer goes back to the slot, every consumer gets its bytes (or
/// the error), and the line becomes Ready — or Invalid and unmapped on failure.
fn finish_line(inner: &Inner, i: u32, r: Result<()>, buf: Option<IoBuffer>) {
    let slot = &inner.slots[i as usize];
    if let Some(b) = buf {
        if let Ok(mut b) = b.into_owned() {
            slot.ptr.store(b.as_mut_ptr(), Ordering::Release);
            *slot.buf.lock() = Some(b);
        }
    }
    let loading = slot.loading.lock().take();
    let consumers = loading.map(|l| l.consumers).unwrap_or_default();
    let have_buf = slot.buf.lock().is_some();
    let r = match (r, have_buf) {
        (Ok(()), false) => Err(Error::new(
            ErrorKind::Io,
            "a cache line's buffer did not come back from the engine",
        )),
        (r, _) => r,
    };
    match r {
        Ok(()) => {
            let p = slot.ptr.load(Ordering::Acquire);
            for c in &consumers {
                c.gather.copy_from(p, &c.pieces);
            }
            // Ready before anyone is woken: a caller whose gather has completed finds its lines
            // resident. (The bytes were copied out first, so an eviction from here on is harmless.)
            line::publish(&slot.word, LineState::Ready, true);
            for c in &consumers {
                c.gather.sub_pending();
            }
        }
        Err(e) => {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag != 0 {
                let (sid, line) = tag_parts(tag);
                if let Some(s) = inner.sources[sid as usize].get() {
                    let _ = s.table[line as usize].compare_exchange(
                        i + 1,
                        0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
            slot.tag.store(0, Ordering::Release);
            line::publish(&slot.word, LineState::Invalid, false);
            for c in &consumers {
                c.gather.fail(e.clone());
                c.gather.sub_pending();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Gather.

struct GState {
    buf: Vec<u8>,
    bounds: Vec<usize>,
    /// Lines outstanding, plus one while the gather is still issuing.
    pending: usize,
    error: Option<Error>,
    waker: Option<Waker>,
}

struct GatherShared {
    st: Mutex<GState>,
    done: Condvar,
}

impl GatherShared {
    fn new(buf: Vec<u8>, bounds: Vec<usize>) -> Arc<GatherShared> {
        Arc::new(GatherShared {
            st: Mutex::new(GState {
                buf,
                bounds,
                pending: 1,
                error: None,
                waker: None,
            }),
            done: Condvar::new(),
        })
    }
    fn add_pending(&self) {
        self.st.lock().pending += 1;
    }
    fn sub_pending(&self) {
        let waker = {
            let mut st = self.st.lock();
            st.pending -= 1;
            if st.pending > 0 {
                return;
            }
            st.waker.take()
        };
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
    /// The issuing thread is done adding lines.
    fn issued(&self) {
        self.sub_pending();
    }
    fn fail(&self, e: Error) {
        let mut st = self.st.lock();
        if st.error.is_none() {
            st.error = Some(e);
        }
    }
    fn copy_from(&self, line: *const u8, pieces: &[Piece]) {
        if pieces.is_empty() {
            return;
        }
        let mut st = self.st.lock();
        for pc in pieces {
            let dst = &mut st.buf[pc.out_off..pc.out_off + pc.len as usize];
            // SAFETY: the caller holds the line pinned or Busy (its bytes are stable and alive);
            // line_off + len <= line_bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    line.add(pc.line_off as usize),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            };
        }
    }
    fn take(&self, st: &mut GState) -> Result<GatherResult> {
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        Ok(GatherResult {
            data: std::mem::take(&mut st.buf),
            bounds: std::mem::take(&mut st.bounds),
        })
    }
}

/// A pending batch of reads: `wait()`, poll with `is_complete()`, or `.await`. Dropping it is safe
/// (its loads still complete and fill the cache).
pub struct Gather {
    shared: Arc<GatherShared>,
}

impl fmt::Debug for Gather {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gather")
            .field("complete", &self.is_complete())
            .finish()
    }
}

impl Gather {
    fn ready(buf: Vec<u8>, bounds: Vec<usize>) -> Gather {
        let shared = GatherShared::new(buf, bounds);
        shared.issued();
        Gather { shared }
    }

    /// Blocks until every range has arrived; returns them, or the first error.
    pub fn wait(self) -> Result<GatherResult> {
        let mut st = self.shared.st.lock();
        while st.pending > 0 {
            self.shared.done.wait(&mut st);
        }
        self.shared.take(&mut st)
    }

    /// Like [`wait`](Self::wait), giving up (and handing the gather back) after `timeout`.
    pub fn wait_timeout(
        self,
        timeout: Duration,
    ) -> std::result::Result<Result<GatherResult>, Gather> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.st.lock();
        while st.pending > 0 {
            if self.shared.done.wait_until(&mut st, deadline).timed_out() && st.pending > 0 {
                drop(st);
                return Err(self);
            }
        }
        let r = self.shared.take(&mut st);
        drop(st);
        Ok(r)
    }

    pub fn is_complete(&self) -> bool {
        self.shared.st.lock().pending == 0
    }
}

impl Future for Gather {
    type Output = Result<GatherResult>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.shared.st.lock();
        if st.pending > 0 {
            st.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(self.shared.take(&mut st))
    }
}

/// The bytes of each requested range, in request order.
#[derive(Debug, Clone, Default)]
pub struct GatherResult {
    data: Vec<u8>,
    bounds: Vec<usize>,
}

impl GatherResult {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.bounds.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes of range `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        &self.data[self.bounds[i]..self.bounds[i + 1]]
    }
    /// Copies range `i` into `out` (which must be at least as long).
    pub fn copy_to(&self, i: usize, out: &mut [u8]) {
        let b = self.get(i);
        out[..b.len()].copy_from_slice(b);
    }
    /// All ranges back to back.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }
    /// The bytes, to hand to the next [`PageCache::gather_into`].
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

/// Lines kept resident by [`PageCache::pin`]; released when dropped.
pub struct PinnedLines {
    cache: PageCache,
    slots: Vec<u32>,
}

impl fmt::Debug for PinnedLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedLines")
            .field("lines", &self.slots.len())
            .finish()
    }
}

impl PinnedLines {
    pub fn lines(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for PinnedLines {
    fn drop(&mut self) {
        for &i in &self.slots {
            line::release_hold(&self.cache.inner.slots[i as usize].word);
        }
    }
}
