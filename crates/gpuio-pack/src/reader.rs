//! Opening a pack and loading logical byte ranges of its entries through a gpuio command queue.
//!
//! A load walks the chunks its range touches in file order, a group at a time: a group is a run of
//! adjacent chunks (at most [`GROUP_BYTES_MAX`] of stored bytes, or one larger chunk) read with one
//! command into a staging buffer. The command's completion callback, on the engine thread, only hands
//! the staged group to the decompression pool ([`crate::pool`]); there up to one job per pool thread
//! takes the group's chunks in turn, and for each checks the CRC-32C of the stored bytes, decodes
//! straight into the destination (or, for a chunk only partly inside the range, into a per-thread
//! scratch buffer, then copies the wanted part), and checks the CRC-32C of the result. A load keeps at
//! most [`STAGING_BYTES_MAX`] staged at once: when a group has been decoded its staging buffer goes
//! back to the recycler ([`crate::staging`]) and the next group is read, so a load of any size streams.
//!
//! A load completes only when no read and no job of it is still running, so nothing touches the
//! destination after completion — what lets `read_at` lend a plain `&mut [u8]`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use gpuio::error::Op;
use gpuio::{
    AlignedBuf, Completion, DirectMode, Error, ErrorKind, File, IoBuffer, IoQueue, OpenOptions,
    Result,
};
use parking_lot::{Condvar, Mutex};

use crate::codec::{self, Codec};
use crate::format::{self, crc32c, ChunkInfo, EntryInfo, Fault, Header};
use crate::{pool, staging};

/// Most stored bytes one read of adjacent chunks covers (a single larger chunk is read alone).
pub const GROUP_BYTES_MAX: u64 = 4 << 20;
/// Most bytes one load keeps staged (read and not yet decoded) at once.
pub const STAGING_BYTES_MAX: u64 = 64 << 20;
/// Per-thread scratch buffers larger than this are freed after use rather than kept.
const SCRATCH_KEEP_MAX: usize = 64 << 20;

struct PackInner {
    path: PathBuf,
    file: File,
    header: Header,
    entries: Vec<EntryInfo>,
    by_name: HashMap<String, usize>,
    /// Global index of each entry's first chunk, plus the total at the end.
    chunk_base: Vec<u64>,
}

/// An opened pack: its validated entry table and the file, ready to load from. Cheap to clone.
#[derive(Clone)]
pub struct Pack(Arc<PackInner>);

impl fmt::Debug for Pack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pack")
            .field("path", &self.0.path)
            .field("entries", &self.0.entries.len())
            .field("direct", &self.0.file.is_direct())
            .finish()
    }
}

impl Pack {
    /// Opens and validates a pack (direct I/O when the filesystem allows it).
    pub fn open(path: impl AsRef<Path>) -> Result<Pack> {
        Pack::open_with(path, DirectMode::Auto)
    }

