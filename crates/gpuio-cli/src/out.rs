//! Standard output and standard error for every subcommand.
//!
//! `println!` panics when standard output cannot be written (a full disk behind `> file`, `> /dev/full`,
//! a reader that went away). Every subcommand writes through [`outln!`](crate::outln) and
//! [`out!`](crate::out) instead, which return a [`gpuio::Result`]: a failed write becomes an error that
//! ends the command like any other, with one line on standard error
//! (`gpuio: error: writing standard output: No space left on device`) and exit status 1. `main` flushes
//! standard output at the end and checks that too, so a buffered line that fails late is not lost
//! silently.
//!
//! A reader that went away (`gpuio info x | head -0`: `EPIPE`) is not an error of ours. The command
//! stops there, its temporary files are removed as on any other early return, nothing is printed, and
//! the process then ends the way coreutils' commands do when the pipe closes: killed by `SIGPIPE` with
//! its default action, which a shell shows as status 141 (128 + 13). Rust ignores `SIGPIPE` in its
//! start-up code, so the write itself returns `EPIPE` rather than killing the process in the middle of
//! its work; [`exit_if_stdout_closed`] raises the signal once the command has cleaned up.
//!
//! Notes and warnings on standard error go through [`errln!`](crate::errln), which ignores a failure to
//! write them (there is nowhere left to report it).

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use gpuio::error::{Error, ErrorKind};

/// Set once a write to standard output failed with `EPIPE`.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// The name a stdout write error carries as its path (in errors made by code that writes to a
/// `dyn Write` it was given, such as `pack_cmd::stream_entry`).
pub(crate) const STDOUT_NAME: &str = "<stdout>";

/// The error for a failed write to standard output; records a closed pipe for
/// [`exit_if_stdout_closed`].
pub(crate) fn stdout_error(e: &std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(errno) => {
            if errno == libc::EPIPE {
                STDOUT_CLOSED.store(true, Ordering::SeqCst);
            }
            let why = std::io::Error::from_raw_os_error(errno).to_string();
            let why = why.split(" (os error").next().unwrap_or(&why).to_string();
            Error::new(
                ErrorKind::from_errno(errno),
                format!("writing standard output: {why}"),
            )
        }
        None => Error::new(ErrorKind::Io, format!("writing standard output: {e}")),
    }
}

/// Turns an error from code that wrote to standard output under the name [`STDOUT_NAME`] into
/// [`stdout_error`]'s form; other errors are returned as they are.
pub(crate) fn from_stdout_write(e: Error) -> Error {
    match (e.path(), e.errno()) {
        (Some(p), Some(errno)) if p == Path::new(STDOUT_NAME) => {
            stdout_error(&std::io::Error::from_raw_os_error(errno))
        }
        _ => e,
    }
}

/// Writes formatted text to standard output; see the module docs. Used by [`out!`](crate::out).
pub(crate) fn write_fmt(args: fmt::Arguments<'_>) -> gpuio::Result<()> {
    if STDOUT_CLOSED.load(Ordering::SeqCst) {
        return Err(stdout_error(&std::io::Error::from_raw_os_error(
            libc::EPIPE,
        )));
    }
    std::io::stdout()
        .lock()
        .write_fmt(args)
        .map_err(|e| stdout_error(&e))
}

/// Flushes standard output (done by `main` after every command).
pub(crate) fn flush() -> gpuio::Result<()> {
    std::io::stdout()
        .lock()
        .flush()
        .map_err(|e| stdout_error(&e))
}

/// Writes formatted text to standard error, ignoring failure. Used by [`errln!`](crate::errln).
pub(crate) fn err_fmt(args: fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// Whether a write to standard output found the reader gone.
pub(crate) fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::SeqCst)
}

/// If standard output's reader went away, ends the process as coreutils does: `SIGPIPE` with its
/// default action (see the module docs). Returns only if it did not go away (or the signal did not end
/// the process).
pub(crate) fn exit_if_stdout_closed() {
    if !stdout_closed() {
        return;
    }
    // SAFETY: restoring the default disposition of SIGPIPE and raising it; every command has returned
    // and cleaned up by now.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
}

/// `print!` that returns a [`gpuio::Result`] instead of panicking; see [`crate::out`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write_fmt(format_args!($($arg)*))
    };
}

/// `println!` that returns a [`gpuio::Result`] instead of panicking; see [`crate::out`].
macro_rules! outln {
    () => {
        $crate::out::write_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that never panics (a failure to write standard error is ignored).
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::err_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}
