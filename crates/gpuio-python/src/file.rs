//! `gpuio.open` → [`File`], `gpuio.Queue`, and the blocking read/write paths the async calls share.
//!
//! The engine reads into and writes from its own aligned buffers (`gpuio::AlignedBuf`), never into
//! caller memory, so `pread(buf, ...)` reads into engine buffers and copies into the held Python
//! buffer as each piece completes. Large transfers go in pieces of [`PIECE_BYTES`] with up to
//! [`PIECES_IN_FLIGHT`] in flight, so memory stays bounded whatever the size. (Reading straight into
//! caller memory would need the engine to accept borrowed memory kept alive by an owner — a library
//! change; see `python/README.md`.)

use std::collections::VecDeque;
use std::path::PathBuf;

use gpuio::{
    AlignedBuf, CommandId, Completion, DirectMode, Error, ErrorKind, IoBuffer, OpenOptions,
};
use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::buffer::{to_numpy, HeldBuffer, Memory};
use crate::future::{Future, Job};
use crate::{default_queue, engine, to_py_err, IntoPy};

/// Bytes per engine command of a large transfer.
pub(crate) const PIECE_BYTES: usize = 8 << 20;
/// Pieces of one large transfer in flight at once.
pub(crate) const PIECES_IN_FLIGHT: usize = 4;
/// Alignment of the engine buffers used here (direct I/O's block size on every filesystem seen).
pub(crate) const ALIGN: usize = 4096;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<File>()?;
    m.add_class::<Queue>()?;
    m.add_function(wrap_pyfunction!(open, m)?)?;
    Ok(())
}

pub(crate) fn parse_direct(direct: &str) -> PyResult<DirectMode> {
    match direct {
        "auto" => Ok(DirectMode::Auto),
        "on" => Ok(DirectMode::On),
        "off" => Ok(DirectMode::Off),
        _ => Err(PyValueError::new_err(format!(
            "direct={direct:?} is not one of 'auto', 'on', 'off'"
        ))),
    }
}

/// A queue of I/O commands on the shared engine, with its priority and ordering.
///
/// `priority`: "high", "normal" or "low" — all queues share the engine's queue depth, and free slots go
/// to higher-priority queues first. `kind`: "concurrent" (commands may complete in any order) or
/// "serial" (each command starts after the previous one finished). Pass it as `queue=` to any I/O
/// call; calls without one use a shared concurrent, normal-priority queue.
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct Queue {
    pub(crate) queue: gpuio::IoQueue,
    priority: String,
    kind: String,
}

#[pymethods]
impl Queue {
    #[new]
    #[pyo3(signature = (priority = "normal", kind = "concurrent"))]
    fn new(py: Python<'_>, priority: &str, kind: &str) -> PyResult<Queue> {
        let p = match priority {
            "high" => gpuio::Priority::High,
            "normal" => gpuio::Priority::Normal,
            "low" => gpuio::Priority::Low,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "priority={priority:?} is not one of 'high', 'normal', 'low'"
                )))
            }
        };
        let desc = match kind {
            "concurrent" => gpuio::QueueDesc::default(),
            "serial" => gpuio::QueueDesc::serial(),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "kind={kind:?} is not one of 'concurrent', 'serial'"
                )))
            }
        }
        .with_priority(p);
        let queue = engine().and_then(|e| e.queue(desc)).py_err(py)?;
        Ok(Queue {
            queue,
            priority: priority.to_string(),
            kind: kind.to_string(),
        })
    }

    /// "high", "normal" or "low".
    #[getter]
    fn priority(&self) -> &str {
        &self.priority
    }

    /// "concurrent" or "serial".
    #[getter]
    fn kind(&self) -> &str {
        &self.kind
    }

    /// Counters of this queue: backend operations, bytes read and written, retries, short transfers,
    /// bytes through bounce buffers, direct-I/O fallbacks.
    fn stats(&self) -> std::collections::HashMap<&'static str, u64> {
        let s = self.queue.stats();
        let mut m = std::collections::HashMap::new();
        m.insert("ops", s.ops);
        m.insert("retries", s.retries);
        m.insert("short_transfers", s.short_transfers);
        m.insert("bounce_bytes", s.bounce_bytes);
        m.insert("bytes_read", s.bytes_read);
        m.insert("bytes_written", s.bytes_written);
        m.insert("direct_fallbacks", s.direct_fallbacks);
        m
    }

    fn __repr__(&self) -> String {
        format!(
            "gpuio.Queue(priority={:?}, kind={:?})",
            self.priority, self.kind
        )
    }
}

