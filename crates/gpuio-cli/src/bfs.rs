//! `gpuio bfs`: level-synchronous breadth-first search over a `.bel` graph whose edge file is read one of
//! three ways — through the gpu-io page cache (BaM's point: a frontier's adjacency lists fetched as one
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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use gpuio::error::Op;
use gpuio::size::format_bytes;
use gpuio::{DirectMode, Engine, EngineConfig, Error, MemoryBudget, OpenOptions, Result};
use gpuio_cache::{CacheConfig, PageCache};
use serde_json::{json, Value};

use crate::graph::{self, Bel, HEADER_BYTES};

/// Most pieces (each within one cache line) in one gather.
pub const BATCH_PIECES_MAX: usize = 16384;
/// Default cache size: this percentage of the edge file.
const CACHE_PERCENT_DEFAULT: f64 = 20.0;
/// A default (percentage) cache is never smaller than this many lines.
const CACHE_LINES_MIN_DEFAULT: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The edge file through the gpu-io page cache (direct I/O), frontier by frontier in batches.
    Cache,
    /// The whole edge file read into RAM first (load time reported apart).
    Memory,
    /// The edge file through an mmap, the OS page cache dropped first.
    Mmap,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Cache => "cache",
            Mode::Memory => "memory",
            Mode::Mmap => "mmap",
        }
    }
}

/// `--cache-size`: bytes, or a percentage of the file the cache is over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSize {
    Bytes(u64),
    Percent(f64),
}

/// Parses `256M`, `1G`, `4096` or `20%`.
pub(crate) fn parse_cache_size(s: &str) -> std::result::Result<CacheSize, String> {
    if let Some(p) = s.trim().strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not a percentage (example: 20%)"))?;
        if !(v > 0.0 && v <= 100.0) {
            return Err(format!("'{s}': a percentage must be in (0, 100]"));
        }
        return Ok(CacheSize::Percent(v));
    }
    crate::parse_size(s).map(CacheSize::Bytes)
}

/// The cache's capacity for a file of `file_bytes`: `size`, or by default 20% of the file (at least
/// 64 lines); never more than the lines the file has (a larger cache could not be used). Fails when
/// the cache would be smaller than one line.
pub(crate) fn cache_bytes(size: Option<CacheSize>, file_bytes: u64, line: u64) -> Result<u64> {
    let bytes = match size {
        Some(CacheSize::Bytes(b)) => b,
        Some(CacheSize::Percent(p)) => (file_bytes as f64 * p / 100.0) as u64,
        None => ((file_bytes as f64 * CACHE_PERCENT_DEFAULT / 100.0) as u64)
            .max(CACHE_LINES_MIN_DEFAULT * line),
    };
    if bytes < line {
        return Err(Error::invalid(format!(
            "--cache-size {} is smaller than one cache line ({}): give at least --line-size bytes",
            match size {
                Some(CacheSize::Percent(p)) => format!("{p}% ({bytes} bytes)"),
                _ => format!("{bytes} bytes"),
            },
            line
        )));
    }
    Ok(bytes.min(file_bytes.div_ceil(line).max(1) * line))
}

/// An engine for a cache of `capacity` bytes at queue depth `qd`.
pub(crate) fn cache_engine(qd: usize, capacity: u64) -> Result<Engine> {
    if qd == 0 || qd > gpuio::backend::QUEUE_DEPTH_MAX {
        return Err(Error::invalid(format!(
            "--queue-depth {qd} is out of range 1..={}",
            gpuio::backend::QUEUE_DEPTH_MAX
        )));
    }
    let mut cfg = EngineConfig::default();
    cfg.backend.queue_depth = qd;
    // Room for the cache's lines besides the engine's own buffers, should the cache charge them here.
    cfg.memory_budget = MemoryBudget::new((4u64 << 30).max(capacity.saturating_add(1 << 30)));
    Engine::new(cfg)
}

/// Smallest and largest cache line (`gpuio_cache::CacheConfig::line_bytes` accepts these powers of two).
pub(crate) const LINE_BYTES_MIN: u64 = 512;
pub(crate) const LINE_BYTES_MAX: u64 = 65536;

/// Checks the page-cache flags shared by `bfs` and `gather` before anything uses them, naming each
/// flag and its bounds: `--line-size` a power of two in 512..=65536, `--queue-depth` in
/// 1..=`QUEUE_DEPTH_MAX`, `--coalesce` at most `COALESCE_BYTES_MAX`.
pub(crate) fn validate_cache_flags(
    line_size: u64,
    queue_depth: usize,
    coalesce: u64,
) -> Result<()> {
    if !line_size.is_power_of_two() || !(LINE_BYTES_MIN..=LINE_BYTES_MAX).contains(&line_size) {
        return Err(Error::invalid(format!(
            "--line-size {line_size} must be a power of two in {LINE_BYTES_MIN}..={LINE_BYTES_MAX} (512, 1K, ... 64K)"
        )));
    }
    if queue_depth == 0 || queue_depth > gpuio::backend::QUEUE_DEPTH_MAX {
        return Err(Error::invalid(format!(
            "--queue-depth {queue_depth} is out of range 1..={}",
            gpuio::backend::QUEUE_DEPTH_MAX
        )));
    }
    if coalesce > gpuio_cache::COALESCE_BYTES_MAX as u64 {
        return Err(Error::invalid(format!(
            "--coalesce {coalesce} is out of range 0..={} (4M)",
            gpuio_cache::COALESCE_BYTES_MAX
        )));
    }
    Ok(())
}

