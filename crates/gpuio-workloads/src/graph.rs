//! Graph500 Kronecker and uniform random graphs written in the EMOGI/BaM `.bel` CSR layout
//! ([`generate`], behind `gpuio graph gen`), and the `.bel` reader ([`read_bel`]) that [`crate::bfs`]
//! uses.
//!
//! Never prints: progress goes to the caller's callback, and the summary is the returned
//! [`GraphGenResult`].
//!
//! The layout (all little-endian), as in the published BaM datasets:
//!
//! - `PREFIX.bel.col`: u64 count, u64 reserved (0), then `count` u64 vertex offsets. We write n+1
//!   offsets (the last one is the edge count); the reader also accepts n (the final offset implied).
//! - `PREFIX.bel.dst`: u64 edge count m, u64 reserved (0), then m u64 destination vertices; the
//!   neighbours of vertex v are `dst[col[v]..col[v+1]]`.
//!
//! What `gen` writes (Graph500 BFS semantics): the generated edge tuples are undirected, so each is
//! stored in both directions; self-loops are dropped and so are duplicate edges, so every adjacency list
//! is sorted ascending without repeats (a simple graph, like the converted datasets BaM and EMOGI use).
//! Kronecker vertex labels go through a seeded random permutation, as the Graph500 generator's do, so
//! that high-degree vertices are not clustered at low ids. Output depends only on the arguments: edges
//! are generated in fixed chunks, each from its own seeded stream, whatever the number of threads.
//!
//! Output: both files are written crash-safely (see [`write_bel`]); a write-protected one is replaced
//! only with [`GraphGenConfig::force`] (`--force`).
//!
//! Memory: the edge tuples (8 bytes each), the directed edge array (4 bytes per entry, two per tuple)
//! and the offsets are built in RAM with a counting sort — about `16·D·2^S + 28·2^S` bytes, 4.3 GiB for
//! scale 24 degree 16. A build that would not fit in the memory available is refused up front.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use gpuio::error::Op;
use gpuio::size::format_bytes;
use gpuio::{Error, ErrorKind, Result};

pub use crate::rng::{mix, Rng};
use crate::{listening, report, Progress, Report};

/// Largest accepted `--scale` (2^30 vertices: labels still fit in 32 bits).
pub const SCALE_MAX: u32 = 30;
/// Largest accepted `--degree`.
pub const DEGREE_MAX: u32 = 4096;
/// Bytes of each `.bel` file's header: u64 count, u64 reserved.
pub const HEADER_BYTES: u64 = 16;

/// Graph500 Kronecker initiator probabilities.
const KRON_A: f64 = 0.57;
const KRON_B: f64 = 0.19;
const KRON_C: f64 = 0.19;
/// Edge tuples generated per seeded stream.
const GEN_CHUNK: usize = 1 << 16;

/// The generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Graph500 Kronecker (A=0.57, B=0.19, C=0.19, D=0.05), vertex labels permuted.
    Kron,
    /// Uniform random: both endpoints of every edge drawn uniformly.
    Urand,
}

impl Kind {
    /// `kron` or `urand`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Kron => "kron",
            Kind::Urand => "urand",
        }
    }
}

/// What [`generate`] builds and where it writes it (`gpuio graph gen`'s flags).
#[derive(Debug, Clone)]
pub struct GraphGenConfig {
    /// The generator (`--kind`, default Kronecker).
    pub kind: Kind,
    /// 2^scale vertices, 1..=[`SCALE_MAX`] (`--scale`).
    pub scale: u32,
    /// Edge tuples per vertex: degree·2^scale are generated, 1..=[`DEGREE_MAX`] (`--degree`, default 16).
    pub degree: u32,
    /// Seed: the same config always gives the same bytes (`--seed`, default 1).
    pub seed: u64,
    /// Output prefix: PREFIX.bel.col and PREFIX.bel.dst are written (`--output`).
    pub output: PathBuf,
    /// Replace existing output files even if they are write-protected (`--force`).
    pub force: bool,
}

impl GraphGenConfig {
    /// A Kronecker graph of 2^`scale` vertices, degree 16, seed 1, written to `output`.
    pub fn new(scale: u32, output: impl Into<PathBuf>) -> GraphGenConfig {
        GraphGenConfig {
            kind: Kind::Kron,
            scale,
            degree: 16,
            seed: 1,
            output: output.into(),
            force: false,
        }
    }