pub(crate) fn queue_of(py: Python<'_>, q: Option<&Bound<'_, Queue>>) -> PyResult<gpuio::IoQueue> {
    match q {
        Some(q) => Ok(q.get().queue.clone()),
        None => default_queue().py_err(py),
    }
}

/// Opens a file for gpu-io.
///
/// `mode`: "r" (read), "r+" (read and write an existing file) or "w" (read and write; created if
/// missing, truncated). `direct`: "auto" (O_DIRECT where the filesystem allows it and the file is not
/// already in the page cache; `direct_reason` says why not), "on" (O_DIRECT or an error) or "off".
#[pyfunction]
#[pyo3(signature = (path, mode = "r", direct = "auto"))]
fn open(py: Python<'_>, path: PathBuf, mode: &str, direct: &str) -> PyResult<File> {
    File::new(py, path, mode, direct)
}

/// A file opened by `gpuio.open`: positional reads and writes through the engine, blocking or
/// asynchronous, and batches. A context manager; `close()` is idempotent, and I/O already in flight
/// keeps the file open until it completes.
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct File {
    file: Mutex<Option<gpuio::File>>,
    path: PathBuf,
    mode: String,
}

impl File {
    fn new(py: Python<'_>, path: PathBuf, mode: &str, direct: &str) -> PyResult<File> {
        let direct = parse_direct(direct)?;
        let opts = match mode {
            "r" | "rb" => OpenOptions::read(),
            "r+" | "r+b" | "rb+" => OpenOptions::read_write(),
            "w" | "wb" | "w+" | "w+b" | "wb+" => OpenOptions::create().truncate(true),
            _ => {
                return Err(PyValueError::new_err(format!(
                    "mode={mode:?} is not one of 'r', 'r+', 'w'"
                )))
            }
        }
        .direct(direct);
        let p = path.clone();
        let file = py.allow_threads(move || opts.open(&p)).py_err(py)?;
        Ok(File {
            file: Mutex::new(Some(file)),
            path,
            mode: mode.to_string(),
        })
    }

    pub(crate) fn handle(&self) -> PyResult<gpuio::File> {
        self.file
            .lock()
            .clone()
            .ok_or_else(|| PyValueError::new_err("I/O operation on closed file"))
    }
}

fn check_offset(offset: i64) -> PyResult<u64> {
    u64::try_from(offset).map_err(|_| PyValueError::new_err(format!("negative offset {offset}")))
}

