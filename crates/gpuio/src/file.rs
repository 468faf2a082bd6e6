//! Where bytes live: an open file with its path, its size, and whether and how it can do direct I/O.
//!
//! A [`File`] holds a buffered descriptor, always, and an `O_DIRECT` descriptor when the filesystem
//! accepts one. The engine sends aligned transfers through the direct descriptor and unaligned heads and
//! tails through bounce buffers or the buffered descriptor, so callers never think about alignment.
//! Whether direct I/O is used, and why not when it is not, is recorded in [`File::direct_reason`].
//!
//! This module opens and describes files; it never issues data I/O itself (that is the backend's job),
//! except for the one aligned probe read that confirms `O_DIRECT` really works on this file.

use std::fmt;
use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Op, Result};
use crate::input;
use crate::mem::AlignedBuf;
use crate::residency;

/// Whether to use direct I/O (`O_DIRECT`, bypassing the OS page cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectMode {
    /// Direct when the filesystem supports it, buffered otherwise (explained in `direct_reason`).
    #[default]
    Auto,
    /// Direct or an [`ErrorKind::Unsupported`] error at open.
    On,
    /// Always through the page cache.
    Off,
}

impl std::str::FromStr for DirectMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<DirectMode> {
        match s {
            "auto" => Ok(DirectMode::Auto),
            "on" => Ok(DirectMode::On),
            "off" => Ok(DirectMode::Off),
            _ => Err(Error::invalid(format!(
                "direct mode '{s}' is not one of auto, on, off"
            ))),
        }
    }
}

/// How to open a [`File`]: a small builder in the style of `std::fs::OpenOptions`.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    read: bool,
    write: bool,
    create: bool,
    truncate: bool,
    direct: DirectMode,
    cold: bool,
    refuse_direct_for_test: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read: true,
            write: false,
            create: false,
            truncate: false,
            direct: DirectMode::Auto,
            cold: false,
            refuse_direct_for_test: false,
        }
    }
}

impl OpenOptions {
    /// Read-only, direct when possible.
    pub fn read() -> OpenOptions {
        OpenOptions::default()
    }
    /// Read and write an existing file.
    pub fn read_write() -> OpenOptions {
        OpenOptions {
            write: true,
            ..OpenOptions::default()
        }
    }
    /// Read and write, creating the file if needed (not truncating).
    pub fn create() -> OpenOptions {
        OpenOptions {
            write: true,
            create: true,
            ..OpenOptions::default()
        }
    }
    pub fn write(mut self, on: bool) -> Self {
        self.write = on;
        self
    }
    pub fn truncate(mut self, on: bool) -> Self {
        self.truncate = on;
        self
    }
    pub fn direct(mut self, mode: DirectMode) -> Self {
        self.direct = mode;
        self
    }
    /// Drop the file's clean pages from the OS page cache when opening it, before anything is decided
    /// from what is cached: for measurements of the device itself (a cold read), and so that a file
    /// just written is not taken for one that is worth reading through the page cache.
    pub fn cold(mut self, on: bool) -> Self {
        self.cold = on;
        self
    }
    /// Behave as if the filesystem refused `O_DIRECT` with EINVAL (as tmpfs did before Linux 6.6), so
    /// that the buffered fallback can be tested on any filesystem.
    #[doc(hidden)]
    pub fn simulate_direct_refusal(mut self) -> Self {
        self.refuse_direct_for_test = true;
        self
    }

    /// Opens `path`.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<File> {
        File::open_with(path.as_ref(), self)
    }
}

/// Direct-I/O alignment rules for one file, from `statx(STATX_DIOALIGN)` where the kernel reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectAlign {
    /// File offsets and lengths of direct transfers must be multiples of this.
    pub offset_align: u32,
    /// Buffer addresses of direct transfers must be multiples of this.
    pub mem_align: u32,
}

static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);

struct FileInner {
    id: u64,
    path: PathBuf,
    buffered: fs::File,
    direct: Option<fs::File>,
    align: DirectAlign,
    direct_reason: String,
    writable: bool,
    /// On a memory-backed filesystem, or warm when opened (see [`File::is_memory_resident`]).
    memory_resident: bool,
    /// On a memory-backed filesystem (tmpfs, ramfs): see [`File::is_memory_backed`].
    memory_backed: bool,
}

/// An open file, cheap to clone (shared).
#[derive(Clone)]
pub struct File(Arc<FileInner>);

