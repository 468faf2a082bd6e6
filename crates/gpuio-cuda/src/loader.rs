//! The staged load path: storage → staging buffers → device, and the safetensors loader built on it.
//!
//! A [`Loader`] owns a few staging buffers taken from [`Engine::buffer_pool`] (so they are charged to
//! the engine's memory budget and registered with io_uring where the kernel allows) and page-locked
//! with the device ([`Device::pin_host`]). A range of a file is cut into staging-sized chunks whose
//! file offsets are aligned to the OS page, so the engine reads them direct; each chunk is read
//! through the engine (which splits it into tasks and keeps the disk busy), then copied to its device
//! offset on the loader's [`CopyStream`]. With `n ≥ 2` staging buffers the disk reads of chunks
//! `k+1 … k+n-1` run while chunk `k` is being copied; a staging buffer is read into again only after
//! the copy that reads it has finished (its [`Ticket`]). With one buffer the path is strictly serial
//! (the baseline the GPU benchmark compares against).
//!
//! On any error — a read fault, a failed copy, the device out of memory — the loader waits for the
//! copies and reads it started, gives every staging buffer back and frees the device allocation
//! before returning the error, so nothing is left allocated or pinned beyond the loader's own staging.
//!
//! A safetensors file is validated in full (header, dtypes, shapes, offsets, file length) before the
//! one device allocation that holds its whole body is made.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::{
    BufferPool, CommandId, Completion, Engine, Error, File, IoBuffer, IoQueue, QueueDesc, Result,
};

use crate::device::{CopyStream, Device, DeviceBuffer, DevicePtr, Ticket};
use crate::safetensors::{self, Dtype, Header};

/// Default bytes per staging buffer.
pub const STAGING_BYTES_DEFAULT: usize = 16 << 20;
/// Default number of staging buffers (three: one being read, one being copied, one spare so a slow
/// read or copy does not stall the other; finding 232).
pub const STAGING_BUFFERS_DEFAULT: usize = 3;
/// Most staging buffers a loader may have.
pub const STAGING_BUFFERS_MAX: usize = 16;
/// Smallest and largest staging buffer.
pub const STAGING_BYTES_MIN: usize = 64 << 10;
pub const STAGING_BYTES_MAX: usize = 256 << 20;
/// File offsets of chunks are aligned to this (the OS page), so the engine can read them direct.
const CHUNK_ALIGN: u64 = 4096;

/// How to build a [`Loader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Staging buffers (1 = no overlap of reads and copies; 2 = double buffering; ...).
    pub staging_buffers: usize,
    /// Bytes per staging buffer (a multiple of 4096).
    pub staging_bytes: usize,
    /// Record when each chunk's read was issued and finished (for tests and benchmarks).
    pub timeline: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            staging_buffers: STAGING_BUFFERS_DEFAULT,
            staging_bytes: STAGING_BYTES_DEFAULT,
            timeline: false,
        }
    }
}

impl LoaderConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=STAGING_BUFFERS_MAX).contains(&self.staging_buffers) {
            return Err(Error::invalid(format!(
                "staging buffer count {} is out of range 1..={STAGING_BUFFERS_MAX}",
                self.staging_buffers
            )));
        }
        let b = self.staging_bytes;
        if !(STAGING_BYTES_MIN..=STAGING_BYTES_MAX).contains(&b) || b % CHUNK_ALIGN as usize != 0 {
            return Err(Error::invalid(format!(
                "staging buffer size {b} must be a multiple of 4096 in {STAGING_BYTES_MIN}..={STAGING_BYTES_MAX}"
            )));
        }
        Ok(())
    }
}

/// Which path bytes took to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    /// Storage → pinned staging → device copies on a copy stream.
    Staged,
}

impl LoadPath {
    pub fn name(self) -> &'static str {
        match self {
            LoadPath::Staged => "staged",
        }
    }
}

