//! The two memory regions of a ring set, allocated through the [`Device`] abstraction so the same
//! code serves a GPU and the host stand-in:
//!
//! - the host region: an [`AlignedBuf`] page-locked with [`Device::pin_host`], which on a GPU maps it
//!   into the device's address space (the address kernels use is [`RingRegion::host_mapped`]);
//! - the device region: a [`DeviceBuffer`], initialised with one host → device copy.
//!
//! Nothing here knows how a kernel or a CPU producer touches the memory; see `producer` and
//! `docs/rings.md`.

use std::sync::Arc;

use gpuio::{AlignedBuf, Error, ErrorKind, Result};

use super::layout::{
    Layout, RegionHeader, RequestSlot, RingConfig, RingControl, DEVICE_HEADER_BYTES, SERVER_SERVING,
};
use crate::device::{Device, DeviceBuffer, DevicePtr};

/// A ring set's host and device regions.
pub struct RingRegion {
    layout: Layout,
    device: Arc<dyn Device>,
    host: AlignedBuf,
    host_base: *mut u8,
    host_mapped: Option<DevicePtr>,
    pinned: bool,
    dev: DeviceBuffer,
}

impl std::fmt::Debug for RingRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingRegion")
            .field("layout", &self.layout)
            .field("device", &self.device.label())
            .field("host_mapped", &self.host_mapped)
            .field("dev", &self.dev)
            .finish()
    }
}

// SAFETY: the host region is only accessed through atomics (slot words, indices, server state) or
// fields written once before the region is shared; the raw pointer points into `host`, which lives as
// long as `self`.
unsafe impl Send for RingRegion {}
// SAFETY: as above.
unsafe impl Sync for RingRegion {}

impl RingRegion {
    /// Allocates, initialises and pins the regions for `config` on `device`.
    pub fn new(device: &Arc<dyn Device>, config: RingConfig) -> Result<RingRegion> {
        let layout = Layout::new(config)?;
        let mut host = AlignedBuf::new(layout.host_bytes, 4096)?;
        let host_base = host.as_mut_ptr();
        // SAFETY: the buffer is at least HEADER_BYTES long, 4096-aligned, zeroed, and not shared yet.
        unsafe { std::ptr::write(host_base as *mut RegionHeader, layout.header()) };
        // Slot state words and ring control blocks start at zero: SLOT_FREE, lap 0; head 0.
        // SAFETY: `host` stays allocated (owned by the region) until Drop unpins it.
        let pinned = unsafe { device.pin_host(host_base, layout.host_bytes)? };
        let host_mapped = pinned.and_then(|p| p.mapped);
        let dev = match Self::init_device(device, &layout) {
            Ok(d) => d,
            Err(e) => {
                if pinned.is_some() {
                    // SAFETY: pinned above, no copy reads it.
                    unsafe { device.unpin_host(host_base, layout.host_bytes) };
                }
                return Err(e);
            }
        };
        Ok(RingRegion {
            layout,
            device: device.clone(),
            host,
            host_base,
            host_mapped,
            pinned: pinned.is_some(),
            dev,
        })
    }

    fn init_device(device: &Arc<dyn Device>, layout: &Layout) -> Result<DeviceBuffer> {
        let dev = DeviceBuffer::alloc(device, layout.device_bytes)?;
        let mut image = AlignedBuf::new(layout.device_bytes, 4096)?;
        let dh = layout.device_header();
        // SAFETY: the image is at least DEVICE_HEADER_BYTES long and aligned; tails and completion
        // words stay zero.
        unsafe { std::ptr::write(image.as_mut_ptr() as *mut _, dh) };
        debug_assert!(layout.device_bytes >= DEVICE_HEADER_BYTES);
        let mut stream = device.copy_stream()?;
        // SAFETY: `image` lives until the stream is synchronized below; `dev` is a live allocation of
        // exactly this size.
        unsafe { stream.copy_h2d_async(image.as_ptr(), layout.device_bytes, dev.ptr())? };
        stream.synchronize()?;
        Ok(dev)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }
    /// The host region's first byte (host address).
    pub fn host_ptr(&self) -> *mut u8 {
        self.host_base
    }
    /// The host region's address in the device's address space (what kernels are given), if the
    /// device maps host memory.
    pub fn host_mapped(&self) -> Option<DevicePtr> {
        self.host_mapped
    }
    /// The device region's first byte.
    pub fn device_ptr(&self) -> DevicePtr {
        self.dev.ptr()
    }
    /// The device address of completion word `i`.
    pub fn completion_addr(&self, i: u32) -> DevicePtr {
        self.dev.ptr() + self.layout.completion(i) as u64
    }
    /// The device address of ring `r`'s tail.
    pub fn tail_addr(&self, r: u32) -> DevicePtr {
        self.dev.ptr() + self.layout.tail(r) as u64
    }
    /// The device address of ring `r`'s taken hint (docs/rings.md, 1.5), 8 bytes after its tail.
    pub fn taken_addr(&self, r: u32) -> DevicePtr {
        self.tail_addr(r) + 8
    }

    pub fn header(&self) -> &RegionHeader {
        // SAFETY: written in `new`; only its atomic field changes afterwards.
        unsafe { &*(self.host_base as *const RegionHeader) }
    }
    pub fn ring_control(&self, r: u32) -> &RingControl {
        assert!(r < self.layout.config.ring_count);
        // SAFETY: inside the host region (checked index), aligned to 64, all-atomic fields.
        unsafe { &*(self.host_base.add(self.layout.ring_control(r)) as *const RingControl) }
    }
    pub fn slot(&self, r: u32, i: u32) -> &RequestSlot {
        assert!(r < self.layout.config.ring_count && i < self.layout.config.slots_per_ring);
        // SAFETY: inside the host region (checked indices), aligned to 64; the fields that change
        // are atomics.
        unsafe { &*(self.host_base.add(self.layout.slot(r, i)) as *const RequestSlot) }
    }
    /// Whether producers may submit (the header's server state is `SERVER_SERVING`).
    pub fn serving(&self) -> bool {
        self.header()
            .server_state
            .load(std::sync::atomic::Ordering::Acquire)
            == SERVER_SERVING
    }

    /// Fails unless the device region's memory is host memory at its device addresses (the
    /// [`HostDevice`](crate::HostDevice) stand-in): what CPU producers and the store publisher need.
    pub fn require_host_addressable(&self) -> Result<()> {
        if self.device.label() == "cpu" {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: device memory is not host-addressable (CPU ring producers need the cpu stand-in)",
                    self.device.label()
                ),
            ))
        }
    }
}

impl Drop for RingRegion {
    fn drop(&mut self) {
        if self.pinned {
            // SAFETY: pinned in `new`; the server (which holds an Arc to us) has stopped.
            unsafe {
                self.device
                    .unpin_host(self.host_base, self.layout.host_bytes)
            };
        }
        let _ = &self.host;
    }
}