impl fmt::Debug for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("File")
            .field("path", &self.0.path)
            .field("direct", &self.is_direct())
            .field("align", &self.0.align)
            .finish()
    }
}

fn os_err(op: Op, path: &Path, e: &std::io::Error) -> Error {
    Error::from_io(op, e).with_path(path)
}

impl File {
    /// Opens `path` read-only (direct when possible).
    pub fn open(path: impl AsRef<Path>) -> Result<File> {
        OpenOptions::read().open(path)
    }

    fn open_with(path: &Path, o: &OpenOptions) -> Result<File> {
        let mut std_opts = fs::OpenOptions::new();
        std_opts
            .read(o.read)
            .write(o.write)
            .create(o.create)
            .truncate(o.truncate);
        // FIFOs, sockets and character devices are refused before they are opened: opening a FIFO
        // blocks until a writer comes, and none of them has a size to read by (see `crate::input`).
        if let Ok(m) = fs::metadata(path) {
            let ft = m.file_type();
            if ft.is_fifo() || ft.is_socket() || ft.is_char_device() {
                return Err(input::refusal(input::Kind::of_type(ft), path));
            }
        }
        // O_NONBLOCK until the type is confirmed, in case the path changed since the stat above.
        let buffered = std_opts
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| os_err(Op::Open, path, &e))?;
        let meta = buffered
            .metadata()
            .map_err(|e| os_err(Op::Stat, path, &e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Error::from_errno(Op::Open, libc::EISDIR).with_path(path));
        }
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(input::refusal(input::Kind::of_type(ft), path));
        }
        // A file opened to be read by its size whose size is 0 may be a pseudo-file (procfs, sysfs)
        // that has content: read by size it would look empty, so it is refused, saying why.
        if o.read && !o.truncate && ft.is_file() && meta.len() == 0 {
            let kind = input::probe_open(&buffered, path)?;
            if kind == input::Kind::Pseudo {
                return Err(input::refusal(kind, path));
            }
        }
        clear_nonblocking(&buffered, path)?;
        let statx_align = dio_align(buffered.as_raw_fd());
        let align = statx_align.unwrap_or(DirectAlign {
            offset_align: 4096,
            mem_align: 4096,
        });

        if o.cold {
            // Dirty pages cannot be dropped: write them back first.
            buffered
                .sync_data()
                .map_err(|e| os_err(Op::Sync, path, &e))?;
            drop_cached_pages(buffered.as_raw_fd(), path)?;
        }
        let memory_backed = residency::is_memory_backed(buffered.as_raw_fd());
        // A warm file opened for reading with the automatic choice is read through the page cache:
        // O_DIRECT would re-read from the device what memory already holds. Sampled once, at open.
        let warm = match (o.direct, o.write, memory_backed, ft.is_file()) {
            (DirectMode::Auto, false, false, true) => {
                residency::page_cache_fraction(buffered.as_raw_fd(), meta.len())
                    .filter(|&f| f >= residency::WARM_FRACTION)
            }
            _ => None,
        };
        let (direct, direct_reason) = match (o.direct, warm) {
            (DirectMode::Off, _) => (
                None,
                "buffered: direct I/O turned off (--direct off)".to_string(),
            ),
            (_, Some(f)) => (
                None,
                format!(
                    "buffered: the file is warm ({:.0} % of sampled pages in the page cache); reading \
                     them from memory beats O_DIRECT from the device",
                    f * 100.0
                ),
            ),
            (mode, None) => match Self::try_direct(path, o, statx_align, &meta) {

                Ok(f) => {
                    let how = match statx_align {
                        Some(a) => format!(
                            "offsets aligned to {} B, memory to {} B (statx)",
                            a.offset_align, a.mem_align
                        ),
                        None => "alignment not reported by statx; assuming 4096 B".to_string(),
                    };
                    (Some(f), format!("direct: O_DIRECT accepted; {how}"))
                }
                Err(why) if mode == DirectMode::On => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("direct I/O requested (--direct on) but impossible: {why}"),
                    )
                    .with_op(Op::Open)
                    .with_path(path));
                }
                Err(why) => (None, format!("buffered: {why}")),
            },
        };
        Ok(File(Arc::new(FileInner {
            id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            buffered,
            direct,
            align,
            direct_reason,
            writable: o.write,
            memory_resident: memory_backed || warm.is_some(),
            memory_backed,
        })))
    }

    /// Opens the `O_DIRECT` descriptor and confirms it works, or says why not.
    fn try_direct(
        path: &Path,
        o: &OpenOptions,
        statx_align: Option<DirectAlign>,
        meta: &fs::Metadata,
    ) -> std::result::Result<fs::File, String> {
        if o.refuse_direct_for_test {
            return Err("the filesystem refused O_DIRECT (EINVAL, simulated)".into());
        }
        if let Some(a) = statx_align {
            if a.offset_align == 0 {
                return Err(
                    "the filesystem reports no direct-I/O support for this file (statx)".into(),
                );
            }
        }
        let f = fs::OpenOptions::new()
            .read(o.read)
            .write(o.write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => "the filesystem refused O_DIRECT (EINVAL)".to_string(),
                _ => format!("opening with O_DIRECT failed: {e}"),
            })?;
        // Some filesystems accept the flag and fail the first transfer: read one aligned block to be sure.
        if o.read && meta.len() > 0 {
            let block = statx_align.map_or(4096, |a| a.offset_align.max(512) as usize);
            let mut probe = AlignedBuf::new(block, block.max(4096)).map_err(|e| e.to_string())?;
            // SAFETY: probe is a live, aligned buffer of `block` bytes.
            let n = unsafe { libc::pread(f.as_raw_fd(), probe.as_mut_ptr().cast(), block, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return Err(format!("O_DIRECT opened but an aligned read failed: {e}"));
            }
        }
        Ok(f)
    }

    /// How many handles share this open file (backends free registrations only held by themselves).
    pub(crate) fn ref_count(&self) -> usize {
        Arc::strong_count(&self.0)
    }

    /// A process-unique id (used by backends to key registered files).
    pub fn id(&self) -> u64 {
        self.0.id
    }
    pub fn path(&self) -> &Path {
        &self.0.path
    }
    /// Whether transfers use `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.0.direct.is_some()
    }
    /// Why the file is (or is not) using direct I/O.
    pub fn direct_reason(&self) -> &str {
        &self.0.direct_reason
    }
    pub fn align(&self) -> DirectAlign {
        self.0.align
    }
    /// Whether reads are expected to be served from memory: the file lives on tmpfs or ramfs, or the
    /// page cache held it when it was opened for reading (then it is read buffered). Backends copy
    /// large reads of such files on several threads (see `backend::uring`).
    pub fn is_memory_resident(&self) -> bool {
        self.0.memory_resident
    }
    /// Whether the file lives on a memory-backed filesystem (tmpfs, ramfs), where a transfer is a
    /// copy to or from the page cache that never waits for a device (small ones are then served on
    /// the committing thread: see [`EngineConfig::inline_max_bytes`](crate::EngineConfig)).
    pub fn is_memory_backed(&self) -> bool {
        self.0.memory_backed
    }
    pub fn is_writable(&self) -> bool {
        self.0.writable
    }
    /// The descriptor aligned transfers use (direct when available).
    pub fn fast_fd(&self) -> RawFd {
        self.0
            .direct
            .as_ref()
            .unwrap_or(&self.0.buffered)
            .as_raw_fd()
    }
    /// The buffered descriptor (unaligned transfers, fallbacks).
    pub fn buffered_fd(&self) -> RawFd {
        self.0.buffered.as_raw_fd()
    }
    /// The current size in bytes (asks the OS each time: files being written grow).
    pub fn len(&self) -> Result<u64> {
        let meta = self
            .0
            .buffered
            .metadata()
            .map_err(|e| os_err(Op::Stat, &self.0.path, &e))?;
        if meta.file_type().is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
            let rc = unsafe { libc::ioctl(self.0.buffered.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                return Err(os_err(Op::Stat, &self.0.path, &e));
            }
            return Ok(size);
        }
        Ok(meta.len())
    }
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Sets the file's length (extends with zeros or truncates).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.0
            .buffered
            .set_len(len)
            .map_err(|e| os_err(Op::Write, &self.0.path, &e).with_range(len, 0))
    }
    /// Drops this file's clean pages from the OS page cache (for cold-cache measurements).
    pub fn drop_page_cache(&self) -> Result<()> {
        drop_cached_pages(self.0.buffered.as_raw_fd(), &self.0.path)
    }
    /// Flushes data and metadata to stable storage, synchronously.
    pub fn sync_all(&self) -> Result<()> {
        self.0
            .buffered
            .sync_all()
            .map_err(|e| os_err(Op::Sync, &self.0.path, &e))
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Clears `O_NONBLOCK` on a descriptor opened with it: io_uring honours the flag on regular files
/// (a read that would wait fails with EAGAIN instead of being queued).
fn clear_nonblocking(f: &fs::File, path: &Path) -> Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: plain fcntl calls on an open descriptor.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(os_err(Op::Open, path, &e));
    }
    Ok(())
}

