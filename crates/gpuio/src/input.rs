//! What a path is, found without blocking, before a command reads it by offset and size.
//!
//! The engine reads files by offset and size. Some paths have neither, and reading them that way goes
//! wrong silently or hangs:
//!
//! - FIFOs, sockets and character devices have no size and no offsets, and opening a FIFO for
//!   reading blocks until a writer comes. [`probe`] refuses them from `stat(2)` alone, without
//!   opening them (opening some character devices has effects, a tape rewinds).
//! - Pseudo-files (procfs, sysfs) are regular files whose `stat` size is 0 although reading them
//!   returns bytes. Read by their size they look empty. [`probe`] opens an empty regular file with
//!   `O_NONBLOCK` and reads one byte to tell ([`Kind::Pseudo`]); [`read_pseudo`] reads one to its
//!   end, sequentially, up to a limit.
//!
//! Block devices are files with a size (`BLKGETSIZE64`) and stay valid inputs.
//!
//! Also here: [`FileId`], the device and inode that say whether two paths are the same file (through
//! symbolic and hard links), and [`escape`], for printing names that may hold control characters.

use std::fmt;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, ErrorKind, Op, Result};

/// Bytes read at a time from a pseudo-file.
pub const SEQUENTIAL_READ_BYTES: usize = 1 << 20;

/// What a path is, as far as reading it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file whose `stat` size is its length.
    Regular,
    /// A regular file that reports size 0 but has content (procfs, sysfs): read it sequentially.
    Pseudo,
    /// A block device: its size comes from the device.
    BlockDevice,
    Directory,
    Fifo,
    Socket,
    CharDevice,
}

impl Kind {
    /// Whether the engine can read it by offset and size.
    pub fn has_size(self) -> bool {
        matches!(self, Kind::Regular | Kind::BlockDevice)
    }
    /// The kind a file type names (a regular file counts as [`Kind::Regular`]).
    pub fn of_type(ft: fs::FileType) -> Kind {
        if ft.is_file() {
            Kind::Regular
        } else if ft.is_dir() {
            Kind::Directory
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            Kind::CharDevice
        }
    }
}

/// The device and inode of a file: equal for two paths to the same file, whatever links lead there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of_metadata(m: &fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
    /// The file `path` names (symbolic links followed); `None` if nothing is there.
    pub fn of_path(path: &Path) -> Result<Option<FileId>> {
        match fs::metadata(path) {
            Ok(m) => Ok(Some(FileId::of_metadata(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::from_io(Op::Stat, &e).with_path(path)),
        }
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub kind: Kind,
    pub id: FileId,
    /// Permission bits.
    pub mode: u32,
    /// The `stat` size (0 for a pseudo-file and for a block device).
    pub size: u64,
}

/// The error for reading `path`, of kind `kind`, by offset and size: names the path and why.
pub fn refusal(kind: Kind, path: &Path) -> Error {
    let what =
        match kind {
            Kind::Directory => return Error::from_errno(Op::Open, libc::EISDIR).with_path(path),
            Kind::Fifo => "a FIFO (named pipe)",
            Kind::Socket => "a socket",
            Kind::CharDevice => "a character device",
            Kind::Pseudo => return Error::new(
                ErrorKind::Unsupported,
                "reports a size of 0 but has content (a procfs or sysfs file?): it cannot be read \
                 by offset and size; copy it to a regular file first",
            )
            .with_op(Op::Open)
            .with_path(path),
            Kind::Regular | Kind::BlockDevice => "a file",
        };
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "{what}, not a regular file or block device: it has no size to read by; \
             copy it to a regular file first"
        ),
    )
    .with_op(Op::Open)
    .with_path(path)
}

/// Finds what `path` is (symbolic links followed) without blocking: FIFOs, sockets and character
/// devices are judged from `stat` alone, never opened; an empty regular file is opened with
/// `O_NONBLOCK` and one byte read from it to tell an empty file from a pseudo-file.
pub fn probe(path: &Path) -> Result<Probe> {
    let meta = fs::metadata(path).map_err(|e| Error::from_io(Op::Stat, &e).with_path(path))?;
    let mut kind = Kind::of_type(meta.file_type());
    if kind == Kind::Regular && meta.len() == 0 {
        let f = open_nonblocking(path)?;
        kind = probe_open(&f, path)?;
    }
    Ok(Probe {
        kind,
        id: FileId::of_metadata(&meta),
        mode: meta.mode() & 0o7777,
        size: meta.len(),
    })
}

/// Opens `path` read-only with `O_NONBLOCK` (and `O_NOCTTY`): an open that cannot block.
pub fn open_nonblocking(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::from_io(Op::Open, &e).with_path(path))
}

