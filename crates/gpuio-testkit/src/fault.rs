//! A fault-injecting [`Backend`]: wraps a real engine and, driven by a seed and a [`FaultPlan`], makes
//! some requests fail, stop short, report a transient errno, or complete late (STYLE item 10: RocksDB's
//! `FaultInjectionTestFS`, SQLite's crash VFS, TigerBeetle's simulated storage).
//!
//! What each fault does to a request:
//!
//! | fault                         | I/O performed                                   | reported              |
//! |-------------------------------|-------------------------------------------------|-----------------------|
//! | EIO / ENOSPC / EINTR / EAGAIN | none                                            | `-errno`              |
//! | EINVAL on a direct request    | none                                            | `-EINVAL`             |
//! | short read / short write      | a shortened request (direct: rounded up to a block) | a random prefix `1..len` (less if the real I/O did less) |
//! | delay                         | the request as is                               | its result, held back a while |
//! | fail the Nth operation        | none                                            | the plan's errno      |
//! | lost write (silent)           | none                                            | success               |
//! | misdirected write (silent)    | the write, 4–16 KiB further on                  | success               |
//! | corrupt read (silent)         | the read, then one bit of the data flipped      | success               |
//!
//! The silent faults are for proving that verification catches what the engine cannot see
//! (STYLE item 11); with them on, only a verify pattern tells right data from wrong.
//!
//! A short transfer really moves the prefix it reports (the shortened request goes to the real engine),
//! so the engine's continuation is tested against bytes that are actually on disk.
//!
//! The wrapper keeps the [`Backend`] contract: every pushed tag is reported exactly once by
//! `submit_and_reap`; requests answered without I/O are queued and reported at the next call;
//! `in_flight` counts them until then. What was injected is counted and logged in a shared
//! [`FaultHandle`], so a test can prove that its faults fired (a fault test where none fired proves
//! nothing) and match each error to the request that caused it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::backend::{Backend, BackendKind, IoDone, IoOp, IoRequest};
use gpuio::mem::Registration;
use gpuio::BufferPool;
use parking_lot::Mutex;

use crate::rng::Rng;

/// Fail one operation (or every one from then on) with a chosen errno, counting every operation pushed
/// (reads, writes and syncs, retries included) from 1, starting when the plan was set (at
/// [`FaultBackend::new`] or [`FaultHandle::set_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NthFault {
    /// The operation to fail, counted from 1.
    pub n: u64,
    /// The errno it fails with (`libc::EIO` for a crash-VFS style run).
    pub errno: i32,
    /// Fail every operation after the `n`th too (the device died), not only the `n`th.
    pub sticky: bool,
}

/// What to inject and how often. Probabilities are per request, in `0.0..=1.0`; at most one fault is
/// injected per request, checked in the order the fields are listed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    /// Fail operation N (and optionally all after it).
    pub fail_nth: Option<NthFault>,
    /// Read fails with EIO.
    pub read_eio: f64,
    /// Write fails with ENOSPC.
    pub write_enospc: f64,
    /// Write fails with EIO.
    pub write_eio: f64,
    /// Sync fails with EIO.
    pub sync_eio: f64,
    /// Any operation reports EINTR without doing anything.
    pub eintr: f64,
    /// Any operation reports EAGAIN without doing anything.
    pub eagain: f64,
    /// A direct request reports EINVAL (as a filesystem refusing this particular O_DIRECT transfer).
    pub direct_einval: f64,
    /// Silent: a write reports success without writing anything (a lost write).
    pub lost_write: f64,
    /// Silent: a write lands 4–16 KiB past where it was aimed and reports success (a misdirected
    /// write).
    pub misdirect_write: f64,
    /// Silent: a read succeeds with one bit of what it read flipped (corruption in flight).
    pub corrupt_read: f64,
    /// A read of two or more bytes transfers and reports only a prefix.
    pub short_read: f64,
    /// A write of two or more bytes transfers and reports only a prefix.
    pub short_write: f64,
    /// A completion is held back for a random time up to `delay_max`.
    pub delay: f64,
    pub delay_max: Duration,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan::none()
    }
}

