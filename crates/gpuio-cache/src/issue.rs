//! Issuing loads: `IssueCtx` records a gather's misses in command buffers of `loads_per_cb` reads,
//! reads a run of adjacent missing lines of a file with one read into a bounce buffer (see
//! [`CacheConfig::coalesce_bytes`](crate::CacheConfig::coalesce_bytes)), and commits; `Batch` takes a
//! committed command buffer's completion apart, line by line. Pack entries load through their own
//! reader, and a cache thread waits for them.
//!
//! Every load recorded here is committed or failed, never forgotten, so that no line stays Busy;
//! a completion never runs I/O on the engine thread (it only copies bytes and hands lines over),
//! and waiting for a bounce buffer is bounded by [`BUSY_WAIT_MAX`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use gpuio::{
    AlignedBuf, CommandBuffer, CommandId, Completion, Error, ErrorKind, Result, Status, Wait,
};
use gpuio_pack::PackLoad;
use parking_lot::Mutex;

use crate::cache::{slot_buffer, Inner};
use crate::share::{fail_lines, finish_line};
use crate::source::{Backing, Source};
use crate::{PageCache, SourceId, BUSY_WAIT_MAX};

pub(crate) struct PackJob {
    inner: Arc<Inner>,
    slot: u32,
    load: PackLoad,
}

impl PageCache {
    fn pack_sender(&self) -> &crossbeam_channel::Sender<PackJob> {
        self.inner.pack_tx.get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<PackJob>();
            std::thread::Builder::new()
                .name("gpuio-cache-pack".into())
                .spawn(move || {
                    for job in rx {
                        let (r, buf) = job.load.wait_parts();
                        finish_line(&job.inner, job.slot, r, buf);
                    }
                })
                .expect("spawn the pack completion thread");
            tx
        })
    }
}

/// The result of one command of a finished command buffer.
pub(crate) fn command_result(status: &Status, id: CommandId) -> Result<()> {
    match status {
        Status::Complete | Status::Pending => Ok(()),
        Status::Cancelled => Err(Error::new(ErrorKind::Cancelled, "command buffer cancelled")),
        Status::Error(list) => match list.iter().find(|e| e.command == id) {
            Some(e) => Err(e.error.clone()),
            None => Ok(()),
        },
    }
}

/// Records loads and commits them in command buffers of `loads_per_cb` reads. Adjacent missing lines
/// of a file are collected into a run and read together (see [`CacheConfig::coalesce_bytes`]).
///
/// [`CacheConfig::coalesce_bytes`]: crate::CacheConfig::coalesce_bytes
pub(crate) struct IssueCtx<'a> {
    inner: &'a Arc<Inner>,
    pub(crate) source: &'a Arc<Source>,
    pub(crate) src: SourceId,
    cb: Option<CommandBuffer>,
    issued: Vec<Issued>,
    /// Adjacent lines waiting to be read together: (slot, line), lines ascending by one.
    run: Vec<(u32, u64)>,
}

/// A read recorded in the current command buffer.
enum Issued {
    /// One line read straight into its slot's buffer.
    Line(u32, CommandId),
    /// Adjacent lines read into one bounce buffer: their slots and lengths, in file order.
    Run(CommandId, Vec<(u32, u32)>),
}

impl Issued {
    fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        let (one, many) = match self {
            Issued::Line(i, _) => (Some(*i), &[][..]),
            Issued::Run(_, lines) => (None, &lines[..]),
        };
        one.into_iter().chain(many.iter().map(|&(i, _)| i))
    }
}

