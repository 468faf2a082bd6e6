//! Loads into host memory (`--device cpu`, `load_safetensors(device="cpu")`): which read serves
//! them best. Host memory is its own destination, so the load reads straight into it with parallel
//! `pread`s (the stand-in's direct reader, [`PathChoice::Direct`]): bytes already in memory — a file
//! warm in the page cache, or on a memory-backed filesystem — are copied once; a cold file on a disk
//! is opened with `O_DIRECT` and its pages go from the device into the destination with no copy at all
//! (the body's buffer is placed at the file's phase within a page: `Device::alloc_raw_phased`). The
//! staged path (`O_DIRECT` into staging buffers, then a copy) took 1.8–2.5 × as long on a cold file,
//! both on this machine's disk and on a RAM-backed loop device (docs/bench-runs/2026-11-28-a39bfac-load-cpu-cold,
//! docs/BENCHMARKS.md's Python section); it remains for an explicit `--path staged`.
//!
//! This module only decides; it reads nothing but the files' residency (through
//! [`gpuio::File::open`]'s automatic direct-I/O choice).

use std::path::Path;
use std::sync::Arc;

use gpuio::Result;

use crate::device::{Device, HostDevice, HostDeviceConfig};
use crate::loader::{LoaderConfig, PathChoice};

/// Whether every one of `paths` is already in memory (opened buffered by the automatic choice:
/// warm, or memory-backed, or without O_DIRECT at all): a load copies it once, from the page cache.
pub fn reads_straight_into_host(paths: &[&Path]) -> Result<bool> {
    for p in paths {
        let f = gpuio::File::open(p)?;
        if f.is_direct() && !f.is_memory_backed() {
            return Ok(false);
        }
    }
    Ok(!paths.is_empty())
}

/// The host device and loader configuration for loading `paths` into host memory with `cfg`: with
/// [`PathChoice::Direct`] or [`PathChoice::Auto`], the stand-in with its direct reader on the direct
/// path, and the reason; with [`PathChoice::Staged`] the plain stand-in and `cfg` unchanged (`None`).
pub fn host_load_plan(
    paths: &[&Path],
    cfg: LoaderConfig,
) -> Result<(Arc<dyn Device>, LoaderConfig, Option<&'static str>)> {
    match cfg.path {
        PathChoice::Direct => {
            let (device, cfg, _) = host_direct_plan(cfg);
            Ok((
                device,
                cfg,
                Some("the direct path was asked for: read straight into host memory"),
            ))
        }
        PathChoice::Auto => {
            let (device, cfg, _) = host_direct_plan(cfg);
            let why = if reads_straight_into_host(paths)? {
                "host memory is the destination and the file is already in memory: read straight into it (one copy)"
            } else {
                "host memory is the destination: read straight into it with O_DIRECT (no copy)"
            };
            Ok((device, cfg, Some(why)))
        }
        _ => {
            let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig::default()));
            Ok((device, cfg, None))
        }
    }
}

/// The host device with its direct reader, `cfg` on the direct path, and why.
pub fn host_direct_plan(cfg: LoaderConfig) -> (Arc<dyn Device>, LoaderConfig, &'static str) {
    let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig {
        direct_reads: true,
        ..HostDeviceConfig::default()
    }));
    let cfg = LoaderConfig {
        path: PathChoice::Direct,
        ..cfg
    };
    (
        device,
        cfg,
        "host memory is the destination: read straight into it",
    )
}
