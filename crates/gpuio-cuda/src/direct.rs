//! The direct load path: storage → device memory with no host staging, through any [`DirectRead`]
//! (cuFile on a GPU, `pread` into the host stand-in's memory in tests).
//!
//! [`load_range_direct`] cuts a file range into chunks whose file offsets are aligned to the OS page
//! after the first (the first starts where the range starts, so nothing before the range is written
//! to the device), and reads them with a fixed number of scoped worker threads that take chunk
//! indices from one atomic counter: exactly [`DirectConfig::threads`] threads (fewer when there are
//! fewer chunks), no queue, nothing that grows with the range.
//!
//! The first error stops new chunks from being started; reads already under way finish, every
//! worker is joined, and that first error is returned with the chunk and file offset it was reading.
//! A file that ends before the range does is an [`ErrorKind::UnexpectedEof`] error naming the file
//! and the first missing byte.
//!
//! This module never stages through host memory and never falls back on its own: a reader that
//! cannot serve a file (cuFile and a buffered file) fails, and the caller decides to stage instead.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use gpuio::error::Op;
use gpuio::{Error, ErrorKind, File, Result};
use parking_lot::Mutex;

use crate::device::{DeviceBuffer, DirectRead};
use crate::limits::{check_chunk_size, check_count};

/// Default worker threads.
pub const DIRECT_THREADS_DEFAULT: usize = 4;
/// Most worker threads a direct load may use.
pub const DIRECT_THREADS_MAX: usize = 32;
/// Default bytes per chunk (one `DirectRead::read` call).
pub const DIRECT_CHUNK_BYTES_DEFAULT: usize = 16 << 20;
/// Smallest and largest chunk.
pub const DIRECT_CHUNK_BYTES_MIN: usize = 64 << 10;
pub const DIRECT_CHUNK_BYTES_MAX: usize = 256 << 20;
/// File offsets of every chunk after the first are multiples of this (the OS page), so an
/// `O_DIRECT` descriptor can serve them without a bounce.
const CHUNK_ALIGN: u64 = 4096;

/// How to run a direct load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectConfig {
    /// Worker threads, each with one read in flight (1..=[`DIRECT_THREADS_MAX`]).
    pub threads: usize,
    /// Bytes per chunk: a multiple of 4096 in
    /// [`DIRECT_CHUNK_BYTES_MIN`]..=[`DIRECT_CHUNK_BYTES_MAX`].
    pub chunk_bytes: usize,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            threads: DIRECT_THREADS_DEFAULT,
            chunk_bytes: DIRECT_CHUNK_BYTES_DEFAULT,
        }
    }
}

impl DirectConfig {
    /// [`ErrorKind::InvalidInput`] naming the bad field and its allowed range.
    pub fn validate(&self) -> Result<()> {
        check_count("direct-read thread count", self.threads, DIRECT_THREADS_MAX)?;
        check_chunk_size(
            "direct-read chunk size",
            self.chunk_bytes,
            DIRECT_CHUNK_BYTES_MIN,
            DIRECT_CHUNK_BYTES_MAX,
        )
    }
}

/// What a direct load did.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectStats {
    pub bytes: u64,
    pub seconds: f64,
    pub chunks: usize,
    /// Worker threads started: [`DirectConfig::threads`], or fewer when there were fewer chunks.
    pub threads: usize,
    pub chunk_bytes: usize,
    /// The reader's [`DirectRead::describe`].
    pub reader: String,
}

impl DirectStats {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9)
    }
}

/// The chunks of one range: chunk `k` covers file bytes `[max(base + k·chunk, start),
/// min(base + (k+1)·chunk, end))`, where `base` is `start` rounded down to [`CHUNK_ALIGN`].
#[derive(Debug, Clone, Copy)]
struct Plan {
    start: u64,
    end: u64,
    base: u64,
    chunk: u64,
    chunks: usize,
}

impl Plan {
    fn new(start: u64, len: u64, chunk_bytes: usize) -> Result<Plan> {
        let base = start - start % CHUNK_ALIGN;
        let end = start + len;
        let chunk = chunk_bytes as u64;
        let chunks = usize::try_from((end - base).div_ceil(chunk)).map_err(|_| {
            Error::invalid(format!(
                "{len} bytes in chunks of {chunk_bytes} is too many chunks"
            ))
        })?;
        Ok(Plan {
            start,
            end,
            base,
            chunk,
            chunks,
        })
    }

    /// File range `[from, to)` of chunk `k < chunks`.
    fn range(&self, k: usize) -> (u64, u64) {
        let lo = self.base + k as u64 * self.chunk;
        (lo.max(self.start), (lo + self.chunk).min(self.end))
    }
}