/// Refuses an output file that is one of the command's inputs: the same device and inode, so also
/// through a symbolic or a hard link (writing it would destroy the data being read). An output that
/// does not exist yet is fine.
pub(crate) fn check_output_not_input(flag: &str, output: &Path, inputs: &[&Path]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let out = match std::fs::metadata(output) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::from_io(Op::Stat, &e).with_path(output)),
    };
    for input in inputs {
        let m =
            std::fs::metadata(input).map_err(|e| Error::from_io(Op::Stat, &e).with_path(input))?;
        if (m.dev(), m.ino()) == (out.dev(), out.ino()) {
            return Err(Error::invalid(format!(
                "{flag} {} is the input file {} (the same file, perhaps through a link): refusing to overwrite an input",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Major page faults of this process so far.
pub(crate) fn major_faults() -> u64 {
    // SAFETY: getrusage fills the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    ru.ru_majflt as u64
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
    /// Write every vertex's depth here as little-endian i32, -1 for unreachable.
    #[arg(long, value_name = "FILE")]
    depths_out: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
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

fn traverse<E: Edges>(
    bel: &Bel,
    source: u32,
    edges: &mut E,
    pb: Option<&indicatif::ProgressBar>,
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
        if let Some(pb) = pb {
            pb.set_message(format!(
                "level {levels}: {reached} vertices reached, frontier {}",
                frontier.len()
            ));
        }
    }
    Ok(Traversal {
        depths,
        levels,
        reached,
        scanned,
        seconds: start.elapsed().as_secs_f64(),
    })
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

pub fn run(a: BfsArgs) -> Result<()> {
    validate_cache_flags(a.line_size, a.queue_depth, a.coalesce)?;
    let (col_path, dst_path) = graph::bel_paths(&a.prefix);
    if let Some(out) = &a.depths_out {
        check_output_not_input("--depths-out", out, &[&col_path, &dst_path])?;
    }
    let bel = graph::read_bel(&a.prefix)?;
    if a.source >= bel.n as u64 {
        return Err(Error::invalid(format!(
            "--source {} is out of range: {} has {} vertices (0..={})",
            a.source,
            bel.col_path.display(),
            bel.n,
            bel.n - 1
        )));
    }
    let source = a.source as u32;
    let source_degree = bel.offsets[a.source as usize + 1] - bel.offsets[a.source as usize];
    let mut lines: Vec<String> = Vec::new();
    let source_note = (source_degree == 0).then(|| {
        // Kronecker graphs leave many vertices isolated; Graph500 starts from ones with edges.
        let (best, deg) = (0..bel.n)
            .map(|u| (u, bel.offsets[u + 1] - bel.offsets[u]))
            .max_by_key(|&(u, d)| (d, std::cmp::Reverse(u)))
            .unwrap_or((0, 0));
        format!(
            "source vertex {} has no edges, so the search reaches only the source itself; Graph500 starts from vertices that have edges: vertex {best} has the most ({deg}), try --source {best}",
            a.source
        )
    });
    if let Some(n) = &source_note {
        lines.push(format!("note: {n}"));
    }
    // The output's temporary file is made before the traversal, so a missing or read-only directory
    // fails at once rather than after the work; the check runs again on the resolved destination.
    let depths_out = match &a.depths_out {
        Some(p) => {
            // Temporaries of earlier runs killed by SIGKILL (which no handler can catch).
            crate::stream::remove_stale_temps(p);
            let r = gpuio::ReplaceFile::create(p)?;
            check_output_not_input("--depths-out", r.dest(), &[&bel.col_path, &bel.dst_path])?;
            Some(r)
        }
        None => None,
    };
    let pb = (!a.json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    });
    let faults0 = major_faults();
    let mut extra = serde_json::Map::new();
    let (t, cache_stats) = match a.mode {
        Mode::Memory => {
            if let Some(pb) = &pb {
                pb.set_message(format!("loading {}", bel.dst_path.display()));
            }
            let t0 = Instant::now();
            let dst = load_edges(&bel)?;
            let load_s = t0.elapsed().as_secs_f64();
            extra.insert("load_seconds".into(), json!(load_s));
            lines.push(format!(
                "load: {} in {load_s:.3} s ({}/s), not counted in the BFS time",
                format_bytes(bel.dst_bytes as f64),
                format_bytes(bel.dst_bytes as f64 / load_s.max(1e-9))
            ));
            let mut e = MemoryEdges {
                offsets: &bel.offsets,
                dst,
            };
            (traverse(&bel, source, &mut e, pb.as_ref())?, None)
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
            (traverse(&bel, source, &mut e, pb.as_ref())?, None)
        }
        Mode::Cache => {
            let capacity = cache_bytes(a.cache_size, bel.dst_bytes, a.line_size)?;
            let engine = cache_engine(a.queue_depth, capacity)?;
            let file = OpenOptions::read()
                .direct(DirectMode::Auto)
                .cold(true)
                .open(&bel.dst_path)?;
            let cache = PageCache::new(
                &engine,
                CacheConfig {
                    line_bytes: a.line_size as usize,
                    capacity_bytes: capacity,
                    queue_depth: a.queue_depth,
                    coalesce_bytes: a.coalesce.try_into().unwrap_or(usize::MAX),
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
            let lines_cap = (capacity / a.line_size).max(1) as usize;
            let overlap = lines_cap >= 2;
            let batch = (if overlap { lines_cap / 2 } else { 1 }).min(BATCH_PIECES_MAX);
            let mut e = CacheEdges {
                offsets: &bel.offsets,
                cache: &cache,
                src,
                line: a.line_size,
                batch,
                overlap,
                spare: Vec::new(),
            };
            let t = traverse(&bel, source, &mut e, pb.as_ref())?;
            let s = cache.stats();
            extra.insert("cache_bytes".into(), json!(capacity));
            extra.insert("line_bytes".into(), json!(a.line_size));
            extra.insert("queue_depth".into(), json!(a.queue_depth));
            extra.insert("batch_pieces".into(), json!(batch));
            extra.insert("direct".into(), json!(file.is_direct()));
            extra.insert("accesses".into(), json!(s.accesses));
            extra.insert("hits".into(), json!(s.hits));
            extra.insert("misses".into(), json!(s.misses));
            extra.insert("joined".into(), json!(s.joined));
            extra.insert("coalesce_bytes".into(), json!(a.coalesce));
            extra.insert("lines_loaded".into(), json!(s.lines_loaded));
            extra.insert("evictions".into(), json!(s.evictions));
            extra.insert("bytes_read".into(), json!(s.bytes_read));
            extra.insert("bytes_requested".into(), json!(s.bytes_requested));
            lines.push(format!(
                "cache: {} ({:.0}% of {}), {} lines, QD {}, {}: hit rate {:.1}%, {} reads ({}, {} lines), {:.0} IOPS",
                format_bytes(capacity as f64),
                capacity as f64 * 100.0 / bel.dst_bytes as f64,
                format_bytes(bel.dst_bytes as f64),
                format_bytes(a.line_size as f64),
                a.queue_depth,
                if file.is_direct() {
                    "direct I/O".to_string()
                } else {
                    format!("buffered I/O ({})", file.direct_reason())
                },
                s.hit_rate() * 100.0,
                s.reads_issued,
                format_bytes(s.bytes_read as f64),
                s.lines_loaded,
                s.reads_issued as f64 / t.seconds.max(1e-9)
            ));
            (t, Some(s))
        }
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if let Some(out) = depths_out {
        write_depths(out, &t.depths)?;
    }
    let faults = major_faults() - faults0;
    let teps = t.scanned as f64 / t.seconds.max(1e-9);
    if a.json {
        let (hit_rate, reads, iops) = match &cache_stats {
            Some(s) => (
                json!(s.hit_rate()),
                json!(s.reads_issued),
                json!(s.reads_issued as f64 / t.seconds.max(1e-9)),
            ),
            None => (Value::Null, Value::Null, Value::Null),
        };
        let mut v = json!({
            "graph": bel.col_path.display().to_string().trim_end_matches(".col"),
            "mode": a.mode.name(),
            "source": a.source,
            "source_degree": source_degree,
            "vertices": bel.n,
            "edges": bel.m,
            "seconds": t.seconds,
            "teps": teps,
            "edges_traversed": t.scanned,
            "vertices_reached": t.reached,
            "levels": t.levels,
            "hit_rate": hit_rate,
            "reads_issued": reads,
            "iops": iops,
            "major_faults": faults,
            "note": source_note,
        });
        if let Value::Object(o) = &mut v {
            o.extend(extra);
        }
        crate::report::print_json(&v)?;
    } else {
        outln!(
            "bfs {} from vertex {} ({} mode): {} vertices, {} edges",
            bel.col_path.display().to_string().trim_end_matches(".col"),
            a.source,
            a.mode.name(),
            bel.n,
            bel.m
        )?;
        outln!(
            "reached {} vertices in {} levels, scanned {} edges in {:.3} s: {:.2} M TEPS ({} major faults)",
            t.reached,
            t.levels,
            t.scanned,
            t.seconds,
            teps / 1e6,
            faults
        )?;
        for l in lines {
            outln!("{l}")?;
        }
        if let Some(p) = &a.depths_out {
            outln!("depths written to {}", p.display())?;
        }
    }
    Ok(())
}
