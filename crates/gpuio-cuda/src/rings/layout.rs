//! The ring protocol's memory layout, byte for byte as `docs/rings.md` specifies it (version 1.0),
//! and the constants both sides share with `device/gpuio.cuh`.
//!
//! Two regions:
//!
//! - the **host region** (host memory, page-locked and mapped into the device's address space on a
//!   GPU): [`RegionHeader`], one [`RingControl`] per ring, then every ring's [`RequestSlot`]s;
//! - the **device region** (device memory): [`DeviceHeader`], one [`RingTail`] per ring (the
//!   producers' claim counter, touched only by device threads), then the completion words (one
//!   `u64` each: tag in the high half, result in the low half), written by the host, polled by
//!   kernels in their own memory.
//!
//! Every struct is `#[repr(C)]`, little-endian, with its size and each field's offset pinned by the
//! unit tests below; fields that change after set-up are atomics of the same size as the integer the
//! spec names.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64};

use gpuio::{Error, Result};

/// `"GPRQ"`: the host region's magic (little-endian `u32`).
pub const MAGIC: u32 = u32::from_le_bytes(*b"GPRQ");
/// `"GPRD"`: the device region's magic.
pub const DEVICE_MAGIC: u32 = u32::from_le_bytes(*b"GPRD");
/// Incompatible layout changes bump the major version; readers refuse another major.
pub const VERSION_MAJOR: u16 = 1;
/// Compatible additions (a reserved field given a meaning that zero keeps off) bump the minor.
pub const VERSION_MINOR: u16 = 1;

pub const HEADER_BYTES: usize = 128;
pub const RING_CONTROL_BYTES: usize = 64;
pub const SLOT_BYTES: usize = 64;
pub const DEVICE_HEADER_BYTES: usize = 64;
pub const RING_TAIL_BYTES: usize = 64;
pub const COMPLETION_BYTES: usize = 8;

/// Most rings in one region.
pub const RINGS_MAX: u32 = 1024;
/// Most slots in one ring (a power of two).
pub const SLOTS_PER_RING_MAX: u32 = 1 << 16;
/// Most completion words.
pub const COMPLETIONS_MAX: u32 = 1 << 24;
/// Largest request (bytes).
pub const REQUEST_BYTES_MAX: u32 = 16 << 20;

// ---- request slot state word: `lap << 32 | state` -------------------------------------------------

/// The slot may be claimed by the producer whose position is in this lap. Written by the host (after
/// copying the previous lap's descriptor out), or zero at set-up (lap 0).
pub const SLOT_FREE: u32 = 0;
/// A producer won the slot's position and is writing the descriptor. Written by that producer.
pub const SLOT_CLAIMED: u32 = 1;
/// The descriptor is complete. Written by the producer, release ordering, after the descriptor.
pub const SLOT_SUBMITTED: u32 = 2;

/// A slot state word.
#[inline]
pub const fn slot_word(lap: u32, state: u32) -> u64 {
    ((lap as u64) << 32) | state as u64
}
/// The lap of a slot state word.
#[inline]
pub const fn slot_lap(w: u64) -> u32 {
    (w >> 32) as u32
}
/// The state of a slot state word.
#[inline]
pub const fn slot_state(w: u64) -> u32 {
    w as u32
}

// ---- opcodes ----------------------------------------------------------------------------------------

/// Read `length` bytes of the file at `offset` into device memory at `dev_addr`.
pub const OP_READ: u16 = 1;
/// Write `length` bytes of device memory at `dev_addr` to the file at `offset`.
pub const OP_WRITE: u16 = 2;
/// Completes after every write taken from the same ring before it has completed (no durability).
pub const OP_FLUSH: u16 = 3;
/// Like [`OP_FLUSH`], then `fdatasync` of the file.
pub const OP_FSYNC: u16 = 4;

// ---- server state (RegionHeader::server_state) ---------------------------------------------------

pub const SERVER_INIT: u32 = 0;
pub const SERVER_SERVING: u32 = 1;
pub const SERVER_STOPPING: u32 = 2;
pub const SERVER_STOPPED: u32 = 3;

// ---- result codes (negative, Linux errno values) -------------------------------------------------

