//! The io_uring engine: requests become submission-queue entries, submitted in batches with one
//! `io_uring_enter` per round, and completions are reaped from the completion queue (finding 236/238's
//! submit-and-continue model, on the host).
//!
//! Set-up is probed, never assumed: the ring must build, and every opcode used (READ, WRITE, READ_FIXED,
//! WRITE_FIXED, FSYNC) must be supported. Registered files and fixed buffers are optimisations: when the
//! kernel refuses them (old kernel, `RLIMIT_MEMLOCK`, a full table) the engine says so in its notes and
//! carries on with plain descriptors and unregistered buffers. SQPOLL and IOPOLL are opt-in.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use rustc_hash::FxHashMap;

use super::threads::{SyscallExecutor, WorkerPool};
use super::{
    Backend, BackendConfig, BackendKind, IoDone, IoKind, IoOp, IoRequest, Span, Waker, WAKE_TAG,
};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::file::File;
use crate::mem::{BufferPool, Registration};

/// Slots in the registered-file table.
pub const FILE_SLOTS: u32 = 64;
/// Slots in the fixed-buffer table.
pub const BUFFER_SLOTS: u32 = 4096;

/// Why io_uring cannot be used here, or `None` if the sysctl allows it.
fn sysctl_refusal() -> Option<String> {
    let v = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok()?;
    match v.trim() {
        "2" => Some("io_uring is disabled by sysctl kernel.io_uring_disabled=2".into()),
        _ => None,
    }
}

fn setup_err(what: &str, e: io::Error) -> Error {
    let mut msg = format!("{what}: {e}");
    if e.raw_os_error() == Some(libc::EPERM) {
        msg.push_str(
            " (kernel.io_uring_disabled=1 without the allowed group, or a seccomp filter)",
        );
    }
    if let Some(r) = sysctl_refusal() {
        msg = format!("{msg}; {r}");
    }
    let kind = match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::Unsupported,
        Some(errno) => ErrorKind::from_errno(errno),
        None => ErrorKind::Unsupported,
    };
    Error::new(kind, msg).with_op(Op::Setup)
}

/// How completions that the kernel finishes outside the submitting thread (io-wq workers, which serve
/// reads of page-cached and tmpfs data, interrupts) reach the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskRun {
    /// `SINGLE_ISSUER | DEFER_TASKRUN`: completion work waits until the engine thread asks for events,
    /// so it is batched and never interrupts the thread (what fio sets up). The ring starts disabled
    /// and is enabled by the engine thread ([`Backend::attach_thread`]), the only one that may use it.
    Deferred,
    /// `COOP_TASKRUN`: completion work runs at the thread's next kernel entry instead of interrupting
    /// it with an inter-processor signal.
    Cooperative,
    /// Kernel default: each completion from another context interrupts the submitting thread.
    Signalled,
}

impl TaskRun {
    fn note(self) -> &'static str {
        match self {
            TaskRun::Deferred => {
                "completions deferred to the engine's own waits (SINGLE_ISSUER, DEFER_TASKRUN)"
            }
            TaskRun::Cooperative => {
                "completions run at the engine's next kernel entry (COOP_TASKRUN; DEFER_TASKRUN refused)"
            }
            TaskRun::Signalled => {
                "completions interrupt the engine thread (COOP_TASKRUN and DEFER_TASKRUN refused)"
            }
        }
    }
}

