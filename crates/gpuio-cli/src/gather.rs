//! `gpuio gather`: flags into a [`gpuio_workloads::gather::GatherConfig`], the summary or JSON out. The
//! workload (row sampling, the page cache, prefetch and the synchronous reference run) lives in
//! `gpuio_workloads::gather`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use gpuio::size::format_bytes;
use gpuio::Result;
use gpuio_cuda::rings::DeliveryPath;
use gpuio_workloads::cache::{parse_cache_size, CacheSize};
use gpuio_workloads::gather::{self as wl, parse_dist, Dist, GatherConfig, GatherRun};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct GatherArgs {
    /// The embedding table: rows of --row-bytes at row·row_bytes.
    #[arg(long)]
    table: PathBuf,
    /// Bytes per row.
    #[arg(long, value_parser = crate::parse_size)]
    row_bytes: u64,
    /// Rows per batch.
    #[arg(long)]
    batch: usize,
    /// Batches to run.
    #[arg(long)]
    batches: usize,
    /// Row popularity: uniform or zipf:S (Zipf with exponent S).
    #[arg(long, value_parser = parse_dist, default_value = "uniform")]
    dist: Dist,
    /// Cache capacity: bytes (256M, 1G) or a percentage of the table (default 20%).
    #[arg(long, value_parser = parse_cache_size)]
    cache_size: Option<CacheSize>,
    /// Cache line size (a power of two, 512 B to 64 KiB).
    #[arg(long, value_parser = crate::parse_size, default_value = "4K")]
    line_size: u64,
    /// Reads in flight.
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Largest read for a run of adjacent missing lines (0: one read per line).
    #[arg(long, value_parser = crate::parse_size, default_value = "128K")]
    coalesce: u64,
    /// Threads a gather issues its misses from (0: one per core when the file is memory-backed,
    /// where each miss is a copy on the issuing thread; else one).
    #[arg(long, default_value_t = 0)]
    issue_threads: usize,
    /// Issue the next batch's gather before computing the current one; also run the synchronous
    /// version and report the speedup.
    #[arg(long, value_enum, default_value = "off")]
    prefetch: OnOff,
    /// Busy-wait per batch, standing for the model's compute, in microseconds (at most 1000000).
    #[arg(long, default_value_t = 0)]
    compute_us: u64,
    /// Seed of the row indices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the gather runs: cache (the host page cache) or gpu-cache (a GPU kernel reads the rows
    /// itself through a device cache of --cache-size, served by the request rings).
    #[arg(long, default_value = "cache", value_parser = ["cache", "gpu-cache"])]
    mode: String,
    /// The GPU of --mode gpu-cache.
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// How the ring server hands lines to the GPU in --mode gpu-cache: "copies" (a DMA and a stream
    /// write per request) or "kernel" (one launch per polling round).
    #[arg(long, default_value = "copies")]
    delivery: DeliveryPath,
    /// Host polling threads serving the rings in --mode gpu-cache (0: 4, at most half the cores;
    /// the measured knee on an H200).
    #[arg(long, default_value_t = 0)]
    server_threads: usize,
    /// Copy every row out of the cache into a batch buffer, even where the rows could be read in
    /// place (a read-only table, rows inside one line, two batches' lines fitting in the cache).
    #[arg(long)]
    copy_rows: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

fn run_json(r: &GatherRun, rows: u64) -> Value {
    let mut v = json!({
        "seconds": r.seconds,
        "rows_per_sec": r.rows_per_sec(rows),
        "iops": r.iops(),
        "hit_rate": r.hit_rate,
        "reads_issued": r.reads_issued,
        "hits": r.hits,
        "misses": r.misses,
        "joined": r.joined,
        "bytes_read": r.bytes_read,
        "wait_seconds": r.wait_seconds,
        "issue_seconds": r.issue_seconds,
    });
    if r.warps > 0 {
        // GPU cache mode: each miss is a line request a warp sent through the rings.
        v["warps"] = json!(r.warps);
        v["requests_per_warp"] = json!(r.misses as f64 / r.warps as f64);
    }
    v
}

fn run_line(name: &str, r: &GatherRun, rows: u64) -> String {
    format!(
        "{name:<9} {:.3} s: {:.0} rows/s, {:.0} IOPS, hit rate {:.1}%, {} reads ({}), issuing {:.3} s, waiting {:.3} s",
        r.seconds,
        r.rows_per_sec(rows),
        r.iops(),
        r.hit_rate * 100.0,
        r.reads_issued,
        format_bytes(r.bytes_read as f64),
        r.issue_seconds,
        r.wait_seconds
    )
}

pub fn run(a: GatherArgs) -> Result<()> {
    let prefetch = a.prefetch == OnOff::On;
    let cfg = GatherConfig {
        table: a.table.clone(),
        row_bytes: a.row_bytes,
        batch: a.batch,
        batches: a.batches,
        dist: a.dist,
        cache: a.cache_size,
        line_size: a.line_size,
        queue_depth: a.queue_depth,
        coalesce: a.coalesce,
        issue_threads: a.issue_threads,
        prefetch,
        compute_us: a.compute_us,
        seed: a.seed,
        copy_rows: a.copy_rows,
        gpu: a.mode == "gpu-cache",
        device: a.device.clone(),
        delivery: a.delivery,
        server_threads: a.server_threads,
    };
    let spinner = crate::stream::spinner(a.json);
    let r = wl::gather(&cfg, &mut |p| {
        crate::stream::show_progress(spinner.as_ref(), p)
    });
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    let r = r?;
    let total_rows = r.rows_gathered;
    let rows = r.rows;
    let table_len = r.table_bytes;
    let capacity = r.cache_bytes;
    if a.json {
        let mut v = run_json(&r.main, total_rows);
        let extra = json!({
            "table": a.table.display().to_string(),
            "table_bytes": table_len,
            "rows": rows,
            "row_bytes": a.row_bytes,
            "batch": a.batch,
            "batches": a.batches,
            "rows_gathered": total_rows,
            "dist": a.dist.name(),
            "cache_bytes": capacity,
            "line_bytes": a.line_size,
            "queue_depth": a.queue_depth,
            "compute_us": a.compute_us,
            "prefetch": prefetch,
            "direct": r.direct,
            "mode": a.mode,
            "rows_in_place": r.rows_in_place.is_ok(),
            "rows_copied_because": r.rows_in_place.as_ref().err(),
            "checksum": format!("{:016x}", r.main.checksum),
        });
        if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
            o.extend(e);
            if let (Some(s), Some(x)) = (&r.sync, r.speedup) {
                o.insert("speedup".into(), json!(x));
                o.insert("sync".into(), run_json(s, total_rows));
            }
        }
        crate::report::print_json(&v)?;
    } else {
        outln!(
            "gather {} batches × {} rows of {} from {} ({}, {rows} rows), {}",
            a.batches,
            a.batch,
            format_bytes(a.row_bytes as f64),
            a.table.display(),
            format_bytes(table_len as f64),
            a.dist.name()
        )?;
        outln!(
            "cache {} ({:.0}% of the table), lines {}, QD {}, {}, compute {} µs per batch",
            format_bytes(capacity as f64),
            capacity as f64 * 100.0 / table_len as f64,
            format_bytes(a.line_size as f64),
            a.queue_depth,
            if r.direct {
                "direct I/O".to_string()
            } else {
                format!("buffered I/O ({})", r.direct_reason)
            },
            a.compute_us
        )?;
        match &r.rows_in_place {
            Ok(()) => outln!("rows read in place in the cache's lines (no copy)")?,
            Err(why) => outln!("rows copied out of the cache ({why})")?,
        }
        outln!(
            "{}",
            run_line(
                if prefetch { "prefetch:" } else { "sync:" },
                &r.main,
                total_rows
            )
        )?;
        if let (Some(s), Some(x)) = (&r.sync, r.speedup) {
            outln!("{}", run_line("sync:", s, total_rows))?;
            outln!("speedup (sync ÷ prefetch): {x:.2}×")?;
        }
    }
    Ok(())
}
