//! The engine thread: turns committed command buffers into backend requests and completions back into
//! finished commands.
//!
//! One thread owns the backend. Each round it takes new messages, hands free backend slots to tasks —
//! retries first, then queues by priority (high before normal before low, round-robin among equals),
//! each within its bytes-in-flight bound — submits them all with one call, and reaps completions.
//!
//! This is also the one place that applies what a backend's raw result means (the decision itself
//! is `outcome::classify`, a pure function):
//! - `EINTR`/`EAGAIN` (and a write of zero bytes): retried as-is, at most `retries_max` times;
//! - a short transfer: continued from where it stopped, at most `short_transfers_max` times (a direct
//!   transfer that stopped off a block boundary continues on the buffered descriptor);
//! - `EINVAL` on a direct transfer: redone buffered once (counted in `direct_fallbacks`);
//! - a read of zero bytes: end of file (an error only for exact loads);
//! - anything else: the command fails with a typed error naming file, offset and length.
//!
//! Memory safety: a command's buffer lives in the engine's table of active command buffers until its
//! last task has been reaped, so nothing the user drops can free memory the kernel is still using.
//! The driver is used by the engine thread only; it never blocks on anything but the backend and its
//! message channel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rustc_hash::FxHashMap;

use super::command::{CbShared, CmdKind, CommandError, CommandId, Output, Recorded, Status};
use super::engine::{EngineConfig, Msg, BACKEND_FAILURES_MAX, REAP_WAIT};
use super::outcome::{self, AfterShort, Attempt, Verdict};
use super::plan::{self, PlanInput, SegKind, Segments, TaskPlan};
use super::{QueueKind, QueueShared};
use crate::backend::{Backend, BackendKind, IoDone, IoKind, IoOp, IoRequest, Span};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::file::File;
use crate::mem::{BufferPool, IoBuffer, PooledBuf, Registration};

/// One command being executed.
struct CmdExec {
    rec: Recorded,
    /// Address of the command's first byte in its buffer.
    base: *mut u8,
    fixed: Option<u16>,
    direct: bool,
    block: u64,
    segs: Segments,
    seg: usize,
    cursor: u64,
    sync_issued: bool,
    /// No more tasks will be made (all planned, failed, or cancelled).
    exhausted: bool,
    outstanding: usize,
    bytes: u64,
    error: Option<Error>,
    done: bool,
}

struct ActiveCb {
    shared: Arc<CbShared>,
    queue: u64,
    cmds: Vec<CmdExec>,
    /// A batch's one buffer, addressed by the commands that have no buffer of their own.
    shared_buf: Option<IoBuffer>,
    /// Command index ranges separated by barriers.
    stages: Vec<std::ops::Range<usize>>,
    stage: usize,
    activated: bool,
    stage_open: usize,
    cancelled: bool,
    errors: Vec<CommandError>,
}

struct QueueState {
    shared: Arc<QueueShared>,
    /// Serial queues: committed command buffers waiting for the one before to finish.
    waiting: VecDeque<u64>,
    running: usize,
    /// Commands of active stages that still have tasks to make.
    ready: VecDeque<(u64, u32)>,
    bytes_in_flight: u64,
}

struct Task {
    cb: u64,
    cmd: u32,
    queue: u64,
    op: IoOp,
    plan: TaskPlan,
    file: File,
    file_off: u64,
    ptr: *mut u8,
    len: usize,
    /// Bytes of this task's I/O done so far (from `plan.io_start`).
    io_done: usize,
    direct: bool,
    fixed: Option<u16>,
    bounce: Option<PooledBuf>,
    retries: u32,
    shorts: u32,
    started: Instant,
}

enum TaskEnd {
    Done,
    Failed(Error),
}

