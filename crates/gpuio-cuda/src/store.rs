//! The staged store path: device memory → pinned staging buffers → storage, the reverse of
//! [`crate::loader`], and saving a [`LoadedModel`] as a safetensors file.
//!
//! [`Loader::store_range`] cuts a device range into chunks of at most one staging buffer. Chunk `k`
//! is copied device → host into a staging buffer on the loader's [`CopyStream`]
//! ([`CopyStream::copy_d2h_async`]); once its ticket is complete the buffer is handed to the engine
//! as a store ([`gpuio::CommandBuffer::store_range`]) and comes back to the pool when the write
//! completes. With `n ≥ 2` staging buffers the device → host copy of chunk `k+1` runs while chunk `k`
//! is being written; with one buffer the path is strictly serial (copy, write, copy, ...). At most
//! [`LoaderConfig::staging_buffers`](crate::loader::LoaderConfig) chunks are in flight across the
//! two stages, since a chunk holds its staging buffer from its copy to the end of its write.
//!
//! Alignment: chunk boundaries in the file are multiples of 4096 (the OS page), except where the
//! range itself starts and ends, and a chunk's bytes sit in its staging buffer at the same offset
//! modulo 4096 as in the file. So every whole page of a chunk can be written direct from the
//! staging buffer, and no page is shared between two chunks. The engine itself writes an unaligned
//! head or tail of a store through the page cache (and plans stores so that such a page is never
//! also written direct), so the bytes written are exactly the range asked for: this module relies
//! on that rather than doing its own read-modify-write of partial blocks.
//!
//! On any error — a device → host copy that fails, a write that fails (ENOSPC, EIO, a short write
//! the engine could not finish) — the store waits for every copy and write it started, gives every
//! staging buffer back to the pool, and returns the first error with the chunk and file offset in
//! its context (errors from the engine also name the file and the failed range). What was already
//! written stays written: a store into a file is not atomic. [`Loader::save_safetensors`] is: it
//! writes through a [`ReplaceFile`], so a failed save leaves the destination as it was and no
//! temporary file behind.
//!
//! A failed copy is sticky on a device stream (as CUDA's are): the loader's stream reports it from
//! then on, so make a new [`Loader`] after a copy failure.
//!
//! This module never touches bytes outside the file range it was asked to write, and never holds a
//! staging buffer past the return of the call that took it.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use gpuio::error::Op;
use gpuio::{
    AlignedBuf, CommandId, Completion, DirectMode, Error, ErrorKind, File, IoBuffer, ReplaceFile,
    Result,
};

use crate::device::{CopyStream, DeviceBuffer, DevicePtr, Ticket};
use crate::loader::{DeviceTensor, LoadedModel, Loader};
use crate::safetensors::{self, Dtype, HEADER_LEN_MAX, PREFIX_LEN};

/// Chunk boundaries in the file are multiples of this (the OS page), so whole pages go direct.
const CHUNK_ALIGN: u64 = 4096;

/// One chunk of a store, when [`LoaderConfig::timeline`](crate::loader::LoaderConfig) is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreChunkTiming {
    pub chunk: usize,
    /// File offset of the chunk's first byte, and its length.
    pub file_offset: u64,
    pub len: u64,
    /// The copy stream's ticket for the chunk's device → host copy.
    pub ticket: Ticket,
    /// When the copy was queued (the chunk's staging buffer was taken just before).
    pub copy_queued: Instant,
    /// When the chunk's write was handed to the engine (its copy had finished).
    pub write_issued: Instant,
    /// When the store saw the write complete (the staging buffer went back just after).
    pub write_done: Instant,
}

/// What a staged store did.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreStats {
    pub bytes: u64,
    pub seconds: f64,
    pub chunks: usize,
    pub staging_buffers: usize,
    pub staging_bytes: usize,
    /// Time spent blocked waiting for device → host copies, and for writes to free a staging buffer.
    pub copy_wait: Duration,
    pub write_wait: Duration,
    /// Per chunk in chunk order, when [`LoaderConfig::timeline`](crate::loader::LoaderConfig) is on.
    pub timeline: Vec<StoreChunkTiming>,
}

impl StoreStats {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9)
    }
}

