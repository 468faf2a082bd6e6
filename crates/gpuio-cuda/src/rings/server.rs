//! The host server: polling threads that take requests from the rings, turn each polling round into
//! one command buffer of the engine's batch API (loads into and stores from a registered staging
//! slab, adjacent lines of a file coalesced into one transfer), move read data to the device on a
//! copy stream, and only then publish the completions (docs/rings.md, "Completion").
//!
//! Each polling thread keeps up to `rounds_in_flight` rounds in flight: it starts a round (takes,
//! validates, places, commits) while earlier rounds' I/O runs, and finishes rounds (device copies,
//! then completion words, then a stream synchronize) as their I/O ends, in any order. It must never
//! publish a word before that request's copy is queued ahead of it, and never rewrite a staging slab
//! before the stream that reads it was synchronized.
//!
//! Everything is bounded: requests per round (`batch_max`), staging bytes per round, rounds in
//! flight per thread (`rounds_in_flight`, one staging slab each), the engine's own retry limits,
//! one split retry of a failed coalesced transfer, the I/O wait of a round (`io_timeout`, then
//! cancel), waits on rounds in flight (`idle_sleep_max` at a time), and idle sleeps. A bad request
//! gets an error result, never a panic; an engine failure becomes an error result for exactly the
//! requests whose transfer it hit (a coalesced transfer that fails is retried request by request
//! once, so one bad line does not fail its neighbours).
//!
//! Each thread's staging slabs are page-locked with the device once, at start
//! ([`Device::pin_host`], as `loader.rs` pins its staging), so its host → device copies are DMA
//! from pinned memory; they are unpinned exactly once, when the thread's worker is dropped (at
//! shutdown, on drop, or on a failed start), and never while a copy queued on its stream may still
//! read them. A device that cannot page-lock host memory (`Ok(None)` or
//! [`ErrorKind::Unsupported`]) leaves them unpinned and the server says why
//! ([`RingServer::staging_pinning`]); any other pin failure fails the start, with what was pinned
//! already unpinned.
//!
//! CAM (ICDE'25) and GPUfs serve GPU storage requests from CPU threads the same way; BaM (ASPLOS'23)
//! and AGILE put the NVMe queues on the GPU instead.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpuio::{
    BufferPool, CommandId, Completion, Engine, Error, ErrorKind, File, IoBuffer, IoQueue,
    QueueDesc, Result, Status,
};

use super::deliver::{DeliveryPath, DeliverySlab};
use super::layout::{
    code, completion_word, slot_word, OP_FLUSH, OP_FSYNC, OP_READ, OP_WRITE, SERVER_SERVING,
    SERVER_STOPPED, SERVER_STOPPING, SLOT_FREE, SLOT_SUBMITTED,
};
use super::publish::PublisherChoice;
use super::region::RingRegion;
use crate::device::{CopyStream, DeliveryDesc, Device, DevicePtr, HostToDevice, Ticket};

/// Makes completion words visible to the device, ordered after the data copies of the same round
/// (the implementations and how one is chosen: [`super::publish`]).
///
/// The server's side of the contract: it synchronizes `stream` after every call (so a publisher's
/// staging memory is free again), or, where the stream failed, drops it, makes a fresh one and calls
/// [`stream_replaced`](Self::stream_replaced) before the next call; it drops its stream before its
/// publisher.
pub trait Publish: Send + fmt::Debug {
    /// Publishes every `(device address, word)` after every copy queued on `stream` up to and
    /// including `after`; it may return before the words are written (a stream-ordered publisher
    /// only queues them). An error means the words are not known to be written: the server then
    /// publishes the round again, with its reads failed, on a fresh stream. A word queued before the
    /// failing one on a stream that did not fail stickily may therefore be written twice (same tag;
    /// the second says EIO); with CUDA's sticky stream errors, nothing queued after a failed copy
    /// runs.
    fn publish(
        &mut self,
        stream: &mut dyn CopyStream,
        after: Option<Ticket>,
        words: &[(DevicePtr, u64)],
    ) -> Result<()>;

    /// The server replaced its copy stream with a fresh one (the old one was dropped, which waits
    /// for what it had queued): tickets of the old stream mean nothing now.
    fn stream_replaced(&mut self) {}
}

/// The stand-in's publisher: waits for the copy ticket, then stores each word with release ordering
/// at its device address, which on the [`HostDevice`](crate::HostDevice) is a host address.
///
/// On a GPU the equivalent is [`StreamWritePublish`](super::publish::StreamWritePublish)
/// (`cuStreamWriteValue64_v2` of each word on the same stream after the copies), which needs no host
/// wait; [`RingServer::start_auto`] picks that or its fallback.
#[derive(Debug)]
pub struct HostStorePublish {
    _private: (),
}

impl HostStorePublish {
    /// # Safety
    /// Every device address it is given is a host address of live, 8-aligned memory that is only
    /// accessed atomically (the stand-in's device memory).
    pub unsafe fn new() -> HostStorePublish {
        HostStorePublish { _private: () }
    }
}

impl Publish for HostStorePublish {
    fn publish(
        &mut self,
        stream: &mut dyn CopyStream,
        after: Option<Ticket>,
        words: &[(DevicePtr, u64)],
    ) -> Result<()> {
        if let Some(t) = after {
            stream.wait(t)?;
        }
        for &(addr, w) in words {
            // SAFETY: per `new`, `addr` is a live 8-aligned host address accessed only atomically.
            unsafe { AtomicU64::from_ptr(addr as *mut u64) }.store(w, Ordering::Release);
        }
        Ok(())
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Polling threads (1..=16); ring `r` is served by thread `r % threads`.
    pub threads: usize,
    /// Most requests per polling round (1..=4096).
    pub batch_max: usize,
    /// Staging slab per round in flight, bytes (a request takes its length rounded up to 4 KiB); at
    /// least the region's largest request. A thread holds `rounds_in_flight` of them.
    pub staging_bytes: usize,
    /// Largest transfer that adjacent requests are coalesced into.
    pub coalesce_max_bytes: usize,
    /// Longest a round's I/O may take before it is cancelled and its requests fail with ETIMEDOUT.
    pub io_timeout: Duration,
    /// Longest sleep of an idle polling thread, and the longest a thread with rounds in flight
    /// waits on the oldest before it looks at its rings and its other rounds again.
    pub idle_sleep_max: Duration,
    /// Rounds a polling thread keeps in flight (1..=[`ROUNDS_IN_FLIGHT_MAX`]; 1 = take, run,
    /// deliver, then poll again). Each round has its own staging slab of `staging_bytes`, so a
    /// thread holds `rounds_in_flight × staging_bytes` of staging memory.
    pub rounds_in_flight: usize,
    /// How a round's read data and completion words reach the device ([`DeliveryPath`]); what ran
    /// is [`RingServer::delivery`].
    pub delivery: DeliveryPath,
}

/// Polling threads a workload's server gets unless told otherwise: 4, the knee measured on an
/// H200 (docs/BENCHMARKS.md, "Runs 7 to 11": 4 KiB requests through the kernel delivery ran at
/// 0.73–0.89 M/s with 2 threads, 1.36–1.46 M/s with 4 and 1.35–1.49 M/s with 8), and at most half
/// the cores, since the threads poll and the kernel's launches and the rest of the process need
/// the others.
pub fn default_polling_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores / 2).clamp(1, 4)
}

