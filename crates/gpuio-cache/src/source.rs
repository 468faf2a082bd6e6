//! Sources and their page tables: attaching files and pack entries, finding a source by its
//! [`SourceId`], looking a line up in its table (one `AtomicU32` per line of the source: slot + 1,
//! or 0), and checking a range against the source's length.
//!
//! A source is never detached, its length never changes once attached, and its table is never
//! resized: entries are only loaded and compare-exchanged. Nothing here reads or writes a source's
//! bytes or takes a slot.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use gpuio::{Error, ErrorKind, File, Result};
use gpuio_pack::Entry;

use crate::cache::make_tag;
use crate::{line, LineState, PageCache, SOURCES_MAX, SOURCE_LINES_MAX};

/// Names a source (file or pack entry) attached to a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceId(pub(crate) u32);

impl SourceId {
    pub fn index(self) -> u32 {
        self.0
    }
}

pub(crate) enum Backing {
    File(File),
    Entry(Entry),
}

pub(crate) struct Source {
    pub(crate) backing: Backing,
    pub(crate) len: u64,
    pub(crate) writable: bool,
    /// Line number → slot + 1 (0: not resident).
    pub(crate) table: Box<[AtomicU32]>,
}

impl Source {
    pub(crate) fn line_len(&self, line: u64, line_bytes: usize) -> usize {
        let start = line * line_bytes as u64;
        (self.len - start).min(line_bytes as u64) as usize
    }
}

impl PageCache {
    fn attach(&self, backing: Backing, len: u64, writable: bool) -> Result<SourceId> {
        let lines = len.div_ceil(self.inner.line_bytes as u64);
        if lines > SOURCE_LINES_MAX {
            return Err(Error::invalid(format!(
                "source of {len} bytes has {lines} lines; the limit is {SOURCE_LINES_MAX}"
            )));
        }
        let mut next = self.inner.next_source.lock();
        if *next as usize >= SOURCES_MAX {
            return Err(Error::invalid(format!(
                "a cache takes at most {SOURCES_MAX} sources"
            )));
        }
        let table: Box<[AtomicU32]> = (0..lines).map(|_| AtomicU32::new(0)).collect();
        let id = *next;
        let _ = self.inner.sources[id as usize].set(Arc::new(Source {
            backing,
            len,
            writable,
            table,
        }));
        *next += 1;
        Ok(SourceId(id))
    }

    /// Attaches a file; writable through the cache iff the file was opened for writing. Its length
    /// is taken now and does not change (the cache never extends a file).
    pub fn attach_file(&self, file: &File) -> Result<SourceId> {
        let len = file.len()?;
        self.attach(Backing::File(file.clone()), len, file.is_writable())
    }

    /// Attaches a pack entry (read-only).
    pub fn attach_entry(&self, entry: &Entry) -> Result<SourceId> {
        self.attach(Backing::Entry(entry.clone()), entry.len(), false)
    }

    pub(crate) fn source(&self, src: SourceId) -> Result<&Arc<Source>> {
        self.inner
            .sources
            .get(src.0 as usize)
            .and_then(|s| s.get())
            .ok_or_else(|| Error::invalid(format!("source {} is not attached", src.0)))
    }

    /// The source's length in bytes (0 for an unknown source).
    pub fn len(&self, src: SourceId) -> u64 {
        self.source(src).map_or(0, |s| s.len)
    }

    /// Whether writes through the cache are allowed on `src`.
    pub fn is_writable(&self, src: SourceId) -> bool {
        self.source(src).is_ok_and(|s| s.writable)
    }

    /// The state of the line holding `offset` of `src`, if that line is in the cache (diagnostics
    /// and tests).
    pub fn resident_state(&self, src: SourceId, offset: u64) -> Option<LineState> {
        let s = self.source(src).ok()?;
        let line = offset >> self.inner.line_shift;
        let e = s.table.get(line as usize)?.load(Ordering::Acquire);
        if e == 0 {
            return None;
        }
        let slot = &self.inner.slots[e as usize - 1];
        (slot.tag.load(Ordering::Acquire) == make_tag(src.0, line))
            .then(|| line::state(slot.word.load(Ordering::Acquire)))
    }

    pub(crate) fn check_range(
        &self,
        s: &Source,
        src: SourceId,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > s.len) {
            let e = Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "source {} is {} bytes (its length when attached): cannot access {len} bytes at offset {offset}",
                    src.0, s.len
                ),
            )
            .with_range(offset, len);
            // Name what the source is: the file, or the pack and entry.
            return Err(match &s.backing {
                Backing::File(f) => e.with_path(f.path()),
                Backing::Entry(en) => e
                    .with_path(en.pack().path())
                    .with_context(format!("entry {}", en.name())),
            });
        }
        Ok(())
    }
}