impl FaultPlan {
    /// No faults: the wrapper is transparent.
    pub fn none() -> FaultPlan {
        FaultPlan {
            fail_nth: None,
            read_eio: 0.0,
            write_enospc: 0.0,
            write_eio: 0.0,
            sync_eio: 0.0,
            eintr: 0.0,
            eagain: 0.0,
            direct_einval: 0.0,
            lost_write: 0.0,
            misdirect_write: 0.0,
            corrupt_read: 0.0,
            short_read: 0.0,
            short_write: 0.0,
            delay: 0.0,
            delay_max: Duration::from_millis(2),
        }
    }

    /// Only conditions the engine must hide: EINTR and EAGAIN (each with probability `p / 2`), short
    /// reads and writes (each `p`), and delays (`p`). Data must come out right.
    pub fn benign(p: f64) -> FaultPlan {
        FaultPlan {
            eintr: p / 2.0,
            eagain: p / 2.0,
            short_read: p,
            short_write: p,
            delay: p,
            ..FaultPlan::none()
        }
    }

    /// Every kind of fault, the hard errors (EIO, ENOSPC) at `p_hard` and the benign ones at `p`.
    pub fn chaos(p: f64, p_hard: f64) -> FaultPlan {
        FaultPlan {
            read_eio: p_hard,
            write_enospc: p_hard / 2.0,
            write_eio: p_hard / 2.0,
            sync_eio: p_hard,
            direct_einval: p / 4.0,
            ..FaultPlan::benign(p)
        }
    }

    pub fn with_fail_nth(mut self, n: u64, errno: i32, sticky: bool) -> FaultPlan {
        self.fail_nth = Some(NthFault { n, errno, sticky });
        self
    }
    pub fn with_read_eio(mut self, p: f64) -> FaultPlan {
        self.read_eio = p;
        self
    }
    pub fn with_write_eio(mut self, p: f64) -> FaultPlan {
        self.write_eio = p;
        self
    }
    pub fn with_write_enospc(mut self, p: f64) -> FaultPlan {
        self.write_enospc = p;
        self
    }
    pub fn with_sync_eio(mut self, p: f64) -> FaultPlan {
        self.sync_eio = p;
        self
    }
    pub fn with_eintr(mut self, p: f64) -> FaultPlan {
        self.eintr = p;
        self
    }
    pub fn with_eagain(mut self, p: f64) -> FaultPlan {
        self.eagain = p;
        self
    }
    pub fn with_direct_einval(mut self, p: f64) -> FaultPlan {
        self.direct_einval = p;
        self
    }
    pub fn with_lost_write(mut self, p: f64) -> FaultPlan {
        self.lost_write = p;
        self
    }
    pub fn with_misdirect_write(mut self, p: f64) -> FaultPlan {
        self.misdirect_write = p;
        self
    }
    pub fn with_corrupt_read(mut self, p: f64) -> FaultPlan {
        self.corrupt_read = p;
        self
    }
    pub fn with_short_read(mut self, p: f64) -> FaultPlan {
        self.short_read = p;
        self
    }
    pub fn with_short_write(mut self, p: f64) -> FaultPlan {
        self.short_write = p;
        self
    }
    pub fn with_delay(mut self, p: f64, max: Duration) -> FaultPlan {
        self.delay = p;
        self.delay_max = max;
        self
    }

    /// Whether this plan can make a command fail (rather than only slow it down or split it).
    pub fn has_hard_errors(&self) -> bool {
        self.fail_nth.is_some()
            || self.read_eio > 0.0
            || self.write_enospc > 0.0
            || self.write_eio > 0.0
            || self.sync_eio > 0.0
    }