/// The polling threads of `asked`, 0 for [`default_polling_threads`].
pub fn polling_threads(asked: usize) -> usize {
    if asked == 0 {
        default_polling_threads()
    } else {
        asked
    }
}

/// The most rounds a polling thread may keep in flight ([`ServerConfig::rounds_in_flight`]).
pub const ROUNDS_IN_FLIGHT_MAX: usize = 4;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: 1,
            batch_max: 256,
            staging_bytes: 8 << 20,
            coalesce_max_bytes: 1 << 20,
            io_timeout: Duration::from_secs(30),
            idle_sleep_max: Duration::from_micros(200),
            rounds_in_flight: 2,
            delivery: DeliveryPath::Copies,
        }
    }
}

/// A file the rings may name, by its index in the list given to [`RingServer::start`].
#[derive(Debug, Clone)]
struct FileEntry {
    file: File,
    size: u64,
}

/// Counters of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingStats {
    /// Requests taken from the rings.
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub fsyncs: u64,
    /// Requests completed with an error result.
    pub errors: u64,
    /// Polling rounds that took at least one request.
    pub batches: u64,
    /// Engine transfers issued (coalesced transfers count once).
    pub transfers: u64,
    /// Engine reads that served two or more requests.
    pub coalesced_reads: u64,
    /// Requests served by those reads.
    pub coalesced_read_requests: u64,
    /// Engine writes that served two or more requests.
    pub coalesced_writes: u64,
    /// Requests retried alone after the coalesced transfer they were in failed.
    pub split_retries: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests whose completion index was out of range: nothing could be reported to them.
    pub unanswerable: u64,
    /// Requests failed with ESHUTDOWN by the final drain.
    pub shut_down: u64,
    /// Staging slabs page-locked with the device (`threads × rounds_in_flight` when pinned, 0 where
    /// the device cannot pin: [`RingServer::staging_pinning`] says why).
    pub staging_pinned: u64,
    /// Time since the server started.
    pub elapsed: Duration,
}

impl RingStats {
    /// The counts since the snapshot `before` (of the same server): what one run added.
    pub fn since(&self, before: &RingStats) -> RingStats {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        RingStats {
            requests: d(self.requests, before.requests),
            reads: d(self.reads, before.reads),
            writes: d(self.writes, before.writes),
            flushes: d(self.flushes, before.flushes),
            fsyncs: d(self.fsyncs, before.fsyncs),
            errors: d(self.errors, before.errors),
            batches: d(self.batches, before.batches),
            transfers: d(self.transfers, before.transfers),
            coalesced_reads: d(self.coalesced_reads, before.coalesced_reads),
            coalesced_read_requests: d(
                self.coalesced_read_requests,
                before.coalesced_read_requests,
            ),
            coalesced_writes: d(self.coalesced_writes, before.coalesced_writes),
            split_retries: d(self.split_retries, before.split_retries),
            bytes_read: d(self.bytes_read, before.bytes_read),
            bytes_written: d(self.bytes_written, before.bytes_written),
            unanswerable: d(self.unanswerable, before.unanswerable),
            shut_down: d(self.shut_down, before.shut_down),
            staging_pinned: self.staging_pinned,
            elapsed: self.elapsed.saturating_sub(before.elapsed),
        }
    }

    pub fn requests_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    fsyncs: AtomicU64,
    errors: AtomicU64,
    batches: AtomicU64,
    transfers: AtomicU64,
    coalesced_reads: AtomicU64,
    coalesced_read_requests: AtomicU64,
    coalesced_writes: AtomicU64,
    split_retries: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    unanswerable: AtomicU64,
    shut_down: AtomicU64,
}

fn add(c: &AtomicU64, v: u64) {
    if v > 0 {
        c.fetch_add(v, Ordering::Relaxed);
    }
}

struct Shared {
    region: Arc<RingRegion>,
    files: Vec<FileEntry>,
    /// Device addresses requests may name: `start..end`.
    window: (u64, u64),
    config: ServerConfig,
    stop: AtomicBool,
    counters: Counters,
    started: Instant,
    /// The publisher [`RingServer::start_auto`] chose (None: the caller gave one).
    publisher: Option<PublisherChoice>,
    /// Staging slabs page-locked, and what [`RingServer::staging_pinning`] says.
    staging_pinned: u64,
    staging_note: String,
    /// What [`RingServer::delivery`] says.
    delivery_note: String,
}

/// The running server; [`shutdown`](Self::shutdown) (or drop) stops it.
pub struct RingServer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for RingServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingServer")
            .field("threads", &self.threads.len())
            .field("stats", &self.stats())
            .finish()
    }
}

/// One request as taken from a slot.
#[derive(Debug, Clone, Copy)]
struct Desc {
    ring: u32,
    opcode: u16,
    flags: u16,
    file_id: u32,
    offset: u64,
    length: u32,
    completion: u32,
    dev_addr: u64,
    tag: u32,
    reserved0: u32,
}

impl RingServer {
    /// Starts serving `region`: `files[i]` is file id `i`; requests may name device addresses in
    /// `window` (`start, len`: the device cache's line memory, say); `publisher` makes one
    /// [`Publish`] per polling thread.
    pub fn start(
        engine: &Engine,
        region: Arc<RingRegion>,
        files: Vec<File>,
        window: (DevicePtr, usize),
        publisher: &dyn Fn() -> Box<dyn Publish>,
        config: ServerConfig,
    ) -> Result<RingServer> {
        Self::start_with(
            engine,
            region,
            files,
            window,
            &|| Ok(publisher()),
            None,
            config,
        )
    }

    /// As [`start`](Self::start), with the publisher the region's device calls for
    /// ([`PublisherChoice::for_device`]: a stream write after the copies where the device has one,
    /// else a copy of the words from pinned memory on the same stream); [`publisher`](Self::publisher)
    /// says which and why.
    pub fn start_auto(
        engine: &Engine,
        region: Arc<RingRegion>,
        files: Vec<File>,
        window: (DevicePtr, usize),
        config: ServerConfig,
    ) -> Result<RingServer> {
        let device = region.device().clone();
        let choice = PublisherChoice::for_device(device.as_ref());
        let words = config.batch_max;
        let make = |c: &PublisherChoice| c.make(&device, words);
        let c2 = choice.clone();
        Self::start_with(
            engine,
            region,
            files,
            window,
            &move || make(&c2),
            Some(choice),
            config,
        )
    }

    /// The publisher [`start_auto`](Self::start_auto) chose; `None` when the caller gave one.
    pub fn publisher(&self) -> Option<&PublisherChoice> {
        self.shared.publisher.as_ref()
    }

    /// Whether the polling threads' staging slabs are page-locked with the device, and if not, why
    /// (then the driver stages each host → device copy from them itself, synchronously).
    pub fn staging_pinning(&self) -> &str {
        &self.shared.staging_note
    }

    /// How rounds reach the device ([`ServerConfig::delivery`]), and, where the kernel was asked
    /// for and could not be used, why.
    pub fn delivery(&self) -> &str {
        &self.shared.delivery_note
    }

