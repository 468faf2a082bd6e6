//! `gpuio checksum FILE|PACK:ENTRY`: the CRC-32C (Castagnoli) of a file's or a pack entry's logical
//! bytes, streamed through the pipeline (the next slots are read while one is summed), printed as
//! `crc  name` like the `*sum` tools.

use clap::Args;
use gpuio::Result;
use serde_json::json;

use crate::stream::{open_input, run_pipeline, setup, stats_json, Crc32c, PipeArgs};

#[derive(Args, Debug)]
pub struct ChecksumArgs {
    /// A file, or an entry of a pack as PACK:ENTRY.
    file: String,
    #[command(flatten)]
    pipe: PipeArgs,
}

pub fn run(a: ChecksumArgs) -> Result<()> {
    let s = setup(&a.pipe)?;
    let input = open_input(&s.queue, &a.file, a.pipe.direct)?;
    let total = input.source.len();
    let mut crc = Crc32c::new();
    let p = s.pipeline(&a.pipe, input);
    let stats = run_pipeline(&a.pipe, p, total, "summing", |slot| {
        crc.update(slot.bytes());
        Ok(())
    })?;
    let hex = format!("{:08x}", crc.value());
    if a.pipe.json {
        let mut v = stats_json(&stats);
        v["path"] = json!(a.file);
        v["crc32c"] = json!(hex);
        crate::report::print_json(&v);
    } else {
        println!("{hex}  {}", a.file);
    }
    Ok(())
}
