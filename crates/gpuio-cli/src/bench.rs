//! `gpuio bench`: the engine's main job measured — on a scratch file by default, or on `--file` — and,
//! with `--compare`, the references in the same run on the same file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use gpuio::{
    BackendChoice, DirectMode, Engine, EngineConfig, Error, OpenOptions, QueueDesc, Result,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::report;
use crate::workload::{self, EngineOpts, Measurement, Pattern, Spec};

/// Largest block size accepted.
const BLOCK_SIZE_MAX: u64 = 256 << 20;
/// Size of the scratch file when --size is not given.
const SCRATCH_SIZE_DEFAULT: u64 = 1 << 30;
/// Longest run accepted per workload.
const DURATION_MAX_S: f64 = 3600.0;
/// Bytes left free on the filesystem of a scratch file (or of a --file bench creates): a benchmark
/// must not fill the disk other programs write to.
const FREE_SPACE_RESERVE: u64 = 256 << 20;

/// Refuses to create a file of `size` bytes in `dir` unless its filesystem has that much free space for
/// this user (`statvfs(3)`'s `f_bavail`) plus [`FREE_SPACE_RESERVE`]; the error names the numbers.
fn check_free_space(dir: &Path, size: u64) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::invalid("the path holds a NUL byte").with_path(dir))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills `st` from a valid NUL-terminated path.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::from_io(gpuio::error::Op::Stat, &e).with_path(dir));
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    if size.saturating_add(FREE_SPACE_RESERVE) > free {
        return Err(Error::new(
            gpuio::ErrorKind::NoSpace,
            format!(
                "a {size}-byte file ({}) does not fit: the filesystem has {free} bytes ({}) free and \
                 {FREE_SPACE_RESERVE} are kept free; pass a smaller --size, or a --file (or TMPDIR) on \
                 another filesystem",
                gpuio::size::format_bytes(size as f64),
                gpuio::size::format_bytes(free as f64),
            ),
        )
        .with_path(dir));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// File to measure; default: a scratch file in the system temp directory, removed afterwards. A
    /// missing file is created with --size bytes and left in place.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Bytes of the file to use: the scratch file's size (default 1G); for an existing --file, at most
    /// its length (default: all of it).
    #[arg(long, value_parser = crate::parse_size)]
    size: Option<u64>,
    /// Workload; default: the standard suite (randread 4K QD64, read 1M QD16, write 1M QD16, randwrite 4K QD64).
    #[arg(long, value_enum)]
    pattern: Option<Pattern>,
    /// Bytes per I/O; default 4K for random patterns, 1M for sequential ones.
    #[arg(long, value_parser = crate::parse_size)]
    block_size: Option<u64>,
    /// I/Os in flight; default 64 for random patterns, 16 for sequential ones.
    #[arg(long)]
    queue_depth: Option<usize>,
    /// Seconds per workload. Read patterns also stop after one pass over the file, so that no read
    /// is served from a page cache warmed by an earlier one.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Application threads, each with its own queue of --queue-depth I/Os on one engine (fio's
    /// numjobs; --compare runs fio with as many jobs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// I/O backend: auto (the probe's choice: io_uring where it works), uring, threads (a pread/pwrite
    /// thread pool) or mmap.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Direct I/O (O_DIRECT): auto (where the filesystem allows it), on (fail where it does not) or
    /// off (buffered).
    #[arg(long, default_value = "auto")]
    direct: DirectMode,
    /// Read patterns: keep the file's pages in the page cache instead of dropping them first, so a
    /// warm file is measured as applications find it (`--direct auto` then reads it from memory,
    /// saying so). By default reads are measured cold: the device, not the page cache.
    #[arg(long)]
    warm: bool,
    /// Size of the tasks large commands are split into.
    #[arg(long, value_parser = crate::parse_size, default_value = "1M")]
    task_size: u64,
    /// io_uring: submit every N queued requests (default: the engine's, 8).
    #[arg(long)]
    submit_batch: Option<usize>,
    /// io_uring: threads that copy large reads of memory-resident files (default: one per core; 0: off).
    #[arg(long)]
    copy_threads: Option<usize>,
    /// io_uring: reads at least this large of memory-resident files go to the copy threads (default 128K).
    #[arg(long, value_parser = crate::parse_size)]
    copy_min_size: Option<u64>,
    /// Loads and stores of memory-backed files (tmpfs, ramfs) up to this size are done on the
    /// committing thread instead of the engine's (default 64K; 0: off; at most 16M).
    #[arg(long, value_parser = crate::parse_size)]
    inline_max: Option<u64>,
    /// Threads that serve such transfers in the committing thread's place when one is idle
    /// (default: one fewer than the cores; 0: the committing thread always).
    #[arg(long)]
    inline_threads: Option<usize>,
    /// Each application thread submits and reaps its own I/Os on its own ring (gpuio::LocalQueue)
    /// instead of handing them to the engine's thread: fio's model, without the engine's priorities
    /// between queues, callbacks or inline workers. With --compare the engine runs too.
    #[arg(long)]
    local: bool,
    /// Also run, on the same file: the other way of driving the backend (a local queue, or with
    /// --local the engine), a single-thread pread loop, the thread-pool and mmap backends, and fio
    /// (when installed); print each one's ratio to gpu-io.
    #[arg(long)]
    compare: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Allow write patterns on an existing `--file` (its first `--size` bytes are overwritten).
    #[arg(long)]
    overwrite: bool,
    /// Where reads land: cpu (host memory, the default suite) or cuda:N (a sequential read of the
    /// file staged into device memory; with --compare, fio's sequential read of the same file).
    #[arg(long, default_value = "cpu")]
    target: String,
    /// Staging buffers for --target cuda:N.
    #[arg(long, default_value_t = gpuio_cuda::loader::STAGING_BUFFERS_DEFAULT)]
    staging_buffers: usize,
    /// Bytes per staging buffer for --target cuda:N.
    #[arg(long, value_parser = crate::parse_size, default_value = "16M")]
    staging_size: u64,
    /// Instead of file I/O: time one host-to-device copy of 64 B, 256 B, ... up to --pio-max-size by
    /// DMA and by programmed I/O (device threads reading mapped pinned memory) on --target, and say
    /// from which size DMA wins (the loaders' --pio-max threshold).
    #[arg(long)]
    pio_sweep: bool,
    /// Largest size of the --pio-sweep.
    #[arg(long, value_parser = crate::parse_size, default_value = "1M")]
    pio_max_size: u64,
}

