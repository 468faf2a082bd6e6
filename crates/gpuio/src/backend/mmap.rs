//! The mmap engine: reads are copies out of a shared read-only mapping of the file, faulted in by worker
//! threads (so page faults overlap the way queued I/O does), with `madvise` advice applied to each mapping
//! (finding 226) and optional `MAP_POPULATE`.
//!
//! Writes go through `pwrite` on the file's buffered descriptor: a store through a mapping cannot extend
//! a file, and it would fault every destination page in from disk only to overwrite it. Mappings are made
//! on first use and remade when the file has grown.
//!
//! **Files that shrink.** Touching a mapped page that lies wholly past the end of the file raises SIGBUS,
//! which kills the process by default — so another process truncating a file we read would kill us with
//! no message. Two defences, both in this file:
//!
//! 1. Each read asks the file's length first (`fstat`) and copies no more than the file holds, so a file
//!    that shrank before the read gives a short read (end of file), exactly as `pread` would.
//! 2. A file that shrinks *during* the copy is caught by [`copy_from_mapping`]: it marks the source range
//!    on its thread, and a process-wide SIGBUS handler that finds the faulting address inside the marked
//!    range records the fault and maps zero pages over the rest of that range (`MAP_FIXED`), so the copy
//!    runs to its end instead of dying; the copy then reports the fault, and its bytes are discarded.
//!    A copy that may have read such zero pages — its own fault, or another thread's fault whose zeroed
//!    range overlaps what it read — is retried on a fresh mapping of the file's new length (a short
//!    read, or `EIO` if the pages still cannot be read — a SIGBUS also reports a failed read-in); a
//!    cached mapping is dropped once a fault has zeroed part of it. The handler records each zeroed
//!    range in a small ring ([`FAULT_RANGES`]), so faults on one file's mapping cost another file's
//!    reads nothing; only when the ring has been lapped, or a record is being written, is a read
//!    retried without knowing. Faults anywhere else go to the handler that was installed before (Rust's
//!    own stack-overflow handler, or the default action).
//!
//! The handler does only async-signal-safe things: thread-local and atomic loads and stores, and one
//! `mmap` system call. No `sigsetjmp`/`longjmp` is involved (not sound in Rust), which is why the copy
//! is allowed to finish over zero pages rather than being abandoned; it needs no assembly and works on
//! every architecture. (`mmap(2)`: an access to a page of the mapping that lies past the end of the
//! file raises SIGBUS; `MAP_FIXED` replaces pages of an existing mapping; `signal-safety(7)` lists the
//! calls a handler may make — `mmap` is a plain system call on Linux, though POSIX does not list it.)

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

use std::collections::HashMap;
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use parking_lot::Mutex;

use super::threads::{Executor, SyscallExecutor, WorkerPool};
use super::{BackendConfig, BackendKind, IoKind, IoRequest, MmapAdvice, Span};
use crate::error::Result;

thread_local! {
    /// The source range `[start, end)` the thread's [`copy_from_mapping`] is reading; (0, 0) when none.
    static GUARD: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Whether a SIGBUS hit the guarded range since the copy began.
    static FAULTED: Cell<bool> = const { Cell::new(false) };
}

/// Counts SIGBUS faults caught in guarded copies, process-wide.
static FAULT_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The virtual range one caught fault replaced with zero pages; `seq` is the fault's number + 1 once
/// `from` and `to` are written (0 or another number: being written, or overwritten by a later lap).
struct FaultRange {
    seq: AtomicU64,
    from: AtomicUsize,
    to: AtomicUsize,
}

/// Faults remembered: fault `e` is in slot `e % FAULT_RANGES_LEN`. Enough that a copy lapping the ring
/// is rare even under a storm: beside a thread taking one fault per copy, and the flapping-file test,
/// 64 were lapped by one 8 MiB copy through a fresh mapping on 2 cores (tests/faults.rs); 24 KiB.
const FAULT_RANGES_LEN: usize = 1024;
#[allow(clippy::declare_interior_mutable_const)] // the initializer of the array below, not shared
const NO_RANGE: FaultRange = FaultRange {
    seq: AtomicU64::new(0),
    from: AtomicUsize::new(0),
    to: AtomicUsize::new(0),
};
/// The ranges the last [`FAULT_RANGES_LEN`] caught faults zeroed, written by the handler.
static FAULT_RANGES: [FaultRange; FAULT_RANGES_LEN] = [NO_RANGE; FAULT_RANGES_LEN];
/// The system's page size, read when the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();

/// The SIGBUS disposition in place before ours, for faults outside guarded copies.
struct PrevAction(std::cell::UnsafeCell<std::mem::MaybeUninit<libc::sigaction>>);
// SAFETY: written once inside `INSTALL` before the handler that reads it is installed; read-only after.
unsafe impl Sync for PrevAction {}
static PREV: PrevAction = PrevAction(std::cell::UnsafeCell::new(std::mem::MaybeUninit::zeroed()));

