//! What one raw backend result means for the task that issued it: the engine's single decision table
//! (retry, continue, fall back, done, fail), as a pure function so that every row is tested on its
//! own (see the tests below and docs/design.md, "The backend is a dumb submission/completion pair").
//!
//! This module decides; it never touches a task, a buffer or a statistic. The engine thread applies
//! the verdict.

use crate::backend::IoOp;
use crate::error::{Error, ErrorKind, Op};

/// Everything about a task that the decision depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub op: IoOp,
    /// Bytes the request asked for.
    pub len: usize,
    /// It went through the `O_DIRECT` descriptor.
    pub direct: bool,
    /// The file's direct-I/O block.
    pub block: u64,
    /// Transient errors retried so far, and the bound.
    pub retries: u32,
    pub retries_max: u32,
    /// Short transfers continued so far, and the bound.
    pub shorts: u32,
    pub shorts_max: u32,
    /// The command buffer was cancelled: nothing is retried or continued.
    pub cancelled: bool,
}

/// What to do after a short transfer of `n` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterShort {
    /// Issue the rest.
    Continue,
    /// The command buffer was cancelled: keep the bytes, issue nothing more.
    Stop,
    /// One short transfer too many.
    GiveUp,
}

/// Why a task failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The kernel's error; `exhausted` when it was transient and the retries ran out.
    Errno { errno: i32, exhausted: bool },
    /// A write kept transferring zero bytes.
    ZeroWrites,
}

/// The verdict on one raw result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Every byte asked for (or the sync) is done.
    Complete {
        n: usize,
    },
    /// A read found the end of the file.
    EndOfFile,
    /// `EINTR`, `EAGAIN`, or a write of zero bytes: issue the same request again.
    Retry,
    /// `EINVAL` on a direct transfer: redo it on the buffered descriptor.
    RedoBuffered,
    /// `n` bytes of `len` moved. `direct` says whether the rest may stay direct (not if the transfer
    /// stopped off a block boundary).
    Short {
        n: usize,
        direct: bool,
        then: AfterShort,
    },
    Fail(Failure),
}

/// Decides what `result` (bytes, or `-errno`) means for `a`.
pub(crate) fn classify(a: &Attempt, result: i64) -> Verdict {
    let may_retry = a.retries < a.retries_max && !a.cancelled;
    if result < 0 {
        let errno = (-result) as i32;
        let transient = ErrorKind::errno_is_transient(errno);
        return if transient && may_retry {
            Verdict::Retry
        } else if errno == libc::EINVAL && a.direct && !a.cancelled {
            Verdict::RedoBuffered
        } else {
            Verdict::Fail(Failure::Errno {
                errno,
                exhausted: transient,
            })
        };
    }
    let n = result as usize;
    if a.op == IoOp::Sync || n == a.len {
        return Verdict::Complete { n };
    }
    if n == 0 {
        return match a.op {
            IoOp::Read => Verdict::EndOfFile,
            _ if may_retry => Verdict::Retry,
            _ => Verdict::Fail(Failure::ZeroWrites),
        };
    }
    let then = if a.shorts + 1 > a.shorts_max {
        AfterShort::GiveUp
    } else if a.cancelled {
        AfterShort::Stop
    } else {
        AfterShort::Continue
    };
    Verdict::Short {
        n,
        direct: a.direct && (n as u64) % a.block == 0,
        then,
    }
}

/// The error a [`Verdict::Fail`] reports; the caller adds the file and range.
pub(crate) fn failure_error(op: Op, failure: Failure) -> Error {
    match failure {
        Failure::Errno { errno, exhausted } => {
            let e = Error::from_errno(op, errno);
            if exhausted {
                e.with_kind(ErrorKind::RetriesExhausted)
            } else {
                e
            }
        }
        Failure::ZeroWrites => Error::new(
            ErrorKind::RetriesExhausted,
            "write kept transferring zero bytes",
        )
        .with_op(op),
    }
}