impl<'a> IssueCtx<'a> {
    pub(crate) fn new(
        inner: &'a Arc<Inner>,
        source: &'a Arc<Source>,
        src: SourceId,
    ) -> IssueCtx<'a> {
        IssueCtx {
            inner,
            source,
            src,
            cb: None,
            issued: Vec::new(),
            run: Vec::new(),
        }
    }

    /// Issues a load of `line` into slot `i` (Busy, ours, tag and page table set) — now, or with
    /// the next lines when they follow it.
    pub(crate) fn add_load(&mut self, i: u32, line: u64) -> Result<()> {
        if self.inner.run_lines_max <= 1 || !matches!(self.source.backing, Backing::File(_)) {
            return self.load_line(i, line);
        }
        if let Some(&(_, last)) = self.run.last() {
            if line == last + 1 && self.run.len() < self.inner.run_lines_max {
                self.run.push((i, line));
                return Ok(());
            }
            if let Err(e) = self.flush_run() {
                finish_line(self.inner, i, Err(e.clone()), None);
                return Err(e);
            }
        }
        self.run.push((i, line));
        Ok(())
    }

    /// Issues the run collected so far.
    fn flush_run(&mut self) -> Result<()> {
        let run = std::mem::take(&mut self.run);
        match run.len() {
            0 => Ok(()),
            1 => self.load_line(run[0].0, run[0].1),
            _ => self.load_run(run),
        }
    }

    /// Reads adjacent lines with one read into a bounce buffer; [`Batch::finish`] copies each line
    /// into its slot. With every bounce buffer in flight, the reads recorded so far are committed
    /// and this waits (at most [`BUSY_WAIT_MAX`]) for one to come back: back-pressure, like a gather
    /// that needs more lines than are free. (Reading the run line by line instead was measured: a
    /// BFS level then issued almost every run as single lines, and coalescing bought nothing.)
    fn load_run(&mut self, run: Vec<(u32, u64)>) -> Result<()> {
        let inner = self.inner;
        let Backing::File(file) = &self.source.backing else {
            unreachable!("only file lines are collected into runs")
        };
        let pool = inner
            .bounce
            .as_ref()
            .expect("runs are collected only with bounce buffers");
        let bounce = match pool.try_get() {
            Ok(b) => Ok(b),
            Err(_) => self
                .commit_issued()
                .and_then(|()| pool.get_timeout(BUSY_WAIT_MAX)),
        };
        let bounce = match bounce {
            Ok(b) => b,
            Err(e) => {
                // Lines not issued must not stay Busy.
                fail_lines(inner, run.iter().map(|r| r.0), &e);
                return Err(e);
            }
        };
        // The lines keep their own buffers (the bytes are copied in); a buffer lost with a refused
        // command buffer is replaced now.
        for &(i, _) in &run {
            if let Err(e) = slot_buffer(inner, &inner.slots[i as usize]) {
                fail_lines(inner, run.iter().map(|r| r.0), &e);
                return Err(e);
            }
        }
        let lines: Vec<(u32, u32)> = run
            .iter()
            .map(|&(i, line)| (i, self.source.line_len(line, inner.line_bytes) as u32))
            .collect();
        let total: u64 = lines.iter().map(|&(_, n)| n as u64).sum();
        let offset = run[0].1 * inner.line_bytes as u64;
        let c = &inner.counters;
        c.reads_issued.fetch_add(1, Ordering::Relaxed);
        c.lines_loaded
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        c.bytes_read.fetch_add(total, Ordering::Relaxed);
        let cb = self.cb.get_or_insert_with(|| inner.queue.command_buffer());
        match cb.load_range(file, offset, bounce, 0, total, true) {
            Ok(id) => self.issued.push(Issued::Run(id, lines)),
            Err(e) => fail_lines(inner, lines.iter().map(|l| l.0), &e),
        }
        self.commit_if_full()
    }

    /// Reads one line straight into its slot's buffer.
    fn load_line(&mut self, i: u32, line: u64) -> Result<()> {
        let inner = self.inner;
        let slot = &inner.slots[i as usize];
        let len = self.source.line_len(line, inner.line_bytes);
        let offset = line * inner.line_bytes as u64;
        let buf = {
            let mut b = slot.buf.lock();
            match b.take() {
                Some(b) => b,
                None => {
                    let mut nb = AlignedBuf::new_in(
                        &inner.engine.config().memory_budget,
                        inner.line_bytes,
                        inner.align,
                        Wait::No,
                    )
                    .inspect_err(|e| finish_line(inner, i, Err(e.clone()), None))?;
                    slot.ptr.store(nb.as_mut_ptr(), Ordering::Release);
                    nb
                }
            }
        };
        let c = &inner.counters;
        c.reads_issued.fetch_add(1, Ordering::Relaxed);
        c.lines_loaded.fetch_add(1, Ordering::Relaxed);
        c.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        match &self.source.backing {
            Backing::Entry(entry) => {
                match entry.load_range(&inner.queue, offset, buf, 0, len as u64) {
                    Ok(load) => {
                        let tx = PageCache {
                            inner: inner.clone(),
                        };
                        let job = PackJob {
                            inner: inner.clone(),
                            slot: i,
                            load,
                        };
                        if let Err(e) = tx.pack_sender().send(job) {
                            let job = e.into_inner();
                            let (r, b) = job.load.wait_parts();
                            finish_line(inner, i, r, b);
                        }
                    }
                    Err(e) => finish_line(inner, i, Err(e), None),
                }
                Ok(())
            }
            Backing::File(file) => {
                let cb = self.cb.get_or_insert_with(|| inner.queue.command_buffer());
                match cb.load_range(file, offset, buf, 0, len as u64, true) {
                    Ok(id) => self.issued.push(Issued::Line(i, id)),
                    Err(e) => finish_line(inner, i, Err(e), None),
                }
                self.commit_if_full()
            }
        }
    }

    fn commit_if_full(&mut self) -> Result<()> {
        if self.issued.len() >= self.inner.loads_per_cb {
            self.commit_issued()?;
        }
        Ok(())
    }

    /// Commits every load recorded so far, the pending run included.
    pub(crate) fn commit(&mut self) -> Result<()> {
        self.flush_run()?;
        self.commit_issued()
    }

    fn commit_issued(&mut self) -> Result<()> {
        let Some(mut cb) = self.cb.take() else {
            return Ok(());
        };
        let issued = std::mem::take(&mut self.issued);
        if issued.is_empty() {
            return Ok(());
        }
        let batch = Arc::new(Batch {
            inner: self.inner.clone(),
            issued,
            cell: Mutex::new(Cell2::Empty),
        });
        let b2 = batch.clone();
        // Inside `commit` (a command buffer served inline) the cell is still Empty, so this only
        // marks it Done and the code after `commit` finishes the batch: no lock held, nothing nested.
        cb.on_complete_any_thread(move |_| {
            let mut c = b2.cell.lock();
            match std::mem::replace(&mut *c, Cell2::Finished) {
                Cell2::Holding(comp) => {
                    drop(c);
                    b2.finish(comp);
                }
                _ => *c = Cell2::Done,
            }
        });
        match cb.commit() {
            Ok(comp) => {
                let mut c = batch.cell.lock();
                match *c {
                    Cell2::Done => {
                        *c = Cell2::Finished;
                        drop(c);
                        batch.finish(comp);
                    }
                    _ => *c = Cell2::Holding(comp),
                }
                Ok(())
            }
            Err(e) => {
                // The buffers went with the command buffer: the slots get new ones when next used.
                fail_lines(
                    &batch.inner,
                    batch.issued.iter().flat_map(Issued::slots),
                    &e,
                );
                Err(e)
            }
        }
    }
}