    /// Opens and validates a pack with the given direct-I/O mode. Every structural rule of the format is
    /// checked here; a file that is not a pack, is truncated, or has a damaged or absurd header or
    /// table fails with an error naming the path and the byte offset of the bad field.
    pub fn open_with(path: impl AsRef<Path>, direct: DirectMode) -> Result<Pack> {
        let path = path.as_ref();
        let file = OpenOptions::read().direct(direct).open(path)?;
        let actual_len = file.len()?;
        // SAFETY: `file` keeps this descriptor open for the whole of this function; we only duplicate it.
        let fd = unsafe { BorrowedFd::borrow_raw(file.buffered_fd()) };
        let meta_file = std::fs::File::from(
            fd.try_clone_to_owned()
                .map_err(|e| Error::from_io(Op::Open, &e).with_path(path))?,
        );
        let mut read_at = |offset: u64, buf: &mut [u8]| -> Result<()> {
            meta_file.read_exact_at(buf, offset).map_err(|e| {
                let err = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::new(
                        ErrorKind::Corrupt,
                        "pack is shorter than it was a moment ago",
                    )
                } else {
                    Error::from_io(Op::Read, &e)
                };
                err.with_op(Op::Read)
                    .with_path(path)
                    .with_range(offset, buf.len() as u64)
            })
        };
        let fault = Fault { path };
        let header = format::parse_header(&fault, actual_len, &mut read_at)?;
        // Bounded: the header check made table_len <= TABLE_LEN_MAX and table_offset + table_len equal
        // to the real file length.
        let mut table = vec![0u8; header.table_len as usize];
        read_at(header.table_offset, &mut table)?;
        let entries = format::parse_table(&fault, &header, &table)?;
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        let mut chunk_base = Vec::with_capacity(entries.len() + 1);
        let mut total = 0u64;
        for e in &entries {
            chunk_base.push(total);
            total += e.chunks.len() as u64;
        }
        chunk_base.push(total);
        Ok(Pack(Arc::new(PackInner {
            path: path.to_path_buf(),
            file,
            header,
            entries,
            by_name,
            chunk_base,
        })))
    }

    /// Whether `path` starts with the pack magic: a cheap check, `false` on any error. Never blocks:
    /// only a regular file is opened (a FIFO is not).
    pub fn is_pack(path: &Path) -> bool {
        Pack::probe_magic(path).unwrap_or(false)
    }

    /// Whether `path` is a regular file that starts with the pack magic; an error when it is a regular
    /// file that cannot be read (permission denied, I/O error), so that a caller can say why.
    pub fn probe_magic(path: &Path) -> Result<bool> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::from_io(Op::Stat, &e).with_path(path))?;
        if !meta.is_file() {
            return Ok(false);
        }
        let f = gpuio::input::open_nonblocking(path)?;
        let mut magic = [0u8; 8];
        match f.read_exact_at(&mut magic, 0) {
            Ok(()) => Ok(format::has_magic(&magic)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(Error::from_io(Op::Read, &e)
                .with_path(path)
                .with_range(0, 8)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }
    /// The open pack file (for `direct_reason()` and the like).
    pub fn file(&self) -> &File {
        &self.0.file
    }
    pub fn entries(&self) -> &[EntryInfo] {
        &self.0.entries
    }
    /// The format version of this pack.
    pub fn version(&self) -> u32 {
        self.0.header.version
    }
    /// The alignment of chunk payloads in the file.
    pub fn align(&self) -> u32 {
        self.0.header.align
    }
    /// The pack file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.0.header.file_len
    }
    /// Logical bytes of all entries.
    pub fn logical_bytes(&self) -> u64 {
        self.0.entries.iter().map(|e| e.size).sum()
    }

    /// The entry called `name`; a `NotFound` error listing a few names if there is none.
    pub fn entry(&self, name: &str) -> Result<Entry> {
        match self.0.by_name.get(name) {
            Some(&index) => Ok(Entry {
                pack: self.clone(),
                index,
            }),
            None => {
                let names: Vec<&str> = self
                    .0
                    .entries
                    .iter()
                    .take(5)
                    .map(|e| e.name.as_str())
                    .collect();
                let n = self.0.entries.len();
                let listed = if n == 0 {
                    "it has no entries".to_string()
                } else if n <= names.len() {
                    format!("its entries: {}", names.join(", "))
                } else {
                    format!("its entries: {}, ... ({n} in all)", names.join(", "))
                };
                Err(Error::new(
                    ErrorKind::NotFound,
                    format!("no entry '{name}' in this pack ({listed})"),
                )
                .with_op(Op::Open)
                .with_path(&self.0.path))
            }
        }
    }

    /// The entry at `index` in the table.
    pub fn entry_at(&self, index: usize) -> Option<Entry> {
        (index < self.0.entries.len()).then(|| Entry {
            pack: self.clone(),
            index,
        })
    }

    /// Reads the whole pack through `queue` and checks everything a reader relies on: each chunk's
    /// stored bytes and decoded bytes against their CRC-32C, and that every byte between payloads
    /// (alignment padding) is zero — so that any damaged byte of the file is reported. Returns the
    /// list of `Corrupt` errors (empty: intact); an I/O failure is returned as `Err`.
    /// `progress(done_logical_bytes, total_logical_bytes)` is called from this thread now and then.
    pub fn verify(
        &self,
        queue: &IoQueue,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<Error>> {
        let total = self.logical_bytes();
        progress(0, total);
        let shared = LoadShared::new(self.clone(), queue.clone(), Target::Verify, true, None);
        shared.pump();
        loop {
            let finished = {
                let mut s = shared.sched.lock();
                if !s.finished {
                    shared.done.wait_for(&mut s, Duration::from_millis(50));
                }
                s.finished
            };
            progress(shared.logical_done.load(Ordering::Relaxed), total);
            if finished {
                break;
            }
        }
        let errors = std::mem::take(&mut shared.sched.lock().errors);
        if let Some(e) = errors.iter().find(|e| e.kind() != ErrorKind::Corrupt) {
            return Err(e.clone());
        }
        Ok(errors)
    }
}

/// One entry of a pack, ready to load from. Cheap to clone.
#[derive(Clone)]
pub struct Entry {
    pack: Pack,
    index: usize,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("pack", &self.pack.path())
            .field("name", &self.name())
            .field("len", &self.len())
            .finish()
    }
}

