//! Issuing a gather's misses, from the calling thread alone or spread over the cache's issue helpers.
//!
//! A load of a small range of a memory-backed file (tmpfs, ramfs) is not handed to the engine's
//! thread: `commit` copies it on the committing thread (`gpuio::queue::inline`), so a miss-bound
//! gather of such a file runs at one core's copy rate, where fio's io-wq workers copy on every core.
//! Here the misses are cut into chunks of [`ISSUE_CHUNK_LINES`] lines that up to `issue_threads - 1`
//! helper threads take in turn ([`CacheConfig::issue_threads`]), offered the work through a bounded
//! channel (an offer that does not fit is simply not made). When at least one helper took it, the
//! gather returns at once, its misses being copied on the helpers while the caller computes, and
//! [`Gather::wait`] takes the chunks that are left itself; when none did, the calling thread issues
//! everything before returning. So a gather never depends on a helper being free, and an accepted
//! offer guarantees that every chunk is issued (a helper drains the cursor) even if nobody waits.
//!
//! A helper holds one pending count of the gather while it issues, so [`Gather::wait`] returns only
//! after every chunk was issued and every load completed; an error a helper meets is the gather's
//! error. Nothing here waits for I/O or for another thread: the only waits are those of issuing
//! itself (a free line, a bounce buffer), each bounded by [`BUSY_WAIT_MAX`].
//!
//! [`CacheConfig::issue_threads`]: crate::CacheConfig::issue_threads
//! [`Gather::wait`]: crate::Gather::wait
//! [`BUSY_WAIT_MAX`]: crate::BUSY_WAIT_MAX

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use gpuio::Result;

use crate::cache::Inner;
use crate::gather::{GatherShared, Pieces};
use crate::issue::IssueCtx;
use crate::source::{Backing, Source};
use crate::stats::shard_index;
use crate::{PageCache, SourceId, ISSUE_CHUNK_LINES, ISSUE_THREADS_MAX};

/// A gather's missing lines (each with the pieces it serves, ascending by line), cut into chunks,
/// and the cursor over the chunks.
pub(crate) struct Misses {
    lines: Vec<(u64, Pieces)>,
    /// Where each chunk starts in `lines`, and `lines.len()` last. A chunk ends at a gap between
    /// lines, so adjacent missing lines are issued by one thread and coalesced as they would be
    /// without helpers (up to [`CHUNK_LINES_MAX`] lines, where a long scan is cut anyway).
    starts: Vec<usize>,
    /// Next chunk to take.
    cursor: AtomicUsize,
    /// Set by the first thread that fails: the others take no more chunks.
    stop: AtomicBool,
}

impl Misses {
    pub(crate) fn new(lines: Vec<(u64, Pieces)>) -> Misses {
        let mut starts = vec![0];
        for i in 1..lines.len() {
            let len = i - starts[starts.len() - 1];
            let gap = lines[i].0 != lines[i - 1].0 + 1;
            if (len >= ISSUE_CHUNK_LINES && gap) || len >= CHUNK_LINES_MAX {
                starts.push(i);
            }
        }
        starts.push(lines.len());
        Misses {
            lines,
            starts,
            cursor: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }
    fn chunks(&self) -> usize {
        self.starts.len() - 1
    }
}

/// Most lines in one chunk: a run of adjacent misses longer than this is cut.
const CHUNK_LINES_MAX: usize = 4 * ISSUE_CHUNK_LINES;

/// Work offered to a helper: issue chunks of `misses` for `shared`.
pub(crate) struct IssueJob {
    cache: PageCache,
    src: SourceId,
    source: Arc<Source>,
    shared: Arc<GatherShared>,
    misses: Arc<Misses>,
}

/// A spread gather's chunks, for the thread that waits for it to help with (see `Gather::wait`).
pub(crate) struct Helping {
    cache: PageCache,
    src: SourceId,
    source: Arc<Source>,
    misses: Arc<Misses>,
}

impl Helping {
    /// Issues chunks no helper has taken yet, holding a pending count of `shared` meanwhile.
    pub(crate) fn issue_rest(self, shared: &Arc<GatherShared>) {
        shared.add_pending();
        let r = self
            .cache
            .issue_chunks(self.src, &self.source, shared, &self.misses, false);
        if let Err(e) = r {
            shared.fail(e);
        }
        shared.sub_pending();
    }
}

/// The helpers' side of the channel; dropped with the cache, which ends them.
pub(crate) type Helpers = crossbeam_channel::Sender<IssueJob>;

impl PageCache {
    /// Issues every missing line for `shared`, or starts to. Spread over helpers, the calling thread
    /// only offers the work and returns (so that an asynchronous gather overlaps its caller's
    /// compute even when each load is a copy): the helpers that took the offer drain every chunk,
    /// and [`Helping`] lets `Gather::wait` take chunks too. When no helper took it, the calling
    /// thread issues everything itself, as it does without helpers. An error met here is returned,
    /// with the lines issued so far still in flight.
    pub(crate) fn issue_misses(
        &self,
        src: SourceId,
        s: &Arc<Source>,
        shared: &Arc<GatherShared>,
        lines: Vec<(u64, Pieces)>,
    ) -> Result<Option<Helping>> {
        let misses = Misses::new(lines);
        let threads = self.issue_threads(s).min(misses.chunks());
        if threads <= 1 {
            return self
                .issue_chunks(src, s, shared, &misses, false)
                .map(|()| None);
        }
        let misses = Arc::new(misses);
        let helpers = self.helpers();
        let mut offered = 0;
        for _ in 1..threads {
            shared.add_pending();
            let job = IssueJob {
                cache: self.clone(),
                src,
                source: s.clone(),
                shared: shared.clone(),
                misses: misses.clone(),
            };
            if helpers.try_send(job).is_err() {
                // Every helper is busy with other gathers: this one goes on with fewer.
                shared.sub_pending();
                break;
            }
            offered += 1;
        }
        if offered == 0 {
            return self
                .issue_chunks(src, s, shared, &misses, false)
                .map(|()| None);
        }
        Ok(Some(Helping {
            cache: self.clone(),
            src,
            source: s.clone(),
            misses,
        }))
    }

