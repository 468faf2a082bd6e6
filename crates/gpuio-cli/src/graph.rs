//! `gpuio graph gen`: flags into a [`gpuio_workloads::graph::GraphGenConfig`], the summary or JSON out.
//! The generator and the `.bel` format live in `gpuio_workloads::graph`.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use gpuio::size::format_bytes;
use gpuio::Result;
use gpuio_workloads::graph::{self as wl, GraphGenConfig};
use serde_json::json;

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[command(subcommand)]
    command: GraphCommand,
}

#[derive(Subcommand, Debug)]
enum GraphCommand {
    /// Generate a Graph500 Kronecker or uniform random graph as PREFIX.bel.col and PREFIX.bel.dst.
    ///
    /// Every generated edge is stored in both directions (undirected, as Graph500 BFS reads it);
    /// self-loops and duplicate edges are dropped, and each adjacency list is sorted.
    Gen(GenArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Graph500 Kronecker (A=0.57, B=0.19, C=0.19, D=0.05), vertex labels permuted.
    Kron,
    /// Uniform random: both endpoints of every edge drawn uniformly.
    Urand,
}

impl From<Kind> for wl::Kind {
    fn from(k: Kind) -> wl::Kind {
        match k {
            Kind::Kron => wl::Kind::Kron,
            Kind::Urand => wl::Kind::Urand,
        }
    }
}

#[derive(Args, Debug)]
pub struct GenArgs {
    /// The generator.
    #[arg(long, value_enum, default_value = "kron")]
    kind: Kind,
    /// 2^SCALE vertices (1..=30).
    #[arg(long)]
    scale: u32,
    /// Edge tuples per vertex: DEGREE·2^SCALE are generated (Graph500's edge factor).
    #[arg(long, default_value_t = 16)]
    degree: u32,
    /// Seed: the same arguments always give the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output prefix: writes PREFIX.bel.col and PREFIX.bel.dst.
    #[arg(short = 'o', long = "output", value_name = "PREFIX")]
    output: PathBuf,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
    /// Replace existing output files even if they are write-protected.
    #[arg(long)]
    force: bool,
}

pub fn run(a: GraphArgs) -> Result<()> {
    match a.command {
        GraphCommand::Gen(g) => gen(g),
    }
}

fn gen(a: GenArgs) -> Result<()> {
    let cfg = GraphGenConfig {
        kind: a.kind.into(),
        scale: a.scale,
        degree: a.degree,
        seed: a.seed,
        output: a.output.clone(),
        force: a.force,
    };
    let spinner = crate::stream::spinner(a.json);
    let r = wl::generate(&cfg, &mut |p| {
        crate::stream::show_progress(spinner.as_ref(), p)
    });
    if let Some(pb) = spinner {
        pb.finish_and_clear();
    }
    let r = r?;
    if a.json {
        let v = json!({
            "kind": r.kind.name(),
            "scale": r.scale,
            "degree": r.degree,
            "seed": r.seed,
            "vertices": r.vertices,
            "edges": r.edges,
            "generated_edges": r.generated_edges,
            "self_loops_dropped": r.self_loops_dropped,
            "duplicates_dropped": r.duplicates_dropped,
            "col": r.col.display().to_string(),
            "dst": r.dst.display().to_string(),
            "bytes": r.bytes,
            "seconds": r.seconds,
            "generate_seconds": r.generate_seconds,
            "build_seconds": r.build_seconds,
            "write_seconds": r.write_seconds,
        });
        crate::report::print_json(&v)?;
    } else {
        outln!(
            "{} scale {} degree {} seed {}: {} vertices, {} directed edges \
             ({} generated; both directions stored; {} self-loops and {} duplicates dropped)",
            r.kind.name(),
            r.scale,
            r.degree,
            r.seed,
            r.vertices,
            r.edges,
            r.generated_edges,
            r.self_loops_dropped,
            r.duplicates_dropped
        )?;
        outln!(
            "wrote {} and {} ({}) in {:.2} s (generate {:.2} s, build {:.2} s, write {:.2} s)",
            gpuio::input::escape_path(&r.col),
            gpuio::input::escape_path(&r.dst),
            format_bytes(r.bytes as f64),
            r.seconds,
            r.generate_seconds,
            r.build_seconds,
            r.write_seconds
        )?;
    }
    Ok(())
}
