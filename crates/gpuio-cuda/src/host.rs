//! Loads into host memory (`--device cpu`, `load_safetensors(device="cpu")`): which read serves
//! them best. Host memory is its own destination, so bytes that are already in memory — a file warm
//! in the page cache, or on a memory-backed filesystem — are read straight into it with parallel
//! `pread`s (one copy: the stand-in's direct reader, [`PathChoice::Direct`]); a cold file on a disk
//! keeps the staged path, whose deep queue of O_DIRECT reads gets more from the device than buffered
//! reads with readahead (docs/BENCHMARKS.md, issue 11 "Warm files" and the Python section).
//!
//! This module only decides; it reads nothing but the files' residency (through
//! [`gpuio::File::open`]'s automatic direct-I/O choice).

use std::path::Path;
use std::sync::Arc;

use gpuio::Result;

use crate::device::{Device, HostDevice, HostDeviceConfig};
use crate::loader::{LoaderConfig, PathChoice};

/// Whether every one of `paths` is already in memory (opened buffered by the automatic choice:
/// warm, or memory-backed, or without O_DIRECT at all), so that a load into host memory should read
/// straight into its destination.
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
/// [`PathChoice::Direct`], or [`PathChoice::Auto`] and every file in memory, the stand-in with its
/// direct reader on the direct path, and the reason; otherwise (staged, or a cold file on a disk) the
/// plain stand-in and `cfg` unchanged (`None`).
pub fn host_load_plan(
    paths: &[&Path],
    cfg: LoaderConfig,
) -> Result<(Arc<dyn Device>, LoaderConfig, Option<&'static str>)> {
    if cfg.path == PathChoice::Direct {
        let (device, cfg, _) = host_direct_plan(cfg);
        return Ok((
            device,
            cfg,
            Some("the direct path was asked for: read straight into host memory"),
        ));
    }
    if cfg.path == PathChoice::Auto && reads_straight_into_host(paths)? {
        let (device, cfg, why) = host_direct_plan(cfg);
        return Ok((device, cfg, Some(why)));
    }
    let device: Arc<dyn Device> = Arc::new(HostDevice::new(HostDeviceConfig::default()));
    Ok((device, cfg, None))
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
        "host memory is the destination and the file is already in memory: read straight into it (one copy)",
    )
}
