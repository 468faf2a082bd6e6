//! Completion publishers: how the ring server makes a round's completion words visible in device
//! memory, ordered after the round's data copies (docs/rings.md, "Completion", step 7).
//!
//! - [`StreamWritePublish`] queues one stream-ordered value write per word on the copy stream
//!   ([`CopyStream::write_u64_async`]: `cuStreamWriteValue64_v2` on a GPU, whose default flags make
//!   the write wait for the stream's earlier copies and flush their bytes first). The host does not
//!   wait for anything.
//! - [`CopyWordPublish`] is the fallback where the driver or device has no usable stream write: the
//!   words go into a small page-locked staging array and are copied to the device with
//!   `copy_h2d_async` on the same stream, after the data. Stream order still puts each word after its
//!   data, and the host still does not wait; it costs one DMA per run of adjacent words.
//! - [`HostStorePublish`](super::HostStorePublish) (in `server`) is the host stand-in's: wait for the
//!   copies, then store each word with release ordering at its (host) address.
//!
//! [`PublisherChoice::for_device`] picks one and says why; `gpuio info` shows that choice. A
//! publisher never decides results and never touches request slots: it only writes the words it is
//! given, after the copies already queued on the stream it is given.

use std::fmt;
use std::sync::Arc;

use gpuio::{AlignedBuf, Error, ErrorKind, Result};

use super::server::Publish;
use crate::device::{CopyStream, Device, DevicePtr, Ticket};

/// How completion words reach device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherKind {
    /// A stream-ordered value write per word on the copy stream ([`StreamWritePublish`]).
    StreamWrite,
    /// A copy from pinned staging words on the copy stream ([`CopyWordPublish`]).
    CopyWord,
    /// A host store after waiting for the copies (the stand-in's
    /// [`HostStorePublish`](super::HostStorePublish); never chosen automatically).
    HostStore,
}

impl PublisherKind {
    /// `stream-write`, `copy-word` or `host-store`.
    pub fn name(self) -> &'static str {
        match self {
            PublisherKind::StreamWrite => "stream-write",
            PublisherKind::CopyWord => "copy-word",
            PublisherKind::HostStore => "host-store",
        }
    }
}

impl fmt::Display for PublisherKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The publisher a device gets, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherChoice {
    pub kind: PublisherKind,
    pub reason: String,
}

impl PublisherChoice {
    /// [`PublisherKind::StreamWrite`] where the device's streams write values in stream order
    /// ([`Device::stream_write_u64`]), else [`PublisherKind::CopyWord`], with the device's reason.
    pub fn for_device(device: &dyn Device) -> PublisherChoice {
        match device.stream_write_u64() {
            Ok(how) => PublisherChoice {
                kind: PublisherKind::StreamWrite,
                reason: how,
            },
            Err(why) => PublisherChoice {
                kind: PublisherKind::CopyWord,
                reason: format!(
                    "{why}; so each round's completion words are copied from pinned host memory on the copy stream after the data (one DMA per run of adjacent words, no host wait)"
                ),
            },
        }
    }

    /// A publisher of this kind for one polling thread, whose rounds publish at most `words` words
    /// at a time (more are published in several copies). [`PublisherKind::HostStore`] is refused:
    /// it is only safe where device addresses are host addresses, which the caller must vouch for
    /// with `unsafe { HostStorePublish::new() }` itself.
    pub fn make(&self, device: &Arc<dyn Device>, words: usize) -> Result<Box<dyn Publish>> {
        match self.kind {
            PublisherKind::StreamWrite => Ok(Box::new(StreamWritePublish::default())),
            PublisherKind::CopyWord => Ok(Box::new(CopyWordPublish::new(device, words)?)),
            PublisherKind::HostStore => Err(Error::new(
                ErrorKind::Unsupported,
                "the host-store publisher is made by hand (HostStorePublish::new), never chosen",
            )),
        }
    }
}

/// Publishes each word with [`CopyStream::write_u64_async`] on the copy stream, after the copies.
#[derive(Debug, Default)]
pub struct StreamWritePublish {
    _private: (),
}

impl Publish for StreamWritePublish {
    fn publish(
        &mut self,
        stream: &mut dyn CopyStream,
        _after: Option<Ticket>,
        words: &[(DevicePtr, u64)],
    ) -> Result<()> {
        // Stream order alone places every write after the copies queued before it: nothing to wait
        // for on the host. One call for the round (one context bind and one event on a GPU).
        // SAFETY: completion words lie inside the ring set's device region (a live allocation),
        // 8-aligned (docs/rings.md, 1.6).
        unsafe { stream.write_u64_many(words)? };
        Ok(())
    }
}

/// Publishes words by copying them from a page-locked staging array on the copy stream, after the
/// copies: adjacent completion words (sorted by address) go in one copy.
pub struct CopyWordPublish {
    device: Arc<dyn Device>,
    buf: AlignedBuf,
    /// Words the staging array holds.
    capacity: usize,
    pinned: bool,
    /// The ticket of the last copy out of the staging array: it is not rewritten before that copy
    /// ran.
    last: Option<Ticket>,
}

