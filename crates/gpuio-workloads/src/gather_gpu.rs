//! `gpuio gather --mode gpu-cache`: the DLRM-style gather of [`crate::gather`] with a GPU kernel
//! reading the rows itself (`gpuio_gather_rows` of `gpuio_cuda::rings::kernels`) through a device
//! cache of the run's capacity and line size, served by the request rings on this host. The same
//! batches of the same rows as the host modes, folded into the same checksum (the rows are copied back
//! after each batch for it, outside the timed kernel), so the modes' results compare directly.
//!
//! "Prefetch" here is the kernel's own (AGILE's submit-and-continue: a warp requests its next row's
//! line before waiting for the current one), and the synchronous reference is the same kernel
//! without it. The time of a run is the sum of its kernels' times. The device cache counts no hits:
//! a miss is a line the server filled (`reads_issued` its transfers after coalescing), a hit every
//! other row, a row that waited for a line already in flight included. Never prints.

use std::time::Duration;

use gpuio::{Error, Result};
use gpuio_cuda::rings::kernels::{gather_rows_out, DeviceCache, Workloads};
use gpuio_cuda::rings::{RingConfig, RingRegion, RingServer, ServerConfig};

use crate::gather::{fold_row, GatherRun, Indices, Plan, Steps};
use crate::{report, Report};

/// Warps gathering at once (capped by the kernel at a quarter of the cache's lines).
const WARPS: u32 = 2048;
/// The longest one batch's kernel may run.
const BATCH_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn run_once(
    p: &Plan<'_>,
    prefetch: bool,
    progress: Report<'_>,
    steps: &Steps,
) -> Result<GatherRun> {
    let a = p.a;
    report(progress, steps.step(0))?;
    let line_bytes = u32::try_from(a.line_size)
        .map_err(|_| Error::invalid(format!("--line-size {} is too large", a.line_size)))?;
    let row_bytes = u32::try_from(a.row_bytes)
        .ok()
        .filter(|&r| r % 4 == 0 && r <= line_bytes && line_bytes % r == 0);
    let Some(row_bytes) = row_bytes else {
        return Err(Error::invalid(format!(
            "--mode gpu-cache gathers rows that lie inside one line: --row-bytes {} must be a multiple of 4 that divides --line-size {}",
            a.row_bytes, a.line_size
        )));
    };
    if a.compute_us > 0 {
        return Err(Error::invalid(
            "--compute-us is the host's stand-in for compute between batches; --mode gpu-cache overlaps inside the kernel (--prefetch on) and takes none",
        ));
    }
    let device = gpuio_cuda::open_device(&a.device)?;
    let mut w = Workloads::load(&device)?;
    // Cold, as the host modes start.
    p.file.drop_page_cache()?;
    let slots = (p.capacity / a.line_size).clamp(4, 1 << 22) as u32;
    let region = std::sync::Arc::new(RingRegion::new(
        &device,
        RingConfig {
            ring_count: 8,
            slots_per_ring: 1024,
            completion_count: slots,
            line_bytes,
            max_request_bytes: line_bytes,
        },
    )?);
    let table_bytes = p.file.len()?;
    let cache = DeviceCache::new(&region, 0, table_bytes, slots, 0)?;
    let server = RingServer::start_auto(
        p.engine,
        region.clone(),
        vec![p.file.clone()],
        cache.window(),
        ServerConfig {
            threads: gpuio_cuda::rings::polling_threads(a.server_threads),
            delivery: a.delivery,
            ..ServerConfig::default()
        },
    )?;
    let r = batches(
        p, &mut w, &server, &cache, row_bytes, prefetch, progress, steps,
    );
    if r.is_err() && w.hung() {
        // A kernel still running uses the cache and the rings: keep them.
        std::mem::forget(cache);
        std::mem::forget(region);
    }
    let stats = server.shutdown();
    let (seconds, checksum) = r?;
    let rows = (a.batch * a.batches) as u64;
    let misses = stats.requests.min(rows);
    Ok(GatherRun {
        seconds,
        wait_seconds: seconds,
        issue_seconds: 0.0,
        reads_issued: stats.transfers,
        hit_rate: 1.0 - misses as f64 / rows.max(1) as f64,
        hits: rows - misses,
        misses,
        joined: 0,
        bytes_read: stats.bytes_read,
        checksum,
        warps: WARPS as u64 * a.batches as u64,
    })
}

#[allow(clippy::too_many_arguments)]
fn batches(
    p: &Plan<'_>,
    w: &mut Workloads,
    server: &RingServer,
    cache: &DeviceCache,
    row_bytes: u32,
    prefetch: bool,
    progress: Report<'_>,
    steps: &Steps,
) -> Result<(f64, u64)> {
    let a = p.a;
    let mut idx = Indices::new(a.dist, p.rows, a.seed);
    let mut ranges = Vec::with_capacity(a.batch);
    let mut rows = Vec::with_capacity(a.batch);
    let (mut seconds, mut sum) = (0.0, 0u64);
    for k in 0..a.batches {
        idx.fill(a.batch, a.row_bytes, &mut ranges);
        rows.clear();
        rows.extend(ranges.iter().map(|&(off, _)| off / a.row_bytes));
        let (run, got) = gather_rows_out(
            w,
            server,
            cache,
            &rows,
            row_bytes,
            WARPS,
            prefetch,
            BATCH_TIMEOUT,
        )?;
        seconds += run.elapsed.as_secs_f64();
        for row in got.chunks_exact(row_bytes as usize) {
            sum = fold_row(sum, row);
        }
        report(progress, steps.step(k + 1))?;
    }
    Ok((seconds, sum))
}
