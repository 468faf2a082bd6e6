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
//! A chunk is either read from a file or loaded from a pack entry (`gpuio-pack` reads the chunks it
//! touches and decompresses them on the CPU straight into the staging buffer, which is why staging
//! buffers are pinned but not write-combined), then copied the same way.
//!
//! Copies of chunks no larger than [`LoaderConfig::pio_max_bytes`] are done by the device's own
//! threads reading the mapped staging buffer in place (programmed I/O: no copy-engine DMA to set up),
//! where the device supports it; larger ones, and all of them where it does not, are DMAs. The
//! threshold is off by default until it has been measured on a GPU (`gpuio bench --target cuda:N
//! --pio-sweep`).
//!
//! A safetensors file is validated in full (header, dtypes, shapes, offsets, file length) before the
//! one device allocation that holds its whole body is made.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::{
    BufferPool, CommandId, Completion, Engine, Error, ErrorKind, File, IoBuffer, IoQueue,
    QueueDesc, Result,
};
use gpuio_pack::{Entry, PackLoad};

use crate::device::{CopyStream, Device, DeviceBuffer, DevicePtr, DirectRead, Ticket};
use crate::direct::{load_range_direct, DirectConfig};
use crate::limits::{check_chunk_size, check_count};
use crate::safetensors::{self, Dtype, Header};

/// Default bytes per staging buffer.
pub const STAGING_BYTES_DEFAULT: usize = 16 << 20;
/// Default number of staging buffers: at least three (one being read, one being copied, one spare so
/// a slow read or copy does not stall the other; finding 232), and four as measured: on an H200
/// loading from /dev/shm the transfer ran at 48.9 and 52.4 GB/s with four against 42–47 with three, in
/// two runs (docs/gpu-runs/2026-11-28-h200-issue12-run{1,2}/); eight gained nothing more.
pub const STAGING_BUFFERS_DEFAULT: usize = 4;
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
    /// Copy chunks of at most this many bytes with programmed I/O (device threads reading the mapped
    /// staging buffer) instead of a DMA; 0 = always DMA.
    pub pio_max_bytes: usize,
    /// Which path file loads take.
    pub path: PathChoice,
    /// Threads and chunk size of the direct path.
    pub direct: DirectConfig,
}

/// Which path [`Loader::load_range`] takes for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathChoice {
    /// Direct (storage → device, no host copy) when the device has a reader that truly bypasses host
    /// memory and the file is open `O_DIRECT`; staged otherwise, or when the direct reader refuses the
    /// file as unsupported. [`LoadStats::note`] says why the direct path was not taken.
    #[default]
    Auto,
    /// Always staged through pinned host buffers.
    Staged,
    /// Always direct; an error (saying why) where it is not available.
    Direct,
}

/// Default [`LoaderConfig::pio_max_bytes`]: off. Measured on an H200 (`gpuio bench --target cuda:0
/// --pio-sweep`, docs/gpu-runs/2026-11-28-h200-issue12-run1/): a DMA beat the copy kernel at every size
/// from 64 B (6.5 against 10.3 µs) to 1 MiB. Measure again on other machines before turning it on.
pub const PIO_MAX_BYTES_DEFAULT: usize = 0;

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            staging_buffers: STAGING_BUFFERS_DEFAULT,
            staging_bytes: STAGING_BYTES_DEFAULT,
            timeline: false,
            pio_max_bytes: PIO_MAX_BYTES_DEFAULT,
            path: PathChoice::Auto,
            direct: DirectConfig::default(),
        }
    }
}

impl LoaderConfig {
    pub fn validate(&self) -> Result<()> {
        check_count(
            "staging buffer count",
            self.staging_buffers,
            STAGING_BUFFERS_MAX,
        )?;
        check_chunk_size(
            "staging buffer size",
            self.staging_bytes,
            STAGING_BYTES_MIN,
            STAGING_BYTES_MAX,
        )?;
        self.direct.validate()
    }
}

/// Which path bytes took to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    /// Storage → pinned staging → device copies on a copy stream.
    Staged,
    /// Pack entry → chunks decompressed on the CPU into pinned staging → device copies.
    StagedPack,
    /// Storage → device memory with no host staging (GPUDirect Storage through cuFile).
    Direct,
    /// No copy: the file's pages are mapped read-only into the device's address space.
    ZeroCopy,
}