impl Entry {
    pub fn info(&self) -> &EntryInfo {
        &self.pack.0.entries[self.index]
    }
    pub fn name(&self) -> &str {
        &self.info().name
    }
    /// Logical size in bytes.
    pub fn len(&self) -> u64 {
        self.info().size
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn pack(&self) -> &Pack {
        &self.pack
    }

    /// Loads logical bytes `[offset, offset + buf.len())` of the entry into `buf` through `queue`:
    /// reads only the chunks the range touches (adjacent chunks coalesced into one read),
    /// decompresses them in parallel straight into `buf`, and checks both CRCs of every chunk. A range
    /// past the end completes with `UnexpectedEof`; a damaged chunk with `Corrupt` naming the pack,
    /// entry, chunk and file offset — never with wrong bytes.
    pub fn load(&self, queue: &IoQueue, offset: u64, buf: impl Into<IoBuffer>) -> Result<PackLoad> {
        let buf = buf.into();
        let len = buf.len() as u64;
        self.load_range(queue, offset, buf, 0, len)
    }

    /// Like [`load`](Self::load), into `buf[buf_offset..buf_offset + len]` (the rest of `buf` is left
    /// as it was).
    pub fn load_range(
        &self,
        queue: &IoQueue,
        offset: u64,
        buf: impl Into<IoBuffer>,
        buf_offset: usize,
        len: u64,
    ) -> Result<PackLoad> {
        let mut buf = buf.into();
        if (buf_offset as u64)
            .checked_add(len)
            .is_none_or(|end| end > buf.len() as u64)
        {
            return Err(self.range_error(
                ErrorKind::InvalidInput,
                offset,
                len,
                format!(
                    "buffer range {buf_offset}+{len} exceeds the buffer's {} bytes",
                    buf.len()
                ),
            ));
        }
        let dest = SendPtr(buf.as_aligned_mut().as_mut_ptr().wrapping_add(buf_offset));
        self.start(queue, offset, len, dest, Some(buf))
    }

    /// Reads logical bytes `[offset, offset + out.len())` into `out`, blocking until done. On error the
    /// contents of `out` are unspecified.
    pub fn read_at(&self, queue: &IoQueue, offset: u64, out: &mut [u8]) -> Result<()> {
        let load = self.start(
            queue,
            offset,
            out.len() as u64,
            SendPtr(out.as_mut_ptr()),
            None,
        )?;
        // `wait_parts` returns only once no read or job of the load is running, so nothing writes
        // through the pointer into `out` after this function returns.
        load.wait_parts().0
    }

    fn range_error(&self, kind: ErrorKind, offset: u64, len: u64, msg: impl fmt::Display) -> Error {
        Error::new(kind, format!("entry '{}': {msg}", self.name()))
            .with_op(Op::Read)
            .with_path(self.pack.path())
            .with_range(offset, len)
    }

    fn start(
        &self,
        queue: &IoQueue,
        offset: u64,
        len: u64,
        dest: SendPtr,
        holder: Option<IoBuffer>,
    ) -> Result<PackLoad> {
        let Some(end) = offset.checked_add(len) else {
            return Err(self.range_error(
                ErrorKind::InvalidInput,
                offset,
                len,
                "offset + length overflows",
            ));
        };
        let target = Target::Range {
            entry: self.index,
            start: offset,
            end,
            dest,
        };
        let shared = LoadShared::new(self.pack.clone(), queue.clone(), target, false, holder);
        if end > self.len() {
            let e = self.range_error(
                ErrorKind::UnexpectedEof,
                offset,
                len,
                format!(
                    "the entry is {} bytes: cannot load {len} bytes at offset {offset}",
                    self.len()
                ),
            );
            shared.record_error(e);
        }
        shared.pump();
        Ok(PackLoad { shared })
    }
}

/// A pending load: wait for it, poll it, or `.await` it.
pub struct PackLoad {
    shared: Arc<LoadShared>,
}

impl fmt::Debug for PackLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PackLoad")
            .field("complete", &self.is_complete())
            .finish()
    }
}

