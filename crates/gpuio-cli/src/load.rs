//! `gpuio load FILE.safetensors|PACK:ENTRY [--device cpu|cuda:N] [--path ...] [--json]`: validates a
//! safetensors file (or one stored in a pack, compressed or not), puts all its tensors on the device,
//! and reports bytes, seconds, GB/s and the path used, with the reason when a faster path was not
//! taken. With `--json`, every tensor with the CRC-32C of its bytes as the device holds them (read
//! back after the load, not timed), so a load can be verified end to end.
//!
//! Paths (`--path`): `staged` (pinned staging buffers, copies on a copy stream), `direct` (storage →
//! device memory, GPUDirect Storage through cuFile), `zero-copy` (the file mapped read-only into the
//! device's address space; nothing copied), and `auto` (direct where it truly bypasses host memory and
//! the file is open O_DIRECT, staged otherwise, saying why). Pack entries are always staged: their
//! chunks are decompressed on the CPU.
//!
//! `--save-to OUT` then writes the model back from device memory as a safetensors file (device →
//! pinned staging → storage, crash-safe replacement of OUT), so a load and a store can be checked
//! together: OUT equals the input byte for byte.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use gpuio::{Engine, EngineConfig, Error, Result};
use gpuio_cuda::loader::PathChoice;
use gpuio_cuda::{
    DeviceTensor, LoadStats, LoadedModel, Loader, LoaderConfig, MappedModel, StoreStats, Target,
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
    /// A .safetensors file, or PACK:ENTRY for one stored in a pack.
    file: String,
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
    /// After loading, write the model from device memory to this safetensors file (replaced
    /// crash-safely; never the input itself).
    #[arg(long)]
    save_to: Option<PathBuf>,
    /// Let --save-to replace a write-protected file (or one in a directory this user may not write).
    #[arg(long, requires = "save_to")]
    force: bool,
    /// Print one JSON object: bytes, seconds (the transfer), end_to_end_s (header, staging set-up,
    /// allocation and transfer), bytes_per_sec, path, and every tensor with its CRC-32C and CRC-32
    /// read back from device memory.
    #[arg(long)]
    json: bool,
    /// With --json, list the tensors without reading device memory back to checksum them (timing
    /// runs of large models, where the read-back takes longer than the load).
    #[arg(long, requires = "json")]
    no_checksums: bool,
}

/// A model on the device: copied into device memory (and perhaps saved back), or mapped in place.
enum Placed {
    Copied(LoadedModel, Option<StoreStats>),
    Mapped(MappedModel),
}

impl Placed {
    fn tensors(&self) -> &[DeviceTensor] {
        match self {
            Placed::Copied(m, _) => &m.tensors,
            Placed::Mapped(m) => &m.tensors,
        }
    }
    fn stats(&self) -> &LoadStats {
        match self {
            Placed::Copied(m, _) => &m.stats,
            Placed::Mapped(m) => &m.stats,
        }
    }
    fn saved(&self) -> Option<&StoreStats> {
        match self {
            Placed::Copied(_, s) => s.as_ref(),
            Placed::Mapped(_) => None,
        }
    }
    fn crcs(&self, t: &DeviceTensor) -> Result<(u32, u32)> {
        match self {
            Placed::Copied(m, _) => Ok((m.crc32c(t)?, m.crc32_ieee(t)?)),
            Placed::Mapped(m) => Ok((m.crc32c(t)?, m.crc32_ieee(t)?)),
        }
    }
}