    /// Whether this plan can change data while reporting success: only a verify step catches that.
    pub fn has_silent_faults(&self) -> bool {
        self.lost_write > 0.0 || self.misdirect_write > 0.0 || self.corrupt_read > 0.0
    }
}

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Reported `-errno` without doing any I/O. `nth` says it came from [`FaultPlan::fail_nth`].
    Errno { errno: i32, nth: bool },
    /// Transferred and reported only `prefix` of the request's bytes.
    Short { prefix: usize },
    /// The completion was held back this long.
    Delay(Duration),
    /// Reported success without writing.
    LostWrite,
    /// Written `shift` bytes past the requested offset, reported as success.
    Misdirected { shift: u64 },
    /// Read, then one bit of the data flipped before the completion was reported.
    CorruptRead,
}

/// A record of one injected fault: the request it hit and what was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// Which operation (1 = the first pushed through this wrapper).
    pub seq: u64,
    pub op: IoOp,
    pub path: PathBuf,
    pub offset: u64,
    pub len: usize,
    pub direct: bool,
    pub fault: Fault,
}

/// How many faults of each kind were injected, and how many operations went through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub syncs: u64,
    pub read_eio: u64,
    pub write_enospc: u64,
    pub write_eio: u64,
    pub sync_eio: u64,
    pub eintr: u64,
    pub eagain: u64,
    pub direct_einval: u64,
    pub short_reads: u64,
    pub short_writes: u64,
    pub delays: u64,
    pub nth_failures: u64,
    pub lost_writes: u64,
    pub misdirected_writes: u64,
    pub corrupt_reads: u64,
}

impl FaultCounts {
    /// Faults that can fail a command: EIO, ENOSPC and `fail_nth` failures.
    pub fn hard_errors(&self) -> u64 {
        self.read_eio + self.write_enospc + self.write_eio + self.sync_eio + self.nth_failures
    }
    /// EINTR and EAGAIN reports.
    pub fn transients(&self) -> u64 {
        self.eintr + self.eagain
    }
    pub fn shorts(&self) -> u64 {
        self.short_reads + self.short_writes
    }
    /// Faults that change data while reporting success.
    pub fn silent(&self) -> u64 {
        self.lost_writes + self.misdirected_writes + self.corrupt_reads
    }
    /// Every injected fault of any kind.
    pub fn total(&self) -> u64 {
        self.hard_errors()
            + self.transients()
            + self.direct_einval
            + self.shorts()
            + self.delays
            + self.silent()
    }
}

/// Most injections kept in the log; older ones are dropped (the counts keep counting).
pub const LOG_MAX: usize = 4096;

#[derive(Debug)]
struct State {
    plan: FaultPlan,
    /// Operations pushed since the plan was set (what [`NthFault::n`] counts).
    plan_ops: u64,
    counts: FaultCounts,
    log: VecDeque<Injection>,
}

/// Shared view of a [`FaultBackend`] from a test: counts, the log of injections, and the plan (which can
/// be changed while the engine runs, e.g. turned off to read back what faulty writes left).
#[derive(Debug, Clone)]
pub struct FaultHandle(Arc<Mutex<State>>);

impl FaultHandle {
    pub fn counts(&self) -> FaultCounts {
        self.0.lock().counts.clone()
    }
    /// The injections so far (at most [`LOG_MAX`], newest last).
    pub fn log(&self) -> Vec<Injection> {
        self.0.lock().log.iter().cloned().collect()
    }
    /// Takes the log, leaving it empty.
    pub fn take_log(&self) -> Vec<Injection> {
        std::mem::take(&mut self.0.lock().log).into()
    }
    /// Clears counts and log.
    pub fn reset(&self) {
        let mut s = self.0.lock();
        s.counts = FaultCounts::default();
        s.log.clear();
    }
    pub fn plan(&self) -> FaultPlan {
        self.0.lock().plan
    }
    /// Replaces the plan for requests pushed from now on, and restarts the count that
    /// [`NthFault::n`] refers to. Set it between command buffers, not while one is running.
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut s = self.0.lock();
        s.plan = plan;
        s.plan_ops = 0;
    }
}

