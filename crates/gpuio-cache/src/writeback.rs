//! Write-back: storing Modified lines to their files, one at a time when the clock evicts them and
//! all at once on [`PageCache::flush`] (in command buffers of up to 64 stores, then `fdatasync` on
//! request), and keeping failed write-backs' errors for the next flush to report.
//!
//! A failed write-back never loses a line silently: the line stays Modified for the next flush (or,
//! when its buffer was lost with a command buffer the engine refused, is dropped and the error is
//! kept). Nothing here writes to a read-only source or past a source's end.

use std::sync::atomic::Ordering;

use gpuio::{CommandId, Error, Finished, Result, Status};

use crate::cache::{slot_buffer, tag_parts, Backoff, Slot};
use crate::issue::command_result;
use crate::source::Backing;
use crate::{line, LineState, PageCache, SourceId};

impl PageCache {
    /// A write-back of slot `i` (Busy, ours) failed: the line stays Modified — unless its buffer was
    /// lost with a command buffer the engine refused, when its bytes are gone and it is dropped.
    pub(crate) fn write_back_failed(&self, i: usize) {
        let slot = &self.inner.slots[i];
        if slot.buf.lock().is_some() {
            line::publish(&slot.word, LineState::Modified, false);
            return;
        }
        let tag = slot.tag.load(Ordering::Acquire);
        if tag != 0 {
            let (sid, line) = tag_parts(tag);
            if let Some(s) = self.inner.sources[sid as usize].get() {
                let _ = s.table[line as usize].compare_exchange(
                    i as u32 + 1,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        slot.tag.store(0, Ordering::Release);
        line::publish(&slot.word, LineState::Invalid, false);
    }

    pub(crate) fn record_wb_error(&self, e: &Error) {
        let mut g = self.inner.wb_errors.lock();
        if g.0.is_none() {
            g.0 = Some(e.clone());
        }
        g.1 += 1;
    }

    /// Writes back one slot we hold Busy (blocking). The buffer comes back on failure too.
    pub(crate) fn write_back_one(&self, i: usize) -> Result<()> {
        self.write_back_many(&[i]).pop().unwrap_or(Ok(()))
    }

    /// Writes back the given slots (each Busy and ours), in command buffers of up to 64 stores.
    fn write_back_many(&self, slots: &[usize]) -> Vec<Result<()>> {
        let inner = &*self.inner;
        let mut results = Vec::with_capacity(slots.len());
        for chunk in slots.chunks(64) {
            let mut cb = inner.wb_queue.command_buffer();
            let mut ids: Vec<Option<Result<CommandId>>> = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let slot = &inner.slots[i];
                let (sid, line) = tag_parts(slot.tag.load(Ordering::Acquire));
                let r = (|| {
                    let s = inner.sources[sid as usize]
                        .get()
                        .ok_or_else(|| Error::invalid("write-back of a line with no source"))?;
                    let Backing::File(f) = &s.backing else {
                        return Err(Error::invalid("write-back to a read-only source"));
                    };
                    slot_buffer(&self.inner, slot)?;
                    let buf = slot.buf.lock().take().expect("buffer ensured");
                    let len = s.line_len(line, inner.line_bytes);
                    cb.store_range(f, line * inner.line_bytes as u64, buf, 0, len as u64)
                })();
                ids.push(Some(r));
            }
            let n_ok = ids.iter().filter(|r| matches!(r, Some(Ok(_)))).count();
            inner
                .counters
                .writes_issued
                .fetch_add(n_ok as u64, Ordering::Relaxed);
            let (status, mut fin, commit_err) = if cb.is_empty() {
                (Status::Complete, Finished::default(), None)
            } else {
                match cb.commit() {
                    Ok(c) => {
                        let (st, fin) = c.wait_parts();
                        (st, fin, None)
                    }
                    Err(e) => (Status::Complete, Finished::default(), Some(e)),
                }
            };
            for (k, &i) in chunk.iter().enumerate() {
                let r = match ids[k].take().expect("one result per slot") {
                    Err(e) => Err(e),
                    Ok(id) => {
                        if let Some(b) = fin.take_buffer(id) {
                            let mut b = b.into_owned();
                            if let Ok(b) = b.as_mut() {
                                self.inner.slots[i]
                                    .ptr
                                    .store(b.as_mut_ptr(), Ordering::Release);
                            }
                            *self.inner.slots[i].buf.lock() = b.ok();
                        }
                        match &commit_err {
                            Some(e) => Err(e.clone()),
                            None => command_result(&status, id),
                        }
                    }
                };
                results.push(r);
            }
        }
        results
    }

    /// Writes back every Modified line (and with `fsync`, `fdatasync`s every writable file source).
    /// Returns the first error of this flush, or else of a write-back that failed since the last
    /// flush (an eviction's): failed lines stay Modified and the next flush tries them again.
    pub fn flush(&self, fsync: bool) -> Result<()> {
        self.flush_filter(None, fsync)
    }

    /// Like [`flush`](Self::flush), for one source only (earlier eviction errors are reported too).
    pub fn flush_source(&self, src: SourceId, fsync: bool) -> Result<()> {
        self.source(src)?;
        self.flush_filter(Some(src.0), fsync)
    }

    fn flush_filter(&self, only: Option<u32>, fsync: bool) -> Result<()> {
        let inner = &*self.inner;
        let mut first: Option<Error> = None;
        let mut backoff = Backoff::new();
        let matches = |slot: &Slot| {
            let t = slot.tag.load(Ordering::Acquire);
            t != 0 && only.is_none_or(|s| tag_parts(t).0 == s)
        };
        let mut pending: Vec<usize> = (0..inner.slots.len())
            .filter(|&i| {
                let s = &inner.slots[i];
                line::state(s.word.load(Ordering::Acquire)) == LineState::Modified && matches(s)
            })
            .collect();
        while !pending.is_empty() {
            let mut claimed = Vec::new();
            let mut later = Vec::new();
            for &i in &pending {
                let slot = &inner.slots[i];
                let w = slot.word.load(Ordering::Acquire);
                if line::state(w) != LineState::Modified || !matches(slot) {
                    continue; // written back or evicted meanwhile
                }
                if line::try_claim_writeback(&slot.word) {
                    claimed.push(i);
                } else {
                    later.push(i);
                }
            }
            let results = self.write_back_many(&claimed);
            for (&i, r) in claimed.iter().zip(results) {
                let slot = &inner.slots[i];
                match r {
                    Ok(()) => line::publish(&slot.word, LineState::Ready, false),
                    Err(e) => {
                        self.write_back_failed(i);
                        first.get_or_insert(e);
                    }
                }
            }
            pending = later;
            if !pending.is_empty() {
                backoff.wait("flush of a cache line")?;
            }
        }
        let earlier = std::mem::take(&mut *inner.wb_errors.lock());
        if let (None, Some(e)) = (&first, earlier.0) {
            first = Some(Error::new(
                e.kind(),
                format!(
                    "{} write-back(s) failed since the last flush; first: {e}",
                    earlier.1
                ),
            ));
        }
        if fsync && first.is_none() {
            let mut cb = inner.wb_queue.command_buffer();
            for (k, s) in inner.sources.iter().enumerate() {
                let Some(s) = s.get() else { break };
                if only.is_some_and(|o| o as usize != k) || !s.writable {
                    continue;
                }
                if let Backing::File(f) = &s.backing {
                    cb.sync(f)?;
                }
            }
            if !cb.is_empty() {
                cb.commit()?.finish()?;
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
