//! What the loaders need from an accelerator, as two small traits, and a host-memory stand-in that
//! implements them so the staging, ordering and error logic runs (and is tested) where no GPU is.
//!
//! - [`Device`]: allocate and free device memory, page-lock host staging buffers (mapping them into
//!   the device's address space where it can), map host memory read-only for zero-copy access, make a
//!   [`CopyStream`], copy device → host synchronously (to read results back and check them), and say
//!   whether storage can be read straight into device memory ([`Device::direct_reader`], GPUDirect
//!   Storage on a GPU).
//! - [`CopyStream`]: copies queued in order on a stream of their own: host → device and device → host
//!   on the copy engines (DMA), and host → device by the device's own threads reading mapped pinned
//!   memory (programmed I/O, for small transfers); each returns a [`Ticket`] that can be polled or
//!   waited for, so a staging buffer is reused only after the copy that uses it has finished.
//! - [`DirectRead`]: storage → device memory with no host staging (cuFile on a GPU).
//! - [`DeviceBuffer`]: an owned device allocation, freed when dropped.
//! - [`HostDevice`]: the stand-in. Device memory is host memory (its "device pointers" are host
//!   addresses, checked against live allocations on every copy); a capacity limit makes it run out of
//!   memory; copies run on a worker thread, in order, with an optional injected delay and an optional
//!   injected failure; page-locking can be made to fail at the N-th call or to do nothing (a device
//!   that cannot pin); it counts allocated and pinned bytes, pin and unpin calls, and logs every copy,
//!   and it checks that the source of each copy was not changed between queueing and execution (a
//!   staging buffer reused too early).
//!
//! Nothing here does file I/O.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::{Error, ErrorKind, Result};
use parking_lot::{Condvar, Mutex};

/// An address in device memory.
pub type DevicePtr = u64;

/// Identifies one queued copy on a [`CopyStream`]; tickets of a stream increase in queue order.
pub type Ticket = u64;

/// How a copy moved its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Host → device on a copy engine (DMA).
    HostToDevice,
    /// Device → host on a copy engine (DMA).
    DeviceToHost,
    /// Host → device by device threads reading mapped pinned host memory (programmed I/O).
    HostToDeviceMapped,
    /// An 8-byte value written to device memory in stream order
    /// ([`CopyStream::write_u64_async`]; `cuStreamWriteValue64` on a GPU).
    WriteValue64,
}

/// A host range page-locked by [`Device::pin_host`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinned {
    /// The range's address in the device's address space, where the device can read it in place
    /// (what [`CopyStream::copy_h2d_mapped_async`] reads); `None` where it cannot.
    pub mapped: Option<DevicePtr>,
}

/// Reads storage straight into device memory (GPUDirect Storage through cuFile on a GPU).
pub trait DirectRead: Send + Sync + fmt::Debug {
    /// What it is (`cuFile (GPUDirect Storage)`, `cuFile (compatibility mode)`, ...).
    fn describe(&self) -> String;
    /// Whether bytes really go storage → device with no host copy. cuFile without the nvidia-fs
    /// module ("compatibility mode") reads through host memory with no double buffering, so the
    /// loaders' automatic choice prefers their own staged path over it.
    fn bypasses_host(&self) -> bool {
        true
    }
    /// Reads up to `len` bytes of `file` at `offset` into device memory at `dst`, synchronously;
    /// returns the bytes read (fewer only at the end of the file). Thread-safe: loaders call it from
    /// several threads at once for different ranges.
    ///
    /// # Safety
    /// `dst..dst+len` lies inside a live allocation of the device this reader came from, and nothing
    /// else writes or reads it until the call returns.
    unsafe fn read(
        &self,
        file: &gpuio::File,
        offset: u64,
        dst: DevicePtr,
        len: usize,
    ) -> Result<usize>;
}

