//! Level-synchronous breadth-first search over a `.bel` graph (behind `gpuio bfs`) whose edge file is
//! read one of three ways — through the gpu-io page cache (BaM's point: a frontier's adjacency lists fetched as one
//! batch, the misses issued together at high queue depth), from RAM, or through an mmap.
//!
//! The vertex offsets are always read into memory (n+1 u64s). Each level's frontier is visited in vertex
//! order, so the edge file is read in ascending order within a level in every mode; depths do not depend
//! on the order. Every edge of every frontier vertex is scanned once: TEPS = edges scanned ÷ seconds.
//!
//! Cache mode: a level's adjacency ranges are cut at line boundaries (adjacent ranges within a line
//! merged) and handed to [`PageCache::gather`] in batches of at most [`BATCH_PIECES_MAX`] pieces; the next
//! batch is issued before the current one is consumed, so I/O continues while edges are visited. A batch
//! never touches more than half the cache's lines, so the two batches alive at once fit in the cache
//! together and neither evicts the other's lines before they are copied out.
//!
//! Mmap mode never lets a concurrent truncation of the edge file kill the process: every adjacency list
//! is copied out with `gpuio::backend::mmap::copy_from_mapping`, which turns SIGBUS into an error.
//!
//! Never prints: progress goes to the caller's callback, the figures are the returned [`BfsResult`].
//! The depths file ([`BfsConfig::depths_out`]) is written crash-safely and is never one of the inputs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gpuio::error::Op;
use gpuio::{DirectMode, Error, OpenOptions, Result};
use gpuio_cache::{CacheConfig, CacheStats, PageCache};

use crate::cache::{cache_bytes, cache_engine, validate_cache_flags, CacheSize};
use crate::graph::{self, Bel, HEADER_BYTES};
use crate::{check_output_not_input, listening, major_faults, report, Progress, Report};

/// Most pieces (each within one cache line) in one gather.
pub const BATCH_PIECES_MAX: usize = 16384;

/// How the edge file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The edge file through the gpu-io page cache (direct I/O), frontier by frontier in batches.
    Cache,
    /// The whole edge file read into RAM first (load time reported apart).
    Memory,
    /// The edge file through an mmap, the OS page cache dropped first.
    Mmap,
    /// On a GPU ([`BfsConfig::device`]): the offsets and depths in device memory, the edges read by
    /// the kernel itself through the device cache and the request rings (`gpuio_cuda::rings::bfs`).
    GpuCache,
    /// On a GPU, with the whole edge file copied into device memory first (load time reported
    /// apart): the reference [`Mode::GpuCache`] is measured against, BaM's in-memory BFS.
    GpuMemory,
}

impl Mode {
    /// `cache`, `memory` or `mmap`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Cache => "cache",
            Mode::Memory => "memory",
            Mode::Mmap => "mmap",
            Mode::GpuCache => "gpu-cache",
            Mode::GpuMemory => "gpu-memory",
        }
    }
}

/// One search (`gpuio bfs`'s flags).
#[derive(Debug, Clone)]
pub struct BfsConfig {
    /// The graph: PREFIX.bel.col (vertex offsets) and PREFIX.bel.dst (edge destinations).
    pub prefix: PathBuf,
    /// Vertex to start from (`--source`).
    pub source: u64,
    /// How the edge file is read (`--mode`, default cache).
    pub mode: Mode,
    /// Cache capacity (`--cache-size`): bytes or a percentage of the edge file; `None`: 20%, at
    /// least 64 lines.
    pub cache: Option<CacheSize>,
    /// Cache line size, a power of two in 512..=65536 (`--line-size`, default 16 KiB).
    pub line_size: u64,
    /// Reads in flight in cache mode (`--queue-depth`, default 64).
    pub queue_depth: usize,
    /// Largest read for a run of adjacent missing lines, 0 for one read per line (`--coalesce`,
    /// default 128 KiB).
    pub coalesce: u64,
    /// Threads a gather may issue its misses from, 0 for the cache's choice (one per core for a
    /// memory-backed file, else one); see `CacheConfig::issue_threads` (`--issue-threads`).
    pub issue_threads: usize,
    /// Write every vertex's depth here as little-endian i32, -1 for unreachable (`--depths-out`).
    pub depths_out: Option<PathBuf>,
    /// The GPU of [`Mode::GpuCache`] (`--device`, default `cuda:0`).
    pub device: String,
    /// How the ring server delivers lines to the device in [`Mode::GpuCache`] (`--delivery`,
    /// default copies; see `gpuio_cuda::rings::DeliveryPath`).
    pub delivery: gpuio_cuda::rings::DeliveryPath,
    /// The ring server's polling threads in [`Mode::GpuCache`], 0 for
    /// `gpuio_cuda::rings::default_polling_threads` (`--server-threads`, default 0).
    pub server_threads: usize,
}

