//! Zero-copy loads: a safetensors file mapped read-only into memory and into the device's address
//! space, so device code reads each tensor in place over the interconnect and nothing is copied up
//! front — the CUDA analog of Metal's `makeBuffer(bytesNoCopy:)` (findings 223, 592).
//!
//! What it costs and when it pays: registering the mapping pins its pages (the driver faults the
//! whole file in, so "loading" reads the file once into the page cache, pinned there for as long as
//! the [`MappedModel`] lives), and every later device access crosses PCIe instead of reading HBM. It
//! pays for data touched once or sparsely (a lookup table, late materialization); for weights read
//! again and again, the staged or direct loads into device memory are the right path.
//!
//! The header is validated in full before anything is mapped. The file must not be truncated while
//! mapped (as with any `mmap`, the process would get `SIGBUS` on access).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use gpuio::{Error, ErrorKind, Result};

use crate::device::{Device, DevicePtr};
use crate::loader::{
    device_checksum, device_tensors, DeviceTensor, LoadPath, LoadStats, LoaderConfig,
};
use crate::safetensors::{self, Header};

/// A safetensors file whose bytes the device reads in place.
pub struct MappedModel {
    device: Arc<dyn Device>,
    map: memmap2::Mmap,
    /// Bytes registered with the device (the mapping rounded up to whole pages).
    registered: usize,
    /// Device address of the file's first byte.
    base: DevicePtr,
    pub tensors: Vec<DeviceTensor>,
    pub metadata: Vec<(String, String)>,
    pub stats: LoadStats,
}

impl std::fmt::Debug for MappedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedModel")
            .field("device", &self.device.label())
            .field("bytes", &self.map.len())
            .field("base", &format_args!("{:#x}", self.base))
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Maps the safetensors file at `path` read-only into `device`'s address space; tensors'
/// `device_ptr`s point into the mapping (`offset` is relative to the body, as for staged loads).
/// [`ErrorKind::Unsupported`], with the device's reason, where it cannot map host memory.
pub fn map_safetensors(device: &Arc<dyn Device>, path: &Path) -> Result<MappedModel> {
    let header = safetensors::read_header(path)?;
    map_with_header(device, path, &header)
}

/// Like [`map_safetensors`] with a header already read and validated.
pub fn map_with_header(
    device: &Arc<dyn Device>,
    path: &Path,
    header: &Header,
) -> Result<MappedModel> {
    let started = Instant::now();
    let file = std::fs::File::open(path)
        .map_err(|e| Error::from_io(gpuio::error::Op::Open, &e).with_path(path))?;
    // SAFETY: a read-only private mapping; the module docs state the truncation hazard of any mmap.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::from_io(gpuio::error::Op::Open, &e).with_path(path))?;
    let expected = header.body_offset + header.body_len;
    if map.len() as u64 != expected {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "safetensors: file changed since its header was read ({} bytes, expected {expected})",
                map.len()
            ),
        )
        .with_path(path));
    }
    // SAFETY: sysconf only reads a constant.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let registered = map.len().div_ceil(page) * page;
    // SAFETY: the mapping covers whole pages up to `registered` and lives in the MappedModel, which
    // unmaps it from the device before dropping it.
    let base = unsafe { device.map_host_read_only(map.as_ptr(), registered) }
        .map_err(|e| e.with_context(format!("mapping {} for zero-copy access", path.display())))?;
    let tensors = device_tensors(header, base + header.body_offset);
    let mut stats = LoadStats::empty(LoadPath::ZeroCopy, &LoaderConfig::default());
    stats.bytes = header.body_len;
    stats.seconds = started.elapsed().as_secs_f64();
    stats.staging_buffers = 0;
    stats.staging_bytes = 0;
    stats.note = "no copy: the file's pages are pinned in host memory while mapped, and the device reads them over the interconnect on every access".into();
    Ok(MappedModel {
        device: device.clone(),
        map,
        registered,
        base,
        tensors,
        metadata: header.metadata.clone(),
        stats,
    })
}

impl MappedModel {
    /// Device address of the file's first byte.
    pub fn base(&self) -> DevicePtr {
        self.base
    }
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }
    /// CRC-32C of a tensor's bytes as the device reads them (through the device, not the mapping).
    pub fn crc32c(&self, tensor: &DeviceTensor) -> Result<u32> {
        self.checksum(tensor, crc_fast::CrcAlgorithm::Crc32Iscsi)
    }
    /// CRC-32 (IEEE) of a tensor's bytes as the device reads them.
    pub fn crc32_ieee(&self, tensor: &DeviceTensor) -> Result<u32> {
        self.checksum(tensor, crc_fast::CrcAlgorithm::Crc32IsoHdlc)
    }
    fn checksum(&self, tensor: &DeviceTensor, algorithm: crc_fast::CrcAlgorithm) -> Result<u32> {
        let end = tensor.device_ptr.checked_add(tensor.bytes);
        if tensor.device_ptr < self.base
            || end.is_none_or(|e| e > self.base + self.map.len() as u64)
        {
            return Err(Error::invalid(format!(
                "tensor '{}' is outside the mapped file",
                tensor.name
            )));
        }
        device_checksum(
            self.device.as_ref(),
            tensor.device_ptr,
            tensor.bytes,
            algorithm,
        )
    }
}

impl Drop for MappedModel {
    fn drop(&mut self) {
        // SAFETY: mapped in map_with_header with this length; the mapping is still alive (dropped
        // after this) and nothing on the device is left reading it once its owner drops the model.
        unsafe { self.device.unmap_host(self.map.as_ptr(), self.registered) };
    }
}
