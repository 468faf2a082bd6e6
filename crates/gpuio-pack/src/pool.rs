//! The process-wide pool of decompression threads, one per core, made on first use and shared by every
//! pack and every load.
//!
//! Decompression never runs on the gpuio engine thread: a command buffer's completion callback (which
//! runs there) only hands the staged chunks to this pool. Jobs are short (one chunk, or the hand-off
//! of one staged read) and never block on each other, so a fixed pool cannot deadlock: the only wait a
//! job may do is `commit` on a queue, whose slots the engine frees without help from this pool.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crossbeam_channel::{unbounded, Sender};

pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

struct Pool {
    tx: Sender<Job>,
    threads: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 256);
        // Unbounded so that the engine thread never blocks handing work over; what is queued is bounded
        // by each load's staging limit (a job exists only for bytes already staged).
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("gpuio-unpack-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        // Jobs account for themselves on unwinding (see `reader::ChunkGuard`); a
                        // panicking decoder must not take a pool thread with it.
                        let _ = catch_unwind(AssertUnwindSafe(job));
                    }
                })
                .expect("spawning a decompression thread");
        }
        Pool { tx, threads }
    })
}

/// Runs `job` on the pool.
pub(crate) fn spawn(job: Job) {
    // The receivers live as long as the process, so sending cannot fail.
    let _ = pool().tx.send(job);
}

/// Threads in the decompression pool.
pub fn decode_threads() -> usize {
    pool().threads
}
