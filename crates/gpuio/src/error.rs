//! One error type for the whole engine: a matchable [`ErrorKind`] plus the context a user needs to act on
//! it (the operation, the file, the offset and length, the OS error).
//!
//! The meaning of each errno is decided once, in [`ErrorKind::from_errno`]; callers never match raw errno
//! values. Errors are cheap to clone so that a command's error can be reported by `status()` and by `wait()`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What went wrong, as something a caller can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file does not exist.
    NotFound,
    /// The OS refused access (EACCES, EPERM, EROFS).
    PermissionDenied,
    /// A path names a directory where a file was needed.
    IsADirectory,
    /// An argument is out of range or inconsistent (zero queue depth, unaligned size, ...).
    InvalidInput,
    /// An exact read reached the end of the file before its last byte.
    UnexpectedEof,
    /// The device reported an I/O error (EIO) or another unrecoverable OS error.
    Io,
    /// The device or filesystem is full (ENOSPC, EDQUOT, EFBIG).
    NoSpace,
    /// The platform, kernel or filesystem cannot do what was asked (no io_uring, no O_DIRECT, ...).
    Unsupported,
    /// A memory budget or bounded queue is exhausted and the caller asked not to wait.
    WouldBlock,
    /// The work was cancelled before it completed.
    Cancelled,
    /// Retries of a transient condition (EINTR, EAGAIN, short transfer) ran out.
    RetriesExhausted,
    /// Stored bytes fail a check (checksum, verify header, format).
    Corrupt,
    /// The engine stopped (its thread ended) while work was outstanding.
    EngineStopped,
    /// An accelerator (device) memory allocation failed: the device is full.
    OutOfMemory,
}

impl ErrorKind {
    /// The single place where an errno gets its meaning.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            libc::ENOENT => ErrorKind::NotFound,
            libc::EACCES | libc::EPERM | libc::EROFS => ErrorKind::PermissionDenied,
            libc::EISDIR => ErrorKind::IsADirectory,
            libc::EINVAL | libc::EFAULT | libc::EBADF | libc::ENAMETOOLONG | libc::ENOTDIR => {
                ErrorKind::InvalidInput
            }
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorKind::NoSpace,
            libc::ENOSYS | libc::EOPNOTSUPP | libc::ENODEV | libc::ENXIO => ErrorKind::Unsupported,
            libc::ECANCELED => ErrorKind::Cancelled,
            libc::EINTR | libc::EAGAIN => ErrorKind::RetriesExhausted,
            _ => ErrorKind::Io,
        }
    }

    /// Whether a condition with this errno is worth retrying as-is (within a bound).
    pub fn errno_is_transient(errno: i32) -> bool {
        errno == libc::EINTR || errno == libc::EAGAIN
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::IsADirectory => "is a directory",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::UnexpectedEof => "unexpected end of file",
            ErrorKind::Io => "I/O error",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::WouldBlock => "would block",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::RetriesExhausted => "retries exhausted",
            ErrorKind::Corrupt => "corrupt data",
            ErrorKind::EngineStopped => "engine stopped",
            ErrorKind::OutOfMemory => "out of device memory",
        }
    }
}

/// The operation that failed, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Open,
    Read,
    Write,
    Sync,
    Stat,
    Setup,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Sync => "sync",
            Op::Stat => "stat",
            Op::Setup => "setup",
        })
    }
}

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    op: Option<Op>,
    path: Option<PathBuf>,
    offset: Option<u64>,
    len: Option<u64>,
    errno: Option<i32>,
    message: String,
    /// What the caller was doing, outermost first (`"pipeline write stage, slot 3"`).
    context: Option<String>,
}

/// An engine error: kind, context and message. Clone is cheap (shared).
#[derive(Clone)]
pub struct Error(Arc<Inner>);

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message; add context with the builder methods.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error(Arc::new(Inner {
            kind,
            op: None,
            path: None,
            offset: None,
            len: None,
            errno: None,
            message: message.into(),
            context: None,
        }))
    }

    /// An error from an errno, its kind decided by [`ErrorKind::from_errno`].
    pub fn from_errno(op: Op, errno: i32) -> Error {
        let mut e = Error::new(
            ErrorKind::from_errno(errno),
            io::Error::from_raw_os_error(errno).to_string(),
        );
        let inner = Arc::get_mut(&mut e.0).expect("fresh error is unique");
        inner.op = Some(op);
        inner.errno = Some(errno);
        e
    }

    /// An error from a `std::io::Error` (its errno kept when there is one).
    pub fn from_io(op: Op, err: &io::Error) -> Error {
        match err.raw_os_error() {
            Some(errno) => Error::from_errno(op, errno),
            None => {
                let kind = match err.kind() {
                    io::ErrorKind::NotFound => ErrorKind::NotFound,
                    io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                    io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                    io::ErrorKind::UnexpectedEof => ErrorKind::UnexpectedEof,
                    io::ErrorKind::Unsupported => ErrorKind::Unsupported,
                    _ => ErrorKind::Io,
                };
                Error::new(kind, err.to_string()).with_op(op)
            }
        }
    }

    /// An [`ErrorKind::InvalidInput`] error.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidInput, message)
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Error {
        match Arc::get_mut(&mut self.0) {
            Some(inner) => {
                f(inner);
                self
            }
            None => {
                let i = &self.0;
                let mut inner = Inner {
                    kind: i.kind,
                    op: i.op,
                    path: i.path.clone(),
                    offset: i.offset,
                    len: i.len,
                    errno: i.errno,
                    message: i.message.clone(),
                    context: i.context.clone(),
                };
                f(&mut inner);
                Error(Arc::new(inner))
            }
        }
    }

    /// Names the operation that failed.
    pub fn with_op(self, op: Op) -> Error {
        self.edit(|i| i.op = Some(op))
    }
    /// Names the file.
    pub fn with_path(self, path: &Path) -> Error {
        self.edit(|i| i.path = Some(path.to_path_buf()))
    }
    /// Names the byte range.
    pub fn with_range(self, offset: u64, len: u64) -> Error {
        self.edit(|i| {
            i.offset = Some(offset);
            i.len = Some(len);
        })
    }
    /// Replaces the kind (e.g. a transient errno whose retries ran out).
    pub fn with_kind(self, kind: ErrorKind) -> Error {
        self.edit(|i| i.kind = kind)
    }
    /// Says what the caller was doing when the error happened; printed first. Kind, errno, file and
    /// range stay as they were, so the error can still be matched on. Contexts added later (by outer
    /// callers) come first.
    pub fn with_context(self, context: impl Into<String>) -> Error {
        let outer = context.into();
        self.edit(|i| {
            i.context = Some(match i.context.take() {
                Some(inner) => format!("{outer}: {inner}"),
                None => outer,
            })
        })
    }

    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }
    pub fn op(&self) -> Option<Op> {
        self.0.op
    }
    pub fn path(&self) -> Option<&Path> {
        self.0.path.as_deref()
    }
    pub fn offset(&self) -> Option<u64> {
        self.0.offset
    }
    /// Length of the byte range the failed operation covered.
    pub fn range_len(&self) -> Option<u64> {
        self.0.len
    }
    /// The OS error number, when the error came from the OS.
    pub fn errno(&self) -> Option<i32> {
        self.0.errno
    }
    pub fn message(&self) -> &str {
        &self.0.message
    }
    /// What the caller was doing, if one said (see [`with_context`](Self::with_context)).
    pub fn context(&self) -> Option<&str> {
        self.0.context.as_deref()
    }
}