impl BfsConfig {
    /// A search of the graph at `prefix` from `source`, in cache mode with the CLI's defaults.
    pub fn new(prefix: impl Into<PathBuf>, source: u64) -> BfsConfig {
        BfsConfig {
            prefix: prefix.into(),
            source,
            mode: Mode::Cache,
            cache: None,
            line_size: 16 << 10,
            queue_depth: 64,
            coalesce: 128 << 10,
            issue_threads: 0,
            depths_out: None,
            device: "cuda:0".into(),
            delivery: gpuio_cuda::rings::DeliveryPath::Copies,
            server_threads: 0,
        }
    }

    /// Checks the page-cache settings (the same bounds and messages as the CLI's flags).
    pub fn validate(&self) -> Result<()> {
        validate_cache_flags(
            self.line_size,
            self.queue_depth,
            self.coalesce,
            self.issue_threads,
        )
    }
}

/// Cache mode's settings and counters.
#[derive(Debug, Clone)]
pub struct BfsCacheReport {
    /// The cache's capacity.
    pub cache_bytes: u64,
    pub line_bytes: u64,
    pub queue_depth: usize,
    pub coalesce_bytes: u64,
    /// Pieces per gather.
    pub batch_pieces: usize,
    /// Whether the edge file was read with direct I/O.
    pub direct: bool,
    /// Why direct I/O was or was not used.
    pub direct_reason: String,
    pub stats: CacheStats,
}

/// GPU cache mode's settings and counters: BaM's figures (requests per second, hit rate, requests
/// per warp).
#[derive(Debug, Clone)]
pub struct BfsGpuReport {
    /// The device cache's capacity and line size.
    pub cache_bytes: u64,
    pub line_bytes: u64,
    /// Line requests the kernels sent through the rings (each a miss that started a fill; a miss
    /// on a line already being filled waits for it and sends none).
    pub requests: u64,
    /// Reads the server issued for them (adjacent lines coalesced).
    pub reads_issued: u64,
    pub bytes_read: u64,
    /// Line lookups the kernel made: one per distinct line of each 32-edge chunk of each scanned
    /// vertex (a warp's lanes that want the same line look it up once). Counted on the host from
    /// the offsets and the depths, exactly as the kernel walks them.
    pub line_lookups: u64,
    /// Warps launched over all levels.
    pub warps_launched: u64,
    /// How the ring server delivered the lines.
    pub delivery: String,
}

impl BfsGpuReport {
    /// Lookups that found their line (resident, or already being filled by another warp).
    pub fn hit_rate(&self) -> f64 {
        1.0 - (self.requests as f64 / self.line_lookups.max(1) as f64).min(1.0)
    }
    /// Requests per warp launched.
    pub fn requests_per_warp(&self) -> f64 {
        self.requests as f64 / self.warps_launched.max(1) as f64
    }
}

/// The device cache lines `gpuio_bfs_level` (crates/gpuio-cuda/device/workloads.cu) looks up: for
/// every vertex it scans (every reached one), each 32-edge chunk of its edges touches the lines of
/// elements `e + header` for its edges `e`; a chunk's lanes share a lookup per distinct line.
pub fn gpu_line_lookups(offsets: &[u64], depths: &[i32], line_bytes: u64) -> u64 {
    let header = gpuio_cuda::rings::bfs::BEL_HEADER_ELEMENTS;
    let line_of = |e: u64| (e + header) * 8 / line_bytes.max(8);
    let mut lookups = 0;
    for (v, &d) in depths.iter().enumerate() {
        if d < 0 {
            continue;
        }
        let (start, end) = (offsets[v], offsets[v + 1]);
        let mut base = start;
        while base < end {
            let last = (base + 32).min(end) - 1;
            lookups += line_of(last) - line_of(base) + 1;
            base += 32;
        }
    }
    lookups
}

