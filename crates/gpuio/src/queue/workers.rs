//! Inline workers: threads that serve a committed command buffer of small memory-backed transfers
//! (see `queue::inline`) when one of them is idle, so that one application thread's reads and
//! writes of tmpfs or page-cached data run on several cores.
//!
//! Served on the committing thread alone, such transfers run at one core's copy rate, while fio's
//! io-wq workers copy on every core (docs/BENCHMARKS.md, issue 11). A committing thread hands a
//! command buffer over only when it has other command buffers of the queue outstanding (a thread
//! that commits and then waits would only pay a worker's wake-up: a 4 KiB read's latency tripled),
//! and only by claiming an idle worker first; otherwise it serves the command buffer itself, as
//! before. So a handed-over command buffer never waits behind another one (each
//! sent job has a worker that was idle when it was claimed), the channel never holds more jobs than
//! there are workers, and the committing thread never blocks here.
//!
//! A worker serves exactly as the committing thread would (`InlineJob::run`: the same decision table,
//! bounds, errors and statistics), honours a cancel that arrived before it started, and finishes the
//! command buffer; a callback that must run on the engine thread is still sent there. Workers spin
//! for [`SPIN`] after their last job before they sleep, since a wake-up costs about as much as
//! serving a small command buffer. Only command buffers of concurrent queues are handed over (a
//! serial queue's order is the engine thread's to keep), and each holds one of its queue's slots
//! while it is handed over, so `command_buffers_max` bounds them like any other.
//!
//! This module must never block a committing thread, never run a job that was not claimed, and never
//! serve anything the inline path would not serve.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::command::{Callback, CbShared, Recorded};
use super::engine::Msg;
use super::inline;
use super::IoQueue;
use crate::mem::IoBuffer;

/// How long an idle worker polls for the next job before it sleeps.
pub(crate) const SPIN: Duration = Duration::from_micros(30);
/// Most inline workers an engine starts ([`EngineConfig::inline_threads`](super::EngineConfig)).
pub const INLINE_THREADS_MAX: usize = 16;

/// A command buffer to serve with the inline path, and where its results go.
pub(crate) struct InlineJob {
    pub queue: IoQueue,
    pub shared: Arc<CbShared>,
    pub commands: Vec<Recorded>,
    pub shared_buf: Option<IoBuffer>,
    pub barriers: Vec<usize>,
    /// A callback that must run on the engine thread, sent there once the work is done.
    pub deferred: Option<Callback>,
    /// The job holds one of its queue's slots (it was handed to a worker).
    pub holds_slot: bool,
}

impl InlineJob {
    /// Serves the command buffer on this thread and finishes it.
    pub(crate) fn run(self) {
        let InlineJob {
            queue,
            shared,
            commands,
            shared_buf,
            barriers,
            deferred,
            holds_slot,
        } = self;
        let limits = *queue.engine.inline_limits();
        // A cancel can only have arrived before this point on a handed-over command buffer.
        let served = if holds_slot && shared.state.lock().cancel_requested {
            inline::skip(commands, shared_buf)
        } else {
            inline::serve(
                &limits,
                commands,
                shared_buf,
                &barriers,
                &queue.shared.stats,
            )
        };
        let status = deferred.as_ref().map(|_| served.status.clone());
        if holds_slot {
            // Before finishing, as the engine thread does: whoever sees the completion may commit again.
            queue.shared.slots.release();
        }
        shared.finish(served.status, served.outputs, served.shared_buf);
        if let (Some(f), Some(status)) = (deferred, status) {
            if let Err(returned) = queue.engine.send_or_return(Msg::RunCallback(f, status)) {
                // The engine thread is gone: the callback must still run, once.
                if let Msg::RunCallback(f, status) = *returned {
                    f(&status);
                }
            }
        }
    }
}

/// The workers of one engine: the job channel and how many of them are idle and unclaimed.
pub(crate) struct Workers {
    tx: Sender<InlineJob>,
    idle: Arc<AtomicUsize>,
    started: usize,
}

impl Workers {
    /// Starts up to `count` workers (fewer if the system refuses threads; `started` says how many).
    pub(crate) fn start(count: usize) -> Workers {
        let (tx, rx) = crossbeam_channel::bounded::<InlineJob>(count.max(1));
        let idle = Arc::new(AtomicUsize::new(0));
        let mut started = 0;
        for k in 0..count {
            let (rx, idle) = (rx.clone(), idle.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("gpuio-inline-{k}"))
                .spawn(move || work(rx, idle));
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        Workers { tx, idle, started }
    }

    pub(crate) fn started(&self) -> usize {
        self.started
    }

    /// Whether a worker is idle now (a hint: claiming may still fail).
    pub(crate) fn any_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed) > 0
    }

    /// Hands `job` to an idle worker; gives it back (`Some`) when none is idle.
    pub(crate) fn try_hand(&self, job: InlineJob) -> Option<InlineJob> {
        let claimed = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if !claimed {
            return Some(job);
        }
        // Room is certain (jobs sent never outnumber claims, nor claims workers), unless the workers
        // are gone: the job is then served by the caller.
        self.tx.try_send(job).err().map(|e| e.into_inner())
    }
}

/// A worker: marks itself idle, waits for a job (spinning first), serves it; ends when the engine's
/// side of the channel is gone.
fn work(rx: Receiver<InlineJob>, idle: Arc<AtomicUsize>) {
    loop {
        idle.fetch_add(1, Ordering::AcqRel);
        match next_job(&rx) {
            // The committing thread took this worker's idle mark when it claimed it.
            Some(job) => job.run(),
            None => return,
        }
    }
}

fn next_job(rx: &Receiver<InlineJob>) -> Option<InlineJob> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        polls += 1;
        if polls % 64 == 0 && start.elapsed() > SPIN {
            return rx.recv().ok();
        }
        std::hint::spin_loop();
    }
}
