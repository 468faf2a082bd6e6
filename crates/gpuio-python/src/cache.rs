//! `gpuio.PageCache` over `gpuio_cache::PageCache`: the Rust half. The typed array with numpy-style
//! indexing (`cache.array(path, dtype, shape)`) is Python (python/gpuio/_cache.py): it turns indices
//! into rows and calls `_gather_rows` here, which issues one batched gather for all of them.

use std::path::PathBuf;

use gpuio_cache::{CacheConfig, SourceId};
use parking_lot::Mutex;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffer::{to_numpy, HeldBuffer, Memory};
use crate::{engine, IntoPy};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PageCache>()?;
    Ok(())
}

/// A software page cache (BaM-style, on the host) of `size` bytes in lines of `line` bytes (a power
/// of two, 512 .. 65536), all allocated now. Files attached to it are read through it: hits are
/// copied from memory, misses loaded through the engine (adjacent misses as one read), lines
/// replaced by the clock. `cache.array(path, dtype, shape)` (Python) is the usual way in.
#[pyclass(module = "gpuio._gpuio", subclass)]
pub(crate) struct PageCache {
    cache: gpuio_cache::PageCache,
    sources: Mutex<Vec<SourceId>>,
}

impl PageCache {
    fn src(&self, i: usize) -> PyResult<SourceId> {
        self.sources
            .lock()
            .get(i)
            .copied()
            .ok_or_else(|| PyValueError::new_err(format!("no source {i} in this cache")))
    }
}

#[pymethods]
impl PageCache {
    #[new]
    #[pyo3(signature = (size = 256 << 20, line = 4096, *, queue_depth = 64))]
    fn new(py: Python<'_>, size: u64, line: usize, queue_depth: usize) -> PyResult<PageCache> {
        let cfg = CacheConfig {
            line_bytes: line,
            capacity_bytes: size,
            queue_depth,
            ..CacheConfig::default()
        };
        let cache = py
            .allow_threads(|| gpuio_cache::PageCache::new(&engine()?, cfg))
            .py_err(py)?;
        Ok(PageCache {
            cache,
            sources: Mutex::new(Vec::new()),
        })
    }

    /// Bytes per line.
    #[getter]
    fn line(&self) -> usize {
        self.cache.line_bytes()
    }

    /// Bytes of memory for lines.
    #[getter]
    fn size(&self) -> u64 {
        self.cache.capacity_lines() as u64 * self.cache.line_bytes() as u64
    }

    /// Attaches a file (read-only unless `writable`); returns its source number for the other calls.
    #[pyo3(signature = (path, writable = false, direct = "auto"))]
    fn _attach(
        &self,
        py: Python<'_>,
        path: PathBuf,
        writable: bool,
        direct: &str,
    ) -> PyResult<usize> {
        let direct = crate::file::parse_direct(direct)?;
        let opts = if writable {
            gpuio::OpenOptions::read_write()
        } else {
            gpuio::OpenOptions::read()
        }
        .direct(direct);
        let src = py
            .allow_threads(|| {
                let f = opts.open(&path)?;
                self.cache.attach_file(&f)
            })
            .py_err(py)?;
        let mut s = self.sources.lock();
        s.push(src);
        Ok(s.len() - 1)
    }

    /// Length in bytes of source `src`.
    fn _len(&self, src: usize) -> PyResult<u64> {
        Ok(self.cache.len(self.src(src)?))
    }

    /// Gathers rows: `index` is a contiguous int64 buffer of row numbers (already checked in range by
    /// the caller, checked again here); row `r` is `row_bytes` at `base + r * row_bytes`. Returns the
    /// rows back to back as a numpy uint8 array.
    fn _gather_rows<'py>(
        &self,
        py: Python<'py>,
        src: usize,
        index: &Bound<'py, PyAny>,
        row_bytes: usize,
        base: u64,
        rows: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let src = self.src(src)?;
        let held = HeldBuffer::get(index, false)?;
        let bytes = held.as_slice();
        if bytes.len() % 8 != 0 {
            return Err(PyValueError::new_err("index buffer is not int64"));
        }
        let mut ranges = Vec::with_capacity(bytes.len() / 8);
        for c in bytes.chunks_exact(8) {
            let r = i64::from_ne_bytes(c.try_into().expect("8 bytes"));
            if r < 0 || r as u64 >= rows {
                return Err(PyIndexError::new_err(format!(
                    "index {r} is out of bounds for {rows} rows"
                )));
            }
            ranges.push((base + r as u64 * row_bytes as u64, row_bytes));
        }
        drop(held);
        let out = py
            .allow_threads(|| -> gpuio::Result<Vec<u8>> {
                Ok(self.cache.gather(src, &ranges)?.wait()?.into_bytes())
            })
            .py_err(py)?;
        to_numpy(py, Memory::from_vec(out))
    }

    /// Reads `n` bytes at `offset` of source `src` through the cache.
    fn _read<'py>(
        &self,
        py: Python<'py>,
        src: usize,
        offset: u64,
        n: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let src = self.src(src)?;
        let out = py
            .allow_threads(|| -> gpuio::Result<Vec<u8>> {
                let mut v = vec![0u8; n];
                self.cache.read(src, offset, &mut v)?;
                Ok(v)
            })
            .py_err(py)?;
        to_numpy(py, Memory::from_vec(out))
    }

    /// Writes `buf` at `offset` of source `src` into the cache (write-back: reaches the file on
    /// eviction or `flush`).
    fn _write(
        &self,
        py: Python<'_>,
        src: usize,
        offset: u64,
        buf: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let src = self.src(src)?;
        let held = HeldBuffer::get(buf, false)?;
        let r = py.allow_threads(|| self.cache.write(src, offset, held.as_slice()));
        drop(held);
        r.py_err(py)
    }

    /// Starts loading byte ranges `(offset, length)` of source `src` into the cache; returns at once
    /// unless `wait`.
    #[pyo3(signature = (src, ranges, wait = false))]
    fn _prefetch(
        &self,
        py: Python<'_>,
        src: usize,
        ranges: Vec<(u64, u64)>,
        wait: bool,
    ) -> PyResult<()> {
        let src = self.src(src)?;
        py.allow_threads(|| -> gpuio::Result<()> {
            let mut pending = Vec::new();
            for (off, len) in ranges {
                pending.push(self.cache.prefetch(src, off, len)?);
            }
            if wait {
                for g in pending {
                    g.wait()?;
                }
            }
            Ok(())
        })
        .py_err(py)
    }

    /// Writes every modified line back to its file (and fsyncs them if `sync`).
    #[pyo3(signature = (sync = true))]
    fn flush(&self, py: Python<'_>, sync: bool) -> PyResult<()> {
        py.allow_threads(|| self.cache.flush(sync)).py_err(py)
    }

    /// Counters since the cache was made (or `reset_stats()`): accesses, hits, misses, joined,
    /// reads_issued, lines_loaded, writes_issued, evictions, bytes_read, bytes_requested, hit_rate,
    /// read_amplification.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.cache.stats();
        let d = PyDict::new(py);
        d.set_item("accesses", s.accesses)?;
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("joined", s.joined)?;
        d.set_item("reads_issued", s.reads_issued)?;
        d.set_item("lines_loaded", s.lines_loaded)?;
        d.set_item("writes_issued", s.writes_issued)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("bytes_requested", s.bytes_requested)?;
        d.set_item("hit_rate", s.hit_rate())?;
        d.set_item("read_amplification", s.read_amplification())?;
        Ok(d)
    }

    /// Sets every counter back to zero.
    fn reset_stats(&self) {
        self.cache.reset_stats();
    }
}