/// What a search found and what it cost.
#[derive(Debug, Clone)]
pub struct BfsResult {
    /// The graph's name: the `.bel.col` path without `.col`.
    pub graph: String,
    pub col_path: PathBuf,
    pub dst_path: PathBuf,
    pub mode: Mode,
    pub source: u64,
    /// Edges of the source vertex.
    pub source_degree: u64,
    pub vertices: u64,
    pub edges: u64,
    /// Bytes of the `.dst` file.
    pub dst_bytes: u64,
    /// Traversal time (memory mode's load not included).
    pub seconds: f64,
    /// Edges scanned per second.
    pub teps: f64,
    pub edges_traversed: u64,
    pub vertices_reached: u64,
    pub levels: u32,
    /// Major page faults of the process during the search.
    pub major_faults: u64,
    /// A note on the source: one without edges reaches only itself.
    pub note: Option<String>,
    /// Memory mode: seconds loading the edge file.
    pub load_seconds: Option<f64>,
    /// Cache mode: the cache's settings and counters.
    pub cache: Option<BfsCacheReport>,
    /// GPU cache mode: the device cache's settings and counters.
    pub gpu: Option<BfsGpuReport>,
    /// Every vertex's depth, -1 for unreachable.
    pub depths: Vec<i32>,
}

impl BfsResult {
    /// Cache reads per second (cache mode), or line requests per second (GPU cache mode).
    pub fn iops(&self) -> Option<f64> {
        let per_sec = |n: u64| n as f64 / self.seconds.max(1e-9);
        match (&self.cache, &self.gpu) {
            (Some(c), _) => Some(per_sec(c.stats.reads_issued)),
            (None, Some(g)) => Some(per_sec(g.requests)),
            (None, None) => None,
        }
    }
}

/// Where newly reached vertices go.
struct Visitor<'a> {
    bel: &'a Bel,
    depths: &'a mut [i32],
    next: &'a mut Vec<u32>,
    depth: i32,
}

impl Visitor<'_> {
    /// Edge `edge` leads to `v`.
    #[inline]
    fn visit(&mut self, edge: u64, v: u64) -> Result<()> {
        if v >= self.depths.len() as u64 {
            return Err(graph::bad_destination(self.bel, edge, v));
        }
        let d = &mut self.depths[v as usize];
        if *d < 0 {
            *d = self.depth;
            self.next.push(v as u32);
        }
        Ok(())
    }
}

/// How one mode reads the edges of a frontier.
trait Edges {
    fn scan_level(&mut self, frontier: &[u32], visitor: &mut Visitor<'_>) -> Result<()>;
}

/// Mode memory: every destination in RAM.
struct MemoryEdges<'a> {
    offsets: &'a [u64],
    dst: Vec<u64>,
}

impl Edges for MemoryEdges<'_> {
    fn scan_level(&mut self, frontier: &[u32], vis: &mut Visitor<'_>) -> Result<()> {
        for &u in frontier {
            let (s, e) = (self.offsets[u as usize], self.offsets[u as usize + 1]);
            for (i, &v) in self.dst[s as usize..e as usize].iter().enumerate() {
                vis.visit(s + i as u64, v)?;
            }
        }
        Ok(())
    }
}

/// Mode mmap: the destinations through a mapping of the whole `.dst` file.
///
/// Another process may truncate the file while it is mapped; touching a lost page raises SIGBUS. So the
/// file's length is checked (`fstat`) before each level, and every adjacency list is copied out with
/// `gpuio::backend::mmap::copy_from_mapping`, which turns a SIGBUS during the copy into an error instead
/// of the death of the process.
struct MmapEdges<'a> {
    offsets: &'a [u64],
    map: memmap2::Mmap,
    file: std::fs::File,
    path: &'a Path,
    dst_bytes: u64,
    /// One adjacency list's bytes.
    scratch: Vec<u8>,
}

impl MmapEdges<'_> {
    fn truncated(&self, offset: u64, len: u64) -> Error {
        let now = self
            .file
            .metadata()
            .map(|m| format!("{} bytes", m.len()))
            .unwrap_or_else(|_| "of unknown length".into());
        Error::new(
            gpuio::ErrorKind::UnexpectedEof,
            format!(
                "the mapped file shrank while the search ran: it is now {now}, it was {} bytes (truncated by another process?)",
                self.dst_bytes
            ),
        )
        .with_op(Op::Read)
        .with_path(self.path)
        .with_range(offset, len)
    }
}

