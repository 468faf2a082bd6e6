//! `gpuio rings FILE --device cpu`: the ring server measured without a GPU. CPU threads speak the
//! ring protocol ([`RingProducer`], the reference `device/gpuio.cuh` mirrors) on the host stand-in,
//! keeping a fixed number of random reads in flight, and the server serves them exactly as it serves
//! kernels: polling rounds, the engine's batch API into its staging slabs, a copy out of the slab
//! into "device" memory, then the completion word.
//!
//! What it is for: the host half of GPU-issued I/O at memory speed. On a GPU the kernels' side and
//! the PCIe link add their costs; here only the server's remain, so its requests per second and its
//! CPU time per request can be set against the engine's own reads of the same file in the same run
//! (`gpuio bench --pattern randread`), on any Linux machine. The producers' CPU time is measured
//! apart (per-thread CPU clocks) and left out of the server's.
//!
//! Every read is checked for its length, and one in [`VERIFY_EVERY`] byte for byte against the file.
//! Every wait is bounded by the configured timeout. This module never runs on a GPU: device memory
//! must be host-addressable ([`RingRegion::require_host_addressable`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::{Engine, Error, ErrorKind, File, Result};

use super::bench::{check_read_bytes, open_random_reads};
use super::kernels::KernelRun;
use super::layout::{code, RingConfig, OP_READ};
use super::producer::{Backoff, Request, RingProducer};
use super::region::RingRegion;
use super::server::{HostStorePublish, Publish, RingServer, ServerConfig};
use crate::device::{Device, DeviceBuffer};

/// One read in this many is compared with the file byte for byte.
pub const VERIFY_EVERY: u64 = 64;

/// The name of the stand-in's copy threads (`crate::device`'s copy worker).
const COPY_THREAD: &str = "gpuio-cpu-copy";

/// What to run.
#[derive(Debug, Clone)]
pub struct HostRingsConfig {
    pub file: std::path::PathBuf,
    /// Bytes per random read (a multiple of 512, at most 1 MiB).
    pub read_bytes: u32,
    /// Reads to issue.
    pub reads: u64,
    /// Reads in flight at once, over all producers (one completion word each).
    pub in_flight: u32,
    /// CPU producer threads.
    pub producers: usize,
    /// The server's configuration (polling threads, batch sizes, staging).
    pub server: ServerConfig,
    /// Request rings (producer p submits on ring p % rings).
    pub rings: u32,
    pub seed: u64,
    /// The longest the whole run may take.
    pub timeout: Duration,
}

/// What ran and what it cost.
#[derive(Debug, Clone)]
pub struct HostRingsRun {
    /// The reads, in the figures a kernel's run reports: `threads` is the reads in flight,
    /// `elapsed` runs from the first submission to the last completion, `verified_bytes` the
    /// sampled reads'.
    pub reads: KernelRun,
    /// CPU seconds of the producer threads.
    pub producer_cpu_s: f64,
    /// CPU seconds of the whole process over the run, producers included.
    pub process_cpu_s: f64,
    /// CPU seconds of the stand-in's copy threads (`gpuio-cpu-copy`: what a GPU's copy engine does)
    /// over the run; 0 where `/proc/self/task` cannot be read.
    pub copy_engine_cpu_s: f64,
}

impl HostRingsRun {
    /// CPU microseconds per request of everything but the producers and the stand-in's copy
    /// threads: the server's polling threads and the engine (and the kernel's io_uring workers)
    /// under them.
    pub fn server_cpu_us_per_request(&self) -> f64 {
        (self.process_cpu_s - self.producer_cpu_s - self.copy_engine_cpu_s).max(0.0) * 1e6
            / self.reads.requests.max(1) as f64
    }
}