impl Loader {
    /// Writes `len` bytes of `src` from `src_offset` to `file` at `offset`, staged through the
    /// loader's pinned staging buffers (see the module docs). The file is extended as needed; bytes
    /// outside `offset..offset+len` are not touched. On error nothing is left in flight and every
    /// staging buffer is back in the pool; the error names the chunk and file offset.
    pub fn store_range(
        &self,
        src: &DeviceBuffer,
        src_offset: u64,
        file: &File,
        offset: u64,
        len: u64,
    ) -> Result<StoreStats> {
        let fits = src_offset
            .checked_add(len)
            .is_some_and(|e| e <= src.len() as u64);
        if !fits {
            return Err(Error::invalid(format!(
                "{len} bytes at device offset {src_offset} are outside a device buffer of {} bytes",
                src.len()
            )));
        }
        let ctx = |e: Error| e.with_op(Op::Write).with_path(file.path());
        if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
            return Err(ctx(Error::invalid(format!(
                "{len} bytes at file offset {offset} overflow a file offset"
            ))));
        }
        if !file.is_writable() {
            return Err(ctx(Error::new(
                ErrorKind::PermissionDenied,
                "file was opened read-only",
            ))
            .with_range(offset, len));
        }
        if src.device().label() != self.device.label() {
            return Err(Error::invalid(format!(
                "the buffer is on {}, this loader copies from {}",
                src.device().label(),
                self.device.label()
            )));
        }
        let stats = |chunks, seconds, copy_wait, write_wait, timeline| StoreStats {
            bytes: len,
            seconds,
            chunks,
            staging_buffers: self.cfg.staging_buffers,
            staging_bytes: self.cfg.staging_bytes,
            copy_wait,
            write_wait,
            timeline,
        };
        if len == 0 {
            return Ok(stats(0, 0.0, Duration::ZERO, Duration::ZERO, Vec::new()));
        }
        let mut stream = self.stream.lock();
        let started = Instant::now();
        let mut run = StoreRun::new(self, file, src.ptr() + src_offset, offset, len);
        let result = run.drive(&mut **stream);
        // Whatever happened, no copy may still write a staging buffer and no write may still read
        // one when the buffers go back to the pool.
        let synced = stream.synchronize();
        let drained = run.drain();
        result?;
        synced.map_err(|e| e.with_context(format!("storing to {}", file.path().display())))?;
        drained?;
        run.timeline.sort_by_key(|t| t.chunk);
        Ok(stats(
            run.chunks,
            started.elapsed().as_secs_f64(),
            run.copy_wait,
            run.write_wait,
            run.timeline,
        ))
    }

    /// Writes `model` as a safetensors file at `path`: a header re-encoded from the model's tensor
    /// table and metadata ([`encode_safetensors_header`], byte-identical to what
    /// [`safetensors::serialize`] writes for the same tensors), then the body read from device
    /// memory with [`store_range`](Self::store_range). Crash-safe: written to a temporary file beside
    /// `path`, synced, and renamed over it ([`ReplaceFile`]); on any error the destination keeps its
    /// old contents (or stays absent) and the temporary file is removed. The stats are the body's
    /// store (the header is written beside it, the sync and rename after it).
    pub fn save_safetensors(&self, model: &LoadedModel, path: &Path) -> Result<StoreStats> {
        let ctx = |e: Error| e.with_context(format!("saving {}", path.display()));
        let body_len = model.buffer.len() as u64;
        let header = match unchanged_header(model, body_len, path) {
            Some(h) => h,
            None => encode_header(&model.tensors, &model.metadata, body_len, path).map_err(ctx)?,
        };
        let replace = ReplaceFile::create(path).map_err(ctx)?;
        let file = replace.open(DirectMode::Auto).map_err(ctx)?;
        let stats = self
            .write_safetensors(&file, &header, &model.buffer)
            .map_err(|e| name_file(e, replace.dest()))
            .map_err(ctx)?;
        // Dropping `replace` on an error above removed the temporary file.
        replace.commit().map_err(ctx)?;
        Ok(stats)
    }

    /// Header and body into `file`, synced through the engine, length checked.
    fn write_safetensors(
        &self,
        file: &File,
        header: &[u8],
        body: &DeviceBuffer,
    ) -> Result<StoreStats> {
        let mut hbuf = AlignedBuf::new(header.len(), CHUNK_ALIGN as usize)?;
        hbuf.copy_from_slice(header);
        let mut cb = self.queue.command_buffer();
        cb.store(file, 0, hbuf)?;
        // The header is written while the body's chunks are copied and written.
        let header_write = cb.commit()?;
        let body_len = body.len() as u64;
        let stored = self.store_range(body, 0, file, header.len() as u64, body_len);
        let header_written = header_write
            .finish()
            .map_err(|e| e.with_context("writing the header"));
        let stats = stored?;
        header_written?;
        let mut cb = self.queue.command_buffer();
        cb.sync(file)?;
        cb.commit()?.finish()?;
        let want = header.len() as u64 + body_len;
        let written = file.len()?;
        if written != want {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the new file is {written} bytes, {want} were written"),
            )
            .with_op(Op::Write)
            .with_path(file.path()));
        }
        Ok(stats)
    }
}

