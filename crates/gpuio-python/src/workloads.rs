//! The workloads of `gpuio-workloads` for Python: Graph500 graph generation, BFS over the page cache,
//! memory or mmap, and the DLRM-style embedding gather. Each takes the same settings as the CLI's
//! flags (as keyword arguments) and returns a dict of what the CLI reports; python/gpuio/__init__.py
//! wraps them as `gpuio.graph.generate`, `gpuio.graph.bfs` and `gpuio.gather`.
//!
//! This module only converts arguments and results; it never decides anything the library does not.
//!
//! `progress=callable`: the workload (run with the GIL released) reports through a [`PyProgress`],
//! which takes the GIL and calls the callable with a dict, at most once per `progress_interval`
//! seconds except for the reports that must not be missed (a new phase, the last step, the last BFS
//! level, a note). An exception the callable raises stops the workload (the library's `*_with`
//! entry points end early with `Cancelled`) and is raised to the caller as it was. A Ctrl-C that
//! arrives meanwhile is raised the same way, at the next report.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gpuio_workloads::{bfs, cache, gather, graph, Flow, Progress};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::IntoPy;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_graph_generate, m)?)?;
    m.add_function(wrap_pyfunction!(_graph_bfs, m)?)?;
    m.add_function(wrap_pyfunction!(_gather, m)?)?;
    Ok(())
}

/// A workload's progress delivered to a Python callable (see the module docs).
struct PyProgress<'a> {
    callback: Option<&'a Py<PyAny>>,
    interval: Duration,
    last: Option<Instant>,
    phase: Option<String>,
    done: u64,
    total: Option<u64>,
    /// What the callable raised (or a pending signal); the workload was told to stop.
    error: Option<PyErr>,
}

impl<'a> PyProgress<'a> {
    fn new(callback: Option<&'a Py<PyAny>>, interval: f64, py: Python<'_>) -> PyResult<Self> {
        if let Some(cb) = callback {
            if !cb.bind(py).is_callable() {
                return Err(PyTypeError::new_err("progress must be callable"));
            }
        }
        if !(interval.is_finite() && interval >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "progress_interval {interval} must be a number of seconds >= 0"
            )));
        }
        Ok(PyProgress {
            callback,
            interval: Duration::from_secs_f64(interval.min(1e6)),
            last: None,
            phase: None,
            done: 0,
            total: None,
            error: None,
        })
    }

    /// Hears one report from the workload (on its thread, without the GIL).
    fn on(&mut self, p: Progress) -> Flow {
        let (mut level, mut note) = (None, None);
        let must = match p {
            Progress::Phase(m) => {
                self.phase = Some(m);
                true
            }
            Progress::Step { done, total } => {
                self.done = done;
                self.total = Some(total);
                done == total
            }
            Progress::Level {
                level: l,
                reached,
                frontier,
            } => {
                if self
                    .phase
                    .as_deref()
                    .is_none_or(|p| p.starts_with("loading"))
                {
                    self.phase = Some("searching".into());
                }
                // Levels done; how many there are is known only at the last (an empty frontier).
                self.done = l as u64;
                self.total = (frontier == 0).then_some(l as u64);
                level = Some((l, reached, frontier));
                frontier == 0
            }
            Progress::StaleTempRemoved(path) => {
                note = Some(format!(
                    "removed {}, left by a run that did not finish",
                    path.display()
                ));
                true
            }
            Progress::StaleTempsNotRemoved(e) => {
                note = Some(format!("stale temporary files not removed: {e}"));
                true
            }
            _ => false,
        };
        let now = Instant::now();
        if !must && self.last.is_some_and(|t| now - t < self.interval) {
            return Flow::Continue(());
        }
        self.last = Some(now);
        Python::with_gil(|py| {
            let r = py.check_signals().and_then(|()| match self.callback {
                Some(cb) => {
                    let d = PyDict::new(py);
                    d.set_item("phase", self.phase.as_deref())?;
                    d.set_item("done", self.done)?;
                    d.set_item("total", self.total)?;
                    d.set_item("level", level.map(|l| l.0))?;
                    d.set_item("reached", level.map(|l| l.1))?;
                    d.set_item("frontier", level.map(|l| l.2))?;
                    d.set_item("note", note)?;
                    cb.bind(py).call1((d,)).map(drop)
                }
                None => Ok(()),
            });
            match r {
                Ok(()) => Flow::Continue(()),
                Err(e) => {
                    self.error = Some(e);
                    Flow::Break(())
                }
            }
        })
    }

    /// The workload's result, or what the callable raised (which is why the workload stopped).
    fn finish<T>(mut self, py: Python<'_>, r: gpuio::Result<T>) -> PyResult<T> {
        match self.error.take() {
            Some(e) => Err(e),
            None => r.py_err(py),
        }
    }
}

