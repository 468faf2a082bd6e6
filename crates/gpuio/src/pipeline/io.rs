//! The two ends of a pipeline: a [`Source`] fills slot buffers from logical offsets, a [`Sink`] drains
//! them to storage; both start the I/O and return at once with a [`SlotFuture`] that resolves to the
//! buffer. [`FileSource`] and [`FileSink`] are the engine's own: loads and stores on an [`IoQueue`]
//! (direct where the file allows), the sink writing crash-safely through a [`ReplaceFile`].

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::error::{Error, ErrorKind, Op, Result};
use crate::file::{DirectMode, File};
use crate::mem::IoBuffer;
use crate::queue::{CommandId, Completion, IoQueue};
use crate::replace::ReplaceFile;

/// An operation on one slot's buffer, started and not yet finished: resolves to the buffer (filled, or
/// written out) or to the error that stopped it. It must wake the task that polled it when it finishes
/// (as [`Completion`] and packs' loads do); dropping it early must be safe (the engine owns buffers in
/// flight).
pub type SlotFuture = Pin<Box<dyn Future<Output = Result<IoBuffer>>>>;

/// Where a pipeline's bytes come from: a byte range of a file, a pack entry, anything that can fill a
/// buffer from a logical offset without blocking.
pub trait Source {
    /// Logical bytes the source holds; the pipeline reads `0..len()`.
    fn len(&self) -> u64;
    /// Whether there is nothing to read.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Starts filling all of `buf` (`buf.len()` bytes, within `0..len()`) with the logical bytes at
    /// `offset`; returns at once. Too few bytes must be an error ([`ErrorKind::UnexpectedEof`]), never a
    /// short fill.
    fn fill(&mut self, offset: u64, buf: IoBuffer) -> Result<SlotFuture>;
}

/// Where a pipeline's results go, in order: output offsets are consecutive from 0.
pub trait Sink {
    /// Starts writing all of `buf` at output `offset`; returns at once.
    fn write(&mut self, offset: u64, buf: IoBuffer) -> Result<SlotFuture>;
    /// Called once, after every write has succeeded, with the output's total length: make the output
    /// complete (sync it, swap it in). Until this returns, nothing may look complete.
    fn finish(&mut self, len: u64) -> Result<()>;
    /// Called once instead of (or after a failed) [`finish`](Self::finish), when no write is in flight
    /// any more: undo what a partial output would leave behind.
    fn abort(&mut self) {}
}

impl<S: Source + ?Sized> Source for Box<S> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn fill(&mut self, offset: u64, buf: IoBuffer) -> Result<SlotFuture> {
        (**self).fill(offset, buf)
    }
}

impl<S: Sink + ?Sized> Sink for Box<S> {
    fn write(&mut self, offset: u64, buf: IoBuffer) -> Result<SlotFuture> {
        (**self).write(offset, buf)
    }
    fn finish(&mut self, len: u64) -> Result<()> {
        (**self).finish(len)
    }
    fn abort(&mut self) {
        (**self).abort()
    }
}

/// A [`Completion`] of a command buffer holding one command, as a future of that command's buffer.
struct CommandFuture {
    completion: Option<Completion>,
    id: CommandId,
    /// The file errors should name (a temporary file's destination, say).
    rename: Option<PathBuf>,
}

impl Future for CommandFuture {
    type Output = Result<IoBuffer>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<IoBuffer>> {
        let Some(c) = self.completion.as_mut() else {
            return Poll::Ready(Err(Error::invalid("polled after it finished")));
        };
        if Pin::new(c).poll(cx).is_pending() {
            return Poll::Pending;
        }
        let c = self.completion.take().expect("checked above");
        // Finished: `wait_parts` returns at once, with the buffer also on failure.
        let (status, mut done) = c.wait_parts();
        Poll::Ready(match status.first_error() {
            Some(e) => Err(match &self.rename {
                Some(p) => e.with_path(p),
                None => e,
            }),
            None => done
                .take_buffer(self.id)
                .ok_or_else(|| Error::invalid("the command's buffer was already taken")),
        })
    }
}

/// Bytes `start..start + len` of a file, read through an [`IoQueue`] (direct where the file allows).
/// Error offsets are file offsets; [`crate::pipeline::Slot::offset`] is relative to `start`.
#[derive(Debug, Clone)]
pub struct FileSource {
    queue: IoQueue,
    file: File,
    start: u64,
    len: u64,
}