/// Drops the clean pages of `fd` from the OS page cache.
fn drop_cached_pages(fd: RawFd, path: &Path) -> Result<()> {
    // SAFETY: plain advisory syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::from_errno(Op::Setup, rc).with_path(path));
    }
    Ok(())
}

/// Direct-I/O alignment from `statx(STATX_DIOALIGN)`, or `None` where the kernel does not report it.
fn dio_align(fd: RawFd) -> Option<DirectAlign> {
    // SAFETY: statx fills the zeroed struct; the empty path with AT_EMPTY_PATH names `fd` itself.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let rc = libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        );
        if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
            return None;
        }
        Some(DirectAlign {
            offset_align: stx.stx_dio_offset_align,
            mem_align: stx.stx_dio_mem_align,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_path_and_cause() {
        let e = File::open("/nonexistent/gpuio-test").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("/nonexistent/gpuio-test"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = File::open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::IsADirectory, "{e}");
    }

    #[test]
    fn fifos_char_devices_and_pseudo_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: plain syscall with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without the check this open would wait for a writer forever.
        let e = File::open(&fifo).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = File::open("/dev/zero").unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let e = File::open("/proc/self/mountinfo").unwrap_err();
        assert!(e.to_string().contains("size of 0 but has content"), "{e}");
        // An empty regular file is just empty; a new file opened to be written is fine.
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(File::open(&empty).unwrap().len().unwrap(), 0);
        let new = OpenOptions::create().open(dir.path().join("new")).unwrap();
        assert!(new.is_writable());
        // The descriptor kept is blocking again (io_uring would fail reads with EAGAIN otherwise).
        let f = File::open(&empty).unwrap();
        // SAFETY: plain fcntl on an open descriptor.
        let flags = unsafe { libc::fcntl(f.buffered_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn direct_auto_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 10000]).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(f.len().unwrap(), 10000);
        assert!(!f.direct_reason().is_empty());
        let refused = OpenOptions::read()
            .cold(true)
            .simulate_direct_refusal()
            .open(&p)
            .unwrap();
        assert!(!refused.is_direct());
        assert!(refused.direct_reason().contains("refused O_DIRECT"));
        let e = OpenOptions::read()
            .direct(DirectMode::On)
            .simulate_direct_refusal()
            .open(&p)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("--direct on"), "{e}");
    }

    #[test]
    fn warm_files_are_read_buffered_and_cold_ones_direct() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 4 << 20]).unwrap();
        let probe = File::open(&p).unwrap();
        if residency::is_memory_backed(probe.buffered_fd()) {
            eprintln!(
                "skipped: the temporary directory is memory-backed; nothing is ever cold there"
            );
            return;
        }
        // Just written: warm, read through the page cache, and said so.
        assert!(!probe.is_direct(), "{}", probe.direct_reason());
        assert!(probe.is_memory_resident());
        assert!(
            probe.direct_reason().contains("warm"),
            "{}",
            probe.direct_reason()
        );
        // Opened for writing, or with an explicit mode: residency decides nothing.
        let rw = OpenOptions::read_write().open(&p).unwrap();
        assert!(
            !rw.direct_reason().contains("warm"),
            "{}",
            rw.direct_reason()
        );
        let on = OpenOptions::read().direct(DirectMode::On).open(&p);
        if let Ok(on) = on {
            assert!(on.is_direct());
        }
        // Dropped first: cold, direct where the filesystem allows it.
        let cold = OpenOptions::read().cold(true).open(&p).unwrap();
        assert!(
            !cold.direct_reason().contains("warm"),
            "{}",
            cold.direct_reason()
        );
        assert!(!cold.is_memory_resident());
    }

    #[test]
    fn files_on_tmpfs_are_memory_resident() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("skipped: no /dev/shm on this machine");
            return;
        };
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let f = OpenOptions::read().cold(true).open(&p).unwrap();
        assert!(f.is_memory_resident(), "{}", f.direct_reason());
    }
}