    /// Checks scale and degree (not the output, nor the memory available: [`generate`] does).
    pub fn validate(&self) -> Result<()> {
        if self.scale == 0 || self.scale > SCALE_MAX {
            return Err(Error::invalid(format!(
                "--scale {} is out of range 1..={SCALE_MAX} (2^scale vertices)",
                self.scale
            )));
        }
        if self.degree == 0 || self.degree > DEGREE_MAX {
            return Err(Error::invalid(format!(
                "--degree {} is out of range 1..={DEGREE_MAX}",
                self.degree
            )));
        }
        Ok(())
    }
}

/// What [`generate`] built and wrote.
#[derive(Debug, Clone)]
pub struct GraphGenResult {
    pub kind: Kind,
    pub scale: u32,
    pub degree: u32,
    pub seed: u64,
    /// 2^scale.
    pub vertices: u64,
    /// Directed edges stored (both directions of every kept tuple).
    pub edges: u64,
    /// Edge tuples generated (degree·2^scale).
    pub generated_edges: u64,
    pub self_loops_dropped: u64,
    pub duplicates_dropped: u64,
    /// The `.bel.col` file written.
    pub col: PathBuf,
    /// The `.bel.dst` file written.
    pub dst: PathBuf,
    /// Bytes of both files.
    pub bytes: u64,
    /// Whole run.
    pub seconds: f64,
    pub generate_seconds: f64,
    pub build_seconds: f64,
    pub write_seconds: f64,
}

// ---------------------------------------------------------------------------------------------------
// Paths.

/// `PREFIX.bel.col` and `PREFIX.bel.dst`. A prefix that already ends in `.bel`, `.bel.col` or
/// `.bel.dst` is understood as the same graph.
pub fn bel_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let s = prefix.as_os_str().to_string_lossy();
    let base = s
        .strip_suffix(".bel.col")
        .or_else(|| s.strip_suffix(".bel.dst"))
        .or_else(|| s.strip_suffix(".bel"))
        .unwrap_or(&s);
    (
        PathBuf::from(format!("{base}.bel.col")),
        PathBuf::from(format!("{base}.bel.dst")),
    )
}

// ---------------------------------------------------------------------------------------------------
// Generation.

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 64)
}

/// `MemAvailable` from /proc/meminfo, when readable.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Probability `p` as a threshold on a uniform u32 (compared as u64).
fn threshold(p: f64) -> u64 {
    (p * 4_294_967_296.0).round() as u64
}

/// A seeded uniform random permutation of `0..n` (Fisher–Yates).
fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    let mut rng = Rng::new(mix(seed, 0x7065_726d));
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Fills `out` with the edge tuples of chunk `chunk` (each chunk its own stream).
fn gen_chunk(kind: Kind, scale: u32, seed: u64, chunk: usize, perm: &[u32], out: &mut [[u32; 2]]) {
    let mut rng = Rng::new(mix(mix(seed, kind as u64 + 1), chunk as u64));
    match kind {
        Kind::Kron => {
            // The Graph500 reference generator's recursion, one bit of each endpoint per level:
            // the row bit is 1 with probability C+D; the column bit is then 1 with probability
            // B/(A+B) (row bit 0) or D/(C+D) (row bit 1).
            let t_ab = threshold(KRON_A + KRON_B);
            let t_a_norm = threshold(KRON_A / (KRON_A + KRON_B));
            let t_c_norm = threshold(KRON_C / (1.0 - (KRON_A + KRON_B)));
            for e in out.iter_mut() {
                let (mut u, mut v) = (0u32, 0u32);
                for _ in 0..scale {
                    let r = rng.next_u64();
                    let ii = (r & 0xFFFF_FFFF) >= t_ab;
                    let jj = (r >> 32) >= if ii { t_c_norm } else { t_a_norm };
                    u = (u << 1) | ii as u32;
                    v = (v << 1) | jj as u32;
                }
                *e = [perm[u as usize], perm[v as usize]];
            }
        }
        Kind::Urand => {
            let n = 1u64 << scale;
            for e in out.iter_mut() {
                *e = [rng.below(n) as u32, rng.below(n) as u32];
            }
        }
    }
}

