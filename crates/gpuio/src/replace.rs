//! Crash-safe replacement of a file: the new version is written beside the old one and swapped in whole.
//!
//! [`ReplaceFile::create`] makes a temporary file in the destination's directory, named
//! `.NAME.PID-RAND.tmp`, for the caller to write (through [`ReplaceFile::as_file`], or through the
//! engine with [`ReplaceFile::open`]). [`ReplaceFile::commit`] then
//!
//! 1. gives it its final permission bits (the old file's, or [`set_mode`](ReplaceFile::set_mode)'s),
//! 2. flushes it to stable storage (`fsync`),
//! 3. renames it over the destination (`rename(2)` is atomic within a filesystem), and
//! 4. flushes the directory (`fsync`), so that the rename itself survives a power loss.
//!
//! A crash at any moment — the process killed, or the machine losing power — leaves at the destination
//! either the old complete file (or nothing, if there was none) or the new complete file, never a mix.
//! Dropped without a commit (an error, a panic), a `ReplaceFile` removes its temporary file.
//!
//! What replacing a file by rename means, and how this module handles it:
//!
//! - The destination must be a regular file or absent: renaming over a device node or a FIFO would
//!   replace the node itself, so those are refused ([`ErrorKind::Unsupported`]).
//! - A destination that is a symbolic link is followed (at most [`SYMLINK_HOPS_MAX`] links): the file it
//!   points to is replaced, as `cp` would write through it, and the link stays a link.
//! - The new file is a new inode: other hard links to the old file keep the old contents; the owner is
//!   carried over where the process may set it (root), else it is the writer's; extended attributes and
//!   ACLs are not copied.
//! - A process killed with SIGKILL cannot remove its temporary file. [`remove_stale_temps`] removes the
//!   temporary files of a destination left by processes that no longer exist (`gpuio cp` runs it before
//!   each copy).
//!
//! # Temporaries removed on a signal
//!
//! Every temporary file a `ReplaceFile` creates is registered ([`register_temp`]) until it is renamed
//! into place or removed. The first registration installs a handler for SIGINT, SIGTERM and SIGHUP —
//! for each only if its disposition is still the default, so a program's own handler or an ignored
//! signal (`nohup`) is left alone — that removes every registered temporary file and then re-raises
//! the signal with its default action, so the process still dies of it (exit status and core dump as
//! without the handler). The handler only calls `unlink(2)`, `sigaction(2)` and `raise(3)`, which are
//! async-signal-safe. Other scratch files (a benchmark's scratch file, a command's outputs written in
//! place) can be registered the same way: [`register_temp`] returns a [`TempRegistration`] that
//! unregisters the path when dropped (it never removes the file itself). SIGKILL cannot be caught:
//! there, [`remove_stale_temps`] is what cleans up, on the next run.
//!
//! # Checks before replacing
//!
//! [`check_destination`] is what a command runs before it replaces a file: the destination must not
//! be one of the command's own inputs (same device and inode, through symbolic or hard links), and a
//! file the user could not write (no write permission bit, or `access(W_OK)` fails), or one in a
//! directory the user cannot write, is replaced only when the caller says so (`--force`).
//!
//! This module creates, renames, syncs and removes files; it never writes file data itself.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

use crate::error::{Error, ErrorKind, Op, Result};
use crate::file::{DirectMode, File, OpenOptions};
use crate::input::FileId;

/// Symbolic links followed from the destination before giving up (Linux's own limit, `ELOOP`).
pub const SYMLINK_HOPS_MAX: usize = 40;
/// Names tried for the temporary file before giving up (each is random; a clash is astronomically rare).
const TEMP_ATTEMPTS_MAX: u32 = 16;
/// Bytes of the destination's name kept in the temporary file's name, so that the whole name fits in
/// the 255 bytes of `NAME_MAX`: `.` + name + `.` + pid (≤ 10) + `-` + 8 hex digits + `.tmp`.
const TEMP_NAME_KEPT_MAX: usize = 255 - 25;