/// The error of a short transfer with [`AfterShort::GiveUp`], after `shorts` in a row; the caller adds
/// the file and range.
pub(crate) fn shorts_error(op: Op, shorts: u32) -> Error {
    Error::new(
        ErrorKind::RetriesExhausted,
        format!("{shorts} short transfers in a row"),
    )
    .with_op(op)
}

/// The error of an exact read that met the end of the file after `done` of `len` bytes.
pub(crate) fn eof_error(done: u64, len: u64) -> Error {
    Error::new(
        ErrorKind::UnexpectedEof,
        format!("end of file after {done} of {len} bytes"),
    )
    .with_op(Op::Read)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 64 << 10;

    fn attempt(op: IoOp) -> Attempt {
        Attempt {
            op,
            len: LEN,
            direct: true,
            block: 4096,
            retries: 0,
            retries_max: 8,
            shorts: 0,
            shorts_max: 64,
            cancelled: false,
        }
    }

    fn errno(e: i32) -> i64 {
        -(e as i64)
    }

    /// One row per line of the decision table in docs/design.md.
    #[test]
    fn every_row_of_the_table() {
        use AfterShort::*;
        use IoOp::*;
        let read = attempt(Read);
        let write = attempt(Write);
        let buffered = Attempt {
            direct: false,
            ..read
        };
        let out_of_retries = Attempt { retries: 8, ..read };
        let out_of_shorts = Attempt { shorts: 64, ..read };
        let cancelled = Attempt {
            cancelled: true,
            ..read
        };
        #[rustfmt::skip]
        let rows: Vec<(&str, Attempt, i64, Verdict)> = vec![
            ("whole read", read, LEN as i64, Verdict::Complete { n: LEN }),
            ("whole write", write, LEN as i64, Verdict::Complete { n: LEN }),
            ("sync", attempt(Sync), 0, Verdict::Complete { n: 0 }),
            ("EINTR retried", read, errno(libc::EINTR), Verdict::Retry),
            ("EAGAIN retried", write, errno(libc::EAGAIN), Verdict::Retry),
            ("EINTR out of retries", out_of_retries, errno(libc::EINTR),
                Verdict::Fail(Failure::Errno { errno: libc::EINTR, exhausted: true })),
            ("EINTR when cancelled", cancelled, errno(libc::EINTR),
                Verdict::Fail(Failure::Errno { errno: libc::EINTR, exhausted: true })),
            ("EINVAL direct falls back", read, errno(libc::EINVAL), Verdict::RedoBuffered),
            ("EINVAL buffered fails", buffered, errno(libc::EINVAL),
                Verdict::Fail(Failure::Errno { errno: libc::EINVAL, exhausted: false })),
            ("EINVAL direct cancelled fails", cancelled, errno(libc::EINVAL),
                Verdict::Fail(Failure::Errno { errno: libc::EINVAL, exhausted: false })),
            ("EIO fails at once", read, errno(libc::EIO),
                Verdict::Fail(Failure::Errno { errno: libc::EIO, exhausted: false })),
            ("ENOSPC fails at once", write, errno(libc::ENOSPC),
                Verdict::Fail(Failure::Errno { errno: libc::ENOSPC, exhausted: false })),
            ("read of 0 is end of file", read, 0, Verdict::EndOfFile),
            ("write of 0 retried", write, 0, Verdict::Retry),
            ("write of 0 out of retries", Attempt { retries: 8, ..write }, 0,
                Verdict::Fail(Failure::ZeroWrites)),
            ("short on a block boundary stays direct", read, 8192,
                Verdict::Short { n: 8192, direct: true, then: Continue }),
            ("short off a block boundary goes buffered", read, 1000,
                Verdict::Short { n: 1000, direct: false, then: Continue }),
            ("short buffered stays buffered", buffered, 8192,
                Verdict::Short { n: 8192, direct: false, then: Continue }),
            ("short when cancelled stops", cancelled, 8192,
                Verdict::Short { n: 8192, direct: true, then: Stop }),
            ("one short too many", out_of_shorts, 8192,
                Verdict::Short { n: 8192, direct: true, then: GiveUp }),
        ];
        for (name, a, result, want) in rows {
            assert_eq!(classify(&a, result), want, "{name}");
        }
    }
}