impl LoadPath {
    pub fn name(self) -> &'static str {
        match self {
            LoadPath::Staged => "staged",
            LoadPath::StagedPack => "staged-pack",
            LoadPath::Direct => "direct",
            LoadPath::ZeroCopy => "zero-copy",
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
    /// Copies done as DMAs and as programmed I/O (see [`LoaderConfig::pio_max_bytes`]).
    pub dma_copies: usize,
    pub pio_copies: usize,
    /// Why this path and not a faster one, or why programmed I/O was not used ("" when nothing to say).
    pub note: String,
    /// How the source was read: `O_DIRECT`, `buffered (why)`, or "" where no file was read.
    pub read_mode: String,
    /// Per chunk, when [`LoaderConfig::timeline`] is on.
    pub timeline: Vec<ChunkTiming>,
    /// Reading and validating the safetensors header (zero where the caller passed one in).
    pub header: Duration,
    /// Opening the file and checking its length against the header (zero for a bare range).
    pub open: Duration,
    /// Allocating the device memory the body goes to (zero for a bare range).
    pub device_alloc: Duration,
}

impl LoadStats {
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9)
    }

    /// Puts `why` before the note there is.
    pub(crate) fn add_note(&mut self, why: String) {
        self.note = if self.note.is_empty() {
            why
        } else {
            format!("{why}; {}", self.note)
        };
    }

    /// Stats of a transfer of nothing.
    pub(crate) fn empty(path: LoadPath, cfg: &LoaderConfig) -> LoadStats {
        LoadStats {
            bytes: 0,
            seconds: 0.0,
            path,
            chunks: 0,
            staging_buffers: cfg.staging_buffers,
            staging_bytes: cfg.staging_bytes,
            read_wait: Duration::ZERO,
            copy_wait: Duration::ZERO,
            dma_copies: 0,
            pio_copies: 0,
            note: String::new(),
            read_mode: String::new(),
            timeline: Vec::new(),
            header: Duration::ZERO,
            open: Duration::ZERO,
            device_alloc: Duration::ZERO,
        }
    }
}

/// Where [`Loader::new`]'s time went, step by step (the steps run one after another, in this order).
/// On a GPU the staging steps are the set-up a load waits for before its first byte moves: allocating
/// and pre-faulting the buffers, registering them with io_uring (which pins every page), and
/// page-locking them with the device (`cuMemHostRegister`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SetupTimes {
    /// The loader's I/O queue.
    pub queue: Duration,
    /// Allocating (and pre-faulting) the staging buffers.
    pub staging_alloc: Duration,
    /// Registering them with the engine's backend (io_uring fixed buffers, where it allows).
    pub registration: Duration,
    /// Creating the device copy stream.
    pub copy_stream: Duration,
    /// Asking the device for its direct reader (unless the staged path was asked for).
    pub direct_reader: Duration,
    /// Page-locking every staging buffer with the device ([`Device::pin_host`]).
    pub pinning: Duration,
    /// All of [`Loader::new`].
    pub total: Duration,
}

/// How a staged or direct transfer read `file`, for [`LoadStats::read_mode`].
fn read_mode(file: &File) -> String {
    match file.direct_reason() {
        _ if file.is_direct() => "O_DIRECT".to_string(),
        why if why.starts_with("buffered") => why.to_string(),
        why => format!("buffered ({why})"),
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
    /// The header JSON of the file it came from (a save of the unchanged model writes it back).
    pub(crate) header_json: Vec<u8>,
}

/// Largest host buffer used to read device memory back.
const READBACK_CHUNK: usize = 16 << 20;

/// The tensor table of `header` for a body whose first byte is at device address `body`.
pub(crate) fn device_tensors(header: &Header, body: DevicePtr) -> Vec<DeviceTensor> {
    header
        .tensors
        .iter()
        .map(|t| DeviceTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            offset: t.begin,
            bytes: t.len(),
            device_ptr: body + t.begin,
        })
        .collect()
}

/// Reads and validates the safetensors header at the start of a pack entry. Errors name the pack and
/// entry (`PACK:ENTRY`) as the file.
pub fn read_entry_header(entry: &Entry, queue: &IoQueue) -> Result<Header> {
    let name = std::path::PathBuf::from(format!(
        "{}:{}",
        entry.pack().path().display(),
        entry.name()
    ));
    let len = entry.len();
    let mut prefix = [0u8; 8];
    let got = len.min(8) as usize;
    entry.read_at(queue, 0, &mut prefix[..got])?;
    let n = safetensors::parse_prefix(&prefix[..got], len, &name)?;
    // n is at most the header limit and within the entry (parse_prefix checked both).
    let mut json = vec![0u8; n as usize];
    entry.read_at(queue, 8, &mut json)?;
    safetensors::parse_header(&json, len, &name)
}

impl LoadedModel {
    /// The tensor table of `header` over `buffer`, which holds the body.
    pub(crate) fn new(buffer: DeviceBuffer, header: &Header, stats: LoadStats) -> LoadedModel {
        LoadedModel {
            tensors: device_tensors(header, buffer.ptr()),
            buffer,
            metadata: header.metadata.clone(),
            stats,
            header_json: header.json.clone(),
        }
    }

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
        if tensor
            .offset
            .checked_add(tensor.bytes)
            .is_none_or(|e| e > self.buffer.len() as u64)
        {
            return Err(Error::invalid(format!(
                "tensor '{}' ({} bytes at {}) is outside the model's buffer of {} bytes",
                tensor.name,
                tensor.bytes,
                tensor.offset,
                self.buffer.len()
            )));
        }
        device_checksum(
            self.buffer.device().as_ref(),
            self.buffer.ptr() + tensor.offset,
            tensor.bytes,
            algorithm,
        )
    }
}