/// Reads `len` bytes of `file` from `offset` into `dst` at `dst_offset`, straight from storage into
/// device memory through `reader`, with `cfg.threads` worker threads reading `cfg.chunk_bytes` at a
/// time. When it returns — success or error — no read is in flight and no worker is running.
///
/// `reader` must come from the device that owns `dst` ([`Device::direct_reader`] of
/// `dst.device()`).
///
/// [`Device::direct_reader`]: crate::device::Device::direct_reader
pub fn load_range_direct(
    reader: &Arc<dyn DirectRead>,
    file: &File,
    offset: u64,
    dst: &DeviceBuffer,
    dst_offset: u64,
    len: u64,
    cfg: DirectConfig,
) -> Result<DirectStats> {
    cfg.validate()?;
    let fits = dst_offset
        .checked_add(len)
        .is_some_and(|e| e <= dst.len() as u64);
    if !fits {
        return Err(Error::invalid(format!(
            "{len} bytes at device offset {dst_offset} do not fit a buffer of {} bytes",
            dst.len()
        )));
    }
    if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
        return Err(Error::invalid(format!(
            "{len} bytes at file offset {offset} run past the largest file offset"
        ))
        .with_path(file.path()));
    }
    let describe = reader.describe();
    if len == 0 {
        return Ok(DirectStats {
            bytes: 0,
            seconds: 0.0,
            chunks: 0,
            threads: 0,
            chunk_bytes: cfg.chunk_bytes,
            reader: describe,
        });
    }
    let plan = Plan::new(offset, len, cfg.chunk_bytes)?;
    let run = Run {
        reader: &**reader,
        file,
        plan,
        dst: dst.ptr() + dst_offset,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    let wanted = cfg.threads.min(plan.chunks);
    let started = Instant::now();
    let mut spawned = 0usize;
    let mut spawn_error = None;
    std::thread::scope(|s| {
        for i in 0..wanted {
            let run = &run;
            let spawn = std::thread::Builder::new()
                .name(format!("gpuio-direct-{i}"))
                .spawn_scoped(s, move || run.work());
            match spawn {
                Ok(_) => spawned += 1,
                Err(e) => {
                    // Carry on with the workers already started; with none, nothing was read.
                    spawn_error = Some(e);
                    break;
                }
            }
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    if let Some((_, e)) = run.error.into_inner() {
        return Err(e);
    }
    if spawned == 0 {
        let why = spawn_error.map_or_else(|| "unknown".to_string(), |e| e.to_string());
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("cannot start a direct-read thread: {why}"),
        ));
    }
    Ok(DirectStats {
        bytes: len,
        seconds,
        chunks: plan.chunks,
        threads: spawned,
        chunk_bytes: cfg.chunk_bytes,
        reader: describe,
    })
}

/// One direct load in progress, shared by its workers.
struct Run<'a> {
    reader: &'a dyn DirectRead,
    file: &'a File,
    plan: Plan,
    /// Device address of `plan.start`.
    dst: u64,
    /// Next chunk to read.
    next: AtomicUsize,
    /// Set by the first error: no new chunk is started after it.
    stop: AtomicBool,
    /// The first error, with its chunk.
    error: Mutex<Option<(usize, Error)>>,
}

impl Run<'_> {
    fn work(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            if k >= self.plan.chunks {
                return;
            }
            if let Err(e) = self.read_chunk(k) {
                let mut first = self.error.lock();
                if first.is_none() {
                    *first = Some((k, e));
                }
                self.stop.store(true, Ordering::Release);
                return;
            }
        }
    }

    fn read_chunk(&self, k: usize) -> Result<()> {
        let (from, to) = self.plan.range(k);
        let want = (to - from) as usize;
        let dst = self.dst + (from - self.plan.start);
        let context = || format!("direct read of chunk {k} at file offset {from}");
        let mut done = 0usize;
        // Every call either makes progress or ends the loop, so it runs at most `want` times.
        while done < want {
            // SAFETY: dst..dst+want lies inside the caller's buffer (checked in load_range_direct:
            // the range fits `dst`), chunks are disjoint, and each chunk is read by one worker only,
            // so nothing else touches these bytes during the call.
            let r = unsafe {
                self.reader.read(
                    self.file,
                    from + done as u64,
                    dst + done as u64,
                    want - done,
                )
            };
            let n = match r {
                Ok(n) => n,
                Err(e) => {
                    let e = if e.path().is_none() {
                        e.with_path(self.file.path())
                    } else {
                        e
                    };
                    return Err(e.with_context(context()));
                }
            };
            if n == 0 {
                let at = from + done as u64;
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "the file ends at byte {at}, before the end of the requested range at byte {}",
                        self.plan.end
                    ),
                )
                .with_op(Op::Read)
                .with_path(self.file.path())
                .with_range(at, self.plan.end - at)
                .with_context(context()));
            }
            if n > want - done {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "{} claims {n} bytes read of {} asked for",
                        self.reader.describe(),
                        want - done
                    ),
                )
                .with_op(Op::Read)
                .with_path(self.file.path())
                .with_context(context()));
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_first_chunk_starts_at_the_range_and_later_ones_are_aligned() {
        let p = Plan::new(5000, 200_000, 64 << 10).unwrap();
        assert_eq!(p.base, 4096);
        let mut at = 5000;
        for k in 0..p.chunks {
            let (from, to) = p.range(k);
            assert_eq!(from, at, "chunk {k} leaves a gap or overlaps");
            assert!(to > from && to - from <= 64 << 10);
            if k > 0 {
                assert_eq!(from % CHUNK_ALIGN, 0, "chunk {k}");
            }
            at = to;
        }
        assert_eq!(at, 205_000);
        assert_eq!(p.chunks, (205_000u64 - 4096).div_ceil(64 << 10) as usize);
    }

    #[test]
    fn config_bounds() {
        assert!(DirectConfig::default().validate().is_ok());
        for (threads, chunk_bytes) in [
            (0, 1 << 20),
            (33, 1 << 20),
            (4, 0),
            (4, 32 << 10),
            (4, (64 << 10) + 512),
            (4, 512 << 20),
        ] {
            let c = DirectConfig {
                threads,
                chunk_bytes,
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{c:?}");
        }
    }
}
