//! How the ring server hands a polling round's read data and completion words to the device.
//!
//! [`DeliveryPath::Copies`] queues, per request, one host → device copy out of the staging slab and
//! one completion-word publish (a stream value write on a GPU): two stream operations per request.
//! On an H200 (docs/gpu-runs/2026-11-28-h200-run6) that path served about 0.2 M 4 KiB requests/s
//! whether 2, 4 or 8 polling threads fed it, so the device side, not the host, set the pace.
//! [`DeliveryPath::Kernel`] makes the whole round one launch of `gpuio_deliver`
//! (`kernels/copy.cu`): its blocks read each request's bytes in place from the page-locked, mapped
//! staging slab, store them, fence, and then write the request's completion word, so a kernel that
//! acquires the word sees the bytes (the same order a stream value write after a copy gives).
//!
//! A [`DeliverySlab`] is one polling thread's descriptor array: page-locked and mapped, written by
//! the thread and read by the launch. It must never be rewritten before the stream that reads it
//! was synchronized (the server synchronizes after every round), and never unpinned while a launch
//! may read it (the server's worker drains its stream before its fields, this one included, drop).

use std::fmt;
use std::sync::Arc;

use gpuio::{AlignedBuf, Error, ErrorKind, Result};

use crate::device::{CopyStream, DeliveryDesc, Device, DevicePtr, Ticket};

/// How the ring server moves a round's read data to the device and publishes its completions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeliveryPath {
    /// A copy and a published word per request (the copy engine's DMA, the publisher's writes).
    #[default]
    Copies,
    /// One `gpuio_deliver` launch per round, reading the staging slab in place; where the device
    /// cannot (no mapped page-locked memory, no kernel), the server says why and uses copies.
    Kernel,
}

impl std::str::FromStr for DeliveryPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "copies" => Ok(DeliveryPath::Copies),
            "kernel" => Ok(DeliveryPath::Kernel),
            _ => Err(Error::invalid(format!(
                "delivery {s:?}: one of \"copies\", \"kernel\""
            ))),
        }
    }
}

/// One polling thread's descriptor array for [`DeliveryPath::Kernel`], page-locked and mapped into
/// the device; unpinned when dropped.
pub struct DeliverySlab {
    device: Arc<dyn Device>,
    buf: AlignedBuf,
    bytes: usize,
    mapped: DevicePtr,
    capacity: usize,
}

impl fmt::Debug for DeliverySlab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliverySlab")
            .field("device", &self.device.label())
            .field("capacity", &self.capacity)
            .finish()
    }
}

// SAFETY: the array is owned and only touched by the thread holding `&mut self` (and by launches
// that thread queued and synchronizes before it writes again).
unsafe impl Send for DeliverySlab {}

impl DeliverySlab {
    /// An array of `capacity` descriptors (at least 1), page-locked and mapped on `device`.
    /// `Ok(Err(why))`, with nothing left pinned, where the device cannot map page-locked memory.
    pub fn new(
        device: &Arc<dyn Device>,
        capacity: usize,
    ) -> Result<std::result::Result<DeliverySlab, String>> {
        let capacity = capacity.max(1);
        let bytes = (capacity * std::mem::size_of::<DeliveryDesc>()).next_multiple_of(4096);
        let mut buf = AlignedBuf::new(bytes, 4096)?;
        // SAFETY: `buf` is owned by the value returned (or freed below after unpinning) and unpinned
        // in Drop before it is freed.
        let pinned = match unsafe { device.pin_host(buf.as_mut_ptr(), bytes) } {
            Ok(p) => p,
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                return Ok(Err(format!(
                    "{} cannot page-lock host memory: {e}",
                    device.label()
                )))
            }
            Err(e) => return Err(e),
        };
        match pinned.and_then(|p| p.mapped) {
            Some(mapped) => Ok(Ok(DeliverySlab {
                device: device.clone(),
                buf,
                bytes,
                mapped,
                capacity,
            })),
            None => {
                if pinned.is_some() {
                    // SAFETY: pinned just above; never read by the device.
                    unsafe { device.unpin_host(buf.as_mut_ptr(), bytes) };
                }
                Ok(Err(format!(
                    "{} does not map page-locked host memory into the device",
                    device.label()
                )))
            }
        }
    }

    /// Most descriptors one [`launch`](Self::launch) takes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `descs` into the array and queues their delivery on `stream`; returns its ticket.
    ///
    /// # Safety
    /// Every descriptor's source is mapped page-locked memory and its destination and word lie in
    /// live device allocations, all of them valid until the ticket completes; no launch queued
    /// earlier from this array may still be pending (the caller synchronized the stream).
    pub unsafe fn launch(
        &mut self,
        stream: &mut dyn CopyStream,
        descs: &[DeliveryDesc],
    ) -> Result<Ticket> {
        if descs.len() > self.capacity {
            return Err(Error::invalid(format!(
                "{} deliveries for an array of {}",
                descs.len(),
                self.capacity
            )));
        }
        let base = self.buf.as_mut_ptr() as *mut DeliveryDesc;
        for (k, d) in descs.iter().enumerate() {
            // SAFETY: k < capacity descriptors of the owned, 4096-aligned array; no launch reads it
            // now (per the caller).
            unsafe { base.add(k).write(*d) };
        }
        // SAFETY: per the caller; the array is pinned and mapped at `mapped` and stays so.
        unsafe { stream.deliver_async(base, self.mapped, descs.len()) }
    }
}

impl Drop for DeliverySlab {
    fn drop(&mut self) {
        // SAFETY: pinned in `new` on this device; no launch reads it any more (module docs).
        unsafe { self.device.unpin_host(self.buf.as_mut_ptr(), self.bytes) };
    }
}
