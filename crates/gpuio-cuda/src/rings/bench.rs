//! `gpuio rings`: the ring workloads end to end on a GPU — random reads issued by kernel threads
//! straight through the rings, then an embedding gather through the device cache without and with
//! prefetch — each on a freshly started server, every byte checked against the file (all of
//! the gather, a sample of the random reads), timed from launch to finish.
//!
//! The comparison with the host engine's own random reads is made by running `gpuio bench` on the
//! same file in the same run (scripts/bench-gpu.py, section `rings`). This module sets up and runs;
//! the CLI prints. It never runs on a device without kernels: [`run`] fails first, saying why.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpuio::{Engine, Error, File, Result};

use super::deliver::DeliveryPath;
use super::kernels::{self, DeviceCache, KernelRun, Workloads};
use super::layout::RingConfig;
use super::region::RingRegion;
use super::server::{RingServer, ServerConfig};
use crate::device::{Device, DeviceBuffer};

/// What to run.
#[derive(Debug, Clone)]
pub struct RingsBenchConfig {
    pub file: PathBuf,
    /// Bytes per random read (a multiple of 512, at most 1 MiB).
    pub read_bytes: u32,
    /// Random reads to issue.
    pub reads: u64,
    /// GPU threads issuing them (one read in flight each).
    pub threads: u32,
    /// Rows to gather (0: skip the gather).
    pub rows: u64,
    /// Bytes per row (a multiple of 4 dividing the line size).
    pub row_bytes: u32,
    /// The device cache's line size and capacity.
    pub line_bytes: u32,
    pub cache_bytes: u64,
    /// Warps gathering at once.
    pub warps: u32,
    /// Host polling threads.
    pub server_threads: usize,
    /// How the server delivers rounds to the device.
    pub delivery: DeliveryPath,
    /// Rings (kernels pick one by block).
    pub rings: u32,
    pub seed: u64,
    /// The longest any kernel may run.
    pub timeout: Duration,
}

impl Default for RingsBenchConfig {
    fn default() -> Self {
        RingsBenchConfig {
            file: PathBuf::new(),
            read_bytes: 4096,
            reads: 1 << 18,
            threads: 4096,
            rows: 1 << 16,
            row_bytes: 4096,
            line_bytes: 4096,
            cache_bytes: 64 << 20,
            warps: 1024,
            server_threads: 2,
            delivery: DeliveryPath::Copies,
            rings: 8,
            seed: 1,
            timeout: Duration::from_secs(120),
        }
    }
}