impl Drop for IssueCtx<'_> {
    fn drop(&mut self) {
        // Every recorded load must be committed or failed, or its line would stay Busy.
        // Errors here were already given to the lines' consumers by whoever failed.
        if !self.run.is_empty() || (self.cb.is_some() && !self.issued.is_empty()) {
            let _ = self.flush_run();
            let _ = self.commit_issued();
        }
    }
}

enum Cell2 {
    Empty,
    Holding(Completion),
    Done,
    Finished,
}

/// One committed command buffer of loads.
struct Batch {
    inner: Arc<Inner>,
    issued: Vec<Issued>,
    cell: Mutex<Cell2>,
}

impl Batch {
    fn finish(&self, comp: Completion) {
        let (status, mut fin) = comp.wait_parts();
        let inner = &*self.inner;
        for it in &self.issued {
            match it {
                Issued::Line(i, id) => {
                    let buf = fin.take_buffer(*id);
                    finish_line(inner, *i, command_result(&status, *id), buf);
                }
                Issued::Run(id, lines) => {
                    let r = command_result(&status, *id);
                    let bounce = fin.take_buffer(*id);
                    let r = match (r, &bounce) {
                        (Ok(()), None) => Err(Error::new(
                            ErrorKind::Io,
                            "a coalesced read's buffer did not come back from the engine",
                        )),
                        (r, _) => r,
                    };
                    let mut from = bounce.as_ref().map(|b| b.as_aligned().as_ptr());
                    for &(i, len) in lines {
                        if let (Ok(()), Some(p)) = (&r, from) {
                            let slot = &inner.slots[i as usize];
                            // SAFETY: the slot is Busy and ours, its buffer (line_bytes ≥ len) was
                            // made sure of before the read; the bounce buffer holds every line of
                            // the run back to back, `len` bytes of this one at `p`.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    p,
                                    slot.ptr.load(Ordering::Acquire),
                                    len as usize,
                                );
                                from = Some(p.add(len as usize));
                            }
                        }
                        finish_line(inner, i, r.clone(), None);
                    }
                    // The bounce buffer goes back to its pool when `bounce` drops here.
                }
            }
        }
    }
}
