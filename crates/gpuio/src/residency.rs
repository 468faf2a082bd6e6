//! Whether a file's bytes are already in memory: on a memory-backed filesystem (tmpfs, ramfs), or
//! found in the OS page cache by sampling (`mincore` over a read-only mapping, which faults nothing in).
//!
//! The answer decides two things when a file opens (see `file.rs`): a warm file is read through the
//! page cache rather than re-read from the device with `O_DIRECT`, and large reads of memory-resident
//! data are copied by several threads rather than by the one engine thread (see `backend::uring`).
//! This module only looks; it never reads file data or changes what is cached.

use std::os::fd::RawFd;

/// `statfs` magic numbers of filesystems whose data always lives in memory.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Windows sampled by [`page_cache_fraction`], spread evenly over the file.
const SAMPLE_WINDOWS: u64 = 64;
/// Pages per sampled window.
const SAMPLE_PAGES: u64 = 16;

/// Fraction of sampled pages that must be cached for a file to count as warm.
pub const WARM_FRACTION: f64 = 0.9;

/// `fd` is a regular file on a filesystem that keeps its data in memory (tmpfs, ramfs), if `fstat`
/// and `fstatfs` can tell. A device node is never memory-backed, whatever `/dev` is mounted as: a
/// block device on devtmpfs reports tmpfs's magic, and its reads go to the device.
pub fn is_memory_backed(fd: RawFd) -> bool {
    // SAFETY: fstat and fstatfs fill zeroed structs for an open descriptor.
    unsafe {
        let mut meta: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut meta) != 0 || meta.st_mode & libc::S_IFMT != libc::S_IFREG {
            return false;
        }
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd, &mut st) != 0 {
            return false;
        }
        let magic = st.f_type as i64;
        magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
    }
}

/// Fraction (0..=1) of `fd`'s first `len` bytes that the page cache holds, from up to
/// `SAMPLE_WINDOWS × SAMPLE_PAGES` pages spread over the file; `None` if it cannot tell (empty file,
/// mapping refused).
pub fn page_cache_fraction(fd: RawFd, len: u64) -> Option<f64> {
    if len == 0 || len > isize::MAX as u64 {
        return None;
    }
    let page = page_size();
    let pages = len.div_ceil(page);
    // SAFETY: a read-only shared mapping of an open descriptor; it is never dereferenced (mincore
    // reads page-table and page-cache state only) and is unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let windows = SAMPLE_WINDOWS.min(pages.div_ceil(SAMPLE_PAGES)).max(1);
    let stride = pages / windows;
    let mut vec = [0u8; SAMPLE_PAGES as usize];
    let (mut seen, mut cached) = (0u64, 0u64);
    for w in 0..windows {
        let first = w * stride;
        let n = SAMPLE_PAGES.min(pages - first);
        // SAFETY: first + n <= pages, so the range lies inside the mapping; vec holds n bytes.
        let rc = unsafe {
            libc::mincore(
                base.cast::<u8>().add((first * page) as usize).cast(),
                (n * page) as usize,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            continue;
        }
        seen += n;
        cached += vec[..n as usize].iter().filter(|&&b| b & 1 != 0).count() as u64;
    }
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(base, len as usize) };
    (seen > 0).then(|| cached as f64 / seen as f64)
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a system constant.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn cached_and_dropped_pages_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 8 << 20]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        if is_memory_backed(f.as_raw_fd()) {
            eprintln!(
                "skipped: the target directory is on a memory-backed filesystem, nothing to drop"
            );
            return;
        }
        // Just written: in the page cache.
        let warm = page_cache_fraction(f.as_raw_fd(), 8 << 20).unwrap();
        assert!(warm >= WARM_FRACTION, "freshly written file {warm} cached");
        // Written back and dropped: not cached.
        f.sync_all().unwrap();
        // SAFETY: advisory syscall on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let cold = page_cache_fraction(f.as_raw_fd(), 8 << 20).unwrap();
        assert!(cold < 0.1, "dropped file {cold} cached");
    }

    #[test]
    fn shm_is_memory_backed_and_empty_files_have_no_fraction() {
        let f = std::fs::File::open("/dev/shm").map(|_| ());
        if f.is_err() {
            eprintln!("skipped: no /dev/shm on this machine");
            return;
        }
        let t = tempfile::tempfile_in("/dev/shm").unwrap();
        assert!(is_memory_backed(t.as_raw_fd()));
        assert_eq!(page_cache_fraction(t.as_raw_fd(), 0), None);
    }

    #[test]
    fn device_nodes_are_never_memory_backed() {
        // /dev is devtmpfs, which reports tmpfs's magic; a device's reads still go to the device
        // (served inline or by copy threads, a disk's reads would block the caller).
        for dev in ["/dev/null", "/dev/zero"] {
            let f = std::fs::File::open(dev).unwrap();
            assert!(!is_memory_backed(f.as_raw_fd()), "{dev}");
        }
        // The directory itself is not a regular file either.
        let d = std::fs::File::open("/dev/shm").unwrap();
        assert!(!is_memory_backed(d.as_raw_fd()));
    }
}