/// `--save-to`: the model written back from device memory.
fn save(a: &LoadArgs, loader: &Loader, m: &LoadedModel) -> Result<Option<StoreStats>> {
    a.save_to
        .as_deref()
        .map(|out| loader.save_safetensors(m, out))
        .transpose()
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

pub fn run(a: LoadArgs) -> Result<()> {
    let target: Target = a.device.parse()?;
    let cfg = loader_config(&a)?;
    let packed = gpuio_pack::split_pack_path(&a.file);
    if packed.is_some() && matches!(a.path, PathArg::ZeroCopy | PathArg::Direct) {
        return Err(Error::invalid(format!(
            "{}: a pack entry cannot be loaded {} (its chunks are compressed and decoded on the CPU): use --path staged",
            a.file,
            if a.path == PathArg::ZeroCopy { "zero-copy" } else { "directly" }
        )));
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
            None => PathBuf::from(&a.file),
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
    let mut engine_cfg = EngineConfig::default();
    engine_cfg.backend.choice = a.backend;
    let engine = Engine::new(engine_cfg)?;
    // What a caller of the library waits for, as the peers' loaders are timed: header, staging set-up,
    // device allocation and the transfer; not the device's context creation (a process does that
    // once), nor checksums or saves.
    let mut phases = Phases::default();
    let (device, placed, pin_note) = match &packed {
        Some((pack_path, entry_name)) => {
            let t = Instant::now();
            let pack = gpuio_pack::Pack::open(pack_path)?;
            let entry = pack.entry(entry_name)?;
            // Validate the header before touching the device, so a bad file never needs a GPU.
            let probe = engine.queue(gpuio::QueueDesc::default())?;
            gpuio_cuda::loader::read_entry_header(&entry, &probe)?;
            phases.header = t.elapsed();
            let device = gpuio_cuda::open_target(target)?;
            let t = Instant::now();
            let loader = Loader::new(&engine, device.clone(), cfg)?;
            phases.setup = t.elapsed();
            let t = Instant::now();
            let m = loader.load_safetensors_entry(&entry)?;
            phases.load = t.elapsed();
            let saved = save(&a, &loader, &m)?;
            (
                device,
                Placed::Copied(m, saved),
                loader.pin_note().to_string(),
            )
        }
        None => {
            let file = Path::new(&a.file);
            let t = Instant::now();
            let header = gpuio_cuda::safetensors::read_header(file)?;
            phases.header = t.elapsed();
            let device = gpuio_cuda::open_target(target)?;
            let t = Instant::now();
            match a.path {
                PathArg::ZeroCopy => {
                    let m = gpuio_cuda::zerocopy::map_with_header(&device, file, &header)?;
                    phases.load = t.elapsed();
                    (device, Placed::Mapped(m), String::new())
                }
                PathArg::Staged | PathArg::Direct | PathArg::Auto => {
                    let loader = Loader::new(&engine, device.clone(), cfg)?;
                    phases.setup = t.elapsed();
                    let t = Instant::now();
                    let m = loader.load_with_header(file, &header)?;
                    phases.load = t.elapsed();
                    let saved = save(&a, &loader, &m)?;
                    (
                        device,
                        Placed::Copied(m, saved),
                        loader.pin_note().to_string(),
                    )
                }
            }
        }
    };
    report(&a, &engine, &device, &placed, &pin_note, &phases)
}

/// Where a load's time went, as a caller of the library waits for it (the device's context creation
/// excluded: a process does that once).
#[derive(Debug, Default)]
struct Phases {
    /// Reading and validating the header.
    header: Duration,
    /// Making the loader: staging buffers (allocated, registered, page-locked), its queue and copy
    /// stream, and the direct reader where one is asked for.
    setup: Duration,
    /// Opening the file, allocating device memory, and the transfer.
    load: Duration,
}

impl Phases {
    fn end_to_end(&self) -> Duration {
        self.header + self.setup + self.load
    }
}

fn report(
    a: &LoadArgs,
    engine: &Engine,
    device: &Arc<dyn gpuio_cuda::Device>,
    placed: &Placed,
    pin_note: &str,
    phases: &Phases,
) -> Result<()> {
    let end_to_end = phases.end_to_end();
    let s = placed.stats();
    let notes: Vec<&str> = [s.note.as_str(), pin_note]
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    if !a.json {
        outln!(
            "loaded {} tensors, {} in {:.3} s ({}/s) to {} ({}) via {}{}",
            placed.tensors().len(),
            gpuio::size::format_bytes(s.bytes as f64),
            s.seconds,
            gpuio::size::format_bytes(s.bytes_per_sec()),
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
            end_to_end.as_secs_f64()
        )?;
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
    let mut tensors = Vec::with_capacity(placed.tensors().len());
    for t in placed.tensors() {
        let mut row = json!({
            "name": t.name,
            "dtype": t.dtype.name(),
            "shape": t.shape,
            "bytes": t.bytes,
            "offset": t.offset,
        });
        if !a.no_checksums {
            let (crc, crc_ieee) = placed.crcs(t)?;
            row["crc32c"] = json!(format!("{crc:08x}"));
            row["crc32"] = json!(format!("{crc_ieee:08x}"));
        }
        tensors.push(row);
    }
    let mut v = json!({
        "file": a.file,
        "device": device.label(),
        "device_description": device.description(),
        "bytes": s.bytes,
        "seconds": s.seconds,
        "bytes_per_sec": s.bytes_per_sec(),
        "end_to_end_s": end_to_end.as_secs_f64(),
        "phases": {
            "header_s": phases.header.as_secs_f64(),
            "loader_setup_s": phases.setup.as_secs_f64(),
            "load_s": phases.load.as_secs_f64(),
        },
        "path": s.path.name(),
        "backend": engine.explain().backend.to_string(),
        "read_mode": s.read_mode,
        "note": notes.join("; "),
        "staging_buffers": s.staging_buffers,
        "staging_bytes": s.staging_bytes,
        "chunks": s.chunks,
        "dma_copies": s.dma_copies,
        "pio_copies": s.pio_copies,
        "read_wait_s": s.read_wait.as_secs_f64(),
        "copy_wait_s": s.copy_wait.as_secs_f64(),
        "tensors": tensors,
    });
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