    fn start_with(
        engine: &Engine,
        region: Arc<RingRegion>,
        files: Vec<File>,
        window: (DevicePtr, usize),
        publisher: &dyn Fn() -> Result<Box<dyn Publish>>,
        choice: Option<PublisherChoice>,
        config: ServerConfig,
    ) -> Result<RingServer> {
        let c = &config;
        let max_req = region.layout().config.max_request_bytes as usize;
        if !(1..=16).contains(&c.threads)
            || !(1..=4096).contains(&c.batch_max)
            || c.staging_bytes < max_req.next_multiple_of(4096)
            || c.staging_bytes > 1 << 30
            || c.coalesce_max_bytes == 0
            || !(1..=ROUNDS_IN_FLIGHT_MAX).contains(&c.rounds_in_flight)
        {
            return Err(Error::invalid(format!(
                "ring server: threads 1..=16, batch 1..=4096, staging ≥ the largest request ({max_req}) and ≤ 1 GiB, coalescing > 0, rounds in flight 1..={ROUNDS_IN_FLIGHT_MAX}: {c:?}"
            )));
        }
        if files.len() > u32::MAX as usize {
            return Err(Error::invalid("ring server: too many files"));
        }
        let files = files
            .into_iter()
            .map(|file| {
                Ok(FileEntry {
                    size: file.len()?,
                    file,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let device = region.device().clone();
        let rings = region.layout().config.ring_count;
        let nthreads = config.threads.min(rings as usize);
        // Every thread's staging slabs, page-locked once, as `(pins, pool, slabs)`: a tuple drops
        // its fields in order, so on an error return each thread's pins are released before its
        // pool and slabs can free the memory.
        let mut staging = Vec::with_capacity(nthreads);
        let mut unpinned: Option<String> = None;
        for t in 0..nthreads {
            let pool = engine.buffer_pool(config.staging_bytes, config.rounds_in_flight)?;
            let mut free: Vec<IoBuffer> = Vec::with_capacity(config.rounds_in_flight);
            for _ in 0..config.rounds_in_flight {
                free.push(pool.get_timeout(Duration::from_secs(10))?.into());
            }
            let pins = if unpinned.is_some() {
                StagingPins::none(&device)
            } else {
                match StagingPins::pin(&device, t, nthreads, &mut free)? {
                    Ok(p) => p,
                    Err(why) => {
                        // The device cannot pin: no thread's slabs are (the earlier ones' pins
                        // are released so that all threads run alike).
                        for (p, _, _) in staging.iter_mut() {
                            *p = StagingPins::none(&device);
                        }
                        unpinned = Some(why);
                        StagingPins::none(&device)
                    }
                }
            };
            staging.push((pins, pool, free));
        }
        // The kernel delivery reads the staging slabs in place: they must be mapped, and each thread
        // needs a mapped descriptor array.
        let mut slabs: Vec<Option<DeliverySlab>> = (0..nthreads).map(|_| None).collect();
        let delivery_note = match (config.delivery, &unpinned) {
            (DeliveryPath::Copies, _) => {
                "copies: a host → device copy and a published completion word per request".to_string()
            }
            (DeliveryPath::Kernel, Some(why)) => format!(
                "copies (the kernel delivery needs page-locked staging: {why})"
            ),
            (DeliveryPath::Kernel, None) if staging.iter().any(|(p, _, _)| !p.all_mapped()) => format!(
                "copies (the kernel delivery needs staging mapped into the device; {} does not map it)",
                device.label()
            ),
            (DeliveryPath::Kernel, None) => {
                let mut why = None;
                // A round's requests and the taken hints of the thread's rings fit in one launch.
                let capacity = config.batch_max + rings as usize;
                for slab in slabs.iter_mut() {
                    match DeliverySlab::new(&device, capacity)? {
                        Ok(s) => *slab = Some(s),
                        Err(w) => {
                            why = Some(w);
                            break;
                        }
                    }
                }
                match why {
                    None => "kernel: one gpuio_deliver launch per round reads the staging slab in place and writes the completion words after the bytes".to_string(),
                    Some(w) => {
                        slabs.iter_mut().for_each(|s| *s = None);
                        format!("copies (the kernel delivery's descriptor arrays: {w})")
                    }
                }
            }
        };
        let staging_pinned = staging.iter().map(|(p, _, _)| p.len() as u64).sum::<u64>();
        let staging_note = match &unpinned {
            None => format!(
                "{staging_pinned} staging slabs of {} bytes page-locked ({nthreads} polling threads × {} rounds in flight)",
                config.staging_bytes, config.rounds_in_flight
            ),
            Some(why) => format!(
                "staging slabs not page-locked: {why}; the driver stages each copy from them itself"
            ),
        };
        let shared = Arc::new(Shared {
            region: region.clone(),
            files,
            window: (window.0, window.0.saturating_add(window.1 as u64)),
            config: config.clone(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            started: Instant::now(),
            publisher: choice,
            staging_pinned,
            staging_note,
            delivery_note,
        });
        let mut workers = Vec::new();
        for (t, ((pins, pool, free), kernel)) in staging.into_iter().zip(slabs).enumerate() {
            let my: Vec<u32> = (0..rings)
                .filter(|r| *r as usize % config.threads == t)
                .collect();
            // On a failure here `pins` is released first, while the pool and slabs still hold the
            // memory; once the worker exists, its Drop does that.
            // With the kernel delivery, its code is loaded now, before any kernel waits on it (see
            // `CopyStream::preload_deliver`: a first launch under a running kernel can deadlock).
            let made = device.copy_stream().and_then(|mut stream| {
                if kernel.is_some() {
                    stream.preload_deliver().map_err(|e| {
                        Error::new(
                            e.kind(),
                            format!("preparing the kernel delivery on {}: {e}", device.label()),
                        )
                    })?;
                }
                Ok((stream, engine.queue(QueueDesc::default())?, publisher()?))
            });
            let (stream, queue, publish) = match made {
                Ok(m) => m,
                Err(e) => {
                    drop(pins);
                    return Err(e);
                }
            };
            workers.push(Worker {
                shared: shared.clone(),
                heads: my
                    .iter()
                    .map(|&r| region.ring_control(r).head.load(Ordering::Acquire))
                    .collect(),
                rings: my,
                queue,
                free,
                inflight: VecDeque::new(),
                pool,
                stream,
                device: device.clone(),
                publish,
                pins,
                kernel,
                start: 0,
            });
        }
        region
            .header()
            .server_state
            .store(SERVER_SERVING, Ordering::Release);
        let mut threads = Vec::new();
        for (i, w) in workers.into_iter().enumerate() {
            let spawned = std::thread::Builder::new()
                .name(format!("gpuio-rings-{i}"))
                .spawn(move || w.run());
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    let s = RingServer {
                        shared: shared.clone(),
                        threads,
                    };
                    drop(s);
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("cannot start a ring polling thread: {e}"),
                    ));
                }
            }
        }
        Ok(RingServer { shared, threads })
    }

    /// The counters so far.
    pub fn stats(&self) -> RingStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RingStats {
            requests: g(&c.requests),
            reads: g(&c.reads),
            writes: g(&c.writes),
            flushes: g(&c.flushes),
            fsyncs: g(&c.fsyncs),
            errors: g(&c.errors),
            batches: g(&c.batches),
            transfers: g(&c.transfers),
            coalesced_reads: g(&c.coalesced_reads),
            coalesced_read_requests: g(&c.coalesced_read_requests),
            coalesced_writes: g(&c.coalesced_writes),
            split_retries: g(&c.split_retries),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
            unanswerable: g(&c.unanswerable),
            shut_down: g(&c.shut_down),
            staging_pinned: self.shared.staging_pinned,
            elapsed: self.shared.started.elapsed(),
        }
    }