/// What ran.
#[derive(Debug, Clone)]
pub struct RingsBenchReport {
    pub device: String,
    pub file_bytes: u64,
    /// How completions reach device memory, and why.
    pub publisher: String,
    /// How rounds reached the device ([`RingServer::delivery`]).
    pub delivery: String,
    pub random_reads: KernelRun,
    /// Without and with prefetch (absent when no rows were asked for).
    pub gather_sync: Option<KernelRun>,
    pub gather_prefetch: Option<KernelRun>,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Random reads of `read_bytes` must be a multiple of 512, at most 1 MiB (shared with
/// [`super::host_bench`]).
pub(super) fn check_read_bytes(read_bytes: u32) -> Result<()> {
    if read_bytes == 0 || read_bytes % 512 != 0 || read_bytes > 1 << 20 {
        return Err(Error::invalid(format!(
            "reads of {read_bytes} bytes: a multiple of 512 up to 1 MiB"
        )));
    }
    Ok(())
}

/// `path` opened for random reads of whole `read_bytes` blocks, its size, and the offsets of `reads`
/// of them drawn from the xorshift `state` (later draws continue from it).
pub(super) fn open_random_reads(
    path: &std::path::Path,
    read_bytes: u32,
    reads: u64,
    state: &mut u64,
) -> Result<(File, u64, Vec<u64>)> {
    let file = File::open(path)?;
    let size = file.len()?;
    let blocks = size / read_bytes as u64;
    if blocks == 0 {
        return Err(Error::invalid(format!(
            "{}: {size} bytes, smaller than one {read_bytes}-byte read",
            path.display()
        )));
    }
    let offsets = (0..reads)
        .map(|_| (xorshift(state) % blocks) * read_bytes as u64)
        .collect();
    Ok((file, size, offsets))
}

/// Runs the workloads on `device`.
pub fn run(
    engine: &Engine,
    device: &Arc<dyn Device>,
    c: &RingsBenchConfig,
) -> Result<RingsBenchReport> {
    check_read_bytes(c.read_bytes)?;
    let mut w = Workloads::load(device)?;
    let mut state = c.seed | 1;
    let (file, size, offsets) = open_random_reads(&c.file, c.read_bytes, c.reads, &mut state)?;
    let slots = (c.cache_bytes / c.line_bytes.max(1) as u64).clamp(1, 1 << 22) as u32;
    // Whole blocks of threads, one completion word each.
    let threads = c.threads.max(1).div_ceil(kernels::BLOCK) * kernels::BLOCK;
    // A fresh region per run: tags restart at 1 in each, so words left by an earlier run must not
    // be there to be mistaken for a new completion.
    let region = || -> Result<Arc<RingRegion>> {
        Ok(Arc::new(RingRegion::new(
            device,
            RingConfig {
                ring_count: c.rings,
                slots_per_ring: 1024,
                completion_count: threads.max(slots),
                line_bytes: c.line_bytes,
                max_request_bytes: c.read_bytes.max(c.line_bytes),
            },
        )?))
    };
    let server_config = ServerConfig {
        threads: c.server_threads,
        delivery: c.delivery,
        ..ServerConfig::default()
    };

    let dst = DeviceBuffer::alloc(device, threads as usize * c.read_bytes as usize)?;
    let region_reads = region()?;
    let server = RingServer::start_auto(
        engine,
        region_reads.clone(),
        vec![file.clone()],
        (dst.ptr(), dst.len()),
        server_config.clone(),
    )?;
    let publisher = server.publisher().map_or_else(
        || "given".to_string(),
        |p| format!("{}: {}", p.kind.name(), p.reason),
    );
    let delivery = server.delivery().to_string();
    let random_reads = kernels::random_reads(
        &mut w,
        &server,
        &region_reads,
        0,
        &c.file,
        &offsets,
        c.read_bytes,
        threads,
        &dst,
        c.timeout,
    );
    if random_reads.is_err() && w.hung() {
        // A kernel still running writes `dst` and uses the rings: keep them.
        std::mem::forget(dst);
        std::mem::forget(region_reads);
        server.shutdown();
        return Err(random_reads.expect_err("checked above"));
    }
    server.shutdown();
    let random_reads = random_reads?;
    drop(dst);

    let (mut gather_sync, mut gather_prefetch) = (None, None);
    if c.rows > 0 {
        let rows_in_file = size / c.row_bytes.max(1) as u64;
        if rows_in_file == 0 {
            return Err(Error::invalid(format!(
                "{}: {size} bytes, smaller than one {}-byte row",
                c.file.display(),
                c.row_bytes
            )));
        }
        let rows: Vec<u64> = (0..c.rows)
            .map(|_| xorshift(&mut state) % rows_in_file)
            .collect();
        for prefetch in [false, true] {
            // A fresh region, cache and server per run: all start cold and unused.
            let region = region()?;
            let cache = DeviceCache::new(&region, 0, size, slots, 0)?;
            let server = RingServer::start_auto(
                engine,
                region.clone(),
                vec![file.clone()],
                cache.window(),
                server_config.clone(),
            )?;
            let r = kernels::gather_rows(
                &mut w,
                &server,
                &cache,
                &c.file,
                &rows,
                c.row_bytes,
                c.warps,
                prefetch,
                c.timeout,
            );
            if r.is_err() && w.hung() {
                // A kernel still running uses the cache and the rings: keep them.
                std::mem::forget(cache);
                std::mem::forget(region);
            }
            server.shutdown();
            let r = r?;
            if prefetch {
                gather_prefetch = Some(r);
            } else {
                gather_sync = Some(r);
            }
        }
    }
    Ok(RingsBenchReport {
        device: device.label(),
        file_bytes: size,
        publisher,
        delivery,
        random_reads,
        gather_sync,
        gather_prefetch,
    })
}
