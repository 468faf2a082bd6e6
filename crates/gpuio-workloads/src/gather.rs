//! DLRM-style embedding lookups through the gpu-io page cache (behind `gpuio gather`). Each batch draws `--batch`
//! row indices (uniform, or Zipf over popularity ranks scattered across the table by a seeded bijection,
//! so that hot rows are not neighbours), gathers the rows through the cache, then "computes" for
//! `--compute-us` (a busy-wait on the calling thread, after folding a few bytes of every row into a
//! checksum so the data is really used).
//!
//! With `--prefetch on` the next batch's gather is issued before the current batch computes (AGILE's
//! overlap): its misses are in flight while this thread works. The synchronous version then runs too, in
//! the same invocation, over the same indices and with a fresh cache of the same size, and `speedup` is
//! its time divided by the prefetching run's. Both runs must read the same bytes (checked).
//!
//! Never prints: progress goes to the caller's callback, the figures are the returned [`GatherResult`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gpuio::size::format_bytes;
use gpuio::{DirectMode, Engine, Error, ErrorKind, OpenOptions, Result};
use gpuio_cache::{CacheConfig, HeldGather, HeldRows, PageCache, SourceId};

use crate::cache::{cache_bytes, cache_engine, CacheSize};
use crate::rng::{mix, Rng};
use crate::{listening, report, Progress, Report};

/// Row indices per batch, at most.
pub const BATCH_MAX: usize = 1 << 20;
/// Batches per run, at most (2^24: at the smallest cache's pace this is hours, never "forever").
pub const BATCHES_MAX: usize = 1 << 24;
/// Longest `--compute-us`: one second of busy-waiting per batch. The flag stands for a model's compute
/// on one batch, milliseconds in DLRM (the README's example uses 2000 µs); more is a typo.
pub const COMPUTE_US_MAX: u64 = 1_000_000;

/// How row indices are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dist {
    Uniform,
    /// Zipf with this exponent over popularity ranks.
    Zipf(f64),
}

impl Dist {
    /// `uniform` or `zipf:S`.
    pub fn name(self) -> String {
        match self {
            Dist::Uniform => "uniform".into(),
            Dist::Zipf(s) => format!("zipf:{s}"),
        }
    }
}

/// Parses `uniform` or `zipf:S` (S in (0, 100]).
pub fn parse_dist(s: &str) -> std::result::Result<Dist, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "uniform" {
        return Ok(Dist::Uniform);
    }
    if let Some(e) = t.strip_prefix("zipf:") {
        let v: f64 = e
            .parse()
            .map_err(|_| format!("'{s}': the Zipf exponent must be a number (zipf:1.1)"))?;
        if !(v > 0.0 && v <= 100.0) {
            return Err(format!("'{s}': the Zipf exponent must be in (0, 100]"));
        }
        return Ok(Dist::Zipf(v));
    }
    Err(format!(
        "'{s}' is not a distribution: uniform or zipf:S (e.g. zipf:1.1)"
    ))
}

/// One gather workload (`gpuio gather`'s flags).
#[derive(Debug, Clone)]
pub struct GatherConfig {
    /// The embedding table: rows of `row_bytes` at row·row_bytes (`--table`).
    pub table: PathBuf,
    /// Bytes per row (`--row-bytes`).
    pub row_bytes: u64,
    /// Rows per batch, 1..=[`BATCH_MAX`] (`--batch`).
    pub batch: usize,
    /// Batches to run, 1..=[`BATCHES_MAX`] (`--batches`).
    pub batches: usize,
    /// Row popularity (`--dist`, default uniform).
    pub dist: Dist,
    /// Cache capacity (`--cache-size`): bytes or a percentage of the table; `None`: 20%, at least
    /// 64 lines.
    pub cache: Option<CacheSize>,
    /// Cache line size, a power of two in 512..=65536 (`--line-size`, default 4 KiB).
    pub line_size: u64,
    /// Reads in flight (`--queue-depth`, default 64).
    pub queue_depth: usize,
    /// Largest read for a run of adjacent missing lines, 0 for one read per line (`--coalesce`,
    /// default 128 KiB).
    pub coalesce: u64,
    /// Threads a gather may issue its misses from, 0 for the cache's choice (one per core for a
    /// memory-backed file, else one); see `CacheConfig::issue_threads` (`--issue-threads`).
    pub issue_threads: usize,
    /// Issue the next batch's gather before computing the current one, and also run the synchronous
    /// version for the speedup (`--prefetch on`).
    pub prefetch: bool,
    /// Busy-wait per batch standing for the model's compute, 0..=[`COMPUTE_US_MAX`] µs (`--compute-us`).
    pub compute_us: u64,
    /// Seed of the row indices (`--seed`, default 1).
    pub seed: u64,
    /// Copy every row out of the cache into a batch buffer (`--copy-rows`), even where the rows could
    /// be handed out in place (`PageCache::gather_held`: a read-only table, rows inside one line,
    /// two batches' lines fitting in the cache at once).
    pub copy_rows: bool,
    /// Gather on a GPU (`--mode gpu-cache`): a kernel reads the rows itself through a device cache
    /// of the same capacity and line size, served by the request rings ([`crate::gather_gpu`]).
    pub gpu: bool,
    /// The GPU of `gpu` (`--device`, default `cuda:0`).
    pub device: String,
    /// How the ring server delivers lines to the device when `gpu` (`--delivery`, default copies;
    /// see `gpuio_cuda::rings::DeliveryPath`).
    pub delivery: gpuio_cuda::rings::DeliveryPath,
    /// The ring server's polling threads when `gpu`, 0 for
    /// `gpuio_cuda::rings::default_polling_threads` (`--server-threads`, default 0).
    pub server_threads: usize,
}

