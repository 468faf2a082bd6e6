//! `gpuio bfs`: flags into a [`gpuio_workloads::bfs::BfsConfig`], the summary or JSON out. The search
//! (cache, memory and mmap modes) lives in `gpuio_workloads::bfs`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use gpuio::size::format_bytes;
use gpuio::Result;
use gpuio_cuda::rings::DeliveryPath;
use gpuio_workloads::bfs::{self as wl, BfsConfig};
use gpuio_workloads::cache::{parse_cache_size, CacheSize};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The edge file through the gpu-io page cache (direct I/O), frontier by frontier in batches.
    Cache,
    /// The whole edge file read into RAM first (load time reported apart).
    Memory,
    /// The edge file through an mmap, the OS page cache dropped first.
    Mmap,
    /// On a GPU (--device): the kernel reads the edges itself through a device cache of --cache-size.
    GpuCache,
    /// On a GPU (--device), the whole edge file copied into device memory first (load time
    /// reported apart): the in-memory reference of gpu-cache.
    GpuMemory,
}

impl From<Mode> for wl::Mode {
    fn from(m: Mode) -> wl::Mode {
        match m {
            Mode::Cache => wl::Mode::Cache,
            Mode::Memory => wl::Mode::Memory,
            Mode::Mmap => wl::Mode::Mmap,
            Mode::GpuCache => wl::Mode::GpuCache,
            Mode::GpuMemory => wl::Mode::GpuMemory,
        }
    }
}