/// Free and total device memory, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemInfo {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// An accelerator the loaders can copy into.
pub trait Device: Send + Sync + fmt::Debug {
    /// `cpu` or `cuda:N`.
    fn label(&self) -> String;
    /// A longer description (`NVIDIA H200, driver 13.0`).
    fn description(&self) -> String;
    /// Allocates `bytes` (> 0) of device memory; [`ErrorKind::OutOfMemory`] when the device is full.
    fn alloc_raw(&self, bytes: usize) -> Result<DevicePtr>;
    /// Frees an allocation.
    ///
    /// # Safety
    /// `ptr` came from [`alloc_raw`](Self::alloc_raw) with `bytes` on this device, is not freed yet,
    /// and no queued copy still writes to it.
    unsafe fn free_raw(&self, ptr: DevicePtr, bytes: usize);
    /// Like [`alloc_raw`](Self::alloc_raw), for a buffer that will receive a file range read with
    /// `O_DIRECT`, starting at an offset ≡ `phase` modulo 4096: a device whose direct reads can
    /// use `O_DIRECT` into its memory (the host stand-in) places the first byte at an address ≡
    /// `phase`, so those reads need no bounce, and backs it with pages suited to them; others
    /// allocate as `alloc_raw` does. Freed with [`free_raw`](Self::free_raw).
    fn alloc_raw_phased(&self, bytes: usize, phase: usize) -> Result<DevicePtr> {
        let _ = phase;
        self.alloc_raw(bytes)
    }
    /// Page-locks host memory used as a staging buffer (so copies from it are true DMA) and maps it
    /// into the device's address space where the device can read host memory in place. `Ok(None)`
    /// with nothing done where the device has no such notion.
    ///
    /// # Safety
    /// `ptr..ptr+len` is valid host memory that stays allocated until [`unpin_host`](Self::unpin_host).
    unsafe fn pin_host(&self, ptr: *mut u8, len: usize) -> Result<Option<Pinned>>;
    /// Undoes [`pin_host`](Self::pin_host).
    ///
    /// # Safety
    /// `ptr` was pinned with `pin_host` on this device and no queued copy still reads it.
    unsafe fn unpin_host(&self, ptr: *mut u8, len: usize);
    /// A new stream for host → device copies.
    fn copy_stream(&self) -> Result<Box<dyn CopyStream>>;
    /// Copies `dst.len()` bytes from device address `src` into host memory, synchronously.
    ///
    /// # Safety
    /// `src..src+dst.len()` lies inside a live allocation of this device with no copy pending to it.
    unsafe fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()>;
    /// Free and total memory.
    fn mem_info(&self) -> Result<MemInfo>;
    /// Maps host memory (typically a file's mmap) read-only into the device's address space, so
    /// device code reads it in place with no copy (the CUDA analog of Metal's
    /// `makeBuffer(bytesNoCopy:)`); returns its device address. [`ErrorKind::Unsupported`], saying
    /// why, where the device cannot.
    ///
    /// # Safety
    /// `ptr..ptr+len` stays mapped and unmodified until [`unmap_host`](Self::unmap_host).
    unsafe fn map_host_read_only(&self, ptr: *const u8, len: usize) -> Result<DevicePtr> {
        let _ = (ptr, len);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{} cannot map host memory", self.label()),
        ))
    }
    /// Undoes [`map_host_read_only`](Self::map_host_read_only).
    ///
    /// # Safety
    /// `ptr` was mapped with `map_host_read_only` on this device and nothing on the device still
    /// reads it.
    unsafe fn unmap_host(&self, ptr: *const u8, len: usize) {
        let _ = (ptr, len);
    }
    /// A reader from storage straight into this device's memory, or why there is none (the loaders
    /// then stage through host memory and report the reason).
    fn direct_reader(&self) -> std::result::Result<Arc<dyn DirectRead>, String> {
        Err(format!("{} has no direct storage path", self.label()))
    }
    /// Why a direct reader, if there is one, would not bypass host memory — known without making
    /// one (making a cuFile reader opens the cuFile driver, which takes most of a second): an
    /// automatic choice then stages without asking for the reader. `None`: it would, or it cannot be
    /// told cheaply.
    fn direct_reader_slower(&self) -> Option<String> {
        None
    }
    /// Whether this device's copy streams implement [`CopyStream::write_u64_async`]: `Ok(how)` or
    /// `Err(why not)`. What the ring server's completion publisher is chosen by
    /// (`rings::publish::PublisherChoice`).
    fn stream_write_u64(&self) -> std::result::Result<String, String> {
        Err(format!(
            "{} has no stream-ordered 64-bit value write",
            self.label()
        ))
    }
    /// Loads a PTX module (JIT-compiled by the driver) and looks up `entries`, for launching kernels
    /// on a stream of its own. [`ErrorKind::Unsupported`], saying why, where the device runs no
    /// kernels (the host stand-in) or the driver refuses the image.
    fn load_module(&self, ptx: &str, entries: &[&str]) -> Result<Box<dyn KernelModule>> {
        let _ = (ptx, entries);
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{} runs no kernels (a GPU is needed)", self.label()),
        ))
    }
    /// Whether the device can address page-locked host memory mapped into its address space
    /// (`CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY` on a GPU): what request rings in host memory need.
    /// `Err` with the reason where it cannot be told.
    fn can_map_host_memory(&self) -> std::result::Result<bool, String> {
        Err(format!(
            "{} cannot say whether it maps host memory",
            self.label()
        ))
    }
}

/// A loaded module's kernels, launched in order on one stream ([`Device::load_module`]).
pub trait KernelModule: Send + fmt::Debug {
    /// Queues `entry` (one of the names given to `load_module`) with `grid` blocks of `block`
    /// threads and returns at once.
    ///
    /// # Safety
    /// `params` holds one pointer per kernel parameter, each to a value of exactly the parameter's
    /// type and layout; every device address the values name stays allocated, and every host
    /// address mapped, until [`synchronize`](Self::synchronize) has returned `Ok`.
    unsafe fn launch(
        &mut self,
        entry: &str,
        grid: u32,
        block: u32,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()>;
    /// Waits for every kernel queued so far, at most `timeout`: an [`ErrorKind::Io`] error saying
    /// so if they are still running then (the module is then never unloaded: unloading under a running kernel
    /// is undefined), or the error a kernel ended with.
    fn synchronize(&mut self, timeout: std::time::Duration) -> Result<()>;
    /// Whether kernels queued earlier may still be running (a [`synchronize`](Self::synchronize)
    /// timed out): memory they use must then not be freed.
    fn running(&self) -> bool;
}

/// One host → device copy of [`CopyStream::copy_h2d_many`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostToDevice {
    /// The host source.
    pub src: *const u8,
    /// Bytes to copy.
    pub len: usize,
    /// The device destination.
    pub dst: DevicePtr,
}

/// One delivery of [`CopyStream::deliver_async`]: `len` bytes from `src` (the device address of
/// mapped pinned host memory) to device memory `dst`, then the 8-byte `word` stored at `word_addr`
/// (0: none) after them. The layout is `struct Delivery` of `kernels/copy.cu`, byte for byte.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryDesc {
    /// Mapped source (a device address of pinned host memory).
    pub src: DevicePtr,
    /// Device destination.
    pub dst: DevicePtr,
    /// Bytes to copy (0: only the word).
    pub len: u64,
    /// Device address of the 8-byte, 8-aligned word (0: none).
    pub word_addr: DevicePtr,
    /// The word.
    pub word: u64,
}