/// How many SIGBUS faults guarded copies have caught so far in this process. Each replaced some pages
/// of the mapping it hit with zeros; the engine asks which (a private `touched_since`) before it trusts
/// a copy or a cached mapping made when this had an earlier value.
pub fn mapping_fault_epoch() -> u64 {
    FAULT_EPOCH.load(Ordering::SeqCst)
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, end) = GUARD.try_with(|g| g.get()).unwrap_or((0, 0));
    if start <= addr && addr < end {
        let page = PAGE.load(Ordering::Relaxed);
        let from = addr & !(page - 1);
        let to = end.div_ceil(page) * page;
        // The epoch moves, and the range is recorded, before any page changes, so a copy elsewhere that
        // reads a replaced page sees the new epoch when it checks after its copy, and either this range
        // or a record it cannot trust (`touched_since`).
        let e = FAULT_EPOCH.fetch_add(1, Ordering::SeqCst);
        let r = &FAULT_RANGES[(e % FAULT_RANGES_LEN as u64) as usize];
        r.seq.store(0, Ordering::SeqCst);
        r.from.store(from, Ordering::SeqCst);
        r.to.store(to, Ordering::SeqCst);
        r.seq.store(e + 1, Ordering::SeqCst);
        let _ = FAULTED.try_with(|f| f.set(true));
        // SAFETY: [from, to) lies inside the mapping the guarded copy is reading (its pages are whole
        // pages of that mapping: the range starts inside it and ends at or before the mapping's last
        // page), which its caller keeps mapped for the whole copy; replacing them with private zero
        // pages touches no other memory.
        let p = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                to - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            return;
        }
    }
    // Not ours (or the pages could not be replaced): what would have happened without this handler.
    // SAFETY: PREV was filled before this handler was installed and is never written again.
    let prev = unsafe { (*PREV.0.get()).assume_init_ref() };
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Restore the default and return: the faulting instruction runs again and the signal, now with
        // its default action, ends the process as it would have.
        // SAFETY: signal(2) is async-signal-safe.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}

/// Whether a fault caught since `epoch` (a [`mapping_fault_epoch`] value) may have replaced pages of
/// `[start, start + len)` with zeros: a recorded zeroed range overlaps it, or a fault's record is lost
/// (lapped) or still being written, which counts as overlapping.
fn touched_since(epoch: u64, start: usize, len: usize) -> bool {
    let now = mapping_fault_epoch();
    if now == epoch {
        return false;
    }
    if now - epoch > FAULT_RANGES_LEN as u64 {
        return true;
    }
    let end = start.saturating_add(len);
    (epoch..now).any(|e| {
        let r = &FAULT_RANGES[(e % FAULT_RANGES_LEN as u64) as usize];
        if r.seq.load(Ordering::SeqCst) != e + 1 {
            return true;
        }
        let (from, to) = (r.from.load(Ordering::SeqCst), r.to.load(Ordering::SeqCst));
        // Rewritten meanwhile: the range read may be another fault's.
        r.seq.load(Ordering::SeqCst) != e + 1 || (from < end && start < to)
    })
}

/// Installs the SIGBUS handler (once per process).
fn install_handler() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 && (page as usize).is_power_of_two() {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: sigaction reads `act` and fills PREV (inside the Once, before our handler can run);
        // the handler has the SA_SIGINFO signature.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigbus;
            act.sa_sigaction = handler as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let prev = (*PREV.0.get()).as_mut_ptr();
            if libc::sigaction(libc::SIGBUS, &act, prev) != 0 {
                // Not installed: leave things as they were (a fault then ends the process as before).
                std::ptr::write(prev, std::mem::zeroed());
            }
        }
    });
}

/// Copies `len` bytes from `src`, inside a shared file mapping, to `dst`, surviving a SIGBUS (the file
/// shrank under the mapping, or its pages could not be read in). Returns `false` if one was caught:
/// then `dst` holds unspecified bytes, and the mapping must not be read again (its pages from the fault
/// to the end of the range read as zeros now); make a new one. See the module docs.
///
/// # Safety
///
/// `src..src+len` must lie inside one live mapping that stays mapped until this returns; `dst..dst+len`
/// must be valid for writes and not overlap it.
pub unsafe fn copy_from_mapping(src: *const u8, dst: *mut u8, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    install_handler();
    FAULTED.with(|f| f.set(false));
    GUARD.with(|g| g.set((src as usize, src as usize + len)));
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller's contract; a SIGBUS in the source is turned into zero pages by the handler.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    compiler_fence(Ordering::SeqCst);
    GUARD.with(|g| g.set((0, 0)));
    !FAULTED.with(|f| f.get())
}

/// A mapping and the fault epoch it was made in.
struct Mapping {
    map: Mmap,
    epoch: u64,
}

struct Mapper {
    advice: MmapAdvice,
    populate: bool,
    /// Mappings by file id.
    maps: Mutex<HashMap<u64, Arc<Mapping>>>,
}

