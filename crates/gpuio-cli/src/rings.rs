//! `gpuio rings FILE --device cuda:N [--json]`: GPU kernels issue their own reads of FILE through
//! the request rings — random reads straight through the rings, then an embedding gather through
//! the device cache without and with prefetch — every byte checked against the file. With
//! `--device cpu` the same random reads come from CPU producer threads on the host stand-in, which
//! measures the host server alone (no gather: that needs kernels). The library runs both
//! (`gpuio_cuda::rings::bench`, `gpuio_cuda::rings::host_bench`); this module turns flags into their
//! configs and prints.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use gpuio::{Engine, EngineConfig, Error, Result};
use gpuio_cuda::rings::bench::{run as run_bench, RingsBenchConfig};
use gpuio_cuda::rings::host_bench::{run as run_host_bench, HostRingsConfig};
use gpuio_cuda::rings::kernels::KernelRun;
use gpuio_cuda::rings::{DeliveryPath, ServerConfig};
use serde_json::json;

#[derive(Args, Debug)]
pub struct RingsArgs {
    /// The file the kernels read (random reads of it, and rows of it through the device cache).
    file: PathBuf,
    /// The GPU (cuda:N), or cpu: CPU threads issue the random reads through the rings instead of
    /// kernels, on the host stand-in (the server measured alone).
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Bytes per random read.
    #[arg(long, value_parser = crate::parse_size, default_value = "4K")]
    block_size: u64,
    /// Random reads to issue.
    #[arg(long, default_value_t = 1 << 18)]
    reads: u64,
    /// GPU threads issuing them (one read in flight each); with --device cpu, the reads in flight
    /// over all --producers.
    #[arg(long, default_value_t = 4096)]
    threads: u32,
    /// CPU producer threads issuing the reads with --device cpu.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Rows to gather through the device cache (0: no gather).
    #[arg(long, default_value_t = 1 << 16)]
    rows: u64,
    /// Bytes per row (a multiple of 4 that divides the line size).
    #[arg(long, value_parser = crate::parse_size, default_value = "4K")]
    row_bytes: u64,
    /// The device cache's line size.
    #[arg(long, value_parser = crate::parse_size, default_value = "4K")]
    line_size: u64,
    /// The device cache's capacity.
    #[arg(long, value_parser = crate::parse_size, default_value = "64M")]
    cache_size: u64,
    /// Warps gathering at once.
    #[arg(long, default_value_t = 1024)]
    warps: u32,
    /// Host polling threads serving the rings.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// How the server hands a round's data and completions to the device: "copies" (a DMA and a
    /// stream write per request) or "kernel" (one launch per round reading the staging in place).
    #[arg(long, default_value = "copies")]
    delivery: DeliveryPath,
    /// Request rings.
    #[arg(long, default_value_t = 8)]
    rings: u32,
    /// Seed of the offsets and rows.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest a kernel may run, seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn u32_arg(v: u64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::invalid(format!("--{what} {v} is too large")))
}

fn run_json(r: &KernelRun) -> serde_json::Value {
    json!({
        "requests": r.requests,
        "bytes": r.bytes,
        "seconds": r.elapsed.as_secs_f64(),
        "requests_per_sec": r.requests_per_sec(),
        "bytes_per_sec": r.bytes_per_sec(),
        "threads": r.threads,
        "verified_bytes": r.verified_bytes,
        "server": {
            "requests": r.server.requests,
            "reads": r.server.reads,
            "transfers": r.server.transfers,
            "coalesced_reads": r.server.coalesced_reads,
            "batches": r.server.batches,
            "errors": r.server.errors,
            "bytes_read": r.server.bytes_read,
        },
    })
}