/// Result codes: a completion's result is the bytes transferred (≥ 0) or one of these.
pub mod code {
    /// The file could not be read or written (EIO from storage, a failed device copy).
    pub const EIO: i32 = -5;
    /// No file is registered under the request's file id.
    pub const EBADF: i32 = -9;
    /// The ring is full (returned to the producer, never in a completion).
    pub const EAGAIN: i32 = -11;
    /// A write to a file opened read-only.
    pub const EACCES: i32 = -13;
    /// The device address range is outside the window registered with the server.
    pub const EFAULT: i32 = -14;
    /// Device cache: every line is pinned (or busy); nothing can be evicted now.
    pub const EBUSY: i32 = -16;
    /// Malformed request: unknown opcode, zero or oversized length, nonzero reserved field.
    pub const EINVAL: i32 = -22;
    /// The file system is full.
    pub const ENOSPC: i32 = -28;
    /// `offset + length` lies beyond the end of the file.
    pub const ERANGE: i32 = -34;
    /// The file ended before the request's last byte (it shrank after registration).
    pub const ENODATA: i32 = -61;
    /// Device cache: a line's pin count would overflow.
    pub const EOVERFLOW: i32 = -75;
    /// The server is stopping or stopped: the request was not served.
    pub const ESHUTDOWN: i32 = -108;
    /// A bounded wait ran out (device side; the host's I/O timeout).
    pub const ETIMEDOUT: i32 = -110;
    /// The I/O was cancelled.
    pub const ECANCELED: i32 = -125;

    /// A short name for a code (`"EIO"`), or `"?"`.
    pub fn name(c: i32) -> &'static str {
        match c {
            EIO => "EIO",
            EBADF => "EBADF",
            EAGAIN => "EAGAIN",
            EACCES => "EACCES",
            EFAULT => "EFAULT",
            EBUSY => "EBUSY",
            EINVAL => "EINVAL",
            ENOSPC => "ENOSPC",
            ERANGE => "ERANGE",
            ENODATA => "ENODATA",
            EOVERFLOW => "EOVERFLOW",
            ESHUTDOWN => "ESHUTDOWN",
            ETIMEDOUT => "ETIMEDOUT",
            ECANCELED => "ECANCELED",
            _ => "?",
        }
    }
}

/// A completion word: the request's tag in the high half, its result in the low half.
#[inline]
pub const fn completion_word(tag: u32, result: i32) -> u64 {
    ((tag as u64) << 32) | (result as u32 as u64)
}
/// The tag of a completion word.
#[inline]
pub const fn completion_tag(w: u64) -> u32 {
    (w >> 32) as u32
}
/// The result of a completion word.
#[inline]
pub const fn completion_result(w: u64) -> i32 {
    w as u32 as i32
}

// ---- structs ----------------------------------------------------------------------------------------

/// Offset 0 of the host region (128 bytes). Written once by the host before serving; only
/// `server_state` changes afterwards.
#[repr(C)]
#[derive(Debug)]
pub struct RegionHeader {
    pub magic: u32,
    pub version_major: u16,
    pub version_minor: u16,
    pub header_bytes: u32,
    pub ring_count: u32,
    pub slots_per_ring: u32,
    pub slot_bytes: u32,
    /// The device cache's line size (0: no cache uses this region).
    pub line_bytes: u32,
    pub completion_count: u32,
    /// Host region offsets.
    pub rings_offset: u64,
    pub slots_offset: u64,
    pub host_bytes: u64,
    pub device_bytes: u64,
    /// Device region offsets.
    pub tails_offset: u64,
    pub completions_offset: u64,
    /// `SERVER_*`, written by the host.
    pub server_state: AtomicU32,
    pub max_request_bytes: u32,
    pub reserved: [u64; 5],
}

/// One per ring in the host region (64 bytes): the host's consumer position and counters. Written
/// by the host only; informational for producers (they never need it: slot state words carry
/// fullness).
#[repr(C)]
#[derive(Debug)]
pub struct RingControl {
    /// Next position the host consumes.
    pub head: AtomicU64,
    /// Requests completed from this ring.
    pub completed: AtomicU64,
    pub reserved: [u64; 6],
}

/// One request (64 bytes) in the host region.
#[repr(C)]
#[derive(Debug)]
pub struct RequestSlot {
    /// `lap << 32 | SLOT_*`.
    pub state: AtomicU64,
    pub opcode: AtomicU16,
    /// Zero in version 1.0.
    pub flags: AtomicU16,
    pub file_id: AtomicU32,
    pub offset: AtomicU64,
    pub length: AtomicU32,
    /// Which completion word the host writes.
    pub completion: AtomicU32,
    /// Device address: destination of a read, source of a write (0 for flush/fsync).
    pub dev_addr: AtomicU64,
    /// Echoed in the completion word; never 0.
    pub tag: AtomicU32,
    pub reserved0: AtomicU32,
    pub reserved: [AtomicU64; 2],
}