impl GatherConfig {
    /// `batches` batches of `batch` rows of `row_bytes` from `table`, with the CLI's defaults.
    pub fn new(table: impl Into<PathBuf>, row_bytes: u64, batch: usize, batches: usize) -> Self {
        GatherConfig {
            table: table.into(),
            row_bytes,
            batch,
            batches,
            dist: Dist::Uniform,
            cache: None,
            line_size: 4 << 10,
            queue_depth: 64,
            coalesce: 128 << 10,
            issue_threads: 0,
            prefetch: false,
            compute_us: 0,
            seed: 1,
            copy_rows: false,
            gpu: false,
            device: "cuda:0".into(),
            delivery: gpuio_cuda::rings::DeliveryPath::Copies,
            server_threads: 0,
        }
    }

    /// Checks every field and the table (it exists, is a file, holds a row); returns the table's
    /// length. The errors name the CLI flags, with their bounds.
    pub fn validate(&self) -> Result<u64> {
        validate(self)
    }
}

/// Zipf sampling over ranks 1..=n by rejection-inversion (Hörmann & Derflinger), O(1) per draw with
/// no table: works for any number of rows.
#[derive(Debug, Clone)]
struct Zipf {
    n: f64,
    s: f64,
    h_x1: f64,
    h_n: f64,
    q: f64,
}

fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

impl Zipf {
    fn new(n: u64, s: f64) -> Zipf {
        let mut z = Zipf {
            n: n as f64,
            s,
            h_x1: 0.0,
            h_n: 0.0,
            q: 0.0,
        };
        z.h_x1 = z.h_integral(1.5) - 1.0;
        z.h_n = z.h_integral(z.n + 0.5);
        z.q = 2.0 - z.h_integral_inv(z.h_integral(2.5) - z.h(2.0));
        z
    }
    fn h(&self, x: f64) -> f64 {
        (-self.s * x.ln()).exp()
    }
    fn h_integral(&self, x: f64) -> f64 {
        let lx = x.ln();
        helper2((1.0 - self.s) * lx) * lx
    }
    fn h_integral_inv(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.s)).max(-1.0);
        (helper1(t) * x).exp()
    }
    /// A rank in 1..=n; rank 1 is the most popular.
    fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_n + rng.unit() * (self.h_x1 - self.h_n);
            let x = self.h_integral_inv(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.q || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }
}

/// A seeded bijection of `0..n` (xor, odd multiplies and xor-shifts on the next power of two, cycle
/// walking back into range): scatters popularity ranks over the table.
#[derive(Debug, Clone)]
struct Scatter {
    n: u64,
    mask: u64,
    shift: u32,
    key: u64,
}

impl Scatter {
    fn new(n: u64, seed: u64) -> Scatter {
        let mask = n.next_power_of_two() - 1;
        Scatter {
            n,
            mask,
            shift: (mask.count_ones() / 2).max(1),
            key: mix(seed, 0x7363_6174) & mask,
        }
    }
    fn apply(&self, r: u64) -> u64 {
        let mut x = r;
        loop {
            x = (x ^ self.key) & self.mask;
            x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) & self.mask;
            x ^= x >> self.shift;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9) & self.mask;
            x ^= x >> self.shift;
            if x < self.n {
                return x;
            }
        }
    }
}

