//! Gathers whose rows are handed out in place ([`PageCache::gather_held`]): each row is a slice of
//! the cache line that holds it, kept resident (a residency pin, as [`PageCache::pin`] takes) until
//! the [`HeldRows`] is dropped. Nothing is copied out of the cache: a miss costs the one copy the
//! kernel makes into the line, where [`PageCache::gather`] copies each row a second time, into its
//! result buffer — as much work again as the first for 4 KiB rows (docs/BENCHMARKS.md, issue 11,
//! step 7). BaM's array hands out references into its cache the same way.
//!
//! Only for read-only sources: a write through the cache could change a line under a reader's
//! slice, so a writable source is refused. Each range must lie inside one line. Holding a batch's
//! lines takes them out of replacement until the rows are dropped; a batch the cache cannot hold
//! fails with [`ErrorKind::WouldBlock`] (bounded retries), never waits for ever. This module never
//! hands out bytes of a line it does not hold.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use gpuio::{Error, ErrorKind, Result};

use crate::cache::make_tag;
use crate::source::Source;
use crate::stats::shard_index;
use crate::{line, Gather, PageCache, SourceId};

/// Rounds of "load the lines that were evicted before they could be held" before giving up.
const HOLD_ROUNDS: usize = 8;
/// The line index of an empty range (it holds no line).
const EMPTY: u32 = u32::MAX;

/// A gather in flight whose rows will be handed out in place: [`wait`](Self::wait) for them.
/// Dropping it releases the lines it holds (loads in flight still complete and fill the cache).
pub struct HeldGather {
    cache: PageCache,
    src: SourceId,
    source: Arc<Source>,
    /// Per range: index into `lines` ([`EMPTY`] for an empty range), offset in the line, length.
    rows: Vec<(u32, u32, u32)>,
    /// The distinct lines, ascending, and the slot holding each once held.
    lines: Vec<u64>,
    slots: Vec<Option<u32>>,
    pending: Option<Gather>,
}

impl fmt::Debug for HeldGather {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldGather")
            .field("rows", &self.rows.len())
            .field("lines", &self.lines.len())
            .finish()
    }
}

impl PageCache {
    /// Starts a gather of `ranges` of `src` (a read-only source; each range inside one line) whose
    /// rows are handed out in place, with no copy: resident lines are held at once, missing ones are
    /// loaded (in flight when this returns). `InvalidInput` for a range that crosses a line or passes
    /// the end of the source; `PermissionDenied` for a writable source.
    pub fn gather_held(&self, src: SourceId, ranges: &[(u64, usize)]) -> Result<HeldGather> {
        let s = self.source(src)?.clone();
        if s.writable {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "source {} is writable: rows are handed out in place only from read-only sources (a write could change them under the reader); use gather",
                    src.0
                ),
            ));
        }
        let shift = self.inner.line_shift;
        let mask = self.inner.line_bytes as u64 - 1;
        let mut lines: Vec<u64> = Vec::with_capacity(ranges.len());
        let mut bytes = 0u64;
        for &(off, len) in ranges {
            self.check_range(&s, src, off, len as u64)?;
            if len > 0 && (off & mask) + len as u64 > self.inner.line_bytes as u64 {
                return Err(Error::invalid(format!(
                    "range of {len} bytes at offset {off} crosses a {}-byte line: gather_held hands out rows that lie inside one line; use gather",
                    self.inner.line_bytes
                ))
                .with_range(off, len as u64));
            }
            if len > 0 {
                lines.push(off >> shift);
            }
            bytes += len as u64;
        }
        lines.sort_unstable();
        lines.dedup();
        let rows = ranges
            .iter()
            .map(|&(off, len)| {
                if len == 0 {
                    return (EMPTY, 0, 0);
                }
                let k = lines
                    .binary_search(&(off >> shift))
                    .expect("every range's line is listed");
                (k as u32, (off & mask) as u32, len as u32)
            })
            .collect();
        let shard = &self.inner.shards[shard_index()];
        shard.bytes_requested.fetch_add(bytes, Ordering::Relaxed);
        let mut g = HeldGather {
            cache: self.clone(),
            src,
            source: s,
            rows,
            slots: vec![None; lines.len()],
            lines,
            pending: None,
        };
        let mut missing = Vec::new();
        for (k, &l) in g.lines.iter().enumerate() {
            match self.try_hold(&g.source, src.0, l) {
                Some(slot) => {
                    g.slots[k] = Some(slot);
                    shard.hits.fetch_add(1, Ordering::Relaxed);
                }
                None => missing.push(l),
            }
        }
        if !missing.is_empty() {
            g.pending = Some(self.load_lines(src, &g.source, &missing)?);
        }
        Ok(g)
    }

    /// Holds `line` of source `src` if it is resident and readable now (marking it recently used):
    /// its slot. What [`PageCache::pin`] and [`PageCache::gather_held`] take.
    pub(crate) fn try_hold(&self, s: &Source, src: u32, line: u64) -> Option<u32> {
        let e = s.table.get(line as usize)?.load(Ordering::Acquire);
        if e == 0 {
            return None;
        }
        let slot = &self.inner.slots[e as usize - 1];
        let seen = line::pin(&slot.word);
        let ok = line::readable(seen) && slot.tag.load(Ordering::Acquire) == make_tag(src, line);
        if ok {
            line::hold(&slot.word);
            line::touch(&slot.word, seen);
        }
        line::unpin(&slot.word);
        ok.then_some(e - 1)
    }
}