/// Copies executed in the order they were queued.
pub trait CopyStream: Send + fmt::Debug {
    /// Queues a copy of `len` bytes from host `src` to device `dst` and returns at once.
    ///
    /// # Safety
    /// `src..src+len` stays valid and unmodified until the returned ticket is complete; `dst..dst+len`
    /// lies inside a live allocation of this stream's device.
    unsafe fn copy_h2d_async(
        &mut self,
        src: *const u8,
        len: usize,
        dst: DevicePtr,
    ) -> Result<Ticket>;
    /// Queues a copy of `len` bytes from device `src` to host `dst` and returns at once.
    ///
    /// # Safety
    /// `src..src+len` lies inside a live allocation of this stream's device and is not written until
    /// the ticket is complete; `dst..dst+len` is valid host memory nobody else touches until then.
    unsafe fn copy_d2h_async(&mut self, src: DevicePtr, dst: *mut u8, len: usize)
        -> Result<Ticket>;
    /// Queues a host → device copy done by the device's own threads reading `src_host` in place
    /// through its device address `src_mapped` (from [`Device::pin_host`]), instead of a DMA on a
    /// copy engine: programmed I/O, cheaper to start for small transfers.
    /// [`ErrorKind::Unsupported`] where the device cannot (the caller then uses
    /// [`copy_h2d_async`](Self::copy_h2d_async)).
    ///
    /// # Safety
    /// As [`copy_h2d_async`](Self::copy_h2d_async); `src_mapped` is the device address of `src_host`.
    unsafe fn copy_h2d_mapped_async(
        &mut self,
        src_host: *const u8,
        src_mapped: DevicePtr,
        len: usize,
        dst: DevicePtr,
    ) -> Result<Ticket> {
        let _ = (src_host, src_mapped, len, dst);
        Err(Error::new(
            ErrorKind::Unsupported,
            "this stream has no programmed-I/O copy",
        ))
    }
    /// Queues a write of the 8-byte `value` to device address `dst` that runs after every copy
    /// queued on this stream before it, and makes their bytes visible to the device before the value
    /// (`cuStreamWriteValue64` with its default flags on a GPU). No host wait is involved: this is how
    /// a completion word is ordered after its data. [`ErrorKind::Unsupported`] where the stream cannot
    /// ([`Device::stream_write_u64`] says why); the caller then copies the value from pinned host
    /// memory instead.
    ///
    /// # Safety
    /// `dst..dst+8` lies inside a live allocation of this stream's device, 8-aligned.
    unsafe fn write_u64_async(&mut self, dst: DevicePtr, value: u64) -> Result<Ticket> {
        let _ = (dst, value);
        Err(Error::new(
            ErrorKind::Unsupported,
            "this stream has no stream-ordered value write",
        ))
    }
    /// Queues every copy of `copies` in order, as [`copy_h2d_async`](Self::copy_h2d_async) would one
    /// by one, and returns the ticket of the last (`None` for none). A stream may queue them with
    /// fewer driver calls than one copy each: the CUDA stream binds its context once and records one
    /// event for all of them (the rings server's hot path: a round's reads). On an error an unknown
    /// prefix of them may have been queued: the caller must treat every copy of the call as failed.
    ///
    /// # Safety
    /// As [`copy_h2d_async`](Self::copy_h2d_async), for every copy, until the returned ticket is
    /// complete.
    unsafe fn copy_h2d_many(&mut self, copies: &[HostToDevice]) -> Result<Option<Ticket>> {
        let mut last = None;
        for c in copies {
            // SAFETY: per the caller, for each copy.
            last = Some(unsafe { self.copy_h2d_async(c.src, c.len, c.dst)? });
        }
        Ok(last)
    }
    /// Queues every `(dst, value)` write of `words` in order, as
    /// [`write_u64_async`](Self::write_u64_async) would one by one, and returns the ticket of the last
    /// (`None` for none); like [`copy_h2d_many`](Self::copy_h2d_many), with fewer driver calls where
    /// the stream can. On an error an unknown prefix of them may have been queued.
    ///
    /// # Safety
    /// As [`write_u64_async`](Self::write_u64_async), for every write.
    unsafe fn write_u64_many(&mut self, words: &[(DevicePtr, u64)]) -> Result<Option<Ticket>> {
        let mut last = None;
        for &(dst, value) in words {
            // SAFETY: per the caller, for each write.
            last = Some(unsafe { self.write_u64_async(dst, value)? });
        }
        Ok(last)
    }
    /// Queues the `n` deliveries described at `descs_host` (whose device address is `descs_mapped`:
    /// pinned, mapped host memory) as one unit: each one's bytes, then its word, ordered after the
    /// bytes and after everything queued on the stream before (on a GPU one launch of the
    /// `gpuio_deliver` kernel, `kernels/copy.cu`: device threads read the sources in place, as
    /// [`copy_h2d_mapped_async`](Self::copy_h2d_mapped_async) does). [`ErrorKind::Unsupported`]
    /// where the stream cannot (the caller then copies and publishes request by request).
    ///
    /// # Safety
    /// The descriptors and every source stay valid and unchanged until the ticket is complete;
    /// every destination and word lies inside a live allocation of this stream's device, the words
    /// 8-aligned.
    unsafe fn deliver_async(
        &mut self,
        descs_host: *const DeliveryDesc,
        descs_mapped: DevicePtr,
        n: usize,
    ) -> Result<Ticket> {
        let _ = (descs_host, descs_mapped, n);
        Err(Error::new(
            ErrorKind::Unsupported,
            "this stream has no batched delivery",
        ))
    }
    /// Makes [`deliver_async`](Self::deliver_async) ready to run while other kernels run: loads its
    /// code into the device and runs it once, empty, waiting for that. A GPU driver may load a
    /// kernel's code only at its first launch and wait for the context to go idle to do so (CUDA's
    /// lazy loading: the CUDA C++ Programming Guide, "Lazy Loading", on concurrent execution), which
    /// a kernel spinning on this stream's deliveries never lets happen. Call it before such a kernel
    /// is launched. [`ErrorKind::Unsupported`] where the stream has no batched delivery.
    fn preload_deliver(&mut self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "this stream has no batched delivery",
        ))
    }
    /// Whether the copy of `ticket` (and so every copy before it) has finished. A failed copy is an
    /// error here and from every later call.
    fn is_done(&mut self, ticket: Ticket) -> Result<bool>;
    /// Waits until the copy of `ticket` has finished.
    fn wait(&mut self, ticket: Ticket) -> Result<()>;
    /// Waits until every queued copy has finished.
    fn synchronize(&mut self) -> Result<()>;
}

/// An owned device allocation; freed when dropped. Zero-length buffers allocate nothing.
pub struct DeviceBuffer {
    device: Arc<dyn Device>,
    ptr: DevicePtr,
    len: usize,
}