/// The batches' row indices, the same sequence for every run with the same seed.
#[derive(Debug, Clone)]
pub struct Indices {
    rng: Rng,
    rows: u64,
    zipf: Option<(Zipf, Scatter)>,
}

impl Indices {
    /// The sequence for a table of `rows` rows.
    pub fn new(dist: Dist, rows: u64, seed: u64) -> Indices {
        Indices {
            rng: Rng::new(mix(seed, 0x6761_7468)),
            rows,
            zipf: match dist {
                Dist::Uniform => None,
                Dist::Zipf(s) => Some((Zipf::new(rows, s), Scatter::new(rows, seed))),
            },
        }
    }
    /// The next row index.
    pub fn next_row(&mut self) -> u64 {
        match &self.zipf {
            None => self.rng.below(self.rows),
            Some((z, sc)) => sc.apply(z.sample(&mut self.rng) - 1),
        }
    }
    /// The next batch as (byte offset, length) requests.
    pub fn fill(&mut self, batch: usize, row_bytes: u64, out: &mut Vec<(u64, usize)>) {
        out.clear();
        for _ in 0..batch {
            let r = self.next_row();
            out.push((r * row_bytes, row_bytes as usize));
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct GatherRun {
    pub seconds: f64,
    /// Time blocked waiting for gathers.
    pub wait_seconds: f64,
    /// Time spent in `gather()` calls (issuing; a gather may wait there for room in the queue).
    pub issue_seconds: f64,
    pub reads_issued: u64,
    pub hit_rate: f64,
    pub hits: u64,
    pub misses: u64,
    pub joined: u64,
    pub bytes_read: u64,
    pub checksum: u64,
    /// GPU cache mode: warps launched over all batches (0 on the host).
    pub warps: u64,
}

fn busy_wait(us: u64) {
    if us == 0 {
        return;
    }
    let end = Instant::now() + Duration::from_micros(us);
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// Folds the first and last (up to) 8 bytes of one row into `sum`: the checksum a run reports is this
/// fold over every row it gathered, in order, starting from 0.
pub fn fold_row(sum: u64, row: &[u8]) -> u64 {
    let k = row.len().min(8);
    let mut a = [0u8; 8];
    a[..k].copy_from_slice(&row[..k]);
    let mut b = [0u8; 8];
    b[..k].copy_from_slice(&row[row.len() - k..]);
    sum.rotate_left(7) ^ u64::from_le_bytes(a) ^ u64::from_le_bytes(b).rotate_left(29)
}

/// A batch's gather in flight: rows to be copied out, or handed out in place.
enum Pending {
    Copy(gpuio_cache::Gather),
    Held(HeldGather),
}

/// A batch's rows.
enum Rows {
    Copied(gpuio_cache::GatherResult),
    Held(HeldRows),
}

impl Pending {
    fn start(
        cache: &PageCache,
        src: SourceId,
        ranges: &[(u64, usize)],
        in_place: bool,
        spare: &mut Vec<u8>,
    ) -> Result<Pending> {
        Ok(if in_place {
            Pending::Held(cache.gather_held(src, ranges)?)
        } else {
            Pending::Copy(cache.gather_into(src, ranges, std::mem::take(spare))?)
        })
    }
    fn wait(self) -> Result<Rows> {
        Ok(match self {
            Pending::Copy(g) => Rows::Copied(g.wait()?),
            Pending::Held(g) => Rows::Held(g.wait()?),
        })
    }
}

impl Rows {
    /// Folds every row into `sum` ([`fold_row`]).
    fn consume(&self, n: usize, mut sum: u64) -> u64 {
        for i in 0..n {
            sum = fold_row(
                sum,
                match self {
                    Rows::Copied(r) => r.get(i),
                    Rows::Held(r) => r.get(i),
                },
            );
        }
        sum
    }
    /// Gives a copied batch's memory to the next gather; releases held lines.
    fn recycle(self, spare: &mut Vec<u8>) {
        if let Rows::Copied(r) = self {
            *spare = r.into_bytes();
        }
    }
}

pub(crate) struct Plan<'a> {
    pub(crate) a: &'a GatherConfig,
    pub(crate) engine: &'a Engine,
    pub(crate) file: &'a gpuio::File,
    pub(crate) rows: u64,
    pub(crate) capacity: u64,
    /// Rows handed out in place ([`rows_in_place`]).
    in_place: bool,
}

/// Whether rows can be handed out in place (`PageCache::gather_held`), and if not, why: each row
/// must lie inside one line, and the lines of the batches held at once (two with prefetch: the one
/// being consumed and the next) must leave the cache at least half its lines to replace.
fn rows_in_place(a: &GatherConfig, cap_lines: u64, need: u64) -> std::result::Result<(), String> {
    if a.copy_rows {
        return Err("--copy-rows".into());
    }
    if a.row_bytes > a.line_size || a.line_size % a.row_bytes != 0 {
        return Err(format!(
            "rows of {} bytes do not each lie inside one {}-byte line",
            a.row_bytes, a.line_size
        ));
    }
    let held = need.saturating_mul(if a.prefetch { 2 } else { 1 });
    if held.saturating_mul(2) > cap_lines {
        return Err(format!(
            "holding {held} lines at once would leave the cache of {cap_lines} lines less than half to replace"
        ));
    }
    Ok(())
}

/// Batches finished before this run (of all runs), and the batches of all runs.
pub(crate) struct Steps {
    pub(crate) base: u64,
    pub(crate) total: u64,
}

impl Steps {
    /// The progress report after `k` batches of this run.
    pub(crate) fn step(&self, k: usize) -> Progress {
        Progress::Step {
            done: self.base + k as u64,
            total: self.total,
        }
    }
}

fn run_once(
    p: &Plan<'_>,
    prefetch: bool,
    progress: Report<'_>,
    steps: &Steps,
) -> Result<GatherRun> {
    let a = p.a;
    report(progress, steps.step(0))?;
    let cache = PageCache::new(
        p.engine,
        CacheConfig {
            line_bytes: a.line_size as usize,
            capacity_bytes: p.capacity,
            queue_depth: a.queue_depth,
            coalesce_bytes: a.coalesce.try_into().unwrap_or(usize::MAX),
            issue_threads: a.issue_threads,
        },
    )?;
    let src = cache.attach_file(p.file)?;
    p.file.drop_page_cache()?;
    let mut idx = Indices::new(a.dist, p.rows, a.seed);
    let mut cur = Vec::with_capacity(a.batch);
    let mut nxt = Vec::with_capacity(a.batch);
    let mut sum = 0u64;
    let mut wait = Duration::ZERO;
    let mut issue = Duration::ZERO;
    // Each copied result's memory is handed to a later gather: a fresh buffer per batch would be
    // zeroed and faulted in again every time (a fifth of the CPU time of a miss-bound gather on tmpfs).
    let mut spare: Vec<u8> = Vec::new();
    let in_place = p.in_place;
    let start = Instant::now();
    if prefetch {
        idx.fill(a.batch, a.row_bytes, &mut cur);
        let t = Instant::now();
        let mut pending = Some(Pending::start(&cache, src, &cur, in_place, &mut spare)?);
        issue += t.elapsed();
        for k in 0..a.batches {
            let g = pending.take().expect("a gather is pending for every batch");
            let t = Instant::now();
            let got = g.wait()?;
            wait += t.elapsed();
            if k + 1 < a.batches {
                idx.fill(a.batch, a.row_bytes, &mut nxt);
                let t = Instant::now();
                pending = Some(Pending::start(&cache, src, &nxt, in_place, &mut spare)?);
                issue += t.elapsed();
            }
            sum = got.consume(cur.len(), sum);
            got.recycle(&mut spare);
            busy_wait(a.compute_us);
            std::mem::swap(&mut cur, &mut nxt);
            // Stopping drops the next batch's pending gather: the cache lets its reads finish.
            report(progress, steps.step(k + 1))?;
        }
    } else {
        for k in 0..a.batches {
            idx.fill(a.batch, a.row_bytes, &mut cur);
            let t = Instant::now();
            let g = Pending::start(&cache, src, &cur, in_place, &mut spare)?;
            let t1 = Instant::now();
            issue += t1 - t;
            let got = g.wait()?;
            wait += t1.elapsed();
            sum = got.consume(cur.len(), sum);
            got.recycle(&mut spare);
            busy_wait(a.compute_us);
            report(progress, steps.step(k + 1))?;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let s = cache.stats();
    Ok(GatherRun {
        seconds,
        wait_seconds: wait.as_secs_f64(),
        issue_seconds: issue.as_secs_f64(),
        reads_issued: s.reads_issued,
        hit_rate: s.hit_rate(),
        hits: s.hits,
        misses: s.misses,
        joined: s.joined,
        bytes_read: s.bytes_read,
        checksum: sum,
        warps: 0,
    })
}

/// Most lines one row can touch.
fn lines_per_row(row: u64, line: u64) -> u64 {
    // (Written with division: `is_multiple_of` is newer than the supported toolchain.)
    if row / line * line == row || line / row * row == line {
        row.div_ceil(line)
    } else {
        row.div_ceil(line) + 1
    }
}

fn validate(a: &GatherConfig) -> Result<u64> {
    crate::cache::validate_cache_flags(a.line_size, a.queue_depth, a.coalesce, a.issue_threads)?;
    if a.row_bytes == 0 || a.row_bytes > usize::MAX as u64 {
        return Err(Error::invalid(format!(
            "--row-bytes {} is out of range 1..={}",
            a.row_bytes,
            usize::MAX
        )));
    }
    if a.compute_us > COMPUTE_US_MAX {
        return Err(Error::invalid(format!(
            "--compute-us {} is out of range 0..={COMPUTE_US_MAX} (one second per batch)",
            a.compute_us
        )));
    }
    if a.batch == 0 || a.batch > BATCH_MAX {
        return Err(Error::invalid(format!(
            "--batch {} is out of range 1..={BATCH_MAX}",
            a.batch
        )));
    }
    if a.batches == 0 || a.batches > BATCHES_MAX {
        return Err(Error::invalid(format!(
            "--batches {} is out of range 1..={BATCHES_MAX}",
            a.batches
        )));
    }
    let meta = match std::fs::metadata(&a.table) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "--table {0} does not exist: make one first, e.g. `gpuio bench --file {0} --size 1G --pattern write` or `dd if=/dev/urandom of={0} bs=1M count=1024`",
                    a.table.display()
                ),
            ));
        }
        Err(e) => {
            return Err(Error::from_io(gpuio::error::Op::Stat, &e).with_path(&a.table));
        }
    };
    if meta.is_dir() {
        return Err(Error::new(ErrorKind::IsADirectory, "is a directory").with_path(&a.table));
    }
    let len = meta.len();
    if len < a.row_bytes {
        return Err(Error::invalid(format!(
            "--table {} is {len} bytes, smaller than one row (--row-bytes {})",
            a.table.display(),
            a.row_bytes
        )));
    }
    Ok(len)
}

