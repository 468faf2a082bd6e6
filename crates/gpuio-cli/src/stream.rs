//! `gpuio stream`: the N-buffered read → compute → write pipeline with a built-in compute stage, reporting
//! bytes/s, each stage's busy and idle time, and the overlap efficiency (slowest stage's busy time ÷
//! wall time). Also the pieces `gpuio cp` and `gpuio checksum` share: the pipeline flags, opening a
//! file or PACK:ENTRY as a source (FIFOs, sockets and devices refused without blocking, pseudo-files
//! told apart), refusing to overwrite the input or a write-protected file, and the report.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, CellAlignment, Table};
use gpuio::input::Kind;
use gpuio::pipeline::{FileSink, FileSource, Slot, Source, CHUNK_SIZE_MAX, SLOTS_MAX};
use gpuio::size::format_bytes;
use gpuio::{
    BufferPool, DirectMode, Engine, EngineConfig, Error, ErrorKind, IoQueue, Pipeline,
    PipelineStats, QueueDesc, Result,
};
use serde_json::{json, Value};

/// Most nanoseconds per KiB `--compute spin:NS` accepts (1 s per MiB).
const SPIN_NS_PER_KIB_MAX: u64 = 1_000_000;

/// Flags every pipeline command takes.
#[derive(Args, Debug, Clone)]
pub struct PipeArgs {
    /// Slot buffers: 1 runs read, compute and write one after another; 3 overlaps them.
    #[arg(long, default_value_t = gpuio::pipeline::SLOTS_DEFAULT)]
    pub slots: usize,
    /// Bytes per slot (multiples of 4K keep every transfer direct).
    #[arg(long, value_parser = crate::parse_size, default_value = "4M")]
    pub chunk_size: u64,
    /// Direct I/O (O_DIRECT) for the input and the output.
    #[arg(long, default_value = "auto")]
    pub direct: DirectMode,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl PipeArgs {
    /// Checks the flags; returns the chunk size.
    fn chunk(&self) -> Result<usize> {
        if !(1..=SLOTS_MAX).contains(&self.slots) {
            return Err(Error::invalid(format!(
                "--slots {} is out of range 1..={SLOTS_MAX}",
                self.slots
            )));
        }
        match usize::try_from(self.chunk_size) {
            Ok(c) if (1..=CHUNK_SIZE_MAX).contains(&c) => Ok(c),
            _ => Err(Error::invalid(format!(
                "--chunk-size {} is out of range 1..={} ({})",
                self.chunk_size,
                CHUNK_SIZE_MAX,
                format_bytes(CHUNK_SIZE_MAX as f64)
            ))),
        }
    }
}

/// An engine, a queue, and the slots (registered with io_uring where it can: this process runs one
/// pipeline, so a pool that lives as long as the engine costs nothing).
pub(crate) struct Setup {
    pub engine: Engine,
    pub queue: IoQueue,
    pub pool: BufferPool,
}

pub(crate) fn setup(a: &PipeArgs) -> Result<Setup> {
    let chunk = a.chunk()?;
    let engine = Engine::new(EngineConfig::default())?;
    // Concurrent: a write must not wait behind the reads committed before it.
    let queue = engine.queue(QueueDesc::default())?;
    let pool = engine.buffer_pool(chunk, a.slots)?;
    Ok(Setup {
        engine,
        queue,
        pool,
    })
}

impl Setup {
    pub fn pipeline<'a>(&self, a: &PipeArgs, input: Input) -> Pipeline<'a> {
        Pipeline::new(&self.engine, input.source)
            .pool(self.pool.clone())
            .slots(a.slots)
    }
}

/// What a pipeline reads: a file or a pack entry.
pub(crate) struct Input {
    pub source: Box<dyn Source>,
    /// As the user wrote it.
    pub name: String,
    /// The file holding the bytes (the pack for an entry): device and inode, to refuse writing over it.
    pub id: (u64, u64),
    /// Permission bits of the input file (of the pack for an entry).
    pub mode: u32,
    /// A file name for a copy into a directory: the file's, or the entry's last component.
    pub file_name: String,
    /// Whether the input is read with O_DIRECT.
    pub direct: bool,
}

pub(crate) fn open_input(queue: &IoQueue, spec: &str, direct: DirectMode) -> Result<Input> {
    let stat = |p: &Path| {
        std::fs::metadata(p).map_err(|e| Error::from_io(gpuio::error::Op::Stat, &e).with_path(p))
    };
    if let Some((pack_path, entry_name)) = gpuio_pack::split_pack_path(spec) {
        let pack = gpuio_pack::Pack::open_with(&pack_path, direct)?;
        let entry = pack.entry(&entry_name)?;
        let meta = stat(&pack_path)?;
        let file_name = entry_name
            .rsplit('/')
            .next()
            .unwrap_or(&entry_name)
            .to_string();
        return Ok(Input {
            direct: pack.file().is_direct(),
            source: Box::new(gpuio_pack::EntrySource::new(entry, queue)),
            name: spec.to_string(),
            id: (meta.dev(), meta.ino()),
            mode: meta.mode() & 0o7777,
            file_name,
        });
    }
    let path = PathBuf::from(spec);
    let source = FileSource::open(queue, &path, direct)?;
    let meta = stat(&path)?;
    Ok(Input {
        direct: source.file().is_direct(),
        source: Box::new(source),
        name: spec.to_string(),
        id: (meta.dev(), meta.ino()),
        mode: meta.mode() & 0o7777,
        file_name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    })
}

impl Input {
    /// This input as `gpuio::replace::check_destination` takes it.
    pub fn as_input_file(&self) -> gpuio::replace::InputFile {
        gpuio::replace::InputFile {
            id: gpuio::input::FileId {
                dev: self.id.0,
                ino: self.id.1,
            },
            name: self.name.clone(),
        }
    }
}

/// What a file input (not PACK:ENTRY) is, found without blocking; FIFOs, sockets, character devices
/// and directories are refused here, naming the file and why. `None` for a pack entry.
pub(crate) fn probe_input(spec: &str) -> Result<Option<gpuio::input::Probe>> {
    if gpuio_pack::split_pack_path(spec).is_some() {
        return Ok(None);
    }
    let path = Path::new(spec);
    let p = gpuio::input::probe(path)?;
    match p.kind {
        Kind::Regular | Kind::BlockDevice | Kind::Pseudo => Ok(Some(p)),
        other => Err(gpuio::input::refusal(other, path)),
    }
}

/// Refuses `--direct on` for an input read sequentially (through the page cache, as it must be).
pub(crate) fn sequential_direct_check(path: &Path, direct: DirectMode) -> Result<()> {
    if direct == DirectMode::On {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "direct I/O requested (--direct on) but impossible: the file reports a size of 0 but has \
             content (a procfs or sysfs file?), so it is read sequentially through the page cache",
        )
        .with_op(gpuio::error::Op::Open)
        .with_path(path));
    }
    Ok(())
}