impl FileSource {
    /// All of `file` (its length now: a file that grows later is read to this length, one that
    /// shrinks fails with [`ErrorKind::UnexpectedEof`]).
    pub fn new(queue: &IoQueue, file: File) -> Result<FileSource> {
        let len = file.len()?;
        Ok(FileSource {
            queue: queue.clone(),
            file,
            start: 0,
            len,
        })
    }

    /// Opens `path` read-only, direct as `direct` says, for all of its bytes.
    pub fn open(queue: &IoQueue, path: impl AsRef<Path>, direct: DirectMode) -> Result<FileSource> {
        let file = crate::file::OpenOptions::read().direct(direct).open(path)?;
        FileSource::new(queue, file)
    }

    /// Bytes `start..start + len` of `file`, which must lie inside it.
    pub fn range(queue: &IoQueue, file: File, start: u64, len: u64) -> Result<FileSource> {
        let size = file.len()?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("range {start}+{len} is not inside the file's {size} bytes"),
            )
            .with_op(Op::Read)
            .with_path(file.path())
            .with_range(start, len));
        }
        Ok(FileSource {
            queue: queue.clone(),
            file,
            start,
            len,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn fill(&mut self, offset: u64, buf: IoBuffer) -> Result<SlotFuture> {
        let mut cb = self.queue.command_buffer();
        // Exact: a file that shrank under us fails with the offset where its data ran out.
        let id = cb.load(&self.file, self.start + offset, buf)?;
        Ok(Box::pin(CommandFuture {
            completion: Some(cb.commit()?),
            id,
            rename: None,
        }))
    }
}

/// Writes the pipeline's output as a new version of a file, crash-safely: stores go through an
/// [`IoQueue`] into a [`ReplaceFile`]'s temporary file (direct where possible; the engine writes an
/// unaligned tail through the page cache, so the length is exact), and [`Sink::finish`] syncs it
/// through the engine, then commits it (fsync, rename over the destination, directory fsync). On
/// failure the temporary file is removed and the destination keeps its previous contents.
pub struct FileSink {
    queue: IoQueue,
    replace: Option<ReplaceFile>,
    file: File,
    dest: PathBuf,
}

impl fmt::Debug for FileSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSink")
            .field("dest", &self.dest)
            .field("file", &self.file)
            .field("committed", &self.replace.is_none())
            .finish()
    }
}

impl FileSink {
    /// A sink that replaces `dest` (see [`ReplaceFile::create`] for what `dest` may be), its temporary
    /// file opened direct as `direct` says.
    pub fn replace(
        queue: &IoQueue,
        dest: impl AsRef<Path>,
        direct: DirectMode,
    ) -> Result<FileSink> {
        let replace = ReplaceFile::create(dest)?;
        let file = replace.open(direct)?;
        Ok(FileSink {
            queue: queue.clone(),
            dest: replace.dest().to_path_buf(),
            replace: Some(replace),
            file,
        })
    }

    /// The file being replaced (after following symbolic links).
    pub fn dest(&self) -> &Path {
        &self.dest
    }
    /// The temporary file being written (`None` once committed or aborted).
    pub fn temp_path(&self) -> Option<&Path> {
        self.replace.as_ref().map(ReplaceFile::temp_path)
    }
    /// The engine's handle on the temporary file (whether it is direct, and why).
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Permission bits the new file gets (see [`ReplaceFile::set_mode`]).
    pub fn set_mode(&mut self, mode: u32) {
        if let Some(r) = self.replace.as_mut() {
            r.set_mode(mode);
        }
    }
}

impl Sink for FileSink {
    fn write(&mut self, offset: u64, buf: IoBuffer) -> Result<SlotFuture> {
        let mut cb = self.queue.command_buffer();
        let id = cb.store(&self.file, offset, buf)?;
        Ok(Box::pin(CommandFuture {
            completion: Some(cb.commit()?),
            id,
            rename: Some(self.dest.clone()),
        }))
    }

    fn finish(&mut self, len: u64) -> Result<()> {
        // The data sync goes through the engine like the stores (so that it is timed, and faults in it
        // are injected and handled like theirs); the commit's own fsync then has little left to do.
        let mut cb = self.queue.command_buffer();
        cb.sync(&self.file)?;
        cb.commit()?.finish().map_err(|e| e.with_path(&self.dest))?;
        let written = self.file.len()?;
        if written != len {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the new version is {written} bytes, {len} were written"),
            )
            .with_op(Op::Write)
            .with_path(&self.dest));
        }
        match self.replace.take() {
            Some(r) => r.commit(),
            None => Err(Error::invalid("the sink was already finished or aborted")),
        }
    }

    fn abort(&mut self) {
        // Dropping an uncommitted replacement removes its temporary file.
        self.replace = None;
    }
}
