//! safetensors: load a file (or a pack entry) onto a device with `gpuio_cuda::Loader` (the code behind
//! `gpuio load`), and save tensors crash-safely. The Python half (python/gpuio/_tensors.py) maps dtypes
//! onto numpy / torch and builds the dict.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use gpuio::{AlignedBuf, DirectMode, Error, ReplaceFile};
use gpuio_cuda::{Dtype, LoadedModel, Loader, LoaderConfig};
use parking_lot::Mutex;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::buffer::{to_numpy, HeldBuffer, Memory, Owner};
use crate::dlpack::Tensor;
use crate::file::ALIGN;
use crate::{default_queue, engine, IntoPy};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(_load_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(_save_safetensors, m)?)?;
    Ok(())
}

/// How a load into host memory reads its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostRead {
    /// Straight into the destination by parallel `pread`s: one copy from the page cache for data
    /// already in memory, `O_DIRECT` with no copy for a cold file on a disk (`gpuio_cuda::host`).
    Direct,
    /// Through staging buffers, then copied: pack entries, whose chunks are decoded on the CPU.
    Staged,
}

/// One loader per device (and, for host memory, per [`HostRead`]), kept for the life of the process:
/// its staging pool is registered with the engine's io_uring and lives as long as the engine (see
/// `gpuio_cuda::Loader::new`).
fn loader(device: &str, host_read: HostRead) -> gpuio::Result<Arc<Loader>> {
    static LOADERS: OnceLock<Mutex<HashMap<String, Arc<Loader>>>> = OnceLock::new();
    let map = LOADERS.get_or_init(|| Mutex::new(HashMap::new()));
    let target: gpuio_cuda::Target = device.parse()?;
    let key = match target {
        gpuio_cuda::Target::Cpu => format!("cpu/{host_read:?}"),
        t => t.to_string(),
    };
    if let Some(l) = map.lock().get(&key) {
        return Ok(l.clone());
    }
    let (dev, cfg) = match target {
        // Host memory is its own destination: data already in memory is read straight into it
        // (`gpuio_cuda::host`, the same choice as `gpuio load --device cpu`).
        gpuio_cuda::Target::Cpu if host_read == HostRead::Direct => {
            let (dev, cfg, _why) = gpuio_cuda::host::host_direct_plan(LoaderConfig::default());
            (dev, cfg)
        }
        t => (gpuio_cuda::open_target(t)?, LoaderConfig::default()),
    };
    let l = Arc::new(Loader::new(&engine()?, dev, cfg)?);
    Ok(map.lock().entry(key).or_insert(l).clone())
}

/// A safetensors model loaded into one allocation on a device. Its tensors are views into that
/// allocation; it is freed when the model and every view of it are gone.
#[pyclass(module = "gpuio._gpuio", frozen)]
pub(crate) struct Model {
    pub(crate) model: Arc<LoadedModel>,
    device: String,
}

impl Model {
    fn is_host(&self) -> bool {
        self.device == "cpu"
    }
}

#[pymethods]
impl Model {
    /// "cpu" or "cuda:N".
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    /// Number of tensors.
    fn __len__(&self) -> usize {
        self.model.tensors.len()
    }

    /// `(name, dtype, shape, nbytes)` of every tensor in file order; dtype is the safetensors name
    /// ("F32", "BF16", ...).
    fn table<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for t in &self.model.tensors {
            out.append((t.name.as_str(), t.dtype.name(), t.shape.clone(), t.bytes))?;
        }
        Ok(out)
    }

    /// The header's `__metadata__` as a dict.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.model.metadata {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// How the load went: bytes, seconds, bytes_per_sec, path ("staged", "direct", ...), note.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.model.stats;
        let d = PyDict::new(py);
        d.set_item("bytes", s.bytes)?;
        d.set_item("seconds", s.seconds)?;
        d.set_item("bytes_per_sec", s.bytes_per_sec())?;
        d.set_item("path", s.path.name())?;
        d.set_item("note", s.note.as_str())?;
        d.set_item("read_mode", s.read_mode.as_str())?;
        Ok(d)
    }

    /// Tensor `i`'s bytes as a numpy uint8 array viewing the model's memory (host devices only).
    fn host_bytes<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyAny>> {
        let t = self
            .model
            .tensors
            .get(i)
            .ok_or_else(|| PyIndexError::new_err(format!("no tensor {i}")))?;
        if !self.is_host() {
            return Err(PyValueError::new_err(format!(
                "tensor '{}' is in {} memory: use its DLPack export (tensor(i)) instead",
                t.name, self.device
            )));
        }
        // On the host stand-in device, device addresses are host addresses of the allocation the
        // model owns (gpuio_cuda::HostDevice); the Arc keeps it alive as long as the array.
        let owner: Arc<dyn Send + Sync> = self.model.clone();
        let mem = Memory::new(
            t.device_ptr as usize as *const u8,
            t.bytes as usize,
            false,
            Owner::Shared(owner),
        );
        to_numpy(py, mem)
    }

    /// Tensor `i` as a DLPack-exporting `gpuio.Tensor` (`torch.from_dlpack`, `cupy.from_dlpack`,
    /// `numpy.from_dlpack` take it without a copy).
    fn tensor(&self, i: usize) -> PyResult<Tensor> {
        let t = self
            .model
            .tensors
            .get(i)
            .ok_or_else(|| PyIndexError::new_err(format!("no tensor {i}")))?;
        Tensor::new(self.model.clone(), &self.device, t)
    }

    fn __repr__(&self) -> String {
        format!(
            "<gpuio.Model {} tensors, {} bytes on {}>",
            self.model.tensors.len(),
            self.model.buffer.len(),
            self.device
        )
    }
}

