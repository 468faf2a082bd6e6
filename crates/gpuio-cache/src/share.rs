//! The share table and load completion: a line has at most one load in flight, which later misses
//! on the line join instead of issuing another (AGILE's share table), and `finish_line` hands a
//! finished load's bytes, or its error, to everyone who joined it.
//!
//! A line becomes Ready only after a successful load, once its bytes are copied to every consumer;
//! a failed load never leaves a line Ready or mapped. `finish_line` runs from load completions: it
//! must never issue I/O, never wait for I/O and never wait for another line.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use gpuio::{Error, ErrorKind, IoBuffer, Result};

use crate::cache::{make_tag, tag_parts, Backoff, Inner};
use crate::gather::{GatherShared, Piece, Pieces};
use crate::issue::IssueCtx;
use crate::stats::Shard;
use crate::{line, LineState, PageCache};

/// Who waits for a line being loaded, and where its bytes go.
struct Consumer {
    gather: Arc<GatherShared>,
    pieces: Pieces,
}

/// A load in flight on a slot: joiners add themselves here (the share table).
pub(crate) struct Loading {
    tag: u64,
    /// Usually the one gather that issued the load: inline, no allocation per miss.
    consumers: smallvec::SmallVec<[Consumer; 1]>,
}

impl PageCache {
    /// Serves, joins or issues one line for a pending gather.
    pub(crate) fn request_line(
        &self,
        ctx: &mut IssueCtx<'_>,
        shared: &Arc<GatherShared>,
        line: u64,
        pieces: &[Piece],
        shard: &Shard,
    ) -> Result<()> {
        let inner = &*self.inner;
        let s = ctx.source;
        let want = make_tag(ctx.src.0, line);
        let pte = &s.table[line as usize];
        let mut backoff = Backoff::new();
        loop {
            let e = pte.load(Ordering::Acquire);
            if e != 0 {
                let slot = &inner.slots[e as usize - 1];
                let seen = line::pin(&slot.word);
                let tag_ok = slot.tag.load(Ordering::Acquire) == want;
                if tag_ok && line::readable(seen) {
                    let p = slot.ptr.load(Ordering::Acquire);
                    shared.copy_from(p, pieces);
                    line::touch(&slot.word, seen);
                    line::unpin(&slot.word);
                    shard.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                if tag_ok && line::state(seen) == LineState::Busy {
                    let mut l = slot.loading.lock();
                    if let Some(ld) = l.as_mut().filter(|ld| ld.tag == want) {
                        shared.add_pending();
                        ld.consumers.push(Consumer {
                            gather: shared.clone(),
                            pieces: Pieces::from_slice(pieces),
                        });
                        drop(l);
                        line::unpin(&slot.word);
                        shard.misses.fetch_add(1, Ordering::Relaxed);
                        inner.counters.joined.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                }
                line::unpin(&slot.word);
                // Busy with something else (write-back, reassignment) or stale: wait and look again.
                ctx.commit()?;
                backoff.wait("read of a cache line")?;
                continue;
            }
            let i = self.allocate(ctx)?;
            let slot = &inner.slots[i];
            slot.tag.store(want, Ordering::Release);
            shared.add_pending();
            *slot.loading.lock() = Some(Loading {
                tag: want,
                consumers: smallvec::smallvec![Consumer {
                    gather: shared.clone(),
                    pieces: Pieces::from_slice(pieces),
                }],
            });
            if pte
                .compare_exchange(0, i as u32 + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                shard.misses.fetch_add(1, Ordering::Relaxed);
                ctx.add_load(i as u32, line)?;
                return Ok(());
            }
            // Someone else started this line first: give the slot back and join theirs.
            *slot.loading.lock() = None;
            shared.sub_pending();
            slot.tag.store(0, Ordering::Release);
            line::publish(&slot.word, LineState::Invalid, false);
        }
    }
}

/// Fails the loads of these slots (Busy, ours): each line becomes Invalid, its waiters get `e`.
pub(crate) fn fail_lines(inner: &Inner, slots: impl Iterator<Item = u32>, e: &Error) {
    for i in slots {
        finish_line(inner, i, Err(e.clone()), None);
    }
}

/// A load of slot `i` ended: the buffer goes back to the slot, every consumer gets its bytes (or
/// the error), and the line becomes Ready — or Invalid and unmapped on failure.
pub(crate) fn finish_line(inner: &Inner, i: u32, r: Result<()>, buf: Option<IoBuffer>) {
    let slot = &inner.slots[i as usize];
    if let Some(b) = buf {
        if let Ok(mut b) = b.into_owned() {
            slot.ptr.store(b.as_mut_ptr(), Ordering::Release);
            *slot.buf.lock() = Some(b);
        }
    }
    let loading = slot.loading.lock().take();
    let consumers = loading.map(|l| l.consumers).unwrap_or_default();
    let have_buf = slot.buf.lock().is_some();
    let r = match (r, have_buf) {
        (Ok(()), false) => Err(Error::new(
            ErrorKind::Io,
            "a cache line's buffer did not come back from the engine",
        )),
        (r, _) => r,
    };
    match r {
        Ok(()) => {
            let p = slot.ptr.load(Ordering::Acquire);
            for c in &consumers {
                c.gather.copy_from(p, &c.pieces);
            }
            // Ready before anyone is woken: a caller whose gather has completed finds its lines
            // resident. (The bytes were copied out first, so an eviction from here on is harmless.)
            line::publish(&slot.word, LineState::Ready, true);
            for c in &consumers {
                c.gather.sub_pending();
            }
        }
        Err(e) => {
            let tag = slot.tag.load(Ordering::Acquire);
            if tag != 0 {
                let (sid, line) = tag_parts(tag);
                if let Some(s) = inner.sources[sid as usize].get() {
                    let _ = s.table[line as usize].compare_exchange(
                        i + 1,
                        0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
            slot.tag.store(0, Ordering::Release);
            line::publish(&slot.word, LineState::Invalid, false);
            for c in &consumers {
                c.gather.fail(e.clone());
                c.gather.sub_pending();
            }
        }
    }
}