impl fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("device", &self.device.label())
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceBuffer {
    /// Allocates `len` bytes on `device`.
    pub fn alloc(device: &Arc<dyn Device>, len: usize) -> Result<DeviceBuffer> {
        Self::alloc_by(device, len, |d| d.alloc_raw(len))
    }
    /// A buffer for a file range read with `O_DIRECT` from an offset ≡ `phase` modulo 4096 (see
    /// [`Device::alloc_raw_phased`]).
    pub fn alloc_phased(
        device: &Arc<dyn Device>,
        len: usize,
        phase: usize,
    ) -> Result<DeviceBuffer> {
        Self::alloc_by(device, len, |d| d.alloc_raw_phased(len, phase))
    }
    /// `len` bytes from `alloc` (none for an empty buffer, whose address is 0).
    fn alloc_by(
        device: &Arc<dyn Device>,
        len: usize,
        alloc: impl FnOnce(&dyn Device) -> Result<DevicePtr>,
    ) -> Result<DeviceBuffer> {
        let ptr = if len == 0 { 0 } else { alloc(device.as_ref())? };
        Ok(DeviceBuffer {
            device: device.clone(),
            ptr,
            len,
        })
    }
    /// The device address of the first byte (0 for an empty buffer).
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }
    /// Copies `dst.len()` bytes from `offset` in this buffer to host memory (synchronously). The
    /// caller must have waited for the copies into this range.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(dst.len()).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(Error::invalid(format!(
                "read of {} bytes at offset {offset} is outside a device buffer of {} bytes",
                dst.len(),
                self.len
            )));
        }
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: the range was checked against this live allocation.
        unsafe { self.device.copy_d2h(self.ptr + offset as u64, dst) }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated by alloc with len; whoever queued copies into it waited for them
            // (the loaders synchronize their stream before giving a buffer back or dropping it).
            unsafe { self.device.free_raw(self.ptr, self.len) };
        }
    }
}

/// Knobs of the [`HostDevice`] stand-in.
#[derive(Debug, Clone, Default)]
pub struct HostDeviceConfig {
    /// Device memory, bytes; `None` for no limit (host memory then limits).
    pub capacity_bytes: Option<u64>,
    /// Time each copy takes on top of the memcpy (a slow copy engine).
    pub copy_delay: Duration,
    /// Fail the N-th copy (counted from 1) as a device would report a failed transfer.
    pub fail_copy_nth: Option<u64>,
    /// Offer a direct storage → device path ([`Device::direct_reader`]: `pread` straight into the
    /// stand-in's memory), so the GPUDirect Storage load logic runs where there is no GPU.
    pub direct_reads: bool,
    /// Fail the N-th direct read (counted from 1) with an I/O error.
    pub fail_direct_read_nth: Option<u64>,
    /// Refuse to map host memory into the device's address space (as a device without unified
    /// addressing would): [`Device::pin_host`] then returns no mapped address, and
    /// [`Device::map_host_read_only`] fails.
    pub no_host_mapping: bool,
    /// Fail the N-th [`Device::pin_host`] call (counted from 1, every caller together) with
    /// [`ErrorKind::OutOfMemory`], as `cuMemHostRegister` does when it cannot lock the pages; nothing
    /// is pinned by that call.
    pub fail_pin_nth: Option<u64>,
    /// Page-lock nothing: [`Device::pin_host`] returns `Ok(None)`, as a device with no notion of
    /// page-locked host memory does (the calls are still counted).
    pub no_pinning: bool,
    /// The direct reader's `O_DIRECT` reads fail with `EINVAL` before reading anything, as on a file
    /// system that accepted the `O_DIRECT` open but refuses the read: the reader then reads the
    /// rest buffered (tested with it).
    pub refuse_o_direct_reads: bool,
    /// Skip the tests' instruments: the CRC-32C of every host source when a copy is queued and again
    /// when it runs ([`HostDevice::reuse_violations`]), and the record of every copy
    /// ([`HostDevice::copy_log`], which grows with each one). `open_device("cpu")`, the CLI's and
    /// Python's stand-in, skips them: they cost two CRCs of every byte copied (31 % of a profile's
    /// samples of `gpuio rings --device cpu` at 64 KiB requests) and memory without bound in a long
    /// run.
    pub skip_instruments: bool,
}

/// One executed copy, for ordering tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRecord {
    pub ticket: Ticket,
    pub kind: CopyKind,
    /// Device address (host → device) or host address (device → host) written.
    pub dst: DevicePtr,
    pub len: usize,
    pub started: Instant,
    pub finished: Instant,
}

#[derive(Debug, Default)]
struct HostState {
    /// Live allocations by address → length; the memory itself is `Box<[u8]>` owned here.
    allocs: BTreeMap<u64, HostMem>,
    allocated_bytes: u64,
    pinned: BTreeMap<usize, usize>,
    /// Host ranges mapped read-only (address → length): readable like allocations, never written.
    mapped: BTreeMap<u64, usize>,
}

#[derive(Debug)]
struct HostShared {
    cfg: HostDeviceConfig,
    state: Mutex<HostState>,
    copies_started: AtomicU64,
    alloc_calls: AtomicU64,
    pin_calls: AtomicU64,
    unpin_calls: AtomicU64,
    log: Mutex<Vec<CopyRecord>>,
    /// Copies whose source changed between queueing and execution.
    reuse_violations: AtomicU64,
    direct_reads: AtomicU64,
    /// Bytes the direct reader read with `O_DIRECT` (the rest of its reads went buffered).
    direct_io_bytes: AtomicU64,
}

/// Device memory that is host memory: the stand-in for a GPU in tests and on machines without one
/// (`--device cpu`).
#[derive(Debug, Clone)]
pub struct HostDevice(Arc<HostShared>);

