//! The producer side of the ring protocol on CPU threads: the reference the device code in
//! `device/gpuio.cuh` mirrors step for step, and what the tests drive the host server with.
//!
//! Submission is a bounded multi-producer claim (Vyukov's bounded MPMC queue, specialised to one
//! consumer): read the ring's tail (device memory), read the slot's state word (host memory); if it
//! says `FREE` for this lap, claim the position with a CAS on the tail, write the descriptor, and
//! publish it with a release store of `SUBMITTED`. A slot still holding the previous lap's request
//! means the ring is full: [`code::EAGAIN`] at once, never a wait. Completion is a poll of one word
//! in device memory until its tag matches, bounded by a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::layout::{
    code, completion_result, completion_tag, slot_lap, slot_state, slot_word, SLOT_CLAIMED,
    SLOT_FREE, SLOT_SUBMITTED,
};
use super::region::RingRegion;
use crate::device::DevicePtr;

/// Tail CAS attempts before a submission gives up with `EAGAIN` (contention, not fullness).
pub const CLAIM_ATTEMPTS: u32 = 64;

/// One request as a producer fills it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub opcode: u16,
    pub file_id: u32,
    pub offset: u64,
    pub length: u32,
    /// Completion word the host will write.
    pub completion: u32,
    pub dev_addr: DevicePtr,
    /// Non-zero; echoed in the completion word.
    pub tag: u32,
}

/// A CPU producer on a region whose device memory is host-addressable: the stand-in (device
/// addresses are host addresses) or a mock driver whose device memory is host memory at a fixed
/// offset ([`with_device_bias`](Self::with_device_bias)).
#[derive(Debug, Clone)]
pub struct RingProducer {
    region: Arc<RingRegion>,
    /// Device address − host address of the device region.
    bias: u64,
}

impl RingProducer {
    /// A producer on `region`.
    ///
    /// # Safety
    /// The region's device addresses must be host addresses of live memory (the
    /// [`HostDevice`](crate::HostDevice) stand-in; [`RingRegion::require_host_addressable`]).
    pub unsafe fn new(region: Arc<RingRegion>) -> RingProducer {
        RingProducer { region, bias: 0 }
    }

    /// A producer on `region` whose device memory is host memory at `device address − bias` (a
    /// mock driver's device memory, tests/mock_libcuda.c).
    ///
    /// # Safety
    /// For every address of the region's device region, `address − bias` is the host address of the
    /// same live memory, which the device side accesses only atomically or by whole copies.
    pub unsafe fn with_device_bias(region: Arc<RingRegion>, bias: u64) -> RingProducer {
        RingProducer { region, bias }
    }

    /// The host address of device address `dev` (see [`with_device_bias`](Self::with_device_bias)).
    pub fn host_address(&self, dev: DevicePtr) -> usize {
        dev.wrapping_sub(self.bias) as usize
    }

    pub fn region(&self) -> &Arc<RingRegion> {
        &self.region
    }

    fn tail(&self, ring: u32) -> &AtomicU64 {
        // SAFETY: per `new`, device addresses are host addresses; the tail lies in the live device
        // region (8-aligned) and is only ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.host_address(self.region.tail_addr(ring)) as *mut u64) }
    }

    fn taken(&self, ring: u32) -> &AtomicU64 {
        // SAFETY: as for `tail`: the hint lies in the live device region, 8-aligned, and is only
        // ever accessed atomically.
        unsafe { AtomicU64::from_ptr(self.host_address(self.region.taken_addr(ring)) as *mut u64) }
    }

    fn completion(&self, i: u32) -> &AtomicU64 {
        assert!(i < self.region.layout().config.completion_count);
        // SAFETY: as for `tail`; index checked.
        unsafe {
            AtomicU64::from_ptr(self.host_address(self.region.completion_addr(i)) as *mut u64)
        }
    }