impl Edges for MmapEdges<'_> {
    fn scan_level(&mut self, frontier: &[u32], vis: &mut Visitor<'_>) -> Result<()> {
        let len = self
            .file
            .metadata()
            .map_err(|e| Error::from_io(Op::Stat, &e).with_path(self.path))?
            .len();
        if len < self.dst_bytes {
            return Err(self.truncated(len, self.dst_bytes - len));
        }
        for &u in frontier {
            let (s, e) = (self.offsets[u as usize], self.offsets[u as usize + 1]);
            let (off, n) = (HEADER_BYTES + s * 8, ((e - s) * 8) as usize);
            self.scratch.resize(n, 0);
            // The offsets were checked against the edge count, and the mapping holds dst_bytes.
            debug_assert!(off as usize + n <= self.map.len());
            // SAFETY: off + n <= dst_bytes <= map.len() (checked when mapped); `map` lives in `self`
            // and stays mapped during the copy; `scratch` is a separate allocation of n bytes.
            let clean = unsafe {
                gpuio::backend::mmap::copy_from_mapping(
                    self.map.as_ptr().add(off as usize),
                    self.scratch.as_mut_ptr(),
                    n,
                )
            };
            if !clean {
                return Err(self.truncated(off, n as u64));
            }
            for (i, c) in self.scratch.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                vis.visit(s + i as u64, v)?;
            }
        }
        Ok(())
    }
}

/// Mode cache: the destinations through the page cache, a frontier's ranges gathered in batches.
struct CacheEdges<'a> {
    offsets: &'a [u64],
    cache: &'a PageCache,
    src: gpuio_cache::SourceId,
    line: u64,
    /// Pieces per gather.
    batch: usize,
    /// Whether the next batch is issued before the current one is consumed.
    overlap: bool,
    /// Result buffers of consumed gathers, for the next ones.
    spare: Vec<Vec<u8>>,
}

/// Walks a frontier's adjacency lists as byte ranges of the `.dst` file, each within one line.
struct Pieces<'a> {
    offsets: &'a [u64],
    frontier: &'a [u32],
    line: u64,
    /// Next frontier entry.
    fi: usize,
    /// Next edge of the current entry (`None`: start of entry `fi`).
    pos: Option<u64>,
}

impl Pieces<'_> {
    /// Fills `out` with up to `max` pieces: (byte offset, length).
    fn fill(&mut self, max: usize, out: &mut Vec<(u64, usize)>) {
        out.clear();
        while out.len() < max && self.fi < self.frontier.len() {
            let u = self.frontier[self.fi] as usize;
            let end = self.offsets[u + 1];
            let pos = self.pos.unwrap_or(self.offsets[u]);
            if pos >= end {
                self.fi += 1;
                self.pos = None;
                continue;
            }
            let start_b = HEADER_BYTES + pos * 8;
            let line_end = (start_b / self.line + 1) * self.line;
            let end_b = (HEADER_BYTES + end * 8).min(line_end);
            match out.last_mut() {
                // Contiguous with the previous piece and in the same line: extend it.
                Some((o, l))
                    if *o + *l as u64 == start_b && *o / self.line == start_b / self.line =>
                {
                    *l += (end_b - start_b) as usize;
                }
                _ => out.push((start_b, (end_b - start_b) as usize)),
            }
            self.pos = Some((end_b - HEADER_BYTES) / 8);
        }
    }
}

impl CacheEdges<'_> {
    fn consume(
        reqs: &[(u64, usize)],
        got: &gpuio_cache::GatherResult,
        vis: &mut Visitor<'_>,
    ) -> Result<()> {
        for (i, &(off, _)) in reqs.iter().enumerate() {
            let first = (off - HEADER_BYTES) / 8;
            for (j, c) in got.get(i).chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                vis.visit(first + j as u64, v)?;
            }
        }
        Ok(())
    }
}