/// A checksum of `len` bytes of device memory at `ptr`, read back in bounded chunks.
pub(crate) fn device_checksum(
    device: &dyn Device,
    ptr: DevicePtr,
    len: u64,
    algorithm: crc_fast::CrcAlgorithm,
) -> Result<u32> {
    let mut digest = crc_fast::Digest::new(algorithm);
    let mut buf = vec![0u8; (len as usize).min(READBACK_CHUNK)];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(buf.len());
        // SAFETY: the caller names a range of a live allocation or mapping with no copy pending.
        unsafe { device.copy_d2h(ptr + off, &mut buf[..n])? };
        digest.update(&buf[..n]);
        off += n as u64;
    }
    Ok(digest.finalize() as u32)
}

/// The staging buffers: a pool of the engine's, each page-locked with the device where it allows,
/// unpinned when dropped.
pub(crate) struct Staging {
    pub(crate) pool: BufferPool,
    device: Arc<dyn Device>,
    /// Staging buffers that were page-locked (address, length, device address where mapped).
    pinned: Vec<(usize, usize, Option<DevicePtr>)>,
    note: String,
    alloc: Duration,
    registration: Duration,
    pinning: Duration,
}

impl Staging {
    fn new(engine: &Engine, device: &Arc<dyn Device>, cfg: &LoaderConfig) -> Result<Staging> {
        let (pool, alloc, registration) =
            engine.buffer_pool_timed(cfg.staging_bytes, cfg.staging_buffers)?;
        let mut staging = Staging {
            pool,
            device: device.clone(),
            pinned: Vec::new(),
            note: String::new(),
            alloc,
            registration,
            pinning: Duration::ZERO,
        };
        // Page-lock every staging buffer once: take them all out, pin, give them back.
        let t = Instant::now();
        let mut bufs = Vec::with_capacity(cfg.staging_buffers);
        for _ in 0..cfg.staging_buffers {
            bufs.push(staging.pool.try_get()?);
        }
        let mut refused = None;
        for b in &mut bufs {
            let (ptr, len) = (b.as_mut_ptr(), b.capacity());
            // SAFETY: pool buffers never move or get freed while the pool lives; `staging` holds
            // the pool and unpins in Drop.
            match unsafe { staging.device.pin_host(ptr, len) } {
                Ok(Some(p)) => staging.pinned.push((ptr as usize, len, p.mapped)),
                Ok(None) => {}
                Err(e) => refused = Some(e),
            }
        }
        staging.note = match refused {
            None => format!(
                "{} staging buffers of {} bytes page-locked",
                staging.pinned.len(),
                cfg.staging_bytes
            ),
            Some(e) => format!(
                "staging buffers not all page-locked ({} of {}): {e}; copies from the others are staged by the driver",
                staging.pinned.len(),
                cfg.staging_buffers
            ),
        };
        staging.pinning = t.elapsed();
        Ok(staging)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // No copy is pending: every load and store synchronizes its stream before returning.
        for &(ptr, len, _) in &self.pinned {
            // SAFETY: pinned in `new` with this device; the pool still holds the memory.
            unsafe { self.device.unpin_host(ptr as *mut u8, len) };
        }
    }
}

/// Moves file ranges to a device through pinned staging buffers.
pub struct Loader {
    pub(crate) device: Arc<dyn Device>,
    pub(crate) queue: IoQueue,
    engine: Engine,
    /// Made in [`Loader::new`], except on the direct path, which needs none until a pack entry or a
    /// store asks for them (then made once, by [`Loader::staging`]).
    staging: std::sync::OnceLock<Staging>,
    staging_making: parking_lot::Mutex<()>,
    pub(crate) stream: parking_lot::Mutex<Box<dyn CopyStream>>,
    /// The device's direct reader, or why there is none (asked once, unless the path is `Staged`).
    direct: std::result::Result<Arc<dyn DirectRead>, String>,
    setup: SetupTimes,
    pub(crate) cfg: LoaderConfig,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("device", &self.device.label())
            .field("cfg", &self.cfg)
            .field("pin_note", &self.pin_note())
            .finish()
    }
}