/// What the open file `f` is: like [`probe`], from `fstat` and, for a regular file of size 0, a
/// one-byte read at offset 0. `f` should be open with `O_NONBLOCK` so that the read cannot hang.
pub fn probe_open(f: &fs::File, path: &Path) -> Result<Kind> {
    let meta = f
        .metadata()
        .map_err(|e| Error::from_io(Op::Stat, &e).with_path(path))?;
    let kind = Kind::of_type(meta.file_type());
    if kind != Kind::Regular || meta.len() != 0 {
        return Ok(kind);
    }
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a live local.
    let n = unsafe { libc::pread(f.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, 0) };
    if n > 0 {
        return Ok(Kind::Pseudo);
    }
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "reading it would block: a stream, not a file with a size",
            )
            .with_op(Op::Read)
            .with_path(path));
        }
        // ESPIPE and the like: no offsets to read at, so not a file the engine can read either.
        if e.raw_os_error() == Some(libc::ESPIPE) {
            return Ok(Kind::Pseudo);
        }
        return Err(Error::from_io(Op::Read, &e)
            .with_path(path)
            .with_range(0, 1));
    }
    Ok(Kind::Regular)
}

/// Reads a pseudo-file (or any readable file) from its start to its end, sequentially, in pieces of
/// [`SEQUENTIAL_READ_BYTES`], handing each to `each`; fails once more than `limit` bytes have come.
/// The file is opened with `O_NONBLOCK`: a read that would block fails instead. Returns the bytes read.
pub fn read_sequential(
    path: &Path,
    limit: u64,
    each: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<u64> {
    let mut f = open_nonblocking(path)?;
    let kind = probe_open(&f, path)?;
    if !matches!(kind, Kind::Regular | Kind::Pseudo) {
        return Err(refusal(kind, path));
    }
    let mut buf = vec![0u8; SEQUENTIAL_READ_BYTES];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::from_io(Op::Read, &e)
                    .with_path(path)
                    .with_range(total, buf.len() as u64))
            }
        };
        if total + n as u64 > limit {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "has more than {limit} bytes, the most read from a file of unknown size; \
                     copy it to a regular file first"
                ),
            )
            .with_op(Op::Read)
            .with_path(path));
        }
        each(&buf[..n])?;
        total += n as u64;
    }
}

/// [`read_sequential`] into memory: the whole content of a file of unknown size, at most `limit` bytes.
pub fn read_pseudo(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    read_sequential(path, limit, &mut |b| {
        out.extend_from_slice(b);
        Ok(())
    })?;
    Ok(out)
}

/// A name as it can be printed on one line: control characters (newline, escape, ...) and the
/// backslash are written as Rust escapes (`\n`, `\u{1b}`, `\\`); everything else is left as it is.
pub fn escape(name: &str) -> Escaped<'_> {
    Escaped(name)
}

/// See [`escape`].
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
            if c.is_control() || c == '\\' {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// [`escape`] for a path (its bytes read as UTF-8, invalid sequences replaced).
pub fn escape_path(path: &Path) -> String {
    escape(&path.to_string_lossy()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_found_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(probe(&f).unwrap().kind, Kind::Regular);
        let empty = dir.path().join("empty");
        fs::write(&empty, b"").unwrap();
        assert_eq!(probe(&empty).unwrap().kind, Kind::Regular);
        assert_eq!(probe(dir.path()).unwrap().kind, Kind::Directory);
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: plain syscall with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(probe(&fifo).unwrap().kind, Kind::Fifo);
        let e = refusal(Kind::Fifo, &fifo);
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert_eq!(
            probe(Path::new("/dev/null")).unwrap().kind,
            Kind::CharDevice
        );
        assert_eq!(
            probe(Path::new("/proc/self/mountinfo")).unwrap().kind,
            Kind::Pseudo
        );
        let e = probe(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn pseudo_files_are_read_to_their_end_within_a_limit() {
        let got = read_pseudo(Path::new("/proc/self/mountinfo"), 64 << 20).unwrap();
        assert!(!got.is_empty());
        let e = read_pseudo(Path::new("/proc/self/mountinfo"), 3).unwrap_err();
        assert!(e.to_string().contains("more than 3 bytes"), "{e}");
    }

    #[test]
    fn file_ids_see_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        let hard = dir.path().join("hard");
        fs::hard_link(&f, &hard).unwrap();
        let soft = dir.path().join("soft");
        std::os::unix::fs::symlink("f", &soft).unwrap();
        let id = FileId::of_path(&f).unwrap();
        assert!(id.is_some());
        assert_eq!(FileId::of_path(&hard).unwrap(), id);
        assert_eq!(FileId::of_path(&soft).unwrap(), id);
        assert_eq!(FileId::of_path(&dir.path().join("none")).unwrap(), None);
    }

    #[test]
    fn names_are_escaped_for_one_line() {
        assert_eq!(
            escape("a\nb\u{1b}[31m\\c d").to_string(),
            "a\\nb\\u{1b}[31m\\\\c d"
        );
        assert_eq!(escape("layers/0.bin é").to_string(), "layers/0.bin é");
    }
}
