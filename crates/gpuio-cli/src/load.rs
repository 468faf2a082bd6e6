//! `gpuio load FILE.safetensors [--device cpu|cuda:N] [--json]`: validates a safetensors file, loads
//! all its tensors into one device allocation through the staged path, and reports bytes, seconds,
//! GB/s and the path used. With `--json`, every tensor with the CRC-32C of its bytes as they are in
//! device memory (read back after the load, not timed), so a load can be verified end to end.

use std::path::PathBuf;

use clap::Args;
use gpuio::{Engine, EngineConfig, Result};
use gpuio_cuda::{Loader, LoaderConfig, Target};
use serde_json::json;

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// A .safetensors file.
    file: PathBuf,
    /// Where the tensors go: cpu (host memory standing in for a device) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Staging buffers (1: reads and copies do not overlap; 2+: they do).
    #[arg(long, default_value_t = gpuio_cuda::loader::STAGING_BUFFERS_DEFAULT)]
    staging_buffers: usize,
    /// Bytes per staging buffer.
    #[arg(long, value_parser = crate::parse_size, default_value = "16M")]
    staging_size: u64,
    /// Print one JSON object: bytes, seconds, bytes_per_sec, path, and every tensor with its CRC-32C
    /// read back from device memory.
    #[arg(long)]
    json: bool,
}

pub fn run(a: LoadArgs) -> Result<()> {
    let target: Target = a.device.parse()?;
    let cfg = LoaderConfig {
        staging_buffers: a.staging_buffers,
        staging_bytes: usize::try_from(a.staging_size).unwrap_or(usize::MAX),
        timeline: false,
    };
    cfg.validate()?;
    // Validate the whole file before touching the device, so a bad file never needs a GPU.
    let header = gpuio_cuda::safetensors::read_header(&a.file)?;
    let device = gpuio_cuda::open_target(target)?;
    let engine = Engine::new(EngineConfig::default())?;
    let loader = Loader::new(&engine, device.clone(), cfg)?;
    let model = loader.load_with_header(&a.file, &header)?;
    let s = &model.stats;
    if !a.json {
        println!(
            "loaded {} tensors, {} in {:.3} s ({}/s) to {} ({}) via {}: {} staging buffers of {}; {}",
            model.tensors.len(),
            gpuio::size::format_bytes(s.bytes as f64),
            s.seconds,
            gpuio::size::format_bytes(s.bytes_per_sec()),
            device.label(),
            device.description(),
            s.path.name(),
            s.staging_buffers,
            gpuio::size::format_bytes(s.staging_bytes as f64),
            loader.pin_note(),
        );
        return Ok(());
    }
    let mut tensors = Vec::with_capacity(model.tensors.len());
    for t in &model.tensors {
        let crc = model.crc32c(t)?;
        let crc_ieee = model.crc32_ieee(t)?;
        tensors.push(json!({
            "name": t.name,
            "dtype": t.dtype.name(),
            "shape": t.shape,
            "bytes": t.bytes,
            "crc32c": format!("{crc:08x}"),
            "crc32": format!("{crc_ieee:08x}"),
            "offset": t.offset,
        }));
    }
    let v = json!({
        "file": a.file.display().to_string(),
        "device": device.label(),
        "device_description": device.description(),
        "bytes": s.bytes,
        "seconds": s.seconds,
        "bytes_per_sec": s.bytes_per_sec(),
        "path": s.path.name(),
        "staging_buffers": s.staging_buffers,
        "staging_bytes": s.staging_bytes,
        "chunks": s.chunks,
        "read_wait_s": s.read_wait.as_secs_f64(),
        "copy_wait_s": s.copy_wait.as_secs_f64(),
        "pinned": loader.pin_note(),
        "tensors": tensors,
    });
    println!("{v}");
    Ok(())
}

/// `gpuio bench --target cuda:N`: one sequential pass over `region` bytes of `path`, staged into a
/// device allocation of the same size; with `compare`, fio's sequential read of the same file (the
/// disk's limit) and the ratio.
pub fn bench_device(
    path: &std::path::Path,
    region: u64,
    device: std::sync::Arc<dyn gpuio_cuda::Device>,
    staging_buffers: usize,
    compare: bool,
    json_out: bool,
) -> Result<()> {
    let cfg = LoaderConfig {
        staging_buffers,
        ..LoaderConfig::default()
    };
    let engine = Engine::new(EngineConfig::default())?;
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
        println!("{v}");
    } else {
        println!(
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
        );
    }
    Ok(())
}