impl HeldGather {
    /// Waits for the missing lines and holds them; the rows, or the first error. A line evicted
    /// between its load and its hold (the cache is short of unheld lines) is loaded again, up to
    /// a bound, then `WouldBlock`.
    pub fn wait(mut self) -> Result<HeldRows> {
        if let Some(g) = self.pending.take() {
            g.wait()?;
        }
        for round in 0.. {
            let missing: Vec<u64> = self
                .lines
                .iter()
                .zip(self.slots.iter_mut())
                .filter_map(|(&l, slot)| {
                    if slot.is_none() {
                        *slot = self.cache.try_hold(&self.source, self.src.0, l);
                    }
                    slot.is_none().then_some(l)
                })
                .collect();
            if missing.is_empty() {
                break;
            }
            if round == HOLD_ROUNDS {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    format!(
                        "{} of the batch's {} lines were evicted before they could be held, {HOLD_ROUNDS} times: the cache is too small for batches of this size",
                        missing.len(),
                        self.lines.len()
                    ),
                ));
            }
            self.cache
                .load_lines(self.src, &self.source, &missing)?
                .wait()?;
        }
        let slots: Vec<u32> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(|s| s.expect("every line is held"))
            .collect();
        let rows = self
            .rows
            .iter()
            .map(|&(k, off, len)| {
                if k == EMPTY {
                    return (std::ptr::NonNull::<u8>::dangling().as_ptr().cast_const(), 0);
                }
                let slot = &self.cache.inner.slots[slots[k as usize] as usize];
                // The line is held: its buffer stays in place until the hold is released.
                let p = slot.ptr.load(Ordering::Acquire);
                (p.wrapping_add(off as usize).cast_const(), len as usize)
            })
            .collect();
        Ok(HeldRows {
            cache: self.cache.clone(),
            slots,
            rows,
        })
    }
}

impl Drop for HeldGather {
    fn drop(&mut self) {
        for &slot in self.slots.iter().flatten() {
            line::release_hold(&self.cache.inner.slots[slot as usize].word);
        }
    }
}

/// The rows of a [`HeldGather`], in request order, each a slice of a held cache line; the lines are
/// released when this is dropped.
pub struct HeldRows {
    cache: PageCache,
    slots: Vec<u32>,
    rows: Vec<(*const u8, usize)>,
}

// SAFETY: the rows point into lines this value holds (never evicted, never written: the source is
// read-only) until it is dropped; it only reads them.
unsafe impl Send for HeldRows {}
// SAFETY: as above: shared access only reads.
unsafe impl Sync for HeldRows {}

impl fmt::Debug for HeldRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldRows")
            .field("rows", &self.rows.len())
            .field("lines", &self.slots.len())
            .finish()
    }
}

impl HeldRows {
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// The bytes of range `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        let (p, len) = self.rows[i];
        // SAFETY: `p..p+len` lies inside a line this value holds (checked to fit in `gather_held`),
        // which stays allocated, in place and unwritten until `self` is dropped.
        unsafe { std::slice::from_raw_parts(p, len) }
    }
    /// Lines held.
    pub fn lines(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for HeldRows {
    fn drop(&mut self) {
        for &slot in &self.slots {
            line::release_hold(&self.cache.inner.slots[slot as usize].word);
        }
    }
}
