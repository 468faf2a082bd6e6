//! The measured workloads: the engine itself (any backend), and the references it is compared with in the
//! same run on the same file — a plain single-thread pread/pwrite loop, and fio when it is installed.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gpuio::queue::{LatencySummary, QueueStats};
use gpuio::{
    AlignedBuf, BackendChoice, Completion, DirectMode, Engine, EngineConfig, Error, ErrorKind,
    IoBuffer, LocalConfig, LocalQueue, OpenOptions, QueueDesc, Result,
};
use indicatif::ProgressBar;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    Read,
    Write,
    Randread,
    Randwrite,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
        }
    }
    pub fn is_write(self) -> bool {
        matches!(self, Pattern::Write | Pattern::Randwrite)
    }
    pub fn is_random(self) -> bool {
        matches!(self, Pattern::Randread | Pattern::Randwrite)
    }
}

/// What to run: the same for the engine and every reference.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub pattern: Pattern,
    pub block_size: usize,
    pub queue_depth: usize,
    pub duration: Duration,
    /// Bytes of the file the workload touches, from offset 0.
    pub region: u64,
    /// Application threads, each with its own queue (fio's `numjobs`).
    pub threads: usize,
}

impl Spec {
    /// Blocks in the region: the I/Os of one pass.
    pub fn blocks(&self) -> u64 {
        (self.region / self.block_size as u64).max(1)
    }

    /// Most I/Os a run issues. Reads stop after one pass over the region (random order visits each
    /// block once per pass), so that no engine reads a block an earlier read left in the page cache:
    /// buffered and mmap runs stay as cold as direct ones. Writes are bounded by the duration only.
    pub fn ops_max(&self) -> u64 {
        if self.pattern.is_write() {
            u64::MAX
        } else {
            self.blocks()
        }
    }
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Who ran: `gpu-io`, `threads`, `mmap`, `pread loop`, `fio`.
    pub name: String,
    pub backend: String,
    pub direct: bool,
    pub ops: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub latency: LatencySummary,
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
}

impl Measurement {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed_s
    }
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed_s
    }
    /// CPU microseconds per I/O (user + system).
    pub fn cpu_us_per_io(&self) -> f64 {
        (self.cpu_user_s + self.cpu_sys_s) * 1e6 / self.ops.max(1) as f64
    }
}

/// Offsets for a pattern. Sequential wraps around the region. Random visits every block once per pass
/// in a scrambled order, like fio's default random map: a full-period LCG over the next power of two,
/// skipping values past the last block.
pub struct Offsets {
    random: bool,
    blocks: u64,
    block: u64,
    mask: u64,
    next: u64,
}

impl Offsets {
    pub fn new(spec: &Spec, seed: u64) -> Offsets {
        let blocks = spec.blocks();
        let mask = blocks.next_power_of_two() - 1;
        Offsets {
            random: spec.pattern.is_random(),
            blocks,
            block: spec.block_size as u64,
            mask,
            next: if spec.pattern.is_random() {
                seed & mask
            } else {
                0
            },
        }
    }
}

impl Iterator for Offsets {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let b = if self.random {
            // x -> a*x + c mod 2^k has full period when a % 4 == 1 and c is odd (Hull–Dobell).
            // Its low bits cycle quickly, so the output goes through a bijection of the k-bit space
            // (xor-shift and odd multiply) before values past the last block are skipped.
            let shift = (self.mask.count_ones() / 2).max(1);
            loop {
                self.next = self
                    .next
                    .wrapping_mul(0x5851_F42D_4C95_7F2D)
                    .wrapping_add(0x1405_7B7E_F767_814F)
                    & self.mask;
                let mut x = self.next;
                x ^= x >> shift;
                x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) & self.mask;
                x ^= x >> shift;
                if x < self.blocks {
                    break x;
                }
            }
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        Some(b * self.block)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    user_s: f64,
    sys_s: f64,
}

/// CPU time of this process, all its threads (io_uring's workers included).
pub fn cpu_now() -> Cpu {
    rusage(libc::RUSAGE_SELF)
}

