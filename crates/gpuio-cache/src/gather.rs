//! Gathers: [`PageCache::gather`] and [`PageCache::prefetch`] cut a batch of ranges into per-line
//! pieces, serve resident lines at once and hand every miss to the share table; [`Gather`] is the
//! pending result (wait, poll or `.await`) and [`GatherResult`] its bytes.
//!
//! A pending gather never holds a line (each line's bytes are copied out as its load completes), and
//! dropping a `Gather` never cancels or blocks anything: its loads still complete and fill the
//! cache.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use gpuio::{Error, Result};
use parking_lot::{Condvar, Mutex};

use crate::source::Source;
use crate::spread::Helping;
use crate::stats::shard_index;
use crate::{PageCache, SourceId};

/// The pieces one line serves for one gather: almost always one (a row within a line), so they are
/// kept inline, without an allocation per miss.
pub(crate) type Pieces = smallvec::SmallVec<[Piece; 1]>;

/// One piece of a request that a line serves: bytes `[line_off, line_off + len)` of the line go to
/// `out_off` of the requester's buffer.
#[derive(Clone, Copy)]
pub(crate) struct Piece {
    line_off: u32,
    out_off: usize,
    len: u32,
}

impl PageCache {
    /// Starts loading many small ranges; returns at once with the misses in flight. Resident lines
    /// are copied now; ranges are grouped by line so that each line is loaded at most once; a line
    /// already being loaded (by anyone) is joined. `UnexpectedEof` if a range passes the end.
    ///
    /// A gather that needs more distinct missing lines than the cache has free waits, while issuing,
    /// for its own earlier loads to finish (each line's bytes are copied out as its load completes,
    /// so lines are not held while a `Gather` is pending).
    pub fn gather(&self, src: SourceId, ranges: &[(u64, usize)]) -> Result<Gather> {
        self.gather_into(src, ranges, Vec::new())
    }

    /// [`gather`](Self::gather) into `buf`'s memory: pass the bytes of an earlier result
    /// ([`GatherResult::into_bytes`]) so that a loop of gathers does not fault in fresh pages for
    /// every batch (measured: ~10 % of a BFS's CPU time).
    pub fn gather_into(
        &self,
        src: SourceId,
        ranges: &[(u64, usize)],
        buf: Vec<u8>,
    ) -> Result<Gather> {
        let s = self.source(src)?;
        self.gather_inner(src, s, ranges, true, buf)
    }

    /// Starts loading `[offset, offset + len)` into the cache (clamped to the source's end), without
    /// copying anything out; the returned `Gather` has no ranges.
    pub fn prefetch(&self, src: SourceId, offset: u64, len: u64) -> Result<Gather> {
        let s = self.source(src)?;
        let end = offset.saturating_add(len).min(s.len);
        if offset >= end {
            return Ok(Gather::ready(Vec::new(), vec![0]));
        }
        let first = offset >> self.inner.line_shift;
        let last = (end - 1) >> self.inner.line_shift;
        let lines: Vec<u64> = (first..=last).collect();
        self.load_lines(src, s, &lines)
    }

    pub(crate) fn load_lines(
        &self,
        src: SourceId,
        s: &Arc<Source>,
        lines: &[u64],
    ) -> Result<Gather> {
        let shared = GatherShared::new(Vec::new(), vec![0]);
        let misses = lines.iter().map(|&line| (line, Pieces::new())).collect();
        let r = self.issue_misses(src, s, &shared, misses);
        if let Err(e) = &r {
            shared.fail(e.clone());
        }
        shared.issued();
        r.map(|help| Gather { shared, help })
    }

