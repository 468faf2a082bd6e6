//! `gpuio.stream`: the N-buffered read → compute → write pipeline (`gpuio::Pipeline`, the engine of
//! `gpuio stream` / `gpuio cp`, crates/gpuio-cli/src/stream.rs) with a Python function as the compute
//! stage.
//!
//! The function receives a numpy uint8 array viewing the slot's memory (no copy) and may change it in
//! place; the changed bytes are what is written. The slots come from a buffer pool made for the run
//! and owned by every view handed out, so a view kept past its call stays valid memory (it then shows
//! whatever later chunks put in that slot — keep a `.copy()` instead). The pipeline runs without the
//! GIL; the GIL is taken only to call the function.

use std::path::PathBuf;

use gpuio::pipeline::{FileSink, FileSource, Source};
use gpuio::{BufferPool, Error, ErrorKind, Pipeline, Wait};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffer::{to_numpy, Memory, Owner};
use crate::{default_queue, engine, to_py_err};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(stream, m)?)?;
    Ok(())
}

/// Streams `input` (a file, or "PACK:ENTRY" for a pack entry, decompressed) through `fn` into
/// `output`: while the disk fills one slot, `fn` works on another and a third drains to `output`.
///
/// `fn(view)` is called once per chunk, in order, with a numpy uint8 array of the chunk (at most
/// `chunk_size` bytes); changes it makes in place are written. `output` (optional) is replaced
/// crash-safely (a temporary file beside it, fsynced and renamed over it). `slots`: 1..64 buffers
/// (1 runs the stages one after another). Returns the run's statistics: bytes_in, bytes_out, chunks,
/// wall_s, bytes_per_sec, overlap_efficiency, slot_waits, and per stage busy_s / idle_s / ops.
/// An exception raised by `fn` stops the stream (the output keeps its old contents) and is re-raised.
#[pyfunction]
#[pyo3(signature = (input, output = None, r#fn = None, *, slots = 3, chunk_size = 4 << 20, direct = "auto"))]
fn stream<'py>(
    py: Python<'py>,
    input: PathBuf,
    output: Option<PathBuf>,
    r#fn: Option<PyObject>,
    slots: usize,
    chunk_size: usize,
    direct: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let direct = crate::file::parse_direct(direct)?;
    if !(1..=gpuio::pipeline::SLOTS_MAX).contains(&slots) {
        return Err(PyValueError::new_err(format!(
            "slots={slots} is out of range 1..={}",
            gpuio::pipeline::SLOTS_MAX
        )));
    }
    if !(1..=gpuio::pipeline::CHUNK_SIZE_MAX).contains(&chunk_size) {
        return Err(PyValueError::new_err(format!(
            "chunk_size={chunk_size} is out of range 1..={}",
            gpuio::pipeline::CHUNK_SIZE_MAX
        )));
    }
    let mut raised: Option<PyErr> = None;
    let result = py.allow_threads(|| -> gpuio::Result<gpuio::PipelineStats> {
        let engine = engine()?;
        let queue = default_queue()?;
        let pool = BufferPool::new(
            &engine.config().memory_budget,
            chunk_size,
            slots,
            4096,
            Wait::No,
        )?;
        let as_str = input.to_string_lossy();
        let source: Box<dyn Source> = match gpuio_pack::split_pack_path(&as_str) {
            Some((pack, entry)) => {
                let pack = gpuio_pack::Pack::open(&pack)?;
                Box::new(gpuio_pack::EntrySource::new(pack.entry(&entry)?, &queue))
            }
            None => Box::new(FileSource::open(&queue, &input, direct)?),
        };
        let mut pipe = Pipeline::new(&engine, source)
            .slots(slots)
            .chunk_size(chunk_size)
            .pool(pool.clone());
        if let Some(out) = &output {
            let _ = gpuio::replace::remove_stale_temps(out);
            pipe = pipe.sink(FileSink::replace(&queue, out, direct)?);
        }
        let stats = pipe.run(|slot| {
            let Some(f) = &r#fn else {
                return Ok(());
            };
            let ptr = slot.bytes_mut().as_mut_ptr();
            let len = slot.len();
            Python::with_gil(|py| {
                // The pool owns the slot memory; the view holds the pool (see the module docs).
                let mem = Memory::new(ptr, len, false, Owner::Pool(pool.clone()));
                let r = to_numpy(py, mem).and_then(|view| f.bind(py).call1((view,)));
                match r {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let msg = format!("the stream's function raised {e}");
                        raised = Some(e);
                        Err(Error::new(ErrorKind::InvalidInput, msg))
                    }
                }
            })
        })?;
        Ok(stats)
    });
    if let Some(e) = raised {
        return Err(e);
    }
    let s = result.map_err(|e| to_py_err(py, &e))?;
    let d = PyDict::new(py);
    d.set_item("bytes_in", s.bytes_in)?;
    d.set_item("bytes_out", s.bytes_out)?;
    d.set_item("chunks", s.chunks)?;
    d.set_item("slots", s.slots)?;
    d.set_item("chunk_size", s.chunk_size)?;
    d.set_item("wall_s", s.wall.as_secs_f64())?;
    d.set_item("bytes_per_sec", s.bytes_per_sec())?;
    d.set_item("overlap_efficiency", s.overlap_efficiency())?;
    d.set_item("slot_waits", s.slot_waits)?;
    let stages = PyDict::new(py);
    for (name, st) in s.stages() {
        let sd = PyDict::new(py);
        sd.set_item("busy_s", st.busy.as_secs_f64())?;
        sd.set_item("idle_s", st.idle.as_secs_f64())?;
        sd.set_item("ops", st.ops)?;
        stages.set_item(name, sd)?;
    }
    d.set_item("stages", stages)?;
    Ok(d)
}