    /// Stops serving: the header says `STOPPING` (producers then get ESHUTDOWN), each thread
    /// finishes the round it has taken, fails what is still in its rings with ESHUTDOWN, and exits;
    /// the header then says `STOPPED`. Returns the final counters.
    pub fn shutdown(mut self) -> RingStats {
        self.stop_threads();
        self.stats()
    }

    fn stop_threads(&mut self) {
        let h = self.shared.region.header();
        if self.threads.is_empty() {
            return;
        }
        h.server_state.store(SERVER_STOPPING, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        h.server_state.store(SERVER_STOPPED, Ordering::Release);
    }
}

impl Drop for RingServer {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

enum Take {
    Got(Desc),
    Empty,
    NoRoom,
}

struct Worker {
    shared: Arc<Shared>,
    rings: Vec<u32>,
    heads: Vec<u64>,
    queue: IoQueue,
    pool: BufferPool,
    /// Staging slabs not in use by a round (at most `rounds_in_flight` exist; a slab a failed
    /// command buffer dropped went back to `pool`).
    free: Vec<IoBuffer>,
    /// Rounds whose command buffer is committed and not yet delivered, oldest first.
    inflight: VecDeque<Round>,
    stream: Box<dyn CopyStream>,
    device: Arc<dyn Device>,
    publish: Box<dyn Publish>,
    /// The staging slabs' page-locking, released in `Drop` after the stream has drained.
    pins: StagingPins,
    /// The descriptor array of [`DeliveryPath::Kernel`] (None: copies). Dropped, and so unpinned,
    /// with the fields, after `Drop` drained the stream.
    kernel: Option<DeliverySlab>,
    start: usize,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // No copy may read a slab once it is unpinned: wait for the stream, then drop it (dropping
        // a stream waits for what it still had queued, even after a failure), then unpin. The slabs'
        // memory (`pool`, `free`) is only released after this body, with the fields.
        let _ = self.stream.synchronize();
        self.stream = Box::new(ClosedStream);
        self.publish.stream_replaced();
        self.pins.release();
    }
}

/// Stands in for a worker's dropped copy stream in `Worker::drop`: every call fails.
#[derive(Debug)]
struct ClosedStream;

impl ClosedStream {
    fn closed<T>() -> Result<T> {
        Err(Error::new(
            ErrorKind::EngineStopped,
            "ring server: this polling thread's copy stream was closed",
        ))
    }
}

impl CopyStream for ClosedStream {
    unsafe fn copy_h2d_async(&mut self, _: *const u8, _: usize, _: DevicePtr) -> Result<Ticket> {
        Self::closed()
    }
    unsafe fn copy_d2h_async(&mut self, _: DevicePtr, _: *mut u8, _: usize) -> Result<Ticket> {
        Self::closed()
    }
    fn is_done(&mut self, _: Ticket) -> Result<bool> {
        Self::closed()
    }
    fn wait(&mut self, _: Ticket) -> Result<()> {
        Self::closed()
    }
    fn synchronize(&mut self) -> Result<()> {
        Self::closed()
    }
}

/// One polling thread's staging slabs, page-locked with the device ([`Device::pin_host`]; on a GPU
/// `cuMemHostRegister` with PORTABLE | DEVICEMAP, not write-combined: the CPU writes into them and
/// reads WRITE data out of them). Each range is unpinned exactly once: by
/// [`release`](Self::release), or when this is dropped.
struct StagingPins {
    device: Arc<dyn Device>,
    /// `(address, length, device address where mapped)` of every slab pinned and not yet unpinned.
    ranges: Vec<(usize, usize, Option<DevicePtr>)>,
}

impl StagingPins {
    /// Nothing pinned.
    fn none(device: &Arc<dyn Device>) -> StagingPins {
        StagingPins {
            device: device.clone(),
            ranges: Vec::new(),
        }
    }

    /// Pins each of `slabs` (thread `thread` of `threads`). `Ok(Err(why))`, with nothing left
    /// pinned, where the device cannot page-lock host memory (`Ok(None)` from `pin_host`, or
    /// [`ErrorKind::Unsupported`]): the server then runs unpinned, as the loader does. Any other
    /// failure unpins what this call pinned and is returned, naming the slab and the thread.
    ///
    /// The slabs must stay allocated, at the same addresses, until the result is released or
    /// dropped (pool buffers never move; the worker holds their pool).
    fn pin(
        device: &Arc<dyn Device>,
        thread: usize,
        threads: usize,
        slabs: &mut [IoBuffer],
    ) -> Result<std::result::Result<StagingPins, String>> {
        let mut pins = StagingPins::none(device);
        let n = slabs.len();
        for (i, slab) in slabs.iter_mut().enumerate() {
            let b = slab.as_aligned_mut();
            let (ptr, len) = (b.as_mut_ptr(), b.capacity());
            // SAFETY: a pool buffer's memory stays allocated at this address while its pool lives;
            // the caller keeps the pool (and the slabs) until these pins are released.
            match unsafe { device.pin_host(ptr, len) } {
                Ok(Some(p)) => pins.ranges.push((ptr as usize, len, p.mapped)),
                Ok(None) => {
                    pins.release();
                    return Ok(Err(format!(
                        "{} does not page-lock host memory",
                        device.label()
                    )));
                }
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    pins.release();
                    return Ok(Err(format!(
                        "{} cannot page-lock host memory: {e}",
                        device.label()
                    )));
                }
                Err(e) => {
                    // Dropping `pins` unpins the slabs pinned before this one.
                    return Err(Error::new(
                        e.kind(),
                        format!(
                            "ring server: page-locking staging slab {} of {n} ({len} bytes) of polling thread {} of {threads} on {} failed: {e}",
                            i + 1,
                            thread + 1,
                            device.label()
                        ),
                    ));
                }
            }
        }
        Ok(Ok(pins))
    }

    fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether every slab is pinned and mapped into the device (none pinned: false).
    fn all_mapped(&self) -> bool {
        !self.ranges.is_empty() && self.ranges.iter().all(|r| r.2.is_some())
    }

    /// The device address of host address `ptr` inside a pinned, mapped slab.
    fn mapped(&self, ptr: usize) -> Option<DevicePtr> {
        self.ranges.iter().find_map(|&(a, len, m)| {
            (ptr >= a && ptr < a + len).then(|| m.map(|m| m + (ptr - a) as u64))?
        })
    }

    /// Unpins every range still pinned (each once).
    fn release(&mut self) {
        for (ptr, len, _) in self.ranges.drain(..) {
            // SAFETY: pinned by `pin` on this device; the memory is still allocated (the owner
            // releases before freeing it) and no queued copy reads it (the worker drained its
            // stream first; on a failed start no copy was ever queued from it).
            unsafe { self.device.unpin_host(ptr as *mut u8, len) };
        }
    }
}

impl Drop for StagingPins {
    fn drop(&mut self) {
        self.release();
    }
}

/// A transfer of adjacent requests.
struct Group {
    op: u16,
    file: u32,
    offset: u64,
    len: usize,
    stage: usize,
    members: Vec<usize>,
    cmd: Option<CommandId>,
}