pub fn run(a: RingsArgs) -> Result<()> {
    if a.device == "cpu" {
        return run_host(a);
    }
    let config = RingsBenchConfig {
        file: a.file.clone(),
        read_bytes: u32_arg(a.block_size, "block-size")?,
        reads: a.reads,
        threads: a.threads,
        rows: a.rows,
        row_bytes: u32_arg(a.row_bytes, "row-bytes")?,
        line_bytes: u32_arg(a.line_size, "line-size")?,
        cache_bytes: a.cache_size,
        warps: a.warps,
        server_threads: a.server_threads,
        delivery: a.delivery,
        rings: a.rings,
        seed: a.seed,
        timeout: Duration::from_secs(a.timeout),
    };
    let device = gpuio_cuda::open_device(&a.device)?;
    let engine = Engine::new(EngineConfig::default())?;
    let r = run_bench(&engine, &device, &config)?;
    if a.json {
        let mut v = json!({
            "file": a.file,
            "file_bytes": r.file_bytes,
            "device": r.device,
            "publisher": r.publisher,
            "delivery": r.delivery,
            "random_reads": run_json(&r.random_reads),
        });
        if let (Some(s), Some(p)) = (&r.gather_sync, &r.gather_prefetch) {
            v["gather_sync"] = run_json(s);
            v["gather_prefetch"] = run_json(p);
            v["prefetch_speedup"] = json!(s.elapsed.as_secs_f64() / p.elapsed.as_secs_f64());
        }
        return crate::report::print_json(&v);
    }
    outln!(
        "{} on {} ({} bytes); completions: {}; delivery: {}",
        a.file.display(),
        r.device,
        r.file_bytes,
        r.publisher,
        r.delivery
    )?;
    print_run("random reads", &r.random_reads, "threads")?;
    if let (Some(s), Some(p)) = (&r.gather_sync, &r.gather_prefetch) {
        print_run("gather, synchronous", s, "threads")?;
        print_run("gather, prefetch", p, "threads")?;
        outln!(
            "prefetch speedup {:.2} x",
            s.elapsed.as_secs_f64() / p.elapsed.as_secs_f64()
        )?;
    }
    Ok(())
}

/// One run's line: requests, time, rates, and what `threads` counts (`issuers`).
fn print_run(name: &str, k: &KernelRun, issuers: &str) -> Result<()> {
    outln!(
        "{name:<22} {:>10} requests in {:.3} s: {:>12.0} requests/s, {:>7.2} GB/s ({} {issuers}; {} bytes checked)",
        k.requests,
        k.elapsed.as_secs_f64(),
        k.requests_per_sec(),
        k.bytes_per_sec() / 1e9,
        k.threads,
        k.verified_bytes
    )
}

/// `--device cpu`: CPU producers on the host stand-in.
fn run_host(a: RingsArgs) -> Result<()> {
    let config = HostRingsConfig {
        file: a.file.clone(),
        read_bytes: u32_arg(a.block_size, "block-size")?,
        reads: a.reads,
        in_flight: a.threads,
        producers: a.producers,
        server: ServerConfig {
            threads: a.server_threads,
            delivery: a.delivery,
            ..ServerConfig::default()
        },
        rings: a.rings,
        seed: a.seed,
        timeout: Duration::from_secs(a.timeout),
    };
    let device = gpuio_cuda::open_device(&a.device)?;
    let engine = Engine::new(EngineConfig::default())?;
    let r = run_host_bench(&engine, &device, &config)?;
    if a.json {
        return crate::report::print_json(&json!({
            "file": a.file,
            "device": device.label(),
            "producers": a.producers,
            "in_flight": a.threads,
            "server_threads": a.server_threads,
            "random_reads": run_json(&r.reads),
            "cpu": {
                "producers_s": r.producer_cpu_s,
                "process_s": r.process_cpu_s,
                "copy_engine_s": r.copy_engine_cpu_s,
                "server_us_per_request": r.server_cpu_us_per_request(),
            },
        }));
    }
    outln!(
        "{}: random reads by {} CPU producer(s) on {}, {} polling thread(s)",
        a.file.display(),
        a.producers,
        device.label(),
        a.server_threads
    )?;
    print_run("random reads", &r.reads, "in flight")?;
    outln!(
        "CPU: {:.2} µs per request for the server (of the process's {:.3} s, the producers took {:.3} s and the stand-in's copy engine {:.3} s)",
        r.server_cpu_us_per_request(),
        r.process_cpu_s,
        r.producer_cpu_s,
        r.copy_engine_cpu_s
    )
}