/// One chunk's read, when timing is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkTiming {
    pub chunk: usize,
    /// Device offset the chunk went to.
    pub dst_offset: u64,
    pub read_issued: Instant,
    pub read_done: Instant,
    /// The copy stream's ticket for the chunk's copy.
    pub ticket: Ticket,
}

/// What a staged transfer did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadStats {
    pub bytes: u64,
    pub seconds: f64,
    pub path: LoadPath,
    pub chunks: usize,
    pub staging_buffers: usize,
    pub staging_bytes: usize,
    /// Time spent blocked waiting for reads, and for copies to free a staging buffer.
    pub read_wait: Duration,
    pub copy_wait: Duration,
    /// Per chunk, when [`LoaderConfig::timeline`] is on.
    pub timeline: Vec<ChunkTiming>,
}

impl LoadStats {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9)
    }
}

/// A tensor on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Offset in the model's device buffer.
    pub offset: u64,
    pub bytes: u64,
    /// Device address of the first byte (for frameworks: DLPack, `torch.cuda` pointers, CuPy).
    pub device_ptr: DevicePtr,
}

/// A safetensors file loaded onto a device: one allocation holding the body, and the tensor table.
#[derive(Debug)]
pub struct LoadedModel {
    pub buffer: DeviceBuffer,
    pub tensors: Vec<DeviceTensor>,
    pub metadata: Vec<(String, String)>,
    pub stats: LoadStats,
}

/// Largest host buffer used to read device memory back.
const READBACK_CHUNK: usize = 16 << 20;

impl LoadedModel {
    /// CRC-32C of a tensor's bytes as they are in device memory (read back in bounded chunks).
    pub fn crc32c(&self, tensor: &DeviceTensor) -> Result<u32> {
        self.checksum(tensor, crc_fast::CrcAlgorithm::Crc32Iscsi)
    }

    /// CRC-32 (IEEE, zlib's `crc32`) of a tensor's bytes as they are in device memory, so tools with
    /// only zlib at hand (the GPU benchmark's Python) can check a load.
    pub fn crc32_ieee(&self, tensor: &DeviceTensor) -> Result<u32> {
        self.checksum(tensor, crc_fast::CrcAlgorithm::Crc32IsoHdlc)
    }

    fn checksum(&self, tensor: &DeviceTensor, algorithm: crc_fast::CrcAlgorithm) -> Result<u32> {
        let mut digest = crc_fast::Digest::new(algorithm);
        let mut buf = vec![0u8; (tensor.bytes as usize).min(READBACK_CHUNK)];
        let mut off = 0u64;
        while off < tensor.bytes {
            let n = ((tensor.bytes - off) as usize).min(buf.len());
            self.buffer
                .read((tensor.offset + off) as usize, &mut buf[..n])?;
            digest.update(&buf[..n]);
            off += n as u64;
        }
        Ok(digest.finalize() as u32)
    }
}

/// Moves file ranges to a device through pinned staging buffers.
pub struct Loader {
    pub(crate) device: Arc<dyn Device>,
    pub(crate) queue: IoQueue,
    pub(crate) pool: BufferPool,
    pub(crate) stream: parking_lot::Mutex<Box<dyn CopyStream>>,
    /// Staging buffers that were page-locked (address, length, device address where mapped),
    /// unpinned on drop.
    pinned: Vec<(usize, usize, Option<DevicePtr>)>,
    pin_note: String,
    pub(crate) cfg: LoaderConfig,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("device", &self.device.label())
            .field("cfg", &self.cfg)
            .field("pin_note", &self.pin_note)
            .finish()
    }
}