impl PackLoad {
    /// Blocks until the load is complete; returns the buffer holding the logical bytes, or the first
    /// error.
    pub fn wait(self) -> Result<IoBuffer> {
        let (result, buf) = self.wait_parts();
        result?;
        buf.ok_or_else(|| Error::invalid("the load's buffer was already taken"))
    }

    /// Blocks until the load is complete; returns its result and the buffer (also on error, to be
    /// reused: its contents are then unspecified). The buffer is `None` for `read_at`.
    pub fn wait_parts(self) -> (Result<()>, Option<IoBuffer>) {
        let mut s = self.shared.sched.lock();
        while !s.finished {
            self.shared.done.wait(&mut s);
        }
        s.take_result()
    }

    pub fn is_complete(&self) -> bool {
        self.shared.sched.lock().finished
    }

    /// Blocks until the load is complete, leaving the result in place (for [`stats`](Self::stats)).
    pub fn wait_complete(&self) {
        let mut s = self.shared.sched.lock();
        while !s.finished {
            self.shared.done.wait(&mut s);
        }
    }

    /// What the load has done so far (all of it once complete).
    pub fn stats(&self) -> LoadStats {
        let s = self.shared.sched.lock();
        LoadStats {
            reads: s.reads,
            bytes_read: s.bytes_read,
            logical_bytes: self.shared.logical_done.load(Ordering::Relaxed),
            staged_peak_bytes: s.staged_peak,
        }
    }
}

/// Counters of one load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Reads issued (each a run of adjacent chunks).
    pub reads: u64,
    /// Bytes those reads covered in the pack file.
    pub bytes_read: u64,
    /// Logical bytes delivered.
    pub logical_bytes: u64,
    /// Most bytes staged (read, not yet decoded) at once.
    pub staged_peak_bytes: u64,
}

