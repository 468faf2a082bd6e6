//! Command buffers (what to do) and completions (how it went).
//!
//! A [`CommandBuffer`] owns the buffers of its commands from `load`/`store` until it completes; the
//! engine then hands them back through [`Finished`], on success and on failure alike. Dropping a
//! [`Completion`] early never frees memory the kernel may still be writing: the engine holds it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::engine::Msg;
use super::inline;
use super::workers::InlineJob;
use super::{IoQueue, QueueKind};
use crate::error::{Error, ErrorKind, Op, Result};
use crate::file::File;
use crate::mem::IoBuffer;

/// Names one command within its command buffer (its position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(pub(crate) u32);

impl CommandId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A failed command and why.
#[derive(Debug, Clone)]
pub struct CommandError {
    pub command: CommandId,
    pub error: Error,
}

/// Where a command buffer stands.
#[derive(Debug, Clone)]
pub enum Status {
    /// Committed, not finished.
    Pending,
    /// Every command succeeded.
    Complete,
    /// `try_cancel` took effect; contents of load buffers are unspecified.
    Cancelled,
    /// At least one command failed; each failure is listed. Other commands ran to completion.
    Error(Vec<CommandError>),
}

impl Status {
    pub fn is_pending(&self) -> bool {
        matches!(self, Status::Pending)
    }
    pub fn is_complete(&self) -> bool {
        matches!(self, Status::Complete)
    }
    /// The first error, if any (`Cancelled` counts as an error of kind `Cancelled`).
    pub fn first_error(&self) -> Option<Error> {
        match self {
            Status::Error(v) => v.first().map(|e| e.error.clone()),
            Status::Cancelled => Some(Error::new(ErrorKind::Cancelled, "command buffer cancelled")),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmdKind {
    Load { exact: bool },
    Store,
    Sync,
}

/// One recorded command.
pub(crate) struct Recorded {
    pub kind: CmdKind,
    pub file: File,
    pub offset: u64,
    pub buf: Option<IoBuffer>,
    /// The command addresses the command buffer's shared buffer (`buf` is `None`).
    pub in_shared: bool,
    pub buf_offset: usize,
    pub len: u64,
}

pub(crate) type Callback = Box<dyn FnOnce(&Status) + Send + 'static>;

/// What a command produced: its buffer back, and bytes transferred.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub buf: Option<IoBuffer>,
    pub bytes: u64,
}

pub(crate) struct CbState {
    pub status: Status,
    pub cancel_requested: bool,
    pub outputs: Vec<Output>,
    /// The shared buffer of a batch (see [`CommandBuffer::set_buffer`]), back after completion.
    pub shared_buf: Option<IoBuffer>,
    pub waker: Option<Waker>,
    pub callback: Option<Callback>,
}

/// The part of a command buffer the engine and the user's [`Completion`] share.
pub(crate) struct CbShared {
    pub id: u64,
    pub state: Mutex<CbState>,
    pub done: Condvar,
}

impl CbShared {
    /// A command buffer just committed: pending, with its callback if any.
    pub(crate) fn pending(id: u64, callback: Option<Callback>) -> CbShared {
        CbShared {
            id,
            state: Mutex::new(CbState {
                status: Status::Pending,
                cancel_requested: false,
                outputs: Vec::new(),
                shared_buf: None,
                waker: None,
                callback,
            }),
            done: Condvar::new(),
        }
    }

    /// Records the final status and outputs, wakes waiters, runs the callback (on the engine thread).
    pub(crate) fn finish(
        &self,
        status: Status,
        outputs: Vec<Output>,
        shared_buf: Option<IoBuffer>,
    ) {
        let (waker, callback, status) = {
            let mut st = self.state.lock();
            st.status = if st.cancel_requested {
                Status::Cancelled
            } else {
                status
            };
            st.outputs = outputs;
            st.shared_buf = shared_buf;
            (st.waker.take(), st.callback.take(), st.status.clone())
        };
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
        if let Some(cb) = callback {
            cb(&status);
        }
    }
}

/// Commands to run together, recorded then committed to an [`IoQueue`].
pub struct CommandBuffer {
    queue: IoQueue,
    commands: Vec<Recorded>,
    /// One buffer that `load_into`/`store_from` commands address by offset (a batch).
    shared_buf: Option<IoBuffer>,
    /// Indices of the first command after each barrier.
    barriers: Vec<usize>,
    callback: Option<Callback>,
    /// The callback may run on the committing thread (see [`CommandBuffer::on_complete_any_thread`]).
    callback_any_thread: bool,
}

impl fmt::Debug for CommandBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBuffer")
            .field("commands", &self.commands.len())
            .field("barriers", &self.barriers)
            .finish()
    }
}

