//! `gpuio checksum FILE|PACK:ENTRY`: the CRC-32C (Castagnoli) of a file's or a pack entry's logical
//! bytes, streamed through the pipeline (the next slots are read while one is summed), printed as
//! `crc  name` like the `*sum` tools (control characters in the name escaped). A file that reports size
//! 0 but has content (procfs, sysfs) is read sequentially to its end; FIFOs, sockets and devices are
//! refused before they are opened.

use clap::Args;
use gpuio::Result;
use serde_json::json;

use crate::stream::{
    open_input, probe_input, run_pipeline, sequential_direct_check, setup, stats_json, Crc32c,
    PipeArgs,
};

#[derive(Args, Debug)]
pub struct ChecksumArgs {
    /// A file, or an entry of a pack as PACK:ENTRY.
    file: String,
    #[command(flatten)]
    pipe: PipeArgs,
}

/// The CRC-32C of a file of unknown size, read sequentially to its end.
fn checksum_sequential(a: &ChecksumArgs) -> Result<()> {
    let path = std::path::Path::new(&a.file);
    sequential_direct_check(path, a.pipe.direct)?;
    let mut crc = Crc32c::new();
    let bytes = gpuio::input::read_sequential(path, u64::MAX, &mut |b| {
        crc.update(b);
        Ok(())
    })?;
    report(
        a,
        crc.value(),
        json!({ "bytes": bytes, "sequential": true }),
    );
    Ok(())
}

fn report(a: &ChecksumArgs, crc: u32, mut v: serde_json::Value) {
    let hex = format!("{crc:08x}");
    if a.pipe.json {
        v["path"] = json!(a.file);
        v["crc32c"] = json!(hex);
        crate::report::print_json(&v);
    } else {
        println!("{hex}  {}", gpuio::input::escape(&a.file));
    }
}

pub fn run(a: ChecksumArgs) -> Result<()> {
    if let Some(p) = probe_input(&a.file)? {
        if p.kind == gpuio::input::Kind::Pseudo {
            return checksum_sequential(&a);
        }
    }
    let s = setup(&a.pipe)?;
    let input = open_input(&s.queue, &a.file, a.pipe.direct)?;
    let total = input.source.len();
    let mut crc = Crc32c::new();
    let p = s.pipeline(&a.pipe, input);
    let stats = run_pipeline(&a.pipe, p, total, "summing", |slot| {
        crc.update(slot.bytes());
        Ok(())
    })?;
    report(&a, crc.value(), stats_json(&stats));
    Ok(())
}
