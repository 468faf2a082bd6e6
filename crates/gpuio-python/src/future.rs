//! `gpuio.Future`: the result of an asynchronous call (`pread_async`, `pwrite_async`, `read_async`).
//!
//! A transfer of at most one piece (`file::PIECE_BYTES`) is committed to the engine from the calling
//! thread, so any number of them are in flight at once. Its completion callback (on the engine thread,
//! which must not do work) only hands the future to one "finisher" thread, which copies the bytes into
//! the held Python buffer if they did not go there straight (`file::straight`), releases the buffer,
//! marks the future done and runs its done-callbacks with the GIL. A read straight into the caller's
//! buffer lends the engine a clone of the `Arc` holding the export; the finisher holds the other and
//! drops it after the engine's, so the export is released on the finisher thread, never the engine's.
//! A larger transfer runs the blocking piece-by-piece path on a thread of its own.
//!
//! asyncio: `await future` registers a done-callback that wakes the event loop with
//! `loop.call_soon_threadsafe` (python/gpuio/_aio.py) — no polling, and the loop never blocks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use gpuio::{AlignedBuf, CommandId, Completion, Error, ErrorKind};
use parking_lot::{Condvar, Mutex};
use pyo3::exceptions::{PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;

use crate::buffer::{to_numpy, HeldBuffer, Memory};
use crate::file::{
    lend, pread_blocking, pwrite_blocking, read_owned, straight, CopyStats, ALIGN, PIECE_BYTES,
};
use crate::{to_py_err, IntoPy};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Future>()?;
    Ok(())
}

/// What an asynchronous call was asked to do.
pub(crate) enum Job {
    Pread {
        queue: gpuio::IoQueue,
        file: gpuio::File,
        offset: u64,
        held: Arc<HeldBuffer>,
        copies: Arc<CopyStats>,
    },
    Pwrite {
        queue: gpuio::IoQueue,
        file: gpuio::File,
        offset: u64,
        held: Arc<HeldBuffer>,
        copies: Arc<CopyStats>,
    },
    Read {
        queue: gpuio::IoQueue,
        file: gpuio::File,
        offset: u64,
        n: usize,
    },
}

/// How a future ended.
pub(crate) enum Outcome {
    Int(u64),
    /// An engine buffer and its valid bytes, turned into a numpy array on the first `result()`.
    Mem(Option<AlignedBuf>, usize),
    Obj(PyObject),
    Err(Error),
}

/// What the finisher does once a committed command buffer completes.
enum After {
    /// Copy the bytes read into the held buffer (unless `lent`: they went there straight); then
    /// release it.
    Pread { held: Arc<HeldBuffer>, lent: bool },
    /// Hand the engine buffer over as the result.
    Read,
    /// Nothing to copy.
    Pwrite,
}

struct Pending {
    completion: Completion,
    id: CommandId,
    after: After,
}

struct State {
    outcome: Option<Outcome>,
    callbacks: Vec<(PyObject, Py<Future>)>,
    cancel_requested: bool,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    done: Condvar,
    /// The committed command buffer of a one-piece transfer (taken by the finisher).
    pending: Mutex<Option<Pending>>,
    /// Checked between the pieces of a large transfer.
    cancel: AtomicBool,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State {
                outcome: None,
                callbacks: Vec::new(),
                cancel_requested: false,
            }),
            done: Condvar::new(),
            pending: Mutex::new(None),
            cancel: AtomicBool::new(false),
        })
    }

    /// Records the outcome, wakes waiters and runs the done-callbacks (with the GIL).
    fn finish(&self, outcome: Outcome) {
        let callbacks = {
            let mut st = self.state.lock();
            // A transfer whose `cancel()` returned True ends cancelled, even if its last piece made it.
            let outcome = if st.cancel_requested {
                Outcome::Err(cancelled_error())
            } else {
                outcome
            };
            st.outcome = Some(outcome);
            std::mem::take(&mut st.callbacks)
        };
        self.done.notify_all();
        if !callbacks.is_empty() {
            Python::with_gil(|py| {
                for (cb, fut) in callbacks {
                    if let Err(e) = cb.bind(py).call1((fut,)) {
                        e.write_unraisable(py, Some(cb.bind(py)));
                    }
                }
            });
        }
    }
}

fn cancelled_error() -> Error {
    Error::new(ErrorKind::Cancelled, "the operation was cancelled")
}