impl fmt::Debug for CopyWordPublish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyWordPublish")
            .field("device", &self.device.label())
            .field("capacity", &self.capacity)
            .field("pinned", &self.pinned)
            .finish()
    }
}

// SAFETY: the staging array is owned and only touched by the thread holding `&mut self` (and by the
// stream's copies, which `last` tracks).
unsafe impl Send for CopyWordPublish {}

impl CopyWordPublish {
    /// A staging array of `words` (at least 1) words, page-locked on `device`.
    pub fn new(device: &Arc<dyn Device>, words: usize) -> Result<CopyWordPublish> {
        let capacity = words.max(1);
        let bytes = (capacity * 8).next_multiple_of(4096);
        let mut buf = AlignedBuf::new(bytes, 4096)?;
        // SAFETY: `buf` is owned by the value returned and unpinned in Drop before it is freed.
        let pinned = unsafe { device.pin_host(buf.as_mut_ptr(), bytes)? }.is_some();
        Ok(CopyWordPublish {
            device: device.clone(),
            buf,
            capacity,
            pinned,
            last: None,
        })
    }
}

impl Publish for CopyWordPublish {
    fn publish(
        &mut self,
        stream: &mut dyn CopyStream,
        _after: Option<Ticket>,
        words: &[(DevicePtr, u64)],
    ) -> Result<()> {
        let mut sorted = words.to_vec();
        sorted.sort_unstable_by_key(|w| w.0);
        for chunk in sorted.chunks(self.capacity) {
            // The previous copies out of the array must have run before it is rewritten.
            if let Some(t) = self.last.take() {
                stream.wait(t)?;
            }
            let base = self.buf.as_mut_ptr() as *mut u64;
            for (i, &(_, w)) in chunk.iter().enumerate() {
                // SAFETY: i < capacity words of the owned, 8-aligned array; no copy reads it now.
                unsafe { base.add(i).write(w.to_le()) };
            }
            let mut i = 0;
            while i < chunk.len() {
                let mut j = i + 1;
                while j < chunk.len() && chunk[j].0 == chunk[j - 1].0 + 8 {
                    j += 1;
                }
                // SAFETY: the source lies in the owned staging array, which is not rewritten before
                // this copy's ticket completes (`last`) and not freed before the stream is dropped or
                // synchronized (the server's contract, see `Publish`); the destination is a run of
                // completion words in the ring set's device region.
                let t = unsafe {
                    stream.copy_h2d_async(base.add(i) as *const u8, (j - i) * 8, chunk[i].0)?
                };
                self.last = Some(t);
                i = j;
            }
        }
        Ok(())
    }

    fn stream_replaced(&mut self) {
        // The old stream was dropped, which waits for its queued copies: nothing reads the array.
        self.last = None;
    }
}

impl Drop for CopyWordPublish {
    fn drop(&mut self) {
        if self.pinned {
            // SAFETY: pinned in `new`; the server drops its copy stream (which waits for queued
            // copies) before its publisher.
            unsafe {
                self.device
                    .unpin_host(self.buf.as_mut_ptr(), self.buf.len())
            };
        }
    }
}

/// What `gpuio info` says about request rings on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingsInfo {
    /// Whether kernels can reach the host region (`CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY`), or why
    /// that is unknown.
    pub can_map_host_memory: std::result::Result<bool, String>,
    /// The completion publisher [`RingServer::start_auto`](super::RingServer::start_auto) would use.
    pub publisher: PublisherChoice,
    /// Largest line copied by programmed I/O instead of DMA (0: DMA at every size).
    pub pio_max_bytes: usize,
    /// Why that threshold.
    pub pio_reason: String,
}

/// The rings' view of `device`: host mapping, publisher, line copy threshold.
pub fn rings_info(device: &dyn Device) -> RingsInfo {
    let pio = crate::loader::PIO_MAX_BYTES_DEFAULT;
    RingsInfo {
        can_map_host_memory: device.can_map_host_memory(),
        publisher: PublisherChoice::for_device(device),
        pio_max_bytes: pio,
        pio_reason: if pio == 0 {
            "lines are copied to the device by DMA at every size (the programmed-I/O threshold is 0): on an H200 a DMA beat the programmed-I/O copy at every size from 64 B to 1 MiB, one copy at a time (gpuio bench --pio-sweep, docs/gpu-runs/2026-11-28-h200-issue12-run1/); --delivery kernel instead has one launch per polling round read all of its lines in place (about 6 x the requests per second on an H200: docs/gpu-runs/2026-11-28-h200-run8/ to -run11/)".into()
        } else {
            format!("lines of at most {pio} bytes would be copied by programmed I/O")
        },
    }
}
