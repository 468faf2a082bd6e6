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

// checksum has no compute or write stage of its own (it sums in the compute stage and writes nothing):
// the shared pipeline flags get help that says so.
#[derive(Args, Debug)]
#[command(
    mut_arg("slots", |a| a.help(
        "Slot buffers: 1 reads a slot, then sums it, one after another; 3 read the next slots while \
         one is summed"
    )),
    mut_arg("direct", |a| a.help("Direct I/O (O_DIRECT) for reading the input")),
    mut_arg("json", |a| a.help(
        "Print one JSON object (crc32c, path, and the read and sum stages' times) instead of \
         `crc  name`"
    ))
)]
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
    )
}

fn report(a: &ChecksumArgs, crc: u32, mut v: serde_json::Value) -> Result<()> {
    let hex = format!("{crc:08x}");
    if a.pipe.json {
        v["path"] = json!(a.file);
        v["crc32c"] = json!(hex);
        crate::report::print_json(&v)?;
    } else {
        outln!("{hex}  {}", gpuio::input::escape(&a.file))?;
    }
    Ok(())
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
    report(&a, crc.value(), stats_json(&stats))
}