pub(super) struct Driver {
    backend: Box<dyn Backend>,
    rx: Receiver<Msg>,
    task_size: usize,
    bounce_size: usize,
    retries_max: u32,
    shorts_max: u32,
    bounce: BufferPool,
    /// Pools the engine registered with this backend (`Engine::buffer_pool`): only their buffers'
    /// fixed indices mean anything on this ring.
    registered: Vec<BufferPool>,
    cbs: FxHashMap<u64, ActiveCb>,
    queues: FxHashMap<u64, QueueState>,
    /// Queue ids by priority, highest first.
    levels: [Vec<u64>; 3],
    /// Per level, the index in `levels` of the queue whose turn is next (round-robin).
    turn: [usize; 3],
    slab: Vec<Option<Task>>,
    free_tags: Vec<usize>,
    retry: VecDeque<Task>,
    done: Vec<IoDone>,
    closed: bool,
    /// Shared with the engine handle: true while waiting in the backend.
    waiting: Arc<AtomicBool>,
    /// When the current dispatch round began: the issue time of every task it issues.
    now: Instant,
}

// SAFETY: raw pointers in tasks and commands point into buffers owned by the same Driver (or by its
// bounce pool); the Driver moves to the engine thread as a whole and is used only there.
unsafe impl Send for Driver {}

impl Driver {
    pub(super) fn new(
        backend: Box<dyn Backend>,
        rx: Receiver<Msg>,
        cfg: &EngineConfig,
        bounce: BufferPool,
        waiting: Arc<AtomicBool>,
    ) -> Driver {
        Driver {
            backend,
            rx,
            task_size: cfg.task_size_bytes,
            bounce_size: cfg.bounce_size(),
            retries_max: cfg.retries_max,
            shorts_max: cfg.short_transfers_max,
            bounce,
            registered: Vec::new(),
            cbs: FxHashMap::default(),
            queues: FxHashMap::default(),
            levels: Default::default(),
            turn: [0; 3],
            slab: Vec::new(),
            free_tags: Vec::new(),
            retry: VecDeque::new(),
            done: Vec::new(),
            closed: false,
            waiting,
            now: Instant::now(),
        }
    }