impl Loader {
    /// A loader onto `device` reading through `engine`. Its staging buffers are a pool of `engine`
    /// (charged to the engine's memory budget; a pool registered with io_uring lives as long as the
    /// engine, so make one loader per engine and reuse it).
    pub fn new(engine: &Engine, device: Arc<dyn Device>, cfg: LoaderConfig) -> Result<Loader> {
        cfg.validate()?;
        let queue = engine.queue(QueueDesc::default())?;
        let pool = engine.buffer_pool(cfg.staging_bytes, cfg.staging_buffers)?;
        let stream = device.copy_stream()?;
        let mut loader = Loader {
            device,
            queue,
            pool,
            stream: parking_lot::Mutex::new(stream),
            pinned: Vec::new(),
            pin_note: String::new(),
            cfg,
        };
        // Page-lock every staging buffer once: take them all out, pin, give them back.
        let mut bufs = Vec::with_capacity(cfg.staging_buffers);
        for _ in 0..cfg.staging_buffers {
            bufs.push(loader.pool.try_get()?);
        }
        let mut refused = None;
        for b in &mut bufs {
            let (ptr, len) = (b.as_mut_ptr(), b.capacity());
            // SAFETY: pool buffers never move or get freed while the pool lives; the loader holds
            // the pool and unpins in Drop.
            match unsafe { loader.device.pin_host(ptr, len) } {
                Ok(Some(p)) => loader.pinned.push((ptr as usize, len, p.mapped)),
                Ok(None) => {}
                Err(e) => refused = Some(e),
            }
        }
        loader.pin_note = match refused {
            None => format!(
                "{} staging buffers of {} bytes page-locked",
                loader.pinned.len(),
                cfg.staging_bytes
            ),
            Some(e) => format!(
                "staging buffers not all page-locked ({} of {}): {e}; copies from the others are staged by the driver",
                loader.pinned.len(),
                cfg.staging_buffers
            ),
        };
        Ok(loader)
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }
    /// Whether (and how many) staging buffers are page-locked, and why not.
    pub fn pin_note(&self) -> &str {
        &self.pin_note
    }
    /// The staging pool (its `available()` is the number of staging buffers not in use).
    pub fn staging_pool(&self) -> &BufferPool {
        &self.pool
    }

    /// Validates the safetensors file at `path`, allocates one device buffer for its body and loads
    /// it; returns the tensor table with device pointers.
    pub fn load_safetensors(&self, path: &Path) -> Result<LoadedModel> {
        let header = safetensors::read_header(path)?;
        self.load_with_header(path, &header)
    }

