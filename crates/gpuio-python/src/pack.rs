//! Packs: `gpuio.Pack` (open, entries, read a range of an entry, verify) and `gpuio.pack` (write one),
//! over `gpuio_pack` — the same reader and writer `gpuio cat PACK:ENTRY`, `gpuio verify` and
//! `gpuio pack` use (crates/gpuio-cli/src/pack_cmd.rs).

use std::path::PathBuf;

use gpuio::AlignedBuf;
use gpuio_pack::{Codec, PackOptions};
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffer::{to_numpy, HeldBuffer, Memory};
use crate::file::{queue_of, Queue, ALIGN};
use crate::IntoPy;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Pack>()?;
    m.add_class::<PackEntry>()?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    Ok(())
}

/// A compressed pack opened for reading (`gpuio pack` or `gpuio.pack` made it). The table is read and
/// cross-checked when it is opened: a damaged table raises `gpuio.CorruptError` naming the byte.
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct Pack {
    pub(crate) pack: gpuio_pack::Pack,
}

#[pymethods]
impl Pack {
    #[new]
    #[pyo3(signature = (path, direct = "auto"))]
    fn new(py: Python<'_>, path: PathBuf, direct: &str) -> PyResult<Pack> {
        let direct = crate::file::parse_direct(direct)?;
        let pack = py
            .allow_threads(|| gpuio_pack::Pack::open_with(&path, direct))
            .py_err(py)?;
        Ok(Pack { pack })
    }

    /// Every entry, in pack order.
    #[getter]
    fn entries(&self) -> Vec<PackEntry> {
        (0..self.pack.entries().len())
            .filter_map(|i| self.pack.entry_at(i))
            .map(|entry| PackEntry { entry })
            .collect()
    }

    /// The entry called `name` (KeyError if there is none).
    fn entry(&self, name: &str) -> PyResult<PackEntry> {
        match self.pack.entries().iter().position(|e| e.name == name) {
            Some(i) => Ok(PackEntry {
                entry: self.pack.entry_at(i).expect("index from entries()"),
            }),
            None => Err(PyKeyError::new_err(format!(
                "{}: no entry '{name}'",
                self.pack.path().display()
            ))),
        }
    }

    /// Entry names, in pack order.
    fn names(&self) -> Vec<String> {
        self.pack.entries().iter().map(|e| e.name.clone()).collect()
    }

    fn __len__(&self) -> usize {
        self.pack.entries().len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.pack.entries().iter().any(|e| e.name == name)
    }

    fn __getitem__(&self, name: &str) -> PyResult<PackEntry> {
        self.entry(name)
    }

    /// Reads the whole pack and checks every chunk's CRC-32C (stored and decoded bytes) and that all
    /// padding is zero, as `gpuio verify` does. Returns the list of problems found (one line each,
    /// the messages `gpuio verify` prints); empty means intact. An I/O error is raised.
    #[pyo3(signature = (*, queue = None))]
    fn verify(&self, py: Python<'_>, queue: Option<&Bound<'_, Queue>>) -> PyResult<Vec<String>> {
        let q = queue_of(py, queue)?;
        let errs = py
            .allow_threads(|| self.pack.verify(&q, &mut |_, _| {}))
            .py_err(py)?;
        Ok(errs.iter().map(|e| e.to_string()).collect())
    }

    /// The pack's path.
    #[getter]
    fn path(&self) -> PathBuf {
        self.pack.path().to_path_buf()
    }

    /// Bytes of all entries, uncompressed.
    #[getter]
    fn logical_bytes(&self) -> u64 {
        self.pack.logical_bytes()
    }

    /// Length of the pack file.
    #[getter]
    fn file_bytes(&self) -> u64 {
        self.pack.file_len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<gpuio.Pack {:?}: {} entries>",
            self.pack.path(),
            self.pack.entries().len()
        )
    }
}

/// One entry of a pack: a named file, stored in independently compressed chunks.
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct PackEntry {
    entry: gpuio_pack::Entry,
}

#[pymethods]
impl PackEntry {
    /// The entry's name (a relative '/'-separated path).
    #[getter]
    fn name(&self) -> &str {
        self.entry.name()
    }

