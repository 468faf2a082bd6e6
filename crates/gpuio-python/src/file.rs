//! `gpuio.open` → [`File`], `gpuio.Queue`, and the blocking read/write paths the async calls share.
//!
//! A caller's buffer is lent to the engine (`gpuio::AlignedBuf::from_raw_parts`), so `pread(buf, ...)`
//! reads straight into it — no copy — whenever the engine can reach it without a bounce: always for a
//! buffered file, and for an O_DIRECT file when the buffer's address, its length and the file offset
//! are aligned as the file's direct I/O requires ([`straight`]). Otherwise the read goes into engine
//! buffers and is copied into the caller's, as before. Which path each request took is counted per
//! file (`File.copy_stats()`).
//!
//! The keep-alive lent with the memory is an `Arc` of the buffer-protocol export ([`HeldBuffer`]); the
//! calling code holds another clone until the I/O has finished and drops it last, so the export is
//! released (which needs the GIL) on a thread that may take the GIL — never on the engine thread.
//! Large transfers go in pieces of [`PIECE_BYTES`] with up to [`PIECES_IN_FLIGHT`] in flight, so a
//! copied transfer's memory stays bounded and a cancelled one stops between pieces.

use std::any::Any;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gpuio::backend::BackendKind;
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
    pub(crate) copies: Arc<CopyStats>,
}

/// How this file's reads and writes reached the caller's buffers: straight (lent to the engine) or
/// through an engine buffer and a copy. Counted per request (a `pread_batch` item is one).
#[derive(Default)]
pub(crate) struct CopyStats {
    reads_zero_copy: AtomicU64,
    reads_copied: AtomicU64,
    writes_zero_copy: AtomicU64,
    writes_copied: AtomicU64,
    bytes_zero_copy: AtomicU64,
    bytes_copied: AtomicU64,
}