/// Builds the ring with the cheapest completion delivery this kernel accepts (each tried in turn;
/// DEFER_TASKRUN needs Linux 6.1, COOP_TASKRUN 5.19, and neither goes with SQPOLL's kernel thread).
fn build_ring(config: &BackendConfig, entries: u32) -> Result<(IoUring, TaskRun)> {
    let modes: &[TaskRun] = if config.sqpoll {
        &[TaskRun::Signalled]
    } else {
        &[TaskRun::Deferred, TaskRun::Cooperative, TaskRun::Signalled]
    };
    let mut last = None;
    for &mode in modes {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(entries * 2);
        if config.sqpoll {
            builder.setup_sqpoll(2000);
        }
        if config.iopoll {
            builder.setup_iopoll();
        }
        match mode {
            TaskRun::Deferred => {
                builder
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag()
                    .setup_r_disabled();
            }
            TaskRun::Cooperative => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            TaskRun::Signalled => {}
        }
        match builder.build(entries) {
            Ok(ring) => return Ok((ring, mode)),
            // EINVAL: this kernel does not know the flag; anything else is not about the flags.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && mode != TaskRun::Signalled => {
                last = Some(e);
            }
            Err(e) => return Err(setup_err("io_uring_setup failed", e)),
        }
    }
    Err(setup_err(
        "io_uring_setup failed",
        last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
    ))
}

struct FileSlot {
    file: File,
    direct: bool,
}