impl HostDevice {
    pub fn new(cfg: HostDeviceConfig) -> HostDevice {
        HostDevice(Arc::new(HostShared {
            cfg,
            state: Mutex::new(HostState::default()),
            copies_started: AtomicU64::new(0),
            alloc_calls: AtomicU64::new(0),
            pin_calls: AtomicU64::new(0),
            unpin_calls: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            reuse_violations: AtomicU64::new(0),
            direct_io_bytes: AtomicU64::new(0),
            direct_reads: AtomicU64::new(0),
        }))
    }
    /// Bytes allocated and not freed.
    pub fn allocated_bytes(&self) -> u64 {
        self.0.state.lock().allocated_bytes
    }
    /// Allocations asked for so far (successful or not).
    pub fn alloc_calls(&self) -> u64 {
        self.0.alloc_calls.load(Ordering::Relaxed)
    }
    /// How many times host memory was page-locked ([`Device::pin_host`]) on this device, ever: a
    /// loader pins its staging buffers once, however many files it loads.
    pub fn pin_calls(&self) -> u64 {
        self.0.pin_calls.load(Ordering::Relaxed)
    }
    /// How many times [`Device::unpin_host`] was called on this device, ever: every pin is undone
    /// exactly once, so after its owners are gone this equals the successful pins.
    pub fn unpin_calls(&self) -> u64 {
        self.0.unpin_calls.load(Ordering::Relaxed)
    }
    /// Live allocations.
    pub fn allocations(&self) -> usize {
        self.0.state.lock().allocs.len()
    }
    /// Bytes of host memory pinned and not unpinned.
    pub fn pinned_bytes(&self) -> u64 {
        self.0.state.lock().pinned.values().map(|&l| l as u64).sum()
    }
    /// Every copy executed so far, in execution order (none recorded with
    /// [`HostDeviceConfig::skip_instruments`]).
    pub fn copy_log(&self) -> Vec<CopyRecord> {
        self.0.log.lock().clone()
    }
    /// Copies whose source bytes changed between queueing and execution (must stay 0; not checked
    /// with [`HostDeviceConfig::skip_instruments`]).
    pub fn reuse_violations(&self) -> u64 {
        self.0.reuse_violations.load(Ordering::Relaxed)
    }
    /// Host ranges mapped read-only and not unmapped.
    pub fn mapped_ranges(&self) -> usize {
        self.0.state.lock().mapped.len()
    }
    /// An allocation of `bytes` whose first byte is at `phase` within a page; `for_direct_io`: it
    /// will receive `O_DIRECT` reads (see [`HostMem::zeroed`]).
    fn alloc_host(&self, bytes: usize, phase: usize, for_direct_io: bool) -> Result<DevicePtr> {
        self.0.alloc_calls.fetch_add(1, Ordering::Relaxed);
        let mut st = self.0.state.lock();
        if let Some(cap) = self.0.cfg.capacity_bytes {
            if st.allocated_bytes + bytes as u64 > cap {
                return Err(Error::new(
                    ErrorKind::OutOfMemory,
                    format!(
                        "cannot allocate {bytes} bytes on cpu: {} of {cap} bytes in use",
                        st.allocated_bytes
                    ),
                ));
            }
        }
        let mem = HostMem::zeroed(bytes, phase, for_direct_io).ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfMemory,
                format!("cannot allocate {bytes} bytes of host memory for the cpu device"),
            )
        })?;
        let ptr = mem.start();
        st.allocs.insert(ptr, mem);
        st.allocated_bytes += bytes as u64;
        Ok(ptr)
    }

    /// Direct reads done so far (successful or not).
    pub fn direct_reads(&self) -> u64 {
        self.0.direct_reads.load(Ordering::Relaxed)
    }
    /// Bytes the direct reader read with `O_DIRECT`, bypassing the page cache, so far.
    pub fn direct_io_bytes(&self) -> u64 {
        self.0.direct_io_bytes.load(Ordering::Relaxed)
    }

    /// Checks that `ptr..ptr+len` lies in one live allocation (or, with `mapped_too`, in one range
    /// mapped read-only).
    fn check_range_in(&self, ptr: DevicePtr, len: usize, mapped_too: bool) -> Result<()> {
        let st = self.0.state.lock();
        let inside = |base: u64, blen: usize| {
            ptr.checked_add(len as u64)
                .is_some_and(|end| end <= base + blen as u64)
        };
        let in_alloc = st
            .allocs
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&base, mem)| inside(base, mem.len()));
        let in_mapped = mapped_too
            && st
                .mapped
                .range(..=ptr)
                .next_back()
                .is_some_and(|(&base, &l)| inside(base, l));
        if in_alloc || in_mapped {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "device range {ptr:#x} (+{len} bytes) is not inside a live allocation{}",
                if mapped_too { " or mapping" } else { "" }
            )))
        }
    }

    fn check_range(&self, ptr: DevicePtr, len: usize) -> Result<()> {
        self.check_range_in(ptr, len, false)
    }

    /// Checks that `ptr..ptr+len` lies in one pinned host range.
    fn check_pinned(&self, ptr: usize, len: usize) -> Result<()> {
        let st = self.0.state.lock();
        let ok = st
            .pinned
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&base, &l)| ptr + len <= base + l);
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "host range {ptr:#x} (+{len} bytes) is not pinned and mapped"
            )))
        }
    }
}

fn crc(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

impl Device for HostDevice {
    fn label(&self) -> String {
        "cpu".into()
    }
    fn description(&self) -> String {
        "host memory standing in for a device".into()
    }
    fn alloc_raw(&self, bytes: usize) -> Result<DevicePtr> {
        self.alloc_host(bytes, 0, false)
    }
    fn alloc_raw_phased(&self, bytes: usize, phase: usize) -> Result<DevicePtr> {
        self.alloc_host(bytes, phase % HostMem::PAGE, true)
    }
    unsafe fn free_raw(&self, ptr: DevicePtr, bytes: usize) {
        let mut st = self.0.state.lock();
        if let Some(mem) = st.allocs.remove(&ptr) {
            debug_assert_eq!(mem.len(), bytes.max(1));
            st.allocated_bytes -= bytes as u64;
        }
    }
    unsafe fn pin_host(&self, ptr: *mut u8, len: usize) -> Result<Option<Pinned>> {
        let n = self.0.pin_calls.fetch_add(1, Ordering::Relaxed) + 1;
        if self.0.cfg.fail_pin_nth == Some(n) {
            return Err(Error::new(
                ErrorKind::OutOfMemory,
                format!("cpu device: injected failure of pin {n} ({len} bytes at {ptr:p})"),
            ));
        }
        if self.0.cfg.no_pinning {
            return Ok(None);
        }
        self.0.state.lock().pinned.insert(ptr as usize, len);
        Ok(Some(Pinned {
            // The stand-in's device reads host memory at its own address.
            mapped: (!self.0.cfg.no_host_mapping).then_some(ptr as u64),
        }))
    }
    unsafe fn unpin_host(&self, ptr: *mut u8, _len: usize) {
        self.0.unpin_calls.fetch_add(1, Ordering::Relaxed);
        self.0.state.lock().pinned.remove(&(ptr as usize));
    }
    fn copy_stream(&self) -> Result<Box<dyn CopyStream>> {
        Ok(Box::new(HostStream::new(self.clone())?))
    }
    unsafe fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.check_range_in(src, dst.len(), true)?;
        // SAFETY: the range lies in a live allocation (checked); the caller promises no copy writes it.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn mem_info(&self) -> Result<MemInfo> {
        let used = self.allocated_bytes();
        let total = self.0.cfg.capacity_bytes.unwrap_or(u64::MAX);
        Ok(MemInfo {
            free_bytes: total.saturating_sub(used),
            total_bytes: total,
        })
    }
    unsafe fn map_host_read_only(&self, ptr: *const u8, len: usize) -> Result<DevicePtr> {
        if self.0.cfg.no_host_mapping {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the cpu stand-in was configured without host mapping",
            ));
        }
        if len == 0 {
            return Err(Error::invalid("cannot map an empty host range"));
        }
        self.0.state.lock().mapped.insert(ptr as u64, len);
        Ok(ptr as u64)
    }
    unsafe fn unmap_host(&self, ptr: *const u8, _len: usize) {
        self.0.state.lock().mapped.remove(&(ptr as u64));
    }
    fn direct_reader(&self) -> std::result::Result<Arc<dyn DirectRead>, String> {
        if self.0.cfg.direct_reads {
            Ok(Arc::new(HostDirectRead(self.clone())))
        } else {
            Err("the cpu stand-in offers no direct storage path unless configured to".into())
        }
    }
    fn stream_write_u64(&self) -> std::result::Result<String, String> {
        Ok("the stand-in's copy worker stores the value (release) after the stream's earlier copies"
            .into())
    }
    fn can_map_host_memory(&self) -> std::result::Result<bool, String> {
        Ok(!self.0.cfg.no_host_mapping)
    }
}

