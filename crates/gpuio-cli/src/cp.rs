//! `gpuio cp SRC DST`: copies a file (or a pack entry, PACK:ENTRY) through the pipeline — reads of the
//! next slots in flight while earlier ones are written, direct I/O where the filesystems allow it —
//! and replaces DST crash-safely: the copy goes to a temporary file beside DST, is fsynced, renamed
//! over DST, and the directory fsynced, so a crash leaves DST either as it was or a complete copy.
//! Temporary files left by copies that were killed are removed first.

use std::path::{Path, PathBuf};

use clap::Args;
use gpuio::error::Op;
use gpuio::pipeline::FileSink;
use gpuio::size::format_bytes;
use gpuio::{Error, Result};
use serde_json::json;

use crate::stream::{
    check_distinct, open_input, remove_stale_temps, run_pipeline, setup, stats_json, PipeArgs,
};

#[derive(Args, Debug)]
pub struct CpArgs {
    /// The file to copy, or an entry of a pack as PACK:ENTRY.
    src: String,
    /// The file to write (replaced crash-safely if it exists), or an existing directory to copy into.
    dst: PathBuf,
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

pub fn run(a: CpArgs) -> Result<()> {
    let s = setup(&a.pipe)?;
    let input = open_input(&s.queue, &a.src, a.pipe.direct)?;
    let dst = destination(&a.dst, &input.file_name)?;
    let existed = check_distinct(&input, &dst)?;
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
        crate::report::print_json(&v);
    } else {
        for p in &stale {
            eprintln!(
                "gpuio: removed {}, left by a copy that did not finish",
                p.display()
            );
        }
        let busy = |d: std::time::Duration| d.as_secs_f64() / stats.wall.as_secs_f64().max(1e-9);
        println!(
            "copied {} from {} to {} in {:.2} s ({}/s; read busy {:.0} %, write busy {:.0} %; {}; synced and renamed into place)",
            format_bytes(stats.bytes_in as f64),
            a.src,
            dst.display(),
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
        );
    }
    Ok(())
}