/// The io_uring engine.
pub struct UringBackend {
    ring: IoUring,
    /// A `Deferred` ring starts disabled; the engine thread enables it.
    enabled: bool,
    /// Threads that copy large reads of memory-resident files (see [`UringBackend::copies_on_threads`]).
    copy_pool: Option<WorkerPool>,
    copy_min_bytes: usize,
    depth: usize,
    in_flight: usize,
    /// Entries pushed since the last submission, and how many trigger one.
    unsubmitted: usize,
    submit_batch: usize,
    files_registered: bool,
    file_slots: Vec<Option<FileSlot>>,
    file_index: FxHashMap<(u64, bool), u32>,
    buffers_registered: bool,
    buffer_next: u32,
    /// Pools registered here live as long as the ring: the kernel keeps their pages pinned.
    pools: Vec<BufferPool>,
    /// An eventfd watched by a multishot poll on the ring: writing it ends a wait in the kernel.
    wake_fd: Option<Arc<OwnedFd>>,
    /// The poll on `wake_fd` must be (re)armed before the next wait.
    wake_armed: bool,
    notes: Vec<String>,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("depth", &self.depth)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl UringBackend {
    pub fn new(config: &BackendConfig) -> Result<UringBackend> {
        config.validate()?;
        if let Some(r) = sysctl_refusal() {
            return Err(Error::new(ErrorKind::Unsupported, r).with_op(Op::Setup));
        }
        let mut notes = Vec::new();
        // One spare entry for re-arming the wake-up poll next to a full queue of requests.
        let entries = (config.queue_depth + 1).next_power_of_two() as u32;
        let (ring, task_run) = build_ring(config, entries)?;
        notes.push(task_run.note().into());
        if config.sqpoll {
            notes.push("SQPOLL on: a kernel thread polls the submission queue".into());
        }
        if config.iopoll {
            notes
                .push("IOPOLL on: completions are polled (needs a device with poll queues)".into());
        }

        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| setup_err("io_uring opcode probe failed", e))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::ReadFixed::CODE, "READ_FIXED"),
            (opcode::WriteFixed::CODE, "WRITE_FIXED"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
        ] {
            if !probe.is_supported(code) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("io_uring on this kernel lacks the {name} opcode"),
                )
                .with_op(Op::Setup));
            }
        }

        let files_registered = config.registered_files
            && match ring.submitter().register_files_sparse(FILE_SLOTS) {
                Ok(()) => {
                    notes.push(format!("registered-file table of {FILE_SLOTS} slots"));
                    true
                }
                Err(e) => {
                    notes.push(format!(
                        "registered files refused ({e}); using plain descriptors"
                    ));
                    false
                }
            };
        if !config.registered_files {
            notes.push("registered files turned off; using plain descriptors".into());
        }
        let buffers_registered = config.fixed_buffers
            && match ring.submitter().register_buffers_sparse(BUFFER_SLOTS) {
                Ok(()) => true,
                Err(e) => {
                    notes.push(format!(
                        "fixed-buffer table refused ({e}); buffers stay unregistered"
                    ));
                    false
                }
            };
        if !config.fixed_buffers {
            notes.push("fixed buffers turned off; buffers stay unregistered".into());
        }
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        let wake_fd = if efd >= 0 {
            // SAFETY: efd is a fresh descriptor we own.
            Some(Arc::new(unsafe { OwnedFd::from_raw_fd(efd) }))
        } else {
            notes.push(format!(
                "no eventfd ({}): new work waits for the next completion or a short timeout",
                io::Error::last_os_error()
            ));
            None
        };
        let copy_pool = match (&wake_fd, config.copy_threads) {
            (_, 0) => {
                notes.push(
                    "copy threads off: large reads of memory-resident files are copied by io_uring"
                        .into(),
                );
                None
            }
            (None, _) => {
                notes.push(
                    "copy threads off: without an eventfd they could not wake the engine".into(),
                );
                None
            }
            (Some(fd), n) => {
                let fd = fd.clone();
                let wake: Waker = Arc::new(move || wake_eventfd(fd.as_raw_fd()));
                let pool = WorkerPool::with_workers(
                    BackendKind::Threads,
                    config.queue_depth,
                    n,
                    Arc::new(SyscallExecutor),
                    Vec::new(),
                    Some(wake),
                )?;
                notes.push(format!(
                    "reads of {} or more from memory-resident files (tmpfs, or warm in the page cache) \
                     are copied by {} threads: io_uring copies such data on one thread (inline) or \
                     through io-wq workers that contend",
                    crate::size::format_bytes(config.copy_threads_min_bytes as f64),
                    pool.worker_count()
                ));
                Some(pool)
            }
        };
        Ok(UringBackend {
            copy_pool,
            copy_min_bytes: config.copy_threads_min_bytes,
            enabled: task_run != TaskRun::Deferred,
            ring,
            wake_fd,
            wake_armed: false,
            depth: config.queue_depth,
            in_flight: 0,
            unsubmitted: 0,
            submit_batch: config.submit_batch_max,
            files_registered,
            file_slots: (0..FILE_SLOTS).map(|_| None).collect(),
            file_index: FxHashMap::default(),
            buffers_registered,
            buffer_next: 0,
            pools: Vec::new(),
            notes,
        })
    }

    /// The registered slot for this file and descriptor, registering it if there is room.
    fn file_slot(&mut self, file: &File, direct: bool) -> Option<u32> {
        if !self.files_registered {
            return None;
        }
        let key = (file.id(), direct && file.is_direct());
        if let Some(&slot) = self.file_index.get(&key) {
            return Some(slot);
        }
        // A free slot, or one whose file only this table still holds (no request in flight holds it:
        // every in-flight request keeps a clone of its File).
        let slot = self.file_slots.iter().position(|s| match s {
            None => true,
            Some(s) => s.file.ref_count() == 1,
        })? as u32;
        let fd = if key.1 {
            file.fast_fd()
        } else {
            file.buffered_fd()
        };
        if self
            .ring
            .submitter()
            .register_files_update(slot, &[fd])
            .is_err()
        {
            return None;
        }
        if let Some(old) = self.file_slots[slot as usize].take() {
            self.file_index.remove(&(old.file.id(), old.direct));
        }
        self.file_slots[slot as usize] = Some(FileSlot {
            file: file.clone(),
            direct: key.1,
        });
        self.file_index.insert(key, slot);
        Some(slot)
    }

    fn entry(&mut self, req: &IoRequest) -> squeue::Entry {
        let slot = self.file_slot(&req.file, req.direct);
        // `push` refused anything longer than u32::MAX.
        let len = req.len() as u32;
        macro_rules! build {
            ($fd:expr) => {
                match req.kind {
                    IoKind::Read(Span {
                        ptr,
                        fixed: Some(i),
                        ..
                    }) => opcode::ReadFixed::new($fd, ptr, len, i)
                        .offset(req.offset)
                        .build(),
                    IoKind::Read(Span { ptr, .. }) => {
                        opcode::Read::new($fd, ptr, len).offset(req.offset).build()
                    }
                    IoKind::Write(Span {
                        ptr,
                        fixed: Some(i),
                        ..
                    }) => opcode::WriteFixed::new($fd, ptr.cast_const(), len, i)
                        .offset(req.offset)
                        .build(),
                    IoKind::Write(Span { ptr, .. }) => {
                        opcode::Write::new($fd, ptr.cast_const(), len)
                            .offset(req.offset)
                            .build()
                    }
                    IoKind::Sync => opcode::Fsync::new($fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                }
            };
        }
        let e = match slot {
            Some(s) => build!(types::Fixed(s)),
            None => build!(types::Fd(req.fd())),
        };
        e.user_data(req.tag)
    }
}