    /// How many threads a gather of `s` may issue from.
    fn issue_threads(&self, s: &Source) -> usize {
        match self.inner.issue_threads {
            0 if !loads_copy_on_issuer(&self.inner, s) => 1,
            _ => self.inner.issue_threads_max,
        }
    }

    /// The helpers' channel, starting them on first use: one thread fewer than the most a gather of
    /// this cache issues from, and room for two offers each.
    fn helpers(&self) -> &Helpers {
        self.inner.helpers.get_or_init(|| {
            let count = self.inner.issue_threads_max.saturating_sub(1).max(1);
            let (tx, rx) = crossbeam_channel::bounded::<IssueJob>(count * 2);
            for k in 0..count {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("gpuio-cache-issue-{k}"))
                    .spawn(move || {
                        for job in rx {
                            let r = job.cache.issue_chunks(
                                job.src,
                                &job.source,
                                &job.shared,
                                &job.misses,
                                true,
                            );
                            if let Err(e) = r {
                                job.shared.fail(e);
                            }
                            job.shared.sub_pending();
                        }
                    })
                    .expect("spawn a cache issue helper");
            }
            tx
        })
    }

    /// Takes chunks of `misses` until none are left (or a thread failed), issues their lines, and
    /// commits. (Not per chunk: a run of adjacent lines that crosses into the thread's next chunk
    /// stays one read.) `helper`: counted in [`CacheStats::helper_chunks`](crate::CacheStats).
    fn issue_chunks(
        &self,
        src: SourceId,
        s: &Arc<Source>,
        shared: &Arc<GatherShared>,
        misses: &Misses,
        helper: bool,
    ) -> Result<()> {
        let shard = &self.inner.shards[shard_index()];
        let mut ctx = IssueCtx::new(&self.inner, s, src);
        while !misses.stop.load(Ordering::Relaxed) {
            let c = misses.cursor.fetch_add(1, Ordering::Relaxed);
            if c >= misses.chunks() {
                break;
            }
            let chunk = &misses.lines[misses.starts[c]..misses.starts[c + 1]];
            if helper {
                self.inner
                    .counters
                    .helper_chunks
                    .fetch_add(1, Ordering::Relaxed);
            }
            let r = chunk
                .iter()
                .try_for_each(|(line, ps)| self.request_line(&mut ctx, shared, *line, ps, shard));
            if let Err(e) = r {
                misses.stop.store(true, Ordering::Relaxed);
                // Loads already recorded are committed; they finish on their own.
                let _ = ctx.commit();
                return Err(e);
            }
        }
        ctx.commit()
            .inspect_err(|_| misses.stop.store(true, Ordering::Relaxed))
    }
}

/// Whether a load of one of `s`'s lines is a copy done by the thread that commits it: a file on a
/// memory-backed filesystem, lines no larger than the engine serves inline.
fn loads_copy_on_issuer(inner: &Inner, s: &Source) -> bool {
    match &s.backing {
        Backing::File(f) => {
            f.is_memory_backed() && inner.line_bytes <= inner.engine.config().inline_max_bytes
        }
        Backing::Entry(_) => false,
    }
}

/// Cores this process may run on, at most [`ISSUE_THREADS_MAX`] (asked once per cache: the answer
/// comes from `sched_getaffinity` and the cgroup's files).
pub(crate) fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(ISSUE_THREADS_MAX)
}