impl CommandBuffer {
    pub(crate) fn new(queue: IoQueue) -> CommandBuffer {
        CommandBuffer {
            queue,
            commands: Vec::new(),
            shared_buf: None,
            barriers: Vec::new(),
            callback: None,
            callback_any_thread: false,
        }
    }

    pub fn len(&self) -> usize {
        self.commands.len()
    }
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    fn push(&mut self, r: Recorded) -> Result<CommandId> {
        if self.commands.len() >= u32::MAX as usize {
            return Err(Error::invalid("too many commands in one command buffer"));
        }
        self.commands.push(r);
        Ok(CommandId(self.commands.len() as u32 - 1))
    }

    pub(super) fn check_range(
        file: &File,
        op: Op,
        offset: u64,
        len: u64,
        buf: &IoBuffer,
        buf_offset: usize,
    ) -> Result<()> {
        let ctx = |e: Error| e.with_op(op).with_path(file.path()).with_range(offset, len);
        if offset
            .checked_add(len)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(ctx(Error::invalid(
                "offset + length overflows a file offset",
            )));
        }
        if (buf_offset as u64)
            .checked_add(len)
            .is_none_or(|end| end > buf.len() as u64)
        {
            return Err(ctx(Error::invalid(format!(
                "buffer range {buf_offset}+{len} exceeds the buffer's {} bytes",
                buf.len()
            ))));
        }
        Ok(())
    }

    pub(super) fn check_writable(file: &File, offset: u64, len: u64) -> Result<()> {
        if file.is_writable() {
            return Ok(());
        }
        Err(
            Error::new(ErrorKind::PermissionDenied, "file was opened read-only")
                .with_op(Op::Write)
                .with_path(file.path())
                .with_range(offset, len),
        )
    }

    /// Reads exactly `buf.len()` bytes at `offset` into `buf`. Reaching end of file first fails the
    /// command with [`ErrorKind::UnexpectedEof`].
    pub fn load(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
    ) -> Result<CommandId> {
        let buf = buf.into();
        let len = buf.len() as u64;
        self.load_range(file, offset, buf, 0, len, true)
    }

    /// Reads up to `buf.len()` bytes at `offset`; stopping at end of file is not an error, and
    /// [`Finished::bytes`] says how many arrived.
    pub fn load_upto(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
    ) -> Result<CommandId> {
        let buf = buf.into();
        let len = buf.len() as u64;
        self.load_range(file, offset, buf, 0, len, false)
    }

    /// Reads `len` bytes at file `offset` into `buf[buf_offset..]`; `exact` as in [`load`](Self::load).
    pub fn load_range(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
        buf_offset: usize,
        len: u64,
        exact: bool,
    ) -> Result<CommandId> {
        let buf = buf.into();
        Self::check_range(file, Op::Read, offset, len, &buf, buf_offset)?;
        self.push(Recorded {
            kind: CmdKind::Load { exact },
            file: file.clone(),
            offset,
            buf: Some(buf),
            in_shared: false,
            buf_offset,
            len,
        })
    }

    /// Writes all of `buf` to the file at `offset` (extending the file as needed).
    pub fn store(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
    ) -> Result<CommandId> {
        let buf = buf.into();
        let len = buf.len() as u64;
        self.store_range(file, offset, buf, 0, len)
    }

    /// Writes `buf[buf_offset..buf_offset+len]` to the file at `offset`.
    pub fn store_range(
        &mut self,
        file: &File,
        offset: u64,
        buf: impl Into<IoBuffer>,
        buf_offset: usize,
        len: u64,
    ) -> Result<CommandId> {
        let buf = buf.into();
        Self::check_writable(file, offset, len)?;
        Self::check_range(file, Op::Write, offset, len, &buf, buf_offset)?;
        self.push(Recorded {
            kind: CmdKind::Store,
            file: file.clone(),
            offset,
            buf: Some(buf),
            in_shared: false,
            buf_offset,
            len,
        })
    }

    /// Gives the command buffer one buffer for a batch of small transfers: [`load_into`] and
    /// [`store_from`] commands then address byte ranges of it, so N requests need one buffer (a
    /// registered pool buffer keeps every transfer on io_uring's fixed-buffer path), one commit and
    /// one completion, which reports each command's bytes or error ([`Finished::bytes`],
    /// [`Status::Error`]) and hands the buffer back ([`Finished::take_shared_buffer`]).
    ///
    /// Ranges that loads write must not overlap any other command's range in the buffer (checked at
    /// commit: [`ErrorKind::InvalidInput`]). Fails if the command buffer already has one.
    ///
    /// [`load_into`]: Self::load_into
    /// [`store_from`]: Self::store_from
    ///
    /// ```
    /// use gpuio::{AlignedBuf, CommandBuffer, Engine, EngineConfig, File, QueueDesc};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let path = dir.path().join("table.bin");
    /// # std::fs::write(&path, (0..1u32 << 16).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    /// let engine = Engine::new(EngineConfig::default())?;
    /// let queue = engine.queue(QueueDesc::default())?;
    /// let table = File::open(&path)?;
    /// let rows = [7u64, 1000, 3, 12345]; // 16-byte rows to gather
    /// let mut cb = queue.command_buffer();
    /// cb.set_buffer(AlignedBuf::new(rows.len() * 16, 4096)?)?;
    /// let ids: Vec<_> = rows
    ///     .iter()
    ///     .enumerate()
    ///     .map(|(i, &r)| cb.load_into(&table, r * 16, i * 16, 16))
    ///     .collect::<Result<_, _>>()?;
    /// let mut done = cb.commit()?.finish()?;
    /// assert!(ids.iter().all(|&id| done.bytes(id) == 16));
    /// let buf = done.take_shared_buffer().unwrap();
    /// assert_eq!(&buf[16..20], &(1000u32 * 4).to_le_bytes());
    /// # Ok::<(), gpuio::Error>(())
    /// ```
    pub fn set_buffer(&mut self, buf: impl Into<IoBuffer>) -> Result<()> {
        if self.shared_buf.is_some() {
            return Err(Error::invalid(
                "this command buffer already has a shared buffer",
            ));
        }
        self.shared_buf = Some(buf.into());
        Ok(())
    }

    /// Records a command on `buf_offset..+len` of the shared buffer, after checking that range.
    fn push_shared(
        &mut self,
        kind: CmdKind,
        file: &File,
        offset: u64,
        buf_offset: usize,
        len: usize,
    ) -> Result<CommandId> {
        let op = if kind == CmdKind::Store {
            Op::Write
        } else {
            Op::Read
        };
        match &self.shared_buf {
            Some(buf) => Self::check_range(file, op, offset, len as u64, buf, buf_offset)?,
            None => {
                return Err(Error::invalid("no shared buffer: call set_buffer first")
                    .with_op(op)
                    .with_path(file.path())
                    .with_range(offset, len as u64))
            }
        }
        self.push(Recorded {
            kind,
            file: file.clone(),
            offset,
            buf: None,
            in_shared: true,
            buf_offset,
            len: len as u64,
        })
    }

    /// Reads exactly `len` bytes at file `offset` into the shared buffer at `buf_offset` (see
    /// [`set_buffer`](Self::set_buffer)). Reaching end of file first fails the command.
    pub fn load_into(
        &mut self,
        file: &File,
        offset: u64,
        buf_offset: usize,
        len: usize,
    ) -> Result<CommandId> {
        self.push_shared(CmdKind::Load { exact: true }, file, offset, buf_offset, len)
    }

    /// Writes `len` bytes of the shared buffer at `buf_offset` to the file at `offset` (see
    /// [`set_buffer`](Self::set_buffer)).
    pub fn store_from(
        &mut self,
        file: &File,
        offset: u64,
        buf_offset: usize,
        len: usize,
    ) -> Result<CommandId> {
        Self::check_writable(file, offset, len as u64)?;
        self.push_shared(CmdKind::Store, file, offset, buf_offset, len)
    }

    /// Ranges of the shared buffer that a load writes must not meet any other command's range.
    fn check_shared_overlaps(commands: &[Recorded]) -> Result<()> {
        if !commands.iter().any(|r| r.in_shared) {
            return Ok(());
        }
        let mut ranges: Vec<(usize, usize, usize)> = commands
            .iter()
            .enumerate()
            .filter(|(_, r)| r.in_shared && r.len > 0)
            .map(|(i, r)| (r.buf_offset, r.buf_offset + r.len as usize, i))
            .collect();
        ranges.sort_unstable();
        // Any two overlapping ranges include an adjacent pair (by start) that overlaps, unless both
        // are stores; track the furthest-reaching range so far to catch stores nested in loads.
        let mut reach: Option<(usize, usize)> = None; // (end, command)
        for &(start, end, i) in &ranges {
            if let Some((reach_end, j)) = reach {
                let writes = |k: usize| matches!(commands[k].kind, CmdKind::Load { .. });
                if start < reach_end && (writes(i) || writes(j)) {
                    return Err(Error::invalid(format!(
                        "commands {j} and {i} overlap in the shared buffer at byte {start}, and a load writes there"
                    )));
                }
            }
            if reach.is_none_or(|(e, _)| end > e) {
                reach = Some((end, i));
            }
        }
        Ok(())
    }

    /// Flushes the file's written data to stable storage (`fdatasync`). Put a [`barrier`](Self::barrier)
    /// before it to cover the stores recorded earlier.
    pub fn sync(&mut self, file: &File) -> Result<CommandId> {
        self.push(Recorded {
            kind: CmdKind::Sync,
            file: file.clone(),
            offset: 0,
            buf: None,
            in_shared: false,
            buf_offset: 0,
            len: 0,
        })
    }

    /// Commands recorded after a barrier start only when every command before it has finished. If one
    /// of those failed, the commands after the barrier are skipped (reported as cancelled).
    pub fn barrier(&mut self) {
        let at = self.commands.len();
        if self.barriers.last() != Some(&at) && at > 0 {
            self.barriers.push(at);
        }
    }

    /// Runs `f` with the final status when the command buffer finishes. It runs on the engine thread:
    /// keep it short (signal something, do not do I/O). Waiters are woken just before it runs, so
    /// `wait()` may return before the callback has finished. (A command buffer served on the
    /// committing thread — small transfers of memory-backed files, see
    /// [`EngineConfig::inline_max_bytes`](crate::EngineConfig::inline_max_bytes) — is complete when
    /// `commit` returns; its callback still runs on the engine thread, shortly after.)
    pub fn on_complete(&mut self, f: impl FnOnce(&Status) + Send + 'static) {
        self.callback = Some(Box::new(f));
        self.callback_any_thread = false;
    }

    /// Like [`on_complete`](Self::on_complete), but `f` may also run on the committing thread, inside
    /// `commit`, before it returns — when the command buffer is served there (small transfers of
    /// memory-backed files). That saves a hand-off to the engine thread per command buffer; use it
    /// only when `f` takes no lock the committer may hold and starts no work that commits again
    /// (which would then nest inside `commit`).
    pub fn on_complete_any_thread(&mut self, f: impl FnOnce(&Status) + Send + 'static) {
        self.callback = Some(Box::new(f));
        self.callback_any_thread = true;
    }

    /// Hands the commands to the engine. Waits while the queue already has its maximum of command
    /// buffers in flight.
    pub fn commit(self) -> Result<Completion> {
        self.commit_inner(true)
    }

    /// Like [`commit`](Self::commit), but fails with [`ErrorKind::WouldBlock`] instead of waiting.
    pub fn try_commit(self) -> Result<Completion> {
        self.commit_inner(false)
    }

    fn commit_inner(self, wait: bool) -> Result<Completion> {
        let CommandBuffer {
            queue,
            commands,
            shared_buf,
            barriers,
            callback,
            callback_any_thread,
        } = self;
        Self::check_shared_overlaps(&commands)?;
        let limits = *queue.engine.inline_limits();
        // A serial queue keeps its order: nothing of it may be in flight (the lock only then).
        let serial_busy =
            queue.shared.desc.kind == QueueKind::Serial && !queue.shared.slots.is_idle();
        if inline::eligible(&limits, serial_busy, &commands) {
            return Ok(Self::commit_inline(
                queue,
                commands,
                shared_buf,
                barriers,
                callback,
                callback_any_thread,
            ));
        }
        queue.shared.slots.acquire(wait)?;
        let n = commands.len();
        let shared = Arc::new(CbShared::pending(queue.engine.next_id(), callback));
        let msg = Msg::Commit {
            queue: queue.shared.clone(),
            cb: shared.clone(),
            commands,
            shared_buf,
            barriers,
        };
        if queue.engine.send(msg).is_err() {
            queue.shared.slots.release();
            return Err(Error::new(
                ErrorKind::EngineStopped,
                "the engine thread has stopped",
            ));
        }
        Ok(Completion::new(shared, queue, n))
    }

    /// Serves a command buffer with the inline path (see `queue::inline`): handed to an idle inline
    /// worker (`queue::workers`) when its queue is concurrent and has a slot free, else here, so that
    /// it is finished when this returns. A callback that must run on the engine thread is sent there
    /// after the work.
    fn commit_inline(
        queue: IoQueue,
        commands: Vec<Recorded>,
        shared_buf: Option<IoBuffer>,
        barriers: Vec<usize>,
        callback: Option<Callback>,
        callback_any_thread: bool,
    ) -> Completion {
        let n = commands.len();
        let (here, deferred) = match callback_any_thread {
            true => (callback, None),
            false => (None, callback),
        };
        let shared = Arc::new(CbShared::pending(queue.engine.next_id(), here));
        let mut job = InlineJob {
            queue: queue.clone(),
            shared: shared.clone(),
            commands,
            shared_buf,
            barriers,
            deferred,
            holds_slot: false,
        };
        // Only a thread with other command buffers of the queue outstanding gains from a hand-off:
        // one that commits and then waits would pay a worker's wake-up for nothing (a 4 KiB read's
        // latency tripled, measured from Python and at QD 1).
        if queue.shared.desc.kind == QueueKind::Concurrent
            && queue.shared.outstanding.load(Ordering::Relaxed) > 0
            && queue.engine.inline_worker_idle()
            && queue.shared.slots.try_acquire()
        {
            job.holds_slot = true;
            match queue.engine.hand_inline(job) {
                None => return Completion::new(shared, queue, n),
                Some(back) => {
                    job = back;
                    job.holds_slot = false;
                    queue.shared.slots.release();
                }
            }
        }
        job.run();
        Completion::new(shared, queue, n)
    }
}