impl Loader {
    /// A loader onto `device` reading through `engine`. Its staging buffers are a pool of `engine`
    /// (charged to the engine's memory budget; a pool registered with io_uring lives as long as the
    /// engine, so make one loader per engine and reuse it).
    pub fn new(engine: &Engine, device: Arc<dyn Device>, cfg: LoaderConfig) -> Result<Loader> {
        cfg.validate()?;
        let begun = Instant::now();
        let mut setup = SetupTimes::default();
        let t = Instant::now();
        let queue = engine.queue(QueueDesc::default())?;
        setup.queue = t.elapsed();
        let staging = std::sync::OnceLock::new();
        if cfg.path != PathChoice::Direct {
            let s = Staging::new(engine, &device, &cfg)?;
            (setup.staging_alloc, setup.registration, setup.pinning) =
                (s.alloc, s.registration, s.pinning);
            let _ = staging.set(s);
        }
        let t = Instant::now();
        let stream = device.copy_stream()?;
        setup.copy_stream = t.elapsed();
        let t = Instant::now();
        let direct = match cfg.path {
            PathChoice::Staged => Err("the staged path was asked for".to_string()),
            PathChoice::Auto => match device.direct_reader_slower() {
                Some(why) => Err(why),
                None => device.direct_reader(),
            },
            PathChoice::Direct => device.direct_reader(),
        };
        setup.direct_reader = t.elapsed();
        setup.total = begun.elapsed();
        Ok(Loader {
            device,
            queue,
            engine: engine.clone(),
            staging,
            staging_making: parking_lot::Mutex::new(()),
            stream: parking_lot::Mutex::new(stream),
            direct,
            setup,
            cfg,
        })
    }

    /// The staging buffers, made now if this is their first use (on the direct path).
    pub(crate) fn staging(&self) -> Result<&Staging> {
        if let Some(s) = self.staging.get() {
            return Ok(s);
        }
        let _making = self.staging_making.lock();
        if let Some(s) = self.staging.get() {
            return Ok(s);
        }
        let s = Staging::new(&self.engine, &self.device, &self.cfg)?;
        Ok(self.staging.get_or_init(|| s))
    }

    /// Where this loader's construction spent its time.
    pub fn setup_times(&self) -> SetupTimes {
        self.setup
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }
    /// Whether (and how many) staging buffers are page-locked, and why not.
    pub fn pin_note(&self) -> &str {
        match self.staging.get() {
            Some(s) => &s.note,
            None => "no staging buffers: the direct path reads without them",
        }
    }
    /// The staging pool (its `available()` is the number of staging buffers not in use), made now
    /// if the loader has none yet (the direct path makes them on first use).
    pub fn staging_pool(&self) -> Result<&BufferPool> {
        Ok(&self.staging()?.pool)
    }
    /// Whether the staging buffers exist (the direct path makes them only when first needed).
    pub fn has_staging(&self) -> bool {
        self.staging.get().is_some()
    }

    /// Validates the safetensors file at `path`, allocates one device buffer for its body and loads
    /// it; returns the tensor table with device pointers.
    pub fn load_safetensors(&self, path: &Path) -> Result<LoadedModel> {
        let t = Instant::now();
        let header = safetensors::read_header(path)?;
        let header_time = t.elapsed();
        let mut m = self.load_with_header(path, &header)?;
        m.stats.header = header_time;
        Ok(m)
    }

    /// Like [`load_safetensors`](Self::load_safetensors) with a header already read and validated.
    pub fn load_with_header(&self, path: &Path, header: &Header) -> Result<LoadedModel> {
        let shard = crate::checkpoint::prepare_shard(&self.device, path, header)?;
        let mut stats = self.load_range(
            &shard.file,
            header.body_offset,
            &shard.buffer,
            0,
            header.body_len,
        )?;
        stats.open = shard.open;
        stats.device_alloc = shard.device_alloc;
        Ok(LoadedModel::new(shard.buffer, header, stats))
    }

    /// Loads a safetensors file stored as an entry of a pack (compressed or not): the header is read
    /// from the entry's first bytes and validated in full before the device allocation, then the body
    /// is loaded through [`load_entry_range`](Self::load_entry_range).
    pub fn load_safetensors_entry(&self, entry: &Entry) -> Result<LoadedModel> {
        let header = read_entry_header(entry, &self.queue)?;
        let body_len = usize::try_from(header.body_len).map_err(|_| {
            Error::invalid(format!("body of {} bytes is too large", header.body_len))
        })?;
        let buffer = DeviceBuffer::alloc(&self.device, body_len).map_err(|e| {
            e.with_context(format!(
                "loading {}:{}",
                entry.pack().path().display(),
                entry.name()
            ))
        })?;
        let stats =
            self.load_entry_range(entry, header.body_offset, &buffer, 0, header.body_len)?;
        Ok(LoadedModel::new(buffer, &header, stats))
    }

