//! `gpuio load FILE.safetensors...|INDEX.json|PACK:ENTRY [--device cpu|cuda:N] [--path ...] [--json]`:
//! validates a safetensors file (or one stored in a pack, compressed or not), or a checkpoint sharded
//! over several files (given as the files, or as HuggingFace's `*.safetensors.index.json`), puts all
//! its tensors on the device, and reports bytes, seconds, GB/s and the path used, with the reason when
//! a faster path was not taken. With `--json`, every tensor with the CRC-32C of its bytes as the
//! device holds them (read back after the load, not timed), so a load can be verified end to end;
//! per shard its bytes and timing; and where end to end time went (`phases`: header, opening,
//! device allocation, the loader's set-up step by step, the wait for it, the transfer).
//!
//! A checkpoint's shards all load through one loader (its staging buffers set up once). With
//! `--overlap-setup` the loader is made on a helper thread while the files are opened and device
//! memory allocated; it is off by default because it gained nothing measurable on the host stand-in or
//! the mock driver (and cost up to 46 ms on 2 cores, where the stand-in's allocation zeroes host
//! pages too): a GPU run decides. The library does all of that (`gpuio_cuda::checkpoint`); this
//! module turns flags into a config and prints.
//!
//! Paths (`--path`): `staged` (pinned staging buffers, copies on a copy stream), `direct` (storage →
//! device memory, GPUDirect Storage through cuFile), `zero-copy` (the file mapped read-only into the
//! device's address space; nothing copied; one file only), and `auto` (direct where it truly bypasses
//! host memory and the file is open O_DIRECT, staged otherwise, saying why). Pack entries are always
//! staged: their chunks are decompressed on the CPU.
//!
//! `--save-to OUT` then writes the model back from device memory as a safetensors file (device →
//! pinned staging → storage, crash-safe replacement of OUT), so a load and a store can be checked
//! together: OUT equals the input byte for byte. It takes one input file: a sharded checkpoint is
//! refused with a message rather than merged into one file or written as several.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use gpuio::{Engine, EngineConfig, Error, Result};
use gpuio_cuda::loader::PathChoice;
use gpuio_cuda::{
    Checkpoint, DeviceTensor, LoadPhases, LoadStats, LoadedCheckpoint, LoadedModel, Loader,
    LoaderConfig, MappedModel, StoreStats, Target,
};
use serde_json::json;

/// How the bytes should reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PathArg {
    /// The fastest path that works here, saying why when it is not the fastest there is.
    Auto,
    /// Storage → pinned staging buffers → device copies.
    Staged,
    /// Storage → device memory with no host copy (GPUDirect Storage through cuFile); an error, saying
    /// why, where it is not available.
    Direct,
    /// Map the file read-only into the device's address space; nothing is copied.
    ZeroCopy,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// A .safetensors file; several (the shards of one checkpoint); a checkpoint index
    /// (*.safetensors.index.json, its shards named relative to its directory); or PACK:ENTRY for one
    /// stored in a pack.
    #[arg(required = true, num_args = 1..)]
    files: Vec<String>,
    /// Where the tensors go: cpu (host memory standing in for a device) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the bytes get there.
    #[arg(long, value_enum, default_value = "auto")]
    path: PathArg,
    /// Staging buffers (1: reads and copies do not overlap; 2+: they do).
    #[arg(long, default_value_t = gpuio_cuda::loader::STAGING_BUFFERS_DEFAULT)]
    staging_buffers: usize,
    /// Bytes per staging buffer.
    #[arg(long, value_parser = crate::parse_size, default_value = "16M")]
    staging_size: u64,
    /// The engine's backend for the reads (auto: the probe's choice).
    #[arg(long, default_value = "auto")]
    backend: gpuio::BackendChoice,
    /// Copy chunks of at most this many bytes by programmed I/O (device threads reading the mapped
    /// staging buffer) instead of DMA; 0 = always DMA.
    #[arg(long, value_parser = crate::parse_size, default_value = "0")]
    pio_max: u64,
    /// Make the loader (staging allocation, registration, page-locking) on a helper thread while the
    /// files are opened and device memory allocated, rather than one after the other.
    #[arg(long)]
    overlap_setup: bool,
    /// After loading, write the model from device memory to this safetensors file (replaced
    /// crash-safely; never the input itself). One input file only.
    #[arg(long)]
    save_to: Option<PathBuf>,
    /// Let --save-to replace a write-protected file (or one in a directory this user may not write).
    #[arg(long, requires = "save_to")]
    force: bool,
    /// Print one JSON object: bytes, seconds (the transfer), end_to_end_s (header, set-up,
    /// allocation and transfer), phases (where end_to_end_s went), bytes_per_sec, path, shards (per
    /// file), and every tensor with its CRC-32C and CRC-32 read back from device memory.
    #[arg(long)]
    json: bool,
    /// With --json, list the tensors without reading device memory back to checksum them (timing
    /// runs of large models, where the read-back takes longer than the load).
    #[arg(long, requires = "json")]
    no_checksums: bool,
}