/// A new version of a file being written beside the old one; see the module docs.
#[derive(Debug)]
pub struct ReplaceFile {
    dest: PathBuf,
    temp: PathBuf,
    file: fs::File,
    /// Permission bits to give the new file at commit, if set explicitly.
    mode: Option<u32>,
    /// Mode, owner and group of the file being replaced.
    old: Option<(u32, u32, u32)>,
    /// Renamed into place (nothing to remove any more).
    renamed: bool,
    /// The temporary file's entry in the list a signal handler removes (dropped after the rename or
    /// the removal).
    registration: Option<TempRegistration>,
}

impl ReplaceFile {
    /// Starts a new version of `dest`: creates its temporary file (mode 0600 until the commit) in
    /// `dest`'s directory. Fails if the directory does not exist or cannot be written, or if `dest`
    /// is a directory or not a regular file.
    pub fn create(dest: impl AsRef<Path>) -> Result<ReplaceFile> {
        let dest = resolve_symlinks(dest.as_ref())?;
        let old = match fs::metadata(&dest) {
            Ok(m) if m.is_file() => Some((m.mode() & 0o7777, m.uid(), m.gid())),
            Ok(m) if m.is_dir() => {
                return Err(Error::from_errno(Op::Open, libc::EISDIR).with_path(&dest))
            }
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "not a regular file: a crash-safe replacement renames a new file over it",
                )
                .with_op(Op::Open)
                .with_path(&dest))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::from_io(Op::Stat, &e).with_path(&dest)),
        };
        let (dir, name) = split(&dest)?;
        let mut attempt = 0;
        loop {
            let temp = dir.join(temp_name(&name, std::process::id(), random_u32()));
            // Registered before it exists, so that no signal finds it created but not registered (the
            // name holds this process's PID: nobody else's file is ever removed by it).
            let registration = register_temp(&temp);
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
            {
                Ok(file) => {
                    let registration = Some(registration);
                    return Ok(ReplaceFile {
                        dest,
                        temp,
                        file,
                        mode: None,
                        old,
                        renamed: false,
                        registration,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    attempt += 1;
                    if attempt >= TEMP_ATTEMPTS_MAX {
                        return Err(Error::from_io(Op::Open, &e).with_path(&temp));
                    }
                }
                // Name the directory: it is what is missing or read-only.
                Err(e) => return Err(Error::from_io(Op::Open, &e).with_path(&dir)),
            }
        }
    }

    /// The file being replaced (after following symbolic links).
    pub fn dest(&self) -> &Path {
        &self.dest
    }
    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }
    /// The temporary file, for plain writes.
    pub fn as_file(&self) -> &fs::File {
        &self.file
    }
    /// Whether a file was at the destination when this replacement started.
    pub fn replaces_existing(&self) -> bool {
        self.old.is_some()
    }

    /// Opens the temporary file for the engine (`load`/`store` through an [`crate::IoQueue`]),
    /// direct as `direct` says.
    pub fn open(&self, direct: DirectMode) -> Result<File> {
        OpenOptions::read_write().direct(direct).open(&self.temp)
    }

    /// Permission bits (`0o7777` at most) the new file gets at commit. Default: those of the file it
    /// replaces, or `0o666` less the process's umask for a new file.
    pub fn set_mode(&mut self, mode: u32) {
        self.mode = Some(mode & 0o7777);
    }

    /// Makes the new version the file at the destination: permissions, `fsync`, rename, directory
    /// `fsync` (see the module docs). On an error before the rename the destination is untouched and
    /// the temporary file is removed. An error from the last step (the directory's `fsync`) means the
    /// new version is in place but its rename may not survive a power loss.
    pub fn commit(mut self) -> Result<()> {
        let fd = self.file.as_raw_fd();
        let mode = self
            .mode
            .or(self.old.map(|(m, _, _)| m))
            .unwrap_or(0o666 & !process_umask());
        // SAFETY: plain syscall on an owned descriptor.
        if unsafe { libc::fchmod(fd, mode as libc::mode_t) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::from_io(Op::Write, &e).with_path(&self.temp));
        }
        if let Some((_, uid, gid)) = self.old {
            // SAFETY: geteuid/getegid have no preconditions.
            let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
            if (uid, gid) != (euid, egid) {
                // Best effort (see the module docs): only a privileged process may give a file away.
                // SAFETY: plain syscall on an owned descriptor.
                let _ = unsafe { libc::fchown(fd, uid, gid) };
            }
        }
        self.file
            .sync_all()
            .map_err(|e| Error::from_io(Op::Sync, &e).with_path(&self.temp))?;
        fs::rename(&self.temp, &self.dest)
            .map_err(|e| Error::from_io(Op::Write, &e).with_path(&self.dest))?;
        self.renamed = true;
        self.registration = None;
        let (dir, _) = split(&self.dest)?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::from_io(Op::Sync, &e).with_path(&dir))
    }
}