/// Names `path` in an error that names no file (a device copy error, say).
fn name_file(e: Error, path: &Path) -> Error {
    if e.path().is_some() {
        e
    } else {
        e.with_path(path)
    }
}

/// The header of a safetensors file holding `tensors` (in body order, offsets relative to the
/// body) and `metadata`: the 8-byte little-endian length, then the JSON padded with spaces to a
/// multiple of 8 bytes. For tensors laid out as [`safetensors::serialize`] lays them out (body
/// order, contiguous from 0), the bytes are exactly those `serialize` writes before the body, so a
/// file it made loads and saves back byte for byte. The result is checked with the strict parser:
/// a table that would not read back (gaps, overlaps, sizes that disagree with dtype × shape,
/// duplicate names, a tensor called `__metadata__`) is an [`ErrorKind::InvalidInput`] error.
pub fn encode_safetensors_header(
    tensors: &[DeviceTensor],
    metadata: &[(String, String)],
) -> Result<Vec<u8>> {
    let body_len = tensors
        .iter()
        .try_fold(0u64, |acc, t| acc.checked_add(t.bytes))
        .ok_or_else(|| Error::invalid("tensor sizes overflow 64 bits"))?;
    encode_header(
        tensors,
        metadata,
        body_len,
        Path::new("<safetensors header>"),
    )
}

/// The model's header as it was in the file it was loaded from, when the tensor table and metadata
/// are still exactly what that header says (so a model saved unchanged is byte-identical to its
/// source, whatever writer made it); `None` when the table was changed.
fn unchanged_header(model: &LoadedModel, body_len: u64, path: &Path) -> Option<Vec<u8>> {
    let json = &model.header_json;
    let file_len = (PREFIX_LEN + json.len() as u64).checked_add(body_len)?;
    let parsed = safetensors::parse_header(json, file_len, path).ok()?;
    let same = parsed.metadata == model.metadata
        && parsed.tensors.len() == model.tensors.len()
        && parsed.tensors.iter().zip(&model.tensors).all(|(p, t)| {
            (
                p.name.as_str(),
                p.dtype,
                p.shape.as_slice(),
                p.begin,
                p.len(),
            ) == (
                t.name.as_str(),
                t.dtype,
                t.shape.as_slice(),
                t.offset,
                t.bytes,
            )
        });
    same.then(|| {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json);
        out
    })
}

fn encode_header(
    tensors: &[DeviceTensor],
    metadata: &[(String, String)],
    body_len: u64,
    path: &Path,
) -> Result<Vec<u8>> {
    let invalid = |msg: String| Error::invalid(format!("safetensors: {msg}")).with_path(path);
    let mut off = 0u64;
    for t in tensors {
        if t.offset != off {
            return Err(invalid(format!(
                "tensor '{}' is at body offset {} but the tensors before it end at {off}; tensors \
                 must be listed in body order without gaps or overlaps",
                t.name, t.offset
            )));
        }
        off = off
            .checked_add(t.bytes)
            .ok_or_else(|| invalid(format!("tensor '{}' ends past 2^64", t.name)))?;
    }
    if off != body_len {
        return Err(invalid(format!(
            "the tensors cover {off} bytes but the body is {body_len} bytes"
        )));
    }
    // Built exactly as `safetensors::serialize` builds it, so the bytes agree.
    let json = safetensors::header_json(
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice(), t.bytes)),
        metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let n = json.len() as u64;
    if n > HEADER_LEN_MAX {
        return Err(invalid(format!(
            "header of {n} bytes exceeds the format's limit of {HEADER_LEN_MAX} bytes"
        )));
    }
    // Read it back with the strict parser: what is written must load.
    let file_len = (PREFIX_LEN + n)
        .checked_add(body_len)
        .ok_or_else(|| invalid("the file would be larger than 2^64 bytes".into()))?;
    let parsed = safetensors::parse_header(&json, file_len, path).map_err(|e| {
        e.with_kind(ErrorKind::InvalidInput)
            .with_context("the tensor table cannot be written as safetensors")
    })?;
    let mut want: Vec<(u64, u64, &str, Dtype, &[u64])> = tensors
        .iter()
        .map(|t| {
            (
                t.offset,
                t.offset + t.bytes,
                t.name.as_str(),
                t.dtype,
                t.shape.as_slice(),
            )
        })
        .collect();
    want.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let same = parsed.tensors.len() == want.len()
        && parsed.tensors.iter().zip(&want).all(|(p, w)| {
            (p.begin, p.end, p.name.as_str(), p.dtype, p.shape.as_slice())
                == (w.0, w.1, w.2, w.3, w.4)
        });
    if !same {
        return Err(invalid(
            "the header does not read back as the tensor table (duplicate names, or a tensor \
             named __metadata__?)"
                .into(),
        ));
    }
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