/// Offset 0 of the device region (64 bytes), written once by the host.
#[repr(C)]
#[derive(Debug)]
pub struct DeviceHeader {
    pub magic: u32,
    pub version_major: u16,
    pub version_minor: u16,
    pub ring_count: u32,
    pub completion_count: u32,
    pub reserved: [u64; 6],
}

/// One per ring in the device region (64 bytes, one cache line so rings do not share one): the
/// next position a producer claims (device threads only), and since version 1.1 how many of the
/// ring's positions the host has at least taken (written by the host, after each round; a lower
/// bound that lets a producer see a full ring without reading a slot across PCIe).
#[repr(C)]
#[derive(Debug)]
pub struct RingTail {
    pub tail: AtomicU64,
    pub taken: AtomicU64,
    pub reserved: [u64; 6],
}

/// The shape of a region: how many rings, slots, completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    pub ring_count: u32,
    /// A power of two.
    pub slots_per_ring: u32,
    pub completion_count: u32,
    /// The device cache's line size (0 for none).
    pub line_bytes: u32,
    /// Largest request the server accepts.
    pub max_request_bytes: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            ring_count: 4,
            slots_per_ring: 256,
            completion_count: 4096,
            line_bytes: 4096,
            max_request_bytes: 64 << 10,
        }
    }
}

/// Where everything is, computed from a [`RingConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub config: RingConfig,
    pub rings_offset: usize,
    pub slots_offset: usize,
    pub host_bytes: usize,
    pub tails_offset: usize,
    pub completions_offset: usize,
    pub device_bytes: usize,
}

const fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

impl Layout {
    /// Checks `c` and lays it out.
    pub fn new(c: RingConfig) -> Result<Layout> {
        let bad = |m: String| Err(Error::invalid(format!("ring region: {m}")));
        if c.ring_count == 0 || c.ring_count > RINGS_MAX {
            return bad(format!("{} rings (1..={RINGS_MAX})", c.ring_count));
        }
        if !c.slots_per_ring.is_power_of_two()
            || c.slots_per_ring < 2
            || c.slots_per_ring > SLOTS_PER_RING_MAX
        {
            return bad(format!(
                "{} slots per ring (a power of two in 2..={SLOTS_PER_RING_MAX})",
                c.slots_per_ring
            ));
        }
        if c.completion_count == 0 || c.completion_count > COMPLETIONS_MAX {
            return bad(format!(
                "{} completions (1..={COMPLETIONS_MAX})",
                c.completion_count
            ));
        }
        if c.line_bytes != 0
            && (!c.line_bytes.is_power_of_two() || !(512..=1 << 20).contains(&c.line_bytes))
        {
            return bad(format!(
                "line size {} (0, or a power of two in 512..=1 MiB)",
                c.line_bytes
            ));
        }
        if c.max_request_bytes == 0 || c.max_request_bytes > REQUEST_BYTES_MAX {
            return bad(format!(
                "largest request {} bytes (1..={REQUEST_BYTES_MAX})",
                c.max_request_bytes
            ));
        }
        let rings = c.ring_count as usize;
        let rings_offset = HEADER_BYTES;
        let slots_offset = align_up(rings_offset + rings * RING_CONTROL_BYTES, 64);
        let host_bytes = align_up(
            slots_offset + rings * c.slots_per_ring as usize * SLOT_BYTES,
            4096,
        );
        let tails_offset = DEVICE_HEADER_BYTES;
        let completions_offset = align_up(tails_offset + rings * RING_TAIL_BYTES, 64);
        let device_bytes = align_up(
            completions_offset + c.completion_count as usize * COMPLETION_BYTES,
            256,
        );
        Ok(Layout {
            config: c,
            rings_offset,
            slots_offset,
            host_bytes,
            tails_offset,
            completions_offset,
            device_bytes,
        })
    }

    /// Offset of ring `r`'s control block in the host region.
    pub fn ring_control(&self, r: u32) -> usize {
        self.rings_offset + r as usize * RING_CONTROL_BYTES
    }
    /// Offset of slot `i` of ring `r` in the host region.
    pub fn slot(&self, r: u32, i: u32) -> usize {
        self.slots_offset
            + (r as usize * self.config.slots_per_ring as usize + i as usize) * SLOT_BYTES
    }
    /// Offset of ring `r`'s tail in the device region.
    pub fn tail(&self, r: u32) -> usize {
        self.tails_offset + r as usize * RING_TAIL_BYTES
    }
    /// Offset of completion word `i` in the device region.
    pub fn completion(&self, i: u32) -> usize {
        self.completions_offset + i as usize * COMPLETION_BYTES
    }

