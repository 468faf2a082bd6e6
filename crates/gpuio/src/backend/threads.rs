//! The portable engine: a pool of worker threads, each issuing blocking `pread`/`pwrite`/`fdatasync`.
//!
//! It works on every kernel and filesystem and is the fallback when io_uring is refused. Its cost is a
//! context switch per request, so at 4 KiB it needs more CPU than io_uring for the same IOPS. The worker
//! machinery is shared with the [`mmap`](super::mmap) engine through [`Executor`].

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::{Backend, BackendConfig, BackendKind, IoDone, IoKind, IoRequest, Waker, WAKE_TAG};
use crate::error::{Error, ErrorKind, Result};

/// Most worker threads a pool starts; deeper queues wait in the job channel.
pub const WORKERS_MAX: usize = 256;

/// What a worker does with one request: returns bytes transferred or `-errno`.
pub(crate) trait Executor: Send + Sync + 'static {
    fn execute(&self, req: &IoRequest) -> i64;
}

/// `pread`/`pwrite`/`fdatasync` on the request's descriptor, once.
#[derive(Debug, Default)]
pub(crate) struct SyscallExecutor;

fn errno() -> i64 {
    -(std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO) as i64)
}

impl Executor for SyscallExecutor {
    fn execute(&self, req: &IoRequest) -> i64 {
        let fd = req.fd();
        // SAFETY: the Backend::push contract keeps ptr..ptr+len valid and exclusive until completion.
        let rc = unsafe {
            match req.kind {
                IoKind::Read(s) => {
                    libc::pread(fd, s.ptr.cast(), s.len, req.offset as libc::off_t) as i64
                }
                IoKind::Write(s) => libc::pwrite(
                    fd,
                    s.ptr.cast_const().cast(),
                    s.len,
                    req.offset as libc::off_t,
                ) as i64,
                IoKind::Sync => libc::fdatasync(fd) as i64,
            }
        };
        if rc < 0 {
            errno()
        } else {
            rc
        }
    }
}

/// A fixed pool of worker threads fed through a bounded channel: the engine behind both the `threads`
/// and the `mmap` backends, which differ only in what a worker does with a request.
pub struct WorkerPool {
    kind: BackendKind,
    /// What the constructor wants `notes()` to add.
    notes: Vec<String>,
    depth: usize,
    in_flight: usize,
    jobs: Option<Sender<IoRequest>>,
    done: Receiver<IoDone>,
    /// Sends wake-ups into the completion channel.
    wake: Sender<IoDone>,
    workers: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    pub(crate) fn new(
        kind: BackendKind,
        depth: usize,
        exec: Arc<dyn Executor>,
        notes: Vec<String>,
    ) -> Result<WorkerPool> {
        WorkerPool::with_workers(kind, depth, depth, exec, notes, None)
    }

    /// A pool of `workers` threads (at most [`WORKERS_MAX`]) for up to `depth` requests in flight;
    /// after each completion a worker calls `on_done`, if given (to end another engine's wait).
    pub(crate) fn with_workers(
        kind: BackendKind,
        depth: usize,
        workers: usize,
        exec: Arc<dyn Executor>,
        notes: Vec<String>,
        on_done: Option<Waker>,
    ) -> Result<WorkerPool> {
        let (job_tx, job_rx) = bounded::<IoRequest>(depth);
        // Room for every in-flight completion plus one pending wake-up.
        let (done_tx, done_rx) = bounded::<IoDone>(depth + 1);
        let n = workers.clamp(1, WORKERS_MAX);
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            let exec = exec.clone();
            let on_done = on_done.clone();
            let handle = std::thread::Builder::new()
                .name(format!("gpuio-{}-{i}", kind.name()))
                .spawn(move || {
                    while let Ok(req) = rx.recv() {
                        let result = exec.execute(&req);
                        if tx
                            .send(IoDone {
                                tag: req.tag,
                                result,
                            })
                            .is_err()
                        {
                            break;
                        }
                        if let Some(w) = &on_done {
                            w();
                        }
                    }
                })
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!("cannot start worker thread: {e}"),
                    )
                })?;
            workers.push(handle);
        }
        Ok(WorkerPool {
            kind,
            notes,
            depth,
            in_flight: 0,
            jobs: Some(job_tx),
            done: done_rx,
            wake: done_tx,
            workers,
        })
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WorkerPool({}, {} workers)",
            self.kind,
            self.workers.len()
        )
    }
}

impl Backend for WorkerPool {
    fn kind(&self) -> BackendKind {
        self.kind
    }
    fn queue_depth(&self) -> usize {
        self.depth
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    unsafe fn push(&mut self, req: IoRequest) -> std::result::Result<(), IoRequest> {
        if self.in_flight >= self.depth {
            return Err(req);
        }
        let jobs = self.jobs.as_ref().expect("job channel open until drop");
        // The channel holds `depth` jobs and at most `depth` are in flight, so this never blocks.
        match jobs.try_send(req) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => Err(e.into_inner()),
        }
    }
    fn submit_and_reap(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<IoDone>,
    ) -> Result<()> {
        let want = min_complete.min(self.in_flight);
        let mut got = 0;
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while got < want {
            let r = match deadline {
                Some(d) => self.done.recv_deadline(d),
                None => self.done.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match r {
                Ok(d) if d.tag == WAKE_TAG => break,
                Ok(d) => {
                    out.push(d);
                    got += 1;
                    self.in_flight -= 1;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(ErrorKind::EngineStopped, "worker threads ended"))
                }
            }
        }
        while let Ok(d) = self.done.try_recv() {
            if d.tag != WAKE_TAG {
                out.push(d);
                self.in_flight -= 1;
            }
        }
        Ok(())
    }
    fn waker(&self) -> Option<Waker> {
        let tx = self.wake.clone();
        // A full channel holds completions, which end the wait anyway.
        Some(std::sync::Arc::new(move || {
            let _ = tx.try_send(IoDone {
                tag: WAKE_TAG,
                result: 0,
            });
        }))
    }
    fn notes(&self) -> Vec<String> {
        let mut n = vec![format!(
            "{} worker threads for queue depth {}",
            self.workers.len(),
            self.depth
        )];
        n.extend(self.notes.iter().cloned());
        n
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        // Closing the job channel ends each worker after its current request; joining guarantees no
        // worker touches request memory after the pool is gone.
        self.jobs = None;
        // Drain completions meanwhile, so no worker blocks on a full completion channel. (Wakers may
        // outlive the pool and keep the channel open, so the drainer stops on a flag, not on close.)
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = self.done.clone();
        let stop2 = stop.clone();
        let drainer = std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::Acquire) {
                let _ = done.recv_timeout(Duration::from_millis(5));
            }
        });
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = drainer.join();
    }
}

/// The pread/pwrite thread-pool engine.
pub fn new(config: &BackendConfig) -> Result<WorkerPool> {
    config.validate()?;
    WorkerPool::new(
        BackendKind::Threads,
        config.queue_depth,
        Arc::new(SyscallExecutor),
        Vec::new(),
    )
}