    /// Copies `len` bytes of `file` from `offset` to `dst` at `dst_offset` by the path
    /// [`LoaderConfig::path`] asks for (see [`PathChoice`]); the stats say which path ran and, in
    /// their `note`, why a faster one did not. On error nothing is left in flight and every staging
    /// buffer is back in the pool.
    pub fn load_range(
        &self,
        file: &File,
        offset: u64,
        dst: &DeviceBuffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<LoadStats> {
        let why_not = match self.route(file)? {
            Route::Staged(why) => why,
            Route::Direct(r) => match self.direct_range(r, file, offset, dst, dst_offset, len) {
                Ok(st) => return Ok(st),
                Err(e)
                    if self.cfg.path == PathChoice::Auto && e.kind() == ErrorKind::Unsupported =>
                {
                    Some(format!("direct path refused the file, staged instead: {e}"))
                }
                Err(e) => return Err(e),
            },
        };
        let mut st = self.staged(Origin::File(file), offset, dst, dst_offset, len)?;
        if let Some(why) = why_not {
            st.add_note(why);
        }
        Ok(st)
    }

    /// Which path a load of `file` takes by [`LoaderConfig::path`]: direct (which may still refuse
    /// the file, see [`load_range`](Self::load_range)), or staged with the reason a faster one was not
    /// taken; an error where the direct path was demanded and there is none.
    pub(crate) fn route(&self, file: &File) -> Result<Route<'_>> {
        Ok(match (&self.direct, self.cfg.path) {
            (_, PathChoice::Staged) => Route::Staged(None),
            (Err(why), PathChoice::Direct) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("no direct path to {}: {why}", self.device.label()),
                )
                .with_path(file.path()))
            }
            (Err(why), PathChoice::Auto) => {
                Route::Staged(Some(format!("direct path unavailable: {why}")))
            }
            (Ok(r), PathChoice::Auto) if !r.bypasses_host() => Route::Staged(Some(format!(
                "direct path not taken: {} is slower than staging",
                r.describe()
            ))),
            (Ok(_), PathChoice::Auto) if !file.is_direct() => Route::Staged(Some(format!(
                "direct path not taken: the file is not open O_DIRECT ({})",
                file.direct_reason()
            ))),
            (Ok(r), _) => Route::Direct(r),
        })
    }

    fn direct_range(
        &self,
        reader: &Arc<dyn DirectRead>,
        file: &File,
        offset: u64,
        dst: &DeviceBuffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<LoadStats> {
        let d = load_range_direct(reader, file, offset, dst, dst_offset, len, self.cfg.direct)?;
        let mut st = LoadStats::empty(LoadPath::Direct, &self.cfg);
        st.bytes = d.bytes;
        st.seconds = d.seconds;
        st.chunks = d.chunks;
        st.staging_buffers = 0;
        st.staging_bytes = 0;
        st.note = format!("{} with {} threads", d.reader, d.threads);
        st.read_mode = read_mode(file);
        Ok(st)
    }

    /// Copies logical bytes `offset..offset+len` of a pack entry to `dst` at `dst_offset`: the pack
    /// reads the chunks the range touches and decompresses them on the CPU straight into the pinned
    /// staging buffers, which are then copied like file chunks (path [`LoadPath::StagedPack`]).
    /// A damaged chunk is a `Corrupt` error naming the pack, entry and chunk; nothing is copied from
    /// it.
    pub fn load_entry_range(
        &self,
        entry: &Entry,
        offset: u64,
        dst: &DeviceBuffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<LoadStats> {
        if offset.checked_add(len).is_none_or(|e| e > entry.len()) {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at offset {offset} are past the end of entry '{}' ({} bytes)",
                    entry.name(),
                    entry.len()
                ),
            )
            .with_path(entry.pack().path()));
        }
        self.staged(Origin::Entry(entry), offset, dst, dst_offset, len)
    }

    fn staged(
        &self,
        origin: Origin<'_>,
        offset: u64,
        dst: &DeviceBuffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<LoadStats> {
        let seg = Segment::new(origin, offset, dst, dst_offset, len)?;
        let mut run = self.staged_segments(vec![seg])?;
        run.stats
            .pop()
            .ok_or_else(|| Error::invalid("a staged run of one range returned no stats"))
    }

    /// One staged transfer over several ranges (the shards of a checkpoint) in order, through the
    /// same staging buffers and copy stream: as soon as the last chunk of range `k` is read, the
    /// first chunks of range `k+1` are read into the buffers that free up, while range `k`'s last
    /// copies still run; the stream is synchronized once, at the end. Each range's stats say when,
    /// counted from the start, its first read was issued and its last copy queued. On error nothing
    /// is left in flight and every staging buffer is back in the pool.
    pub(crate) fn staged_segments(&self, segs: Vec<Segment<'_>>) -> Result<StagedRun> {
        let mut stream = self.stream.lock();
        let mut run = Run::new(self, segs);
        let result = run.drive(&mut **stream);
        // Whatever happened, nothing may still read a staging buffer or write the device.
        let synced = stream.synchronize();
        let synced = run.name_copies(synced);
        run.drain_reads();
        result?;
        synced?;
        let end = run.started.elapsed();
        let n = run.segs.len();
        let pio_note = run.pio_note.clone().unwrap_or_default();
        let mut stats = Vec::with_capacity(n);
        let mut windows = Vec::with_capacity(n);
        for (i, seg) in run.segs.iter_mut().enumerate() {
            let at = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(run.started));
            let from = at(seg.first_issue).unwrap_or(Duration::ZERO);
            // The last range ends when the stream is drained; an earlier one when its last copy was
            // queued (its copies then run behind at most `staging_buffers` chunks).
            let to = if i + 1 == n {
                end
            } else {
                at(seg.last_queued).unwrap_or(from)
            };
            let (path, mode) = match seg.origin {
                Origin::File(f) => (LoadPath::Staged, read_mode(f)),
                Origin::Entry(_) => (
                    LoadPath::StagedPack,
                    "pack entry (decoded on the CPU)".to_string(),
                ),
            };
            let mut st = LoadStats::empty(path, &self.cfg);
            if seg.end > seg.start {
                st.bytes = seg.end - seg.start;
                st.seconds = if n == 1 {
                    end.as_secs_f64()
                } else {
                    to.saturating_sub(from).as_secs_f64()
                };
                st.chunks = seg.chunks;
                st.read_wait = seg.read_wait;
                st.copy_wait = seg.copy_wait;
                st.dma_copies = seg.dma_copies;
                st.pio_copies = seg.pio_copies;
                st.note = pio_note.clone();
                st.read_mode = mode;
                st.timeline = std::mem::take(&mut seg.timeline);
            }
            stats.push(st);
            windows.push((from, to));
        }
        Ok(StagedRun { stats, windows })
    }

    /// The device address of a staging buffer's first byte, where the device maps it.
    fn mapped_address(&self, host: *const u8) -> Option<DevicePtr> {
        let a = host as usize;
        self.staging
            .get()?
            .pinned
            .iter()
            .find(|&&(p, l, _)| a >= p && a < p + l)
            .and_then(|&(p, _, m)| m.map(|m| m + (a - p) as u64))
    }
}