    /// Like [`load_safetensors`](Self::load_safetensors) with a header already read and validated.
    pub fn load_with_header(&self, path: &Path, header: &Header) -> Result<LoadedModel> {
        let file = File::open(path)?;
        let len = file.len()?;
        if len != header.body_offset + header.body_len {
            return Err(Error::new(
                gpuio::ErrorKind::Corrupt,
                format!(
                    "safetensors: file changed since its header was read ({len} bytes, expected {})",
                    header.body_offset + header.body_len
                ),
            )
            .with_path(path));
        }
        let body_len = usize::try_from(header.body_len).map_err(|_| {
            Error::invalid(format!("body of {} bytes is too large", header.body_len))
        })?;
        let buffer = DeviceBuffer::alloc(&self.device, body_len)
            .map_err(|e| e.with_context(format!("loading {}", path.display())))?;
        let stats = self.load_range(&file, header.body_offset, &buffer, 0, header.body_len)?;
        let base = buffer.ptr();
        let tensors = header
            .tensors
            .iter()
            .map(|t| DeviceTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                offset: t.begin,
                bytes: t.len(),
                device_ptr: if t.is_empty() { base } else { base + t.begin },
            })
            .collect();
        Ok(LoadedModel {
            buffer,
            tensors,
            metadata: header.metadata.clone(),
            stats,
        })
    }

    /// Copies `len` bytes of `file` from `offset` to `dst` at `dst_offset`, staged. On error nothing
    /// is left in flight and every staging buffer is back in the pool.
    pub fn load_range(
        &self,
        file: &File,
        offset: u64,
        dst: &DeviceBuffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<LoadStats> {
        let fits = dst_offset
            .checked_add(len)
            .is_some_and(|e| e <= dst.len() as u64);
        if !fits || offset.checked_add(len).is_none() {
            return Err(Error::invalid(format!(
                "{len} bytes at device offset {dst_offset} do not fit a buffer of {} bytes",
                dst.len()
            )));
        }
        let mut stream = self.stream.lock();
        if len == 0 {
            return Ok(LoadStats {
                bytes: 0,
                seconds: 0.0,
                path: LoadPath::Staged,
                chunks: 0,
                staging_buffers: self.cfg.staging_buffers,
                staging_bytes: self.cfg.staging_bytes,
                read_wait: Duration::ZERO,
                copy_wait: Duration::ZERO,
                timeline: Vec::new(),
            });
        }
        let mut run = Run::new(self, file, offset, len, dst.ptr() + dst_offset);
        let started = Instant::now();
        let result = run.drive(&mut **stream);
        // Whatever happened, nothing may still read a staging buffer or write the device.
        let synced = stream.synchronize();
        run.drain_reads();
        result?;
        synced?;
        Ok(LoadStats {
            bytes: len,
            seconds: started.elapsed().as_secs_f64(),
            path: LoadPath::Staged,
            chunks: run.chunks,
            staging_buffers: self.cfg.staging_buffers,
            staging_bytes: self.cfg.staging_bytes,
            read_wait: run.read_wait,
            copy_wait: run.copy_wait,
            timeline: run.timeline,
        })
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // No copy is pending: every load synchronizes its stream before returning.
        for &(ptr, len, _) in &self.pinned {
            // SAFETY: pinned in new with this device; the pool still holds the memory.
            unsafe { self.device.unpin_host(ptr as *mut u8, len) };
        }
    }
}

/// A chunk being read: its completion, and where its bytes go.
struct Reading {
    chunk: usize,
    completion: Completion,
    id: CommandId,
    /// Bytes at the start of the staging buffer that precede the wanted range (alignment).
    skip: usize,
    /// Bytes wanted.
    len: usize,
    dst: DevicePtr,
    dst_offset: u64,
    issued: Instant,
}

/// One staged transfer in progress.
struct Run<'a> {
    loader: &'a Loader,
    file: &'a File,
    /// File range wanted.
    start: u64,
    end: u64,
    /// Device address of `start`.
    dst: DevicePtr,
    /// Next file offset to read from (aligned down at the first chunk).
    next: u64,
    reads: VecDeque<Reading>,
    /// Copies queued and the staging buffer each reads.
    copies: VecDeque<(Ticket, IoBuffer)>,
    chunks: usize,
    read_wait: Duration,
    copy_wait: Duration,
    timeline: Vec<ChunkTiming>,
}