/// What a gather workload measured.
#[derive(Debug, Clone)]
pub struct GatherResult {
    /// Bytes of the table.
    pub table_bytes: u64,
    /// Rows in the table (whole rows of `row_bytes`).
    pub rows: u64,
    /// batch × batches.
    pub rows_gathered: u64,
    /// The cache's capacity.
    pub cache_bytes: u64,
    /// Whether the table was read with direct I/O.
    pub direct: bool,
    /// Why direct I/O was or was not used.
    pub direct_reason: String,
    /// The configured run: prefetching with `prefetch`, synchronous without.
    pub main: GatherRun,
    /// With `prefetch`: the synchronous reference run over the same rows.
    pub sync: Option<GatherRun>,
    /// With `prefetch`: the synchronous run's time ÷ the prefetching run's.
    pub speedup: Option<f64>,
    /// Whether rows were handed out in place (read where they lie in the cache's lines) rather than
    /// copied into a batch buffer, and if copied, why.
    pub rows_in_place: std::result::Result<(), String>,
}

impl GatherRun {
    /// Rows gathered per second, for a run of `rows` rows.
    pub fn rows_per_sec(&self, rows: u64) -> f64 {
        rows as f64 / self.seconds.max(1e-9)
    }
    /// Reads issued per second.
    pub fn iops(&self) -> f64 {
        self.reads_issued as f64 / self.seconds.max(1e-9)
    }
}