impl Edges for CacheEdges<'_> {
    fn scan_level(&mut self, frontier: &[u32], vis: &mut Visitor<'_>) -> Result<()> {
        let mut pieces = Pieces {
            offsets: self.offsets,
            frontier,
            line: self.line,
            fi: 0,
            pos: None,
        };
        let mut cur = Vec::with_capacity(self.batch);
        let mut nxt = Vec::with_capacity(self.batch);
        // The bytes of consumed results are handed to the next gather: no fresh pages per batch.
        let mut spare = std::mem::take(&mut self.spare);
        pieces.fill(self.batch, &mut cur);
        let mut pending = if cur.is_empty() {
            None
        } else {
            Some(
                self.cache
                    .gather_into(self.src, &cur, spare.pop().unwrap_or_default())?,
            )
        };
        while let Some(g) = pending.take() {
            if self.overlap {
                pieces.fill(self.batch, &mut nxt);
                if !nxt.is_empty() {
                    let buf = spare.pop().unwrap_or_default();
                    pending = Some(self.cache.gather_into(self.src, &nxt, buf)?);
                }
            }
            let got = g.wait()?;
            Self::consume(&cur, &got, vis)?;
            spare.push(got.into_bytes());
            if !self.overlap {
                pieces.fill(self.batch, &mut nxt);
                if !nxt.is_empty() {
                    let buf = spare.pop().unwrap_or_default();
                    pending = Some(self.cache.gather_into(self.src, &nxt, buf)?);
                }
            }
            std::mem::swap(&mut cur, &mut nxt);
        }
        self.spare = spare;
        Ok(())
    }
}

/// What a traversal found.
struct Traversal {
    depths: Vec<i32>,
    levels: u32,
    reached: u64,
    scanned: u64,
    seconds: f64,
}

impl Traversal {
    /// A GPU search's result (depths -1 for unreachable), the reached vertices counted from them.
    fn from_gpu(depths: Vec<i32>, levels: u32, scanned: u64, seconds: f64) -> Traversal {
        let reached = depths.iter().filter(|&&d| d >= 0).count() as u64;
        Traversal {
            depths,
            levels,
            reached,
            scanned,
            seconds,
        }
    }
}