/// Checks an output before it is replaced: never one of `inputs` (same device and inode, also
/// through a symbolic or hard link), and a write-protected file or directory only with `force`
/// (see `gpuio::replace::check_destination`). Returns whether the output exists.
pub(crate) fn check_output(
    inputs: &[gpuio::replace::InputFile],
    output: &Path,
    force: bool,
) -> Result<bool> {
    gpuio::replace::check_destination(output, inputs, force)
}

/// Removes the temporary files that killed copies left beside `output` (see
/// `gpuio::replace::remove_stale_temps`); returns them. Failing to look is only a warning: the output
/// can still be written.
pub(crate) fn remove_stale_temps(output: &Path) -> Vec<PathBuf> {
    let removed = gpuio::replace::remove_stale_temps(output).unwrap_or_else(|e| {
        errln!("gpuio: warning: stale temporary files not removed: {e}");
        Vec::new()
    });
    for p in &removed {
        errln!(
            "gpuio: removed {}, left by a run that did not finish",
            gpuio::input::escape_path(p)
        );
    }
    removed
}

/// Shows a workload's progress (`gpuio_workloads::Progress`): phases and BFS levels on the spinner
/// when there is one, stale temporaries removed (or not) on standard error as
/// [`remove_stale_temps`] reports them.
pub(crate) fn show_progress(pb: Option<&indicatif::ProgressBar>, p: gpuio_workloads::Progress) {
    use gpuio_workloads::Progress;
    match p {
        Progress::Phase(m) => {
            if let Some(pb) = pb {
                pb.set_message(m);
            }
        }
        Progress::Level {
            level,
            reached,
            frontier,
        } => {
            if let Some(pb) = pb {
                pb.set_message(format!(
                    "level {level}: {reached} vertices reached, frontier {frontier}"
                ));
            }
        }
        Progress::StaleTempRemoved(p) => errln!(
            "gpuio: removed {}, left by a run that did not finish",
            gpuio::input::escape_path(&p)
        ),
        Progress::StaleTempsNotRemoved(e) => {
            errln!("gpuio: warning: stale temporary files not removed: {e}")
        }
        _ => {}
    }
}