/// The stand-in's "device memory": zeroed host memory, freed on drop.
struct HostMem {
    ptr: std::ptr::NonNull<u8>,
    /// Bytes taken from the OS or the allocator, `skip` included.
    len: usize,
    /// Mapped with `mmap` (large) rather than taken from the allocator (small, page-aligned).
    mapped: bool,
    /// Bytes before the allocation's first byte ([`Device::alloc_raw_phased`]'s phase).
    skip: usize,
}

// SAFETY: plain owned memory; every access goes through the device's checked copies.
unsafe impl Send for HostMem {}

impl fmt::Debug for HostMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostMem({:p}, {} bytes)", self.ptr, self.len)
    }
}

impl HostMem {
    /// Allocations from this size on are mapped from the OS.
    const HUGE: usize = 2 << 20;
    /// Every allocation's base is aligned to this (the OS page).
    const PAGE: usize = 4096;

    fn small_layout(len: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(len, Self::PAGE).ok()
    }

    /// `len` zero bytes (at least one), or `None` when there is no memory. Never a pass over the
    /// memory in user space: fresh pages from the OS are zero already, and fault in where they are
    /// first written; a buffer for `O_DIRECT` reads asks for huge pages (below).
    ///
    /// The first byte is at an address ≡ `phase` modulo [`Self::PAGE`] (`phase` < `PAGE`), so a file
    /// range starting at an offset ≡ `phase` can be read into it with `O_DIRECT`.
    /// `for_direct_io`: the buffer is for `O_DIRECT` reads (see below).
    fn zeroed(len: usize, phase: usize, for_direct_io: bool) -> Option<HostMem> {
        debug_assert!(phase < Self::PAGE);
        let len = len.max(1) + phase;
        if len < Self::HUGE {
            let layout = Self::small_layout(len)?;
            // SAFETY: the layout has a non-zero size.
            let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
            return Some(HostMem {
                ptr,
                len,
                mapped: false,
                skip: phase,
            });
        }
        // SAFETY: an anonymous private mapping of len bytes, owned by the value returned.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // Nothing is populated here: pages fault in where the reading threads first write them.
        // A buffer for O_DIRECT reads asks for huge pages, so a read pins a few large pages rather
        // than many small ones; others keep 4 KiB pages. Huge pages populated at allocation (the
        // earlier policy) made warm 1 GiB loads in one Python process take 0.26–1.87 s on this VM,
        // 1.0–1.7 s of it zeroing them (`perf`: clear_page_rep under folio_zero_user) in about half
        // the loads, against 0.30–0.54 s now; a 512 MiB `gpuio load /dev/shm/… --device cpu` took
        // 0.16–0.65 s with its allocation, against 0.11–0.21 s now (docs/BENCHMARKS.md, the Python
        // section, and docs/bench-runs/2026-11-28-{90f4aaf,ea5e504,8ec9e9e}-*).
        if for_direct_io {
            // SAFETY: advice on the mapping just made; a refusal (THP off) changes nothing but speed.
            unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        }
        Some(HostMem {
            ptr: std::ptr::NonNull::new(p as *mut u8)?,
            len,
            mapped: true,
            skip: phase,
        })
    }

    /// The allocation's first byte.
    fn start(&self) -> u64 {
        self.ptr.as_ptr() as u64 + self.skip as u64
    }