    pub(crate) fn gather_inner(
        &self,
        src: SourceId,
        s: &Arc<Source>,
        ranges: &[(u64, usize)],
        count_bytes: bool,
        mut buf: Vec<u8>,
    ) -> Result<Gather> {
        let lb = self.inner.line_bytes;
        let mut bounds = Vec::with_capacity(ranges.len() + 1);
        let mut total = 0usize;
        bounds.push(0);
        for &(off, len) in ranges {
            self.check_range(s, src, off, len as u64)?;
            total = total
                .checked_add(len)
                .ok_or_else(|| Error::invalid("gather ranges overflow"))?;
            bounds.push(total);
        }
        let shard = &self.inner.shards[shard_index()];
        if count_bytes {
            shard
                .bytes_requested
                .fetch_add(total as u64, Ordering::Relaxed);
        }
        // Cut into per-line pieces, sorted by line (dedupe).
        let mut pieces: Vec<(u64, Piece)> = Vec::with_capacity(ranges.len());
        for (i, &(off, len)) in ranges.iter().enumerate() {
            let mut done = 0usize;
            while done < len {
                let pos = off + done as u64;
                let line = pos >> self.inner.line_shift;
                let loff = (pos & (lb as u64 - 1)) as usize;
                let n = (lb - loff).min(len - done);
                pieces.push((
                    line,
                    Piece {
                        line_off: loff as u32,
                        out_off: bounds[i] + done,
                        len: n as u32,
                    },
                ));
                done += n;
            }
        }
        pieces.sort_unstable_by_key(|p| p.0);
        // Pass 1: hits straight into the buffer, before it is shared.
        // Every byte of `buf[..total]` is written by exactly one piece before the gather completes,
        // so reused bytes need no zeroing; only growth is zeroed.
        if buf.len() >= total {
            buf.truncate(total);
        } else {
            buf.resize(total, 0);
        }
        let mut missing: Vec<(u64, Pieces)> = Vec::new();
        let mut i = 0;
        while i < pieces.len() {
            let line = pieces[i].0;
            let mut j = i;
            while j < pieces.len() && pieces[j].0 == line {
                j += 1;
            }
            if self.try_hit_pieces(s, src.0, line, &pieces[i..j], &mut buf) {
                shard.hits.fetch_add(1, Ordering::Relaxed);
            } else {
                missing.push((line, pieces[i..j].iter().map(|p| p.1).collect()));
            }
            i = j;
        }
        let shared = GatherShared::new(buf, bounds);
        let r = if missing.is_empty() {
            Ok(None)
        } else {
            self.issue_misses(src, s, &shared, missing)
        };
        // On an error, loads already issued finish on their own; the gather reports it.
        if let Err(e) = &r {
            shared.fail(e.clone());
        }
        shared.issued();
        r.map(|help| Gather { shared, help })
    }

    fn try_hit_pieces(
        &self,
        s: &Source,
        src: u32,
        line: u64,
        pieces: &[(u64, Piece)],
        out: &mut [u8],
    ) -> bool {
        self.with_resident(s, src, line, |p| {
            for (_, pc) in pieces {
                let dst = &mut out[pc.out_off..pc.out_off + pc.len as usize];
                // SAFETY: pinned and readable, as in try_hit_copy; the piece lies within the line.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        p.add(pc.line_off as usize),
                        dst.as_mut_ptr(),
                        dst.len(),
                    )
                };
            }
        })
    }
}

struct GState {
    buf: Vec<u8>,
    bounds: Vec<usize>,
    error: Option<Error>,
    waker: Option<Waker>,
}

/// A gather's state, shared by the threads that issue its misses and the completions that fill it.
///
/// Pieces are copied into the result without the lock: every piece has its own range of the buffer
/// (the ranges' bounds are disjoint), and the buffer is neither moved nor read until `pending` has
/// reached 0, which every copy happens before (`sub_pending` releases, the waiter acquires).
pub(crate) struct GatherShared {
    /// Lines outstanding, plus one for each thread still issuing.
    pending: AtomicUsize,
    /// `st.buf`'s bytes, fixed from `new` until `pending` is 0.
    base: BufBase,
    st: Mutex<GState>,
    done: Condvar,
}

/// The result buffer's address, handed to the threads that copy into it.
struct BufBase(*mut u8);
// SAFETY: the address is only written through by `copy_from`, into ranges no other piece touches,
// while the `Vec` it points into is kept alive and unmoved by the `GatherShared` that holds both.
unsafe impl Send for BufBase {}
// SAFETY: as for Send: shared access only ever writes disjoint ranges (see `copy_from`).
unsafe impl Sync for BufBase {}