    /// Uncompressed size in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.entry.len()
    }

    /// The codec its chunks were compressed with ("none", "lz4", "zstd", "zlib", "xz", "lzfse";
    /// chunks that did not compress are stored raw whatever it says).
    #[getter]
    fn codec(&self) -> &'static str {
        self.entry.info().codec.name()
    }

    /// Bytes of its chunks in the pack (compressed).
    #[getter]
    fn stored_bytes(&self) -> u64 {
        self.entry.info().stored_bytes()
    }

    /// Uncompressed bytes per chunk (the unit of random access).
    #[getter]
    fn chunk_size(&self) -> u32 {
        self.entry.info().chunk_size
    }

    /// Reads `n` uncompressed bytes at `offset` (default: to the end; `n` is clamped at the end)
    /// into a new numpy uint8 array. Only the chunks the range touches are read, decompressed in
    /// parallel and checked; a damaged chunk raises `gpuio.CorruptError`.
    #[pyo3(signature = (offset = 0, n = None, *, queue = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        n: Option<u64>,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let size = self.entry.len();
        if offset > size {
            return Err(PyValueError::new_err(format!(
                "offset {offset} is past the end of entry '{}' ({size} bytes)",
                self.entry.name()
            )));
        }
        let n = n.unwrap_or(u64::MAX).min(size - offset);
        let n = usize::try_from(n).map_err(|_| PyValueError::new_err("read too large"))?;
        let q = queue_of(py, queue)?;
        let buf = py
            .allow_threads(|| -> gpuio::Result<AlignedBuf> {
                let buf = AlignedBuf::new(n, ALIGN)?;
                self.entry.load(&q, offset, buf)?.wait()?.into_owned()
            })
            .py_err(py)?;
        to_numpy(py, Memory::from_aligned(buf, n))
    }

    /// Reads `len(buf)` uncompressed bytes at `offset` straight into `buf` (a writable, contiguous
    /// buffer-protocol object); the range must lie within the entry (else `gpuio.UnexpectedEofError`).
    #[pyo3(signature = (buf, offset = 0, *, queue = None))]
    fn pread(
        &self,
        py: Python<'_>,
        buf: &Bound<'_, PyAny>,
        offset: u64,
        queue: Option<&Bound<'_, Queue>>,
    ) -> PyResult<usize> {
        let held = HeldBuffer::get(buf, true)?;
        let q = queue_of(py, queue)?;
        let r = py.allow_threads(|| {
            let len = held.len();
            if len == 0 {
                return Ok(0);
            }
            // SAFETY: the held export is writable, `len` bytes long, and outlives this call;
            // `read_at` returns only once nothing writes through the pointer any more.
            let out = unsafe { std::slice::from_raw_parts_mut(held.ptr(), len) };
            self.entry.read_at(&q, offset, out).map(|()| len)
        });
        drop(held);
        r.py_err(py)
    }

    fn __len__(&self) -> usize {
        self.entry.len() as usize
    }

    fn __repr__(&self) -> String {
        format!(
            "<gpuio.PackEntry {:?}: {} bytes, {}>",
            self.entry.name(),
            self.entry.len(),
            self.codec()
        )
    }
}

fn paths_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PathBuf>> {
    if let Ok(p) = obj.extract::<PathBuf>() {
        return Ok(vec![p]);
    }
    let mut out = Vec::new();
    for item in obj.try_iter()? {
        out.push(item?.extract::<PathBuf>()?);
    }
    Ok(out)
}

/// Packs files into a new pack at `out` (replaced crash-safely if it exists): `paths` is a path or a
/// list of paths; a file becomes an entry named by its file name, a directory contributes every
/// regular file below it named by its relative path. `codec`: "lz4" (default), "zstd", "zlib",
/// "xz", "lzfse" or "none"; `level` the codec's level (None: its default); `chunk_size` the
/// uncompressed bytes per chunk (512 B .. 256 MiB, default 64 KiB). Returns a summary dict:
/// entries, logical_bytes, stored_bytes, file_bytes, seconds.
#[pyfunction]
#[pyo3(signature = (paths, out, *, codec = "lz4", chunk_size = 65536, level = None))]
fn pack<'py>(
    py: Python<'py>,
    paths: &Bound<'py, PyAny>,
    out: PathBuf,
    codec: &str,
    chunk_size: u64,
    level: Option<i32>,
) -> PyResult<Bound<'py, PyDict>> {
    let codec: Codec = codec
        .parse()
        .map_err(|e: gpuio::Error| PyValueError::new_err(e.to_string()))?;
    let chunk_size = u32::try_from(chunk_size)
        .map_err(|_| PyValueError::new_err(format!("chunk_size {chunk_size} is too large")))?;
    let paths = paths_of(paths)?;
    if paths.is_empty() {
        return Err(PyValueError::new_err("no paths to pack"));
    }
    let opts = PackOptions {
        codec,
        level,
        chunk_size,
        ..PackOptions::default()
    };
    let summary = py
        .allow_threads(|| {
            let inputs = gpuio_pack::inputs_from_paths(&paths)?;
            gpuio_pack::pack_files(&inputs, &out, &opts, &mut |_, _| {})
        })
        .py_err(py)?;
    let d = PyDict::new(py);
    d.set_item("entries", summary.entries)?;
    d.set_item("logical_bytes", summary.logical_bytes)?;
    d.set_item("stored_bytes", summary.stored_bytes)?;
    d.set_item("file_bytes", summary.file_bytes)?;
    d.set_item("seconds", summary.elapsed.as_secs_f64())?;
    Ok(d)
}