/// A chunk whose device → host copy is queued: the staging buffer it fills and where it goes.
struct Copying {
    chunk: usize,
    ticket: Ticket,
    buf: IoBuffer,
    /// Bytes at the start of the staging buffer before the chunk's first byte (alignment).
    skip: usize,
    len: u64,
    file_offset: u64,
    /// Offset in the source range (from the caller's `src_offset`).
    src_offset: u64,
    queued: Instant,
}

/// A chunk being written by the engine (which holds its staging buffer until it completes).
struct Writing {
    chunk: usize,
    completion: Completion,
    id: CommandId,
    len: u64,
    file_offset: u64,
    src_offset: u64,
    ticket: Ticket,
    queued: Instant,
    issued: Instant,
}

/// One staged store in progress.
struct StoreRun<'a> {
    loader: &'a Loader,
    file: &'a File,
    /// Device address of the range's first byte.
    src: DevicePtr,
    /// File range to write.
    start: u64,
    end: u64,
    /// Next file offset to copy.
    next: u64,
    /// Copies queued, in chunk (and stream) order.
    copies: VecDeque<Copying>,
    /// Writes in flight, oldest first; they may complete in any order.
    writes: VecDeque<Writing>,
    chunks: usize,
    copy_wait: Duration,
    write_wait: Duration,
    timeline: Vec<StoreChunkTiming>,
}

impl<'a> StoreRun<'a> {
    fn new(loader: &'a Loader, file: &'a File, src: DevicePtr, offset: u64, len: u64) -> Self {
        StoreRun {
            loader,
            file,
            src,
            start: offset,
            end: offset + len,
            next: offset,
            copies: VecDeque::new(),
            writes: VecDeque::new(),
            chunks: 0,
            copy_wait: Duration::ZERO,
            write_wait: Duration::ZERO,
            timeline: Vec::new(),
        }
    }

    fn more_to_copy(&self) -> bool {
        self.next < self.end
    }