    /// Submits `req` on `ring`: `Ok` once the slot is published; [`code::EAGAIN`] if the ring is full
    /// (or too contended), [`code::ESHUTDOWN`] if the server is not serving, [`code::EINVAL`] for a
    /// tag of 0 or a ring that does not exist. Never waits for the host.
    pub fn submit(&self, ring: u32, req: &Request) -> Result<(), i32> {
        let cfg = self.region.layout().config;
        if ring >= cfg.ring_count || req.tag == 0 {
            return Err(code::EINVAL);
        }
        if !self.region.serving() {
            return Err(code::ESHUTDOWN);
        }
        let n = cfg.slots_per_ring as u64;
        let tail = self.tail(ring);
        let taken = self.taken(ring);
        for _ in 0..CLAIM_ATTEMPTS {
            let pos = tail.load(Ordering::Relaxed);
            // Full by the host's hint (device memory), before reading the slot (host memory).
            if pos.wrapping_sub(taken.load(Ordering::Acquire)) as i64 >= n as i64 {
                return Err(code::EAGAIN);
            }
            let lap = (pos / n) as u32;
            let slot = self.region.slot(ring, (pos % n) as u32);
            let w = slot.state.load(Ordering::Acquire);
            let (wl, st) = (slot_lap(w), slot_state(w));
            if wl == lap && st == SLOT_FREE {
                if tail
                    .compare_exchange(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
                {
                    std::hint::spin_loop();
                    continue;
                }
                slot.state
                    .store(slot_word(lap, SLOT_CLAIMED), Ordering::Relaxed);
                slot.opcode.store(req.opcode, Ordering::Relaxed);
                slot.flags.store(0, Ordering::Relaxed);
                slot.file_id.store(req.file_id, Ordering::Relaxed);
                slot.offset.store(req.offset, Ordering::Relaxed);
                slot.length.store(req.length, Ordering::Relaxed);
                slot.completion.store(req.completion, Ordering::Relaxed);
                slot.dev_addr.store(req.dev_addr, Ordering::Relaxed);
                slot.tag.store(req.tag, Ordering::Relaxed);
                slot.reserved0.store(0, Ordering::Relaxed);
                // The device does __threadfence_system() then a release store (docs/rings.md).
                slot.state
                    .store(slot_word(lap, SLOT_SUBMITTED), Ordering::Release);
                return Ok(());
            }
            if (lap.wrapping_sub(wl) as i32) > 0 {
                // The slot still holds the previous lap's request: the ring is full.
                return Err(code::EAGAIN);
            }
            // Another producer took this position first; the tail has moved on.
            std::hint::spin_loop();
        }
        Err(code::EAGAIN)
    }

    /// Submits, retrying a full ring with a bounded backoff (spin, yield, sleeps up to 200 µs) until
    /// `deadline`; [`code::ETIMEDOUT`] then. Counts the full-ring retries in `retries`.
    pub fn submit_until(
        &self,
        ring: u32,
        req: &Request,
        deadline: Instant,
        retries: &mut u64,
    ) -> Result<(), i32> {
        let mut backoff = Backoff::default();
        loop {
            match self.submit(ring, req) {
                Err(code::EAGAIN) => {
                    *retries += 1;
                    if Instant::now() >= deadline {
                        return Err(code::ETIMEDOUT);
                    }
                    backoff.snooze();
                }
                other => return other,
            }
        }
    }

    /// The result of the request with `tag` on completion word `i`, if it has completed.
    pub fn poll(&self, i: u32, tag: u32) -> Option<i32> {
        let w = self.completion(i).load(Ordering::Acquire);
        (completion_tag(w) == tag).then_some(completion_result(w))
    }

    /// Waits (bounded backoff) for the request with `tag` on completion word `i`; its result, or
    /// [`code::ETIMEDOUT`] after `timeout` ([`code::ESHUTDOWN`] if the server stopped meanwhile).
    pub fn wait(&self, i: u32, tag: u32, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::default();
        loop {
            if let Some(r) = self.poll(i, tag) {
                return r;
            }
            if Instant::now() >= deadline {
                return if self.region.serving() {
                    code::ETIMEDOUT
                } else {
                    // One last look: the final drain may have completed it just now.
                    self.poll(i, tag).unwrap_or(code::ESHUTDOWN)
                };
            }
            backoff.snooze();
        }
    }
}

/// Spin, then yield, then sleep with doubling up to 200 µs (what `__nanosleep` backoff does on the
/// device).
#[derive(Debug, Default)]
pub struct Backoff {
    step: u32,
}

impl Backoff {
    pub fn snooze(&mut self) {
        self.step = self.step.saturating_add(1);
        match self.step {
            0..=16 => std::hint::spin_loop(),
            17..=24 => std::thread::yield_now(),
            s => {
                let us = 1u64 << (s - 24).min(8);
                std::thread::sleep(Duration::from_micros(us.min(200)));
            }
        }
    }
    pub fn reset(&mut self) {
        self.step = 0;
    }
}
