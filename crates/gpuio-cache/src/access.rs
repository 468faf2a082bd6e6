//! Blocking byte-range access: [`PageCache::read`] and [`PageCache::write`], and the lock-free hit
//! path (pin, check the tag, copy, unpin) that gathers use too.
//!
//! The hit path never takes a lock and never copies from a line it has not pinned and seen readable
//! with the right tag; a write never touches a line's bytes without holding its WRITER bit alone
//! (or the line Busy and its own), and never extends a source. Misses go to the gather, share-table
//! and clock code: this module issues no I/O itself.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use gpuio::{Error, ErrorKind, Result};

use crate::cache::{make_tag, slot_buffer, Backoff};
use crate::issue::IssueCtx;
use crate::source::Source;
use crate::stats::shard_index;
use crate::{line, LineState, PageCache, SourceId};

impl PageCache {
    /// Copies `[offset, offset + out.len())` of `src` into `out`, loading missing lines (blocking).
    /// `UnexpectedEof` if the range passes the end of the source.
    pub fn read(&self, src: SourceId, offset: u64, out: &mut [u8]) -> Result<()> {
        let s = self.source(src)?;
        self.check_range(s, src, offset, out.len() as u64)?;
        let shard = &self.inner.shards[shard_index()];
        shard
            .bytes_requested
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        let lb = self.inner.line_bytes;
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let line = pos >> self.inner.line_shift;
            let off = (pos & (lb as u64 - 1)) as usize;
            let n = (lb - off).min(out.len() - done);
            if self.try_hit_copy(s, src.0, line, off, &mut out[done..done + n]) {
                shard.hits.fetch_add(1, Ordering::Relaxed);
                done += n;
                continue;
            }
            // A miss: gather the rest in one go (it counts its own accesses).
            let rest = (out.len() - done) as u64;
            let g = self.gather_inner(src, s, &[(pos, rest as usize)], false, Vec::new())?;
            let r = g.wait()?;
            r.copy_to(0, &mut out[done..]);
            return Ok(());
        }
        Ok(())
    }

    /// The fast path of [`Array::get`](crate::Array::get): one value of `T` at `offset`, if it lies
    /// within one resident line (counted as a hit); `None` otherwise, counting nothing, so that the
    /// caller's [`read`](Self::read) counts the access once. A fixed-size load, not a `memcpy` call:
    /// on a hit the cost is the line's pin and the load of the value (docs/BENCHMARKS.md, issue 11).
    #[inline]
    pub(crate) fn read_resident_value<T: bytemuck::Pod>(
        &self,
        src: SourceId,
        offset: u64,
    ) -> Option<T> {
        let size = std::mem::size_of::<T>();
        let s = self.source(src).ok()?;
        if offset.checked_add(size as u64)? > s.len {
            return None;
        }
        let line = offset >> self.inner.line_shift;
        let off = (offset & (self.inner.line_bytes as u64 - 1)) as usize;
        if off + size > self.inner.line_bytes {
            return None;
        }
        let mut v = None;
        let hit = self.with_resident(s, src.0, line, |p| {
            // SAFETY: as in `try_hit_copy`: the line is pinned and readable, and off + size <=
            // line_bytes was checked above; `read_unaligned` because a source offset need not be
            // aligned to `T`.
            v = Some(unsafe { std::ptr::read_unaligned(p.add(off).cast::<T>()) });
        });
        if !hit {
            return None;
        }
        let shard = &self.inner.shards[shard_index()];
        shard
            .bytes_requested
            .fetch_add(size as u64, Ordering::Relaxed);
        shard.hits.fetch_add(1, Ordering::Relaxed);
        v
    }

    /// The hit path: if `line` of `src` is resident and readable right now, pins it, runs `read` on
    /// the address of its bytes, marks it recently used, unpins it and returns `true`.
    #[inline]
    pub(crate) fn with_resident(
        &self,
        s: &Source,
        src: u32,
        line: u64,
        read: impl FnOnce(*const u8),
    ) -> bool {
        let Some(e) = s.table.get(line as usize) else {
            return false;
        };
        let e = e.load(Ordering::Acquire);
        if e == 0 {
            return false;
        }
        let slot = &self.inner.slots[e as usize - 1];
        let seen = line::pin(&slot.word);
        let ok = line::readable(seen) && slot.tag.load(Ordering::Acquire) == make_tag(src, line);
        if ok {
            read(slot.ptr.load(Ordering::Acquire).cast_const());
            line::touch(&slot.word, seen);
        }
        line::unpin(&slot.word);
        ok
    }

    /// Copies `out.len()` bytes at `off` of a resident line (see [`Self::with_resident`]).
    #[inline]
    fn try_hit_copy(&self, s: &Source, src: u32, line: u64, off: usize, out: &mut [u8]) -> bool {
        self.with_resident(s, src, line, |p| {
            // SAFETY: the slot is pinned and readable (no writer, not Busy), so its buffer lives and
            // nobody writes it; off + out.len() <= line_bytes by construction.
            unsafe { std::ptr::copy_nonoverlapping(p.add(off), out.as_mut_ptr(), out.len()) };
        })
    }

    /// Writes `data` at `offset` of `src` into the cache (write-back: lines become Modified and reach
    /// the source on eviction or [`flush`](Self::flush)). The range must lie within the source
    /// (`InvalidInput` otherwise); `PermissionDenied` on read-only sources. Lines written whole are
    /// not read first.
    pub fn write(&self, src: SourceId, offset: u64, data: &[u8]) -> Result<()> {
        let s = self.source(src)?;
        if !s.writable {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("source {} is read-only", src.0),
            )
            .with_range(offset, data.len() as u64));
        }
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > s.len)
        {
            return Err(Error::invalid(format!(
                "write of {} bytes at offset {offset} passes the end of source {} ({} bytes): the cache never extends a source",
                data.len(),
                src.0,
                s.len
            )));
        }
        let lb = self.inner.line_bytes;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let line = pos >> self.inner.line_shift;
            let off = (pos & (lb as u64 - 1)) as usize;
            let n = (lb - off).min(data.len() - done);
            self.write_line(s, src, line, off, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_line(
        &self,
        s: &Arc<Source>,
        src: SourceId,
        line: u64,
        off: usize,
        data: &[u8],
    ) -> Result<()> {
        let inner = &*self.inner;
        let want = make_tag(src.0, line);
        let whole = off == 0 && data.len() == s.line_len(line, inner.line_bytes);
        let shard = &inner.shards[shard_index()];
        let mut backoff = Backoff::new();
        let mut counted = false;
        loop {
            let pte = &s.table[line as usize];
            let e = pte.load(Ordering::Acquire);
            if e != 0 {
                let slot = &inner.slots[e as usize - 1];
                let seen = line::pin(&slot.word);
                if slot.tag.load(Ordering::Acquire) == want
                    && line::readable(seen)
                    && line::try_begin_write(&slot.word)
                {
                    {
                        // Readers that pinned before WRITER was set finish their copy; new ones
                        // back off. Both take nanoseconds, unless a reader's thread is descheduled.
                        let mut spins = 0u32;
                        while !line::writer_alone(&slot.word) {
                            spins += 1;
                            if spins < 64 {
                                std::hint::spin_loop();
                            } else {
                                std::thread::yield_now();
                            }
                        }
                        let p = slot.ptr.load(Ordering::Acquire);
                        // SAFETY: we hold WRITER and the only pin: nobody else reads or writes the
                        // bytes, and the buffer lives; off + len <= line_bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(off), data.len())
                        };
                        line::end_write(&slot.word);
                        if !counted {
                            shard.hits.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(());
                    }
                }
                line::unpin(&slot.word);
                backoff.wait("write to a cache line")?;
                continue;
            }
            if !counted {
                shard.misses.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            if whole {
                // No need to read what is overwritten whole: take a slot and fill it.
                let mut ctx = IssueCtx::new(&self.inner, s, src);
                let i = self.allocate(&mut ctx)?;
                let slot = &inner.slots[i];
                slot.tag.store(want, Ordering::Release);
                if pte
                    .compare_exchange(0, i as u32 + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let p = slot_buffer(&self.inner, slot)?;
                    // SAFETY: the slot is Busy and ours; the buffer is line_bytes long.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                    line::publish(&slot.word, LineState::Modified, true);
                    return Ok(());
                }
                slot.tag.store(0, Ordering::Release);
                line::publish(&slot.word, LineState::Invalid, false);
                continue;
            }
            // Read-modify-write: load the line, then write it as a hit.
            let g = self.load_lines(src, s, &[line])?;
            g.wait()?;
        }
    }
}