impl Future for PackLoad {
    type Output = Result<IoBuffer>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<IoBuffer>> {
        let mut s = self.shared.sched.lock();
        if !s.finished {
            s.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let (result, buf) = s.take_result();
        Poll::Ready(result.and_then(|()| {
            buf.ok_or_else(|| Error::invalid("the load's buffer was already taken"))
        }))
    }
}

// ---------------------------------------------------------------------------------------------------
// The machinery.

/// A pointer into the destination of a load.
#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: the pointer names memory that the load owns (its `IoBuffer`) or borrows for its whole
// duration (`read_at` blocks until completion); jobs write disjoint ranges of it, each range once.
unsafe impl Send for SendPtr {}
// SAFETY: as above; shared references to a SendPtr only copy the address.
unsafe impl Sync for SendPtr {}

enum Target {
    /// Logical bytes `[start, end)` of entry `entry` into `dest`.
    Range {
        entry: usize,
        start: u64,
        end: u64,
        dest: SendPtr,
    },
    /// Every chunk and every padding byte of the pack, checked and discarded.
    Verify,
}

struct Sched {
    /// Next chunk to plan: an index within the entry (Range) or a global index (Verify).
    next: u64,
    /// Verify of a pack without chunks: the padding between header and table is still to check.
    empty_region_pending: bool,
    staged: u64,
    staged_peak: u64,
    reads: u64,
    bytes_read: u64,
    active: usize,
    finished: bool,
    errors: Vec<Error>,
    holder: Option<IoBuffer>,
    taken: bool,
    waker: Option<Waker>,
}

impl Sched {
    fn take_result(&mut self) -> (Result<()>, Option<IoBuffer>) {
        if self.taken {
            return (
                Err(Error::invalid("the load's result was already taken")),
                None,
            );
        }
        self.taken = true;
        let buf = self.holder.take();
        match self.errors.first() {
            Some(e) => (Err(e.clone()), buf),
            None => (Ok(()), buf),
        }
    }
}

struct LoadShared {
    pack: Pack,
    queue: IoQueue,
    target: Target,
    /// Verify: keep going after errors and report them all.
    collect_all: bool,
    /// Set on the first error of a load: queued chunk jobs skip their work.
    stopping: AtomicBool,
    logical_done: AtomicU64,
    sched: Mutex<Sched>,
    done: Condvar,
}

/// A planned read: a run of adjacent chunks.
struct Group {
    read_offset: u64,
    read_len: usize,
    /// First chunk (entry-local for Range, global for Verify) and how many.
    first: u64,
    count: u64,
    /// Verify: the file range this group vouches for (chunks and the padding around them).
    cover: (u64, u64),
}

impl LoadShared {
    fn new(
        pack: Pack,
        queue: IoQueue,
        target: Target,
        collect_all: bool,
        holder: Option<IoBuffer>,
    ) -> Arc<LoadShared> {
        let next = match &target {
            Target::Range {
                entry, start, end, ..
            } if end > start => *start / pack.0.entries[*entry].chunk_size as u64,
            _ => 0,
        };
        // Start the decompression pool here rather than in the first completion callback, which runs
        // on the engine thread.
        pool::decode_threads();
        let empty_region_pending = matches!(target, Target::Verify)
            && pack.0.chunk_base.last() == Some(&0)
            && pack.0.header.table_offset > pack.0.header.header_len as u64;
        Arc::new(LoadShared {
            pack,
            queue,
            target,
            collect_all,
            stopping: AtomicBool::new(false),
            logical_done: AtomicU64::new(0),
            sched: Mutex::new(Sched {
                next,
                empty_region_pending,
                staged: 0,
                staged_peak: 0,
                reads: 0,
                bytes_read: 0,
                active: 0,
                finished: false,
                errors: Vec::new(),
                holder,
                taken: false,
                waker: None,
            }),
            done: Condvar::new(),
        })
    }

    /// The chunk with index `k` (entry-local for Range, global for Verify): entry index, chunk index.
    fn locate(&self, k: u64) -> (usize, usize) {
        match self.target {
            Target::Range { entry, .. } => (entry, k as usize),
            Target::Verify => {
                let base = &self.pack.0.chunk_base;
                // The last entry whose first chunk is <= k and that has chunks.
                let e = base.partition_point(|&b| b <= k) - 1;
                (e, (k - base[e]) as usize)
            }
        }
    }

    fn chunk(&self, k: u64) -> (&EntryInfo, usize, &ChunkInfo) {
        let (e, c) = self.locate(k);
        let entry = &self.pack.0.entries[e];
        (entry, c, &entry.chunks[c])
    }

    /// Index one past the last chunk this load needs.
    fn end_index(&self) -> u64 {
        match self.target {
            Target::Range {
                entry, start, end, ..
            } => {
                if end <= start {
                    return 0;
                }
                let cs = self.pack.0.entries[entry].chunk_size as u64;
                (end - 1) / cs + 1
            }
            Target::Verify => *self.pack.0.chunk_base.last().expect("total"),
        }
    }

    /// The next group to read, from the cursor in `s`, or `None` if every chunk has been planned.
    fn plan_next(&self, s: &Sched) -> Option<Group> {
        let h = &self.pack.0.header;
        let end = self.end_index();
        // Widen a read to whole direct-I/O blocks (within the file) so that it needs no bounce buffer.
        let file = &self.pack.0.file;
        let widen = |lo: u64, hi: u64| {
            if file.is_direct() {
                let a = (file.align().offset_align as u64).max(512);
                (
                    lo / a * a,
                    format::align_up(hi, a as u32).unwrap_or(hi).min(h.file_len),
                )
            } else {
                (lo, hi)
            }
        };
        let (lo, hi, first, count) = if s.next >= end {
            if !s.empty_region_pending {
                return None;
            }
            (h.header_len as u64, h.table_offset, 0, 0)
        } else {
            let first = s.next;
            let (_, _, c0) = self.chunk(first);
            let start = c0.file_offset;
            let mut k = first + 1;
            let mut stop = c0.file_offset + c0.stored_len as u64;
            while k < end {
                let (_, _, c) = self.chunk(k);
                let e = c.file_offset + c.stored_len as u64;
                let (rlo, rhi) = widen(start, e);
                if rhi - rlo > GROUP_BYTES_MAX {
                    break;
                }
                stop = e;
                k += 1;
            }
            match self.target {
                Target::Range { .. } => (start, stop, first, k - first),
                Target::Verify => {
                    let lo = if first == 0 {
                        h.header_len as u64
                    } else {
                        start
                    };
                    let hi = if k < end {
                        self.chunk(k).2.file_offset
                    } else {
                        h.table_offset
                    };
                    (lo, hi, first, k - first)
                }
            }
        };
        let (rlo, rhi) = widen(lo, hi);
        Some(Group {
            read_offset: rlo,
            read_len: (rhi - rlo) as usize,
            first,
            count,
            cover: (lo, hi),
        })
    }

