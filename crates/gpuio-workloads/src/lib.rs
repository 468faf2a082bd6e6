//! `gpuio-workloads`: gpu-io's workloads as a library — the Graph500/Kronecker generator and the `.bel`
//! graph format ([`graph`]), breadth-first search over the page cache, memory or mmap ([`bfs`]) and
//! DLRM-style embedding gathers with optional prefetch ([`gather`]; on a GPU, through the device cache:
//! [`gather_gpu`]; BFS on a GPU: [`bfs::Mode::GpuCache`]).
//!
//! Each workload takes a plain config struct, checks it (the errors name the CLI flag each field comes
//! from, with its bounds, so that `gpuio` and every other front end report the same one-line messages),
//! runs, and returns a result struct holding every figure a front end shows. Long phases are reported
//! through a progress callback (`&mut dyn FnMut(Progress)`); the `*_with` variants of the entry points
//! ([`graph::generate_with`], [`bfs::bfs_with`], [`gather::gather_with`]) take one that can also stop
//! the workload ([`Flow`]): it then ends early and cleanly — outputs not written, temporaries
//! removed, reads already issued left to finish on their own — with an
//! [`ErrorKind::Cancelled`](gpuio::ErrorKind::Cancelled) error.
//!
//! What this crate must never do: print (to standard output or standard error), exit the process, read
//! flags or the environment's terminal state, or panic on bad input. Presentation — tables, JSON,
//! spinners, warnings — belongs to the front ends (the `gpuio` CLI, the Python package). Errors are
//! [`gpuio::Error`]s.

use std::ops::ControlFlow;
use std::path::PathBuf;

pub mod bfs;
pub mod cache;
pub mod gather;
pub mod gather_gpu;
pub mod graph;
pub mod rng;

/// What a workload reports while it runs; a front end may show it (a spinner) or ignore it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Progress {
    /// A phase began; the text says which, in the words a spinner shows ("generating edges").
    Phase(String),
    /// A BFS level finished: `level` levels done, `reached` vertices reached so far, `frontier`
    /// vertices in the next level's frontier.
    Level {
        level: u32,
        reached: u64,
        frontier: u64,
    },
    /// `done` of `total` units of the workload are finished: batches for `gather` (over both runs
    /// with prefetch), phases for graph generation. `done` never decreases within a run; the last
    /// report of a run that finishes has `done == total`.
    Step { done: u64, total: u64 },
    /// A temporary file left beside an output by an earlier run that did not finish (killed) was
    /// removed.
    StaleTempRemoved(PathBuf),
    /// Stale temporary files beside an output could not be looked for; the output is still written.
    StaleTempsNotRemoved(gpuio::Error),
}

/// A progress callback that ignores everything.
pub fn no_progress(_: Progress) {}

/// What a stoppable progress callback answers: `Continue(())` to go on, `Break(())` to stop the
/// workload (it returns [`ErrorKind::Cancelled`](gpuio::ErrorKind::Cancelled) as soon as it can).
pub type Flow = ControlFlow<()>;

/// A progress callback that may stop the workload (see [`Flow`]).
pub type Report<'a> = &'a mut dyn FnMut(Progress) -> Flow;

/// A callback that never stops the workload, from one that only listens.
pub(crate) fn listening(progress: &mut dyn FnMut(Progress)) -> impl FnMut(Progress) -> Flow + '_ {
    move |p| {
        progress(p);
        Flow::Continue(())
    }
}

/// Reports `p`; an error of kind `Cancelled` if the callback asked to stop.
pub(crate) fn report(progress: Report<'_>, p: Progress) -> gpuio::Result<()> {
    match progress(p) {
        Flow::Continue(()) => Ok(()),
        Flow::Break(()) => Err(gpuio::Error::new(
            gpuio::ErrorKind::Cancelled,
            "stopped by the progress callback",
        )),
    }
}

/// Removes the temporary files that killed runs left beside `output`, reporting each (or the failure to
/// look, which is not an error) through `progress`.
pub(crate) fn remove_stale_temps(
    output: &std::path::Path,
    progress: Report<'_>,
) -> gpuio::Result<()> {
    match gpuio::replace::remove_stale_temps(output) {
        Ok(removed) => {
            for p in removed {
                report(progress, Progress::StaleTempRemoved(p))?;
            }
            Ok(())
        }
        Err(e) => report(progress, Progress::StaleTempsNotRemoved(e)),
    }
}

/// Refuses an output file that is one of the workload's inputs: the same device and inode, so also
/// through a symbolic or a hard link (writing it would destroy the data being read). An output that
/// does not exist yet is fine. `flag` names the output in the message (`--depths-out`).
pub fn check_output_not_input(
    flag: &str,
    output: &std::path::Path,
    inputs: &[&std::path::Path],
) -> gpuio::Result<()> {
    use gpuio::error::Op;
    use gpuio::Error;
    use std::os::unix::fs::MetadataExt;
    let out = match std::fs::metadata(output) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::from_io(Op::Stat, &e).with_path(output)),
    };
    for input in inputs {
        let m =
            std::fs::metadata(input).map_err(|e| Error::from_io(Op::Stat, &e).with_path(input))?;
        if (m.dev(), m.ino()) == (out.dev(), out.ino()) {
            return Err(Error::invalid(format!(
                "{flag} {} is the input file {} (the same file, perhaps through a link): refusing to overwrite an input",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Major page faults of this process so far.
pub fn major_faults() -> u64 {
    // SAFETY: getrusage fills the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    ru.ru_majflt as u64
}