impl Drop for ReplaceFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Removes the temporary files that replacements of `dest` left behind when their process died before
/// it could (a SIGKILL, a power loss): those named `.NAME.PID-RAND.tmp` whose PID is not a running
/// process. Temporary files of this process and of live ones are kept. Returns the files removed.
///
/// A PID is judged in this process's PID namespace: do not share a directory between containers whose
/// processes replace the same file.
pub fn remove_stale_temps(dest: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dest = resolve_symlinks(dest.as_ref())?;
    let (dir, name) = split(&dest)?;
    let mut prefix = vec![b'.'];
    prefix.extend_from_slice(kept_name(&name));
    prefix.push(b'.');
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::from_io(Op::Open, &e).with_path(&dir)),
    };
    let mut removed = Vec::new();
    for item in rd {
        let item = item.map_err(|e| Error::from_io(Op::Read, &e).with_path(&dir))?;
        let file_name = item.file_name();
        let Some(pid) = temp_pid(file_name.as_bytes(), &prefix) else {
            continue;
        };
        if pid == std::process::id() || process_exists(pid) {
            continue;
        }
        let path = item.path();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            // Another cleaner got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::from_io(Op::Write, &e).with_path(&path)),
        }
    }
    Ok(removed)
}

/// Whether `name` is the name of a temporary file of a replacement of `dest` (made by this or another
/// process, finished or not): `.NAME.PID-XXXXXXXX.tmp`. For commands that read a directory and must
/// not take the temporary file of their own output for an input.
pub fn is_temp_of(dest: &Path, name: &OsStr) -> bool {
    let Some(dest_name) = dest.file_name() else {
        return false;
    };
    let mut prefix = vec![b'.'];
    prefix.extend_from_slice(kept_name(&dest_name.to_os_string()));
    prefix.push(b'.');
    temp_pid(name.as_bytes(), &prefix).is_some()
}

/// An input of a command, for [`check_destination`]: its identity and its name as the user wrote it.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub id: FileId,
    pub name: String,
}

/// Checks `dest` before a command replaces it (see the module docs); returns whether a file is there.
///
/// - `dest` (symbolic links followed) is one of `inputs` (same device and inode): refused, always
///   ([`ErrorKind::InvalidInput`]): it would be replaced while being read.
/// - Unless `force`: an existing regular file without any write permission bit, or one this user may
///   not write (`access(W_OK)`), and a destination whose directory this user may not write, are refused
///   ([`ErrorKind::PermissionDenied`], naming the file or directory and the way out).
///
/// Nothing is created or changed.
pub fn check_destination(dest: &Path, inputs: &[InputFile], force: bool) -> Result<bool> {
    let resolved = resolve_symlinks(dest)?;
    let meta = match fs::metadata(&resolved) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::from_io(Op::Stat, &e).with_path(dest)),
    };
    if let Some(m) = &meta {
        let id = FileId::of_metadata(m);
        if let Some(input) = inputs.iter().find(|i| i.id == id) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the output is the input file itself ({}): it would be replaced while being read",
                    crate::input::escape(&input.name)
                ),
            )
            .with_path(dest));
        }
    }
    if force {
        return Ok(meta.is_some());
    }
    if let Some(m) = &meta {
        if m.is_file() {
            let mode = m.mode() & 0o7777;
            if mode & 0o222 == 0 {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "permission denied: the file is write-protected (mode {mode:04o}); \
                         use --force to replace it"
                    ),
                )
                .with_op(Op::Open)
                .with_path(dest));
            }
            if !may_write(&resolved) {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    "permission denied: this user may not write the file; use --force to replace it",
                )
                .with_op(Op::Open)
                .with_path(dest));
            }
        }
    }
    let (dir, _) = split(&resolved)?;
    if dir.is_dir() && !may_write(&dir) {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            "permission denied: this user may not write the directory the file is replaced in",
        )
        .with_op(Op::Open)
        .with_path(&dir));
    }
    Ok(meta.is_some())
}

