//! Serving a command buffer on the committing thread: small loads and stores of files on a
//! memory-backed filesystem (tmpfs, ramfs). [`transfer`] also serves such requests of a
//! [`LocalQueue`](super::LocalQueue) when they are taken.
//!
//! For such files a read or write is a copy between the page cache and the caller's memory that never
//! waits for a device. Handing it to the engine thread and then to the kernel's io-wq workers (tmpfs
//! has no non-blocking read path, so io_uring punts every request to a worker) costs more than the
//! copy: on two cores the engine served 4 KiB random reads of /dev/shm at 0.86 × fio's rate where a
//! plain `pread` loop on one thread ran at 1.5 × (docs/BENCHMARKS.md, issue 11). So `commit` does such
//! a command buffer itself, with `pread`/`pwrite` on the buffered descriptor, and returns a completion
//! that is already finished.
//!
//! A command buffer is served here only when every command is a load or store of at most
//! [`EngineConfig::inline_max_bytes`](super::EngineConfig::inline_max_bytes) of a memory-backed file
//! and, on a serial queue, nothing else is in flight on the queue (its order holds). Its completion
//! callback still runs on the engine thread (sent there after the work), unless it was registered
//! with `on_complete_any_thread`, which allows the committing thread. Engines built on a custom backend ([`Engine::with_backend`](super::Engine::with_backend),
//! fault injection in tests) never serve anything here: every transfer goes through their backend.
//!
//! Results mean what they mean on the engine thread: the same decision table
//! ([`outcome::classify`]) with the same bounds on retries and short transfers, the same errors
//! (naming file, offset and length), barriers honoured (commands after a failed stage are skipped),
//! the queue's statistics updated. This module must never block on anything but the copy itself, and
//! never serve a file that is not memory-backed.

use std::time::Instant;

use super::command::{CmdKind, CommandError, CommandId, Output, Recorded, Status};
use super::engine::INLINE_MAX_BYTES_MAX;
use super::outcome::{self, AfterShort, Attempt, Verdict};
use super::stats::{QueueStats, Tally};
use crate::backend::IoOp;
use crate::error::{Error, ErrorKind, Op};
use crate::mem::IoBuffer;
use parking_lot::Mutex;

/// Bounds and switches of the inline path, copied from the engine's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InlineLimits {
    /// Largest command served here; 0 turns the path off.
    pub max_bytes: usize,
    pub retries_max: u32,
    pub shorts_max: u32,
}

impl InlineLimits {
    /// Transfers of up to `max_bytes` served on the calling thread, or none when not `allowed` (a
    /// custom backend, which must see every transfer).
    pub(crate) fn new(
        allowed: bool,
        max_bytes: usize,
        retries_max: u32,
        shorts_max: u32,
    ) -> InlineLimits {
        InlineLimits {
            max_bytes: if allowed { max_bytes } else { 0 },
            retries_max,
            shorts_max,
        }
    }
}

/// Refuses an inline transfer limit above [`INLINE_MAX_BYTES_MAX`]: larger copies belong on the copy
/// threads.
pub(crate) fn check_max_bytes(max_bytes: usize) -> crate::error::Result<()> {
    if max_bytes > INLINE_MAX_BYTES_MAX {
        return Err(Error::invalid(format!(
            "inline transfer limit {max_bytes} is above {INLINE_MAX_BYTES_MAX}"
        )));
    }
    Ok(())
}

/// Whether a command buffer can be served on the committing thread.
/// `serial_busy`: the queue is serial and has a command buffer in flight (its order must hold).
pub(crate) fn eligible(limits: &InlineLimits, serial_busy: bool, commands: &[Recorded]) -> bool {
    if limits.max_bytes == 0 || serial_busy || commands.is_empty() {
        return false;
    }
    commands.iter().all(|c| {
        matches!(c.kind, CmdKind::Load { .. } | CmdKind::Store)
            && c.len <= limits.max_bytes as u64
            && c.file.is_memory_backed()
            && (c.kind != CmdKind::Store || c.file.is_writable())
    })
}

/// What serving a command buffer produced, for `CbShared::finish`.
pub(crate) struct Served {
    pub status: Status,
    pub outputs: Vec<Output>,
    pub shared_buf: Option<IoBuffer>,
}

