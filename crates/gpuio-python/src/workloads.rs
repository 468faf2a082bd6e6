//! The workloads of `gpuio-workloads` for Python: Graph500 graph generation, BFS over the page cache,
//! memory or mmap, and the DLRM-style embedding gather. Each takes the same settings as the CLI's
//! flags (as keyword arguments) and returns a dict of what the CLI reports; python/gpuio/__init__.py
//! wraps them as `gpuio.graph.generate`, `gpuio.graph.bfs` and `gpuio.gather`.
//!
//! This module only converts arguments and results; it never decides anything the library does not.

use std::path::PathBuf;

use gpuio_workloads::{bfs, cache, gather, graph, no_progress};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::IntoPy;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_graph_generate, m)?)?;
    m.add_function(wrap_pyfunction!(_graph_bfs, m)?)?;
    m.add_function(wrap_pyfunction!(_gather, m)?)?;
    Ok(())
}

fn cache_size(s: Option<&str>) -> PyResult<Option<cache::CacheSize>> {
    s.map(|s| cache::parse_cache_size(s).map_err(PyValueError::new_err))
        .transpose()
}

/// Writes a graph at `output` (`OUTPUT.bel.col`, `OUTPUT.bel.dst`), crash-safely; returns its summary.
#[pyfunction]
#[pyo3(signature = (scale, output, degree = 16, seed = 1, kind = "kron", force = false))]
fn _graph_generate<'py>(
    py: Python<'py>,
    scale: u32,
    output: PathBuf,
    degree: u32,
    seed: u64,
    kind: &str,
    force: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let kind = match kind {
        "kron" => graph::Kind::Kron,
        "urand" => graph::Kind::Urand,
        k => return Err(PyValueError::new_err(format!("kind {k:?}: kron or urand"))),
    };
    let cfg = graph::GraphGenConfig {
        kind,
        scale,
        degree,
        seed,
        output,
        force,
    };
    let r = py
        .allow_threads(|| graph::generate(&cfg, &mut no_progress))
        .py_err(py)?;
    let d = PyDict::new(py);
    d.set_item("kind", r.kind.name())?;
    d.set_item("scale", r.scale)?;
    d.set_item("degree", r.degree)?;
    d.set_item("seed", r.seed)?;
    d.set_item("vertices", r.vertices)?;
    d.set_item("edges", r.edges)?;
    d.set_item("generated_edges", r.generated_edges)?;
    d.set_item("self_loops_dropped", r.self_loops_dropped)?;
    d.set_item("duplicates_dropped", r.duplicates_dropped)?;
    d.set_item("col", r.col)?;
    d.set_item("dst", r.dst)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("seconds", r.seconds)?;
    Ok(d)
}

/// A breadth-first search of the graph at `prefix` from `source`; returns its summary and, under
/// "depths", every vertex's depth as little-endian int32 bytes (-1: unreachable).
#[pyfunction]
#[pyo3(signature = (prefix, source, mode = "cache", cache_size = None, line_size = 16384,
    queue_depth = 64, coalesce = 131072, depths_out = None))]
#[allow(clippy::too_many_arguments)]
fn _graph_bfs<'py>(
    py: Python<'py>,
    prefix: PathBuf,
    source: u64,
    mode: &str,
    cache_size: Option<&str>,
    line_size: u64,
    queue_depth: usize,
    coalesce: u64,
    depths_out: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let mode = match mode {
        "cache" => bfs::Mode::Cache,
        "memory" => bfs::Mode::Memory,
        "mmap" => bfs::Mode::Mmap,
        m => {
            return Err(PyValueError::new_err(format!(
                "mode {m:?}: cache, memory or mmap"
            )))
        }
    };
    let cfg = bfs::BfsConfig {
        prefix,
        source,
        mode,
        cache: self::cache_size(cache_size)?,
        line_size,
        queue_depth,
        coalesce,
        issue_threads: 0,
        depths_out,
    };
    let r = py
        .allow_threads(|| bfs::bfs(&cfg, &mut no_progress))
        .py_err(py)?;
    let d = PyDict::new(py);
    d.set_item("graph", &r.graph)?;
    d.set_item("mode", r.mode.name())?;
    d.set_item("source", r.source)?;
    d.set_item("source_degree", r.source_degree)?;
    d.set_item("vertices", r.vertices)?;
    d.set_item("edges", r.edges)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("teps", r.teps)?;
    d.set_item("edges_traversed", r.edges_traversed)?;
    d.set_item("vertices_reached", r.vertices_reached)?;
    d.set_item("levels", r.levels)?;
    d.set_item("note", r.note.as_deref())?;
    d.set_item("load_seconds", r.load_seconds)?;
    if let Some(c) = &r.cache {
        d.set_item("hit_rate", c.stats.hit_rate())?;
    }
    let bytes: Vec<u8> = r.depths.iter().flat_map(|v| v.to_le_bytes()).collect();
    d.set_item("depths", PyBytes::new(py, &bytes))?;
    Ok(d)
}

fn run_dict<'py>(py: Python<'py>, r: &gather::GatherRun) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("seconds", r.seconds)?;
    d.set_item("wait_seconds", r.wait_seconds)?;
    d.set_item("issue_seconds", r.issue_seconds)?;
    d.set_item("reads_issued", r.reads_issued)?;
    d.set_item("hit_rate", r.hit_rate)?;
    d.set_item("hits", r.hits)?;
    d.set_item("misses", r.misses)?;
    d.set_item("bytes_read", r.bytes_read)?;
    d.set_item("checksum", format!("{:016x}", r.checksum))?;
    Ok(d)
}

/// `batches` batches of `batch` rows of `row_bytes` from `table` through the page cache; returns the
/// run's figures (and, with `prefetch`, the synchronous reference run and the speedup).
#[pyfunction]
#[pyo3(signature = (table, row_bytes, batch, batches, dist = "uniform", cache_size = None,
    line_size = 4096, queue_depth = 64, prefetch = false, compute_us = 0, seed = 1))]
#[allow(clippy::too_many_arguments)]
fn _gather<'py>(
    py: Python<'py>,
    table: PathBuf,
    row_bytes: u64,
    batch: usize,
    batches: usize,
    dist: &str,
    cache_size: Option<&str>,
    line_size: u64,
    queue_depth: usize,
    prefetch: bool,
    compute_us: u64,
    seed: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let mut cfg = gather::GatherConfig::new(table, row_bytes, batch, batches);
    cfg.dist = gather::parse_dist(dist).map_err(PyValueError::new_err)?;
    cfg.cache = self::cache_size(cache_size)?;
    cfg.line_size = line_size;
    cfg.queue_depth = queue_depth;
    cfg.prefetch = prefetch;
    cfg.compute_us = compute_us;
    cfg.seed = seed;
    let r = py
        .allow_threads(|| gather::gather(&cfg, &mut no_progress))
        .py_err(py)?;
    let d = PyDict::new(py);
    d.set_item("table_bytes", r.table_bytes)?;
    d.set_item("rows", r.rows)?;
    d.set_item("rows_gathered", r.rows_gathered)?;
    d.set_item("cache_bytes", r.cache_bytes)?;
    d.set_item("direct", r.direct)?;
    d.set_item("direct_reason", &r.direct_reason)?;
    d.set_item("run", run_dict(py, &r.main)?)?;
    if let Some(s) = &r.sync {
        d.set_item("sync", run_dict(py, s)?)?;
    }
    d.set_item("speedup", r.speedup)?;
    Ok(d)
}