impl fmt::Display for Error {
    /// One line: `read /data/x at offset 4096 (+512 bytes): I/O error: Input/output error (os error 5)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.0;
        if let Some(c) = &i.context {
            write!(f, "{c}: ")?;
        }
        let mut wrote = false;
        if let Some(op) = i.op {
            write!(f, "{op}")?;
            wrote = true;
        }
        if let Some(p) = &i.path {
            // Escaped: a name with a newline or an escape sequence stays one harmless line.
            let sep = if wrote { " " } else { "" };
            write!(f, "{sep}{}", crate::input::escape_path(p))?;
            wrote = true;
        }
        if let Some(off) = i.offset {
            write!(f, "{}at offset {off}", if wrote { " " } else { "" })?;
            if let Some(len) = i.len {
                write!(f, " (+{len} bytes)")?;
            }
            wrote = true;
        }
        if wrote {
            f.write_str(": ")?;
        }
        let desc = i.kind.describe();
        if i.message.is_empty() || i.message == desc {
            f.write_str(desc)
        } else if i.errno.is_some() {
            write!(f, "{desc}: {}", i.message)
        } else {
            f.write_str(&i.message)
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?}: {self})", self.0.kind)
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e.errno() {
            Some(errno) => io::Error::new(io::Error::from_raw_os_error(errno).kind(), e),
            None => io::Error::other(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_offset_and_cause() {
        let e = Error::from_errno(Op::Read, libc::EIO)
            .with_path(Path::new("/data/x"))
            .with_range(4096, 512);
        let s = e.to_string();
        assert!(
            s.starts_with("read /data/x at offset 4096 (+512 bytes): I/O error"),
            "{s}"
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.errno(), Some(libc::EIO));
    }

    #[test]
    fn errno_meanings() {
        assert_eq!(ErrorKind::from_errno(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(ErrorKind::from_errno(libc::ENOENT), ErrorKind::NotFound);
        assert_eq!(
            ErrorKind::from_errno(libc::EACCES),
            ErrorKind::PermissionDenied
        );
        assert!(ErrorKind::errno_is_transient(libc::EINTR));
        assert!(!ErrorKind::errno_is_transient(libc::EIO));
    }

    #[test]
    fn context_is_printed_first_and_keeps_the_kind() {
        let e = Error::from_errno(Op::Write, libc::ENOSPC)
            .with_path(Path::new("/data/y"))
            .with_range(8192, 4096)
            .with_context("slot 2")
            .with_context("pipeline write stage");
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), Some(libc::ENOSPC));
        assert_eq!(e.offset(), Some(8192));
        assert_eq!(e.context(), Some("pipeline write stage: slot 2"));
        let s = e.to_string();
        assert!(
            s.starts_with("pipeline write stage: slot 2: write /data/y at offset 8192"),
            "{s}"
        );
    }

    #[test]
    fn paths_with_control_characters_print_escaped_on_one_line() {
        let e = Error::from_errno(Op::Open, libc::ENOENT)
            .with_path(Path::new("/data/a\nb\u{1b}[31m\\c"))
            .with_range(7, 1);
        let s = e.to_string();
        assert!(!s.contains('\n') && !s.contains('\u{1b}'), "{s:?}");
        assert!(
            s.starts_with("open /data/a\\nb\\u{1b}[31m\\\\c at offset 7 (+1 bytes): not found"),
            "{s}"
        );
        // A name without control characters prints as it is.
        let e = Error::invalid("bad").with_path(Path::new("/data/layers/0 é.bin"));
        assert_eq!(e.to_string(), "/data/layers/0 é.bin: bad");
    }

    #[test]
    fn context_on_shared_error_copies() {
        let a = Error::invalid("bad");
        let b = a.clone().with_range(1, 2);
        assert_eq!(a.offset(), None);
        assert_eq!(b.offset(), Some(1));
    }
}