/// What to do with the inner completion of a request that was let through.
#[derive(Debug, Clone, Copy)]
struct Fixup {
    /// Report at most this many bytes.
    short: Option<usize>,
    delay: Option<Duration>,
    /// Flip a bit in what was read into memory at this address.
    corrupt: Option<usize>,
}

/// The fault-injecting wrapper. See the module docs.
pub struct FaultBackend {
    inner: Box<dyn Backend>,
    rng: Rng,
    seed: u64,
    state: Arc<Mutex<State>>,
    /// Operations pushed so far.
    ops: u64,
    /// Completions decided without I/O, reported at the next `submit_and_reap`.
    ready: VecDeque<IoDone>,
    /// Completions held back until their time.
    delayed: Vec<(Instant, IoDone)>,
    /// Requests passed to the inner engine whose completion must be altered.
    fixups: HashMap<u64, Fixup>,
}

impl fmt::Debug for FaultBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultBackend")
            .field("inner", &self.inner.kind())
            .field("seed", &self.seed)
            .field("ops", &self.ops)
            .field("ready", &self.ready.len())
            .field("delayed", &self.delayed.len())
            .finish()
    }
}

impl FaultBackend {
    /// Wraps `inner`; faults follow `plan`, their randomness `seed`.
    pub fn new(inner: Box<dyn Backend>, seed: u64, plan: FaultPlan) -> (FaultBackend, FaultHandle) {
        let state = Arc::new(Mutex::new(State {
            plan,
            plan_ops: 0,
            counts: FaultCounts::default(),
            log: VecDeque::new(),
        }));
        let backend = FaultBackend {
            inner,
            rng: Rng::new(seed),
            seed,
            state: state.clone(),
            ops: 0,
            ready: VecDeque::new(),
            delayed: Vec::new(),
            fixups: HashMap::new(),
        };
        (backend, FaultHandle(state))
    }

    /// Decides the fault for `req` (operation number `nth` under the current plan), if any.
    fn decide(&mut self, plan: &FaultPlan, req: &IoRequest, nth: u64) -> Option<Fault> {
        let rng = &mut self.rng;
        if let Some(nf) = plan.fail_nth {
            if nth == nf.n || (nf.sticky && nth > nf.n) {
                return Some(Fault::Errno {
                    errno: nf.errno,
                    nth: true,
                });
            }
        }
        let errno = |errno| Some(Fault::Errno { errno, nth: false });
        match req.op() {
            IoOp::Read if rng.chance(plan.read_eio) => return errno(libc::EIO),
            IoOp::Write if rng.chance(plan.write_enospc) => return errno(libc::ENOSPC),
            IoOp::Write if rng.chance(plan.write_eio) => return errno(libc::EIO),
            IoOp::Sync if rng.chance(plan.sync_eio) => return errno(libc::EIO),
            _ => {}
        }
        if rng.chance(plan.eintr) {
            return errno(libc::EINTR);
        }
        if rng.chance(plan.eagain) {
            return errno(libc::EAGAIN);
        }
        if req.direct && req.op() != IoOp::Sync && rng.chance(plan.direct_einval) {
            return errno(libc::EINVAL);
        }
        match req.op() {
            IoOp::Write if rng.chance(plan.lost_write) => return Some(Fault::LostWrite),
            IoOp::Write if rng.chance(plan.misdirect_write) => {
                return Some(Fault::Misdirected {
                    shift: 4096 * rng.range(1, 5),
                })
            }
            IoOp::Read if rng.chance(plan.corrupt_read) => return Some(Fault::CorruptRead),
            _ => {}
        }
        let short_p = match req.op() {
            IoOp::Read => plan.short_read,
            IoOp::Write => plan.short_write,
            IoOp::Sync => 0.0,
        };
        if req.len() >= 2 && rng.chance(short_p) {
            let prefix = 1 + rng.below_usize(req.len() - 1);
            return Some(Fault::Short { prefix });
        }
        if rng.chance(plan.delay) {
            let max = plan.delay_max.as_micros() as u64;
            return Some(Fault::Delay(Duration::from_micros(rng.below(max + 1))));
        }
        None
    }