    /// The allocation's bytes (the phase's skipped bytes not counted).
    fn len(&self) -> usize {
        self.len - self.skip
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `zeroed` with this length, unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
        } else {
            let layout = Self::small_layout(self.len).expect("valid at allocation");
            // SAFETY: allocated in `zeroed` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// The stand-in's direct path: `pread` from the file straight into "device" memory. Where the file
/// was opened with `O_DIRECT` (and is not on tmpfs) and the destination's address and the file offset agree modulo the
/// file's alignment (a buffer from [`Device::alloc_raw_phased`] with the range's phase), the aligned
/// middle of each read bypasses the page cache, so a cold file reaches memory in one pass with the
/// storage's own queue depth; the unaligned head and tail, and everything else, are read buffered.
#[derive(Debug)]
struct HostDirectRead(HostDevice);

/// Reads `len` bytes of `fd` at `offset` into `dst` until done or end of file; `EINTR` retried.
/// Returns the bytes read and, on failure, the error at the first byte not read.
///
/// # Safety
/// `dst..dst+len` is writable and touched by nothing else during the call.
unsafe fn pread_full(
    fd: i32,
    dst: usize,
    len: usize,
    offset: u64,
) -> (usize, Option<std::io::Error>) {
    let mut done = 0usize;
    while done < len {
        // SAFETY: per the caller.
        let r = unsafe {
            libc::pread(
                fd,
                (dst + done) as *mut libc::c_void,
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return (done, Some(e));
        }
        if r == 0 {
            break;
        }
        done += r as usize;
    }
    (done, None)
}

impl DirectRead for HostDirectRead {
    fn describe(&self) -> String {
        "pread into the cpu stand-in's memory".into()
    }
    unsafe fn read(
        &self,
        file: &gpuio::File,
        offset: u64,
        dst: DevicePtr,
        len: usize,
    ) -> Result<usize> {
        let dev = &self.0;
        dev.check_range(dst, len)?;
        let n = dev.0.direct_reads.fetch_add(1, Ordering::Relaxed) + 1;
        if dev.0.cfg.fail_direct_read_nth == Some(n) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("cpu device: injected failure of direct read {n}"),
            )
            .with_op(gpuio::error::Op::Read)
            .with_path(file.path())
            .with_range(offset, len as u64));
        }
        let fail = |at: u64, e: std::io::Error| {
            Error::from_io(gpuio::error::Op::Read, &e)
                .with_path(file.path())
                .with_range(at, len as u64 - (at - offset))
        };
        // The O_DIRECT middle: from the first aligned offset, a whole number of aligned blocks.
        let a = file.align();
        let block = (a.offset_align as u64).max(a.mem_align as u64).max(1);
        // On tmpfs (which accepts O_DIRECT) a direct read is a memcpy like a buffered one: not worth
        // the alignment.
        let worth = file.is_direct() && !file.is_memory_resident();
        let (head, mid) = if worth && dst.wrapping_sub(offset) % block == 0 {
            let head = ((block - offset % block) % block).min(len as u64) as usize;
            (head, (len - head) / block as usize * block as usize)
        } else {
            (len, 0)
        };
        let mut done = 0usize;
        // SAFETY: the head lies in dst..dst+len, a live allocation (checked) that the caller does not
        // let anyone else touch during the call.
        let (r, e) = unsafe { pread_full(file.buffered_fd(), dst as usize, head, offset) };
        done += r;
        if let Some(e) = e {
            return Err(fail(offset + done as u64, e));
        }
        if r < head {
            return Ok(done); // end of file
        }
        if mid > 0 {
            let (r, e) = if dev.0.cfg.refuse_o_direct_reads {
                (0, Some(std::io::Error::from_raw_os_error(libc::EINVAL)))
            } else {
                // SAFETY: the middle follows the head inside dst..dst+len, as above.
                unsafe {
                    pread_full(
                        file.fast_fd(),
                        dst as usize + done,
                        mid,
                        offset + done as u64,
                    )
                }
            };
            done += r;
            dev.0.direct_io_bytes.fetch_add(r as u64, Ordering::Relaxed);
            match e {
                // A file system that refuses this O_DIRECT read after all: the rest goes buffered.
                Some(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Some(e) => return Err(fail(offset + done as u64, e)),
                None if r < mid => return Ok(done), // end of file
                None => {}
            }
        }
        // SAFETY: the rest of dst..dst+len, as above.
        let (r, e) = unsafe {
            pread_full(
                file.buffered_fd(),
                dst as usize + done,
                len - done,
                offset + done as u64,
            )
        };
        done += r;
        if let Some(e) = e {
            return Err(fail(offset + done as u64, e));
        }
        Ok(done)
    }
}

struct Job {
    ticket: Ticket,
    kind: CopyKind,
    src: usize,
    len: usize,
    dst: usize,
    /// CRC-32C of a host source when queued (to catch a staging buffer reused too early).
    crc: Option<u32>,
    /// The value of a [`CopyKind::WriteValue64`] (then `src` is unused).
    value: u64,
}

#[derive(Default)]
struct StreamState {
    queue: VecDeque<Job>,
    done: Ticket,
    error: Option<Error>,
    closed: bool,
}

struct StreamShared {
    state: Mutex<StreamState>,
    cond: Condvar,
}

/// The stand-in's copy stream: a worker thread executing copies in queue order.
struct HostStream {
    shared: Arc<StreamShared>,
    device: HostDevice,
    next: Ticket,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for HostStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostStream")
            .field("next", &self.next)
            .finish()
    }
}

impl HostStream {
    fn new(device: HostDevice) -> Result<HostStream> {
        let shared = Arc::new(StreamShared {
            state: Mutex::new(StreamState::default()),
            cond: Condvar::new(),
        });
        let (s, d) = (shared.clone(), device.clone());
        let worker = std::thread::Builder::new()
            .name("gpuio-cpu-copy".into())
            .spawn(move || copy_worker(&s, &d))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("cannot start copy thread: {e}"),
                )
            })?;
        Ok(HostStream {
            shared,
            device,
            next: 1,
            worker: Some(worker),
        })
    }

    fn wait_until(&self, ticket: Ticket) -> Result<()> {
        let mut st = self.shared.state.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.done >= ticket {
                return Ok(());
            }
            self.shared.cond.wait(&mut st);
        }
    }
}

fn copy_worker(shared: &StreamShared, device: &HostDevice) {
    loop {
        let job = {
            let mut st = shared.state.lock();
            loop {
                if let Some(j) = st.queue.pop_front() {
                    break j;
                }
                if st.closed {
                    return;
                }
                shared.cond.wait(&mut st);
            }
        };
        let started = Instant::now();
        // Value writes are not copies: neither delayed nor counted for `fail_copy_nth`.
        let is_copy = job.kind != CopyKind::WriteValue64;
        let n = if is_copy {
            device.0.copies_started.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        if is_copy && !device.0.cfg.copy_delay.is_zero() {
            std::thread::sleep(device.0.cfg.copy_delay);
        }
        let failed = is_copy && device.0.cfg.fail_copy_nth == Some(n);
        let mut st_err = None;
        if failed {
            st_err = Some(Error::new(
                ErrorKind::Io,
                format!(
                    "cpu device: injected failure of copy {n} ({} bytes to {:#x})",
                    job.len, job.dst
                ),
            ));
        } else if job.kind == CopyKind::WriteValue64 {
            // SAFETY: the destination was checked to lie in a live allocation, 8-aligned, when the
            // write was queued; the release store orders every earlier copy of this worker (this
            // stream) before it, as cuStreamWriteValue64's default flags do on a GPU.
            unsafe { AtomicU64::from_ptr(job.dst as *mut u64) }.store(job.value, Ordering::Release);
        } else {
            // SAFETY: the caller of copy_h2d_async keeps the source valid until this ticket is done,
            // and the destination was checked to lie in a live allocation that is not freed while
            // copies to it are pending.
            let src = unsafe { std::slice::from_raw_parts(job.src as *const u8, job.len) };
            if job.crc.is_some_and(|c| c != crc(src)) {
                // (`crc` is None when the instruments are skipped.)
                device.0.reuse_violations.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), job.dst as *mut u8, job.len) };
        }
        if !device.0.cfg.skip_instruments {
            device.0.log.lock().push(CopyRecord {
                ticket: job.ticket,
                kind: job.kind,
                dst: job.dst as u64,
                len: job.len,
                started,
                finished: Instant::now(),
            });
        }
        let mut st = shared.state.lock();
        if let Some(e) = st_err {
            // Like CUDA's sticky stream errors: every later wait reports it; queued copies are dropped.
            st.error.get_or_insert(e);
            st.queue.clear();
        } else {
            st.done = job.ticket;
        }
        shared.cond.notify_all();
    }
}