/// `access(path, W_OK)`, with the real user's rights (as a command's user expects).
fn may_write(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: plain syscall with a valid C string.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

// -------------------------------------------------------------------------------------------------
// Temporary files removed when a signal ends the process (see the module docs).

/// Temporary files registered at once; more are not removed on a signal (their `Drop` and
/// [`remove_stale_temps`] still remove them).
pub const TEMP_REGISTRATIONS_MAX: usize = 256;

/// Registered temporary paths: leaked `CString`s, owned by whoever swaps them out of the slot (the
/// unregistering thread, which frees it, or the signal handler, which never frees).
static TEMP_SLOTS: [AtomicPtr<libc::c_char>; TEMP_REGISTRATIONS_MAX] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; TEMP_REGISTRATIONS_MAX];
static HANDLERS: Once = Once::new();
/// The signals after which registered temporaries are removed.
pub const CLEANUP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A temporary path registered for removal on SIGINT, SIGTERM or SIGHUP; unregistered when dropped
/// (the file itself is left as it is).
#[derive(Debug)]
pub struct TempRegistration {
    slot: Option<usize>,
}

impl TempRegistration {
    /// Whether the path made it into the list (false when [`TEMP_REGISTRATIONS_MAX`] are taken).
    pub fn is_registered(&self) -> bool {
        self.slot.is_some()
    }
}

impl Drop for TempRegistration {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let p = TEMP_SLOTS[i].swap(std::ptr::null_mut(), Ordering::AcqRel);
            if !p.is_null() {
                // SAFETY: `p` came from `CString::into_raw` in `register_temp`, and swapping it out
                // made this thread its only owner.
                drop(unsafe { CString::from_raw(p) });
            }
        }
    }
}

/// Registers `path` (made absolute, so a later change of directory does not matter) to be removed if
/// SIGINT, SIGTERM or SIGHUP ends the process, installing the handler the first time; see the module
/// docs. Keep the returned registration while the file exists, drop it once the file is renamed away
/// or removed.
pub fn register_temp(path: &Path) -> TempRegistration {
    HANDLERS.call_once(install_handlers);
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(c) = CString::new(abs.into_os_string().into_vec()) else {
        return TempRegistration { slot: None };
    };
    let raw = c.into_raw();
    for (i, slot) in TEMP_SLOTS.iter().enumerate() {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            return TempRegistration { slot: Some(i) };
        }
    }
    // SAFETY: `raw` came from `into_raw` above and was never shared.
    drop(unsafe { CString::from_raw(raw) });
    TempRegistration { slot: None }
}

fn install_handlers() {
    for sig in CLEANUP_SIGNALS {
        // SAFETY: sigaction with zeroed, then filled, structures; the handler is async-signal-safe.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction != libc::SIG_DFL
            {
                continue; // someone else's handler, or ignored (nohup): theirs to keep
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction =
                on_cleanup_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut new.sa_mask);
            for s in CLEANUP_SIGNALS {
                libc::sigaddset(&mut new.sa_mask, s);
            }
            new.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &new, std::ptr::null_mut());
        }
    }
}

/// Removes every registered temporary file, then lets `sig` do what it does by default.
extern "C" fn on_cleanup_signal(sig: libc::c_int) {
    for slot in &TEMP_SLOTS {
        let p = slot.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !p.is_null() {
            // SAFETY: a NUL-terminated path from `register_temp`, now owned here and never freed.
            unsafe { libc::unlink(p) };
        }
    }
    // SAFETY: async-signal-safe calls; the signal is blocked while this handler runs, so the raised
    // one is delivered, with the default action, as the handler returns.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut dfl.sa_mask);
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        libc::raise(sig);
    }
}