/// The path [`Loader::route`] chose for a file.
pub(crate) enum Route<'r> {
    Direct(&'r Arc<dyn DirectRead>),
    /// Staged, and why a faster path was not taken (`None`: staged was asked for).
    Staged(Option<String>),
}

/// Where a staged transfer's bytes come from.
#[derive(Clone, Copy)]
pub(crate) enum Origin<'a> {
    /// A file, read in chunks whose offsets are page-aligned (so direct).
    File(&'a File),
    /// A pack entry's logical bytes, decompressed by the pack into the staging buffer.
    Entry(&'a Entry),
}

/// A chunk's read in flight.
enum Pending {
    File(Completion, CommandId),
    Entry(PackLoad),
}

impl Pending {
    fn is_complete(&self) -> bool {
        match self {
            Pending::File(c, _) => c.status().is_complete(),
            Pending::Entry(l) => l.is_complete(),
        }
    }
    /// Waits; returns the first error and the staging buffer (also on error, so it goes back).
    fn wait(self) -> (Result<()>, Option<IoBuffer>) {
        match self {
            Pending::File(c, id) => {
                let (status, mut done) = c.wait_parts();
                let buf = done.take_buffer(id);
                match status.first_error() {
                    Some(e) => (Err(e), buf),
                    None => (Ok(()), buf),
                }
            }
            Pending::Entry(l) => l.wait_parts(),
        }
    }
}

/// What [`Loader::staged_segments`] did: per range its stats and its window (first read issued,
/// last copy queued, since the start; the last range's window ends when the stream is drained).
pub(crate) struct StagedRun {
    pub stats: Vec<LoadStats>,
    pub windows: Vec<(Duration, Duration)>,
}

/// One range of a staged transfer: where its bytes come from and go, and what happened to it.
pub(crate) struct Segment<'a> {
    origin: Origin<'a>,
    /// Range wanted.
    start: u64,
    end: u64,
    /// Device address of `start`.
    dst: DevicePtr,
    /// Next offset to read from (aligned down at the first chunk of a file).
    next: u64,
    chunks: usize,
    read_wait: Duration,
    copy_wait: Duration,
    dma_copies: usize,
    pio_copies: usize,
    first_issue: Option<Instant>,
    last_queued: Option<Instant>,
    timeline: Vec<ChunkTiming>,
}

impl<'a> Segment<'a> {
    /// `len` bytes of `origin` from `offset`, to `dst` at `dst_offset` (checked to fit).
    pub(crate) fn new(
        origin: Origin<'a>,
        offset: u64,
        dst: &DeviceBuffer,
        dst_offset: u64,
        len: u64,
    ) -> Result<Segment<'a>> {
        let fits = dst_offset
            .checked_add(len)
            .is_some_and(|e| e <= dst.len() as u64);
        if !fits || offset.checked_add(len).is_none() {
            return Err(Error::invalid(format!(
                "{len} bytes at device offset {dst_offset} do not fit a buffer of {} bytes",
                dst.len()
            )));
        }
        let end = offset + len;
        // File chunks start page-aligned so the engine reads them direct; a pack entry's logical
        // bytes have no such constraint. An empty range reads nothing.
        let next = match origin {
            _ if len == 0 => end,
            Origin::File(_) => offset - offset % CHUNK_ALIGN,
            Origin::Entry(_) => offset,
        };
        Ok(Segment {
            origin,
            start: offset,
            end,
            dst: dst.ptr() + dst_offset,
            next,
            chunks: 0,
            read_wait: Duration::ZERO,
            copy_wait: Duration::ZERO,
            dma_copies: 0,
            pio_copies: 0,
            first_issue: None,
            last_queued: None,
            timeline: Vec::new(),
        })
    }

    fn name(&self) -> String {
        match self.origin {
            Origin::File(f) => f.path().display().to_string(),
            Origin::Entry(e) => format!("{}:{}", e.pack().path().display(), e.name()),
        }
    }
}