impl CopyStats {
    /// Counts one request of `bytes` (asked for) that went `straight` or not.
    pub(crate) fn count(&self, write: bool, straight: bool, bytes: usize) {
        let (calls, b) = match (write, straight) {
            (false, true) => (&self.reads_zero_copy, &self.bytes_zero_copy),
            (false, false) => (&self.reads_copied, &self.bytes_copied),
            (true, true) => (&self.writes_zero_copy, &self.bytes_zero_copy),
            (true, false) => (&self.writes_copied, &self.bytes_copied),
        };
        calls.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes as u64, Ordering::Relaxed);
    }
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
            copies: Arc::default(),
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
    ///
    /// The bytes go straight into `buf`, with no copy, unless the file is O_DIRECT and the address of
    /// `buf`, its length or `offset` is not a multiple of the file's direct-I/O alignment (4096 on
    /// most filesystems): then they go through an engine buffer and are copied. `copy_stats()` counts
    /// which path each request took. Bytes of `buf` past the count returned are unspecified: an
    /// O_DIRECT read at the end of the file may fill them with zeros (Linux does, as `os.preadv`).
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pread(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<u64> {
        let offset = check_offset(offset)?;
        let held = Arc::new(HeldBuffer::get(buf, true)?);
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        let r = py.allow_threads(|| pread_blocking(&q, &f, offset, &held, None, &self.copies));
        // The engine's clones of `held` are gone (every piece was waited for): this drop releases
        // the export, here, with the GIL.
        drop(held);
        r.py_err(py)
    }

    /// Writes all of `buf` (any C-contiguous buffer-protocol object) at `offset`, extending the file
    /// as needed. Returns `len(buf)` in bytes. The file must be open for writing ("r+" or "w").
    /// Straight from `buf` with no copy under the same conditions as `pread` (for O_DIRECT, offsets
    /// and lengths a multiple of the page size as well).
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pwrite(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<u64> {
        let offset = check_offset(offset)?;
        let held = Arc::new(HeldBuffer::get(buf, false)?);
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        let r = py.allow_threads(|| pwrite_blocking(&q, &f, offset, &held, None, &self.copies));
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
    /// caller drops every reference to it. Straight into `buf` under the same conditions as `pread`;
    /// do not read `buf` before the future is done.
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pread_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<Future> {
        let offset = check_offset(offset)?;
        let held = Arc::new(HeldBuffer::get(buf, true)?);
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        Future::start(
            py,
            Job::Pread {
                queue: q,
                file: f,
                offset,
                held,
                copies: self.copies.clone(),
            },
        )
    }

    /// Like `pwrite`, without waiting: a `gpuio.Future` whose `result()` is the number of bytes
    /// written. A write of at most 8 MiB copies `buf` before it returns (so `buf` may change at
    /// once); a larger one holds `buf` until the write completes.
    #[pyo3(signature = (buf, offset, *, queue = None))]
    fn pwrite_async(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: i64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<Future> {
        let offset = check_offset(offset)?;
        let held = Arc::new(HeldBuffer::get(buf, false)?);
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        Future::start(
            py,
            Job::Pwrite {
                queue: q,
                file: f,
                offset,
                held,
                copies: self.copies.clone(),
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
    ///
    /// Each item is read straight into its buffer under the same conditions as `pread`; items whose
    /// buffers lie back to back in memory (slices of one array, in order or not) are lent to the
    /// engine as one buffer. The others share one engine buffer and are copied out.
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
        let held = Arc::new(held);
        let q = queue_of(py, queue)?;
        let f = self.handle()?;
        let results = py.allow_threads(|| batch_blocking(&q, &f, &held, &self.copies));
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

    /// How this file's reads and writes reached the caller's buffers so far: a dict of
    /// `reads_zero_copy` and `writes_zero_copy` (requests that went straight between the file and the
    /// caller's buffer), `reads_copied` and `writes_copied` (requests through an engine buffer and a
    /// copy: an O_DIRECT file with a misaligned buffer, length or offset), and `bytes_zero_copy`,
    /// `bytes_copied` (bytes asked for by each kind). `read()` and `read_async()` are not counted:
    /// they return the engine's buffer itself.
    fn copy_stats(&self) -> std::collections::HashMap<&'static str, u64> {
        let c = &self.copies;
        [
            ("reads_zero_copy", &c.reads_zero_copy),
            ("reads_copied", &c.reads_copied),
            ("writes_zero_copy", &c.writes_zero_copy),
            ("writes_copied", &c.writes_copied),
            ("bytes_zero_copy", &c.bytes_zero_copy),
            ("bytes_copied", &c.bytes_copied),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect()
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

/// Whether a transfer of `len` bytes at file `offset` with caller memory at `addr` reaches the device
/// with no bounce through engine memory: always for a buffered file (and on the mmap backend, where
/// O_DIRECT means nothing); for an O_DIRECT file, when the address is a multiple of the file's
/// memory alignment and the offset and length are multiples of its block (for writes at least the
/// page, as the engine's planner requires: `crates/gpuio/src/queue/driver.rs`). An empty transfer is
/// never lent (it does no I/O).
pub(crate) fn straight(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    addr: usize,
    offset: u64,
    len: usize,
    write: bool,
) -> bool {
    if len == 0 {
        return false;
    }
    if !f.is_direct() || q.engine().backend_kind() == BackendKind::Mmap {
        return true;
    }
    let a = f.align();
    let mut block = (a.offset_align as u64).max(512);
    if write {
        block = block.max(os_page_bytes());
    }
    let mem = (a.mem_align as usize).max(1);
    addr % mem == 0 && offset % block == 0 && len as u64 % block == 0
}

fn os_page_bytes() -> u64 {
    // SAFETY: sysconf reads a system constant.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => ALIGN as u64,
    }
}

/// Lends `len` bytes at `ptr` to the engine, kept alive by `keep` (a clone of the `Arc` that holds
/// the buffer-protocol export(s) the bytes belong to).
///
/// # Safety
/// `ptr..ptr + len` lies inside an export that `keep` holds, and nothing reads or writes it (nor lends
/// it again) until the engine hands the buffer back; the caller waits for that before it touches
/// the bytes. Python code running meanwhile may touch them (the GIL is released, as in
/// `io.RawIOBase.readinto`): that yields unspecified bytes, never an access outside the export.
pub(crate) unsafe fn lend(
    ptr: *mut u8,
    len: usize,
    keep: Box<dyn Any + Send>,
) -> gpuio::Result<AlignedBuf> {
    let ptr = NonNull::new(ptr).ok_or_else(|| Error::invalid("a null buffer cannot be lent"))?;
    // SAFETY: as the caller guarantees.
    unsafe { AlignedBuf::from_raw_parts(ptr, len, keep) }
}

/// `dst[at..at + len]` lent to the engine (see [`lend`]).
fn lend_held(dst: &Arc<HeldBuffer>, at: usize, len: usize) -> gpuio::Result<AlignedBuf> {
    assert!(at + len <= dst.len(), "lending past the held buffer");
    // SAFETY: the range lies inside the export `dst` holds; each caller lends disjoint pieces and
    // waits for every one before returning.
    unsafe { lend(dst.ptr().add(at), len, Box::new(dst.clone())) }
}

/// Reads up to `dst.len()` bytes at `offset` into `dst`, in pieces with several in flight: straight
/// into `dst` where [`straight`] allows it, else through engine buffers and a copy. Returns the bytes
/// read (fewer only at end of file). Every piece has finished, and the engine has let go of `dst`,
/// when this returns.
pub(crate) fn pread_blocking(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    offset: u64,
    dst: &Arc<HeldBuffer>,
    cancel: CancelFlag<'_>,
    copies: &CopyStats,
) -> gpuio::Result<u64> {
    let lent = straight(q, f, dst.ptr() as usize, offset, dst.len(), false);
    copies.count(false, lent, dst.len());
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
            let buf = if lent {
                lend_held(dst, next, n)
            } else {
                match spare.pop() {
                    Some(mut b) => b.set_len(n).map(|_| b),
                    None => engine_buf(n),
                }
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
        if !lent {
            if let Some(buf) = owned(done.take_buffer(id)) {
                dst_copy(dst, at, &buf[..got]);
                spare.push(buf);
            }
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

/// Writes all of `src` at `offset` in pieces with several in flight, straight from `src` where
/// [`straight`] allows it. Returns `src.len()`. Every piece has finished when this returns.
pub(crate) fn pwrite_blocking(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    offset: u64,
    src: &Arc<HeldBuffer>,
    cancel: CancelFlag<'_>,
    copies: &CopyStats,
) -> gpuio::Result<u64> {
    let lent = straight(q, f, src.ptr() as usize, offset, src.len(), true);
    copies.count(true, lent, src.len());
    let bytes = src.as_slice();
    let mut inflight: VecDeque<Completion> = VecDeque::new();
    let mut next = 0usize;
    let mut result: gpuio::Result<()> = Ok(());
    loop {
        while result.is_ok() && inflight.len() < PIECES_IN_FLIGHT && next < bytes.len() {
            if cancelled(cancel) {
                result = Err(cancel_error());
                break;
            }
            let n = PIECE_BYTES.min(bytes.len() - next);
            let buf = if lent {
                lend_held(src, next, n)
            } else {
                engine_buf(n).map(|mut buf| {
                    buf.copy_from_slice(&bytes[next..next + n]);
                    buf
                })
            };
            let started = buf.and_then(|buf| {
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
        let (status, done) = c.wait_parts();
        drop(done);
        if result.is_ok() {
            if let Some(e) = status.first_error() {
                result = Err(e);
            }
        }
    }
    result.map(|()| bytes.len() as u64)
}

/// Held buffers of a batch, with each item's file offset.
pub(crate) type BatchItems = Arc<Vec<(HeldBuffer, u64)>>;

/// If the buffers of `items` (indices into `all`) tile one range of memory exactly — back to back,
/// no gaps, no overlaps, in any order — that range's start and length.
fn one_span(all: &[(HeldBuffer, u64)], items: &[usize]) -> Option<(*mut u8, usize)> {
    if items.len() < 2 {
        return None;
    }
    let mut by_addr: Vec<(usize, usize)> = items
        .iter()
        .map(|&i| (all[i].0.ptr() as usize, all[i].0.len()))
        .collect();
    by_addr.sort_unstable();
    let start = by_addr[0].0;
    let mut end = start;
    for &(a, n) in &by_addr {
        if a != end {
            return None;
        }
        end = a + n;
    }
    Some((start as *mut u8, end - start))
}

/// One batch of reads into held buffers; each item's bytes (clamped at end of file) or error. Items
/// that [`straight`] allows are read into their own memory (one lent buffer for all of them when they
/// tile one range, else one each); the rest into one engine buffer, then copied out. At most two
/// commits (one of each kind), both finished when this returns.
pub(crate) fn batch_blocking(
    q: &gpuio::IoQueue,
    f: &gpuio::File,
    items: &BatchItems,
    copies: &CopyStats,
) -> gpuio::Result<Vec<gpuio::Result<u64>>> {
    let size = f.len()?;
    // Each item's length, clamped at end of file.
    let lens: Vec<usize> = items
        .iter()
        .map(|(buf, off)| (buf.len() as u64).min(size.saturating_sub(*off)) as usize)
        .collect();
    let mut is_lent: Vec<bool> = items
        .iter()
        .zip(&lens)
        .map(|((buf, off), &n)| n > 0 && straight(q, f, buf.ptr() as usize, *off, buf.len(), false))
        .collect();
    // Two loads into the same memory at once would race: of overlapping buffers, lend only the first
    // (by address); the others go through the engine buffer and are copied after every read is done.
    let mut by_addr: Vec<usize> = (0..items.len()).filter(|&i| is_lent[i]).collect();
    by_addr.sort_unstable_by_key(|&i| items[i].0.ptr() as usize);
    let mut reach = 0usize;
    for &i in &by_addr {
        let (a, n) = (items[i].0.ptr() as usize, items[i].0.len());
        if a < reach {
            is_lent[i] = false;
        } else {
            reach = a + n;
        }
    }
    let (mut lent, mut copied) = (Vec::new(), Vec::new());
    for (i, (buf, _)) in items.iter().enumerate() {
        if lens[i] == 0 {
            continue;
        }
        copies.count(false, is_lent[i], buf.len());
        if is_lent[i] {
            lent.push(i);
        } else {
            copied.push(i);
        }
    }
    // Which command of which commit each item is.
    let mut ids: Vec<Option<(usize, CommandId)>> = vec![None; items.len()];
    let mut commits = Vec::new();
    if !lent.is_empty() {
        let mut cb = q.command_buffer();
        match one_span(items, &lent) {
            Some((base, span)) => {
                // SAFETY: every byte of base..+span belongs to one of the held exports (they tile
                // it); the items' ranges are disjoint and untouched until the commit below is waited.
                cb.set_buffer(unsafe { lend(base, span, Box::new(items.clone())) }?)?;
                for &i in &lent {
                    let at = items[i].0.ptr() as usize - base as usize;
                    ids[i] = Some((commits.len(), cb.load_into(f, items[i].1, at, lens[i])?));
                }
            }
            None => {
                for &i in &lent {
                    let (buf, off) = &items[i];
                    // SAFETY: as above, for this item's export alone; lent items do not overlap.
                    let b = unsafe { lend(buf.ptr(), lens[i], Box::new(items.clone())) }?;
                    ids[i] = Some((
                        commits.len(),
                        cb.load_range(f, *off, b, 0, lens[i] as u64, true)?,
                    ));
                }
            }
        }
        commits.push(cb);
    }
    let mut plan = vec![0usize; items.len()];
    if !copied.is_empty() {
        let total: usize = copied.iter().map(|&i| lens[i]).sum();
        let mut cb = q.command_buffer();
        cb.set_buffer(engine_buf(total)?)?;
        let mut at = 0;
        for &i in &copied {
            plan[i] = at;
            ids[i] = Some((commits.len(), cb.load_into(f, items[i].1, at, lens[i])?));
            at += lens[i];
        }
        commits.push(cb);
    }
    // Commit every command buffer before waiting for any; wait for all even after an error.
    let mut started = Vec::new();
    let mut commit_err = None;
    for cb in commits {
        match cb.commit() {
            Ok(c) => started.push(Some(c)),
            Err(e) => {
                started.push(None);
                commit_err.get_or_insert(e);
            }
        }
    }
    let finished: Vec<_> = started
        .into_iter()
        .map(|c| c.map(|c| c.wait_parts()))
        .collect();
    if let Some(e) = commit_err {
        return Err(e);
    }
    let mut failed: Vec<Option<Error>> = vec![None; items.len()];
    for (k, (status, _)) in finished.iter().flatten().enumerate() {
        match status {
            gpuio::Status::Error(errs) => {
                for ce in errs {
                    if let Some(i) = ids.iter().position(|id| *id == Some((k, ce.command))) {
                        failed[i] = Some(ce.error.clone());
                    }
                }
            }
            gpuio::Status::Cancelled => return Err(cancel_error()),
            _ => {}
        }
    }
    let mut finished: Vec<_> = finished.into_iter().flatten().map(|(_, d)| d).collect();
    let shared = match copied.is_empty() {
        true => None,
        false => finished.last_mut().and_then(|d| d.take_shared_buffer()),
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, (buf, _)) in items.iter().enumerate() {
        if let Some(e) = failed[i].take() {
            out.push(Err(e));
            continue;
        }
        let got = ids[i].map_or(0, |(k, id)| finished[k].bytes(id)) as usize;
        if let (Some(s), false) = (&shared, is_lent[i]) {
            let at = plan[i];
            buf.copy_in(&s[at..at + got.min(lens[i])]);
        }
        out.push(Ok(got as u64));
    }
    Ok(out)
}