    /// The header the host writes at offset 0 of the host region (server state `SERVER_INIT`).
    pub fn header(&self) -> RegionHeader {
        let c = &self.config;
        RegionHeader {
            magic: MAGIC,
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            header_bytes: HEADER_BYTES as u32,
            ring_count: c.ring_count,
            slots_per_ring: c.slots_per_ring,
            slot_bytes: SLOT_BYTES as u32,
            line_bytes: c.line_bytes,
            completion_count: c.completion_count,
            rings_offset: self.rings_offset as u64,
            slots_offset: self.slots_offset as u64,
            host_bytes: self.host_bytes as u64,
            device_bytes: self.device_bytes as u64,
            tails_offset: self.tails_offset as u64,
            completions_offset: self.completions_offset as u64,
            server_state: AtomicU32::new(SERVER_INIT),
            max_request_bytes: c.max_request_bytes,
            reserved: [0; 5],
        }
    }

    /// The header the host writes at offset 0 of the device region.
    pub fn device_header(&self) -> DeviceHeader {
        DeviceHeader {
            magic: DEVICE_MAGIC,
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            ring_count: self.config.ring_count,
            completion_count: self.config.completion_count,
            reserved: [0; 6],
        }
    }

    /// Reads a layout back from a host region header, as a consumer that did not create the region
    /// would: checks magic, major version and that every offset matches this implementation.
    pub fn from_header(h: &RegionHeader) -> Result<Layout> {
        if h.magic != MAGIC {
            return Err(Error::invalid(format!(
                "ring region: bad magic {:#010x}",
                h.magic
            )));
        }
        if h.version_major != VERSION_MAJOR {
            return Err(Error::invalid(format!(
                "ring region: version {}.{} (this reads {VERSION_MAJOR}.x)",
                h.version_major, h.version_minor
            )));
        }
        let l = Layout::new(RingConfig {
            ring_count: h.ring_count,
            slots_per_ring: h.slots_per_ring,
            completion_count: h.completion_count,
            line_bytes: h.line_bytes,
            max_request_bytes: h.max_request_bytes,
        })?;
        let same = h.header_bytes as usize == HEADER_BYTES
            && h.slot_bytes as usize == SLOT_BYTES
            && h.rings_offset as usize == l.rings_offset
            && h.slots_offset as usize == l.slots_offset
            && h.host_bytes as usize == l.host_bytes
            && h.device_bytes as usize == l.device_bytes
            && h.tails_offset as usize == l.tails_offset
            && h.completions_offset as usize == l.completions_offset;
        if !same {
            return Err(Error::invalid("ring region: header offsets disagree"));
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn struct_sizes_and_offsets_match_the_spec() {
        assert_eq!(size_of::<RegionHeader>(), HEADER_BYTES);
        assert_eq!(offset_of!(RegionHeader, magic), 0);
        assert_eq!(offset_of!(RegionHeader, version_major), 4);
        assert_eq!(offset_of!(RegionHeader, version_minor), 6);
        assert_eq!(offset_of!(RegionHeader, header_bytes), 8);
        assert_eq!(offset_of!(RegionHeader, ring_count), 12);
        assert_eq!(offset_of!(RegionHeader, slots_per_ring), 16);
        assert_eq!(offset_of!(RegionHeader, slot_bytes), 20);
        assert_eq!(offset_of!(RegionHeader, line_bytes), 24);
        assert_eq!(offset_of!(RegionHeader, completion_count), 28);
        assert_eq!(offset_of!(RegionHeader, rings_offset), 32);
        assert_eq!(offset_of!(RegionHeader, slots_offset), 40);
        assert_eq!(offset_of!(RegionHeader, host_bytes), 48);
        assert_eq!(offset_of!(RegionHeader, device_bytes), 56);
        assert_eq!(offset_of!(RegionHeader, tails_offset), 64);
        assert_eq!(offset_of!(RegionHeader, completions_offset), 72);
        assert_eq!(offset_of!(RegionHeader, server_state), 80);
        assert_eq!(offset_of!(RegionHeader, max_request_bytes), 84);
        assert_eq!(offset_of!(RegionHeader, reserved), 88);

        assert_eq!(size_of::<RingControl>(), RING_CONTROL_BYTES);
        assert_eq!(offset_of!(RingControl, head), 0);
        assert_eq!(offset_of!(RingControl, completed), 8);

        assert_eq!(size_of::<RequestSlot>(), SLOT_BYTES);
        assert_eq!(offset_of!(RequestSlot, state), 0);
        assert_eq!(offset_of!(RequestSlot, opcode), 8);
        assert_eq!(offset_of!(RequestSlot, flags), 10);
        assert_eq!(offset_of!(RequestSlot, file_id), 12);
        assert_eq!(offset_of!(RequestSlot, offset), 16);
        assert_eq!(offset_of!(RequestSlot, length), 24);
        assert_eq!(offset_of!(RequestSlot, completion), 28);
        assert_eq!(offset_of!(RequestSlot, dev_addr), 32);
        assert_eq!(offset_of!(RequestSlot, tag), 40);
        assert_eq!(offset_of!(RequestSlot, reserved0), 44);
        assert_eq!(offset_of!(RequestSlot, reserved), 48);

        assert_eq!(size_of::<DeviceHeader>(), DEVICE_HEADER_BYTES);
        assert_eq!(offset_of!(DeviceHeader, ring_count), 8);
        assert_eq!(offset_of!(DeviceHeader, completion_count), 12);
        assert_eq!(size_of::<RingTail>(), RING_TAIL_BYTES);
        assert_eq!(offset_of!(RingTail, tail), 0);
        assert_eq!(offset_of!(RingTail, taken), 8);
        for a in [
            align_of::<RegionHeader>(),
            align_of::<RequestSlot>(),
            align_of::<RingTail>(),
        ] {
            assert_eq!(a, 8);
        }
    }

    #[test]
    fn words_pack_as_specified() {
        assert_eq!(MAGIC.to_le_bytes(), *b"GPRQ");
        assert_eq!(DEVICE_MAGIC.to_le_bytes(), *b"GPRD");
        assert_eq!(slot_word(3, SLOT_SUBMITTED), 0x0000_0003_0000_0002);
        assert_eq!(slot_lap(slot_word(7, SLOT_FREE)), 7);
        assert_eq!(slot_state(slot_word(7, SLOT_CLAIMED)), SLOT_CLAIMED);
        let w = completion_word(0xdead_beef, code::EIO);
        assert_eq!(w, 0xdead_beef_ffff_fffb);
        assert_eq!((completion_tag(w), completion_result(w)), (0xdead_beef, -5));
        assert_eq!(completion_result(completion_word(1, 4096)), 4096);
        assert_eq!(code::name(code::ESHUTDOWN), "ESHUTDOWN");
    }

    #[test]
    fn layout_of_the_default_and_a_small_config() {
        let l = Layout::new(RingConfig::default()).unwrap();
        assert_eq!(l.rings_offset, 128);
        assert_eq!(l.slots_offset, 128 + 4 * 64);
        assert_eq!(l.host_bytes, 69632); // 384 + 4*256*64 = 65920, rounded up to 4096
        assert_eq!(l.tails_offset, 64);
        assert_eq!(l.completions_offset, 64 + 4 * 64);
        assert_eq!(l.device_bytes, (320 + 4096 * 8usize).next_multiple_of(256));
        assert_eq!(l.slot(1, 2), 384 + (256 + 2) * 64);
        assert_eq!(l.completion(3), 320 + 24);
        let h = l.header();
        assert_eq!(Layout::from_header(&h).unwrap(), l);
        let small = Layout::new(RingConfig {
            ring_count: 3,
            slots_per_ring: 2,
            completion_count: 5,
            line_bytes: 0,
            max_request_bytes: 1,
        })
        .unwrap();
        assert_eq!(small.slots_offset, 128 + 192);
        assert_eq!(small.host_bytes, 4096);
        assert_eq!(small.completions_offset, 64 + 192);
        assert_eq!(small.device_bytes, 512);
    }

    #[test]
    fn bad_configs_and_headers_are_refused() {
        let ok = RingConfig::default();
        for c in [
            RingConfig {
                ring_count: 0,
                ..ok
            },
            RingConfig {
                slots_per_ring: 3,
                ..ok
            },
            RingConfig {
                slots_per_ring: 1,
                ..ok
            },
            RingConfig {
                completion_count: 0,
                ..ok
            },
            RingConfig {
                line_bytes: 3000,
                ..ok
            },
            RingConfig {
                max_request_bytes: REQUEST_BYTES_MAX + 1,
                ..ok
            },
        ] {
            assert!(Layout::new(c).is_err(), "{c:?}");
        }
        let l = Layout::new(ok).unwrap();
        let mut h = l.header();
        h.version_major = 2;
        assert!(Layout::from_header(&h).is_err());
        let mut h = l.header();
        h.magic = 0;
        assert!(Layout::from_header(&h).is_err());
        let mut h = l.header();
        h.slots_offset += 64;
        assert!(Layout::from_header(&h).is_err());
    }
}