    /// Binds the backend to this thread, says so through `attached`, and drives it until the last
    /// handle is gone and every command buffer has finished.
    pub(super) fn run(mut self, attached: Sender<Result<()>>) {
        let attach = self.backend.attach_thread();
        let ok = attach.is_ok();
        let _ = attached.send(attach);
        if !ok {
            return;
        }
        let mut failures = 0u32;
        loop {
            if self.backend.in_flight() == 0 && self.retry.is_empty() {
                if self.closed && self.cbs.is_empty() {
                    return;
                }
                // Nothing can be dispatched without news: block for the next message.
                if !self.has_dispatchable() {
                    match self.rx.recv() {
                        Ok(m) => self.handle(m),
                        Err(_) => self.closed = true,
                    }
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        self.closed = true;
                        break;
                    }
                }
            }
            self.dispatch();
            if self.backend.in_flight() == 0 {
                continue;
            }
            let mut done = std::mem::take(&mut self.done);
            // Announce the wait, then look for messages once more (see `Engine::send`): a message
            // that arrived in between means submitting without waiting. With every slot taken, new
            // work could not start before a completion anyway, and that completion ends the wait:
            // senders then need not pay for a wake-up (a syscall and a context switch).
            let slots_free = self.backend.in_flight() < self.backend.queue_depth();
            self.waiting.store(slots_free, Ordering::SeqCst);
            let want = usize::from(self.rx.is_empty());
            let reaped = self
                .backend
                .submit_and_reap(want, Some(REAP_WAIT), &mut done);
            self.waiting.store(false, Ordering::SeqCst);
            let reaped_at = Instant::now();
            match reaped {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures >= BACKEND_FAILURES_MAX {
                        self.abandon(e);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            // Refill the slots just freed before doing the completions' bookkeeping: devices that
            // complete in bursts would otherwise sit idle while we finish command buffers.
            if !done.is_empty() {
                let before = self.backend.in_flight();
                self.dispatch();
                if self.backend.in_flight() > before {
                    // Errors here resurface on the next full round.
                    let _ = self.backend.submit_and_reap(0, None, &mut done);
                }
            }
            for d in done.drain(..) {
                self.complete(d, reaped_at);
            }
            self.done = done;
        }
    }

    /// Whether some queue has a task it could issue now.
    fn has_dispatchable(&self) -> bool {
        self.queues.values().any(|q| !q.ready.is_empty())
    }

    /// The backend itself keeps failing: fail every command buffer. Buffers with I/O possibly still in
    /// the kernel are leaked on purpose rather than freed under it.
    fn abandon(&mut self, e: Error) {
        let err = Error::new(
            ErrorKind::EngineStopped,
            format!("the backend failed {BACKEND_FAILURES_MAX} times in a row: {e}"),
        );
        for task in self.slab.drain(..).flatten() {
            std::mem::forget(task);
        }
        let ids: Vec<u64> = self.cbs.keys().copied().collect();
        for id in ids {
            if let Some(cb) = self.cbs.remove(&id) {
                let errors = vec![CommandError {
                    command: CommandId(0),
                    error: err.clone(),
                }];
                if let Some(q) = self.queues.get(&cb.queue) {
                    q.shared.slots.release();
                }
                cb.shared.finish(Status::Error(errors), Vec::new(), None);
                std::mem::forget(cb.cmds);
                // A batch's buffer may still be written by the kernel, like the commands' own.
                std::mem::forget(cb.shared_buf);
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Commit {
                queue,
                cb,
                commands,
                shared_buf,
                barriers,
            } => self.commit(queue, cb, commands, shared_buf, barriers),
            Msg::Cancel(id) => self.cancel(id),
            Msg::RunCallback(f, status) => f(&status),
            Msg::RegisterPool(pool, reply) => {
                let reg = self.backend.register_pool(&pool);
                if let Registration::Fixed { .. } = reg {
                    self.registered.push(pool);
                }
                let _ = reply.send(reg);
            }
        }
    }

    fn commit(
        &mut self,
        queue: Arc<QueueShared>,
        shared: Arc<CbShared>,
        commands: Vec<Recorded>,
        mut shared_buf: Option<IoBuffer>,
        barriers: Vec<usize>,
    ) {
        let qid = queue.id;
        if !self.queues.contains_key(&qid) {
            // A queue the user dropped while idle is forgotten here, so the table holds at most the
            // live queues plus those dropped since the last new one.
            let known: Vec<u64> = self.queues.keys().copied().collect();
            for q in known {
                self.forget_idle_queue(q);
            }
            self.levels[2 - queue.desc.priority as usize].push(qid);
            self.queues.insert(
                qid,
                QueueState {
                    shared: queue,
                    waiting: VecDeque::new(),
                    running: 0,
                    ready: VecDeque::new(),
                    bytes_in_flight: 0,
                },
            );
        }
        let n = commands.len();
        let mut stages = Vec::with_capacity(barriers.len() + 1);
        let mut start = 0;
        for b in barriers.into_iter().chain(std::iter::once(n)) {
            stages.push(start..b);
            start = b;
        }
        let registered = &self.registered;
        let (shared_base, shared_fixed) = match shared_buf.as_mut() {
            Some(b) => (
                b.as_aligned_mut().as_mut_ptr(),
                b.fixed_index_among(registered),
            ),
            None => (std::ptr::null_mut(), None),
        };
        let backend_kind = self.backend.kind();
        let bounce_size = self.bounce_size as u64;
        let cmds = commands
            .into_iter()
            .map(|mut rec| {
                let (base, fixed) = match (rec.buf.as_mut(), rec.in_shared) {
                    // SAFETY: buf_offset <= buf.len() was checked when the command was recorded.
                    (Some(b), _) => (
                        unsafe { b.as_aligned_mut().as_mut_ptr().add(rec.buf_offset) },
                        b.fixed_index_among(registered),
                    ),
                    // SAFETY: buf_offset + len <= the shared buffer's length was checked when the
                    // command was recorded; the buffer moves into this command buffer's entry below
                    // (its heap memory does not move) and lives until the entry is removed.
                    (None, true) => (unsafe { shared_base.add(rec.buf_offset) }, shared_fixed),
                    (None, false) => (std::ptr::null_mut(), None),
                };
                let align = rec.file.align();
                let block = plan::direct_block(align, rec.kind == CmdKind::Store);
                // The mmap engine reads through mappings, where O_DIRECT means nothing; a block larger
                // than a quarter bounce buffer cannot be bounced, so such files go buffered.
                let direct = rec.file.is_direct()
                    && backend_kind != BackendKind::Mmap
                    && block * 4 <= bounce_size;
                let segs = match rec.kind {
                    CmdKind::Sync => Segments::default(),
                    CmdKind::Load { .. } | CmdKind::Store => plan::segments(PlanInput {
                        write: rec.kind == CmdKind::Store,
                        direct,
                        block,
                        mem_align: (align.mem_align as u64).max(1),
                        mem_addr: base as usize,
                        offset: rec.offset,
                        len: rec.len,
                    }),
                };
                CmdExec {
                    cursor: segs.first().map_or(0, |s| s.file_start),
                    rec,
                    base,
                    fixed,
                    direct,
                    block,
                    segs,
                    seg: 0,
                    sync_issued: false,
                    exhausted: false,
                    outstanding: 0,
                    bytes: 0,
                    error: None,
                    done: false,
                }
            })
            .collect();
        let id = shared.id;
        self.cbs.insert(
            id,
            ActiveCb {
                shared,
                queue: qid,
                cmds,
                shared_buf,
                stages,
                stage: 0,
                activated: false,
                stage_open: 0,
                cancelled: false,
                errors: Vec::new(),
            },
        );
        let q = self
            .queues
            .get_mut(&qid)
            .expect("queue state inserted above");
        if q.shared.desc.kind == QueueKind::Serial && q.running > 0 {
            q.waiting.push_back(id);
        } else {
            q.running += 1;
            self.activate(id);
        }
    }

    /// Starts a command buffer's first stage.
    fn activate(&mut self, id: u64) {
        if let Some(cb) = self.cbs.get_mut(&id) {
            cb.activated = true;
            cb.stage = 0;
        }
        self.open_stage(id);
    }

    /// Opens the current stage of `id`, skipping empty ones; finishes the command buffer after the last.
    fn open_stage(&mut self, id: u64) {
        loop {
            let Some(cb) = self.cbs.get_mut(&id) else {
                return;
            };
            if cb.stage >= cb.stages.len() || cb.cancelled || !cb.errors.is_empty() {
                self.finish_cb(id);
                return;
            }
            let range = cb.stages[cb.stage].clone();
            let q = self
                .queues
                .get_mut(&cb.queue)
                .expect("queue of an active command buffer");
            let mut open = 0;
            for i in range {
                let c = &mut cb.cmds[i];
                let has_work = c.rec.kind == CmdKind::Sync || !c.segs.is_empty();
                if has_work {
                    q.ready.push_back((id, i as u32));
                    open += 1;
                } else {
                    c.exhausted = true;
                    c.done = true;
                }
            }
            cb.stage_open = open;
            if open > 0 {
                return;
            }
            cb.stage += 1;
        }
    }

    fn cancel(&mut self, id: u64) {
        let Some(cb) = self.cbs.get_mut(&id) else {
            return;
        };
        cb.cancelled = true;
        if !cb.activated {
            let q = self
                .queues
                .get_mut(&cb.queue)
                .expect("queue of a command buffer");
            q.waiting.retain(|&w| w != id);
            self.finish_cb(id);
            return;
        }
        for c in cb.cmds.iter_mut() {
            c.exhausted = true;
        }
        let range = cb.stages.get(cb.stage).cloned().unwrap_or(0..0);
        for i in range {
            self.check_cmd(id, i);
        }
    }

    /// If command `i` of `id` has nothing left in flight or to make, closes it and advances the stage.
    fn check_cmd(&mut self, id: u64, i: usize) {
        let Some(cb) = self.cbs.get_mut(&id) else {
            return;
        };
        let c = &mut cb.cmds[i];
        if c.done || !c.exhausted || c.outstanding > 0 {
            return;
        }
        c.done = true;
        if let (CmdKind::Load { exact: true }, None) = (c.rec.kind, &c.error) {
            if c.bytes < c.rec.len && !cb.cancelled {
                c.error = Some(
                    outcome::eof_error(c.bytes, c.rec.len)
                        .with_path(c.rec.file.path())
                        .with_range(c.rec.offset, c.rec.len),
                );
            }
        }
        if let Some(e) = c.error.clone() {
            cb.errors.push(CommandError {
                command: CommandId(i as u32),
                error: e,
            });
        }
        cb.stage_open -= 1;
        if cb.stage_open == 0 {
            cb.stage += 1;
            self.open_stage(id);
        }
    }

    fn finish_cb(&mut self, id: u64) {
        let Some(mut cb) = self.cbs.remove(&id) else {
            return;
        };
        // Commands in stages that never ran were skipped because an earlier one failed. `cb.stage` is
        // the first stage that did not run, so skipping starts at its first command.
        if !cb.cancelled && !cb.errors.is_empty() {
            let skipped_from = cb.stages.get(cb.stage).map_or(cb.cmds.len(), |r| r.start);
            for i in skipped_from..cb.cmds.len() {
                cb.errors.push(CommandError {
                    command: CommandId(i as u32),
                    error: Error::new(
                        ErrorKind::Cancelled,
                        "skipped: a command before a barrier failed",
                    ),
                });
            }
        }
        let outputs = cb
            .cmds
            .iter_mut()
            .map(|c| Output {
                buf: c.rec.buf.take(),
                bytes: c.bytes,
            })
            .collect();
        let status = if cb.errors.is_empty() {
            Status::Complete
        } else {
            Status::Error(std::mem::take(&mut cb.errors))
        };
        let qid = cb.queue;
        let mut next = None;
        if let Some(q) = self.queues.get_mut(&qid) {
            if cb.activated {
                q.running -= 1;
            }
            if q.shared.desc.kind == QueueKind::Serial && q.running == 0 {
                next = q.waiting.pop_front();
                if next.is_some() {
                    q.running += 1;
                }
            }
            q.shared.slots.release();
        }
        cb.shared.finish(status, outputs, cb.shared_buf.take());
        if let Some(n) = next {
            self.activate(n);
        }
        self.forget_idle_queue(qid);
    }

    /// Drops the engine's state for a queue the user has dropped and that has nothing left.
    fn forget_idle_queue(&mut self, qid: u64) {
        let idle = self.queues.get(&qid).is_some_and(|q| {
            Arc::strong_count(&q.shared) == 1
                && q.running == 0
                && q.waiting.is_empty()
                && q.bytes_in_flight == 0
        });
        if idle {
            self.queues.remove(&qid);
            for level in self.levels.iter_mut() {
                level.retain(|&q| q != qid);
            }
        }
    }

    fn dispatch(&mut self) {
        // One clock read per round: the tasks it issues reach the kernel together.
        self.now = Instant::now();
        while self.backend.in_flight() < self.backend.queue_depth() {
            let Some(task) = self.retry.pop_front() else {
                break;
            };
            self.issue(task);
        }
        for level in 0..3 {
            loop {
                let mut progress = false;
                // Start after the queue served last at this level: when slots free up one at a
                // time, starting at the first queue every round would starve the others.
                let n = self.levels[level].len();
                let start = self.turn[level];
                for k in 0..n {
                    if self.backend.in_flight() >= self.backend.queue_depth() {
                        return;
                    }
                    let qi = (start + k) % n;
                    let qid = self.levels[level][qi];
                    if let Some(task) = self.next_task(qid) {
                        self.issue(task);
                        progress = true;
                        self.turn[level] = qi + 1;
                    }
                }
                if !progress {
                    break;
                }
            }
        }
    }

    /// Makes the next task of queue `qid`, if its bounds and the bounce pool allow.
    fn next_task(&mut self, qid: u64) -> Option<Task> {
        let q = self.queues.get_mut(&qid)?;
        while let Some(&(id, i)) = q.ready.front() {
            let Some(cb) = self.cbs.get_mut(&id) else {
                q.ready.pop_front();
                continue;
            };
            let c = &mut cb.cmds[i as usize];
            if c.exhausted {
                q.ready.pop_front();
                continue;
            }
            if c.rec.kind == CmdKind::Sync {
                c.exhausted = true;
                c.sync_issued = true;
                c.outstanding += 1;
                q.ready.pop_front();
                return Some(Task {
                    cb: id,
                    cmd: i,
                    queue: qid,
                    op: IoOp::Sync,
                    plan: TaskPlan {
                        kind: SegKind::Buffered,
                        file_start: 0,
                        len: 0,
                        io_start: 0,
                        io_len: 0,
                    },
                    file: c.rec.file.clone(),
                    file_off: 0,
                    ptr: std::ptr::null_mut(),
                    len: 0,
                    io_done: 0,
                    direct: false,
                    fixed: None,
                    bounce: None,
                    retries: 0,
                    shorts: 0,
                    started: self.now,
                });
            }
            let seg = c.segs[c.seg];
            let tp = plan::next_task(&seg, c.cursor, c.block, self.task_size, self.bounce_size);
            let bytes_max = q.shared.desc.bytes_in_flight_max;
            if q.bytes_in_flight > 0 && q.bytes_in_flight + tp.io_len as u64 > bytes_max {
                return None;
            }
            let needs_bounce = matches!(tp.kind, SegKind::BounceRead | SegKind::BounceWrite);
            let bounce = if needs_bounce {
                Some(self.bounce.try_get().ok()?)
            } else {
                None
            };
            // Advance the command's cursor.
            c.cursor += tp.len as u64;
            if c.cursor >= seg.file_end {
                c.seg += 1;
                match c.segs.get(c.seg) {
                    Some(s) => c.cursor = s.file_start,
                    None => {
                        c.exhausted = true;
                        q.ready.pop_front();
                    }
                }
            }
            c.outstanding += 1;
            q.bytes_in_flight += tp.io_len as u64;
            let op = if c.rec.kind == CmdKind::Store {
                IoOp::Write
            } else {
                IoOp::Read
            };
            // SAFETY: file_start - offset < len <= buffer range, checked when recorded.
            let user = unsafe { c.base.add((tp.file_start - c.rec.offset) as usize) };
            let (ptr, fixed, direct) = match (&bounce, tp.kind) {
                (Some(b), _) => (b.as_ptr().cast_mut(), b.fixed_index(), true),
                (None, SegKind::Direct) => (user, c.fixed, true),
                (None, _) => (user, c.fixed, false),
            };
            if tp.kind == SegKind::BounceWrite {
                // SAFETY: user..+len lies in the command's buffer; the bounce buffer holds >= io_len.
                unsafe { std::ptr::copy_nonoverlapping(user, ptr, tp.len) };
            }
            return Some(Task {
                cb: id,
                cmd: i,
                queue: qid,
                op,
                plan: tp,
                file: c.rec.file.clone(),
                file_off: tp.io_start,
                ptr,
                len: tp.io_len,
                io_done: 0,
                direct: direct && c.direct,
                fixed,
                bounce,
                retries: 0,
                shorts: 0,
                started: self.now,
            });
        }
        None
    }

    fn issue(&mut self, mut task: Task) {
        let tag = match self.free_tags.pop() {
            Some(t) => t,
            None => {
                self.slab.push(None);
                self.slab.len() - 1
            }
        };
        task.started = self.now;
        let span = Span {
            ptr: task.ptr,
            len: task.len,
            fixed: task.fixed,
        };
        let req = IoRequest {
            kind: IoKind::new(task.op, span),
            file: task.file.clone(),
            direct: task.direct,
            offset: task.file_off,
            tag: tag as u64,
        };
        self.slab[tag] = Some(task);
        // SAFETY: the task's memory (user buffer held by its ActiveCb, or its bounce buffer held by
        // the task in the slab) stays alive and untouched until this tag is reaped.
        if let Err(req) = unsafe { self.backend.push(req) } {
            // Only happens if the backend filled up behind our back; try again next round.
            let task = self.slab[req.tag as usize]
                .take()
                .expect("task just stored");
            self.free_tags.push(req.tag as usize);
            self.retry.push_front(task);
        }
    }

    /// Interprets one raw result (see the module docs). `reaped_at` is when it left the kernel.
    fn complete(&mut self, d: IoDone, reaped_at: Instant) {
        let tag = d.tag as usize;
        let Some(mut task) = self.slab.get_mut(tag).and_then(Option::take) else {
            return;
        };
        self.free_tags.push(tag);
        let elapsed = reaped_at.saturating_duration_since(task.started);
        let q = self.queues.get(&task.queue).map(|q| q.shared.clone());
        let mut st = q.as_ref().map(|q| q.stats.lock());
        if let Some(s) = st.as_mut() {
            s.ops += 1;
            s.record_latency(elapsed);
            if d.result > 0 {
                match task.op {
                    IoOp::Read => s.bytes_read += d.result as u64,
                    IoOp::Write => s.bytes_written += d.result as u64,
                    IoOp::Sync => {}
                }
            }
        }
        let (cancelled, block) = match self.cbs.get(&task.cb) {
            Some(cb) => (cb.cancelled, cb.cmds[task.cmd as usize].block),
            None => (true, 4096),
        };
        let attempt = Attempt {
            op: task.op,
            len: task.len,
            direct: task.direct,
            block,
            retries: task.retries,
            retries_max: self.retries_max,
            shorts: task.shorts,
            shorts_max: self.shorts_max,
            cancelled,
        };
        let op = match task.op {
            IoOp::Read => Op::Read,
            IoOp::Write => Op::Write,
            IoOp::Sync => Op::Sync,
        };
        let outcome: Option<TaskEnd> = match outcome::classify(&attempt, d.result) {
            Verdict::Complete { n } => {
                task.io_done += n;
                Some(TaskEnd::Done)
            }
            Verdict::EndOfFile => Some(TaskEnd::Done),
            Verdict::Retry => {
                task.retries += 1;
                if let Some(s) = st.as_mut() {
                    s.retries += 1;
                }
                None
            }
            Verdict::RedoBuffered => {
                task.direct = false;
                if let Some(s) = st.as_mut() {
                    s.direct_fallbacks += 1;
                }
                None
            }
            Verdict::Fail(f) => Some(TaskEnd::Failed(
                outcome::failure_error(op, f)
                    .with_path(task.file.path())
                    .with_range(task.file_off, task.len as u64),
            )),
            Verdict::Short { n, direct, then } => {
                // Continue where it stopped.
                task.shorts += 1;
                if let Some(s) = st.as_mut() {
                    s.short_transfers += 1;
                }
                task.io_done += n;
                task.file_off += n as u64;
                // SAFETY: n < len, so the pointer stays inside the task's memory.
                task.ptr = unsafe { task.ptr.add(n) };
                task.len -= n;
                task.direct = direct;
                match then {
                    AfterShort::Continue => None,
                    AfterShort::Stop => Some(TaskEnd::Done),
                    AfterShort::GiveUp => Some(TaskEnd::Failed(
                        outcome::shorts_error(op, task.shorts)
                            .with_path(task.file.path())
                            .with_range(task.file_off, task.len as u64),
                    )),
                }
            }
        };
        drop(st);
        match outcome {
            None => self.retry.push_back(task),
            Some(end) => self.end_task(task, end),
        }
    }

    fn end_task(&mut self, task: Task, end: TaskEnd) {
        let (id, i) = (task.cb, task.cmd as usize);
        if let Some(q) = self.queues.get_mut(&task.queue) {
            q.bytes_in_flight -= task.plan.io_len as u64;
        }
        let Some(cb) = self.cbs.get_mut(&id) else {
            return;
        };
        let c = &mut cb.cmds[i];
        c.outstanding -= 1;
        match end {
            TaskEnd::Failed(e) => {
                if c.error.is_none() {
                    c.error = Some(e);
                }
                c.exhausted = true;
            }
            TaskEnd::Done => {
                let delivered = match (task.op, &task.bounce) {
                    (IoOp::Read, Some(b)) => {
                        let skip = (task.plan.file_start - task.plan.io_start) as usize;
                        let n = task.plan.len.min(task.io_done.saturating_sub(skip));
                        let user = (task.plan.file_start - c.rec.offset) as usize;
                        // SAFETY: n bytes from the bounce buffer at skip (< io_len) into the user's
                        // buffer range, which holds plan.len >= n bytes at `user`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(b.as_ptr().add(skip), c.base.add(user), n)
                        };
                        if let Some(q) = self.queues.get(&task.queue) {
                            q.shared.stats.lock().bounce_bytes += n as u64;
                        }
                        n
                    }
                    (IoOp::Read, None) => task.io_done.min(task.plan.len),
                    (IoOp::Write, _) => {
                        if task.bounce.is_some() {
                            if let Some(q) = self.queues.get(&task.queue) {
                                q.shared.stats.lock().bounce_bytes += task.plan.len as u64;
                            }
                        }
                        task.plan.len
                    }
                    (IoOp::Sync, _) => 0,
                };
                c.bytes += delivered as u64;
                if task.op == IoOp::Read && delivered < task.plan.len {
                    // End of file inside this task: nothing after it exists either.
                    c.exhausted = true;
                }
            }
        }
        drop(task);
        self.check_cmd(id, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{self, BackendConfig};
    use crate::mem::{MemoryBudget, Wait};
    use crate::queue::stats::QueueStats;
    use crate::queue::{QueueDesc, Slots};
    use crossbeam_channel::unbounded;
    use parking_lot::Mutex;

    fn empty_cb(id: u64) -> Arc<CbShared> {
        Arc::new(CbShared::pending(id, None))
    }

    #[test]
    fn dropped_queues_are_forgotten() {
        let cfg = EngineConfig {
            backend: BackendConfig {
                choice: crate::BackendChoice::Threads,
                queue_depth: 2,
                ..BackendConfig::default()
            },
            ..EngineConfig::default()
        };
        let (backend, _) = backend::probe(&cfg.backend).unwrap();
        let bounce =
            BufferPool::new(&MemoryBudget::unlimited(), 64 << 10, 1, 4096, Wait::No).unwrap();
        let (_tx, rx) = unbounded();
        let mut d = Driver::new(backend, rx, &cfg, bounce, Arc::new(AtomicBool::new(false)));
        for id in 0..100u64 {
            let q = Arc::new(QueueShared {
                id,
                desc: QueueDesc::default(),
                slots: Slots::new(1),
                stats: Mutex::new(QueueStats::default()),
                outstanding: Default::default(),
            });
            q.slots.acquire(true).unwrap();
            let cb = empty_cb(1000 + id);
            // The user still holds the queue when its work finishes, and drops it afterwards.
            let user_handle = q.clone();
            d.commit(q, cb.clone(), Vec::new(), None, Vec::new());
            drop(user_handle);
            assert!(
                cb.state.lock().status.is_complete(),
                "an empty command buffer completes at once"
            );
            assert!(
                d.queues.len() <= 2,
                "{} queue states kept for 1 live queue",
                d.queues.len()
            );
        }
        assert!(d.levels.iter().map(Vec::len).sum::<usize>() <= 2);
    }
}