/// CPU time of this process's finished children, all their threads.
pub fn cpu_children() -> Cpu {
    rusage(libc::RUSAGE_CHILDREN)
}

fn rusage(who: libc::c_int) -> Cpu {
    // SAFETY: getrusage fills the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Cpu {
        user_s: tv(ru.ru_utime),
        sys_s: tv(ru.ru_stime),
    }
}

/// Command buffers committed per backend slot (see [`run_engine`]).
const COMMITTED_PER_SLOT: usize = 2;

/// Engine settings for one run.
#[derive(Debug, Clone, Copy)]
pub struct EngineOpts {
    pub backend: BackendChoice,
    pub direct: DirectMode,
    /// Reads: keep the page cache (`gpuio bench --warm`) instead of dropping it before opening.
    pub warm: bool,
    pub task_size: usize,
    /// io_uring submission batch (`None`: the engine's default).
    pub submit_batch: Option<usize>,
    /// io_uring copy threads and their threshold (`None`: the engine's defaults).
    pub copy_threads: Option<usize>,
    pub copy_min_bytes: Option<usize>,
    /// Largest transfer served on the committing thread (`None`: the engine's default).
    pub inline_max_bytes: Option<usize>,
    /// Inline workers (`None`: the engine's default).
    pub inline_threads: Option<usize>,
}

impl EngineOpts {
    /// The engine settings these options name, on top of the engine's defaults (the backend's queue
    /// depth and mmap advice are the workload's to set).
    pub fn engine_config(&self) -> EngineConfig {
        let mut cfg = EngineConfig::default();
        cfg.backend.choice = self.backend;
        cfg.task_size_bytes = self.task_size;
        if let Some(b) = self.submit_batch {
            cfg.backend.submit_batch_max = b;
        }
        if let Some(n) = self.copy_threads {
            cfg.backend.copy_threads = n;
        }
        if let Some(b) = self.copy_min_bytes {
            cfg.backend.copy_threads_min_bytes = b;
        }
        if let Some(b) = self.inline_max_bytes {
            cfg.inline_max_bytes = b;
        }
        if let Some(n) = self.inline_threads {
            cfg.inline_threads = n;
        }
        cfg
    }
}

fn progress_tick(pb: Option<&ProgressBar>, start: Instant, last: &mut Instant) {
    if let Some(pb) = pb {
        if last.elapsed() > Duration::from_millis(100) {
            pb.set_position(start.elapsed().as_millis() as u64);
            *last = Instant::now();
        }
    }
}

/// What a user of mmap would advise for the pattern (finding 226).
fn mmap_advice(spec: &Spec) -> gpuio::MmapAdvice {
    if spec.pattern.is_random() {
        gpuio::MmapAdvice::Random
    } else {
        gpuio::MmapAdvice::Sequential
    }
}

/// Opens the file a run measures. Reads are measured cold unless asked otherwise (`--warm`): the
/// page cache is dropped before the file is opened, so that the device is measured (and a file just
/// made is not taken for a warm one and read buffered).
fn open_target(spec: &Spec, path: &Path, opts: EngineOpts) -> Result<gpuio::File> {
    let open = if spec.pattern.is_write() {
        OpenOptions::read_write()
    } else {
        OpenOptions::read()
    };
    open.direct(opts.direct)
        .cold(!spec.pattern.is_write() && !opts.warm)
        .open(path)
}

/// The offsets application thread `thread` issues: every thread walks the same order and takes every
/// `threads`-th offset, so together they visit each block once per pass, as one thread would.
fn thread_offsets(spec: &Spec, thread: usize) -> impl Iterator<Item = u64> {
    Offsets::new(spec, 0x9E37_79B9_7F4A_7C15)
        .skip(thread)
        .step_by(spec.threads.max(1))
}