    fn record(&self, req: &IoRequest, seq: u64, fault: Option<Fault>) {
        let mut s = self.state.lock();
        s.plan_ops += 1;
        let c = &mut s.counts;
        c.ops += 1;
        match req.op() {
            IoOp::Read => c.reads += 1,
            IoOp::Write => c.writes += 1,
            IoOp::Sync => c.syncs += 1,
        }
        let Some(fault) = fault else {
            return;
        };
        match fault {
            Fault::Errno { nth: true, .. } => c.nth_failures += 1,
            Fault::Errno { errno, .. } => match (errno, req.op()) {
                (libc::EINTR, _) => c.eintr += 1,
                (libc::EAGAIN, _) => c.eagain += 1,
                (libc::EINVAL, _) => c.direct_einval += 1,
                (libc::ENOSPC, _) => c.write_enospc += 1,
                (_, IoOp::Read) => c.read_eio += 1,
                (_, IoOp::Write) => c.write_eio += 1,
                (_, IoOp::Sync) => c.sync_eio += 1,
            },
            Fault::Short { .. } if req.op() == IoOp::Read => c.short_reads += 1,
            Fault::Short { .. } => c.short_writes += 1,
            Fault::Delay(_) => c.delays += 1,
            Fault::LostWrite => c.lost_writes += 1,
            Fault::Misdirected { .. } => c.misdirected_writes += 1,
            Fault::CorruptRead => c.corrupt_reads += 1,
        }
        if s.log.len() >= LOG_MAX {
            s.log.pop_front();
        }
        s.log.push_back(Injection {
            seq,
            op: req.op(),
            path: req.file.path().to_path_buf(),
            offset: req.offset,
            len: req.len(),
            direct: req.direct,
            fault,
        });
    }

    /// Applies the fixup (if any) of an inner completion; returns it if it is due now.
    fn translate(&mut self, mut d: IoDone) -> Option<IoDone> {
        let Some(fix) = self.fixups.remove(&d.tag) else {
            return Some(d);
        };
        if let Some(prefix) = fix.short {
            if d.result > prefix as i64 {
                d.result = prefix as i64;
            }
        }
        if let (Some(addr), true) = (fix.corrupt, d.result > 0) {
            let at = self.rng.below(d.result as u64) as usize;
            let bit = 1u8 << self.rng.below(8);
            // SAFETY: the read's memory stays valid until its completion is reported (which has not
            // happened yet), and the kernel has finished writing the `d.result` bytes at `addr`.
            unsafe { *(addr as *mut u8).add(at) ^= bit };
        }
        match fix.delay {
            Some(delay) => {
                self.delayed.push((Instant::now() + delay, d));
                None
            }
            None => Some(d),
        }
    }

    /// Moves injected and due delayed completions to `out`; returns how many.
    fn release(&mut self, out: &mut Vec<IoDone>) -> usize {
        let mut n = self.ready.len();
        out.extend(self.ready.drain(..));
        let now = Instant::now();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                out.push(self.delayed.swap_remove(i).1);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed.iter().map(|(t, _)| *t).min()
    }
}