/// Follows `path` while it is a symbolic link.
fn resolve_symlinks(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..SYMLINK_HOPS_MAX {
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target =
                    fs::read_link(&p).map_err(|e| Error::from_io(Op::Stat, &e).with_path(&p))?;
                p = match p.parent() {
                    Some(parent) if target.is_relative() => parent.join(target),
                    _ => target,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(Error::from_errno(Op::Open, libc::ELOOP).with_path(path))
}

/// The directory (`.` for a bare name) and the file name of `dest`.
fn split(dest: &Path) -> Result<(PathBuf, OsString)> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::invalid("the destination has no file name").with_path(dest))?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name.to_os_string()))
}

/// The part of a destination's name that goes into its temporary files' names.
fn kept_name(name: &OsString) -> &[u8] {
    let b = name.as_bytes();
    &b[..b.len().min(TEMP_NAME_KEPT_MAX)]
}

fn temp_name(name: &OsString, pid: u32, rand: u32) -> OsString {
    let mut b = vec![b'.'];
    b.extend_from_slice(kept_name(name));
    b.extend_from_slice(format!(".{pid}-{rand:08x}.tmp").as_bytes());
    OsString::from_vec(b)
}

/// The PID in a temporary file's name `PREFIX PID-XXXXXXXX.tmp`, if `name` is one.
fn temp_pid(name: &[u8], prefix: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_suffix(b".tmp")?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (pid, rand) = rest.split_once('-')?;
    let hex_ok = rand.len() == 8 && rand.bytes().all(|c| c.is_ascii_hexdigit());
    let pid_ok = !pid.is_empty() && pid.bytes().all(|c| c.is_ascii_digit());
    (hex_ok && pid_ok).then(|| pid.parse().ok()).flatten()
}

/// Whether a process with this PID exists (a zombie counts, and so does one we may not signal).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return true; // never a real process's temporary file: leave it alone
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// A random-enough 32-bit value for a temporary name: the time and a process-wide counter, mixed.
fn random_u32() -> u32 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = t
        ^ SEQ
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .rotate_left(17)
        ^ u64::from(std::process::id()) << 32;
    // splitmix64's finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// The process's umask, read without changing it (`/proc/self/status`, Linux 4.7+); 022 if unknown.
