//! `gpuio`: the command-line face of the gpu-io engine. Thin by design: parses flags, calls the library,
//! prints tables, JSON and progress. Every error is one line on stderr and a non-zero exit status.

#[macro_use]
mod out;

mod bench;
mod bfs;
mod cat;
mod checksum;
mod cp;
mod gather;
mod graph;
mod info;
mod load;
mod pack_cmd;
mod report;
mod rings;
mod stream;
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
    /// Show what the engine can do here and which path it picks for a file, with reasons; describe a pack.
    Info(info::InfoArgs),
    /// Write a byte range of a file or pack entry (PACK:ENTRY) to standard output.
    Cat(cat::CatArgs),
    /// Compress files into a pack of chunked entries readable at any offset.
    Pack(pack_cmd::PackArgs),
    /// Extract a pack's entries (or one with --entry).
    Unpack(pack_cmd::UnpackArgs),
    /// Check every checksum of a pack; the exit status says whether it is intact.
    Verify(pack_cmd::VerifyArgs),
    /// Generate graphs in the EMOGI/BaM .bel CSR layout (`graph gen`).
    Graph(graph::GraphArgs),
    /// Breadth-first search over a .bel graph, its edges through the page cache, RAM or mmap.
    Bfs(bfs::BfsArgs),
    /// DLRM-style embedding lookups through the page cache, optionally prefetching the next batch.
    Gather(gather::GatherArgs),
    /// Copy a file (or PACK:ENTRY) through the pipeline; DST is replaced crash-safely.
    Cp(cp::CpArgs),
    /// Stream a file through read -> compute -> write with N buffers; report each stage's busy time.
    Stream(stream::StreamArgs),
    /// CRC-32C of a file's or pack entry's bytes, streamed.
    Checksum(checksum::ChecksumArgs),
    /// Load a .safetensors file into device memory (cpu stand-in or cuda:N); report GB/s, tensors, CRCs.
    Load(load::LoadArgs),
    /// GPU kernels read FILE themselves through the request rings: random reads, and a gather through the device cache.
    Rings(rings::RingsArgs),
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored (as Rust's start-up code leaves it) while the command runs: a write to a
    // closed pipe returns EPIPE, the command stops and cleans up, and `out::exit_if_stdout_closed`
    // then ends the process as coreutils would. See out.rs.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Info(a) => info::run(a),
        Command::Cat(a) => cat::run(a),
        Command::Pack(a) => pack_cmd::pack(a),
        Command::Unpack(a) => pack_cmd::unpack(a),
        Command::Verify(a) => pack_cmd::verify(a),
        Command::Graph(a) => graph::run(a),
        Command::Bfs(a) => bfs::run(a),
        Command::Gather(a) => gather::run(a),
        Command::Cp(a) => cp::run(a),
        Command::Stream(a) => stream::run(a),
        Command::Checksum(a) => checksum::run(a),
        Command::Load(a) => load::run(a),
        Command::Rings(a) => rings::run(a),
    };
    // Every command's output is written by now; a line still buffered fails here if it fails at all.
    let result = result.and_then(|()| out::flush());
    out::exit_if_stdout_closed();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("gpuio: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A `clap` value parser for sizes with suffixes (`4K`, `1MiB`, `1G`).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    gpuio::size::parse_size(s).map_err(|e| e.to_string())
}