fn traverse<E: Edges>(
    bel: &Bel,
    source: u32,
    edges: &mut E,
    progress: Report<'_>,
) -> Result<Traversal> {
    let start = Instant::now();
    let mut depths = vec![-1i32; bel.n];
    depths[source as usize] = 0;
    let mut frontier = vec![source];
    let mut next = Vec::new();
    let (mut levels, mut reached, mut scanned) = (0u32, 1u64, 0u64);
    while !frontier.is_empty() {
        frontier.sort_unstable();
        scanned += frontier
            .iter()
            .map(|&u| bel.offsets[u as usize + 1] - bel.offsets[u as usize])
            .sum::<u64>();
        next.clear();
        let mut vis = Visitor {
            bel,
            depths: &mut depths,
            next: &mut next,
            depth: levels as i32 + 1,
        };
        edges.scan_level(&frontier, &mut vis)?;
        levels += 1;
        reached += next.len() as u64;
        std::mem::swap(&mut frontier, &mut next);
        report(
            progress,
            Progress::Level {
                level: levels,
                reached,
                frontier: frontier.len() as u64,
            },
        )?;
    }
    Ok(Traversal {
        depths,
        levels,
        reached,
        scanned,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// [`Mode::GpuCache`]: the search on the GPU; the cache is `--cache-size` of device memory in lines
/// of `--line-size`. Levels are not reported one by one (the host sees only the last); the phase is.
fn traverse_gpu(
    cfg: &BfsConfig,
    bel: &Bel,
    source: u32,
    progress: Report<'_>,
) -> Result<(Traversal, BfsGpuReport)> {
    let device = gpuio_cuda::open_device(&cfg.device)?;
    let capacity = cache_bytes(cfg.cache, bel.dst_bytes, cfg.line_size)?;
    let line_bytes = u32::try_from(cfg.line_size)
        .map_err(|_| Error::invalid(format!("--line-size {} is too large", cfg.line_size)))?;
    let engine = cache_engine(cfg.queue_depth, capacity)?;
    report(
        progress,
        Progress::Phase(format!(
            "searching on {} (edges through a {} device cache)",
            device.label(),
            gpuio::size::format_bytes(capacity as f64)
        )),
    )?;
    let run = gpuio_cuda::rings::bfs::bfs(
        &engine,
        &device,
        &bel.dst_path,
        &bel.offsets,
        source as u64,
        &gpuio_cuda::rings::bfs::GpuBfsConfig {
            cache_bytes: capacity,
            line_bytes,
            delivery: cfg.delivery,
            server_threads: cfg.server_threads,
            ..Default::default()
        },
    )?;
    let report = BfsGpuReport {
        cache_bytes: capacity,
        line_bytes: cfg.line_size,
        requests: run.server.requests,
        reads_issued: run.server.transfers,
        bytes_read: run.server.bytes_read,
        line_lookups: gpu_line_lookups(&bel.offsets, &run.depths, cfg.line_size),
        warps_launched: run.warps_launched,
        delivery: run.delivery,
    };
    let t = Traversal::from_gpu(run.depths, run.levels, run.edges_scanned, run.seconds);
    Ok((t, report))
}

/// [`Mode::GpuMemory`]: the same search on the GPU with every edge copied into device memory first;
/// returns the traversal and the load time.
fn traverse_gpu_memory(
    cfg: &BfsConfig,
    bel: &Bel,
    source: u32,
    progress: Report<'_>,
) -> Result<(Traversal, f64)> {
    let device = gpuio_cuda::open_device(&cfg.device)?;
    report(
        progress,
        Progress::Phase(format!(
            "loading {} into {}, then searching there",
            bel.dst_path.display(),
            device.label()
        )),
    )?;
    let run = gpuio_cuda::rings::bfs::bfs_in_memory(
        &device,
        &bel.dst_path,
        &bel.offsets,
        source as u64,
        &gpuio_cuda::rings::bfs::GpuBfsConfig::default(),
    )?;
    let t = Traversal::from_gpu(run.depths, run.levels, run.edges_scanned, run.seconds);
    Ok((t, run.load_seconds))
}

fn drop_os_cache(f: &std::fs::File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::from_errno(Op::Setup, rc).with_path(path));
    }
    Ok(())
}

/// Reads every destination of the `.dst` file into memory.
fn load_edges(bel: &Bel) -> Result<Vec<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    let path = &bel.dst_path;
    let rerr = |e: std::io::Error| Error::from_io(Op::Read, &e).with_path(path);
    let mut f =
        std::fs::File::open(path).map_err(|e| Error::from_io(Op::Open, &e).with_path(path))?;
    drop_os_cache(&f, path)?;
    f.seek(SeekFrom::Start(HEADER_BYTES)).map_err(rerr)?;
    let mut out = Vec::with_capacity(bel.m as usize);
    let mut buf = vec![0u8; 8 << 20];
    let mut left = bel.m;
    while left > 0 {
        let k = (left as usize).min(buf.len() / 8);
        let at = HEADER_BYTES + (bel.m - left) * 8;
        if let Err(e) = f.read_exact(&mut buf[..k * 8]) {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                return Err(rerr(e).with_range(at, k as u64 * 8));
            }
            // The file shrank after its header was checked: say by how much.
            let now = f
                .metadata()
                .map(|m| format!("{} bytes", m.len()))
                .unwrap_or_else(|_| "of unknown length".into());
            return Err(Error::new(
                gpuio::ErrorKind::UnexpectedEof,
                format!(
                    "the file ended early: it is now {now}, its header promised {} bytes ({} edges); was it truncated while being read?",
                    bel.dst_bytes, bel.m
                ),
            )
            .with_op(Op::Read)
            .with_path(path)
            .with_range(at, k as u64 * 8));
        }
        out.extend(
            buf[..k * 8]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
        left -= k as u64;
    }
    Ok(out)
}

/// Writes every depth as a little-endian i32 into `out`'s temporary file and commits it (fsync, rename
/// over the destination, directory fsync: `gpuio::replace`), so a crash leaves the old file or the new.
fn write_depths(out: gpuio::ReplaceFile, depths: &[i32]) -> Result<()> {
    let path = out.temp_path().to_path_buf();
    let werr = |e: std::io::Error| Error::from_io(Op::Write, &e).with_path(&path);
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out.as_file());
        let mut bytes = Vec::with_capacity(64 << 10);
        for chunk in depths.chunks(16384) {
            bytes.clear();
            for d in chunk {
                bytes.extend_from_slice(&d.to_le_bytes());
            }
            w.write_all(&bytes).map_err(werr)?;
        }
        w.flush().map_err(werr)?;
    }
    out.commit()
}