/// Ends a wait on the ring: the multishot poll on this eventfd completes.
fn wake_eventfd(fd: std::os::fd::RawFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes to our eventfd; a full counter (EAGAIN) is already a wake-up.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

impl UringBackend {
    /// Enables a ring that was set up disabled: the calling thread becomes its only submitter. Done
    /// by [`Backend::attach_thread`], or by the first `push` or `submit_and_reap` of a caller that
    /// drives the backend without an engine.
    fn enable(&mut self) -> Result<()> {
        if !self.enabled {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(|e| setup_err("enabling the io_uring ring failed", e))?;
            self.enabled = true;
        }
        Ok(())
    }

    /// Large reads of data already in memory go to the copy threads: io_uring would copy them on the
    /// engine thread (page-cached files, read inline) or on io-wq workers that contend with each other
    /// (tmpfs, which cannot read without blocking), so either way one core's copy bandwidth at best.
    fn copies_on_threads(&self, req: &IoRequest) -> bool {
        self.copy_pool.is_some()
            && req.op() == IoOp::Read
            && req.len() >= self.copy_min_bytes
            && req.file.is_memory_resident()
    }

    /// Appends the copy threads' finished reads to `out` without waiting; returns how many.
    fn reap_copies(&mut self, out: &mut Vec<IoDone>) -> Result<usize> {
        match self.copy_pool.as_mut() {
            Some(pool) if pool.in_flight() > 0 => {
                let before = out.len();
                pool.submit_and_reap(0, None, out)?;
                Ok(out.len() - before)
            }
            _ => Ok(0),
        }
    }

    fn copy_in_flight(&self) -> usize {
        self.copy_pool.as_ref().map_or(0, |p| p.in_flight())
    }
}

impl Backend for UringBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Uring
    }
    fn queue_depth(&self) -> usize {
        self.depth
    }
    fn in_flight(&self) -> usize {
        self.in_flight + self.copy_in_flight()
    }

    fn attach_thread(&mut self) -> Result<()> {
        self.enable()
    }

    unsafe fn push(&mut self, req: IoRequest) -> std::result::Result<(), IoRequest> {
        if self.in_flight() >= self.depth {
            return Err(req);
        }
        if self.enable().is_err() {
            return Err(req);
        }
        if self.copies_on_threads(&req) {
            let pool = self
                .copy_pool
                .as_mut()
                .expect("checked by copies_on_threads");
            // SAFETY: the same contract, passed on.
            return unsafe { pool.push(req) };
        }
        if req.len() > u32::MAX as usize {
            return Err(req);
        }
        let entry = self.entry(&req);
        // SAFETY: the caller keeps req.ptr..+len valid until this tag's completion is reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The SQ has at least `depth` entries and holds only unsubmitted requests, which are
            // fewer than in_flight < depth; still, never lose a request.
            return Err(req);
        }
        self.in_flight += 1;
        self.unsubmitted += 1;
        if self.unsubmitted >= self.submit_batch {
            // Submit now, without waiting. On failure the entries stay queued and the next
            // submit_and_reap submits them (and reports a persistent error).
            if self.ring.submit().is_ok() {
                self.unsubmitted = 0;
            }
        }
        Ok(())
    }

    fn submit_and_reap(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<IoDone>,
    ) -> Result<()> {
        self.enable()?;
        // Copy-thread completions first: those already there count towards `min_complete`, and one
        // arriving later ends the ring's wait through the eventfd.
        let got = self.reap_copies(out)?;
        let want = if min_complete > got && self.in_flight == 0 && self.copy_in_flight() > 0 {
            // Only copies are out: wait for the wake-up the next one sends (a poll completion).
            1
        } else {
            min_complete.saturating_sub(got).min(self.in_flight)
        };
        if !self.wake_armed {
            if let Some(fd) = &self.wake_fd {
                let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(WAKE_TAG);
                // SAFETY: the poll references only the eventfd, which lives as long as the ring.
                // The ring has a spare entry beyond the queue depth for exactly this.
                if unsafe { self.ring.submission().push(&poll) }.is_ok() {
                    self.wake_armed = true;
                }
            }
        }
        // Bounded: EINTR while waiting is retried a few times, then we return what we have.
        for _ in 0..8 {
            let r = if want == 0 {
                self.ring.submit()
            } else if let Some(t) = timeout {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            } else {
                self.ring.submit_and_wait(want)
            };
            match r {
                Ok(_) => break,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Timed out, or the CQ needs draining first: reap what is there.
                    Some(libc::ETIME) | Some(libc::EBUSY) | Some(libc::EAGAIN) => break,
                    _ => return Err(Error::from_io(Op::Setup, &e)),
                },
            }
        }
        self.unsubmitted = 0;
        for cqe in self.ring.completion() {
            if cqe.user_data() == WAKE_TAG {
                // Consume the wake-up; a multishot poll that ended (no MORE flag) is re-armed next time.
                if let Some(fd) = &self.wake_fd {
                    let mut v = 0u64;
                    // SAFETY: reads 8 bytes into v from our nonblocking eventfd.
                    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
                }
                if !io_uring::cqueue::more(cqe.flags()) {
                    self.wake_armed = false;
                }
                continue;
            }
            out.push(IoDone {
                tag: cqe.user_data(),
                result: cqe.result() as i64,
            });
            self.in_flight -= 1;
        }
        self.reap_copies(out)?;
        Ok(())
    }

    fn waker(&self) -> Option<Waker> {
        let fd = self.wake_fd.clone()?;
        Some(Arc::new(move || wake_eventfd(fd.as_raw_fd())))
    }

    fn register_pool(&mut self, pool: &BufferPool) -> Registration {
        if !self.buffers_registered {
            return Registration::Refused(
                "the fixed-buffer table is unavailable on this ring".into(),
            );
        }
        let count = pool.regions().len() as u32;
        if self.buffer_next + count > BUFFER_SLOTS {
            return Registration::Refused(format!(
                "the fixed-buffer table ({BUFFER_SLOTS} slots) is full"
            ));
        }
        let iovecs: Vec<libc::iovec> = pool
            .regions()
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: the pool's buffers never move or get freed while the pool lives, and self.pools
        // keeps the pool alive as long as this ring.
        let r = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(self.buffer_next, &iovecs, None)
        };
        match r {
            Ok(()) => {
                let base = self.buffer_next as u16;
                self.buffer_next += count;
                self.pools.push(pool.clone());
                Registration::Fixed { base }
            }
            Err(e) => {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit writes the struct.
                unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
                Registration::Refused(format!(
                    "registering {count} buffers failed: {e} (RLIMIT_MEMLOCK {} KiB); using them unregistered",
                    lim.rlim_cur / 1024
                ))
            }
        }
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.notes.clone();
        n.insert(
            0,
            format!(
                "ring of {} entries for queue depth {}, submitted every {} requests",
                self.ring.params().sq_entries(),
                self.depth,
                self.submit_batch
            ),
        );
        n
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // Memory of in-flight requests must outlive them: wait for every outstanding completion
        // (bounded, in case the device never answers, e.g. an IOPOLL ring on a virtio disk).
        let mut sink = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            if self
                .submit_and_reap(1, Some(Duration::from_millis(100)), &mut sink)
                .is_err()
            {
                break;
            }
            sink.clear();
        }
    }
}