#[derive(Args, Debug)]
pub struct BfsArgs {
    /// The graph: PREFIX.bel.col (vertex offsets) and PREFIX.bel.dst (edge destinations).
    #[arg(value_name = "PREFIX")]
    prefix: PathBuf,
    /// Vertex to start from.
    #[arg(long)]
    source: u64,
    /// Cache capacity: bytes (256M, 1G) or a percentage of the edge file (default 20%).
    #[arg(long, value_parser = parse_cache_size)]
    cache_size: Option<CacheSize>,
    /// How the edge file is read.
    #[arg(long, value_enum, default_value = "cache")]
    mode: Mode,
    /// Cache line size (a power of two, 512 B to 64 KiB). 16 KiB by default, not the cache's 4 KiB: a
    /// BFS level scans adjacency lists in ascending order, and at 4 KiB the per-line work costs more
    /// than the bytes (measured: docs/BENCHMARKS.md, page cache section 4).
    #[arg(long, value_parser = crate::parse_size, default_value = "16K")]
    line_size: u64,
    /// Reads in flight (cache mode).
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Largest read for a run of adjacent missing lines (0: one read per line).
    #[arg(long, value_parser = crate::parse_size, default_value = "128K")]
    coalesce: u64,
    /// Threads a gather issues its misses from (0: one per core when the file is memory-backed,
    /// where each miss is a copy on the issuing thread; else one).
    #[arg(long, default_value_t = 0)]
    issue_threads: usize,
    /// Write every vertex's depth here as little-endian i32, -1 for unreachable.
    #[arg(long, value_name = "FILE")]
    depths_out: Option<PathBuf>,
    /// The GPU of --mode gpu-cache and gpu-memory.
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
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BfsArgs) -> Result<()> {
    let cfg = BfsConfig {
        prefix: a.prefix.clone(),
        source: a.source,
        mode: a.mode.into(),
        cache: a.cache_size,
        line_size: a.line_size,
        queue_depth: a.queue_depth,
        coalesce: a.coalesce,
        issue_threads: a.issue_threads,
        depths_out: a.depths_out.clone(),
        device: a.device.clone(),
        delivery: a.delivery,
        server_threads: a.server_threads,
    };
    let pb = crate::stream::spinner(a.json);
    let r = wl::bfs(&cfg, &mut |p| crate::stream::show_progress(pb.as_ref(), p));
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let r = r?;
    if a.json {
        let (hit_rate, reads, iops) = match (&r.cache, &r.gpu, r.iops()) {
            (Some(c), _, Some(iops)) => (
                json!(c.stats.hit_rate()),
                json!(c.stats.reads_issued),
                json!(iops),
            ),
            (None, Some(g), Some(iops)) => {
                (json!(g.hit_rate()), json!(g.reads_issued), json!(iops))
            }
            _ => (Value::Null, Value::Null, Value::Null),
        };
        let mut v = json!({
            "graph": r.graph,
            "mode": r.mode.name(),
            "source": r.source,
            "source_degree": r.source_degree,
            "vertices": r.vertices,
            "edges": r.edges,
            "seconds": r.seconds,
            "teps": r.teps,
            "edges_traversed": r.edges_traversed,
            "vertices_reached": r.vertices_reached,
            "levels": r.levels,
            "hit_rate": hit_rate,
            "reads_issued": reads,
            "iops": iops,
            "major_faults": r.major_faults,
            "note": r.note,
        });
        if let Value::Object(o) = &mut v {
            if let Some(s) = r.load_seconds {
                o.insert("load_seconds".into(), json!(s));
            }
            if let Some(c) = &r.cache {
                let s = &c.stats;
                o.insert("cache_bytes".into(), json!(c.cache_bytes));
                o.insert("line_bytes".into(), json!(c.line_bytes));
                o.insert("queue_depth".into(), json!(c.queue_depth));
                o.insert("batch_pieces".into(), json!(c.batch_pieces));
                o.insert("direct".into(), json!(c.direct));
                o.insert("accesses".into(), json!(s.accesses));
                o.insert("hits".into(), json!(s.hits));
                o.insert("misses".into(), json!(s.misses));
                o.insert("joined".into(), json!(s.joined));
                o.insert("coalesce_bytes".into(), json!(c.coalesce_bytes));
                o.insert("lines_loaded".into(), json!(s.lines_loaded));
                o.insert("evictions".into(), json!(s.evictions));
                o.insert("bytes_read".into(), json!(s.bytes_read));
                o.insert("bytes_requested".into(), json!(s.bytes_requested));
            }
            if let Some(g) = &r.gpu {
                o.insert("cache_bytes".into(), json!(g.cache_bytes));
                o.insert("line_bytes".into(), json!(g.line_bytes));
                o.insert("requests".into(), json!(g.requests));
                o.insert("line_lookups".into(), json!(g.line_lookups));
                o.insert("warps_launched".into(), json!(g.warps_launched));
                o.insert("requests_per_warp".into(), json!(g.requests_per_warp()));
                o.insert("bytes_read".into(), json!(g.bytes_read));
                o.insert("delivery".into(), json!(g.delivery));
            }
        }
        crate::report::print_json(&v)?;
    } else {
        outln!(
            "bfs {} from vertex {} ({} mode): {} vertices, {} edges",
            r.graph,
            r.source,
            r.mode.name(),
            r.vertices,
            r.edges
        )?;
        outln!(
            "reached {} vertices in {} levels, scanned {} edges in {:.3} s: {:.2} M TEPS ({} major faults)",
            r.vertices_reached,
            r.levels,
            r.edges_traversed,
            r.seconds,
            r.teps / 1e6,
            r.major_faults
        )?;
        if let Some(n) = &r.note {
            outln!("note: {n}")?;
        }
        if let Some(load_s) = r.load_seconds {
            outln!(
                "load: {} in {load_s:.3} s ({}/s), not counted in the BFS time",
                format_bytes(r.dst_bytes as f64),
                format_bytes(r.dst_bytes as f64 / load_s.max(1e-9))
            )?;
        }
        if let Some(c) = &r.cache {
            let s = &c.stats;
            outln!(
                "cache: {} ({:.0}% of {}), {} lines, QD {}, {}: hit rate {:.1}%, {} reads ({}, {} lines), {:.0} IOPS",
                format_bytes(c.cache_bytes as f64),
                c.cache_bytes as f64 * 100.0 / r.dst_bytes as f64,
                format_bytes(r.dst_bytes as f64),
                format_bytes(c.line_bytes as f64),
                c.queue_depth,
                if c.direct {
                    "direct I/O".to_string()
                } else {
                    format!("buffered I/O ({})", c.direct_reason)
                },
                s.hit_rate() * 100.0,
                s.reads_issued,
                format_bytes(s.bytes_read as f64),
                s.lines_loaded,
                s.reads_issued as f64 / r.seconds.max(1e-9)
            )?;
        }
        if let Some(g) = &r.gpu {
            outln!(
                "device cache: {} of {} lines: {} line requests ({:.0}/s) for {} lookups, hit rate {:.1}%, {:.2} requests per warp ({} warps), {} reads ({}); delivery: {}",
                format_bytes(g.cache_bytes as f64),
                format_bytes(g.line_bytes as f64),
                g.requests,
                g.requests as f64 / r.seconds.max(1e-9),
                g.line_lookups,
                g.hit_rate() * 100.0,
                g.requests_per_warp(),
                g.warps_launched,
                g.reads_issued,
                format_bytes(g.bytes_read as f64),
                g.delivery
            )?;
        }
        if let Some(p) = &a.depths_out {
            outln!("depths written to {}", p.display())?;
        }
    }
    Ok(())
}