/// Runs the search `cfg` describes; `progress` hears of each level (and of memory mode's load). With
/// [`BfsConfig::depths_out`], the depths are written there crash-safely once the search is done; that
/// file's temporary is made before the search, so a missing or read-only directory fails at once.
pub fn bfs(cfg: &BfsConfig, progress: &mut dyn FnMut(Progress)) -> Result<BfsResult> {
    bfs_with(cfg, &mut listening(progress))
}

/// [`bfs`] with a callback that can stop it (see [`crate::Flow`]): after any level; the depths file
/// is then not written.
pub fn bfs_with(cfg: &BfsConfig, progress: Report<'_>) -> Result<BfsResult> {
    cfg.validate()?;
    let (col_path, dst_path) = graph::bel_paths(&cfg.prefix);
    if let Some(out) = &cfg.depths_out {
        check_output_not_input("--depths-out", out, &[&col_path, &dst_path])?;
    }
    let bel = graph::read_bel(&cfg.prefix)?;
    if cfg.source >= bel.n as u64 {
        return Err(Error::invalid(format!(
            "--source {} is out of range: {} has {} vertices (0..={})",
            cfg.source,
            bel.col_path.display(),
            bel.n,
            bel.n - 1
        )));
    }
    let source = cfg.source as u32;
    let source_degree = bel.offsets[cfg.source as usize + 1] - bel.offsets[cfg.source as usize];
    let note = (source_degree == 0).then(|| {
        // Kronecker graphs leave many vertices isolated; Graph500 starts from ones with edges.
        let (best, deg) = (0..bel.n)
            .map(|u| (u, bel.offsets[u + 1] - bel.offsets[u]))
            .max_by_key(|&(u, d)| (d, std::cmp::Reverse(u)))
            .unwrap_or((0, 0));
        format!(
            "source vertex {} has no edges, so the search reaches only the source itself; Graph500 starts from vertices that have edges: vertex {best} has the most ({deg}), try --source {best}",
            cfg.source
        )
    });
    // The output's temporary file is made before the traversal, so a missing or read-only directory
    // fails at once rather than after the work; the check runs again on the resolved destination.
    let depths_out = match &cfg.depths_out {
        Some(p) => {
            // Temporaries of earlier runs killed by SIGKILL (which no handler can catch).
            crate::remove_stale_temps(p, progress)?;
            let r = gpuio::ReplaceFile::create(p)?;
            check_output_not_input("--depths-out", r.dest(), &[&bel.col_path, &bel.dst_path])?;
            Some(r)
        }
        None => None,
    };
    let faults0 = major_faults();
    let mut load_seconds = None;
    let mut gpu = None;
    let (t, cache) = match cfg.mode {
        Mode::Memory => {
            report(
                progress,
                Progress::Phase(format!("loading {}", bel.dst_path.display())),
            )?;
            let t0 = Instant::now();
            let dst = load_edges(&bel)?;
            load_seconds = Some(t0.elapsed().as_secs_f64());
            let mut e = MemoryEdges {
                offsets: &bel.offsets,
                dst,
            };
            (traverse(&bel, source, &mut e, progress)?, None)
        }
        Mode::Mmap => {
            let path = &bel.dst_path;
            let f = std::fs::File::open(path)
                .map_err(|e| Error::from_io(Op::Open, &e).with_path(path))?;
            drop_os_cache(&f, path)?;
            // SAFETY: a read-only mapping, read only through `copy_from_mapping` (see `MmapEdges`),
            // which survives a concurrent truncation.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .map_err(|e| Error::from_io(Op::Setup, &e).with_path(path))?;
            if (map.len() as u64) < bel.dst_bytes {
                return Err(Error::new(
                    gpuio::ErrorKind::UnexpectedEof,
                    format!("changed size while opening ({} bytes)", map.len()),
                )
                .with_path(path));
            }
            let mut e = MmapEdges {
                offsets: &bel.offsets,
                map,
                file: f,
                path,
                dst_bytes: bel.dst_bytes,
                scratch: Vec::new(),
            };
            (traverse(&bel, source, &mut e, progress)?, None)
        }
        Mode::GpuCache => {
            let (t, g) = traverse_gpu(cfg, &bel, source, progress)?;
            gpu = Some(g);
            (t, None)
        }
        Mode::GpuMemory => {
            let (t, load) = traverse_gpu_memory(cfg, &bel, source, progress)?;
            load_seconds = Some(load);
            (t, None)
        }
        Mode::Cache => {
            let capacity = cache_bytes(cfg.cache, bel.dst_bytes, cfg.line_size)?;
            let engine = cache_engine(cfg.queue_depth, capacity)?;
            let file = OpenOptions::read()
                .direct(DirectMode::Auto)
                .cold(true)
                .open(&bel.dst_path)?;
            let cache = PageCache::new(
                &engine,
                CacheConfig {
                    line_bytes: cfg.line_size as usize,
                    capacity_bytes: capacity,
                    queue_depth: cfg.queue_depth,
                    coalesce_bytes: cfg.coalesce.try_into().unwrap_or(usize::MAX),
                    issue_threads: cfg.issue_threads,
                },
            )?;
            let src = cache.attach_file(&file)?;
            if cache.len(src) < bel.dst_bytes {
                return Err(Error::new(
                    gpuio::ErrorKind::UnexpectedEof,
                    format!(
                        "the file shrank after its header was read: it is now {} bytes, its header promised {} ({} edges)",
                        cache.len(src),
                        bel.dst_bytes,
                        bel.m
                    ),
                )
                .with_op(Op::Open)
                .with_path(&bel.dst_path)
                .with_range(cache.len(src), bel.dst_bytes - cache.len(src)));
            }
            let lines_cap = (capacity / cfg.line_size).max(1) as usize;
            let overlap = lines_cap >= 2;
            let batch = (if overlap { lines_cap / 2 } else { 1 }).min(BATCH_PIECES_MAX);
            let mut e = CacheEdges {
                offsets: &bel.offsets,
                cache: &cache,
                src,
                line: cfg.line_size,
                batch,
                overlap,
                spare: Vec::new(),
            };
            let t = traverse(&bel, source, &mut e, progress)?;
            let report = BfsCacheReport {
                cache_bytes: capacity,
                line_bytes: cfg.line_size,
                queue_depth: cfg.queue_depth,
                coalesce_bytes: cfg.coalesce,
                batch_pieces: batch,
                direct: file.is_direct(),
                direct_reason: file.direct_reason().to_string(),
                stats: cache.stats(),
            };
            (t, Some(report))
        }
    };
    if let Some(out) = depths_out {
        write_depths(out, &t.depths)?;
    }
    let faults = major_faults() - faults0;
    Ok(BfsResult {
        graph: bel
            .col_path
            .display()
            .to_string()
            .trim_end_matches(".col")
            .to_string(),
        col_path: bel.col_path.clone(),
        dst_path: bel.dst_path.clone(),
        mode: cfg.mode,
        source: cfg.source,
        source_degree,
        vertices: bel.n as u64,
        edges: bel.m,
        dst_bytes: bel.dst_bytes,
        seconds: t.seconds,
        teps: t.scanned as f64 / t.seconds.max(1e-9),
        edges_traversed: t.scanned,
        vertices_reached: t.reached,
        levels: t.levels,
        major_faults: faults,
        note,
        load_seconds,
        cache,
        gpu,
        depths: t.depths,
    })
}

#[cfg(test)]
mod tests {
    use super::gpu_line_lookups;

    /// 8 edges per 64-byte line, and the `.bel` header's two elements before edge 0.
    #[test]
    fn line_lookups_count_distinct_lines_per_32_edge_chunk_of_reached_vertices() {
        let offsets = [0, 3, 40, 40, 50];
        // Vertex 0: edges 0..3 (elements 2..5, line 0): 1. Vertex 1: edges 3..35 (lines 0..=4): 5,
        // then 35..40 (lines 4..=5): 2. Vertex 2: no edges. Vertex 3: unreached, not scanned.
        assert_eq!(gpu_line_lookups(&offsets, &[0, 1, 2, -1], 64), 8);
        assert_eq!(gpu_line_lookups(&offsets, &[0, 1, 2, 1], 64), 8 + 2);
        assert_eq!(gpu_line_lookups(&offsets, &[-1, -1, -1, -1], 64), 0);
        // One line holds everything: one lookup per chunk.
        assert_eq!(
            gpu_line_lookups(&offsets, &[0, 1, 2, 1], 1 << 16),
            1 + 2 + 1
        );
    }
}
