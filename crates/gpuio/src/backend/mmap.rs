//! The mmap engine: reads are copies out of a shared read-only mapping of the file, faulted in by worker
//! threads (so page faults overlap the way queued I/O does), with `madvise` advice applied to each mapping
//! (finding 226) and optional `MAP_POPULATE`.
//!
//! Writes go through `pwrite` on the file's buffered descriptor: a store through a mapping cannot extend
//! a file, and it would fault every destination page in from disk only to overwrite it. Mappings are made
//! on first use and remade when the file has grown. If another process truncates a mapped file, reading
//! the lost pages raises SIGBUS; the other engines do not have that hazard, which is why mmap is never
//! chosen automatically.

use std::collections::HashMap;
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use parking_lot::Mutex;

use super::threads::{Executor, SyscallExecutor, WorkerPool};
use super::{BackendConfig, BackendKind, IoOp, IoRequest, MmapAdvice};
use crate::error::Result;

struct Mapper {
    advice: MmapAdvice,
    populate: bool,
    /// Mappings by file id. Each holds the file's length when it was made.
    maps: Mutex<HashMap<u64, Arc<Mmap>>>,
}

/// Most files kept mapped at once; older mappings are dropped (unmapped) past this.
const MAPPINGS_MAX: usize = 256;

impl Mapper {
    fn mapping(&self, req: &IoRequest) -> std::result::Result<Arc<Mmap>, i64> {
        let want_end = req.offset.saturating_add(req.len as u64);
        if let Some(m) = self.maps.lock().get(&req.file.id()) {
            if m.len() as u64 >= want_end {
                return Ok(m.clone());
            }
        }
        // Not mapped, or the request reaches past the mapping: map the file's current length.
        let len = req
            .file
            .len()
            .map_err(|e| -(e.errno().unwrap_or(libc::EIO) as i64))?;
        if len == 0 {
            return Err(0);
        }
        let mut opts = MmapOptions::new();
        opts.len(len as usize);
        if self.populate {
            opts.populate();
        }
        // SAFETY: a read-only shared mapping; concurrent truncation by another process can raise SIGBUS,
        // as documented at the top of this module.
        let map = unsafe { opts.map(req.file.buffered_fd()) }
            .map_err(|e| -(e.raw_os_error().unwrap_or(libc::EIO) as i64))?;
        let advice = match self.advice {
            MmapAdvice::Normal => memmap2::Advice::Normal,
            MmapAdvice::Sequential => memmap2::Advice::Sequential,
            MmapAdvice::Random => memmap2::Advice::Random,
            MmapAdvice::WillNeed => memmap2::Advice::WillNeed,
        };
        // Advice is a hint: a refusal changes speed, not results.
        let _ = map.advise(advice);
        let map = Arc::new(map);
        let mut maps = self.maps.lock();
        if maps.len() >= MAPPINGS_MAX {
            maps.clear();
        }
        maps.insert(req.file.id(), map.clone());
        Ok(map)
    }
}

impl Executor for Mapper {
    fn execute(&self, req: &IoRequest) -> i64 {
        match req.op {
            IoOp::Write | IoOp::Sync => SyscallExecutor.execute(req),
            IoOp::Read => {
                let map = match self.mapping(req) {
                    Ok(m) => m,
                    Err(r) => return r,
                };
                let start = req.offset.min(map.len() as u64) as usize;
                let n = req.len.min(map.len() - start);
                // SAFETY: the Backend::push contract keeps ptr..ptr+len valid and exclusive; n <= len and
                // start+n <= map.len().
                unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(start), req.ptr, n) };
                n as i64
            }
        }
    }
}

/// The mmap engine: a worker pool whose workers copy out of mappings.
pub fn new(config: &BackendConfig) -> Result<WorkerPool> {
    config.validate()?;
    let mapper = Arc::new(Mapper {
        advice: config.mmap_advice,
        populate: config.mmap_populate,
        maps: Mutex::new(HashMap::new()),
    });
    let note = format!(
        "reads copy from a shared mapping (madvise {:?}{}); writes use pwrite on the buffered \
         descriptor; direct I/O does not apply to mappings",
        config.mmap_advice,
        if config.mmap_populate {
            ", MAP_POPULATE"
        } else {
            ""
        }
    );
    WorkerPool::new(BackendKind::Mmap, config.queue_depth, mapper, vec![note])
}