/// All `m` edge tuples, generated in parallel; identical for any thread count.
pub fn generate_edges(kind: Kind, scale: u32, m: usize, seed: u64) -> Vec<[u32; 2]> {
    let perm = match kind {
        Kind::Kron => permutation(1usize << scale, seed),
        Kind::Urand => Vec::new(),
    };
    let mut edges = vec![[0u32; 2]; m];
    let chunks = m.div_ceil(GEN_CHUNK);
    let t = threads().min(chunks).max(1);
    let per = chunks.div_ceil(t);
    std::thread::scope(|s| {
        let mut rest: &mut [[u32; 2]] = &mut edges;
        let mut first_chunk = 0;
        while !rest.is_empty() {
            let take = (per * GEN_CHUNK).min(rest.len());
            let (mine, tail) = rest.split_at_mut(take);
            rest = tail;
            let perm = &perm;
            let c0 = first_chunk;
            s.spawn(move || {
                for (i, out) in mine.chunks_mut(GEN_CHUNK).enumerate() {
                    gen_chunk(kind, scale, seed, c0 + i, perm, out);
                }
            });
            first_chunk += per;
        }
    });
    edges
}

/// A CSR graph in memory: `dst[offsets[v]..offsets[v+1]]` are v's neighbours.
#[derive(Debug, Clone)]
pub struct Csr {
    pub offsets: Vec<u64>,
    pub dst: Vec<u32>,
    pub self_loops: u64,
    pub duplicates: u64,
}

/// Counting sort of the tuples by source, both directions, self-loops dropped; then each adjacency list
/// sorted and its repeats removed.
pub fn build_csr(n: usize, edges: Vec<[u32; 2]>) -> Csr {
    let mut offsets = vec![0u64; n + 1];
    let mut self_loops = 0u64;
    for &[u, v] in &edges {
        if u == v {
            self_loops += 1;
        } else {
            offsets[u as usize + 1] += 1;
            offsets[v as usize + 1] += 1;
        }
    }
    for i in 0..n {
        offsets[i + 1] += offsets[i];
    }
    let total = offsets[n] as usize;
    let mut dst = vec![0u32; total];
    {
        let mut cursor: Vec<u64> = offsets[..n].to_vec();
        for &[u, v] in &edges {
            if u != v {
                let cu = &mut cursor[u as usize];
                dst[*cu as usize] = v;
                *cu += 1;
                let cv = &mut cursor[v as usize];
                dst[*cv as usize] = u;
                *cv += 1;
            }
        }
    }
    drop(edges);

    // Sort and deduplicate every list, in parallel over vertex ranges of about equal edge counts.
    let t = threads();
    let mut bounds = vec![0usize];
    for i in 1..t {
        let target = total as u64 * i as u64 / t as u64;
        let v = offsets.partition_point(|&o| o < target).min(n);
        if v > *bounds.last().expect("non-empty") {
            bounds.push(v);
        }
    }
    if *bounds.last().expect("non-empty") < n {
        bounds.push(n);
    }
    let mut unique = vec![0u64; n];
    std::thread::scope(|s| {
        let mut rest_dst: &mut [u32] = &mut dst;
        let mut rest_unique: &mut [u64] = &mut unique;
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            let len = (offsets[hi] - offsets[lo]) as usize;
            let (d, dt) = rest_dst.split_at_mut(len);
            rest_dst = dt;
            let (un, ut) = rest_unique.split_at_mut(hi - lo);
            rest_unique = ut;
            let offsets = &offsets;
            s.spawn(move || {
                let base = offsets[lo];
                for v in lo..hi {
                    let list =
                        &mut d[(offsets[v] - base) as usize..(offsets[v + 1] - base) as usize];
                    list.sort_unstable();
                    let mut k = 0;
                    for i in 0..list.len() {
                        if i == 0 || list[i] != list[k - 1] {
                            list[k] = list[i];
                            k += 1;
                        }
                    }
                    un[v - lo] = k as u64;
                }
            });
        }
    });
    // Compact: lists only move towards the front, so a forward pass never overwrites unread data.
    let mut at = 0u64;
    let mut new_offsets = vec![0u64; n + 1];
    for v in 0..n {
        let start = offsets[v] as usize;
        let k = unique[v] as usize;
        if at as usize != start {
            dst.copy_within(start..start + k, at as usize);
        }
        at += k as u64;
        new_offsets[v + 1] = at;
    }
    let duplicates = total as u64 - at;
    dst.truncate(at as usize);
    dst.shrink_to_fit();
    Csr {
        offsets: new_offsets,
        dst,
        self_loops,
        duplicates,
    }
}