    /// Keeps `e` (a load keeps the first error, verify every corrupt chunk). Any error of a load, and an
    /// error other than corruption during verify (an I/O failure), stops planning further reads.
    fn record_error(&self, e: Error) {
        let stop = !self.collect_all || e.kind() != ErrorKind::Corrupt;
        let mut s = self.sched.lock();
        if self.collect_all || s.errors.is_empty() {
            s.errors.push(e);
        }
        if stop {
            self.stopping.store(true, Ordering::Relaxed);
        }
    }

    /// Issues reads while there is work and staging room; completes the load when nothing is left.
    fn pump(self: &Arc<Self>) {
        loop {
            let group = {
                let mut s = self.sched.lock();
                if s.finished {
                    return;
                }
                let next = if self.stopping.load(Ordering::Relaxed) {
                    None
                } else {
                    self.plan_next(&s)
                };
                let Some(g) = next else {
                    if s.active == 0 {
                        s.finished = true;
                        let waker = s.waker.take();
                        drop(s);
                        self.done.notify_all();
                        if let Some(w) = waker {
                            w.wake();
                        }
                    }
                    return;
                };
                if s.staged > 0 && s.staged + g.read_len as u64 > STAGING_BYTES_MAX {
                    return; // a finishing group will call pump again
                }
                if g.count == 0 {
                    s.empty_region_pending = false;
                }
                s.next = g.first + g.count;
                s.staged += g.read_len as u64;
                s.staged_peak = s.staged_peak.max(s.staged);
                s.reads += 1;
                s.bytes_read += g.read_len as u64;
                s.active += 1;
                g
            };
            self.issue(group);
        }
    }

    /// Starts the read of one group.
    fn issue(self: &Arc<Self>, group: Group) {
        let len = group.read_len;
        // A recycled staging buffer is not cleared: the exact read overwrites every byte of it.
        let buf = match staging::take(len) {
            Ok(b) => b,
            Err(e) => return self.group_failed(len, e),
        };
        let mut cb = self.queue.command_buffer();
        let id = match cb.load(&self.pack.0.file, group.read_offset, buf) {
            Ok(id) => id,
            Err(e) => return self.group_failed(len, e),
        };
        let pending = Arc::new(Pending {
            state: Mutex::new((None, false)),
            load: self.clone(),
            group: Mutex::new(Some(group)),
            id,
        });
        let p = pending.clone();
        cb.on_complete(move |_| Pending::arrive(&p, None));
        match cb.commit() {
            Ok(completion) => Pending::arrive(&pending, Some(completion)),
            Err(e) => self.group_failed(len, e),
        }
    }

    fn group_failed(self: &Arc<Self>, len: usize, e: Error) {
        self.record_error(e);
        self.group_done(len, None);
    }

    /// A group's read and all its jobs are over: release its staging, plan more.
    fn group_done(self: &Arc<Self>, len: usize, buf: Option<AlignedBuf>) {
        if let Some(b) = buf {
            staging::give(b);
        }
        {
            let mut s = self.sched.lock();
            s.staged -= len as u64;
            s.active -= 1;
        }
        self.pump();
    }