/// Runs `drive(thread, ops_max, progress)` on `spec.threads` application threads and returns each
/// one's result. Reads: the pass split between threads; writes: bounded by the duration only.
/// Thread 0 reports progress.
fn on_threads<T: Send>(
    spec: &Spec,
    pb: Option<&ProgressBar>,
    drive: impl Fn(usize, u64, Option<&ProgressBar>) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    let threads = spec.threads.max(1);
    let quota = spec.ops_max();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ops = if quota == u64::MAX {
                    quota
                } else {
                    quota / threads as u64 + u64::from((t as u64) < quota % threads as u64)
                };
                let pb = if t == 0 { pb } else { None };
                let drive = &drive;
                scope.spawn(move || drive(t, ops, pb))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread panicked"))
            .collect()
    })
}

/// Runs `spec` through the engine for `duration`, from `spec.threads` application threads.
///
/// Each thread has its own queue on one engine and keeps `queue_depth` I/Os for the backend (so the
/// backend's depth is `queue_depth × threads`, as fio's `iodepth` is per job). A thread records I/Os
/// into command buffers of `queue_depth / 8` (at least one) and keeps twice `queue_depth` I/Os
/// committed, re-issuing each command buffer with its buffers as soon as it completes: a slot freed in
/// the kernel never waits for the application, and per-command-buffer costs are shared the way an
/// application that batches its requests shares them. Reads make one pass over the region in all,
/// split between the threads, which take turns along one scrambled order.
pub fn run_engine(
    spec: &Spec,
    path: &Path,
    opts: EngineOpts,
    label: &str,
    pb: Option<&ProgressBar>,
) -> Result<Measurement> {
    let mut cfg = opts.engine_config();
    cfg.backend.queue_depth = spec.queue_depth * spec.threads.max(1);
    cfg.backend.mmap_advice = mmap_advice(spec);
    let engine = Engine::new(cfg)?;
    let file = open_target(spec, path, opts)?;
    let cpu0 = cpu_now();
    let start = Instant::now();
    let results = on_threads(spec, pb, |t, ops, pb| {
        drive(spec, &engine, &file, t, ops, start, pb)
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = cpu_now();
    let mut ops = 0;
    let mut stats: Option<QueueStats> = None;
    for r in results {
        let (n, s) = r?;
        ops += n;
        match stats.as_mut() {
            Some(all) => all.merge(&s),
            None => stats = Some(s),
        }
    }
    let latency = stats.as_ref().map(|s| s.latency()).unwrap_or_default();
    let (backend, direct) = served_by(engine.backend_kind(), stats.as_ref(), &file);
    Ok(Measurement {
        name: label.to_string(),
        backend,
        direct,
        ops,
        bytes: ops * spec.block_size as u64,
        elapsed_s: elapsed,
        latency,
        cpu_user_s: cpu1.user_s - cpu0.user_s,
        cpu_sys_s: cpu1.sys_s - cpu0.sys_s,
    })
}

/// One application thread of [`run_engine`]: its own queue and buffers, `ops_max` I/Os at most, until
/// the deadline. Returns the I/Os done and its queue's statistics.
fn drive(
    spec: &Spec,
    engine: &Engine,
    file: &gpuio::File,
    thread: usize,
    ops_max: u64,
    start: Instant,
    pb: Option<&ProgressBar>,
) -> Result<(u64, QueueStats)> {
    let batch = (spec.queue_depth / 8).max(1);
    let cbs = (spec.queue_depth * COMMITTED_PER_SLOT).div_ceil(batch);
    let queue = engine.queue(QueueDesc {
        command_buffers_max: cbs,
        bytes_in_flight_max: u64::MAX,
        ..QueueDesc::default()
    })?;
    let pool = engine.buffer_pool(spec.block_size, cbs * batch)?;
    let (tx, rx) = mpsc::channel::<usize>();
    let mut slots: Vec<Option<Completion>> = (0..cbs).map(|_| None).collect();
    let mut offsets = thread_offsets(spec, thread);
    let mut to_issue = ops_max;
    let mut submit = |slot: usize, mut bufs: Vec<IoBuffer>| -> Result<Option<Completion>> {
        bufs.truncate(to_issue.min(bufs.len() as u64) as usize);
        if bufs.is_empty() {
            return Ok(None);
        }
        to_issue -= bufs.len() as u64;
        let mut cb = queue.command_buffer();
        for buf in bufs {
            let off = offsets.next().unwrap_or(0);
            if spec.pattern.is_write() {
                cb.store(file, off, buf)?;
            } else {
                cb.load(file, off, buf)?;
            }
        }
        let tx = tx.clone();
        // Only a channel send, so it may run inside `commit` (command buffers served inline).
        cb.on_complete_any_thread(move |_| {
            let _ = tx.send(slot);
        });
        cb.commit().map(Some)
    };

    let deadline = start + spec.duration;
    for (slot, entry) in slots.iter_mut().enumerate() {
        let bufs = (0..batch)
            .map(|i| {
                let mut buf = pool.get();
                if spec.pattern.is_write() {
                    fill_pattern(&mut buf, ((thread * cbs + slot) * batch + i) as u64);
                }
                IoBuffer::from(buf)
            })
            .collect();
        *entry = submit(slot, bufs)?;
    }
    let mut ops = 0u64;
    let mut outstanding = slots.iter().filter(|s| s.is_some()).count();
    let mut last_tick = start;
    let mut first_error: Option<Error> = None;
    while outstanding > 0 {
        let slot = rx.recv().map_err(|_| {
            Error::new(
                ErrorKind::EngineStopped,
                "engine stopped during the benchmark",
            )
        })?;
        let c = slots[slot].take().expect("completed slot was in flight");
        outstanding -= 1;
        let n = c.len() as u64;
        let (status, finished) = c.wait_parts();
        if let Some(e) = status.first_error() {
            first_error.get_or_insert(e);
            continue;
        }
        ops += n;
        progress_tick(pb, start, &mut last_tick);
        if Instant::now() < deadline && first_error.is_none() {
            let bufs = finished.into_buffers().into_iter().flatten().collect();
            slots[slot] = submit(slot, bufs)?;
            outstanding += usize::from(slots[slot].is_some());
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((ops, queue.stats())),
    }
}

/// Who served a run's transfers, and whether any went direct. Transfers served on the committing
/// thread (small ones of memory-backed files) went through the buffered descriptor with
/// pread/pwrite, not through the backend.
fn served_by(
    kind: gpuio::BackendKind,
    stats: Option<&QueueStats>,
    file: &gpuio::File,
) -> (String, bool) {
    let (inline_ops, ops) = stats.map_or((0, 0), |s| (s.inline_ops, s.ops));
    let backend = match inline_ops {
        0 => kind.to_string(),
        n if n == ops => "inline".to_string(),
        _ => format!("{kind}+inline"),
    };
    let direct = file.is_direct() && kind != gpuio::BackendKind::Mmap && inline_ops < ops;
    (backend, direct)
}

/// Longest a [`run_local`] thread waits for one of its I/Os before it reports the run stalled.
const LOCAL_STALL: Duration = Duration::from_secs(30);

/// Runs `spec` with a [`LocalQueue`] per application thread: each thread submits and reaps its own
/// `queue_depth` I/Os on its own ring, with no engine thread between it and the kernel (fio's model).
/// A finished I/O's buffer is re-issued at once; every re-issue found in one reap goes to the kernel
/// with the next wait, in one system call. Reads make one pass over the region in all, as in
/// [`run_engine`].
pub fn run_local(
    spec: &Spec,
    path: &Path,
    opts: EngineOpts,
    label: &str,
    pb: Option<&ProgressBar>,
) -> Result<Measurement> {
    let engine_cfg = opts.engine_config();
    let mut cfg = LocalConfig {
        backend: engine_cfg.backend,
        inline_max_bytes: engine_cfg.inline_max_bytes,
        ..LocalConfig::default()
    };
    cfg.backend.queue_depth = spec.queue_depth;
    cfg.backend.mmap_advice = mmap_advice(spec);
    let file = open_target(spec, path, opts)?;
    let cpu0 = cpu_now();
    let start = Instant::now();
    let results = on_threads(spec, pb, |t, ops, pb| {
        drive_local(spec, cfg.clone(), &file, t, ops, start, pb)
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = cpu_now();
    let (mut ops, mut stats, mut kind) = (0, QueueStats::default(), None);
    for r in results {
        let (n, s, k) = r?;
        ops += n;
        stats.merge(&s);
        kind = Some(k);
    }
    let (backend, direct) = served_by(
        kind.unwrap_or(gpuio::BackendKind::Uring),
        Some(&stats),
        &file,
    );
    Ok(Measurement {
        name: label.to_string(),
        backend: format!("{backend} (local queue)"),
        direct,
        ops,
        bytes: ops * spec.block_size as u64,
        elapsed_s: elapsed,
        latency: stats.latency(),
        cpu_user_s: cpu1.user_s - cpu0.user_s,
        cpu_sys_s: cpu1.sys_s - cpu0.sys_s,
    })
}

/// One application thread of [`run_local`]: its own queue and buffers, `ops_max` I/Os at most, until
/// the deadline.
fn drive_local(
    spec: &Spec,
    cfg: LocalConfig,
    file: &gpuio::File,
    thread: usize,
    ops_max: u64,
    start: Instant,
    pb: Option<&ProgressBar>,
) -> Result<(u64, QueueStats, gpuio::BackendKind)> {
    let mut queue = LocalQueue::new(cfg)?;
    let pool = queue.buffer_pool(spec.block_size, spec.queue_depth)?;
    let mut offsets = thread_offsets(spec, thread);
    let deadline = start + spec.duration;
    let mut issued = 0u64;
    let mut issue = |queue: &mut LocalQueue, buf: IoBuffer| -> Result<()> {
        let off = offsets.next().unwrap_or(0);
        if spec.pattern.is_write() {
            queue.write(file, off, buf, off)?;
        } else {
            queue.read(file, off, buf, off)?;
        }
        Ok(())
    };
    for i in 0..spec
        .queue_depth
        .min(ops_max.min(usize::MAX as u64) as usize)
    {
        let mut buf = pool.get();
        if spec.pattern.is_write() {
            fill_pattern(&mut buf, (thread * spec.queue_depth + i) as u64);
        }
        issue(&mut queue, buf.into())?;
        issued += 1;
    }
    let mut ops = 0u64;
    let mut last_tick = start;
    let mut first_error: Option<Error> = None;
    // Requests served when taken (small ones of memory-backed files) are finished at once.
    while queue.in_flight() + queue.finished() > 0 {
        if queue.wait(1, LOCAL_STALL)? == 0 {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "no I/O of {} finished in {} s ({} in flight)",
                    file.path().display(),
                    LOCAL_STALL.as_secs(),
                    queue.in_flight()
                ),
            ));
        }
        while let Some(done) = queue.pop() {
            // Checked per I/O: served when taken, a whole run can pass inside this loop.
            let more = Instant::now() < deadline;
            match done.result {
                Ok(_) => ops += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            if more && first_error.is_none() && issued < ops_max {
                if let Some(buf) = done.buf {
                    issue(&mut queue, buf)?;
                    issued += 1;
                }
            }
            progress_tick(pb, start, &mut last_tick);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((ops, queue.stats(), queue.backend_kind())),
    }
}

/// Fills a write buffer with bytes that do not compress or dedupe trivially.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let b = s.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The reference every user has: one thread, one blocking `pread`/`pwrite` at a time.
pub fn run_pread_loop(
    spec: &Spec,
    path: &Path,
    direct: bool,
    pb: Option<&ProgressBar>,
) -> Result<Measurement> {
    use std::os::fd::AsRawFd;
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(spec.pattern.is_write());
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o
        .open(path)
        .map_err(|e| Error::from_io(gpuio::error::Op::Open, &e).with_path(path))?;
    if !spec.pattern.is_write() {
        // SAFETY: plain advisory syscall on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    let mut buf = AlignedBuf::new(spec.block_size, 4096)?;
    fill_pattern(&mut buf, 7);
    let mut hist = LatencySummary::histogram_ns();
    let mut offsets = Offsets::new(spec, 0x9E37_79B9_7F4A_7C15);
    let cpu0 = cpu_now();
    let start = Instant::now();
    let mut last_tick = start;
    let mut ops = 0u64;
    while start.elapsed() < spec.duration && ops < spec.ops_max() {
        let off = offsets.next().unwrap_or(0);
        let t = Instant::now();
        // SAFETY: buf is a live buffer of block_size bytes.
        let n = unsafe {
            if spec.pattern.is_write() {
                libc::pwrite(
                    f.as_raw_fd(),
                    buf.as_ptr().cast(),
                    spec.block_size,
                    off as libc::off_t,
                )
            } else {
                libc::pread(
                    f.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    spec.block_size,
                    off as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::from_io(gpuio::error::Op::Read, &e)
                .with_path(path)
                .with_range(off, spec.block_size as u64));
        }
        hist.saturating_record((t.elapsed().as_nanos() as u64).max(1));
        ops += 1;
        progress_tick(pb, start, &mut last_tick);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = cpu_now();
    Ok(Measurement {
        name: "pread loop".into(),
        backend: if spec.pattern.is_write() {
            "pwrite"
        } else {
            "pread"
        }
        .into(),
        direct,
        ops,
        bytes: ops * spec.block_size as u64,
        elapsed_s: elapsed,
        latency: LatencySummary::from_ns(&hist),
        cpu_user_s: cpu1.user_s - cpu0.user_s,
        cpu_sys_s: cpu1.sys_s - cpu0.sys_s,
    })
}

/// Whether fio is on the PATH.
pub fn fio_available() -> bool {
    std::process::Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// fio with io_uring, one job, the same file, pattern, block size and queue depth.
pub fn run_fio(spec: &Spec, path: &Path, direct: bool) -> Result<Measurement> {
    let jobs = spec.threads.max(1);
    let mut args = vec![
        "--name=gpuio-compare".to_string(),
        format!("--filename={}", path.display()),
        format!("--rw={}", spec.pattern.name()),
        format!("--bs={}", spec.block_size),
        format!("--iodepth={}", spec.queue_depth),
        "--ioengine=io_uring".into(),
        format!("--direct={}", u8::from(direct)),
        format!("--runtime={}ms", spec.duration.as_millis()),
        // One pass over the region in all, as our threads split it: each job its own slice.
        format!("--size={}", spec.region / jobs as u64),
        format!("--offset_increment={}", spec.region / jobs as u64),
        format!("--numjobs={jobs}"),
        "--group_reporting".into(),
        "--randrepeat=0".into(),
        "--invalidate=1".into(),
        "--output-format=json".into(),
    ];
    // Like our own runs (`Spec::ops_max`): reads make one pass over the region, writes run for the
    // whole duration.
    if spec.pattern.is_write() {
        args.push("--time_based".into());
    }
    let cpu0 = cpu_children();
    let out = std::process::Command::new("fio")
        .args(&args)
        .output()
        .map_err(|e| Error::new(ErrorKind::Unsupported, format!("cannot run fio: {e}")))?;
    let cpu1 = cpu_children();
    if !out.status.success() {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "fio failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let json_start = text.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&text[json_start..]).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("cannot parse fio's JSON output: {e}"),
        )
    })?;
    let job = &v["jobs"][0];
    let side = if spec.pattern.is_write() {
        &job["write"]
    } else {
        &job["read"]
    };
    let runtime_s = side["runtime"].as_f64().unwrap_or(0.0) / 1000.0;
    let ops = side["total_ios"].as_u64().unwrap_or(0);
    let bytes = side["io_bytes"].as_u64().unwrap_or(0);
    let pct = |k: &str| side["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Measurement {
        name: "fio".into(),
        backend: "io_uring".into(),
        direct,
        ops,
        bytes,
        elapsed_s: runtime_s.max(1e-9),
        latency: LatencySummary {
            samples: ops,
            mean_us: side["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
            p50_us: pct("50.000000"),
            p99_us: pct("99.000000"),
            p999_us: pct("99.900000"),
            max_us: side["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1000.0,
        },
        // All of fio's CPU, its io_uring workers included (fio's own usr_cpu/sys_cpu count only its
        // job threads, while ours count every thread of the process): the same measure on both sides.
        cpu_user_s: cpu1.user_s - cpu0.user_s,
        cpu_sys_s: cpu1.sys_s - cpu0.sys_s,
    })
}

/// Runs a read pattern over a pack entry: `queue_depth` entry loads in flight, each re-issued with its
/// buffer when it completes (oldest first). Reports logical bytes; every load reads and decompresses
/// the chunks its range touches. Latency is that of the chunk reads from storage.
pub fn run_pack(
    spec: &Spec,
    pack: &gpuio_pack::Pack,
    entry: &gpuio_pack::Entry,
    opts: EngineOpts,
    pb: Option<&ProgressBar>,
) -> Result<Measurement> {
    if spec.pattern.is_write() {
        return Err(Error::invalid(
            "packs are read-only: use --pattern read or randread with PACK:ENTRY",
        ));
    }
    let mut cfg = opts.engine_config();
    cfg.backend.queue_depth = spec.queue_depth;
    let engine = Engine::new(cfg)?;
    let queue = engine.queue(QueueDesc {
        command_buffers_max: spec.queue_depth * COMMITTED_PER_SLOT,
        bytes_in_flight_max: u64::MAX,
        ..QueueDesc::default()
    })?;
    let mut offsets = Offsets::new(spec, 0x9E37_79B9_7F4A_7C15);
    let mut to_issue = spec.ops_max();
    let mut inflight = std::collections::VecDeque::new();
    let cpu0 = cpu_now();
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut last_tick = start;
    for _ in 0..spec.queue_depth {
        if to_issue == 0 {
            break;
        }
        to_issue -= 1;
        let buf = AlignedBuf::new(spec.block_size, 4096)?;
        inflight.push_back(entry.load(&queue, offsets.next().unwrap_or(0), buf)?);
    }
    let mut ops = 0u64;
    while let Some(load) = inflight.pop_front() {
        let buf = load.wait()?;
        ops += 1;
        progress_tick(pb, start, &mut last_tick);
        if Instant::now() < deadline && to_issue > 0 {
            to_issue -= 1;
            inflight.push_back(entry.load(&queue, offsets.next().unwrap_or(0), buf)?);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = cpu_now();
    Ok(Measurement {
        name: "gpu-io pack".into(),
        backend: format!("{} {}", engine.backend_kind(), entry.info().codec.name()),
        direct: pack.file().is_direct(),
        ops,
        bytes: ops * spec.block_size as u64,
        elapsed_s: elapsed,
        latency: queue.stats().latency(),
        cpu_user_s: cpu1.user_s - cpu0.user_s,
        cpu_sys_s: cpu1.sys_s - cpu0.sys_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_visit_every_block_once_per_pass() {
        for blocks in [1u64, 2, 3, 1000, 4096, 5000] {
            let spec = Spec {
                pattern: Pattern::Randread,
                block_size: 4096,
                queue_depth: 1,
                duration: Duration::from_secs(1),
                region: blocks * 4096 + 100,
                threads: 1,
            };
            let mut seen = vec![false; blocks as usize];
            for off in Offsets::new(&spec, 12345).take(blocks as usize) {
                assert_eq!(off % 4096, 0);
                let b = (off / 4096) as usize;
                assert!(!seen[b], "block {b} repeated within a pass of {blocks}");
                seen[b] = true;
            }
            assert!(seen.iter().all(|&s| s));
        }
    }

    #[test]
    fn sequential_offsets_wrap() {
        let spec = Spec {
            pattern: Pattern::Read,
            block_size: 1 << 20,
            queue_depth: 1,
            duration: Duration::from_secs(1),
            region: 3 << 20,
            threads: 1,
        };
        let v: Vec<u64> = Offsets::new(&spec, 1).take(4).collect();
        assert_eq!(v, [0, 1 << 20, 2 << 20, 0]);
    }
}