/// Writes one `.bel` file's new version beside it: header (count, 0) then `values` as little-endian
/// u64, into a [`gpuio::ReplaceFile`] that the caller commits.
fn write_u64s<T: Copy + Into<u64>>(path: &Path, values: &[T]) -> Result<gpuio::ReplaceFile> {
    let tmp = gpuio::ReplaceFile::create(path)?;
    let werr = |e: std::io::Error| Error::from_io(Op::Write, &e).with_path(tmp.temp_path());
    let mut w = std::io::BufWriter::with_capacity(8 << 20, tmp.as_file());
    let mut bytes = Vec::with_capacity(64 << 10);
    bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    w.write_all(&bytes).map_err(werr)?;
    for chunk in values.chunks(8192) {
        bytes.clear();
        for &v in chunk {
            bytes.extend_from_slice(&v.into().to_le_bytes());
        }
        w.write_all(&bytes).map_err(werr)?;
    }
    w.flush().map_err(werr)?;
    drop(w);
    Ok(tmp)
}

/// Writes `csr` as `PREFIX.bel.col` and `PREFIX.bel.dst`, crash-safely; returns the bytes written.
///
/// Both new files are written in full beside the old ones and synced before either is renamed into
/// place (`.dst` first, then `.col`), so a failure while writing (a full disk) or a kill leaves the old
/// files untouched, and each file is always either its old or its new version. The two renames are not
/// one atomic step: a crash between them (microseconds) leaves a new `.dst` beside the old `.col`.
pub fn write_bel(prefix: &Path, csr: &Csr) -> Result<u64> {
    let (col, dst) = bel_paths(prefix);
    let col_tmp = write_u64s(&col, &csr.offsets)?;
    let dst_tmp = write_u64s(&dst, &csr.dst)?;
    dst_tmp.commit()?;
    col_tmp.commit()?;
    Ok(2 * HEADER_BYTES + 8 * (csr.offsets.len() + csr.dst.len()) as u64)
}

/// Generates the graph `cfg` describes and writes it as PREFIX.bel.col and PREFIX.bel.dst
/// (crash-safely, see [`write_bel`]); `progress` hears of each phase. Refused up front: a bad scale or
/// degree, a build that would not fit in the memory available, a missing output directory and a
/// write-protected output without `force`.
pub fn generate(
    cfg: &GraphGenConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<GraphGenResult> {
    generate_with(cfg, &mut listening(progress))
}

/// Phases of [`generate`], counted by [`Progress::Step`].
const GENERATE_STEPS: u64 = 3;

/// [`generate`] with a callback that can stop it (see [`crate::Flow`]): between phases, and before
/// anything is written; the output files are then left as they were.
pub fn generate_with(cfg: &GraphGenConfig, progress: Report<'_>) -> Result<GraphGenResult> {
    cfg.validate()?;
    let n = 1usize << cfg.scale;
    let m = (cfg.degree as usize) << cfg.scale;
    let need = 16 * m as u64 + 28 * n as u64;
    if let Some(avail) = mem_available() {
        if need > avail {
            return Err(Error::invalid(format!(
                "--scale {} --degree {} needs about {} of memory to build, more than the {} available: lower --scale or --degree",
                cfg.scale,
                cfg.degree,
                format_bytes(need as f64),
                format_bytes(avail as f64)
            )));
        }
    }
    let (col_path, dst_path) = bel_paths(&cfg.output);
    if let Some(dir) = col_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "output directory {} does not exist",
                    gpuio::input::escape_path(dir)
                ),
            ));
        }
    }
    // Before the (long) build: a write-protected output is refused now, not after it.
    for p in [&col_path, &dst_path] {
        gpuio::replace::check_destination(p, &[], cfg.force)?;
        crate::remove_stale_temps(p, progress)?;
    }
    let step = |done| Progress::Step {
        done,
        total: GENERATE_STEPS,
    };
    let t0 = Instant::now();
    report(progress, Progress::Phase("generating edges".into()))?;
    report(progress, step(0))?;
    let edges = generate_edges(cfg.kind, cfg.scale, m, cfg.seed);
    let t_gen = t0.elapsed().as_secs_f64();
    report(progress, step(1))?;
    report(progress, Progress::Phase("building CSR".into()))?;
    let t1 = Instant::now();
    let csr = build_csr(n, edges);
    let t_build = t1.elapsed().as_secs_f64();
    report(progress, step(2))?;
    report(progress, Progress::Phase("writing".into()))?;
    let t2 = Instant::now();
    let bytes = write_bel(&cfg.output, &csr)?;
    let t_write = t2.elapsed().as_secs_f64();
    // The files are in place: a callback that stops now still gets the error, after the work.
    report(progress, step(GENERATE_STEPS))?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(GraphGenResult {
        kind: cfg.kind,
        scale: cfg.scale,
        degree: cfg.degree,
        seed: cfg.seed,
        vertices: n as u64,
        edges: csr.dst.len() as u64,
        generated_edges: m as u64,
        self_loops_dropped: csr.self_loops,
        duplicates_dropped: csr.duplicates,
        col: col_path,
        dst: dst_path,
        bytes,
        seconds: secs,
        generate_seconds: t_gen,
        build_seconds: t_build,
        write_seconds: t_write,
    })
}