impl BenchArgs {
    /// The workload and engine settings for one pattern of the suite.
    fn spec_and_opts(
        &self,
        pattern: Pattern,
        bs: u64,
        qd: usize,
        region: u64,
    ) -> (Spec, EngineOpts) {
        let spec = Spec {
            pattern,
            block_size: bs as usize,
            queue_depth: qd,
            duration: Duration::from_secs_f64(self.duration),
            region,
            threads: self.threads as usize,
        };
        let opts = EngineOpts {
            backend: self.backend,
            direct: self.direct,
            warm: self.warm,
            task_size: self.task_size as usize,
            submit_batch: self.submit_batch,
            copy_threads: self.copy_threads,
            copy_min_bytes: self.copy_min_size.map(|b| b as usize),
            inline_max_bytes: self
                .inline_max
                .map(|b| usize::try_from(b).unwrap_or(usize::MAX)),
            inline_threads: self.inline_threads,
        };
        (spec, opts)
    }
}

/// The workload and its reference measurements.
pub struct Outcome {
    pub spec: Spec,
    pub engine: Measurement,
    pub baselines: Vec<Measurement>,
    pub notes: Vec<String>,
}

fn default_suite() -> Vec<(Pattern, u64, usize)> {
    vec![
        (Pattern::Randread, 4096, 64),
        (Pattern::Read, 1 << 20, 16),
        (Pattern::Write, 1 << 20, 16),
        (Pattern::Randwrite, 4096, 64),
    ]
}