pub fn process_umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn temps(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn commit_replaces_and_keeps_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        fs::write(&dest, b"old").unwrap();
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o640)).unwrap();
        let r = ReplaceFile::create(&dest).unwrap();
        assert!(r.replaces_existing());
        assert_eq!(r.temp_path().parent(), Some(dir.path()));
        let name = r
            .temp_path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with(".f.") && name.ends_with(".tmp"),
            "temporary name {name}"
        );
        r.as_file().write_all(b"new contents").unwrap();
        assert_eq!(
            fs::read(&dest).unwrap(),
            b"old",
            "not visible before commit"
        );
        r.commit().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new contents");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn drop_without_commit_leaves_the_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        fs::write(&dest, b"old").unwrap();
        let r = ReplaceFile::create(&dest).unwrap();
        r.as_file().write_all(b"half").unwrap();
        assert_eq!(temps(dir.path()).len(), 1);
        drop(r);
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        assert!(temps(dir.path()).is_empty());
        // A new file that is never committed never appears.
        let fresh = dir.path().join("fresh");
        drop(ReplaceFile::create(&fresh).unwrap());
        assert!(!fresh.exists());
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn explicit_mode_and_umask_default() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let mut r = ReplaceFile::create(&a).unwrap();
        r.set_mode(0o751);
        r.commit().unwrap();
        assert_eq!(
            fs::metadata(&a).unwrap().permissions().mode() & 0o7777,
            0o751
        );
        let b = dir.path().join("b");
        ReplaceFile::create(&b).unwrap().commit().unwrap();
        assert_eq!(
            fs::metadata(&b).unwrap().permissions().mode() & 0o7777,
            0o666 & !process_umask()
        );
    }

    #[test]
    fn symlinks_are_followed_and_stay_links() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("target", &link).unwrap();
        let r = ReplaceFile::create(&link).unwrap();
        assert_eq!(r.dest(), target);
        r.as_file().write_all(b"new").unwrap();
        r.commit().unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink("loop", &looped).unwrap();
        assert_eq!(
            ReplaceFile::create(&looped).unwrap_err().errno(),
            Some(libc::ELOOP)
        );
    }

    #[test]
    fn refusals_name_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let e = ReplaceFile::create(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::IsADirectory, "{e}");
        let e = ReplaceFile::create("/dev/null").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        let missing = dir.path().join("no-such-dir/f");
        let e = ReplaceFile::create(&missing).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("no-such-dir"), "{e}");
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("data.bin");
        let name = OsString::from("data.bin");
        // A PID that is not running: a child that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = dir.path().join(temp_name(&name, dead, 0xdead_beef));
        let live = dir.path().join(temp_name(&name, 1, 0x1234_5678)); // init runs
        let other = dir
            .path()
            .join(temp_name(&OsString::from("other"), dead, 1));
        let unrelated = dir.path().join(".data.bin.notatemp");
        for p in [&stale, &live, &other, &unrelated] {
            fs::write(p, b"x").unwrap();
        }
        let mine = ReplaceFile::create(&dest).unwrap();
        let removed = remove_stale_temps(&dest).unwrap();
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists());
        for p in [&live, &other, &unrelated, &mine.temp.clone()] {
            assert!(p.exists(), "{} must be kept", p.display());
        }
    }

    #[test]
    fn destinations_that_are_inputs_or_write_protected_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::write(&input, b"in").unwrap();
        let hard = dir.path().join("hard");
        fs::hard_link(&input, &hard).unwrap();
        let inputs = [InputFile {
            id: FileId::of_path(&input).unwrap().unwrap(),
            name: "in".into(),
        }];
        for same in [&input, &hard] {
            let e = check_destination(same, &inputs, true).unwrap_err();
            assert!(e.to_string().contains("input file itself"), "{e}");
        }
        let ro = dir.path().join("ro");
        fs::write(&ro, b"keep").unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o444)).unwrap();
        let e = check_destination(&ro, &inputs, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(check_destination(&ro, &inputs, true).unwrap());
        assert!(!check_destination(&dir.path().join("new"), &inputs, false).unwrap());
    }

    #[test]
    fn temps_of_a_destination_are_recognised() {
        let dest = Path::new("/x/p.gpk");
        let t = temp_name(&OsString::from("p.gpk"), 42, 7);
        assert!(is_temp_of(dest, &t));
        assert!(!is_temp_of(dest, OsStr::new("p.gpk")));
        assert!(!is_temp_of(
            dest,
            &temp_name(&OsString::from("q.gpk"), 42, 7)
        ));
    }

    #[test]
    fn registrations_come_and_go() {
        let reg = register_temp(Path::new("gpuio-registration-test"));
        let slot = reg.slot.expect("a free slot");
        let p = TEMP_SLOTS[slot].load(Ordering::Acquire);
        assert!(!p.is_null());
        // SAFETY: the slot is this registration's until it is dropped.
        let path = unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes().to_vec();
        assert!(path.starts_with(b"/") && path.ends_with(b"/gpuio-registration-test"));
        drop(reg);
        assert_ne!(TEMP_SLOTS[slot].load(Ordering::Acquire), p);
    }

    #[test]
    fn long_names_still_fit() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("n".repeat(255));
        let r = ReplaceFile::create(&dest).unwrap();
        assert!(r.temp_path().file_name().unwrap().len() <= 255);
        r.commit().unwrap();
        assert!(dest.exists());
        let name = OsString::from("n".repeat(255));
        let prefix = [&b"."[..], kept_name(&name), b"."].concat();
        assert_eq!(
            temp_pid(temp_name(&name, 4_000_000_000, 7).as_bytes(), &prefix),
            Some(4_000_000_000)
        );
    }
}