/// Loads a safetensors file (or `PACK:ENTRY`) onto `device` ("cpu" — host memory through the same
/// staged path — or "cuda:N"). Returns the `Model`; python/gpuio/_tensors.py turns it into arrays.
#[pyfunction]
#[pyo3(signature = (path, device = "cpu"))]
fn _load_safetensors(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Model> {
    let (model, label) = py
        .allow_threads(|| -> gpuio::Result<(LoadedModel, String)> {
            let as_str = path.to_string_lossy();
            let (m, l) = match gpuio_pack::split_pack_path(&as_str) {
                Some((pack, entry)) => {
                    // Pack chunks are decoded on the CPU into staging buffers either way.
                    let l = loader(device, HostRead::Staged)?;
                    let pack = gpuio_pack::Pack::open(&pack)?;
                    (l.load_safetensors_entry(&pack.entry(&entry)?)?, l)
                }
                None => {
                    let host_read = match device.parse()? {
                        gpuio_cuda::Target::Cpu => HostRead::Direct,
                        _ => HostRead::Staged,
                    };
                    let l = loader(device, host_read)?;
                    (l.load_safetensors(&path)?, l)
                }
            };
            let label = l.device().label();
            Ok((m, label))
        })
        .py_err(py)?;
    Ok(Model {
        model: Arc::new(model),
        device: label,
    })
}

/// Writes tensors as a safetensors file at `path`, crash-safely (a temporary file beside it, fsynced,
/// renamed over it, the directory fsynced: `gpuio::ReplaceFile`). `tensors` is a list of
/// `(name, dtype, shape, buffer)` with dtype a safetensors name and buffer C-contiguous
/// little-endian bytes (python/gpuio/_tensors.py prepares them); `metadata` a dict of str → str.
#[pyfunction]
#[pyo3(signature = (tensors, path, metadata = None))]
fn _save_safetensors(
    py: Python<'_>,
    tensors: Vec<(String, String, Vec<u64>, Bound<'_, PyAny>)>,
    path: PathBuf,
    metadata: Option<HashMap<String, String>>,
) -> PyResult<u64> {
    let mut held = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, buf) in &tensors {
        let d = Dtype::from_name(dtype)
            .ok_or_else(|| PyValueError::new_err(format!("unknown safetensors dtype {dtype:?}")))?;
        let h = HeldBuffer::get(buf, false)?;
        let elems = shape.iter().try_fold(1u64, |a, &s| a.checked_mul(s));
        let want = elems
            .and_then(|e| e.checked_mul(d.bits()))
            .map(|b| b.div_ceil(8));
        if want != Some(h.len() as u64) {
            return Err(PyValueError::new_err(format!(
                "tensor '{name}': {} bytes of data for {dtype} {shape:?}",
                h.len()
            )));
        }
        held.push((name.clone(), d, shape.clone(), h));
    }
    let mut meta: Vec<(String, String)> = metadata.unwrap_or_default().into_iter().collect();
    meta.sort();
    let r = py.allow_threads(|| save(&held, &meta, &path));
    drop(held);
    r.py_err(py)
}

fn save(
    tensors: &[(String, Dtype, Vec<u64>, HeldBuffer)],
    metadata: &[(String, String)],
    path: &Path,
) -> gpuio::Result<u64> {
    let ctx = |e: Error| e.with_context(format!("saving {}", path.display()));
    let json = gpuio_cuda::safetensors::header_json(
        tensors
            .iter()
            .map(|(n, d, s, h)| (n.as_str(), *d, s.as_slice(), h.len() as u64)),
        metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let body: u64 = tensors.iter().map(|t| t.3.len() as u64).sum();
    let total = 8 + json.len() as u64 + body;
    // Validate what we are about to write with the strict parser the loaders use.
    gpuio_cuda::safetensors::parse_header(&json, total, path).map_err(ctx)?;
    let replace = ReplaceFile::create(path).map_err(ctx)?;
    let file = replace.open(DirectMode::Auto).map_err(ctx)?;
    let q = default_queue()?;
    // The image in pieces: header, then the tensors' bytes, each piece one engine store.
    let mut pieces: Vec<&[u8]> = Vec::new();
    let prefix = (json.len() as u64).to_le_bytes();
    let mut head = prefix.to_vec();
    head.extend_from_slice(&json);
    pieces.push(&head);
    for t in tensors {
        pieces.push(t.3.as_slice());
    }
    let mut at = 0u64;
    let mut inflight = std::collections::VecDeque::new();
    let mut result = Ok(());
    for p in pieces {
        for chunk in p.chunks(crate::file::PIECE_BYTES) {
            if inflight.len() >= crate::file::PIECES_IN_FLIGHT {
                let c: gpuio::Completion = inflight.pop_front().expect("non-empty");
                if let Some(e) = c.wait().first_error() {
                    result = Err(e);
                }
            }
            if result.is_err() {
                break;
            }
            let mut buf = AlignedBuf::new(chunk.len(), ALIGN)?;
            buf.copy_from_slice(chunk);
            let mut cb = q.command_buffer();
            cb.store(&file, at, buf)?;
            inflight.push_back(cb.commit()?);
            at += chunk.len() as u64;
        }
    }
    for c in inflight {
        if let Some(e) = c.wait().first_error() {
            result = Err(e);
        }
    }
    result.map_err(ctx)?;
    let mut cb = q.command_buffer();
    cb.sync(&file)?;
    cb.commit()?.finish().map_err(ctx)?;
    drop(file);
    replace.commit().map_err(ctx)?;
    Ok(total)
}