    /// The state machine: keep every staging buffer busy; a copy that finished becomes a write at
    /// once, a write that finished frees its buffer for the next copy.
    fn drive(&mut self, stream: &mut dyn CopyStream) -> Result<()> {
        loop {
            self.reap_writes()?;
            while let Some(c) = self.copies.front() {
                let done = stream
                    .is_done(c.ticket)
                    .map_err(|e| self.copy_error(e, c))?;
                if !done {
                    break;
                }
                self.write_front()?;
            }
            if self.more_to_copy() {
                if let Ok(buf) = self.loader.staging()?.pool.try_get() {
                    self.issue_copy(stream, buf.into())?;
                    continue;
                }
            }
            // Every staging buffer is busy (or all is copied): block on the oldest copy first, so
            // that a finished copy reaches the disk without waiting for an unrelated write.
            if let Some(c) = self.copies.front() {
                let t = Instant::now();
                let waited = stream.wait(c.ticket).map_err(|e| self.copy_error(e, c));
                self.copy_wait += t.elapsed();
                waited?;
                self.write_front()?;
                continue;
            }
            if let Some(w) = self.writes.pop_front() {
                let t = Instant::now();
                w.completion.wait();
                self.write_wait += t.elapsed();
                self.finish_write(w)?;
                continue;
            }
            if self.more_to_copy() {
                // Unreachable while the stream lock is held (loads and stores give every buffer
                // back before releasing it); an error rather than a hang if that ever changes.
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    "no staging buffer is free and none is in use by this store",
                ));
            }
            return Ok(());
        }
    }

    /// Queues the device → host copy of the next chunk into `buf`.
    fn issue_copy(&mut self, stream: &mut dyn CopyStream, mut buf: IoBuffer) -> Result<()> {
        let cap = self.loader.cfg.staging_bytes as u64;
        let chunk_start = self.next;
        // Only the first chunk can start off a page: its bytes sit at the same offset in the
        // buffer, so the rest of the chunk is page-aligned in memory and in the file alike.
        let skip = chunk_start % CHUNK_ALIGN;
        let chunk_end = (chunk_start - skip + cap).min(self.end);
        let len = chunk_end - chunk_start;
        let src_offset = chunk_start - self.start;
        let queued = Instant::now();
        // SAFETY: `skip + len <= cap`, the buffer's size, so the destination lies in the staging
        // buffer, which stays in `self.copies` (and so is neither touched nor freed) until its
        // ticket is complete or the stream has been synchronized (store_range does that before the
        // run is drained). The source lies in the caller's device buffer, checked in store_range,
        // which the caller's borrow keeps alive for the whole call.
        let ticket = unsafe {
            stream.copy_d2h_async(
                self.src + src_offset,
                buf.as_mut_ptr().add(skip as usize),
                len as usize,
            )
        }
        .map_err(|e| {
            e.with_context(format!(
                "queueing the device-to-host copy of chunk {} (device offset +{src_offset}) for {} \
                 at file offset {chunk_start}",
                self.chunks,
                self.file.path().display()
            ))
        })?;
        self.copies.push_back(Copying {
            chunk: self.chunks,
            ticket,
            buf,
            skip: skip as usize,
            len,
            file_offset: chunk_start,
            src_offset,
            queued,
        });
        self.chunks += 1;
        self.next = chunk_end;
        Ok(())
    }

    /// Hands the oldest copy, which has finished, to the engine as a write.
    fn write_front(&mut self) -> Result<()> {
        let Some(c) = self.copies.pop_front() else {
            return Ok(());
        };
        let (chunk, src_offset, file_offset) = (c.chunk, c.src_offset, c.file_offset);
        let ctx = |e: Error| {
            e.with_context(format!(
                "writing chunk {chunk} (device offset +{src_offset}) at file offset {file_offset}"
            ))
        };
        let mut cb = self.loader.queue.command_buffer();
        // On an error here the buffer, whose copy is complete, goes back to the pool (dropped with
        // the command or with `cb`).
        let id = cb
            .store_range(self.file, file_offset, c.buf, c.skip, c.len)
            .map_err(ctx)?;
        let completion = cb.commit().map_err(ctx)?;
        self.writes.push_back(Writing {
            chunk: c.chunk,
            completion,
            id,
            len: c.len,
            file_offset: c.file_offset,
            src_offset: c.src_offset,
            ticket: c.ticket,
            queued: c.queued,
            issued: Instant::now(),
        });
        Ok(())
    }

    /// Finishes every write that has completed, in any order.
    fn reap_writes(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.writes.len() {
            if self.writes[i].completion.status().is_pending() {
                i += 1;
            } else if let Some(w) = self.writes.remove(i) {
                self.finish_write(w)?;
            }
        }
        Ok(())
    }

    /// Takes a completed write's staging buffer back to the pool; its error, or a short write.
    fn finish_write(&mut self, w: Writing) -> Result<()> {
        let (status, mut done) = w.completion.wait_parts();
        let written = done.bytes(w.id);
        let write_done = Instant::now();
        drop(done.take_buffer(w.id));
        let ctx = |e: Error| {
            e.with_context(format!(
                "writing chunk {} (device offset +{}) at file offset {}",
                w.chunk, w.src_offset, w.file_offset
            ))
        };
        if let Some(e) = status.first_error() {
            return Err(ctx(e));
        }
        if written != w.len {
            return Err(ctx(Error::new(
                ErrorKind::Io,
                format!("short write: {written} of {} bytes", w.len),
            )
            .with_op(Op::Write)
            .with_path(self.file.path())
            .with_range(w.file_offset, w.len)));
        }
        if self.loader.cfg.timeline {
            self.timeline.push(StoreChunkTiming {
                chunk: w.chunk,
                file_offset: w.file_offset,
                len: w.len,
                ticket: w.ticket,
                copy_queued: w.queued,
                write_issued: w.issued,
                write_done,
            });
        }
        Ok(())
    }

    /// A copy error (sticky on the stream, so it may come from this chunk's copy or a later one).
    fn copy_error(&self, e: Error, c: &Copying) -> Error {
        e.with_context(format!(
            "device-to-host copy failed at or after chunk {} (device offset +{}) for {} at file \
             offset {}",
            c.chunk,
            c.src_offset,
            self.file.path().display(),
            c.file_offset
        ))
    }

    /// After the stream is synchronized: gives back the buffers of copies, waits for every write
    /// still in flight and gives its buffer back. Returns the first write error found (only seen
    /// when the run itself ended without one, which cannot happen with writes still in flight, but
    /// is not dropped silently).
    fn drain(&mut self) -> Result<()> {
        self.copies.clear();
        let mut first = Ok(());
        for w in std::mem::take(&mut self.writes) {
            let (status, mut done) = w.completion.wait_parts();
            drop(done.take_buffer(w.id));
            if let (Some(e), Ok(())) = (status.first_error(), &first) {
                first = Err(e);
            }
        }
        first
    }
}