impl<'a> Run<'a> {
    fn new(loader: &'a Loader, file: &'a File, offset: u64, len: u64, dst: DevicePtr) -> Run<'a> {
        Run {
            loader,
            file,
            start: offset,
            end: offset + len,
            dst,
            next: offset - offset % CHUNK_ALIGN,
            reads: VecDeque::new(),
            copies: VecDeque::new(),
            chunks: 0,
            read_wait: Duration::ZERO,
            copy_wait: Duration::ZERO,
            timeline: Vec::new(),
        }
    }

    fn more_to_read(&self) -> bool {
        self.next < self.end
    }

    /// The state machine: keep every staging buffer busy, copies in chunk order.
    fn drive(&mut self, stream: &mut dyn CopyStream) -> Result<()> {
        loop {
            // Hand finished reads to the copy engine as soon as they are in (in chunk order).
            while self
                .reads
                .front()
                .is_some_and(|r| r.completion.status().is_complete())
            {
                self.copy_front(stream)?;
            }
            if self.more_to_read() {
                if let Some(buf) = self.free_buffer(stream)? {
                    self.issue_read(buf)?;
                    continue;
                }
            }
            if !self.reads.is_empty() {
                self.copy_front(stream)?; // blocks on the oldest read
                continue;
            }
            if self.more_to_read() {
                // Every buffer is under a copy: wait for the oldest.
                let (ticket, buf) = self.copies.pop_front().expect("a buffer is somewhere");
                let t = Instant::now();
                stream.wait(ticket)?;
                self.copy_wait += t.elapsed();
                drop(buf);
                continue;
            }
            return Ok(());
        }
    }

    /// A staging buffer not in use: from the pool, or one whose copy has finished.
    fn free_buffer(&mut self, stream: &mut dyn CopyStream) -> Result<Option<IoBuffer>> {
        if let Ok(b) = self.loader.pool.try_get() {
            return Ok(Some(b.into()));
        }
        if let Some(&(ticket, _)) = self.copies.front() {
            if stream.is_done(ticket)? {
                return Ok(self.copies.pop_front().map(|(_, b)| b));
            }
        }
        Ok(None)
    }

    fn issue_read(&mut self, mut buf: IoBuffer) -> Result<()> {
        let cap = self.loader.cfg.staging_bytes as u64;
        let chunk_start = self.next;
        let chunk_end = (chunk_start + cap).min(self.end);
        let read_from = chunk_start.max(self.start);
        let skip = (read_from - chunk_start) as usize;
        let read_len = (chunk_end - chunk_start) as usize;
        if let IoBuffer::Pooled(p) = &mut buf {
            p.set_len(read_len)?;
        }
        let mut cb = self.loader.queue.command_buffer();
        // Read the aligned chunk from its aligned start; the bytes before `start` are skipped.
        let id = cb.load(self.file, chunk_start, buf)?;
        let completion = cb.commit()?;
        let dst_offset = read_from - self.start;
        self.reads.push_back(Reading {
            chunk: self.chunks,
            completion,
            id,
            skip,
            len: read_len - skip,
            dst: self.dst + dst_offset,
            dst_offset,
            issued: Instant::now(),
        });
        self.chunks += 1;
        self.next = chunk_end;
        Ok(())
    }

    /// Waits for the oldest read and queues its copy.
    fn copy_front(&mut self, stream: &mut dyn CopyStream) -> Result<()> {
        let r = self.reads.pop_front().expect("caller checked");
        let t = Instant::now();
        let (status, mut done) = r.completion.wait_parts();
        self.read_wait += t.elapsed();
        let read_done = Instant::now();
        let buf = done.take_buffer(r.id);
        if let Some(e) = status.first_error() {
            return Err(e.with_context(format!(
                "reading chunk {} for device offset {}",
                r.chunk, r.dst_offset
            )));
        }
        let buf = buf.ok_or_else(|| Error::invalid("the engine kept a staging buffer"))?;
        // SAFETY: `buf` is kept in `self.copies` until the ticket is done (or the stream is
        // synchronized in load_range before the run is dropped); the destination is inside `dst`,
        // checked in load_range.
        let ticket = unsafe { stream.copy_h2d_async(buf.as_ptr().add(r.skip), r.len, r.dst) };
        let ticket = match ticket {
            Ok(t) => t,
            Err(e) => {
                return Err(e.with_context(format!(
                    "copying chunk {} to device offset {}",
                    r.chunk, r.dst_offset
                )))
            }
        };
        if self.loader.cfg.timeline {
            self.timeline.push(ChunkTiming {
                chunk: r.chunk,
                dst_offset: r.dst_offset,
                read_issued: r.issued,
                read_done,
                ticket,
            });
        }
        self.copies.push_back((ticket, buf));
        Ok(())
    }

    /// After an error: waits for reads still in flight so their staging buffers go back to the pool
    /// before the caller looks.
    fn drain_reads(&mut self) {
        for r in self.reads.drain(..) {
            let _ = r.completion.wait_parts();
        }
        self.copies.clear();
    }
}