impl HostStream {
    fn enqueue(&mut self, kind: CopyKind, src: usize, len: usize, dst: usize) -> Result<Ticket> {
        self.enqueue_value(kind, src, len, dst, 0)
    }

    fn enqueue_value(
        &mut self,
        kind: CopyKind,
        src: usize,
        len: usize,
        dst: usize,
        value: u64,
    ) -> Result<Ticket> {
        let sum = match kind {
            _ if self.device.0.cfg.skip_instruments => None,
            CopyKind::HostToDevice | CopyKind::HostToDeviceMapped => {
                // SAFETY: the caller of the copy promises src..src+len is valid host memory now.
                let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, len) };
                Some(crc(bytes))
            }
            CopyKind::DeviceToHost | CopyKind::WriteValue64 => None,
        };
        let mut st = self.shared.state.lock();
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        let ticket = self.next;
        self.next += 1;
        st.queue.push_back(Job {
            ticket,
            kind,
            src,
            len,
            dst,
            crc: sum,
            value,
        });
        self.shared.cond.notify_all();
        Ok(ticket)
    }
}

impl HostStream {
    /// What a device read of pinned, mapped host memory needs on the stand-in: mapping on, the
    /// mapped address the host address itself, and the range pinned.
    fn check_mapped_read(&self, host: *const u8, mapped: DevicePtr, len: usize) -> Result<()> {
        if self.device.0.cfg.no_host_mapping {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the cpu stand-in was configured without host mapping",
            ));
        }
        if mapped != host as u64 {
            return Err(Error::invalid(format!(
                "mapped address {mapped:#x} is not the device address of host {:#x}",
                host as usize
            )));
        }
        self.device.check_pinned(host as usize, len)
    }
}

impl CopyStream for HostStream {
    unsafe fn copy_h2d_async(
        &mut self,
        src: *const u8,
        len: usize,
        dst: DevicePtr,
    ) -> Result<Ticket> {
        self.device.check_range(dst, len)?;
        self.enqueue(CopyKind::HostToDevice, src as usize, len, dst as usize)
    }
    unsafe fn copy_d2h_async(
        &mut self,
        src: DevicePtr,
        dst: *mut u8,
        len: usize,
    ) -> Result<Ticket> {
        self.device.check_range_in(src, len, true)?;
        self.enqueue(CopyKind::DeviceToHost, src as usize, len, dst as usize)
    }
    unsafe fn copy_h2d_mapped_async(
        &mut self,
        src_host: *const u8,
        src_mapped: DevicePtr,
        len: usize,
        dst: DevicePtr,
    ) -> Result<Ticket> {
        self.check_mapped_read(src_host, src_mapped, len)?;
        self.device.check_range(dst, len)?;
        self.enqueue(
            CopyKind::HostToDeviceMapped,
            src_host as usize,
            len,
            dst as usize,
        )
    }
    unsafe fn write_u64_async(&mut self, dst: DevicePtr, value: u64) -> Result<Ticket> {
        if dst % 8 != 0 {
            return Err(Error::invalid(format!(
                "stream value write to {dst:#x}: not 8-aligned"
            )));
        }
        self.device.check_range(dst, 8)?;
        self.enqueue_value(CopyKind::WriteValue64, 0, 8, dst as usize, value)
    }
    unsafe fn deliver_async(
        &mut self,
        descs_host: *const DeliveryDesc,
        descs_mapped: DevicePtr,
        n: usize,
    ) -> Result<Ticket> {
        // The stand-in makes each delivery a mapped copy and a value write, checked as those are;
        // it reads the descriptors now, where a GPU reads them when the launch runs.
        let bytes = n * std::mem::size_of::<DeliveryDesc>();
        self.check_mapped_read(descs_host as *const u8, descs_mapped, bytes)?;
        let mut last = None;
        for k in 0..n {
            // SAFETY: per the caller, n descriptors are readable at descs_host.
            let d = unsafe { descs_host.add(k).read() };
            if d.len > 0 {
                // SAFETY: per the caller (the stand-in's mapped addresses are host addresses).
                last = Some(unsafe {
                    self.copy_h2d_mapped_async(d.src as *const u8, d.src, d.len as usize, d.dst)?
                });
            }
            if d.word_addr != 0 {
                // SAFETY: per the caller.
                last = Some(unsafe { self.write_u64_async(d.word_addr, d.word)? });
            }
        }
        match last {
            Some(t) => Ok(t),
            None => Ok(self.next - 1),
        }
    }
    fn preload_deliver(&mut self) -> Result<()> {
        Ok(()) // the stand-in's deliveries are host code, always loaded
    }
    fn is_done(&mut self, ticket: Ticket) -> Result<bool> {
        let st = self.shared.state.lock();
        match &st.error {
            Some(e) => Err(e.clone()),
            None => Ok(st.done >= ticket),
        }
    }
    fn wait(&mut self, ticket: Ticket) -> Result<()> {
        self.wait_until(ticket)
    }
    fn synchronize(&mut self) -> Result<()> {
        self.wait_until(self.next - 1)
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        // Finish what was queued (its sources are still valid: their owners wait on us), then stop.
        {
            let mut st = self.shared.state.lock();
            st.closed = true;
            self.shared.cond.notify_all();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