fn validate(a: &BenchArgs) -> Result<()> {
    if let Some(bs) = a.block_size {
        if bs == 0 || bs > BLOCK_SIZE_MAX {
            return Err(Error::invalid(format!(
                "--block-size {bs} is out of range 1..={BLOCK_SIZE_MAX}"
            )));
        }
    }
    if let Some(qd) = a.queue_depth {
        if qd == 0 || qd > gpuio::backend::QUEUE_DEPTH_MAX {
            return Err(Error::invalid(format!(
                "--queue-depth {qd} is out of range 1..={}",
                gpuio::backend::QUEUE_DEPTH_MAX
            )));
        }
    }
    if !(a.duration > 0.0 && a.duration <= DURATION_MAX_S) {
        return Err(Error::invalid(format!(
            "--duration {} is out of range (0, {DURATION_MAX_S}] seconds",
            a.duration
        )));
    }
    if a.size == Some(0) {
        return Err(Error::invalid("--size must be larger than 0"));
    }
    Ok(())
}

/// Makes sure `path` holds at least `size` bytes of written (not sparse) data.
fn prepare_file(
    path: &Path,
    size: u64,
    created: bool,
    direct: DirectMode,
    pb: Option<&ProgressBar>,
) -> Result<()> {
    if !created {
        return Ok(());
    }
    if let Some(pb) = pb {
        pb.set_message(format!(
            "writing {} scratch file",
            gpuio::size::format_bytes(size as f64)
        ));
    }
    let engine = Engine::new(EngineConfig::default())?;
    let queue = engine.queue(QueueDesc::default())?;
    let file = OpenOptions::create().direct(direct).open(path)?;
    let chunk = (4u64 << 20).min(size) as usize;
    let pool = engine.buffer_pool(chunk, 8)?;
    let mut inflight = std::collections::VecDeque::new();
    let mut off = 0u64;
    let mut seed = 1;
    while off < size {
        let len = chunk.min((size - off) as usize);
        let mut buf = pool.get();
        buf.set_len(len)?;
        workload::fill_pattern(&mut buf, seed);
        seed += 1;
        let mut cb = queue.command_buffer();
        cb.store(&file, off, buf)?;
        inflight.push_back(cb.commit()?);
        if inflight.len() >= 8 {
            inflight.pop_front().expect("non-empty").finish()?;
        }
        off += len as u64;
        if let Some(pb) = pb {
            pb.set_position(off * 1000 / size);
        }
    }
    for c in inflight {
        c.finish()?;
    }
    file.sync_all()
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.pio_sweep {
        let device = gpuio_cuda::open_device(&a.target)?;
        return crate::load::pio_sweep(device, a.pio_max_size, a.json);
    }
    validate(&a)?;
    // A device target is opened first, so a missing GPU fails at once with the reason.
    let device = match a.target.parse::<gpuio_cuda::Target>()? {
        gpuio_cuda::Target::Cpu => None,
        t => {
            if a.pattern.is_some_and(|p| p != Pattern::Read) {
                return Err(Error::invalid(format!(
                    "--target {t} measures sequential reads into device memory: use --pattern read"
                )));
            }
            Some(gpuio_cuda::open_target(t)?)
        }
    };
    let suite: Vec<(Pattern, u64, usize)> = match a.pattern {
        Some(p) => {
            let (bs, qd) = if p.is_random() {
                (4096, 64)
            } else {
                (1 << 20, 16)
            };
            vec![(p, a.block_size.unwrap_or(bs), a.queue_depth.unwrap_or(qd))]
        }
        None => default_suite()
            .into_iter()
            .map(|(p, bs, qd)| (p, a.block_size.unwrap_or(bs), a.queue_depth.unwrap_or(qd)))
            .collect(),
    };
    let show_progress = !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    if let Some((pack_path, entry)) = a
        .file
        .as_ref()
        .and_then(|f| gpuio_pack::split_pack_path(&f.to_string_lossy()))
    {
        return run_pack(&a, suite, &pack_path, &entry, show_progress);
    }
    let make_pb = |len: u64, msg: String| -> Option<ProgressBar> {
        show_progress.then(|| {
            let pb = ProgressBar::new(len);
            pb.set_style(
                ProgressStyle::with_template("{spinner} {msg:40} [{bar:30}] {percent:>3}%")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            pb.set_message(msg);
            pb
        })
    };

    // The file: the user's, or a scratch file that is removed however we leave (an error, or SIGINT,
    // SIGTERM or SIGHUP through `gpuio::replace::register_temp`). Free space is checked before
    // anything is created.
    let wanted = a.size.unwrap_or(SCRATCH_SIZE_DEFAULT);
    let (_registered, _scratch, path, created) = match &a.file {
        Some(p) => {
            let exists = p.exists();
            if !exists {
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                check_free_space(&dir, wanted)?;
            }
            if exists && suite.iter().any(|(p, ..)| p.is_write()) && !a.overwrite {
                let meta = std::fs::metadata(p)
                    .map_err(|e| Error::from_io(gpuio::error::Op::Stat, &e).with_path(p))?;
                if meta.len() > 0 {
                    return Err(Error::invalid(format!(
                        "{} exists and write patterns would overwrite it: pass --overwrite, or a --pattern that reads",
                        p.display()
                    )));
                }
            }
            (None, None, p.clone(), !exists)
        }
        None => {
            check_free_space(&std::env::temp_dir(), wanted)?;
            let t = tempfile::Builder::new()
                .prefix("gpuio-bench-")
                .tempfile_in(std::env::temp_dir())
                .map_err(|e| {
                    Error::from_io(gpuio::error::Op::Open, &e).with_path(&std::env::temp_dir())
                })?;
            let path = t.path().to_path_buf();
            // `_registered` is bound before `_scratch`, so it is dropped after it: the file is never
            // unregistered while it exists.
            let registered = gpuio::replace::register_temp(&path);
            (Some(registered), Some(t.into_temp_path()), path, true)
        }
    };
    let region = if created {
        wanted
    } else {
        let len = OpenOptions::read()
            .direct(DirectMode::Off)
            .open(&path)?
            .len()?;
        match a.size {
            Some(s) if s > len => {
                return Err(Error::invalid(format!(
                    "{} is {len} bytes, smaller than --size {s}",
                    path.display()
                )))
            }
            Some(s) => s,
            None => len,
        }
    };
    if region == 0 {
        return Err(Error::invalid(format!(
            "{} is empty: nothing to measure",
            path.display()
        )));
    }
    {
        let pb = make_pb(1000, String::new());
        // A --file bench creates is removed if a signal ends the process while it is half-written.
        let half_written =
            (created && a.file.is_some()).then(|| gpuio::replace::register_temp(&path));
        let prepared = prepare_file(&path, region, created, a.direct, pb.as_ref());
        drop(half_written);
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        if let Err(e) = prepared {
            if created && a.file.is_some() {
                // Do not leave a half-written file the user never had.
                let _ = std::fs::remove_file(&path);
            }
            return Err(e);
        }
        if created && a.file.is_some() {
            errln!("gpuio: created {} ({region} bytes)", path.display());
        }
    }

    if let Some(device) = device {
        // The engine flags (--backend, --task-size, --copy-threads, ...) apply to the staged reads.
        let (_, opts) = a.spec_and_opts(Pattern::Read, 1 << 20, 16, region);
        let loader_cfg = gpuio_cuda::LoaderConfig {
            staging_buffers: a.staging_buffers,
            staging_bytes: usize::try_from(a.staging_size).unwrap_or(usize::MAX),
            ..gpuio_cuda::LoaderConfig::default()
        };
        return crate::load::bench_device(
            &path,
            region,
            device,
            opts.engine_config(),
            loader_cfg,
            a.compare,
            a.json,
        );
    }
    let mut outcomes = Vec::new();
    for (pattern, bs, qd) in suite {
        if bs > region {
            return Err(Error::invalid(format!(
                "block size {bs} is larger than the {region} bytes of {}",
                path.display()
            )));
        }
        let (spec, opts) = a.spec_and_opts(pattern, bs, qd, region);
        let title = format!(
            "{} {} QD{}",
            pattern.name(),
            gpuio::size::format_bytes(bs as f64),
            qd
        );
        let ms = (a.duration * 1000.0) as u64;
        let pb = make_pb(ms, format!("gpu-io {title}"));
        let engine = if a.local {
            workload::run_local(&spec, &path, opts, "gpu-io", pb.as_ref())?
        } else {
            workload::run_engine(&spec, &path, opts, "gpu-io", pb.as_ref())?
        };
        if let Some(pb) = &pb {
            pb.finish_and_clear();
        }
        let mut baselines = Vec::new();
        let mut notes = Vec::new();
        if a.compare {
            // The other way of driving the same backend: the engine's thread, or a local queue.
            let pb = make_pb(ms, format!("gpu-io other queue {title}"));
            baselines.push(if a.local {
                workload::run_engine(&spec, &path, opts, "gpu-io engine", pb.as_ref())?
            } else {
                workload::run_local(&spec, &path, opts, "gpu-io local", pb.as_ref())?
            });
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            let direct = engine.direct;
            let pb = make_pb(ms, format!("pread loop {title}"));
            baselines.push(workload::run_pread_loop(&spec, &path, direct, pb.as_ref())?);
            for (choice, label) in [
                (BackendChoice::Threads, "threads"),
                (BackendChoice::Mmap, "mmap"),
            ] {
                if choice == a.backend {
                    continue;
                }
                let pb = make_pb(ms, format!("{label} {title}"));
                let o = EngineOpts {
                    backend: choice,
                    ..opts
                };
                baselines.push(workload::run_engine(&spec, &path, o, label, pb.as_ref())?);
                if let Some(pb) = &pb {
                    pb.finish_and_clear();
                }
            }
            if workload::fio_available() {
                match workload::run_fio(&spec, &path, direct) {
                    Ok(m) => baselines.push(m),
                    Err(e) => notes.push(format!("fio did not run: {e}")),
                }
            } else {
                notes.push("fio is not installed (apt-get install fio): no fio reference".into());
            }
            if pattern.is_write() {
                notes.push("mmap writes use pwrite: a mapping cannot extend a file".into());
            }
        }
        outcomes.push(Outcome {
            spec,
            engine,
            baselines,
            notes,
        });
    }
    if a.json {
        outln!("{}", report::json(&outcomes, &path, a.pattern.is_some()))?;
    } else {
        out!("{}", report::table(&outcomes, &path))?;
    }
    Ok(())
}

/// `gpuio bench --file PACK:ENTRY`: the read patterns through the pack, in logical bytes, so a pack and
/// the file it came from can be compared with the same tool.
fn run_pack(
    a: &BenchArgs,
    suite: Vec<(Pattern, u64, usize)>,
    pack_path: &Path,
    entry_name: &str,
    show_progress: bool,
) -> Result<()> {
    if a.pattern.is_some_and(Pattern::is_write) {
        return Err(Error::invalid(
            "packs are read-only: use --pattern read or randread with PACK:ENTRY",
        ));
    }
    let pack = gpuio_pack::Pack::open_with(pack_path, a.direct)?;
    let entry = pack.entry(entry_name)?;
    let suite: Vec<_> = if a.pattern.is_some() {
        suite
    } else {
        suite.into_iter().filter(|(p, ..)| !p.is_write()).collect()
    };
    let region = match a.size {
        Some(s) if s > entry.len() => {
            return Err(Error::invalid(format!(
                "entry {entry_name} is {} bytes, smaller than --size {s}",
                entry.len()
            )))
        }
        Some(s) => s,
        None => entry.len(),
    };
    if region == 0 {
        return Err(Error::invalid(format!(
            "entry {entry_name} is empty: nothing to measure"
        )));
    }
    let mut outcomes = Vec::new();
    for (pattern, bs, qd) in suite {
        if bs > region {
            return Err(Error::invalid(format!(
                "block size {bs} is larger than the {region} bytes of entry {entry_name}"
            )));
        }
        let (spec, opts) = a.spec_and_opts(pattern, bs, qd, region);
        let pb = show_progress.then(|| ProgressBar::new((a.duration * 1000.0) as u64));
        let m = workload::run_pack(&spec, &pack, &entry, opts, pb.as_ref())?;
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        let mut notes = vec![format!(
            "pack entry {entry_name}: bytes and IOPS are logical (decompressed); latency is that of the chunk reads"
        )];
        if a.compare {
            notes.push(
                "--compare applies to plain files: bench the source file for the raw reference"
                    .into(),
            );
        }
        outcomes.push(Outcome {
            spec,
            engine: m,
            baselines: Vec::new(),
            notes,
        });
    }
    let shown = PathBuf::from(format!("{}:{entry_name}", pack_path.display()));
    if a.json {
        outln!("{}", report::json(&outcomes, &shown, a.pattern.is_some()))?;
    } else {
        out!("{}", report::table(&outcomes, &shown))?;
    }
    Ok(())
}