/// The one thread that finishes one-piece transfers (see the module docs).
fn finisher() -> &'static Sender<Arc<Shared>> {
    static TX: OnceLock<Sender<Arc<Shared>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = unbounded::<Arc<Shared>>();
        std::thread::Builder::new()
            .name("gpuio-py-finish".into())
            .spawn(move || {
                for shared in rx {
                    // The committing thread holds `pending` until it has stored the completion.
                    let Some(p) = shared.pending.lock().take() else {
                        continue;
                    };
                    let (status, mut done) = p.completion.wait_parts();
                    let outcome = match status.first_error() {
                        Some(e) => Outcome::Err(e),
                        None => {
                            let got = done.bytes(p.id);
                            let buf = match done.take_buffer(p.id) {
                                Some(gpuio::IoBuffer::Owned(b)) => Some(b),
                                Some(b) => b.into_owned().ok(),
                                None => None,
                            };
                            match p.after {
                                After::Pread { held, lent } => {
                                    match (&buf, lent) {
                                        (Some(b), false) => held.copy_in(&b[..got as usize]),
                                        _ => drop(buf), // the engine's clone of `held`, if lent
                                    }
                                    drop(held); // releases the export (takes the GIL)
                                    Outcome::Int(got)
                                }
                                After::Read => Outcome::Mem(buf, got as usize),
                                After::Pwrite => Outcome::Int(got),
                            }
                        }
                    };
                    shared.finish(outcome);
                }
            })
            .expect("spawn the gpuio finisher thread");
        tx
    })
}

/// The pending result of an asynchronous gpu-io call, in the style of `concurrent.futures.Future`:
/// `result(timeout=None)`, `done()`, `cancel()`, `cancelled()`, `exception()`,
/// `add_done_callback(fn)`; and awaitable from asyncio (`await fut`).
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct Future {
    shared: Arc<Shared>,
}

impl Future {
    pub(crate) fn start(py: Python<'_>, job: Job) -> PyResult<Future> {
        let shared = Shared::new();
        let size = match &job {
            Job::Pread { held, .. } | Job::Pwrite { held, .. } => held.len(),
            Job::Read { n, .. } => *n,
        };
        if size > PIECE_BYTES {
            let s = shared.clone();
            std::thread::Builder::new()
                .name("gpuio-py-io".into())
                .spawn(move || {
                    let flag = Some(&s.cancel);
                    let outcome = match job {
                        Job::Pread {
                            queue,
                            file,
                            offset,
                            held,
                            copies,
                        } => {
                            let r = pread_blocking(&queue, &file, offset, &held, flag, &copies);
                            drop(held);
                            r.map(Outcome::Int)
                        }
                        Job::Pwrite {
                            queue,
                            file,
                            offset,
                            held,
                            copies,
                        } => {
                            let r = pwrite_blocking(&queue, &file, offset, &held, flag, &copies);
                            drop(held);
                            r.map(Outcome::Int)
                        }
                        Job::Read {
                            queue,
                            file,
                            offset,
                            n,
                        } => read_owned(&queue, &file, offset, n)
                            .map(|(b, got)| Outcome::Mem(Some(b), got as usize)),
                    };
                    s.finish(outcome.unwrap_or_else(Outcome::Err));
                })
                .map_err(|e| PyValueError::new_err(format!("cannot start an I/O thread: {e}")))?;
            return Ok(Future { shared });
        }
        let s = shared.clone();
        py.allow_threads(move || -> gpuio::Result<()> {
            let tx = finisher().clone();
            let mut pending = s.pending.lock();
            let notify = s.clone();
            let (queue, file, offset) = match &job {
                Job::Pread {
                    queue,
                    file,
                    offset,
                    ..
                }
                | Job::Pwrite {
                    queue,
                    file,
                    offset,
                    ..
                }
                | Job::Read {
                    queue,
                    file,
                    offset,
                    ..
                } => (queue.clone(), file.clone(), *offset),
            };
            let mut cb = queue.command_buffer();
            let (id, after) = match job {
                Job::Pread { held, copies, .. } => {
                    let lent = straight(
                        &queue,
                        &file,
                        held.ptr() as usize,
                        offset,
                        held.len(),
                        false,
                    );
                    copies.count(false, lent, held.len());
                    let buf = if lent {
                        // SAFETY: the whole export `held` holds; nothing else lends or touches it
                        // until the finisher has waited for this command buffer.
                        unsafe { lend(held.ptr(), held.len(), Box::new(held.clone())) }?
                    } else {
                        AlignedBuf::new(held.len(), ALIGN)?
                    };
                    let id = cb.load_upto(&file, offset, buf)?;
                    (id, After::Pread { held, lent })
                }
                Job::Read { n, .. } => {
                    let id = cb.load_upto(&file, offset, AlignedBuf::new(n, ALIGN)?)?;
                    (id, After::Read)
                }
                Job::Pwrite { held, copies, .. } => {
                    // Copied even where it could be lent: the caller may change `buf` as soon as the
                    // call returns (the documented behaviour of a small `pwrite_async`).
                    copies.count(true, false, held.len());
                    let mut buf = AlignedBuf::new(held.len(), ALIGN)?;
                    buf.copy_from_slice(held.as_slice());
                    drop(held); // the bytes are taken; the export is released now
                    (cb.store(&file, offset, buf)?, After::Pwrite)
                }
            };
            cb.on_complete(move |_| {
                let _ = tx.send(notify);
            });
            let completion = cb.commit()?;
            *pending = Some(Pending {
                completion,
                id,
                after,
            });
            Ok(())
        })
        .py_err(py)?;
        Ok(Future { shared })
    }