fn cache_size(s: Option<&str>) -> PyResult<Option<cache::CacheSize>> {
    s.map(|s| cache::parse_cache_size(s).map_err(PyValueError::new_err))
        .transpose()
}

/// Writes a graph at `output` (`OUTPUT.bel.col`, `OUTPUT.bel.dst`), crash-safely; returns its summary.
/// `progress`: see the module docs.
#[pyfunction]
#[pyo3(signature = (scale, output, degree = 16, seed = 1, kind = "kron", force = false,
    progress = None, progress_interval = 0.1))]
#[allow(clippy::too_many_arguments)]
fn _graph_generate<'py>(
    py: Python<'py>,
    scale: u32,
    output: PathBuf,
    degree: u32,
    seed: u64,
    kind: &str,
    force: bool,
    progress: Option<Py<PyAny>>,
    progress_interval: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let mut prog = PyProgress::new(progress.as_ref(), progress_interval, py)?;
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
    let r = py.allow_threads(|| graph::generate_with(&cfg, &mut |p| prog.on(p)));
    let r = prog.finish(py, r)?;
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
    queue_depth = 64, coalesce = 131072, depths_out = None, progress = None, progress_interval = 0.1,
    device = "cuda:0", delivery = "copies", server_threads = 0))]
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
    progress: Option<Py<PyAny>>,
    progress_interval: f64,
    device: &str,
    delivery: &str,
    server_threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let mut prog = PyProgress::new(progress.as_ref(), progress_interval, py)?;
    let delivery = delivery
        .parse()
        .map_err(|e: gpuio::Error| PyValueError::new_err(e.to_string()))?;
    let mode = match mode {
        "cache" => bfs::Mode::Cache,
        "memory" => bfs::Mode::Memory,
        "mmap" => bfs::Mode::Mmap,
        "gpu-cache" => bfs::Mode::GpuCache,
        "gpu-memory" => bfs::Mode::GpuMemory,
        m => {
            return Err(PyValueError::new_err(format!(
                "mode {m:?}: cache, memory, mmap, gpu-cache or gpu-memory"
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
        device: device.into(),
        delivery,
        server_threads,
    };
    let r = py.allow_threads(|| bfs::bfs_with(&cfg, &mut |p| prog.on(p)));
    let r = prog.finish(py, r)?;
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
    if let Some(g) = &r.gpu {
        d.set_item("hit_rate", g.hit_rate())?;
        d.set_item("requests", g.requests)?;
        d.set_item("requests_per_warp", g.requests_per_warp())?;
        d.set_item("line_lookups", g.line_lookups)?;
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
    if r.warps > 0 {
        d.set_item("warps", r.warps)?;
        d.set_item("requests_per_warp", r.misses as f64 / r.warps as f64)?;
    }
    Ok(d)
}

/// `batches` batches of `batch` rows of `row_bytes` from `table` through the page cache; returns the
/// run's figures (and, with `prefetch`, the synchronous reference run and the speedup), and whether
/// the rows were read in place in the cache's lines (`rows_in_place`; `rows_copied_because` if not).
#[pyfunction]
#[pyo3(signature = (table, row_bytes, batch, batches, dist = "uniform", cache_size = None,
    line_size = 4096, queue_depth = 64, prefetch = false, compute_us = 0, seed = 1, progress = None,
    progress_interval = 0.1, mode = "cache", device = "cuda:0", delivery = "copies",
    server_threads = 0))]
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
    progress: Option<Py<PyAny>>,
    progress_interval: f64,
    mode: &str,
    device: &str,
    delivery: &str,
    server_threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let mut prog = PyProgress::new(progress.as_ref(), progress_interval, py)?;
    let mut cfg = gather::GatherConfig::new(table, row_bytes, batch, batches);
    cfg.delivery = delivery
        .parse()
        .map_err(|e: gpuio::Error| PyValueError::new_err(e.to_string()))?;
    cfg.server_threads = server_threads;
    cfg.gpu = match mode {
        "cache" => false,
        "gpu-cache" => true,
        m => {
            return Err(PyValueError::new_err(format!(
                "mode {m:?}: cache or gpu-cache"
            )))
        }
    };
    cfg.device = device.into();
    cfg.dist = gather::parse_dist(dist).map_err(PyValueError::new_err)?;
    cfg.cache = self::cache_size(cache_size)?;
    cfg.line_size = line_size;
    cfg.queue_depth = queue_depth;
    cfg.prefetch = prefetch;
    cfg.compute_us = compute_us;
    cfg.seed = seed;
    let r = py.allow_threads(|| gather::gather_with(&cfg, &mut |p| prog.on(p)));
    let r = prog.finish(py, r)?;
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
    d.set_item("rows_in_place", r.rows_in_place.is_ok())?;
    d.set_item("rows_copied_because", r.rows_in_place.err())?;
    Ok(d)
}