/// Runs every command in order (barriers split them into stages; a failure skips the later stages)
/// and records the transfers in `stats` (without holding its lock while copying: other threads
/// may be serving command buffers of the same queue).
pub(crate) fn serve(
    limits: &InlineLimits,
    mut commands: Vec<Recorded>,
    mut shared_buf: Option<IoBuffer>,
    barriers: &[usize],
    stats: &Mutex<QueueStats>,
) -> Served {
    let mut tally = Tally::new();
    let shared_base = shared_buf
        .as_mut()
        .map_or(std::ptr::null_mut(), |b| b.as_aligned_mut().as_mut_ptr());
    let mut errors: Vec<CommandError> = Vec::new();
    let mut outputs = Vec::with_capacity(commands.len());
    let mut next_barrier = barriers.iter().copied().peekable();
    let mut clock = Instant::now();
    let mut skipping = false;
    for (i, mut rec) in commands.drain(..).enumerate() {
        while next_barrier.peek().is_some_and(|&b| b <= i) {
            next_barrier.next();
            // A stage starts here: it runs only if every earlier command succeeded.
            skipping = !errors.is_empty();
        }
        if skipping {
            errors.push(CommandError {
                command: CommandId(i as u32),
                error: Error::new(
                    ErrorKind::Cancelled,
                    "skipped: a command before a barrier failed",
                ),
            });
            outputs.push(Output {
                buf: rec.buf.take(),
                bytes: 0,
            });
            continue;
        }
        let ptr = match (rec.buf.as_mut(), rec.in_shared) {
            // SAFETY: buf_offset <= buf.len() was checked when the command was recorded.
            (Some(b), _) => unsafe { b.as_aligned_mut().as_mut_ptr().add(rec.buf_offset) },
            // SAFETY: buf_offset + len <= the shared buffer's length was checked when the command was
            // recorded; the shared buffer lives in this function until it returns.
            (None, true) => unsafe { shared_base.add(rec.buf_offset) },
            (None, false) => std::ptr::null_mut(),
        };
        let t = Transfer {
            kind: rec.kind,
            file: &rec.file,
            offset: rec.offset,
            len: rec.len,
        };
        let (bytes, error) = transfer(limits, &t, ptr, &mut tally, stats, &mut clock);
        if let Some(e) = error {
            errors.push(CommandError {
                command: CommandId(i as u32),
                error: e,
            });
        }
        outputs.push(Output {
            buf: rec.buf.take(),
            bytes,
        });
    }
    tally.flush(stats);
    Served {
        status: if errors.is_empty() {
            Status::Complete
        } else {
            Status::Error(errors)
        },
        outputs,
        shared_buf,
    }
}

/// Serves nothing: every command is reported cancelled and its buffer handed back (a handed-over
/// command buffer whose cancel arrived before a worker started it).
pub(crate) fn skip(mut commands: Vec<Recorded>, shared_buf: Option<IoBuffer>) -> Served {
    let outputs = commands
        .iter_mut()
        .map(|rec| Output {
            buf: rec.buf.take(),
            bytes: 0,
        })
        .collect();
    Served {
        status: Status::Cancelled,
        outputs,
        shared_buf,
    }
}

/// One load or store served here.
pub(crate) struct Transfer<'a> {
    pub kind: CmdKind,
    pub file: &'a crate::file::File,
    pub offset: u64,
    pub len: u64,
}

/// One transfer: `pread`/`pwrite` on the buffered descriptor until done, the end of the file, or a
/// verdict of failure. Returns the bytes moved and the error, if any. `ptr..ptr+len` must be memory
/// the caller owns for the call.
pub(crate) fn transfer(
    limits: &InlineLimits,
    rec: &Transfer<'_>,
    ptr: *mut u8,
    tally: &mut Tally,
    stats: &Mutex<QueueStats>,
    clock: &mut Instant,
) -> (u64, Option<Error>) {
    let (op, io_op) = match rec.kind {
        CmdKind::Store => (Op::Write, IoOp::Write),
        _ => (Op::Read, IoOp::Read),
    };
    let fd = rec.file.buffered_fd();
    let len = rec.len as usize;
    let (mut done, mut retries, mut shorts) = (0usize, 0u32, 0u32);
    // One clock read per transfer: each one's end is the next one's start.
    let mut start = *clock;
    while done < len {
        let (at, want) = (rec.offset + done as u64, len - done);
        // SAFETY: ptr..ptr+len is the command's memory (its own buffer or its range of the shared
        // buffer), owned by the command buffer being served; done < len keeps the range inside it.
        let r = unsafe {
            let p = ptr.add(done);
            match io_op {
                IoOp::Write => libc::pwrite(fd, p as *const libc::c_void, want, at as libc::off_t),
                _ => libc::pread(fd, p as *mut libc::c_void, want, at as libc::off_t),
            }
        };
        let result = if r < 0 {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as i64)
        } else {
            r as i64
        };
        let end = Instant::now();
        let moved = result.max(0) as u64;
        match io_op {
            IoOp::Write => tally.op(end - start, 0, moved, stats),
            _ => tally.op(end - start, moved, 0, stats),
        }
        start = end;
        *clock = end;
        let attempt = Attempt {
            op: io_op,
            len: want,
            direct: false,
            block: 512,
            retries,
            retries_max: limits.retries_max,
            shorts,
            shorts_max: limits.shorts_max,
            cancelled: false,
        };
        let fail = |e: Error| e.with_path(rec.file.path()).with_range(at, want as u64);
        match outcome::classify(&attempt, result) {
            Verdict::Complete { n } => done += n,
            Verdict::EndOfFile => break,
            Verdict::Retry => {
                retries += 1;
                tally.retry();
            }
            // Not direct, so never asked to redo buffered; treated as the error it carries.
            Verdict::RedoBuffered => {
                return (done as u64, Some(fail(Error::from_errno(op, libc::EINVAL))))
            }
            Verdict::Fail(f) => return (done as u64, Some(fail(outcome::failure_error(op, f)))),
            Verdict::Short { n, then, .. } => {
                done += n;
                shorts += 1;
                tally.short_transfer();
                if then == AfterShort::GiveUp {
                    return (done as u64, Some(fail(outcome::shorts_error(op, shorts))));
                }
            }
        }
    }
    if rec.kind == (CmdKind::Load { exact: true }) && done < len {
        let e = outcome::eof_error(done as u64, len as u64)
            .with_path(rec.file.path())
            .with_range(rec.offset, rec.len);
        return (done as u64, Some(e));
    }
    (done as u64, None)
}