impl Backend for FaultBackend {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.ready.len() + self.delayed.len()
    }

    fn attach_thread(&mut self) -> gpuio::Result<()> {
        self.inner.attach_thread()
    }

    unsafe fn push(&mut self, mut req: IoRequest) -> Result<(), IoRequest> {
        if self.in_flight() >= self.queue_depth() {
            return Err(req);
        }
        let (plan, nth) = {
            let s = self.state.lock();
            (s.plan, s.plan_ops + 1)
        };
        let seq = self.ops + 1;
        let fault = self.decide(&plan, &req, nth);
        let answer = match fault {
            Some(Fault::Errno { errno, .. }) => Some(-(errno as i64)),
            Some(Fault::LostWrite) => Some(req.len() as i64),
            _ => None,
        };
        match answer {
            Some(result) => {
                self.ops = seq;
                self.record(&req, seq, fault);
                self.ready.push_back(IoDone {
                    tag: req.tag,
                    result,
                });
                Ok(())
            }
            _ => {
                let original_kind = req.kind;
                let original_len = req.len();
                let original_offset = req.offset;
                let mut fix = Fixup {
                    short: None,
                    delay: None,
                    corrupt: None,
                };
                match fault {
                    Some(Fault::Short { prefix }) => {
                        // A direct transfer must stay block-sized: do the enclosing blocks, report the
                        // prefix (the extra bytes landed too; the engine redoes them, harmlessly).
                        let inner_len = if req.direct {
                            let block = (req.file.align().offset_align as usize).max(512);
                            prefix.next_multiple_of(block).min(original_len)
                        } else {
                            prefix
                        };
                        if let Some(span) = req.span_mut() {
                            span.len = inner_len;
                        }
                        fix.short = Some(prefix);
                    }
                    Some(Fault::Delay(d)) => fix.delay = Some(d),
                    Some(Fault::Misdirected { shift }) => req.offset += shift,
                    Some(Fault::CorruptRead) => {
                        fix.corrupt = req.span().map(|s| s.ptr as usize);
                    }
                    _ => {}
                }
                let tag = req.tag;
                // What the log shows is the request as the engine made it.
                let logged = IoRequest {
                    kind: original_kind,
                    offset: original_offset,
                    ..req.clone()
                };
                // SAFETY: the request (possibly shortened, which only narrows its memory range) is
                // handed on under the same contract our caller gave us.
                match unsafe { self.inner.push(req) } {
                    Ok(()) => {
                        self.ops = seq;
                        self.record(&logged, seq, fault);
                        if fault.is_some() {
                            self.fixups.insert(tag, fix);
                        }
                        Ok(())
                    }
                    Err(mut back) => {
                        back.kind = original_kind;
                        back.offset = original_offset;
                        Err(back)
                    }
                }
            }
        }
    }

    fn waker(&self) -> Option<gpuio::backend::Waker> {
        // Ends the inner backend's wait; held (delayed or injected) completions are released by
        // the loop below as usual.
        self.inner.waker()
    }

    fn submit_and_reap(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<IoDone>,
    ) -> gpuio::Result<()> {
        let want = min_complete.min(self.in_flight());
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut got = 0;
        let mut batch = Vec::new();
        loop {
            got += self.release(out);
            let need = want.saturating_sub(got);
            let now = Instant::now();
            // Wait no later than the deadline, nor past the moment the next held completion is due.
            let mut wait = deadline.map(|d| d.saturating_duration_since(now));
            if let Some(due) = self.next_due() {
                let w = due.saturating_duration_since(now);
                wait = Some(wait.map_or(w, |x| x.min(w)));
            }
            let inner_want = need.min(self.inner.in_flight());
            if inner_want > 0 {
                self.inner.submit_and_reap(inner_want, wait, &mut batch)?;
            } else {
                // Submit whatever was pushed and take what is already there.
                self.inner
                    .submit_and_reap(0, Some(Duration::ZERO), &mut batch)?;
                if need > 0 && batch.is_empty() {
                    // Only held-back completions can satisfy the caller: sleep until one is due.
                    if let Some(w) = wait {
                        std::thread::sleep(w);
                    }
                }
            }
            for d in batch.drain(..) {
                if let Some(d) = self.translate(d) {
                    out.push(d);
                    got += 1;
                }
            }
            got += self.release(out);
            if got >= want || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(());
            }
        }
    }

    fn register_pool(&mut self, pool: &BufferPool) -> Registration {
        self.inner.register_pool(pool)
    }

    fn notes(&self) -> Vec<String> {
        let mut n = self.inner.notes();
        n.push(format!(
            "faults injected by gpuio-testkit (seed {}): {:?}",
            self.seed,
            self.state.lock().plan
        ));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{scratch_dir, test_config, Place};
    use gpuio::backend::{IoKind, Span};
    use gpuio::{AlignedBuf, DirectMode, File, OpenOptions};

    fn inner(kind: BackendKind) -> Option<Box<dyn Backend>> {
        match gpuio::backend::probe(&test_config(kind).backend) {
            Ok((b, _)) => Some(b),
            Err(e) => {
                crate::backend_unavailable(kind, &e);
                None
            }
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn request(
        op: IoOp,
        file: &File,
        direct: bool,
        offset: u64,
        buf: &mut [u8],
        tag: u64,
    ) -> IoRequest {
        let span = Span {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            fixed: None,
        };
        IoRequest {
            kind: IoKind::new(op, span),
            file: file.clone(),
            direct,
            offset,
            tag,
        }
    }

    /// Reaps until nothing is in flight (bounded), counting each tag.
    fn drain(b: &mut FaultBackend, seen: &mut HashMap<u64, i64>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while b.in_flight() > 0 {
            assert!(Instant::now() < deadline, "completions never arrived");
            b.submit_and_reap(1, Some(Duration::from_millis(50)), &mut out)
                .unwrap();
            for d in out.drain(..) {
                assert!(
                    seen.insert(d.tag, d.result).is_none(),
                    "tag {} reported twice",
                    d.tag
                );
            }
        }
    }

    #[test]
    fn every_tag_is_reported_exactly_once() {
        let dir = scratch_dir(Place::Disk);
        let path = dir.path().join("f");
        std::fs::write(&path, data(64 << 10)).unwrap();
        let file = OpenOptions::read_write()
            .direct(DirectMode::Off)
            .open(&path)
            .unwrap();
        for kind in [BackendKind::Threads, BackendKind::Uring] {
            let Some(inner) = inner(kind) else { continue };
            let plan = FaultPlan::chaos(0.3, 0.2)
                .with_delay(0.3, Duration::from_millis(3))
                .with_lost_write(0.05)
                .with_misdirect_write(0.05)
                .with_corrupt_read(0.05);
            let (mut b, h) = FaultBackend::new(inner, 42, plan);
            const N: usize = 300;
            let mut bufs: Vec<Vec<u8>> = (0..N).map(|_| vec![0u8; 4096]).collect();
            let mut seen = HashMap::new();
            let mut out = Vec::new();
            for (i, buf) in bufs.iter_mut().enumerate() {
                let op = if i % 3 == 0 { IoOp::Write } else { IoOp::Read };
                let off = (i % 16) as u64 * 4096;
                let mut req = request(op, &file, false, off, buf, i as u64);
                loop {
                    // SAFETY: bufs outlive every completion (drained below before they drop).
                    match unsafe { b.push(req) } {
                        Ok(()) => break,
                        Err(back) => {
                            req = back;
                            b.submit_and_reap(1, Some(Duration::from_millis(50)), &mut out)
                                .unwrap();
                            for d in out.drain(..) {
                                assert!(seen.insert(d.tag, d.result).is_none());
                            }
                        }
                    }
                }
                assert!(b.in_flight() <= b.queue_depth());
            }
            drain(&mut b, &mut seen);
            assert_eq!(seen.len(), N, "{kind}: every tag reported");
            for (&tag, &r) in &seen {
                assert!(
                    (1..=4096).contains(&r)
                        || [libc::EIO, libc::ENOSPC, libc::EINTR, libc::EAGAIN]
                            .contains(&(-r as i32)),
                    "{kind}: tag {tag} result {r}"
                );
            }
            let c = h.counts();
            assert_eq!(c.ops, N as u64);
            assert!(
                c.hard_errors() > 0 && c.transients() > 0 && c.shorts() > 0,
                "{c:?}"
            );
            assert!(c.delays > 0 && c.silent() > 0, "{c:?}");
            assert_eq!(h.log().len() as u64, c.total());
        }
    }

    #[test]
    fn a_short_read_really_reads_its_prefix() {
        let dir = scratch_dir(Place::Disk);
        let path = dir.path().join("f");
        let content = data(16 << 10);
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        let (mut b, h) = FaultBackend::new(
            inner(BackendKind::Threads).unwrap(),
            7,
            FaultPlan::none().with_short_read(1.0),
        );
        for (direct, tag) in [(false, 1u64), (file.is_direct(), 2)] {
            let mut buf = AlignedBuf::new(8192, 4096).unwrap();
            let req = request(IoOp::Read, &file, direct, 4096, &mut buf, tag);
            // SAFETY: buf lives until the completion is drained below.
            unsafe { b.push(req) }.unwrap();
            let mut seen = HashMap::new();
            drain(&mut b, &mut seen);
            let n = seen[&tag];
            assert!((1..8192).contains(&n), "short prefix reported: {n}");
            let n = n as usize;
            assert_eq!(&buf[..n], &content[4096..4096 + n], "the prefix landed");
            if !direct {
                assert!(buf[n..].iter().all(|&x| x == 0), "nothing past the prefix");
            }
        }
        assert_eq!(h.counts().short_reads, 2);
    }

    #[test]
    fn a_corrupt_read_flips_exactly_one_bit() {
        let dir = scratch_dir(Place::Disk);
        let path = dir.path().join("f");
        let content = data(8192);
        std::fs::write(&path, &content).unwrap();
        let file = OpenOptions::read()
            .direct(DirectMode::Off)
            .open(&path)
            .unwrap();
        let (mut b, h) = FaultBackend::new(
            inner(BackendKind::Threads).unwrap(),
            3,
            FaultPlan::none().with_corrupt_read(1.0),
        );
        for tag in 0..8u64 {
            let mut buf = vec![0u8; 4096];
            let req = request(IoOp::Read, &file, false, 4096, &mut buf, tag);
            // SAFETY: buf lives until the completion is drained below.
            unsafe { b.push(req) }.unwrap();
            let mut seen = HashMap::new();
            drain(&mut b, &mut seen);
            assert_eq!(seen[&tag], 4096, "reported as a full success");
            let flipped: u32 = buf
                .iter()
                .zip(&content[4096..])
                .map(|(x, y)| (x ^ y).count_ones())
                .sum();
            assert_eq!(flipped, 1);
        }
        assert_eq!(h.counts().corrupt_reads, 8);
    }

    #[test]
    fn fail_nth_fails_exactly_that_operation_and_sticky_fails_the_rest() {
        let dir = scratch_dir(Place::Disk);
        let path = dir.path().join("f");
        std::fs::write(&path, data(4096)).unwrap();
        let file = OpenOptions::read()
            .direct(DirectMode::Off)
            .open(&path)
            .unwrap();
        for sticky in [false, true] {
            let (mut b, h) = FaultBackend::new(
                inner(BackendKind::Threads).unwrap(),
                1,
                FaultPlan::none().with_fail_nth(3, libc::EIO, sticky),
            );
            let mut bufs: Vec<Vec<u8>> = (0..6).map(|_| vec![0u8; 100]).collect();
            let mut seen = HashMap::new();
            for (i, buf) in bufs.iter_mut().enumerate() {
                let req = request(IoOp::Read, &file, false, 0, buf, i as u64);
                // SAFETY: bufs outlive the drain below.
                unsafe { b.push(req) }.unwrap();
            }
            drain(&mut b, &mut seen);
            for i in 0..6u64 {
                let failed = i == 2 || (sticky && i > 2);
                let want = if failed { -(libc::EIO as i64) } else { 100 };
                assert_eq!(seen[&i], want, "sticky {sticky}, op {}", i + 1);
            }
            let c = h.counts();
            assert_eq!(c.nth_failures, if sticky { 4 } else { 1 });
            // A new plan restarts the count.
            h.set_plan(FaultPlan::none().with_fail_nth(1, libc::ENOSPC, false));
            let mut buf = vec![0u8; 10];
            let req = request(IoOp::Read, &file, false, 0, &mut buf, 99);
            // SAFETY: buf outlives the drain below.
            unsafe { b.push(req) }.unwrap();
            drain(&mut b, &mut seen);
            assert_eq!(seen[&99], -(libc::ENOSPC as i64));
        }
    }
}