/// A spinner on standard error when it is a terminal and the output is not JSON.
pub(crate) fn spinner(json: bool) -> Option<indicatif::ProgressBar> {
    (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        pb
    })
}

/// Runs `p`, calling `compute` on each slot, with a progress bar over `total` source bytes on a terminal
/// (never with `--json`).
pub(crate) fn run_pipeline(
    a: &PipeArgs,
    p: Pipeline<'_>,
    total: u64,
    msg: &str,
    mut compute: impl FnMut(&mut Slot<'_>) -> Result<()>,
) -> Result<PipelineStats> {
    let pb = crate::pack_cmd::progress_bar(total, msg, !a.json && crate::pack_cmd::on_terminal());
    let stats = p.run(|slot| {
        compute(slot)?;
        if let Some(pb) = &pb {
            pb.inc(slot.range().len);
        }
        Ok(())
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(stats)
}

/// The figures every pipeline command reports, as JSON.
pub(crate) fn stats_json(s: &PipelineStats) -> Value {
    let secs = |d: Duration| d.as_secs_f64();
    let wall = secs(s.wall).max(1e-9);
    let stages: Vec<Value> = s
        .stages()
        .iter()
        .map(|(name, st)| {
            json!({
                "name": name,
                "busy_s": secs(st.busy),
                "idle_s": secs(st.idle),
                "busy_fraction": secs(st.busy) / wall,
                "ops": st.ops,
            })
        })
        .collect();
    json!({
        "bytes": s.bytes_in,
        "bytes_out": s.bytes_out,
        "wall_s": secs(s.wall),
        "bytes_per_sec": s.bytes_per_sec(),
        "overlap_efficiency": s.overlap_efficiency(),
        "slots": s.slots,
        "chunk_size": s.chunk_size,
        "chunks": s.chunks,
        "slot_waits": s.slot_waits,
        "stages": stages,
    })
}

/// The figures every pipeline command reports, as a table and a summary line.
pub(crate) fn stats_table(s: &PipelineStats) -> String {
    let wall = s.wall.as_secs_f64().max(1e-9);
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(["stage", "busy s", "idle s", "busy %", "ops"]);
    for (name, st) in s.stages() {
        t.add_row([
            name.to_string(),
            format!("{:.3}", st.busy.as_secs_f64()),
            format!("{:.3}", st.idle.as_secs_f64()),
            format!("{:.1}", st.busy.as_secs_f64() / wall * 100.0),
            st.ops.to_string(),
        ]);
    }
    for col in 1..5 {
        if let Some(c) = t.column_mut(col) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    format!(
        "{t}\n{} in {:.3} s: {}/s, {} slots of {}, overlap efficiency {:.2} (busiest stage's busy time / wall time)\n",
        format_bytes(s.bytes_in as f64),
        s.wall.as_secs_f64(),
        format_bytes(s.bytes_per_sec()),
        s.slots,
        format_bytes(s.chunk_size as f64),
        s.overlap_efficiency()
    )
}

/// CRC-32C (Castagnoli, as iSCSI and ext4 use) of a stream, fed in order.
pub(crate) struct Crc32c(crc_fast::Digest);

impl Crc32c {
    pub fn new() -> Crc32c {
        Crc32c(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn value(&self) -> u32 {
        self.0.finalize() as u32
    }
}

/// The built-in compute stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// Pass the bytes through.
    None,
    /// CRC-32C of the stream (printed).
    Crc32c,
    /// Busy-wait this many nanoseconds per KiB of each slot: a stand-in for a kernel.
    Spin(u64),
}

impl std::str::FromStr for Compute {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Compute, String> {
        match s {
            "none" => Ok(Compute::None),
            "crc32c" => Ok(Compute::Crc32c),
            _ => {
                let ns = s.strip_prefix("spin:").ok_or_else(|| {
                    format!("'{s}' is not one of none, crc32c, spin:NS (nanoseconds per KiB)")
                })?;
                let ns: u64 = ns
                    .parse()
                    .map_err(|_| format!("spin:{ns}: NS must be a whole number of nanoseconds"))?;
                if ns > SPIN_NS_PER_KIB_MAX {
                    return Err(format!(
                        "spin:{ns}: at most {SPIN_NS_PER_KIB_MAX} nanoseconds per KiB"
                    ));
                }
                Ok(Compute::Spin(ns))
            }
        }
    }
}

impl Compute {
    fn name(self) -> String {
        match self {
            Compute::None => "none".into(),
            Compute::Crc32c => "crc32c".into(),
            Compute::Spin(ns) => format!("spin:{ns}"),
        }
    }
}

/// Busy-waits `ns_per_kib` nanoseconds per KiB of `len` bytes (real CPU time, measured).
fn spin(ns_per_kib: u64, len: usize) {
    let target = Duration::from_nanos(ns_per_kib.saturating_mul(len as u64) / 1024);
    let t = Instant::now();
    while t.elapsed() < target {
        std::hint::spin_loop();
    }
}

#[derive(Args, Debug)]
pub struct StreamArgs {
    /// A file, or an entry of a pack as PACK:ENTRY.
    #[arg(long)]
    input: String,
    /// Write the (computed) stream here, crash-safely (temporary file, fsync, rename); default: no
    /// write stage.
    #[arg(long)]
    output: Option<PathBuf>,
    /// none, crc32c, or spin:NS (busy-wait NS nanoseconds per KiB, to stand in for a kernel).
    #[arg(long, default_value = "none")]
    compute: Compute,
    /// Replace --output even if it is write-protected.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    pipe: PipeArgs,
}

pub fn run(a: StreamArgs) -> Result<()> {
    let s = setup(&a.pipe)?;
    if let Some(p) = probe_input(&a.input)? {
        if p.kind == Kind::Pseudo {
            // The pipeline reads by offset and size; this file has no size to read by.
            return Err(gpuio::input::refusal(p.kind, Path::new(&a.input)));
        }
    }
    let input = open_input(&s.queue, &a.input, a.pipe.direct)?;
    let total = input.source.len();
    let input_direct = input.direct;
    let mut output_direct = None;
    let sink = match &a.output {
        Some(out) => {
            check_output(&[input.as_input_file()], out, a.force)?;
            remove_stale_temps(out);
            let sink = FileSink::replace(&s.queue, out, a.pipe.direct)?;
            output_direct = Some(sink.file().is_direct());
            Some(sink)
        }
        None => None,
    };
    let mut p = s.pipeline(&a.pipe, input);
    if let Some(sink) = sink {
        p = p.sink(sink);
    }
    let mut crc = Crc32c::new();
    let compute = a.compute;
    let stats = run_pipeline(&a.pipe, p, total, "streaming", |slot| {
        match compute {
            Compute::None => {}
            Compute::Crc32c => crc.update(slot.bytes()),
            Compute::Spin(ns) => spin(ns, slot.len()),
        }
        Ok(())
    })?;
    let crc = (compute == Compute::Crc32c).then(|| format!("{:08x}", crc.value()));
    if a.pipe.json {
        let mut v = stats_json(&stats);
        v["input"] = json!(a.input);
        v["output"] = json!(a.output.as_ref().map(|p| p.display().to_string()));
        v["compute"] = json!(compute.name());
        v["direct"] = json!({ "input": input_direct, "output": output_direct });
        if let Some(c) = &crc {
            v["crc32c"] = json!(c);
        }
        crate::report::print_json(&v)?;
    } else {
        out!("{}", stats_table(&stats))?;
        if let Some(c) = crc {
            outln!("crc32c: {c}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_flags_parse_and_refuse() {
        assert_eq!("none".parse::<Compute>(), Ok(Compute::None));
        assert_eq!("crc32c".parse::<Compute>(), Ok(Compute::Crc32c));
        assert_eq!("spin:250".parse::<Compute>(), Ok(Compute::Spin(250)));
        for bad in ["spin:", "spin:-1", "spin:1e3", "spin:2000000", "md5", ""] {
            assert!(bad.parse::<Compute>().is_err(), "{bad}");
        }
    }

    #[test]
    fn spin_takes_the_time_asked() {
        let t = Instant::now();
        spin(10_000, 1 << 20); // 10 µs per KiB x 1024 KiB
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(10), "{e:?}");
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        let mut c = Crc32c::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.value(), 0xe306_9283);
    }
}
