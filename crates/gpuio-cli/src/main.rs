//! `gpuio`: the command-line face of the gpu-io engine. Thin by design: parses flags, calls the library,
//! prints tables, JSON and progress. Every error is one line on stderr and a non-zero exit status.

mod bench;
mod cat;
mod info;
mod report;
mod workload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "gpuio",
    version,
    about = "Move bytes between storage and (accelerator) memory at the speed of the hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure the engine: IOPS, bandwidth, latency and CPU, optionally against pread, mmap and fio.
    Bench(bench::BenchArgs),
    /// Show what the engine can do here and which path it picks for a file, with reasons.
    Info(info::InfoArgs),
    /// Write a byte range of a file to standard output, read through the engine.
    Cat(cat::CatArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Info(a) => info::run(a),
        Command::Cat(a) => cat::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpuio: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A `clap` value parser for sizes with suffixes (`4K`, `1MiB`, `1G`).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    gpuio::size::parse_size(s).map_err(|e| e.to_string())
}