    /// The result as a Python object (converted once), or the error raised.
    fn take_result(&self, py: Python<'_>) -> PyResult<PyObject> {
        let mut st = self.shared.state.lock();
        let outcome = st.outcome.as_mut().expect("called once done");
        match outcome {
            Outcome::Int(n) => Ok(n.into_pyobject(py)?.into_any().unbind()),
            Outcome::Obj(o) => Ok(o.clone_ref(py)),
            Outcome::Err(e) => Err(to_py_err(py, e)),
            Outcome::Mem(buf, n) => {
                let buf = match buf.take() {
                    Some(b) => b,
                    None => AlignedBuf::new(0, ALIGN).py_err(py)?,
                };
                let arr = to_numpy(py, Memory::from_aligned(buf, *n))?.unbind();
                *outcome = Outcome::Obj(arr.clone_ref(py));
                Ok(arr)
            }
        }
    }

    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let deadline = match timeout {
            Some(t) if t.is_nan() || t < 0.0 => {
                return Err(PyValueError::new_err(format!("timeout {t} must be >= 0")))
            }
            Some(t) => Some(Instant::now() + Duration::from_secs_f64(t.min(1e9))),
            None => None,
        };
        let finished = py.allow_threads(|| {
            let mut st = self.shared.state.lock();
            while st.outcome.is_none() {
                match deadline {
                    Some(d) => {
                        if self.shared.done.wait_until(&mut st, d).timed_out() {
                            return st.outcome.is_some();
                        }
                    }
                    None => self.shared.done.wait(&mut st),
                }
            }
            true
        });
        if finished {
            Ok(())
        } else {
            Err(PyTimeoutError::new_err(
                "the operation did not finish in time",
            ))
        }
    }
}

#[pymethods]
impl Future {
    /// Waits (without the GIL) for the operation and returns its result, or raises its error
    /// (`gpuio.CancelledError` if it was cancelled). `timeout` in seconds: `TimeoutError` if it is
    /// still running then.
    #[pyo3(signature = (timeout = None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        self.wait(py, timeout)?;
        self.take_result(py)
    }

    /// Waits like `result()`, and returns the exception the operation raised, or None.
    #[pyo3(signature = (timeout = None))]
    fn exception(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyObject>> {
        self.wait(py, timeout)?;
        match self.take_result(py) {
            Ok(_) => Ok(None),
            Err(e) => Ok(Some(e.into_value(py).into_any())),
        }
    }

    /// Whether the operation has finished (successfully, with an error, or cancelled).
    fn done(&self) -> bool {
        self.shared.state.lock().outcome.is_some()
    }

    /// Whether it is still in flight.
    fn running(&self) -> bool {
        !self.done()
    }

    /// Asks the engine to stop the operation. Returns True if it had not finished: it then ends
    /// cancelled (`result()` raises `gpuio.CancelledError`; a destination buffer's contents are
    /// unspecified). Returns False if it had already finished.
    fn cancel(&self) -> bool {
        {
            let st = self.shared.state.lock();
            if st.outcome.is_some() {
                return false;
            }
        }
        if let Some(p) = self.shared.pending.lock().as_ref() {
            // The engine ends a cancelled command buffer Cancelled once in-flight transfers drain.
            return p.completion.try_cancel();
        }
        let mut st = self.shared.state.lock();
        if st.outcome.is_some() {
            return false;
        }
        st.cancel_requested = true;
        self.shared.cancel.store(true, Ordering::Release);
        true
    }

    /// Whether the operation ended cancelled.
    fn cancelled(&self) -> bool {
        matches!(
            &self.shared.state.lock().outcome,
            Some(Outcome::Err(e)) if e.kind() == ErrorKind::Cancelled
        )
    }

    /// Calls `fn(future)` once the operation has finished: at once (on this thread) if it has, else
    /// on gpu-io's finishing thread, with the GIL. Exceptions it raises are reported as unraisable.
    fn add_done_callback(slf: Py<Self>, py: Python<'_>, r#fn: PyObject) -> PyResult<()> {
        {
            let mut st = slf.get().shared.state.lock();
            if st.outcome.is_none() {
                st.callbacks.push((r#fn, slf.clone_ref(py)));
                return Ok(());
            }
        }
        r#fn.bind(py).call1((slf,))?;
        Ok(())
    }

    fn __await__(slf: Py<Self>, py: Python<'_>) -> PyResult<PyObject> {
        static AWAIT: GILOnceCell<PyObject> = GILOnceCell::new();
        let f = AWAIT.get_or_try_init(py, || -> PyResult<PyObject> {
            Ok(py.import("gpuio._aio")?.getattr("await_future")?.unbind())
        })?;
        let coro = f.bind(py).call1((slf,))?;
        Ok(coro.call_method0("__await__")?.unbind())
    }

    fn __repr__(&self) -> String {
        let st = self.shared.state.lock();
        let state = match &st.outcome {
            None => "running",
            Some(Outcome::Err(e)) if e.kind() == ErrorKind::Cancelled => "cancelled",
            Some(Outcome::Err(_)) => "error",
            Some(_) => "finished",
        };
        format!("<gpuio.Future {state}>")
    }
}