    /// On a pool thread: the read of `group` completed (or failed).
    fn on_read(self: &Arc<Self>, group: Group, completion: Completion, id: gpuio::CommandId) {
        let len = group.read_len;
        let (status, mut finished) = completion.wait_parts();
        let buf = finished.take_buffer(id);
        if let Some(e) = status.first_error() {
            self.record_error(e);
            let staging = buf.and_then(|b| b.into_owned().ok());
            return self.group_done(len, staging);
        }
        let staging = match buf.map(IoBuffer::into_owned) {
            Some(Ok(b)) => b,
            Some(Err(e)) => return self.group_failed(len, e),
            None => {
                return self.group_failed(len, Error::invalid("read finished without its buffer"))
            }
        };
        let data = Arc::new(GroupData {
            load: self.clone(),
            staging: Some(staging),
            next: AtomicU64::new(0),
            group,
        });
        if matches!(self.target, Target::Verify) {
            data.check_padding();
        }
        // One job per pool thread (at most one per chunk) takes chunks from the group in turn; this
        // thread is one of them.
        let helpers = (data.group.count as usize)
            .min(pool::decode_threads())
            .saturating_sub(1);
        for _ in 0..helpers {
            let d = data.clone();
            pool::spawn(Box::new(move || d.run_chunks()));
        }
        data.run_chunks();
    }
}

/// Joins a committed read with its completion callback: whichever of the two arrives second sends the
/// group to the pool (the callback can run before `commit` has returned the `Completion`).
struct Pending {
    state: Mutex<(Option<Completion>, bool)>,
    load: Arc<LoadShared>,
    group: Mutex<Option<Group>>,
    id: gpuio::CommandId,
}

impl Pending {
    /// `Some(completion)` from the committing thread, `None` from the callback (engine thread: keep short).
    fn arrive(this: &Arc<Pending>, completion: Option<Completion>) {
        let ready = {
            let mut st = this.state.lock();
            match completion {
                Some(c) if st.1 => Some(c),
                Some(c) => {
                    st.0 = Some(c);
                    None
                }
                None => {
                    st.1 = true;
                    st.0.take()
                }
            }
        };
        if let Some(c) = ready {
            let group = this
                .group
                .lock()
                .take()
                .expect("a group is dispatched once");
            let load = this.load.clone();
            let id = this.id;
            pool::spawn(Box::new(move || load.on_read(group, c, id)));
        }
    }
}

/// A staged group being decoded; when the last job drops it, its staging goes back to the load.
struct GroupData {
    load: Arc<LoadShared>,
    staging: Option<AlignedBuf>,
    /// The next chunk of the group (index within it) to decode.
    next: AtomicU64,
    group: Group,
}

impl Drop for GroupData {
    fn drop(&mut self) {
        let staging = self.staging.take();
        self.load.group_done(self.group.read_len, staging);
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer, sized to `len`.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0);
        }
        let r = f(&mut s[..len]);
        if s.len() > SCRATCH_KEEP_MAX {
            *s = Vec::new();
        }
        r
    })
}

impl GroupData {
    fn bytes(&self) -> &[u8] {
        self.staging.as_deref().expect("staging present until drop")
    }

    /// The stored bytes of `chunk` within the staged read.
    fn stored(&self, chunk: &ChunkInfo) -> &[u8] {
        let at = (chunk.file_offset - self.group.read_offset) as usize;
        &self.bytes()[at..at + chunk.stored_len as usize]
    }

