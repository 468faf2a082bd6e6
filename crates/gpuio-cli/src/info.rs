//! `gpuio info [PATH]`: what this machine's kernel allows, which backend the probe picks and why, and,
//! for a file, whether it will be read direct or buffered and why.

use std::path::PathBuf;

use clap::Args;
use gpuio::backend::{self, BackendChoice, BackendConfig};
use gpuio::{DirectMode, OpenOptions, Result};
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A file to describe (direct-I/O support, alignment, size), a pack (its entries, codecs and
    /// ratios; every chunk with --json), or one entry as PACK:ENTRY.
    path: Option<PathBuf>,
    /// Direct-I/O mode to try on PATH.
    #[arg(long, default_value = "auto")]
    direct: DirectMode,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn memlock_kib() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    lim.rlim_cur / 1024
}

fn fs_type(path: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct for a NUL-terminated path.
    let st = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    Some(match st.f_type as i64 {
        0xEF53 => "ext2/3/4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x6573_5546 => "fuse".into(),
        0x794C_7630 => "overlayfs".into(),
        other => format!("0x{other:x}"),
    })
}

/// `gpuio info PACK`: entries, codecs and ratios; with `--json` every chunk, so any chunk can be located
/// and decoded by other tools.
fn describe_pack(path: &std::path::Path, only: Option<&str>, json: bool) -> Result<()> {
    let pack = gpuio_pack::Pack::open_with(path, DirectMode::Off)?;
    if let Some(name) = only {
        pack.entry(name)?; // a clear error naming the entry if it is not there
    }
    let shown: Vec<&gpuio_pack::EntryInfo> = pack
        .entries()
        .iter()
        .filter(|e| only.is_none_or(|n| n == e.name))
        .collect();
    let entries: Vec<Value> = shown
        .iter()
        .map(|e| {
            let stored: u64 = e.chunks.iter().map(|c| c.stored_len as u64).sum();
            json!({
                "name": e.name,
                "size": e.size,
                "stored_size": stored,
                "ratio": e.size as f64 / stored.max(1) as f64,
                "codec": e.codec.name(),
                "chunk_size": e.chunk_size,
                "chunks": e.chunks.iter().map(|c| json!({
                    "logical_offset": c.logical_offset,
                    "logical_length": c.logical_len,
                    "file_offset": c.file_offset,
                    "stored_length": c.stored_len,
                    "codec": c.codec.name(),
                    "crc32c": c.crc32c_stored,
                    "crc32c_logical": c.crc32c_logical,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    if json {
        let v = json!({
            "pack": path.display().to_string(),
            "file_size": pack.file().len()?,
            "entries": entries,
        });
        crate::report::print_json(&v)?;
        return Ok(());
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "entry",
        "size",
        "stored",
        "ratio",
        "codec",
        "chunk",
        "chunks",
        "raw chunks",
    ]);
    for (e, v) in shown.iter().zip(&entries) {
        let raw = e
            .chunks
            .iter()
            .filter(|c| c.codec == gpuio_pack::Codec::None)
            .count();
        t.add_row(vec![
            e.name.clone(),
            gpuio::size::format_bytes(e.size as f64),
            gpuio::size::format_bytes(v["stored_size"].as_f64().unwrap_or(0.0)),
            format!("{:.2}", v["ratio"].as_f64().unwrap_or(0.0)),
            e.codec.name().to_string(),
            gpuio::size::format_bytes(e.chunk_size as f64),
            e.chunks.len().to_string(),
            raw.to_string(),
        ]);
    }
    outln!(
        "pack {} ({} entries)\n{t}",
        path.display(),
        pack.entries().len()
    )?;
    Ok(())
}

pub fn run(a: InfoArgs) -> Result<()> {
    if let Some(p) = &a.path {
        if gpuio_pack::Pack::is_pack(p) {
            return describe_pack(p, None, a.json);
        }
        if let Some((pack, entry)) = gpuio_pack::split_pack_path(&p.to_string_lossy()) {
            return describe_pack(&pack, Some(&entry), a.json);
        }
    }
    let probe_cfg = BackendConfig::default();
    let (_, chosen) = backend::probe(&probe_cfg)?;
    let mut engines = Vec::new();
    for (choice, name) in [
        (BackendChoice::Uring, "uring"),
        (BackendChoice::Threads, "threads"),
        (BackendChoice::Mmap, "mmap"),
    ] {
        let cfg = BackendConfig {
            choice,
            ..BackendConfig::default()
        };
        let status = match backend::probe(&cfg) {
            Ok((_, ex)) => {
                // Each backend is probed by naming it, so `backend::probe` (crates/gpuio/src/backend/
                // mod.rs) records "... chosen explicitly" first; the user chose nothing here, so that
                // line is left out and the notes describe the backend alone.
                let notes: Vec<String> = ex
                    .reasons
                    .into_iter()
                    .filter(|r| !r.ends_with("chosen explicitly"))
                    .collect();
                json!({"name": name, "available": true, "notes": notes})
            }
            Err(e) => json!({"name": name, "available": false, "why": e.to_string()}),
        };
        engines.push(status);
    }
    let mut v = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "io_uring_disabled": read_trim("/proc/sys/kernel/io_uring_disabled"),
        "memlock_kib": memlock_kib(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "backend": chosen.backend.name(),
        "reasons": chosen.reasons,
        "backends": engines,
    });
    v["gpu"] = gpu_json();
    if let Some(p) = &a.path {
        let f = OpenOptions::read().direct(a.direct).open(p)?;
        v["file"] = json!({
            "path": p.display().to_string(),
            "size": f.len()?,
            "filesystem": fs_type(p),
            "direct": f.is_direct(),
            "direct_reason": f.direct_reason(),
            "memory_resident": f.is_memory_resident(),
            "offset_align": f.align().offset_align,
            "mem_align": f.align().mem_align,
        });
    }
    if a.json {
        crate::report::print_json(&v)?;
    } else {
        out!("{}", human(&v))?;
    }
    Ok(())
}

/// The GPU section: driver, GPUs, cuFile, and which device paths work here, with reasons.
fn gpu_json() -> Value {
    let d = gpuio_cuda::cuda::driver_status();
    let mut gpus = Vec::new();
    for i in 0..d.devices {
        match gpuio_cuda::open_device(&format!("cuda:{i}")) {
            Ok(dev) => {
                let mem = dev.mem_info().ok();
                gpus.push(json!({
                    "device": dev.label(),
                    "description": dev.description(),
                    "memory_total": mem.map(|m| m.total_bytes),
                    "memory_free": mem.map(|m| m.free_bytes),
                }));
            }
            Err(e) => gpus.push(json!({"device": format!("cuda:{i}"), "error": e.to_string()})),
        }
    }
    let cf = gpuio_cuda::cufile::status();
    let gpu0 = if d.available {
        gpuio_cuda::cuda::CudaDevice::open(0).map_err(|e| e.to_string())
    } else {
        Err(d.reason.clone())
    };
    let path =
        |name: &str, works: bool, why: String| json!({"path": name, "works": works, "why": why});
    let paths = match &gpu0 {
        Err(why) => vec![
            path("staged", false, why.clone()),
            path("direct", false, cf.reasons.join("; ")),
            path("zero-copy", false, "needs a GPU (see staged)".into()),
            path("pio", false, "needs a GPU (see staged)".into()),
        ],
        Ok(g) => vec![
            path(
                "staged",
                true,
                "pinned staging buffers, copies on a copy stream (the copy engines)".into(),
            ),
            match (cf.usable, cf.nvidia_fs) {
                (true, true) => path("direct", true, "cuFile with nvidia-fs: GPUDirect Storage; --path auto takes it for O_DIRECT files".into()),
                (true, false) => path("direct", true, "cuFile in compatibility mode (nvidia-fs not loaded): bytes go through host memory, so --path auto stages instead; --path direct forces it".into()),
                (false, _) => path("direct", false, cf.reasons.join("; ")),
            },
            if g.read_only_mapping_supported() {
                path("zero-copy", true, "read-only host registration supported: files map into the GPU's address space".into())
            } else {
                path("zero-copy", false, "the GPU does not support read-only host registration (CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED = 0)".into())
            },
            match g.pio_status() {
                Ok(()) => path("pio", true, format!(
                    "the copy kernel loads; small copies use it below --pio-max (default {}: off until measured with gpuio bench --pio-sweep)",
                    gpuio_cuda::loader::PIO_MAX_BYTES_DEFAULT
                )),
                Err(why) => path("pio", false, why),
            },
        ],
    };
    let mut paths = paths;
    paths.push(path(
        "cpu",
        true,
        "host memory standing in for a device (--device cpu)".into(),
    ));
    // Request rings (issue 15) on the first GPU: can kernels reach the host region, how completions
    // are published after their data, and the line copy threshold.
    let rings = match &gpu0 {
        Ok(g) => {
            let r = gpuio_cuda::rings::rings_info(g.as_ref());
            json!({
                "device": gpuio_cuda::Device::label(g.as_ref()),
                "can_map_host_memory": r.can_map_host_memory.as_ref().ok(),
                "can_map_host_memory_error": r.can_map_host_memory.as_ref().err(),
                "completion_publisher": r.publisher.kind.name(),
                "completion_publisher_reason": r.publisher.reason,
                "pio_max_bytes": r.pio_max_bytes,
                "pio_reason": r.pio_reason,
            })
        }
        Err(_) => Value::Null,
    };
    json!({
        "rings": rings,
        "driver_available": d.available,
        "driver_version": d.version.map(|v| gpuio_cuda::cuda::fmt_version(Some(v))),
        "driver_reason": d.reason,
        "gpus": gpus,
        "cufile": {"library": cf.library, "usable": cf.usable, "nvidia_fs": cf.nvidia_fs, "reasons": cf.reasons},
        "paths": paths,
    })
}

fn human(v: &Value) -> String {
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v[k].to_string())
    };
    let mut out = format!(
        "gpu-io {}\nkernel {}, io_uring_disabled={}, RLIMIT_MEMLOCK {} KiB, {} CPUs\n\nchosen backend: {}\n",
        s("version"),
        s("kernel"),
        s("io_uring_disabled"),
        s("memlock_kib"),
        s("cpus"),
        s("backend"),
    );
    for r in v["reasons"].as_array().into_iter().flatten() {
        out.push_str(&format!("  - {}\n", r.as_str().unwrap_or_default()));
    }
    out.push_str("\nbackends:\n");
    for b in v["backends"].as_array().into_iter().flatten() {
        let name = b["name"].as_str().unwrap_or_default();
        if b["available"].as_bool() == Some(true) {
            out.push_str(&format!("  {name:8} available\n"));
        } else {
            out.push_str(&format!(
                "  {name:8} unavailable: {}\n",
                b["why"].as_str().unwrap_or_default()
            ));
        }
    }
    let g = &v["gpu"];
    out.push_str(&format!(
        "\nGPU: driver {}\n  - {}\n",
        g["driver_version"].as_str().unwrap_or("not loaded"),
        g["driver_reason"].as_str().unwrap_or_default()
    ));
    for d in g["gpus"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} {}\n",
            d["device"].as_str().unwrap_or_default(),
            d["description"]
                .as_str()
                .or(d["error"].as_str())
                .unwrap_or_default()
        ));
    }
    out.push_str("  cuFile (GPUDirect Storage):\n");
    for r in g["cufile"]["reasons"].as_array().into_iter().flatten() {
        out.push_str(&format!("    - {}\n", r.as_str().unwrap_or_default()));
    }
    out.push_str("  device paths:\n");
    for p in g["paths"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "    {:9} {}: {}\n",
            p["path"].as_str().unwrap_or_default(),
            if p["works"].as_bool() == Some(true) {
                "works"
            } else {
                "unavailable"
            },
            p["why"].as_str().unwrap_or_default()
        ));
    }
    let r = &g["rings"];
    if !r.is_null() {
        out.push_str(&format!(
            "  request rings ({}):\n    maps host memory: {}\n    completion publisher: {}: {}\n    line copies: {}\n",
            r["device"].as_str().unwrap_or_default(),
            match r["can_map_host_memory"].as_bool() {
                Some(true) => "yes (CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)".to_string(),
                Some(false) => "no (CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY = 0): kernels cannot reach the rings".to_string(),
                None => format!(
                    "unknown ({})",
                    r["can_map_host_memory_error"].as_str().unwrap_or_default()
                ),
            },
            r["completion_publisher"].as_str().unwrap_or_default(),
            r["completion_publisher_reason"].as_str().unwrap_or_default(),
            r["pio_reason"].as_str().unwrap_or_default(),
        ));
    }
    if let Some(f) = v.get("file") {
        out.push_str(&format!(
            "\nfile {} ({} bytes, {}):\n  {}\n  {}\n",
            f["path"].as_str().unwrap_or_default(),
            f["size"],
            f["filesystem"].as_str().unwrap_or("unknown filesystem"),
            f["direct_reason"].as_str().unwrap_or_default(),
            if f["memory_resident"].as_bool().unwrap_or(false) {
                "memory-resident (tmpfs, ramfs, or warm in the page cache): with io_uring, large reads go to the copy threads"
            } else {
                "not memory-resident: reads go to the device"
            },
        ));
    }
    out
}