/// A committed command buffer: wait for it, poll it, await it, or cancel it.
pub struct Completion {
    shared: Arc<CbShared>,
    queue: IoQueue,
    commands: usize,
}

impl Completion {
    fn new(shared: Arc<CbShared>, queue: IoQueue, commands: usize) -> Completion {
        queue.shared.outstanding.fetch_add(1, Ordering::Relaxed);
        Completion {
            shared,
            queue,
            commands,
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.queue
            .shared
            .outstanding
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion")
            .field("id", &self.shared.id)
            .field("status", &self.status())
            .finish()
    }
}

impl Completion {
    /// The current status, without waiting.
    pub fn status(&self) -> Status {
        self.shared.state.lock().status.clone()
    }

    /// Blocks until the command buffer finishes; returns its final status.
    pub fn wait(&self) -> Status {
        let mut st = self.shared.state.lock();
        while st.status.is_pending() {
            self.shared.done.wait(&mut st);
        }
        st.status.clone()
    }

    /// Like [`wait`](Self::wait) with a limit; `None` if still pending after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Status> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        while st.status.is_pending() {
            if self.shared.done.wait_until(&mut st, deadline).timed_out() && st.status.is_pending()
            {
                return None;
            }
        }
        Some(st.status.clone())
    }

    /// Asks the engine to stop this command buffer. Returns `true` if it had not finished: it will end
    /// [`Status::Cancelled`] once its in-flight transfers drain. Returns `false` if it already finished.
    pub fn try_cancel(&self) -> bool {
        {
            let mut st = self.shared.state.lock();
            if !st.status.is_pending() {
                return false;
            }
            st.cancel_requested = true;
        }
        // If the engine is gone the command buffer has finished already (the engine drains before exit).
        let _ = self.queue.engine.send(Msg::Cancel(self.shared.id));
        true
    }

    /// Waits, then returns the status and everything the commands produced (buffers come back whether
    /// or not the command buffer succeeded).
    pub fn wait_parts(self) -> (Status, Finished) {
        let status = self.wait();
        let (outputs, shared_buf) = {
            let mut st = self.shared.state.lock();
            (std::mem::take(&mut st.outputs), st.shared_buf.take())
        };
        (
            status,
            Finished {
                outputs,
                shared_buf,
            },
        )
    }

    /// Waits; returns the outputs if every command succeeded, else the first error (all of them are in
    /// [`wait_parts`](Self::wait_parts)).
    pub fn finish(self) -> Result<Finished> {
        let (status, finished) = self.wait_parts();
        match status.first_error() {
            None => Ok(finished),
            Some(e) => Err(e),
        }
    }

    /// Number of commands in the command buffer.
    pub fn len(&self) -> usize {
        self.commands
    }
    pub fn is_empty(&self) -> bool {
        self.commands == 0
    }
}

impl Future for Completion {
    type Output = Status;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Status> {
        let mut st = self.shared.state.lock();
        if st.status.is_pending() {
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(st.status.clone())
        }
    }
}

/// The results of a finished command buffer.
#[derive(Debug, Default)]
pub struct Finished {
    outputs: Vec<Output>,
    shared_buf: Option<IoBuffer>,
}

impl Finished {
    /// Bytes the command transferred (for `load_upto`, fewer than asked at end of file).
    pub fn bytes(&self, id: CommandId) -> u64 {
        self.outputs.get(id.index()).map_or(0, |o| o.bytes)
    }
    /// Takes the command's buffer back (once).
    pub fn take_buffer(&mut self, id: CommandId) -> Option<IoBuffer> {
        self.outputs.get_mut(id.index())?.buf.take()
    }
    /// Takes the shared buffer of a batch back (once); see [`CommandBuffer::set_buffer`].
    pub fn take_shared_buffer(&mut self) -> Option<IoBuffer> {
        self.shared_buf.take()
    }
    /// Takes every buffer back, in command order (`None` for syncs and buffers already taken).
    pub fn into_buffers(self) -> Vec<Option<IoBuffer>> {
        self.outputs.into_iter().map(|o| o.buf).collect()
    }
}