fn thread_cpu_s() -> f64 {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu_s() -> f64 {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU seconds so far of this process's threads whose name starts with `prefix`
/// (`/proc/self/task/*/stat`, user + system); 0 where it cannot be read.
fn threads_cpu_s(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut sum = 0.0;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ...": the name may hold spaces; fields 14 and 15 (utime, stime) follow.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        sum += (field(11) + field(12)) / ticks;
    }
    sum
}

fn cpu_clock(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain syscall writing into a local timespec.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs the reads on `device` (the host stand-in).
pub fn run(engine: &Engine, device: &Arc<dyn Device>, c: &HostRingsConfig) -> Result<HostRingsRun> {
    check_read_bytes(c.read_bytes)?;
    if !(1..=64).contains(&c.producers) || c.in_flight == 0 || c.in_flight > 1 << 16 {
        return Err(Error::invalid(format!(
            "{} producers with {} reads in flight: 1..=64 producers, 1..=65536 in flight",
            c.producers, c.in_flight
        )));
    }
    let mut state = c.seed | 1;
    let (file, _, offsets) = open_random_reads(&c.file, c.read_bytes, c.reads, &mut state)?;
    let words = c.in_flight.max(c.producers as u32);
    let region = Arc::new(RingRegion::new(
        device,
        RingConfig {
            ring_count: c.rings,
            slots_per_ring: 1024,
            completion_count: words,
            line_bytes: c.read_bytes,
            max_request_bytes: c.read_bytes,
        },
    )?);
    region.require_host_addressable()?;
    let dst = DeviceBuffer::alloc(device, words as usize * c.read_bytes as usize)?;
    // SAFETY: the region is host-addressable (checked above): device addresses are host addresses.
    let publish = || Box::new(unsafe { HostStorePublish::new() }) as Box<dyn Publish>;
    let server = RingServer::start(
        engine,
        region.clone(),
        vec![file.clone()],
        (dst.ptr(), dst.len()),
        &publish,
        c.server.clone(),
    )?;
    let next = AtomicU64::new(0);
    let deadline = Instant::now() + c.timeout;
    let before = server.stats();
    let cpu0 = process_cpu_s();
    let copy0 = threads_cpu_s(COPY_THREAD);
    let t0 = Instant::now();
    let per = words.div_ceil(c.producers as u32);
    let results: Vec<Result<(u64, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..c.producers as u32)
            .map(|p| {
                let first = p * per;
                let last = ((p + 1) * per).min(words);
                let (region, offsets, next, file) = (&region, &offsets, &next, &file);
                let dst = dst.ptr();
                s.spawn(move || {
                    let cpu = thread_cpu_s();
                    // SAFETY: the region is host-addressable (checked above).
                    let producer = unsafe { RingProducer::new(region.clone()) };
                    let r = produce(
                        &producer,
                        p % c.rings.max(1),
                        first..last,
                        offsets,
                        next,
                        file,
                        dst,
                        c.read_bytes,
                        deadline,
                    );
                    r.map(|v| (v, thread_cpu_s() - cpu))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a producer thread panicked"))
            .collect()
    });
    let elapsed = t0.elapsed();
    let process_cpu = process_cpu_s() - cpu0;
    let copy_cpu = threads_cpu_s(COPY_THREAD) - copy0;
    let stats = server.stats().since(&before);
    server.shutdown();
    let mut verified = 0;
    let mut producer_cpu = 0.0;
    for r in results {
        let (v, cpu) = r?;
        verified += v;
        producer_cpu += cpu;
    }
    Ok(HostRingsRun {
        reads: KernelRun {
            requests: c.reads,
            bytes: c.reads * c.read_bytes as u64,
            elapsed,
            server: stats,
            threads: words as u64,
            verified_bytes: verified,
        },
        producer_cpu_s: producer_cpu,
        process_cpu_s: process_cpu,
        copy_engine_cpu_s: copy_cpu,
    })
}

/// One producer: keeps a read in flight on each of its completion words until the reads run out;
/// returns the bytes it compared with the file.
#[allow(clippy::too_many_arguments)]
fn produce(
    producer: &RingProducer,
    ring: u32,
    words: std::ops::Range<u32>,
    offsets: &[u64],
    next: &AtomicU64,
    file: &File,
    dst: u64,
    len: u32,
    deadline: Instant,
) -> Result<u64> {
    let n = offsets.len() as u64;
    let take = || {
        let i = next.fetch_add(1, Ordering::Relaxed);
        (i < n).then_some(i)
    };
    let addr = |w: u32| dst + w as u64 * len as u64;
    let submit = |w: u32, tag: u32, i: u64| -> Result<()> {
        let req = Request {
            opcode: OP_READ,
            file_id: 0,
            offset: offsets[i as usize],
            length: len,
            completion: w,
            dev_addr: addr(w),
            tag,
        };
        let mut retries = 0;
        producer
            .submit_until(ring, &req, deadline, &mut retries)
            .map_err(|e| ring_error(e, "submitting", offsets[i as usize], file))
    };
    // (tag, read index) of the read in flight on each word.
    let mut pending: Vec<Option<(u32, u64)>> = Vec::with_capacity(words.len());
    for w in words.clone() {
        let slot = take();
        if let Some(i) = slot {
            submit(w, 1, i)?;
        }
        pending.push(slot.map(|i| (1, i)));
    }
    let mut verified = 0u64;
    let mut check = vec![0u8; len as usize];
    // The reference: the file read with plain pread, apart from the server's descriptors.
    let reference = std::fs::File::open(file.path())
        .map_err(|e| Error::from_io(gpuio::error::Op::Open, &e).with_path(file.path()))?;
    let mut backoff = Backoff::default();
    while pending.iter().any(Option::is_some) {
        let mut progressed = false;
        for (k, w) in words.clone().enumerate() {
            let Some((tag, i)) = pending[k] else { continue };
            let Some(res) = producer.poll(w, tag) else {
                continue;
            };
            progressed = true;
            let off = offsets[i as usize];
            if res != len as i32 {
                return Err(ring_error(res, "reading", off, file));
            }
            if i % VERIFY_EVERY == 0 {
                std::os::unix::fs::FileExt::read_exact_at(&reference, &mut check, off).map_err(
                    |e| Error::from_io(gpuio::error::Op::Read, &e).with_path(file.path()),
                )?;
                let at = producer.host_address(addr(w));
                // SAFETY: the read on this word completed (its word was acquired by poll), and no
                // other request writes here until this producer submits on the word again.
                let got = unsafe { std::slice::from_raw_parts(at as *const u8, len as usize) };
                if got != check.as_slice() {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("the ring read at offset {off} differs from the file"),
                    )
                    .with_path(file.path()));
                }
                verified += len as u64;
            }
            pending[k] = match take() {
                Some(j) => {
                    let t = if tag == u32::MAX { 1 } else { tag + 1 };
                    submit(w, t, j)?;
                    Some((t, j))
                }
                None => None,
            };
        }
        if progressed {
            backoff.reset();
        } else {
            if Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Io,
                    "the ring reads did not finish within the timeout",
                )
                .with_path(file.path()));
            }
            backoff.snooze();
        }
    }
    Ok(verified)
}

/// A read's error result (or a refused submission), naming the file and offset.
fn ring_error(res: i32, what: &str, offset: u64, file: &File) -> Error {
    Error::new(
        ErrorKind::Io,
        format!(
            "{what} the ring read at offset {offset}: {} ({res})",
            code::name(res)
        ),
    )
    .with_path(file.path())
}
