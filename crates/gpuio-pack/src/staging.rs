//! Staging buffers (where chunk reads land before decoding), recycled process-wide.
//!
//! A fresh buffer costs a page fault and a page clear per 4 KiB the first time it is written —
//! measured at about a quarter of a core per GB/s of loads — so buffers are kept and handed out again.
//! They come in power-of-two size classes from 64 KiB to 8 MiB; at most [`IDLE_BYTES_MAX`] are kept idle
//! (a load that is streaming returns each buffer just before taking the next, so steady state needs
//! none idle). Larger reads (a single chunk above 8 MiB) use one-off buffers.

use gpuio::{AlignedBuf, Result};
use parking_lot::Mutex;

/// Alignment of staging buffers (at least any direct-I/O memory alignment seen in practice).
pub(crate) const ALIGN: usize = 4096;
const CLASS_MIN_SHIFT: u32 = 16; // 64 KiB
const CLASS_MAX_SHIFT: u32 = 23; // 8 MiB
const CLASSES: usize = (CLASS_MAX_SHIFT - CLASS_MIN_SHIFT + 1) as usize;
/// Most bytes of staging kept idle for reuse.
pub const IDLE_BYTES_MAX: usize = 64 << 20;

struct Cache {
    free: [Vec<AlignedBuf>; CLASSES],
    idle_bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    free: [const { Vec::new() }; CLASSES],
    idle_bytes: 0,
});

fn class_of(len: usize) -> Option<usize> {
    let cap = len.max(1 << CLASS_MIN_SHIFT).next_power_of_two();
    let shift = cap.trailing_zeros();
    (shift <= CLASS_MAX_SHIFT).then_some((shift - CLASS_MIN_SHIFT) as usize)
}

/// A buffer of exactly `len` bytes (contents unspecified: the read that fills it overwrites them).
pub(crate) fn take(len: usize) -> Result<AlignedBuf> {
    let Some(class) = class_of(len) else {
        return AlignedBuf::new(len, ALIGN);
    };
    let reused = {
        let mut c = CACHE.lock();
        let b = c.free[class].pop();
        if let Some(b) = &b {
            c.idle_bytes -= b.capacity();
        }
        b
    };
    let mut buf = match reused {
        Some(b) => b,
        None => AlignedBuf::new(1 << (class as u32 + CLASS_MIN_SHIFT), ALIGN)?,
    };
    buf.set_len(len)?;
    Ok(buf)
}

/// Returns a buffer for reuse (or frees it when the cache is full or it is not of a class size).
pub(crate) fn give(buf: AlignedBuf) {
    let cap = buf.capacity();
    let Some(class) = class_of(cap) else { return };
    if cap != 1 << (class as u32 + CLASS_MIN_SHIFT) {
        return;
    }
    let mut c = CACHE.lock();
    if c.idle_bytes + cap <= IDLE_BYTES_MAX {
        c.idle_bytes += cap;
        c.free[class].push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_reuse() {
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(64 << 10), Some(0));
        assert_eq!(class_of((64 << 10) + 1), Some(1));
        assert_eq!(class_of(8 << 20), Some(CLASSES - 1));
        assert_eq!(class_of((8 << 20) + 1), None);
        let b = take(300_000).unwrap();
        assert_eq!((b.len(), b.capacity()), (300_000, 512 << 10));
        let addr = b.as_ptr() as usize;
        give(b);
        let b = take(262_145).unwrap();
        assert_eq!(b.as_ptr() as usize, addr, "the same buffer comes back");
        assert_eq!(b.len(), 262_145);
        give(b);
        let big = take(9 << 20).unwrap();
        assert_eq!(big.capacity(), 9 << 20);
        give(big); // freed, not kept
    }
}