/// Runs the workload `cfg` describes (twice with `prefetch`: prefetching, then synchronously over the
/// same rows with a fresh cache); `progress` hears of each run as it starts. Refused up front: a bad
/// field, a missing table, and a batch whose rows would not fit in the cache together.
pub fn gather(cfg: &GatherConfig, progress: &mut dyn FnMut(Progress)) -> Result<GatherResult> {
    gather_with(cfg, &mut listening(progress))
}

/// [`gather`] with a callback that can stop it (see [`crate::Flow`]): after any batch. It also hears
/// [`Progress::Step`] after each batch (batches of both runs with prefetch).
pub fn gather_with(cfg: &GatherConfig, progress: Report<'_>) -> Result<GatherResult> {
    let a = cfg;
    let table_len = validate(a)?;
    let rows = table_len / a.row_bytes;
    let capacity = cache_bytes(a.cache, table_len, a.line_size)?;
    let prefetch = a.prefetch;
    // A batch whose rows span more lines than the cache holds would evict its own lines before it is
    // consumed (every batch thrashing itself): refuse it with the remedy.
    let cap_lines = capacity / a.line_size;
    let need = (a.batch as u64).saturating_mul(lines_per_row(a.row_bytes, a.line_size));
    if need > cap_lines {
        return Err(Error::invalid(format!(
            "a cache of {} ({cap_lines} lines of {}) cannot hold a batch of {} rows of {} bytes (up to {need} lines): raise --cache-size or lower --batch",
            format_bytes(capacity as f64),
            a.line_size,
            a.batch,
            a.row_bytes,
        )));
    }
    let engine = cache_engine(a.queue_depth, capacity)?;
    let file = OpenOptions::read()
        .direct(DirectMode::Auto)
        .cold(true)
        .open(&a.table)?;
    let in_place = if a.gpu {
        Err("--mode gpu-cache: the kernel copies the rows into device memory".to_string())
    } else {
        rows_in_place(a, cap_lines, need)
    };
    let plan = Plan {
        a,
        engine: &engine,
        file: &file,
        rows,
        capacity,
        in_place: in_place.is_ok(),
    };
    let runs = if prefetch { 2 } else { 1 };
    let total = a.batches as u64 * runs;
    report(
        progress,
        Progress::Phase(
            if prefetch {
                "gathering with prefetch"
            } else {
                "gathering"
            }
            .into(),
        ),
    )?;
    let run = |prefetch: bool, progress: Report<'_>, steps: &Steps| {
        if a.gpu {
            crate::gather_gpu::run_once(&plan, prefetch, progress, steps)
        } else {
            run_once(&plan, prefetch, progress, steps)
        }
    };
    let main = run(prefetch, progress, &Steps { base: 0, total })?;
    let sync = if prefetch {
        report(
            progress,
            Progress::Phase("gathering synchronously (reference)".into()),
        )?;
        let steps = Steps {
            base: a.batches as u64,
            total,
        };
        let s = run(false, progress, &steps)?;
        if s.checksum != main.checksum {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "the prefetching and synchronous runs read different bytes for the same rows",
            ));
        }
        Some(s)
    } else {
        None
    };
    let speedup = sync.as_ref().map(|s| s.seconds / main.seconds.max(1e-9));
    Ok(GatherResult {
        table_bytes: table_len,
        rows,
        rows_gathered: a.batch as u64 * a.batches as u64,
        cache_bytes: capacity,
        direct: file.is_direct(),
        direct_reason: file.direct_reason().to_string(),
        main,
        sync,
        speedup,
        rows_in_place: in_place,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_matches_harmonic_weights() {
        let n = 100u64;
        let s = 1.0;
        let z = Zipf::new(n, s);
        let mut rng = Rng::new(3);
        let trials = 200_000;
        let mut counts = vec![0u32; n as usize + 1];
        for _ in 0..trials {
            let k = z.sample(&mut rng);
            assert!((1..=n).contains(&k));
            counts[k as usize] += 1;
        }
        let h: f64 = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).sum();
        for k in [1usize, 2, 10] {
            let want = 1.0 / (k as f64).powf(s) / h;
            let got = counts[k] as f64 / trials as f64;
            assert!((got - want).abs() < 0.01, "rank {k}: {got} vs {want}");
        }
    }

    #[test]
    fn scatter_is_a_bijection() {
        for n in [1u64, 2, 3, 100, 1000, 4096] {
            let sc = Scatter::new(n, 9);
            let mut seen = vec![false; n as usize];
            for r in 0..n {
                let x = sc.apply(r) as usize;
                assert!(!seen[x]);
                seen[x] = true;
            }
        }
    }

    #[test]
    fn dist_parsing() {
        assert_eq!(parse_dist("uniform"), Ok(Dist::Uniform));
        assert_eq!(parse_dist("zipf:1.1"), Ok(Dist::Zipf(1.1)));
        assert!(parse_dist("zipf:0").is_err());
        assert!(parse_dist("zipf:x").is_err());
        assert!(parse_dist("normal").is_err());
    }
}