/// A model on the device: copied into device memory (and perhaps saved back), or mapped in place.
enum Placed {
    Copied(LoadedCheckpoint, Option<StoreStats>),
    Mapped(MappedModel, LoadPhases),
}

impl Placed {
    /// Each shard's (or the one mapping's) file, stats and tensors, with a closure for its CRCs.
    fn parts(&self) -> Vec<Part<'_>> {
        match self {
            Placed::Copied(c, _) => c
                .shards
                .iter()
                .zip(&c.paths)
                .zip(&c.windows)
                .map(|((m, p), w)| Part {
                    file: p.display().to_string(),
                    stats: &m.stats,
                    tensors: &m.tensors,
                    window: *w,
                    model: Some(m),
                    mapped: None,
                })
                .collect(),
            Placed::Mapped(m, _) => vec![Part {
                file: String::new(),
                stats: &m.stats,
                tensors: &m.tensors,
                window: (Duration::ZERO, Duration::from_secs_f64(m.stats.seconds)),
                model: None,
                mapped: Some(m),
            }],
        }
    }
    fn phases(&self) -> &LoadPhases {
        match self {
            Placed::Copied(c, _) => &c.phases,
            Placed::Mapped(_, p) => p,
        }
    }
    fn saved(&self) -> Option<&StoreStats> {
        match self {
            Placed::Copied(_, s) => s.as_ref(),
            Placed::Mapped(..) => None,
        }
    }
}

struct Part<'a> {
    file: String,
    stats: &'a LoadStats,
    tensors: &'a [DeviceTensor],
    window: (Duration, Duration),
    model: Option<&'a LoadedModel>,
    mapped: Option<&'a MappedModel>,
}

impl Part<'_> {
    fn crcs(&self, t: &DeviceTensor) -> Result<(u32, u32)> {
        match (self.model, self.mapped) {
            (Some(m), _) => Ok((m.crc32c(t)?, m.crc32_ieee(t)?)),
            (None, Some(m)) => Ok((m.crc32c(t)?, m.crc32_ieee(t)?)),
            (None, None) => Err(Error::invalid("a loaded part with no model")),
        }
    }
}