/// A round between [`Worker::start_round`] and [`Worker::finish_round`].
struct Round {
    reqs: Vec<Desc>,
    res: Vec<Option<i32>>,
    groups: Vec<Group>,
    /// FLUSH and FSYNC requests still to be answered by the command buffer.
    syncs: Vec<usize>,
    sync_cmds: BTreeMap<u32, CommandId>,
    /// Whether the round had a command buffer to run.
    ran: bool,
    /// The committed command buffer and when its I/O times out.
    io: Option<(Completion, Instant)>,
    /// Why the command buffer could not be recorded or committed (its slab went back to the pool).
    early: Option<(Error, Option<IoBuffer>)>,
    /// The round's staging slab when it is not inside the command buffer.
    staging: Option<IoBuffer>,
}

impl Round {
    /// Whether [`Worker::finish_round`] would not block: nothing committed, the I/O ended, or its
    /// deadline passed (then it is cancelled).
    fn io_ended(&self) -> bool {
        match &self.io {
            None => true,
            Some((c, deadline)) => !c.status().is_pending() || Instant::now() >= *deadline,
        }
    }
}

/// Waits for a committed command buffer until `deadline`, then cancels it: the errors by command,
/// and the staging slab back.
#[allow(clippy::type_complexity)]
fn wait_completion(
    completion: Completion,
    deadline: Instant,
) -> std::result::Result<(BTreeMap<CommandId, Error>, Option<IoBuffer>), (Error, Option<IoBuffer>)>
{
    let timed_out = completion
        .wait_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_none();
    if timed_out {
        completion.try_cancel();
    }
    // After a cancel this waits for the transfers already handed to the backend to drain (the
    // engine's own bounds apply to them).
    let (status, mut fin) = completion.wait_parts();
    let buf = fin.take_shared_buffer();
    match status {
        Status::Complete => Ok((BTreeMap::new(), buf)),
        Status::Error(list) => Ok((
            list.into_iter().map(|e| (e.command, e.error)).collect(),
            buf,
        )),
        Status::Cancelled | Status::Pending => {
            let e = if timed_out {
                Error::new(ErrorKind::RetriesExhausted, "ring round timed out")
            } else {
                Error::new(ErrorKind::Cancelled, "ring round cancelled")
            };
            Err((e, buf))
        }
    }
}

/// What an engine error means to the producer.
fn code_of(e: &Error) -> i32 {
    match e.kind() {
        ErrorKind::UnexpectedEof => code::ENODATA,
        ErrorKind::NoSpace => code::ENOSPC,
        ErrorKind::PermissionDenied => code::EACCES,
        ErrorKind::InvalidInput => code::EINVAL,
        ErrorKind::Cancelled => code::ECANCELED,
        ErrorKind::EngineStopped => code::ESHUTDOWN,
        _ => code::EIO,
    }
}