#[pymethods]
impl File {
    /// Reads up to `len(buf)` bytes at `offset` into `buf` (any writable, C-contiguous object with
    /// the buffer protocol: bytearray, memoryview, numpy array, mmap, ...). Returns the number of
    /// bytes read: fewer than `len(buf)` only at end of file. The GIL is released while waiting.
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pread(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<u64> {
        let offset = check_offset(offset)?;
        let held = HeldBuffer::get(buf, true)?;
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        let r = py.allow_threads(|| pread_blocking(&q, &f, offset, &held, None));
        drop(held);
        r.py_err(py)
    }

    /// Writes all of `buf` (any C-contiguous buffer-protocol object) at `offset`, extending the file
    /// as needed. Returns `len(buf)` in bytes. The file must be open for writing ("r+" or "w").
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pwrite(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<u64> {
        let offset = check_offset(offset)?;
        let held = HeldBuffer::get(buf, false)?;
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        let r = py.allow_threads(|| pwrite_blocking(&q, &f, offset, held.as_slice(), None));
        drop(held);
        r.py_err(py)
    }

    /// Reads up to `n` bytes at `offset` into a new numpy uint8 array (shorter at end of file). The
    /// array's memory is the engine's read buffer itself: no copy.
    #[pyo3(signature = (offset, n, *, queue = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: i64,
        n: usize,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let offset = check_offset(offset)?;
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        let (buf, got) = py
            .allow_threads(|| read_owned(&q, &f, offset, n))
            .py_err(py)?;
        to_numpy(py, Memory::from_aligned(buf, got as usize))
    }

    /// Like `pread`, without waiting: returns a `gpuio.Future` whose `result()` is the number of bytes
    /// read. `buf` is held (kept alive, its memory pinned) until the read completes, even if the
    /// caller drops every reference to it.
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pread_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<Future> {
        let offset = check_offset(offset)?;
        let held = HeldBuffer::get(buf, true)?;
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        Future::start(
            py,
            Job::Pread {
                queue: q,
                file: f,
                offset,
                held,
            },
        )
    }

    /// Like `pwrite`, without waiting: a `gpuio.Future` whose `result()` is the number of bytes
    /// written. `buf` is held until the write completes.
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pwrite_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<Future> {
        let offset = check_offset(offset)?;
        let held = HeldBuffer::get(buf, false)?;
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        Future::start(
            py,
            Job::Pwrite {
                queue: q,
                file: f,
                offset,
                held,
            },
        )
    }

    /// Like `read`, without waiting: a `gpuio.Future` whose `result()` is the numpy array.
    #[pyo3(signature = (offset, n, *, queue = None))]
    fn read_async(
        &self,
        py: Python<'_>,
        offset: i64,
        n: usize,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<Future> {
        let offset = check_offset(offset)?;
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        Future::start(
            py,
            Job::Read {
                queue: q,
                file: f,
                offset,
                n,
            },
        )
    }

    /// Many reads in one engine commit: `items` is a sequence of `(buf, offset)` pairs. Returns a list
    /// with, for each item, the bytes read (fewer than `len(buf)` only at end of file) — or, with
    /// `errors="return"`, the exception for an item that failed (default `errors="raise"` raises the
    /// first failure after every item has finished).
    #[pyo3(signature = (items, *, queue = None, errors = "raise"))]
    fn pread_batch<'py>(
        &self,
        py: Python<'py>,
        items: &Bound<'py, PyAny>,
        queue: Option<&Bound<'_, Queue>>,
        errors: &str,
    ) -> PyResult<Bound<'py, PyList>> {
        let raise = match errors {
            "raise" => true,
            "return" => false,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "errors={errors:?} is not one of 'raise', 'return'"
                )))
            }
        };
        let mut held = Vec::new();
        for item in items.try_iter()? {
            let (buf, offset): (Bound<'py, PyAny>, i64) = item?.extract()?;
            held.push((HeldBuffer::get(&buf, true)?, check_offset(offset)?));
        }
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        let results = py.allow_threads(|| batch_blocking(&q, &f, &held));
        drop(held);
        let results = results.py_err(py)?;
        let out = PyList::empty(py);
        let mut first_err = None;
        for r in results {
            match r {
                Ok(n) => out.append(n)?,
                Err(e) => {
                    let pe = to_py_err(py, &e);
                    if raise && first_err.is_none() {
                        first_err = Some(pe.clone_ref(py));
                    }
                    out.append(pe.into_value(py))?;
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Flushes written data to stable storage (fdatasync through the engine).
    #[pyo3(signature = (*, queue = None))]
    fn sync(&self, py: Python<'_>, queue: Option<&Bound<'_, Queue>>) -> PyResult<()> {
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        py.allow_threads(|| {
            let mut cb = q.command_buffer();
            cb.sync(&f)?;
            cb.commit()?.finish().map(drop)
        })
        .py_err(py)
    }

    /// Size of the file in bytes (now).
    #[getter]
    fn size(&self, py: Python<'_>) -> PyResult<u64> {
        self.handle()?.len().py_err(py)
    }

    /// The path it was opened with.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The mode it was opened with.
    #[getter]
    fn mode(&self) -> &str {
        &self.mode
    }

    /// Whether reads and writes bypass the page cache (O_DIRECT).
    #[getter]
    fn is_direct(&self) -> PyResult<bool> {
        Ok(self.handle()?.is_direct())
    }

    /// Why the file is or is not opened direct (a sentence).
    #[getter]
    fn direct_reason(&self) -> PyResult<String> {
        Ok(self.handle()?.direct_reason().to_string())
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.file.lock().is_none()
    }

    /// Closes the file (idempotent). I/O still in flight completes first: it holds its own reference.
    fn close(&self) {
        self.file.lock().take();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close();
        false
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { "closed " } else { "" };
        format!("<{state}gpuio.File {:?} mode={:?}>", self.path, self.mode)
    }
}

/// A fresh engine buffer of `len` bytes (at least one block).
fn engine_buf(len: usize) -> gpuio::Result<AlignedBuf> {
    AlignedBuf::new(len, ALIGN)
}

fn owned(b: Option<IoBuffer>) -> Option<AlignedBuf> {
    match b {
        Some(IoBuffer::Owned(b)) => Some(b),
        Some(other) => other.into_owned().ok(),
        None => None,
    }
}

/// Reads up to `n` bytes at `offset` into one engine buffer; returns it and the bytes read.
pub(crate) fn read_owned(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    offset: u64,
    n: usize,
) -> gpuio::Result<(AlignedBuf, u64)> {
    let mut cb = q.command_buffer();
    let id = cb.load_upto(f, offset, engine_buf(n)?)?;
    let mut done = cb.commit()?.finish()?;
    let got = done.bytes(id);
    let buf = owned(done.take_buffer(id)).ok_or_else(|| Error::invalid("read buffer lost"))?;
    Ok((buf, got))
}

/// Checks a cancellation flag between pieces.
pub(crate) type CancelFlag<'a> = Option<&'a std::sync::atomic::AtomicBool>;

fn cancelled(flag: CancelFlag<'_>) -> bool {
    flag.is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire))
}

fn cancel_error() -> Error {
    Error::new(ErrorKind::Cancelled, "cancelled")
}

/// Reads up to `dst.len()` bytes at `offset` into `dst`, in pieces with several in flight. Returns
/// the bytes read (fewer only at end of file).
pub(crate) fn pread_blocking(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    offset: u64,
    dst: &HeldBuffer,
    cancel: CancelFlag<'_>,
) -> gpuio::Result<u64> {
    let len = dst.len();
    let mut inflight: VecDeque<(Completion, CommandId, usize, usize)> = VecDeque::new();
    let mut spare: Vec<AlignedBuf> = Vec::new();
    let mut next = 0usize;
    let mut total = 0u64;
    let mut result: gpuio::Result<()> = Ok(());
    loop {
        while result.is_ok() && inflight.len() < PIECES_IN_FLIGHT && next < len {
            if cancelled(cancel) {
                result = Err(cancel_error());
                break;
            }
            let n = PIECE_BYTES.min(len - next);
            let buf = match spare.pop() {
                Some(mut b) => b.set_len(n).map(|_| b),
                None => engine_buf(n),
            };
            let started = buf.and_then(|buf| {
                let mut cb = q.command_buffer();
                let id = cb.load_upto(f, offset + next as u64, buf)?;
                Ok((cb.commit()?, id))
            });
            match started {
                Ok((c, id)) => inflight.push_back((c, id, next, n)),
                Err(e) => result = Err(e),
            }
            next += n;
        }
        let Some((c, id, at, n)) = inflight.pop_front() else {
            break;
        };
        let (status, mut done) = c.wait_parts();
        if result.is_err() {
            continue; // draining after an error or end of file
        }
        if let Some(e) = status.first_error() {
            result = Err(e);
            continue;
        }
        let got = done.bytes(id) as usize;
        if let Some(buf) = owned(done.take_buffer(id)) {
            dst_copy(dst, at, &buf[..got]);
            spare.push(buf);
        }
        total += got as u64;
        if got < n {
            // End of file: stop issuing; pieces already in flight read nothing more.
            next = len;
            result = Err(Error::new(ErrorKind::UnexpectedEof, "eof"));
        }
    }
    match result {
        Ok(()) => Ok(total),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && e.message() == "eof" => Ok(total),
        Err(e) => Err(e),
    }
}

fn dst_copy(dst: &HeldBuffer, at: usize, src: &[u8]) {
    if src.is_empty() {
        return;
    }
    assert!(at + src.len() <= dst.len());
    // SAFETY: the range lies inside the held, writable export.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr().add(at), src.len()) }
}

/// Writes `src` at `offset` in pieces with several in flight. Returns `src.len()`.
pub(crate) fn pwrite_blocking(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    offset: u64,
    src: &[u8],
    cancel: CancelFlag<'_>,
) -> gpuio::Result<u64> {
    let mut inflight: VecDeque<Completion> = VecDeque::new();
    let mut next = 0usize;
    let mut result: gpuio::Result<()> = Ok(());
    loop {
        while result.is_ok() && inflight.len() < PIECES_IN_FLIGHT && next < src.len() {
            if cancelled(cancel) {
                result = Err(cancel_error());
                break;
            }
            let n = PIECE_BYTES.min(src.len() - next);
            let started = engine_buf(n).and_then(|mut buf| {
                buf.copy_from_slice(&src[next..next + n]);
                let mut cb = q.command_buffer();
                cb.store(f, offset + next as u64, buf)?;
                cb.commit()
            });
            match started {
                Ok(c) => inflight.push_back(c),
                Err(e) => result = Err(e),
            }
            next += n;
        }
        let Some(c) = inflight.pop_front() else {
            break;
        };
        let status = c.wait();
        if result.is_ok() {
            if let Some(e) = status.first_error() {
                result = Err(e);
            }
        }
    }
    result.map(|()| src.len() as u64)
}

/// One commit for many reads into held buffers; each item's bytes (clamped at end of file) or error.
pub(crate) fn batch_blocking(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    items: &[(HeldBuffer, u64)],
) -> gpuio::Result<Vec<gpuio::Result<u64>>> {
    let size = f.len()?;
    // Each item's length, clamped at end of file, and where it lands in the shared buffer.
    let mut plan = Vec::with_capacity(items.len());
    let mut total = 0usize;
    for (buf, off) in items {
        let n = (buf.len() as u64).min(size.saturating_sub(*off)) as usize;
        plan.push((total, n));
        total += n;
    }
    let mut cb = q.command_buffer();
    cb.set_buffer(engine_buf(total)?)?;
    let mut ids = Vec::with_capacity(items.len());
    for ((_, off), &(at, n)) in items.iter().zip(&plan) {
        ids.push(if n > 0 {
            Some(cb.load_into(f, *off, at, n)?)
        } else {
            None
        });
    }
    let (status, mut done) = cb.commit()?.wait_parts();
    let mut failed: Vec<Option<Error>> = vec![None; items.len()];
    match &status {
        gpuio::Status::Error(errs) => {
            for ce in errs {
                if let Some(i) = ids.iter().position(|id| *id == Some(ce.command)) {
                    failed[i] = Some(ce.error.clone());
                }
            }
        }
        gpuio::Status::Cancelled => {
            return Err(cancel_error());
        }
        _ => {}
    }
    let shared = done.take_shared_buffer();
    let mut out = Vec::with_capacity(items.len());
    for (i, ((buf, _), &(at, n))) in items.iter().zip(&plan).enumerate() {
        if let Some(e) = failed[i].take() {
            out.push(Err(e));
            continue;
        }
        let got = ids[i].map_or(0, |id| done.bytes(id)) as usize;
        if let Some(s) = &shared {
            buf.copy_in(&s[at..at + got.min(n)]);
        }
        out.push(Ok(got as u64));
    }
    Ok(out)
}