fn loader_config(a: &LoadArgs) -> Result<LoaderConfig> {
    let cfg = LoaderConfig {
        staging_buffers: a.staging_buffers,
        staging_bytes: usize::try_from(a.staging_size).unwrap_or(usize::MAX),
        pio_max_bytes: usize::try_from(a.pio_max).unwrap_or(usize::MAX),
        path: match a.path {
            PathArg::Staged => PathChoice::Staged,
            PathArg::Direct => PathChoice::Direct,
            PathArg::Auto | PathArg::ZeroCopy => PathChoice::Auto,
        },
        ..LoaderConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Steps a load depends on that `end_to_end_s` leaves out, as the peers' timings do: making the
/// engine and opening the device (a process does each once).
#[derive(Debug, Default)]
struct Outside {
    engine: Duration,
    device_open: Duration,
}

pub fn run(a: LoadArgs) -> Result<()> {
    let target: Target = a.device.parse()?;
    let cfg = loader_config(&a)?;
    let first = a.files[0].clone();
    let packed = gpuio_pack::split_pack_path(&first);
    let several = a.files.len() > 1 || gpuio_cuda::checkpoint::is_index(Path::new(&first));
    if packed.is_some() && a.files.len() > 1 {
        return Err(Error::invalid(format!(
            "{first}: a pack entry loads alone, not with other files"
        )));
    }
    if packed.is_some() && matches!(a.path, PathArg::ZeroCopy | PathArg::Direct) {
        return Err(Error::invalid(format!(
            "{first}: a pack entry cannot be loaded {} (its chunks are compressed and decoded on the CPU): use --path staged",
            if a.path == PathArg::ZeroCopy { "zero-copy" } else { "directly" }
        )));
    }
    if several && a.path == PathArg::ZeroCopy {
        return Err(Error::invalid(
            "--path zero-copy maps one file: load a sharded checkpoint with another --path",
        ));
    }
    if a.save_to.is_some() && several {
        return Err(Error::invalid(
            "--save-to writes one safetensors file and this is a checkpoint of several: load and save its shards one at a time",
        ));
    }
    if a.save_to.is_some() && a.path == PathArg::ZeroCopy {
        return Err(Error::invalid(
            "--save-to writes a model from device memory; a zero-copy mapping is the file itself: use another --path",
        ));
    }
    if let Some(out) = &a.save_to {
        // Checked before anything is loaded: never over the input (the pack, for PACK:ENTRY), and a
        // write-protected destination only with --force.
        let input = match &packed {
            Some((pack_path, _)) => pack_path.clone(),
            None => PathBuf::from(&first),
        };
        let id = gpuio::input::FileId::of_path(&input)?.ok_or_else(|| {
            Error::from_errno(gpuio::error::Op::Stat, libc::ENOENT).with_path(&input)
        })?;
        let inputs = [gpuio::replace::InputFile {
            id,
            name: input.to_string_lossy().into_owned(),
        }];
        crate::stream::check_output(&inputs, out, a.force)?;
        // Temporaries of earlier saves killed by SIGKILL (which no handler can catch).
        crate::stream::remove_stale_temps(out);
    }
    let mut outside = Outside::default();
    let t = Instant::now();
    let mut engine_cfg = EngineConfig::default();
    engine_cfg.backend.choice = a.backend;
    let engine = Engine::new(engine_cfg)?;
    outside.engine = t.elapsed();
    // What a caller of the library waits for, as the peers' loaders are timed: header, staging set-up,
    // device allocation and the transfer; not the engine or the device's context creation (a process
    // does each once), nor checksums or saves. Headers are validated before the device is opened, so
    // a bad file never needs a GPU.
    let (device, placed, pin_note) = match &packed {
        Some((pack_path, entry_name)) => {
            let t = Instant::now();
            let pack = gpuio_pack::Pack::open(pack_path)?;
            let entry = pack.entry(entry_name)?;
            let probe = engine.queue(gpuio::QueueDesc::default())?;
            gpuio_cuda::loader::read_entry_header(&entry, &probe)?;
            let header = t.elapsed();
            let t = Instant::now();
            let device = gpuio_cuda::open_target(target)?;
            outside.device_open = t.elapsed();
            let t = Instant::now();
            let loader = Loader::new(&engine, device.clone(), cfg)?;
            let setup = t.elapsed();
            let t = Instant::now();
            let m = loader.load_safetensors_entry(&entry)?;
            let transfer = t.elapsed();
            let saved = save(&a, &loader, &m)?;
            let phases = LoadPhases {
                header,
                setup: Some(loader.setup_times()),
                setup_wait: setup,
                transfer,
                end_to_end: header + setup + transfer,
                ..LoadPhases::default()
            };
            let loaded = LoadedCheckpoint {
                index: None,
                paths: vec![PathBuf::from(&first)],
                windows: vec![(Duration::ZERO, transfer)],
                shards: vec![m],
                phases,
            };
            (
                device,
                Placed::Copied(loaded, saved),
                loader.pin_note().to_string(),
            )
        }
        None if a.path == PathArg::ZeroCopy => {
            let file = Path::new(&first);
            let t = Instant::now();
            let header = gpuio_cuda::safetensors::read_header(file)?;
            let header_time = t.elapsed();
            let t = Instant::now();
            let device = gpuio_cuda::open_target(target)?;
            outside.device_open = t.elapsed();
            let t = Instant::now();
            let m = gpuio_cuda::zerocopy::map_with_header(&device, file, &header)?;
            let transfer = t.elapsed();
            let phases = LoadPhases {
                header: header_time,
                transfer,
                end_to_end: header_time + transfer,
                ..LoadPhases::default()
            };
            (device, Placed::Mapped(m, phases), String::new())
        }
        None => {
            let inputs: Vec<PathBuf> = a.files.iter().map(PathBuf::from).collect();
            let ckpt = Checkpoint::open(&inputs)?;
            let t = Instant::now();
            // Into host memory, files already in memory are read straight into the destination.
            let (device, cfg, why) = match target {
                Target::Cpu => {
                    let paths: Vec<&Path> = ckpt.shards.iter().map(|s| s.path.as_path()).collect();
                    gpuio_cuda::host::host_load_plan(&paths, cfg)?
                }
                t => (gpuio_cuda::open_target(t)?, cfg, None),
            };
            outside.device_open = t.elapsed();
            let (loader, loaded) =
                gpuio_cuda::open_and_load(&engine, &device, cfg, &ckpt, a.overlap_setup)?;
            let saved = match (&a.save_to, loaded.shards.first()) {
                (Some(out), Some(m)) => Some(loader.save_safetensors(m, out)?),
                _ => None,
            };
            let note = match why {
                Some(w) => format!("{w}; {}", loader.pin_note()),
                None => loader.pin_note().to_string(),
            };
            (device, Placed::Copied(loaded, saved), note)
        }
    };
    report(&a, &engine, &device, &placed, &pin_note, &outside)
}

/// `--save-to`: the model written back from device memory.
fn save(a: &LoadArgs, loader: &Loader, m: &LoadedModel) -> Result<Option<StoreStats>> {
    a.save_to
        .as_deref()
        .map(|out| loader.save_safetensors(m, out))
        .transpose()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `phases` of the JSON: where `end_to_end_s` went. `other_s` is what the named steps on the
/// critical path do not account for (with the set-up overlapped, the longer of the loader's set-up
/// and the opening plus allocation is on it).
fn phases_json(p: &LoadPhases, outside: &Outside) -> serde_json::Value {
    let mut v = json!({
        "header_s": secs(p.header),
        "open_s": secs(p.open),
        "device_alloc_s": secs(p.device_alloc),
        "setup_overlapped": p.setup_overlapped,
        "setup_wait_s": secs(p.setup_wait),
        "transfer_s": secs(p.transfer),
        "engine_s_not_in_end_to_end": secs(outside.engine),
        "device_open_s_not_in_end_to_end": secs(outside.device_open),
    });
    let critical = p.header + p.open + p.device_alloc + p.setup_wait + p.transfer;
    v["other_s"] = json!(secs(p.end_to_end.saturating_sub(critical)));
    if let Some(s) = &p.setup {
        v["loader_setup_s"] = json!(secs(s.total));
        v["loader_setup"] = json!({
            "queue_s": secs(s.queue),
            "staging_alloc_s": secs(s.staging_alloc),
            "registration_s": secs(s.registration),
            "copy_stream_s": secs(s.copy_stream),
            "direct_reader_s": secs(s.direct_reader),
            "pinning_s": secs(s.pinning),
        });
    }
    v
}

fn report(
    a: &LoadArgs,
    engine: &Engine,
    device: &Arc<dyn gpuio_cuda::Device>,
    placed: &Placed,
    pin_note: &str,
    outside: &Outside,
) -> Result<()> {
    let phases = placed.phases();
    let end_to_end = phases.end_to_end;
    let parts = placed.parts();
    let Some(s) = parts.first().map(|p| p.stats) else {
        return Err(Error::invalid("nothing was loaded"));
    };
    let bytes: u64 = parts.iter().map(|p| p.stats.bytes).sum();
    let seconds = secs(phases.transfer);
    let rate = bytes as f64 / seconds.max(1e-9);
    let tensor_count: usize = parts.iter().map(|p| p.tensors.len()).sum();
    let mut notes: Vec<&str> = Vec::new();
    for n in parts
        .iter()
        .map(|p| p.stats.note.as_str())
        .chain([pin_note])
    {
        if !n.is_empty() && !notes.contains(&n) {
            notes.push(n);
        }
    }
    if !a.json {
        outln!(
            "loaded {} tensors{}, {} in {:.3} s ({}/s) to {} ({}) via {}{}",
            tensor_count,
            if parts.len() > 1 {
                format!(" from {} shards", parts.len())
            } else {
                String::new()
            },
            gpuio::size::format_bytes(bytes as f64),
            seconds,
            gpuio::size::format_bytes(rate),
            device.label(),
            device.description(),
            s.path.name(),
            if s.staging_buffers > 0 {
                format!(
                    ": {} staging buffers of {}",
                    s.staging_buffers,
                    gpuio::size::format_bytes(s.staging_bytes as f64)
                )
            } else {
                String::new()
            },
        )?;
        outln!(
            "  end to end (header, set-up, allocation, transfer): {:.3} s",
            secs(end_to_end)
        )?;
        if let Some(st) = &phases.setup {
            outln!(
                "  loader set-up {:.3} s{} (staging allocation {:.3}, registration {:.3}, page-locking {:.3}); waited for it {:.3} s",
                secs(st.total),
                if phases.setup_overlapped {
                    ", overlapping opening and allocation"
                } else {
                    ""
                },
                secs(st.staging_alloc),
                secs(st.registration),
                secs(st.pinning),
                secs(phases.setup_wait),
            )?;
        }
        if !s.read_mode.is_empty() {
            outln!(
                "  read {} with the {} backend",
                s.read_mode,
                engine.explain().backend
            )?;
        }
        for n in notes {
            outln!("  {n}")?;
        }
        if let (Some(out), Some(st)) = (&a.save_to, placed.saved()) {
            outln!(
                "saved to {} from device memory: {} in {:.3} s ({}/s)",
                out.display(),
                gpuio::size::format_bytes(st.bytes as f64),
                st.seconds,
                gpuio::size::format_bytes(st.bytes_per_sec()),
            )?;
        }
        return Ok(());
    }
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut shards = Vec::with_capacity(parts.len());
    for (k, p) in parts.iter().enumerate() {
        for t in p.tensors {
            let mut row = json!({
                "name": t.name,
                "dtype": t.dtype.name(),
                "shape": t.shape,
                "bytes": t.bytes,
                "offset": t.offset,
                "shard": k,
            });
            if !a.no_checksums {
                let (crc, crc_ieee) = p.crcs(t)?;
                row["crc32c"] = json!(format!("{crc:08x}"));
                row["crc32"] = json!(format!("{crc_ieee:08x}"));
            }
            tensors.push(row);
        }
        shards.push(json!({
            "file": if p.file.is_empty() { a.files[0].clone() } else { p.file.clone() },
            "tensors": p.tensors.len(),
            "bytes": p.stats.bytes,
            "seconds": p.stats.seconds,
            "started_s": secs(p.window.0),
            "finished_s": secs(p.window.1),
            "chunks": p.stats.chunks,
            "read_wait_s": secs(p.stats.read_wait),
            "copy_wait_s": secs(p.stats.copy_wait),
            "open_s": secs(p.stats.open),
            "device_alloc_s": secs(p.stats.device_alloc),
            "path": p.stats.path.name(),
        }));
    }
    let sum = |f: &dyn Fn(&LoadStats) -> f64| parts.iter().map(|p| f(p.stats)).sum::<f64>();
    let mut v = json!({
        "file": a.files[0],
        "files": a.files,
        "device": device.label(),
        "device_description": device.description(),
        "bytes": bytes,
        "seconds": seconds,
        "bytes_per_sec": rate,
        "end_to_end_s": secs(end_to_end),
        "phases": phases_json(phases, outside),
        "path": s.path.name(),
        "backend": engine.explain().backend.to_string(),
        "read_mode": s.read_mode,
        "note": notes.join("; "),
        "staging_buffers": s.staging_buffers,
        "staging_bytes": s.staging_bytes,
        "chunks": parts.iter().map(|p| p.stats.chunks).sum::<usize>(),
        "dma_copies": parts.iter().map(|p| p.stats.dma_copies).sum::<usize>(),
        "pio_copies": parts.iter().map(|p| p.stats.pio_copies).sum::<usize>(),
        "read_wait_s": sum(&|s| secs(s.read_wait)),
        "copy_wait_s": sum(&|s| secs(s.copy_wait)),
        "shards": shards,
        "tensors": tensors,
    });
    if let Placed::Copied(c, _) = placed {
        v["index"] = json!(c.index.as_ref().map(|p| p.display().to_string()));
    }
    if let (Some(out), Some(st)) = (&a.save_to, placed.saved()) {
        v["saved"] = json!({
            "file": out.display().to_string(),
            "bytes": st.bytes,
            "seconds": st.seconds,
            "bytes_per_sec": st.bytes_per_sec(),
            "chunks": st.chunks,
            "copy_wait_s": st.copy_wait.as_secs_f64(),
            "write_wait_s": st.write_wait.as_secs_f64(),
        });
    }
    crate::report::print_json(&v)?;
    Ok(())
}

/// `gpuio bench --target DEV --pio-sweep`: per-transfer time of DMA and programmed-I/O copies from
/// 64 B to `max` bytes, and where DMA starts to win.
pub fn pio_sweep(device: Arc<dyn gpuio_cuda::Device>, max: u64, json_out: bool) -> Result<()> {
    let sizes = gpuio_cuda::sweep::sizes_up_to(usize::try_from(max).unwrap_or(usize::MAX));
    let r = gpuio_cuda::sweep::pio_dma_sweep(&device, &sizes, 200)?;
    if json_out {
        let rows: Vec<_> = r
            .rows
            .iter()
            .map(|row| json!({"bytes": row.bytes, "dma_us": row.dma_us, "pio_us": row.pio_us}))
            .collect();
        crate::report::print_json(&json!({
            "target": device.label(),
            "device": device.description(),
            "repetitions": r.repetitions,
            "rows": rows,
            "dma_wins_from_bytes": r.dma_wins_from,
            "pio_unavailable": r.pio_unavailable,
        }))?;
        return Ok(());
    }
    outln!(
        "{} ({}): median of {} copies each",
        device.label(),
        device.description(),
        r.repetitions
    )?;
    for row in &r.rows {
        outln!(
            "{:>9}  DMA {:9.2} us  PIO {}",
            gpuio::size::format_bytes(row.bytes as f64),
            row.dma_us,
            row.pio_us
                .map(|p| format!("{p:9.2} us"))
                .unwrap_or_else(|| "-".into())
        )?;
    }
    match (&r.pio_unavailable, r.dma_wins_from) {
        (Some(why), _) => outln!("no programmed-I/O copy: {why}"),
        (None, Some(b)) => outln!(
            "DMA is faster from {} on",
            gpuio::size::format_bytes(b as f64)
        ),
        (None, None) => outln!("programmed I/O was faster at every size measured"),
    }
}

/// `gpuio bench --target cuda:N`: one sequential pass over `region` bytes of `path`, staged into a
/// device allocation of the same size; with `compare`, fio's sequential read of the same file (the
/// disk's limit) and the ratio.
pub fn bench_device(
    path: &std::path::Path,
    region: u64,
    device: std::sync::Arc<dyn gpuio_cuda::Device>,
    engine_cfg: EngineConfig,
    cfg: LoaderConfig,
    compare: bool,
    json_out: bool,
) -> Result<()> {
    let engine = Engine::new(engine_cfg)?;
    let loader = Loader::new(&engine, device.clone(), cfg)?;
    let len = usize::try_from(region)
        .map_err(|_| gpuio::Error::invalid(format!("{region} bytes do not fit in memory")))?;
    let buf = gpuio_cuda::DeviceBuffer::alloc(&device, len)?;
    let file = gpuio::File::open(path)?;
    let stats = loader.load_range(&file, 0, &buf, 0, region)?;
    let mut v = json!({
        "target": device.label(),
        "device": device.description(),
        "file": path.display().to_string(),
        "direct": file.is_direct(),
        "bytes": stats.bytes,
        "seconds": stats.seconds,
        "bytes_per_sec": stats.bytes_per_sec(),
        "path": stats.path.name(),
        "backend": engine.explain().backend.to_string(),
        "read_mode": stats.read_mode,
        "staging_buffers": stats.staging_buffers,
        "staging_bytes": stats.staging_bytes,
        "read_wait_s": stats.read_wait.as_secs_f64(),
        "copy_wait_s": stats.copy_wait.as_secs_f64(),
        "pinned": loader.pin_note(),
    });
    if compare {
        if crate::workload::fio_available() {
            let spec = crate::workload::Spec {
                pattern: crate::workload::Pattern::Read,
                block_size: 1 << 20,
                queue_depth: 16,
                duration: std::time::Duration::from_secs(60),
                region,
                threads: 1,
            };
            match crate::workload::run_fio(&spec, path, file.is_direct()) {
                Ok(m) => {
                    v["fio_bytes_per_sec"] = json!(m.bytes_per_sec());
                    v["gpuio_ratio"] = json!(stats.bytes_per_sec() / m.bytes_per_sec().max(1e-9));
                }
                Err(e) => v["note"] = json!(format!("fio did not run: {e}")),
            }
        } else {
            v["note"] = json!("fio is not installed: no fio reference");
        }
    }
    if json_out {
        outln!("{v}")?;
    } else {
        outln!(
            "{} -> {}: {} in {:.3} s = {}/s ({} staging buffers){}",
            path.display(),
            device.label(),
            gpuio::size::format_bytes(stats.bytes as f64),
            stats.seconds,
            gpuio::size::format_bytes(stats.bytes_per_sec()),
            stats.staging_buffers,
            v.get("gpuio_ratio")
                .and_then(|r| r.as_f64())
                .map(|r| format!("; {r:.2} x fio"))
                .unwrap_or_default(),
        )?;
    }
    Ok(())
}