impl GatherShared {
    fn new(mut buf: Vec<u8>, bounds: Vec<usize>) -> Arc<GatherShared> {
        Arc::new(GatherShared {
            pending: AtomicUsize::new(1),
            base: BufBase(buf.as_mut_ptr()),
            st: Mutex::new(GState {
                buf,
                bounds,
                error: None,
                waker: None,
            }),
            done: Condvar::new(),
        })
    }
    /// One more line (or issuing thread) to wait for. Only called by someone who already holds a
    /// pending count, so the count cannot reach 0 in between.
    pub(crate) fn add_pending(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn sub_pending(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        // Taking the lock orders this wake-up after a waiter's check of `pending` (made under the
        // lock), so the waiter is either not yet waiting or woken.
        let waker = self.st.lock().waker.take();
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
    fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }
    /// The issuing thread is done adding lines.
    pub(crate) fn issued(&self) {
        self.sub_pending();
    }
    pub(crate) fn fail(&self, e: Error) {
        let mut st = self.st.lock();
        if st.error.is_none() {
            st.error = Some(e);
        }
    }
    pub(crate) fn copy_from(&self, line: *const u8, pieces: &[Piece]) {
        for pc in pieces {
            // SAFETY: the caller holds the line pinned or Busy (its bytes are stable and alive) and a
            // pending count (the buffer is alive and unmoved); line_off + len <= line_bytes, and
            // out_off + len <= the buffer's length, a range that is this piece's alone.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    line.add(pc.line_off as usize),
                    self.base.0.add(pc.out_off),
                    pc.len as usize,
                )
            };
        }
    }
    fn take(&self, st: &mut GState) -> Result<GatherResult> {
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        Ok(GatherResult {
            data: std::mem::take(&mut st.buf),
            bounds: std::mem::take(&mut st.bounds),
        })
    }
}

/// A pending batch of reads: `wait()`, poll with `is_complete()`, or `.await`. Dropping it is safe
/// (its loads still complete and fill the cache).
pub struct Gather {
    shared: Arc<GatherShared>,
    /// Chunks of misses the issue helpers are draining, which `wait` helps with (see `spread`).
    help: Option<Helping>,
}

impl fmt::Debug for Gather {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gather")
            .field("complete", &self.is_complete())
            .finish()
    }
}

impl Gather {
    fn ready(buf: Vec<u8>, bounds: Vec<usize>) -> Gather {
        let shared = GatherShared::new(buf, bounds);
        shared.issued();
        Gather { shared, help: None }
    }

    /// Blocks until every range has arrived; returns them, or the first error. Misses that the
    /// cache's issue helpers have not taken yet are issued by this thread meanwhile.
    pub fn wait(mut self) -> Result<GatherResult> {
        if let Some(h) = self.help.take() {
            h.issue_rest(&self.shared);
        }
        let mut st = self.shared.st.lock();
        while self.shared.is_pending() {
            self.shared.done.wait(&mut st);
        }
        self.shared.take(&mut st)
    }

    /// Like [`wait`](Self::wait), giving up (and handing the gather back) after `timeout`.
    pub fn wait_timeout(
        self,
        timeout: Duration,
    ) -> std::result::Result<Result<GatherResult>, Gather> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.st.lock();
        while self.shared.is_pending() {
            if self.shared.done.wait_until(&mut st, deadline).timed_out()
                && self.shared.is_pending()
            {
                drop(st);
                return Err(self);
            }
        }
        let r = self.shared.take(&mut st);
        drop(st);
        Ok(r)
    }

    pub fn is_complete(&self) -> bool {
        !self.shared.is_pending()
    }
}

impl Future for Gather {
    type Output = Result<GatherResult>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.shared.st.lock();
        if self.shared.is_pending() {
            st.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(self.shared.take(&mut st))
    }
}

/// The bytes of each requested range, in request order.
#[derive(Debug, Clone, Default)]
pub struct GatherResult {
    data: Vec<u8>,
    bounds: Vec<usize>,
}

impl GatherResult {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.bounds.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes of range `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        &self.data[self.bounds[i]..self.bounds[i + 1]]
    }
    /// Copies range `i` into `out` (which must be at least as long).
    pub fn copy_to(&self, i: usize, out: &mut [u8]) {
        let b = self.get(i);
        out[..b.len()].copy_from_slice(b);
    }
    /// All ranges back to back.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }
    /// The bytes, to hand to the next [`PageCache::gather_into`].
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}