impl Worker {
    fn run(mut self) {
        let mut idle = 0u32;
        let mut idle_sleep = Duration::from_micros(1);
        let most = self.shared.config.rounds_in_flight;
        loop {
            let stopping = self.shared.stop.load(Ordering::Acquire);
            self.retire();
            let reqs = if self.inflight.len() < most {
                self.collect()
            } else {
                Vec::new()
            };
            if reqs.is_empty() {
                if !self.inflight.is_empty() {
                    // Rounds in flight: block on the oldest for a bounded slice, then look again.
                    self.wait_oldest();
                    continue;
                }
                if stopping {
                    break;
                }
                // Idle: spin and yield briefly, then sleep, doubling up to the configured bound.
                idle = idle.saturating_add(1);
                if idle < 16 {
                    std::hint::spin_loop();
                } else if idle < 32 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(idle_sleep);
                    idle_sleep = (idle_sleep * 2).min(self.shared.config.idle_sleep_max);
                }
                continue;
            }
            idle = 0;
            idle_sleep = Duration::from_micros(1);
            if stopping {
                // Taken after the stop: fail them cleanly.
                self.fail_all(&reqs, code::ESHUTDOWN);
                add(&self.shared.counters.shut_down, reqs.len() as u64);
                continue;
            }
            if reqs.iter().any(|d| matches!(d.opcode, OP_FLUSH | OP_FSYNC)) {
                // FLUSH and FSYNC complete after every write taken before them (docs/rings.md,
                // "Ordering guarantees"): the earlier rounds finish first.
                while let Some(r) = self.inflight.pop_front() {
                    self.finish_round(r);
                }
            }
            let r = self.start_round(reqs);
            self.inflight.push_back(r);
        }
    }

    /// Finishes every round in flight whose I/O has ended (or whose `io_timeout` ran out), in any
    /// order: completion words are per request, so a later round may be answered first.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.inflight.len() {
            if self.inflight[i].io_ended() {
                if let Some(r) = self.inflight.remove(i) {
                    self.finish_round(r);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Waits at most `idle_sleep_max` (and never past its deadline) for the oldest round's I/O;
    /// finishes it if it ended.
    fn wait_oldest(&mut self) {
        let slice = self
            .shared
            .config
            .idle_sleep_max
            .max(Duration::from_micros(1));
        let ended = match self.inflight.front() {
            None => return,
            Some(r) => match &r.io {
                Some((c, deadline)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    c.wait_timeout(left.min(slice)).is_some() || Instant::now() >= *deadline
                }
                None => true,
            },
        };
        if ended {
            if let Some(r) = self.inflight.pop_front() {
                self.finish_round(r);
            }
        }
    }

    /// Takes the next request of ring `k` if it is submitted and fits the staging `budget`.
    fn take(&mut self, k: usize, budget: &mut usize) -> Take {
        let region = &self.shared.region;
        let n = region.layout().config.slots_per_ring as u64;
        let max = region.layout().config.max_request_bytes;
        let (r, pos) = (self.rings[k], self.heads[k]);
        let lap = (pos / n) as u32;
        let slot = region.slot(r, (pos % n) as u32);
        if slot.state.load(Ordering::Acquire) != slot_word(lap, SLOT_SUBMITTED) {
            return Take::Empty;
        }
        let d = Desc {
            ring: r,
            opcode: slot.opcode.load(Ordering::Relaxed),
            flags: slot.flags.load(Ordering::Relaxed),
            file_id: slot.file_id.load(Ordering::Relaxed),
            offset: slot.offset.load(Ordering::Relaxed),
            length: slot.length.load(Ordering::Relaxed),
            completion: slot.completion.load(Ordering::Relaxed),
            dev_addr: slot.dev_addr.load(Ordering::Relaxed),
            tag: slot.tag.load(Ordering::Relaxed),
            reserved0: slot.reserved0.load(Ordering::Relaxed),
        };
        let moves_data = matches!(d.opcode, OP_READ | OP_WRITE) && (1..=max).contains(&d.length);
        let cost = if moves_data {
            (d.length as usize).next_multiple_of(4096)
        } else {
            0
        };
        if cost > *budget {
            return Take::NoRoom;
        }
        *budget -= cost;
        // The descriptor is copied out: the slot is free for the next lap.
        slot.state
            .store(slot_word(lap.wrapping_add(1), SLOT_FREE), Ordering::Release);
        self.heads[k] = pos + 1;
        region
            .ring_control(r)
            .head
            .store(pos + 1, Ordering::Release);
        Take::Got(d)
    }

    /// One polling round's requests: round-robin over this thread's rings, bounded by `batch_max` and
    /// the staging slab.
    fn collect(&mut self) -> Vec<Desc> {
        let nr = self.rings.len();
        let mut budget = self.shared.config.staging_bytes;
        let mut reqs = Vec::new();
        'outer: loop {
            let mut progress = false;
            for j in 0..nr {
                let k = (self.start + j) % nr;
                match self.take(k, &mut budget) {
                    Take::Got(d) => {
                        reqs.push(d);
                        progress = true;
                        if reqs.len() >= self.shared.config.batch_max {
                            break 'outer;
                        }
                    }
                    Take::Empty => {}
                    Take::NoRoom => break 'outer,
                }
            }
            if !progress {
                break;
            }
        }
        self.start = (self.start + 1) % nr.max(1);
        reqs
    }

    fn validate(&self, d: &Desc) -> std::result::Result<(), i32> {
        let s = &self.shared;
        if d.flags != 0 || d.reserved0 != 0 {
            return Err(code::EINVAL);
        }
        if !matches!(d.opcode, OP_READ | OP_WRITE | OP_FLUSH | OP_FSYNC) {
            return Err(code::EINVAL);
        }
        if d.opcode == OP_FLUSH {
            return Ok(());
        }
        let f = s.files.get(d.file_id as usize).ok_or(code::EBADF)?;
        if d.opcode == OP_FSYNC {
            return Ok(());
        }
        let max = s.region.layout().config.max_request_bytes;
        if d.length == 0 || d.length > max {
            return Err(code::EINVAL);
        }
        if d.offset
            .checked_add(d.length as u64)
            .is_none_or(|end| end > f.size)
        {
            return Err(code::ERANGE);
        }
        if d.opcode == OP_WRITE && !f.file.is_writable() {
            return Err(code::EACCES);
        }
        let end = d.dev_addr.checked_add(d.length as u64);
        if d.dev_addr < s.window.0 || end.is_none_or(|e| e > s.window.1) {
            return Err(code::EFAULT);
        }
        Ok(())
    }

    /// Completes every request in `reqs` with `result`.
    fn fail_all(&mut self, reqs: &[Desc], result: i32) {
        let res = vec![Some(result); reqs.len()];
        self.deliver(reqs, &res, &[], None);
    }

    /// A free staging slab: one no round holds, or one a failed command buffer dropped back into the
    /// pool (bounded wait). At most `rounds_in_flight` exist, and each round holds at most one.
    fn staging(&mut self) -> Option<IoBuffer> {
        self.free.pop().or_else(|| {
            self.pool
                .get_timeout(Duration::from_secs(5))
                .ok()
                .map(Into::into)
        })
    }

    /// Starts a round: validates, places and coalesces its requests, brings its writes' bytes from
    /// the device, and commits one command buffer; [`finish_round`](Self::finish_round) waits for
    /// it and delivers.
    fn start_round(&mut self, reqs: Vec<Desc>) -> Round {
        let shared = self.shared.clone();
        let c = &shared.counters;
        add(&c.batches, 1);
        add(&c.requests, reqs.len() as u64);
        let mut res: Vec<Option<i32>> = vec![None; reqs.len()];
        for (i, d) in reqs.iter().enumerate() {
            match d.opcode {
                OP_READ => add(&c.reads, 1),
                OP_WRITE => add(&c.writes, 1),
                OP_FLUSH => add(&c.flushes, 1),
                OP_FSYNC => add(&c.fsyncs, 1),
                _ => {}
            }
            if let Err(e) = self.validate(d) {
                res[i] = Some(e);
            }
        }

        // Group adjacent reads (and writes) of a file; place each group in the staging slab.
        let mut order: Vec<usize> = (0..reqs.len())
            .filter(|&i| res[i].is_none() && matches!(reqs[i].opcode, OP_READ | OP_WRITE))
            .collect();
        order.sort_by_key(|&i| (reqs[i].opcode, reqs[i].file_id, reqs[i].offset));
        let mut groups: Vec<Group> = Vec::new();
        let mut cursor = 0usize;
        for &i in &order {
            let d = &reqs[i];
            let len = d.length as usize;
            if let Some(g) = groups.last_mut() {
                if g.op == d.opcode
                    && g.file == d.file_id
                    && g.offset + g.len as u64 == d.offset
                    && g.len + len <= self.shared.config.coalesce_max_bytes
                {
                    g.len += len;
                    g.members.push(i);
                    continue;
                }
            }
            if let Some(g) = groups.last() {
                cursor = (g.stage + g.len).next_multiple_of(4096);
            }
            groups.push(Group {
                op: d.opcode,
                file: d.file_id,
                offset: d.offset,
                len,
                stage: cursor,
                members: vec![i],
                cmd: None,
            });
        }
        let stage_of = |groups: &[Group], gi: usize, i: usize| {
            groups[gi].stage + (reqs[i].offset - groups[gi].offset) as usize
        };

        let mut staging = if groups.is_empty() {
            None
        } else {
            match self.staging() {
                Some(s) => Some(s),
                None => {
                    for g in &groups {
                        for &i in &g.members {
                            res[i] = Some(code::EIO);
                        }
                    }
                    groups.clear();
                    None
                }
            }
        };

        // Writes: their bytes come from device memory first.
        if let Some(buf) = staging.as_mut() {
            let base = buf.as_aligned_mut().as_mut_ptr();
            let mut last = None;
            let mut failed = false;
            for (gi, g) in groups.iter().enumerate().filter(|(_, g)| g.op == OP_WRITE) {
                for &i in &g.members {
                    let off = stage_of(&groups, gi, i);
                    // SAFETY: the source range was validated against the registered window; the
                    // destination lies in the staging slab (the round's placement fits it) and is
                    // not touched until the stream is waited on below.
                    let t = unsafe {
                        self.stream.copy_d2h_async(
                            reqs[i].dev_addr,
                            base.add(off),
                            reqs[i].length as usize,
                        )
                    };
                    match t {
                        Ok(t) => last = Some(t),
                        Err(_) => failed = true,
                    }
                }
            }
            if let Some(t) = last {
                failed |= self.stream.wait(t).is_err();
            }
            if failed {
                for g in groups.iter().filter(|g| g.op == OP_WRITE) {
                    for &i in &g.members {
                        res[i] = Some(code::EIO);
                    }
                }
                groups.retain(|g| g.op != OP_WRITE);
                self.renew_stream();
            }
        }

        // One command buffer: every transfer, then (after a barrier) the fsyncs.
        let syncs: Vec<usize> = (0..reqs.len())
            .filter(|&i| res[i].is_none() && matches!(reqs[i].opcode, OP_FLUSH | OP_FSYNC))
            .collect();
        let mut sync_cmds: BTreeMap<u32, CommandId> = BTreeMap::new();
        let mut io = None;
        let mut early = None;
        let ran = !groups.is_empty() || !syncs.is_empty();
        if ran {
            let mut cb = self.queue.command_buffer();
            let mut record_err: Option<Error> = None;
            if let Some(buf) = staging.take() {
                if let Err(e) = cb.set_buffer(buf) {
                    record_err = Some(e);
                }
            }
            for g in groups.iter_mut() {
                let f = &self.shared.files[g.file as usize].file;
                let r = if g.op == OP_READ {
                    cb.load_into(f, g.offset, g.stage, g.len)
                } else {
                    cb.store_from(f, g.offset, g.stage, g.len)
                };
                match r {
                    Ok(id) => g.cmd = Some(id),
                    Err(e) => {
                        for &i in &g.members {
                            res[i] = Some(code_of(&e));
                        }
                    }
                }
            }
            if !syncs.is_empty() {
                cb.barrier();
                for &i in &syncs {
                    let fid = reqs[i].file_id;
                    if reqs[i].opcode == OP_FSYNC && !sync_cmds.contains_key(&fid) {
                        match cb.sync(&self.shared.files[fid as usize].file) {
                            Ok(id) => {
                                sync_cmds.insert(fid, id);
                            }
                            Err(e) => res[i] = Some(code_of(&e)),
                        }
                    }
                }
            }
            let live = groups.iter().filter(|g| g.cmd.is_some()).count();
            add(&c.transfers, live as u64);
            for g in groups
                .iter()
                .filter(|g| g.cmd.is_some() && g.members.len() > 1)
            {
                if g.op == OP_READ {
                    add(&c.coalesced_reads, 1);
                    add(&c.coalesced_read_requests, g.members.len() as u64);
                } else {
                    add(&c.coalesced_writes, 1);
                }
            }
            match record_err {
                Some(e) => early = Some((e, None)),
                None => match cb.commit() {
                    Ok(c) => io = Some((c, Instant::now() + self.shared.config.io_timeout)),
                    Err(e) => early = Some((e, None)),
                },
            }
        }
        Round {
            reqs,
            res,
            groups,
            syncs,
            sync_cmds,
            ran,
            io,
            early,
            staging,
        }
    }

    /// Waits (bounded by the round's deadline) for a round's I/O, retries failed coalesced
    /// transfers alone, delivers the read data and then the completion words, and gives the staging
    /// slab back once the stream that read it is synchronized.
    fn finish_round(&mut self, round: Round) {
        let shared = self.shared.clone();
        let c = &shared.counters;
        let Round {
            reqs,
            mut res,
            mut groups,
            syncs,
            sync_cmds,
            ran,
            io,
            early,
            mut staging,
        } = round;
        let stage_of = |groups: &[Group], gi: usize, i: usize| {
            groups[gi].stage + (reqs[i].offset - groups[gi].offset) as usize
        };
        if ran {
            let outcome = match (early, io) {
                (Some((e, buf)), _) => Err((e, buf)),
                (None, Some((completion, deadline))) => wait_completion(completion, deadline),
                (None, None) => Err((
                    Error::new(ErrorKind::Cancelled, "ring round was never committed"),
                    None,
                )),
            };
            match outcome {
                Err((e, buf)) => {
                    staging = buf;
                    let rc = code_of(&e);
                    for g in &groups {
                        for &i in &g.members {
                            res[i].get_or_insert(rc);
                        }
                    }
                    for &i in &syncs {
                        res[i].get_or_insert(rc);
                    }
                    groups.clear();
                }
                Ok((errors, buf)) => {
                    staging = buf;
                    let mut retry: Vec<usize> = Vec::new();
                    for g in &groups {
                        let Some(id) = g.cmd else { continue };
                        match errors.get(&id) {
                            None => {
                                for &i in &g.members {
                                    res[i] = Some(reqs[i].length as i32);
                                }
                            }
                            Some(_) if g.members.len() > 1 => retry.extend(&g.members),
                            Some(e) => res[g.members[0]] = Some(code_of(e)),
                        }
                    }
                    for &i in &syncs {
                        if reqs[i].opcode == OP_FSYNC {
                            let id = sync_cmds[&reqs[i].file_id];
                            res[i] = Some(errors.get(&id).map_or(0, code_of));
                        } else {
                            res[i] = Some(0);
                        }
                    }
                    if !retry.is_empty() {
                        add(&c.split_retries, retry.len() as u64);
                        staging = self.retry_alone(&reqs, &groups, &retry, staging, &mut res);
                    }
                }
            }
        }

        // Deliver: read data to the device, then the completion words.
        let mut copies = Vec::new();
        for (gi, g) in groups.iter().enumerate().filter(|(_, g)| g.op == OP_READ) {
            for &i in &g.members {
                if res[i] == Some(reqs[i].length as i32) {
                    copies.push((i, stage_of(&groups, gi, i)));
                }
            }
        }
        for (i, d) in reqs.iter().enumerate() {
            if res[i].is_some_and(|r| r >= 0) {
                match d.opcode {
                    OP_READ => add(&c.bytes_read, d.length as u64),
                    OP_WRITE => add(&c.bytes_written, d.length as u64),
                    _ => {}
                }
            }
        }
        let base = staging
            .as_ref()
            .map(|b| b.as_aligned().as_ptr())
            .unwrap_or(std::ptr::null());
        if base.is_null() {
            for &(i, _) in &copies {
                res[i] = Some(code::EIO);
            }
            copies.clear();
        }
        self.deliver(&reqs, &res, &copies, Some(base));
        // `deliver` synchronized the stream: no copy reads the slab any more.
        if let Some(b) = staging {
            self.free.push(b);
        }
    }

    /// Commits and waits (bounded): the errors by command, and the staging slab back.
    #[allow(clippy::type_complexity)]
    fn run_cb(
        &mut self,
        cb: gpuio::CommandBuffer,
    ) -> std::result::Result<
        (BTreeMap<CommandId, Error>, Option<IoBuffer>),
        (Error, Option<IoBuffer>),
    > {
        let completion = cb.commit().map_err(|e| (e, None))?;
        wait_completion(completion, Instant::now() + self.shared.config.io_timeout)
    }

    /// Retries each request of failed coalesced transfers alone, once.
    fn retry_alone(
        &mut self,
        reqs: &[Desc],
        groups: &[Group],
        retry: &[usize],
        staging: Option<IoBuffer>,
        res: &mut [Option<i32>],
    ) -> Option<IoBuffer> {
        let Some(buf) = staging.or_else(|| self.staging()) else {
            for &i in retry {
                res[i] = Some(code::EIO);
            }
            return None;
        };
        let place = |i: usize| {
            let g = groups
                .iter()
                .find(|g| g.members.contains(&i))
                .expect("retried requests come from groups");
            g.stage + (reqs[i].offset - g.offset) as usize
        };
        let mut cb = self.queue.command_buffer();
        let mut ids = Vec::new();
        let mut out = None;
        if cb.set_buffer(buf).is_ok() {
            for &i in retry {
                let d = &reqs[i];
                let f = &self.shared.files[d.file_id as usize].file;
                let r = if d.opcode == OP_READ {
                    cb.load_into(f, d.offset, place(i), d.length as usize)
                } else {
                    cb.store_from(f, d.offset, place(i), d.length as usize)
                };
                match r {
                    Ok(id) => ids.push((i, id)),
                    Err(e) => res[i] = Some(code_of(&e)),
                }
            }
            add(&self.shared.counters.transfers, ids.len() as u64);
            match self.run_cb(cb) {
                Ok((errors, b)) => {
                    out = b;
                    for (i, id) in ids {
                        res[i] = Some(match errors.get(&id) {
                            None => reqs[i].length as i32,
                            Some(e) => code_of(e),
                        });
                    }
                }
                Err((e, b)) => {
                    out = b;
                    for (i, _) in ids {
                        res[i] = Some(code_of(&e));
                    }
                }
            }
        }
        for &i in retry {
            res[i].get_or_insert(code::EIO);
        }
        out
    }

    fn renew_stream(&mut self) {
        if let Ok(s) = self.device.copy_stream() {
            // Dropping the old stream waits for what it still had queued.
            self.stream = s;
            self.publish.stream_replaced();
        }
    }

    /// Queues the read copies (`(request, staging offset)` from `base`), then publishes every
    /// request's completion word after them.
    fn deliver(
        &mut self,
        reqs: &[Desc],
        res: &[Option<i32>],
        copies: &[(usize, usize)],
        base: Option<*const u8>,
    ) {
        let mut res = res.to_vec();
        if let Some(mapped) =
            base.and_then(|b| self.kernel.as_ref().and(self.pins.mapped(b as usize)))
        {
            if self.deliver_by_kernel(reqs, &mut res, copies, mapped) {
                self.count_delivered(reqs, &res);
            } else {
                // The reads failed (EIO now): their words go out by the publisher, with no copies.
                self.deliver(reqs, &res, &[], None);
            }
            return;
        }
        let mut last = None;
        if let Some(base) = base {
            let batch: Vec<HostToDevice> = copies
                .iter()
                .map(|&(i, off)| HostToDevice {
                    // SAFETY: `off` lies in the staging slab (placed by this round).
                    src: unsafe { base.add(off) },
                    len: reqs[i].length as usize,
                    dst: reqs[i].dev_addr,
                })
                .collect();
            // One call for the round's copies (one context bind and one event on a GPU, not one per
            // copy). SAFETY: each destination was validated against the registered device window;
            // the sources lie in the staging slab, which is not reused before `publish` has waited
            // for these copies (and the stream is synchronized below).
            match unsafe { self.stream.copy_h2d_many(&batch) } {
                Ok(t) => last = t,
                // An unknown prefix was queued: none of them is known to arrive.
                Err(_) => {
                    for &(i, _) in copies {
                        res[i] = Some(code::EIO);
                    }
                }
            }
        }
        let words = self.words(reqs, &res);
        // A stream-ordered publisher only queues the words: the synchronize is where a failed copy
        // shows, and then (sticky stream errors) none of the words queued after it was written.
        let published = self
            .publish
            .publish(self.stream.as_mut(), last, &words)
            .and_then(|()| self.stream.synchronize());
        if published.is_err() {
            // A copy failed (streams fail stickily: which one is unknown): every read of the round
            // reports EIO, on a fresh stream.
            for &(i, _) in copies {
                res[i] = Some(code::EIO);
            }
            self.renew_stream();
            let words = self.words(reqs, &res);
            let again = self
                .publish
                .publish(self.stream.as_mut(), None, &words)
                .and_then(|()| self.stream.synchronize());
            if again.is_err() {
                self.renew_stream();
            }
        }
        self.count_delivered(reqs, &res);
    }

    /// Delivers the round with one `gpuio_deliver` launch from the staging slab mapped at `mapped`
    /// (`copies`: `(request, offset in the slab)` of the reads with data), then synchronizes. On
    /// a failure the reads' results become EIO and `false` says the caller must publish the words
    /// itself, on the fresh stream this made.
    fn deliver_by_kernel(
        &mut self,
        reqs: &[Desc],
        res: &mut [Option<i32>],
        copies: &[(usize, usize)],
        mapped: DevicePtr,
    ) -> bool {
        if self.kernel.is_none() {
            return false;
        }
        let region = &self.shared.region;
        let count = region.layout().config.completion_count;
        let mut offset: Vec<Option<usize>> = vec![None; reqs.len()];
        for &(i, off) in copies {
            offset[i] = Some(off);
        }
        let descs: Vec<DeliveryDesc> = reqs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (src, dst, len) = match offset[i] {
                    Some(off) => (mapped + off as u64, d.dev_addr, d.length as u64),
                    None => (0, 0, 0),
                };
                let (word_addr, word) = if d.completion < count {
                    (
                        region.completion_addr(d.completion),
                        completion_word(d.tag, res[i].unwrap_or(code::EIO)),
                    )
                } else {
                    (0, 0)
                };
                DeliveryDesc {
                    src,
                    dst,
                    len,
                    word_addr,
                    word,
                }
            })
            .chain(self.taken_words().map(|(word_addr, word)| DeliveryDesc {
                word_addr,
                word,
                ..DeliveryDesc::default()
            }))
            .collect();
        let slab = self.kernel.as_mut().expect("checked above");
        // One launch (the array holds a full round and the hints); should a round ever not fit,
        // each launch is synchronized before the array is rewritten for the next.
        let ran = descs.chunks(slab.capacity()).try_for_each(|chunk| {
            // SAFETY: the sources lie in the mapped staging slab, not reused before the synchronize
            // below; destinations were validated against the registered device window and the
            // words lie in the ring set's device region; the previous launch from the array was
            // synchronized.
            unsafe { slab.launch(self.stream.as_mut(), chunk) }?;
            self.stream.synchronize()
        });
        if ran.is_ok() {
            return true;
        }
        for &(i, _) in copies {
            res[i] = Some(code::EIO);
        }
        self.renew_stream();
        false
    }

    /// Counts a delivered round's errors and unanswerable requests, and each ring's completions.
    fn count_delivered(&self, reqs: &[Desc], res: &[Option<i32>]) {
        let shared = self.shared.clone();
        let c = &shared.counters;
        let mut per_ring: BTreeMap<u32, u64> = BTreeMap::new();
        let count = self.shared.region.layout().config.completion_count;
        for (i, d) in reqs.iter().enumerate() {
            if res[i].is_some_and(|r| r < 0) {
                add(&c.errors, 1);
            }
            if d.completion >= count {
                add(&c.unanswerable, 1);
            }
            *per_ring.entry(d.ring).or_default() += 1;
        }
        for (r, n) in per_ring {
            self.shared
                .region
                .ring_control(r)
                .completed
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The round's completion words, then this thread's rings' taken hints.
    fn words(&self, reqs: &[Desc], res: &[Option<i32>]) -> Vec<(DevicePtr, u64)> {
        let region = &self.shared.region;
        let count = region.layout().config.completion_count;
        let mut words = Vec::with_capacity(reqs.len() + self.rings.len());
        for (i, d) in reqs.iter().enumerate() {
            if d.completion >= count {
                continue;
            }
            let r = res[i].unwrap_or(code::EIO);
            words.push((
                region.completion_addr(d.completion),
                completion_word(d.tag, r),
            ));
        }
        words.extend(self.taken_words());
        words
    }

    /// `(address, value)` of the taken hint of every ring this thread serves: how many of its
    /// positions this thread has taken so far (docs/rings.md, 1.5). Published with every round, so
    /// the hint a producer reads only ever lags; taking requests is always followed by a round that
    /// publishes it, so it never stays behind for good.
    fn taken_words(&self) -> impl Iterator<Item = (DevicePtr, u64)> + '_ {
        let region = &self.shared.region;
        self.rings
            .iter()
            .zip(&self.heads)
            .map(|(&r, &head)| (region.taken_addr(r), head))
    }
}