/// Most files kept mapped at once; older mappings are dropped (unmapped) past this.
const MAPPINGS_MAX: usize = 256;
/// Tries of one read whose copy met a SIGBUS (its own or another thread's) before it fails with `EIO`.
const FAULT_RETRIES_MAX: u32 = 8;

fn neg_errno(e: &crate::Error) -> i64 {
    -(e.errno().unwrap_or(libc::EIO) as i64)
}

impl Mapper {
    /// A mapping of `req`'s file made in fault epoch `epoch` and covering `end` bytes: the cached one
    /// if it qualifies, else a new one of the file's current length `file_len`.
    fn mapping(
        &self,
        req: &IoRequest,
        end: u64,
        file_len: u64,
        epoch: u64,
    ) -> std::result::Result<Arc<Mapping>, i64> {
        if let Some(m) = self.maps.lock().get(&req.file.id()) {
            if m.map.len() as u64 >= end
                && !touched_since(m.epoch, m.map.as_ptr() as usize, m.map.len())
            {
                return Ok(m.clone());
            }
        }
        let mut opts = MmapOptions::new();
        opts.len(usize::try_from(file_len).map_err(|_| -(libc::EFBIG as i64))?);
        if self.populate {
            opts.populate();
        }
        // SAFETY: a read-only shared mapping; pages lost to a concurrent truncation are read only by
        // `copy_from_mapping`, which survives the SIGBUS (module docs).
        let map = unsafe { opts.map(req.file.buffered_fd()) }
            .map_err(|e| -(e.raw_os_error().unwrap_or(libc::EIO) as i64))?;
        let advice = match self.advice {
            MmapAdvice::Normal => memmap2::Advice::Normal,
            MmapAdvice::Sequential => memmap2::Advice::Sequential,
            MmapAdvice::Random => memmap2::Advice::Random,
            MmapAdvice::WillNeed => memmap2::Advice::WillNeed,
        };
        // Advice is a hint: a refusal changes speed, not results.
        let _ = map.advise(advice);
        let m = Arc::new(Mapping { map, epoch });
        let mut maps = self.maps.lock();
        if maps.len() >= MAPPINGS_MAX {
            maps.clear();
        }
        maps.insert(req.file.id(), m.clone());
        Ok(m)
    }

    fn read(&self, req: &IoRequest, span: &Span) -> i64 {
        for _ in 0..FAULT_RETRIES_MAX {
            let epoch = mapping_fault_epoch();
            // The file's length now: never touch a page past it (module docs, point 1).
            let file_len = match req.file.len() {
                Ok(l) => l,
                Err(e) => return neg_errno(&e),
            };
            if req.offset >= file_len || span.len == 0 {
                return 0;
            }
            let end = req.offset.saturating_add(span.len as u64).min(file_len);
            let map = match self.mapping(req, end, file_len, epoch) {
                Ok(m) => m,
                Err(r) => return r,
            };
            let n = (end - req.offset) as usize;
            // SAFETY: offset + n <= end <= map.len(), and `map` (an Arc) stays mapped during the copy;
            // the Backend::push contract keeps ptr..ptr+len valid and exclusive, and n <= len.
            let clean = unsafe {
                copy_from_mapping(map.map.as_ptr().add(req.offset as usize), span.ptr, n)
            };
            if clean && !touched_since(epoch, map.map.as_ptr() as usize + req.offset as usize, n) {
                // A file cut inside the last page copied reads zeros past its new end instead of
                // faulting: count only the bytes the file still holds, as `pread` would.
                return match req.file.len() {
                    Ok(now) if now < end => now.saturating_sub(req.offset) as i64,
                    Ok(_) => n as i64,
                    Err(e) => neg_errno(&e),
                };
            }
            // A fault in this copy, or one elsewhere that zeroed part of what it read: this mapping may
            // hold zero pages.
            let mut maps = self.maps.lock();
            if maps
                .get(&req.file.id())
                .is_some_and(|m| Arc::ptr_eq(m, &map))
            {
                maps.remove(&req.file.id());
            }
        }
        -(libc::EIO as i64)
    }
}

impl Executor for Mapper {
    fn execute(&self, req: &IoRequest) -> i64 {
        match &req.kind {
            IoKind::Write(_) | IoKind::Sync => SyscallExecutor.execute(req),
            IoKind::Read(span) => self.read(req, span),
        }
    }
}

/// The mmap engine: a worker pool whose workers copy out of mappings.
pub fn new(config: &BackendConfig) -> Result<WorkerPool> {
    config.validate()?;
    install_handler();
    let mapper = Arc::new(Mapper {
        advice: config.mmap_advice,
        populate: config.mmap_populate,
        maps: Mutex::new(HashMap::new()),
    });
    let note = format!(
        "reads copy from a shared mapping (madvise {:?}{}); writes use pwrite on the buffered \
         descriptor; direct I/O does not apply to mappings",
        config.mmap_advice,
        if config.mmap_populate {
            ", MAP_POPULATE"
        } else {
            ""
        }
    );
    WorkerPool::new(BackendKind::Mmap, config.queue_depth, mapper, vec![note])
}