/// A chunk being read: its completion, and where its bytes go.
struct Reading {
    /// Its range, and its index there and in the whole run.
    seg: usize,
    chunk: usize,
    run_chunk: usize,
    pending: Pending,
    /// Bytes at the start of the staging buffer that precede the wanted range (alignment).
    skip: usize,
    /// Bytes wanted.
    len: usize,
    dst: DevicePtr,
    dst_offset: u64,
    issued: Instant,
}

/// One staged transfer in progress, over one or more ranges in order.
struct Run<'a> {
    loader: &'a Loader,
    segs: Vec<Segment<'a>>,
    /// The range being read (`segs.len()` once every range is read).
    cur: usize,
    reads: VecDeque<Reading>,
    /// Copies queued, the staging buffer each reads, and its range.
    copies: VecDeque<(Ticket, IoBuffer, usize)>,
    /// Chunks issued, all ranges together.
    chunks: usize,
    /// Why programmed I/O was not used for a chunk small enough for it (first reason only).
    pio_note: Option<String>,
    started: Instant,
}

impl<'a> Run<'a> {
    fn new(loader: &'a Loader, segs: Vec<Segment<'a>>) -> Run<'a> {
        let mut run = Run {
            loader,
            segs,
            cur: 0,
            reads: VecDeque::new(),
            copies: VecDeque::new(),
            chunks: 0,
            pio_note: None,
            started: Instant::now(),
        };
        run.skip_read_segments();
        run
    }

    /// Moves `cur` past ranges with nothing left to read.
    fn skip_read_segments(&mut self) {
        while self.segs.get(self.cur).is_some_and(|s| s.next >= s.end) {
            self.cur += 1;
        }
    }

    fn more_to_read(&self) -> bool {
        self.cur < self.segs.len()
    }

    /// A stream's error names the files whose copies were outstanding when it came, where the run
    /// covers several (a stream reports a failed copy at the next wait, not which copy failed).
    fn name_copies<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            if self.segs.len() < 2 {
                return e;
            }
            let mut segs: Vec<usize> = self.copies.iter().map(|c| c.2).collect();
            segs.dedup();
            let names: Vec<String> = segs
                .iter()
                .filter_map(|&i| self.segs.get(i).map(|s| s.name()))
                .collect();
            if names.is_empty() {
                e
            } else {
                e.with_context(format!("copying to the device for {}", names.join(", ")))
            }
        })
    }

    /// The range copy waits are charged to: the one being read, or the last.
    fn waiting_segment(&mut self) -> Option<&mut Segment<'a>> {
        let i = self.cur.min(self.segs.len().saturating_sub(1));
        self.segs.get_mut(i)
    }

    /// The state machine: keep every staging buffer busy, copies in chunk order.
    fn drive(&mut self, stream: &mut dyn CopyStream) -> Result<()> {
        loop {
            // Hand finished reads to the copy engine as soon as they are in (in chunk order).
            while self.reads.front().is_some_and(|r| r.pending.is_complete()) {
                self.copy_front(stream)?;
            }
            if self.more_to_read() {
                let free = self.free_buffer(stream);
                if let Some(buf) = self.name_copies(free)? {
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
                let Some(&(ticket, ..)) = self.copies.front() else {
                    return Err(Error::invalid(
                        "staged load: no staging buffer is being read or copied",
                    ));
                };
                let t = Instant::now();
                let waited = stream.wait(ticket);
                self.name_copies(waited)?;
                let buf = self.copies.pop_front();
                if let Some(seg) = self.waiting_segment() {
                    seg.copy_wait += t.elapsed();
                }
                drop(buf);
                continue;
            }
            return Ok(());
        }
    }

    /// A staging buffer not in use: from the pool, or one whose copy has finished.
    fn free_buffer(&mut self, stream: &mut dyn CopyStream) -> Result<Option<IoBuffer>> {
        if let Ok(b) = self.loader.staging()?.pool.try_get() {
            return Ok(Some(b.into()));
        }
        if let Some(&(ticket, ..)) = self.copies.front() {
            if stream.is_done(ticket)? {
                return Ok(self.copies.pop_front().map(|(_, b, _)| b));
            }
        }
        Ok(None)
    }

    fn issue_read(&mut self, mut buf: IoBuffer) -> Result<()> {
        let cap = self.loader.cfg.staging_bytes as u64;
        let loader = self.loader;
        let seg_index = self.cur;
        let run_chunk = self.chunks;
        let Some(seg) = self.segs.get_mut(seg_index) else {
            return Err(Error::invalid("staged load: a read past the last range"));
        };
        let chunk_start = seg.next;
        let chunk_end = (chunk_start + cap).min(seg.end);
        let read_from = chunk_start.max(seg.start);
        let skip = (read_from - chunk_start) as usize;
        let read_len = (chunk_end - chunk_start) as usize;
        if let IoBuffer::Pooled(p) = &mut buf {
            p.set_len(read_len)?;
        }
        let pending = match seg.origin {
            Origin::File(file) => {
                let mut cb = loader.queue.command_buffer();
                // Read the aligned chunk from its aligned start; the bytes before `start` are
                // skipped.
                let id = cb.load(file, chunk_start, buf)?;
                Pending::File(cb.commit()?, id)
            }
            Origin::Entry(entry) => Pending::Entry(entry.load(&loader.queue, chunk_start, buf)?),
        };
        let dst_offset = read_from - seg.start;
        let issued = Instant::now();
        seg.first_issue.get_or_insert(issued);
        self.reads.push_back(Reading {
            seg: seg_index,
            chunk: seg.chunks,
            run_chunk,
            pending,
            skip,
            len: read_len - skip,
            dst: seg.dst + dst_offset,
            dst_offset,
            issued,
        });
        seg.chunks += 1;
        seg.next = chunk_end;
        self.chunks += 1;
        self.skip_read_segments();
        Ok(())
    }

    /// Waits for the oldest read and queues its copy.
    fn copy_front(&mut self, stream: &mut dyn CopyStream) -> Result<()> {
        let Some(r) = self.reads.pop_front() else {
            return Err(Error::invalid("staged load: no read to copy"));
        };
        let t = Instant::now();
        let (status, buf) = r.pending.wait();
        let read_done = Instant::now();
        let several = self.segs.len() > 1;
        let Some(seg) = self.segs.get_mut(r.seg) else {
            return Err(Error::invalid("staged load: a read of no range"));
        };
        seg.read_wait += read_done - t;
        // Which file, where the run covers several (one file's name is in the caller's context).
        let of = if several {
            format!(" of {}", seg.name())
        } else {
            String::new()
        };
        if let Err(e) = status {
            return Err(e.with_context(format!(
                "reading chunk {}{of} for device offset {}",
                r.chunk, r.dst_offset
            )));
        }
        let buf = buf.ok_or_else(|| Error::invalid("the engine kept a staging buffer"))?;
        // SAFETY: `buf` is kept in `self.copies` until the ticket is done (or the stream is
        // synchronized in staged_segments before the run is dropped); the destination is inside
        // the range's buffer, checked in Segment::new.
        let src = unsafe { buf.as_ptr().add(r.skip) };
        let (ticket, pio) = match self.copy_chunk(stream, src, r.len, r.dst) {
            Ok(t) => t,
            Err(e) => {
                return Err(e.with_context(format!(
                    "copying chunk {}{of} to device offset {}",
                    r.chunk, r.dst_offset
                )))
            }
        };
        let timeline = self.loader.cfg.timeline;
        let Some(seg) = self.segs.get_mut(r.seg) else {
            return Err(Error::invalid("staged load: a copy of no range"));
        };
        if pio {
            seg.pio_copies += 1;
        } else {
            seg.dma_copies += 1;
        }
        seg.last_queued = Some(Instant::now());
        if timeline {
            seg.timeline.push(ChunkTiming {
                chunk: r.run_chunk,
                dst_offset: r.dst_offset,
                read_issued: r.issued,
                read_done,
                ticket,
            });
        }
        self.copies.push_back((ticket, buf, r.seg));
        Ok(())
    }

    /// Queues one chunk's copy: programmed I/O when it is small enough and the staging buffer is
    /// mapped for the device, else (or when the device refuses programmed I/O) a DMA.
    fn copy_chunk(
        &mut self,
        stream: &mut dyn CopyStream,
        src: *const u8,
        len: usize,
        dst: DevicePtr,
    ) -> Result<(Ticket, bool)> {
        if len <= self.loader.cfg.pio_max_bytes {
            match self.loader.mapped_address(src) {
                Some(mapped) => {
                    // SAFETY: as for the DMA below; `mapped` is the device address of `src`.
                    match unsafe { stream.copy_h2d_mapped_async(src, mapped, len, dst) } {
                        Ok(t) => return Ok((t, true)),
                        Err(e) if e.kind() == ErrorKind::Unsupported => {
                            self.pio_note.get_or_insert_with(|| {
                                format!("programmed I/O unavailable, small copies are DMAs: {e}")
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    self.pio_note.get_or_insert_with(|| {
                        "programmed I/O unavailable, small copies are DMAs: the staging buffers are not mapped into the device's address space".into()
                    });
                }
            }
        }
        // SAFETY: the caller keeps src valid until the ticket completes; dst lies in the target.
        unsafe { stream.copy_h2d_async(src, len, dst) }.map(|t| (t, false))
    }

    /// After an error: waits for reads still in flight so their staging buffers go back to the pool
    /// before the caller looks.
    fn drain_reads(&mut self) {
        for r in self.reads.drain(..) {
            let _ = r.pending.wait();
        }
        self.copies.clear();
    }
}
