//! Replacement and residency: the clock (second chance) that claims a slot for a new line, writing
//! a Modified victim back first and unmapping it, and [`PinnedLines`], which keep lines out of the
//! clock's reach.
//!
//! The clock never takes a pinned, held or Busy line, and never reuses the slot of a Modified victim
//! whose write-back failed (see `writeback.rs`); when every line is held it fails with `WouldBlock`
//! rather than wait, and any other wait is bounded by `Backoff`.

use std::fmt;
use std::sync::atomic::Ordering;

use gpuio::{Error, ErrorKind, Result};

use crate::cache::{tag_parts, Backoff};
use crate::issue::IssueCtx;
use crate::{line, LineState, PageCache, SourceId};

impl PageCache {
    /// The clock: claims a slot (Busy, ours), writing back a Modified victim first and unmapping it.
    pub(crate) fn allocate(&self, ctx: &mut IssueCtx<'_>) -> Result<usize> {
        let inner = &*self.inner;
        let n = inner.slots.len();
        let mut backoff = Backoff::new();
        loop {
            let mut held = 0usize;
            let mut wb_err: Option<Error> = None;
            for _ in 0..2 * n + 2 {
                let i = inner.hand.fetch_add(1, Ordering::Relaxed) % n;
                let slot = &inner.slots[i];
                let w = slot.word.load(Ordering::Acquire);
                if !line::claimable(w) {
                    if line::held(w) > 0 && line::active(w) == 0 {
                        held += 1;
                    }
                    continue;
                }
                if w & line::REF != 0 {
                    line::clear_ref(&slot.word);
                    continue;
                }
                let Some(prev) = line::try_claim(&slot.word) else {
                    continue;
                };
                if prev == LineState::Modified {
                    if let Err(e) = self.write_back_one(i) {
                        self.record_wb_error(&e);
                        self.write_back_failed(i);
                        wb_err = Some(e);
                        continue;
                    }
                }
                let old = slot.tag.load(Ordering::Acquire);
                if old != 0 {
                    let (osrc, oline) = tag_parts(old);
                    if let Some(os) = inner.sources[osrc as usize].get() {
                        let _ = os.table[oline as usize].compare_exchange(
                            i as u32 + 1,
                            0,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                    if prev != LineState::Invalid {
                        inner.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    slot.tag.store(0, Ordering::Release);
                }
                return Ok(i);
            }
            if let Some(e) = wb_err {
                return Err(e.with_kind(ErrorKind::Io));
            }
            if held >= n {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!("all {n} lines are pinned"),
                ));
            }
            // Lines are busy (loads or write-backs in flight): let ours go, then wait for some.
            ctx.commit()?;
            backoff.wait("cache allocation")?;
        }
    }

    /// Keeps the lines of `[offset, offset + len)` resident until the returned guard is dropped
    /// (loading them if needed). The clock never takes a held line; a cache whose lines are all held
    /// fails further misses with `WouldBlock`.
    pub fn pin(&self, src: SourceId, offset: u64, len: u64) -> Result<PinnedLines> {
        let s = self.source(src)?.clone();
        self.check_range(&s, src, offset, len)?;
        let mut guard = PinnedLines {
            cache: self.clone(),
            slots: Vec::new(),
        };
        if len == 0 {
            return Ok(guard);
        }
        let first = offset >> self.inner.line_shift;
        let last = (offset + len - 1) >> self.inner.line_shift;
        for line in first..=last {
            let mut tries = 0;
            loop {
                if let Some(slot) = self.try_hold(&s, src.0, line) {
                    guard.slots.push(slot);
                    break;
                }
                tries += 1;
                if tries > 1000 {
                    return Err(Error::new(
                        ErrorKind::WouldBlock,
                        "line was evicted before it could be held, 1000 times",
                    ));
                }
                self.load_lines(src, &s, &[line])?.wait()?;
            }
        }
        Ok(guard)
    }
}

/// Lines kept resident by [`PageCache::pin`]; released when dropped.
pub struct PinnedLines {
    cache: PageCache,
    slots: Vec<u32>,
}

impl fmt::Debug for PinnedLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedLines")
            .field("lines", &self.slots.len())
            .finish()
    }
}

impl PinnedLines {
    pub fn lines(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for PinnedLines {
    fn drop(&mut self) {
        for &i in &self.slots {
            line::release_hold(&self.cache.inner.slots[i as usize].word);
        }
    }
}