// ---------------------------------------------------------------------------------------------------
// Reading.

/// A `.bel` graph opened for BFS: the offsets in memory (validated), the edge file located and its
/// header checked. Destinations are checked as they are read.
#[derive(Debug)]
pub struct Bel {
    pub col_path: PathBuf,
    pub dst_path: PathBuf,
    /// Vertices.
    pub n: usize,
    /// Edges (entries of the `.dst` file).
    pub m: u64,
    /// n+1 offsets, the last one `m`.
    pub offsets: Vec<u64>,
    /// Bytes of the `.dst` file.
    pub dst_bytes: u64,
}

fn corrupt(path: &Path, msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, msg).with_path(path)
}

fn open_read(path: &Path) -> Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(path).map_err(|e| Error::from_io(Op::Open, &e).with_path(path))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::from_io(Op::Stat, &e).with_path(path))?;
    if meta.is_dir() {
        return Err(Error::new(ErrorKind::IsADirectory, "is a directory").with_path(path));
    }
    Ok((f, meta.len()))
}

/// Reads a header and checks that its count agrees with the file's size.
fn read_header(f: &mut std::fs::File, len: u64, path: &Path, what: &str) -> Result<u64> {
    if len < HEADER_BYTES {
        return Err(corrupt(
            path,
            format!("{len} bytes is shorter than the 16-byte .bel header"),
        ));
    }
    let mut h = [0u8; 16];
    f.read_exact(&mut h).map_err(|e| {
        Error::from_io(Op::Read, &e)
            .with_path(path)
            .with_range(0, 16)
    })?;
    let count = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let expect = count
        .checked_mul(8)
        .and_then(|b| b.checked_add(HEADER_BYTES));
    if expect != Some(len) {
        return Err(corrupt(
            path,
            format!(
                "header count {count} {what} needs {} bytes but the file has {len}",
                match expect {
                    Some(b) => b.to_string(),
                    None => "more than 2^64".to_string(),
                }
            ),
        ));
    }
    Ok(count)
}

