//! `gpuio cp SRC DST`: copies a file (or a pack entry, PACK:ENTRY) through the pipeline — reads of the
//! next slots in flight while earlier ones are written, direct I/O where the filesystems allow it —
//! and replaces DST crash-safely: the copy goes to a temporary file beside DST, is fsynced, renamed
//! over DST, and the directory fsynced, so a crash leaves DST either as it was or a complete copy.
//! Temporary files left by copies that were killed are removed first.
//!
//! Never over the user's data: DST may not be SRC itself (through any link), and a write-protected
//! DST is replaced only with `--force`. A source that reports size 0 but has content (procfs, sysfs)
//! is read sequentially to its end; FIFOs, sockets and devices are refused before they are opened.

use std::path::{Path, PathBuf};

use clap::Args;
use gpuio::error::Op;
use gpuio::pipeline::FileSink;
use gpuio::size::format_bytes;
use gpuio::{Error, Result};
use serde_json::json;

use gpuio::input::{escape, escape_path, Kind};
use gpuio::replace::{InputFile, ReplaceFile};

use crate::stream::{
    check_output, open_input, probe_input, remove_stale_temps, run_pipeline,
    sequential_direct_check, setup, stats_json, PipeArgs,
};

#[derive(Args, Debug)]
pub struct CpArgs {
    /// The file to copy, or an entry of a pack as PACK:ENTRY.
    src: String,
    /// The file to write (replaced crash-safely if it exists), or an existing directory to copy into.
    dst: PathBuf,
    /// Replace DST even if it is write-protected.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    pipe: PipeArgs,
}

/// Where the copy goes: DST, or DST/NAME when DST is a directory (as `cp` does).
fn destination(dst: &Path, file_name: &str) -> Result<PathBuf> {
    let says_dir = dst.as_os_str().to_string_lossy().ends_with('/');
    if dst.is_dir() {
        if file_name.is_empty() {
            return Err(
                Error::invalid("the source has no file name to copy into a directory")
                    .with_path(dst),
            );
        }
        return Ok(dst.join(file_name));
    }
    if says_dir {
        return Err(Error::from_errno(Op::Open, libc::ENOENT).with_path(dst));
    }
    Ok(dst.to_path_buf())
}

/// Copies a file of unknown size (a pseudo-file) sequentially, to its end, into DST crash-safely.
fn copy_sequential(a: &CpArgs, probe: gpuio::input::Probe) -> Result<()> {
    let src = Path::new(&a.src);
    sequential_direct_check(src, a.pipe.direct)?;
    let file_name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dst = destination(&a.dst, &file_name)?;
    let input = InputFile {
        id: probe.id,
        name: a.src.clone(),
    };
    let existed = check_output(&[input], &dst, a.force)?;
    let stale = remove_stale_temps(&dst);
    let mut tmp = ReplaceFile::create(&dst)?;
    if !existed {
        tmp.set_mode(probe.mode & 0o777 & !gpuio::replace::process_umask());
    }
    let t = std::time::Instant::now();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
    let bytes = gpuio::input::read_sequential(src, u64::MAX, &mut |b| {
        std::io::Write::write_all(&mut out, b)
            .map_err(|e| Error::from_io(Op::Write, &e).with_path(&dst))
    })?;
    std::io::Write::flush(&mut out).map_err(|e| Error::from_io(Op::Write, &e).with_path(&dst))?;
    drop(out);
    tmp.commit()?;
    let wall = t.elapsed().as_secs_f64();
    if a.pipe.json {
        let v = json!({
            "bytes": bytes,
            "bytes_out": bytes,
            "wall_s": wall,
            "bytes_per_sec": bytes as f64 / wall.max(1e-9),
            "src": a.src,
            "dst": dst.display().to_string(),
            "sequential": true,
            "direct": { "read": false, "write": false },
            "crash_safe": true,
            "stale_temps_removed": stale.len(),
        });
        crate::report::print_json(&v)?;
    } else {
        outln!(
            "copied {} from {} to {} in {wall:.2} s (read sequentially to its end: the source reports \
             a size of 0; synced and renamed into place)",
            format_bytes(bytes as f64),
            escape(&a.src),
            escape_path(&dst),
        )?;
    }
    Ok(())
}

pub fn run(a: CpArgs) -> Result<()> {
    if let Some(p) = probe_input(&a.src)? {
        if p.kind == Kind::Pseudo {
            return copy_sequential(&a, p);
        }
    }
    let s = setup(&a.pipe)?;
    let input = open_input(&s.queue, &a.src, a.pipe.direct)?;
    let dst = destination(&a.dst, &input.file_name)?;
    let existed = check_output(&[input.as_input_file()], &dst, a.force)?;
    let stale = remove_stale_temps(&dst);
    let mut sink = FileSink::replace(&s.queue, &dst, a.pipe.direct)?;
    if !existed {
        // As cp: a new file gets the source's permissions, less the umask; an existing one keeps its own.
        sink.set_mode(input.mode & 0o777 & !gpuio::replace::process_umask());
    }
    let (src_direct, dst_direct) = (input.direct, sink.file().is_direct());
    let total = input.source.len();
    let p = s.pipeline(&a.pipe, input).sink(sink);
    let stats = run_pipeline(&a.pipe, p, total, "copying", |_| Ok(()))?;
    if a.pipe.json {
        let mut v = stats_json(&stats);
        v["src"] = json!(a.src);
        v["dst"] = json!(dst.display().to_string());
        v["direct"] = json!({ "read": src_direct, "write": dst_direct });
        v["crash_safe"] = json!(true);
        v["stale_temps_removed"] = json!(stale.len());
        crate::report::print_json(&v)?;
    } else {
        let busy = |d: std::time::Duration| d.as_secs_f64() / stats.wall.as_secs_f64().max(1e-9);
        outln!(
            "copied {} from {} to {} in {:.2} s ({}/s; read busy {:.0} %, write busy {:.0} %; {}; synced and renamed into place)",
            format_bytes(stats.bytes_in as f64),
            escape(&a.src),
            escape_path(&dst),
            stats.wall.as_secs_f64(),
            format_bytes(stats.bytes_per_sec()),
            busy(stats.read.busy) * 100.0,
            busy(stats.write.map(|w| w.busy).unwrap_or_default()) * 100.0,
            match (src_direct, dst_direct) {
                (true, true) => "direct",
                (false, false) => "buffered",
                (true, false) => "direct read, buffered write",
                (false, true) => "buffered read, direct write",
            },
        )?;
    }
    Ok(())
}