    fn chunk_error(
        &self,
        entry: &EntryInfo,
        index: usize,
        chunk: &ChunkInfo,
        msg: String,
    ) -> Error {
        let end = chunk.logical_offset + chunk.logical_len as u64;
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "entry '{}' chunk {index} (logical bytes {}..{end}, {}): {msg}",
                entry.name, chunk.logical_offset, chunk.codec
            ),
        )
        .with_op(Op::Read)
        .with_path(self.load.pack.path())
        .with_range(chunk.file_offset, chunk.stored_len as u64)
    }

    /// Verify: every byte of the covered range that is not a chunk payload must be zero.
    fn check_padding(&self) {
        let (lo, hi) = self.group.cover;
        let bytes = self.bytes();
        let base = self.group.read_offset;
        let check = |from: u64, to: u64, after: String| {
            if from >= to {
                return;
            }
            let slice = &bytes[(from - base) as usize..(to - base) as usize];
            if let Some(i) = slice.iter().position(|&b| b != 0) {
                let at = from + i as u64;
                self.load.record_error(
                    Error::new(
                        ErrorKind::Corrupt,
                        format!("padding {after} is not zero (byte {:#04x})", slice[i]),
                    )
                    .with_op(Op::Read)
                    .with_path(self.load.pack.path())
                    .with_range(at, 1),
                );
            }
        };
        let mut at = lo;
        let mut after = "after the header".to_string();
        for k in self.group.first..self.group.first + self.group.count {
            let (entry, c, chunk) = self.load.chunk(k);
            check(at, chunk.file_offset, after);
            at = chunk.file_offset + chunk.stored_len as u64;
            after = format!("after entry '{}' chunk {c}", entry.name);
        }
        check(at, hi, after);
    }

    /// Decodes chunks of the group until none is left.
    fn run_chunks(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.group.count {
                return;
            }
            self.run_chunk(i);
        }
    }

    /// Checks and decodes the `i`-th chunk of the group; never panics out (a panicking decoder is
    /// reported as a corrupt chunk).
    fn run_chunk(&self, i: u64) {
        if self.load.stopping.load(Ordering::Relaxed) {
            return;
        }
        let k = self.group.first + i;
        let (entry, c, chunk) = self.load.chunk(k);
        let result = catch_unwind(AssertUnwindSafe(|| self.decode_chunk(chunk)))
            .unwrap_or_else(|_| Err("the decoder panicked".to_string()));
        match result {
            Ok(n) => {
                self.load.logical_done.fetch_add(n, Ordering::Relaxed);
            }
            Err(msg) => self
                .load
                .record_error(self.chunk_error(entry, c, chunk, msg)),
        }
    }

    /// Returns the logical bytes delivered.
    fn decode_chunk(&self, chunk: &ChunkInfo) -> std::result::Result<u64, String> {
        let stored = self.stored(chunk);
        let crc = crc32c(stored);
        if crc != chunk.crc32c_stored {
            return Err(format!(
                "stored bytes fail their CRC-32C (table {:#010x}, computed {crc:#010x})",
                chunk.crc32c_stored
            ));
        }
        let check_logical = |out: &[u8]| {
            let crc = crc32c(out);
            if crc != chunk.crc32c_logical {
                return Err(format!(
                    "decoded bytes fail their CRC-32C (table {:#010x}, computed {crc:#010x})",
                    chunk.crc32c_logical
                ));
            }
            Ok(())
        };
        let ll = chunk.logical_len as usize;
        let (start, end, dest) = match self.load.target {
            Target::Verify => {
                if chunk.codec == Codec::None {
                    // Raw: the stored bytes are the logical bytes and both CRCs are equal (checked at open).
                    return Ok(ll as u64);
                }
                return with_scratch(ll, |out| {
                    codec::decompress(chunk.codec, stored, out)?;
                    check_logical(out)?;
                    Ok(ll as u64)
                });
            }
            Target::Range {
                start, end, dest, ..
            } => (start, end, dest),
        };
        let c_lo = chunk.logical_offset;
        let c_hi = c_lo + ll as u64;
        let lo = c_lo.max(start);
        let hi = c_hi.min(end);
        let n = (hi - lo) as usize;
        // SAFETY: [lo - start, hi - start) lies within the load's destination of `end - start` bytes
        // (lo >= start, hi <= end), and chunks do not overlap, so no other job writes these bytes; the
        // destination outlives the load (see SendPtr).
        let out = unsafe { std::slice::from_raw_parts_mut(dest.0.add((lo - start) as usize), n) };
        if chunk.codec == Codec::None {
            // Raw: the stored CRC is the logical CRC (checked at open); copy the wanted part.
            out.copy_from_slice(&stored[(lo - c_lo) as usize..(hi - c_lo) as usize]);
        } else if n == ll {
            // The whole chunk is wanted: decode straight into the destination.
            codec::decompress(chunk.codec, stored, out)?;
            check_logical(out)?;
        } else {
            // Part of the chunk: decode all of it (the CRC covers all of it) and copy the wanted part.
            with_scratch(ll, |whole| {
                codec::decompress(chunk.codec, stored, whole)?;
                check_logical(whole)?;
                out.copy_from_slice(&whole[(lo - c_lo) as usize..(hi - c_lo) as usize]);
                Ok::<(), String>(())
            })?;
        }
        Ok(n as u64)
    }
}