/// Opens `PREFIX.bel.{col,dst}`: checks both headers against the files' sizes and reads every offset,
/// checking that they start at 0, never decrease and stay within the edge file. A `.col` count of n+1
/// (the last offset equal to the edge count) or of n (the last offset below it, the final one implied)
/// is accepted.
pub fn read_bel(prefix: &Path) -> Result<Bel> {
    let (col_path, dst_path) = bel_paths(prefix);
    let (mut df, dst_bytes) = open_read(&dst_path)?;
    let m = read_header(&mut df, dst_bytes, &dst_path, "(edges)")?;
    drop(df);
    let (cf, col_bytes) = open_read(&col_path)?;
    let mut cf = std::io::BufReader::with_capacity(1 << 20, cf);
    let count = {
        let f = cf.get_mut();
        read_header(f, col_bytes, &col_path, "(offsets)")?
    };
    if count == 0 {
        return Err(corrupt(&col_path, "has no offsets: no vertices".into()));
    }
    if count > u32::MAX as u64 + 1 {
        return Err(corrupt(
            &col_path,
            format!("{count} offsets: more than 2^32 vertices is not supported"),
        ));
    }
    let mut offsets: Vec<u64> = Vec::with_capacity(count as usize + 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut i = 0u64;
    let mut prev = 0u64;
    while i < count {
        let k = ((count - i) as usize).min(buf.len() / 8);
        cf.read_exact(&mut buf[..k * 8]).map_err(|e| {
            Error::from_io(Op::Read, &e)
                .with_path(&col_path)
                .with_range(HEADER_BYTES + 8 * i, 8 * k as u64)
        })?;
        for c in buf[..k * 8].chunks_exact(8) {
            let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            if i == 0 && v != 0 {
                return Err(corrupt(
                    &col_path,
                    format!("offset 0 is {v}: the first offset must be 0"),
                ));
            }
            if v < prev {
                return Err(corrupt(
                    &col_path,
                    format!(
                        "offset {i} is {v}, smaller than offset {} ({prev}): offsets must not decrease",
                        i - 1
                    ),
                ));
            }
            if v > m {
                return Err(corrupt(
                    &col_path,
                    format!(
                        "offset {i} is {v}, past the {m} edges of {}",
                        dst_path.display()
                    ),
                ));
            }
            offsets.push(v);
            prev = v;
            i += 1;
        }
    }
    // n+1 offsets end at m; n offsets end below it (or at it, but then the last vertex would have no
    // edges and the file is read as n+1: the two cannot be told apart).
    if prev != m {
        offsets.push(m);
    }
    let n = offsets.len() - 1;
    if n == 0 {
        return Err(corrupt(&col_path, "has no vertices".into()));
    }
    Ok(Bel {
        col_path,
        dst_path,
        n,
        m,
        offsets,
        dst_bytes,
    })
}

/// The error for a destination that is not a vertex.
pub fn bad_destination(bel: &Bel, edge: u64, v: u64) -> Error {
    corrupt(
        &bel.dst_path,
        format!(
            "edge {edge} has destination {v}, not a vertex (the graph has {} vertices)",
            bel.n
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kron_probabilities() {
        // One level's quadrant frequencies match A, B, C, D.
        let t_ab = threshold(KRON_A + KRON_B);
        let t_a = threshold(KRON_A / (KRON_A + KRON_B));
        let t_c = threshold(KRON_C / (1.0 - (KRON_A + KRON_B)));
        let mut rng = Rng::new(7);
        let mut q = [0u32; 4];
        let trials = 400_000;
        for _ in 0..trials {
            let r = rng.next_u64();
            let ii = (r & 0xFFFF_FFFF) >= t_ab;
            let jj = (r >> 32) >= if ii { t_c } else { t_a };
            q[(ii as usize) * 2 + jj as usize] += 1;
        }
        let f: Vec<f64> = q.iter().map(|&c| c as f64 / trials as f64).collect();
        for (got, want) in f.iter().zip([0.57, 0.19, 0.19, 0.05]) {
            assert!((got - want).abs() < 0.005, "{f:?}");
        }
    }

    #[test]
    fn csr_is_symmetric_sorted_unique() {
        let edges = vec![[0, 1], [1, 0], [2, 2], [3, 1], [0, 1]];
        let c = build_csr(4, edges);
        assert_eq!(c.offsets, vec![0, 1, 3, 3, 4]);
        assert_eq!(c.dst, vec![1, 0, 3, 1]);
        assert_eq!(c.self_loops, 1);
        assert_eq!(c.duplicates, 4);
    }

    #[test]
    fn paths() {
        for p in ["g", "g.bel", "g.bel.col", "g.bel.dst"] {
            let (c, d) = bel_paths(Path::new(p));
            assert_eq!(c, PathBuf::from("g.bel.col"));
            assert_eq!(d, PathBuf::from("g.bel.dst"));
        }
    }
}
