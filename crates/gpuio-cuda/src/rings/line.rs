//! The Rust twin of the device cache in `device/gpuio.cuh`: the same 32-bit line state word, the same
//! transitions, the same clock, written against a [`Word32`] trait so `tests/rings_loom.rs`
//! model-checks these exact functions with loom and `tests/rings_cache.rs` runs them under a model
//! test. Layout and transitions are specified in docs/rings.md ("Device cache").
//!
//! Organisation (BaM, ASPLOS'23: a state word per page of the array plus a translation to the cache
//! slot holding it; clock replacement over the slots):
//!
//! - `page[p]`: the state word of line `p` of the file (one per line of the file, in device memory);
//! - `slot_of[p]`: the slot holding line `p` (meaningful while the word is READY/MODIFIED, or BUSY
//!   for its owner);
//! - `owner[s]`: `p + 1` for the line slot `s` holds, [`SLOT_EMPTY`], or [`SLOT_RESERVED`] while a
//!   miss owner fills it;
//! - `hand`: the clock hand.
//!
//! The state word:
//!
//! ```text
//! bits  0..16  pins     threads (warps) using the line's bytes now
//! bits 16..18  state    INVALID 0 | BUSY 1 | READY 2 | MODIFIED 3
//! bit  18      REF      clock reference bit (set on every hit, cleared by the passing hand)
//! bits 19..32  zero
//! ```
//!
//! Transitions (who, how):
//!
//! | from | to | by | atomic |
//! |---|---|---|---|
//! | INVALID | BUSY (pins 0) | the thread that missed: it now owns the line's fill | CAS |
//! | BUSY | READY (pins 1, REF) | the fill owner, after its read completed | store (release) |
//! | BUSY | INVALID | the fill owner, when its read failed or no slot was free | store (release) |
//! | READY/MODIFIED | same, pins + 1, REF | a hit | CAS (refused at 65535 pins: EOVERFLOW) |
//! | any pinned | pins − 1 | the pin holder | fetch_sub (release) |
//! | READY (pinned) | MODIFIED | a pinned writer | fetch_or of bit 16 |
//! | READY/MODIFIED, pins 0, REF | REF cleared | the clock hand | fetch_and |
//! | READY/MODIFIED, pins 0, no REF | BUSY | the clock hand (eviction) | CAS |
//! | BUSY (evicting) | INVALID | the evictor, after writing a MODIFIED line back | store (release) |
//! | BUSY (evicting) | its old word | the evictor, when write-back failed or the line moved | store |
//! | MODIFIED, pins 0 | BUSY → READY | flush (write-back), or back to MODIFIED on failure | CAS, store |
//!
//! Every wait is bounded: a hit on a BUSY line returns [`Lookup::Busy`] and the caller backs off a
//! bounded number of times; the clock gives up after two full turns with [`code::EBUSY`] ("every line
//! pinned", BaM issue #11: never a hang).

use std::sync::atomic::{AtomicU32, Ordering};

use super::layout::code;

pub const PIN_ONE: u32 = 1;
pub const PIN_MASK: u32 = 0xFFFF;
pub const STATE_SHIFT: u32 = 16;
pub const STATE_MASK: u32 = 3 << STATE_SHIFT;
pub const REF: u32 = 1 << 18;
/// `owner[s]` of a slot that holds nothing.
pub const SLOT_EMPTY: u32 = 0;
/// `owner[s]` of a slot taken by a miss owner and not yet filled.
pub const SLOT_RESERVED: u32 = u32::MAX;
/// Compare-and-swap attempts a hit makes before reporting the line busy.
pub const CAS_ATTEMPTS: u32 = 64;

/// A line's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineState {
    Invalid = 0,
    Busy = 1,
    Ready = 2,
    Modified = 3,
}

/// The atomic operations the state machine uses (std's, or loom's in the model check).
pub trait Word32 {
    fn load(&self, o: Ordering) -> u32;
    fn store(&self, v: u32, o: Ordering);
    fn compare_exchange(&self, cur: u32, new: u32, s: Ordering, f: Ordering) -> Result<u32, u32>;
    fn fetch_add(&self, v: u32, o: Ordering) -> u32;
    fn fetch_sub(&self, v: u32, o: Ordering) -> u32;
    fn fetch_and(&self, v: u32, o: Ordering) -> u32;
    fn fetch_or(&self, v: u32, o: Ordering) -> u32;
}

impl Word32 for AtomicU32 {
    fn load(&self, o: Ordering) -> u32 {
        AtomicU32::load(self, o)
    }
    fn store(&self, v: u32, o: Ordering) {
        AtomicU32::store(self, v, o)
    }
    fn compare_exchange(&self, cur: u32, new: u32, s: Ordering, f: Ordering) -> Result<u32, u32> {
        AtomicU32::compare_exchange(self, cur, new, s, f)
    }
    fn fetch_add(&self, v: u32, o: Ordering) -> u32 {
        AtomicU32::fetch_add(self, v, o)
    }
    fn fetch_sub(&self, v: u32, o: Ordering) -> u32 {
        AtomicU32::fetch_sub(self, v, o)
    }
    fn fetch_and(&self, v: u32, o: Ordering) -> u32 {
        AtomicU32::fetch_and(self, v, o)
    }
    fn fetch_or(&self, v: u32, o: Ordering) -> u32 {
        AtomicU32::fetch_or(self, v, o)
    }
}

#[inline]
pub const fn state(w: u32) -> LineState {
    match (w & STATE_MASK) >> STATE_SHIFT {
        0 => LineState::Invalid,
        1 => LineState::Busy,
        2 => LineState::Ready,
        _ => LineState::Modified,
    }
}
#[inline]
pub const fn pins(w: u32) -> u32 {
    w & PIN_MASK
}
#[inline]
pub const fn with_state(w: u32, s: LineState) -> u32 {
    (w & !STATE_MASK) | ((s as u32) << STATE_SHIFT)
}
/// A word with `s`, no pins, no REF.
#[inline]
pub const fn word(s: LineState) -> u32 {
    (s as u32) << STATE_SHIFT
}
#[inline]
const fn resident(w: u32) -> bool {
    matches!(state(w), LineState::Ready | LineState::Modified)
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Resident and now pinned by the caller, in this slot.
    Hit(u32),
    /// Not resident: the caller now owns the line (BUSY) and must fill it
    /// ([`LineCache::claim_slot`], then [`LineCache::fill_done`] or [`LineCache::fill_failed`]).
    Miss,
    /// Another thread is filling, evicting or writing it back: back off and look again.
    Busy,
}

/// The cache's metadata: lines of one file, `slots` cache slots.
#[derive(Debug)]
pub struct LineCache<W> {
    pub page: Vec<W>,
    pub slot_of: Vec<W>,
    pub owner: Vec<W>,
    pub hand: W,
}

impl<W: Word32> LineCache<W> {
    /// `pages` lines over `slots` slots; `mk(v)` makes an atomic word holding `v`.
    pub fn new(pages: u32, slots: u32, mk: impl Fn(u32) -> W) -> LineCache<W> {
        assert!(slots > 0 && pages > 0 && pages < SLOT_RESERVED);
        LineCache {
            page: (0..pages).map(|_| mk(word(LineState::Invalid))).collect(),
            slot_of: (0..pages).map(|_| mk(SLOT_RESERVED)).collect(),
            owner: (0..slots).map(|_| mk(SLOT_EMPTY)).collect(),
            hand: mk(0),
        }
    }

    pub fn slots(&self) -> u32 {
        self.owner.len() as u32
    }

    /// Pins line `p` if resident, else takes ownership of its fill, else reports it busy.
    pub fn lookup(&self, p: u32) -> Result<Lookup, i32> {
        let w = &self.page[p as usize];
        let mut cur = w.load(Ordering::Acquire);
        for _ in 0..CAS_ATTEMPTS {
            match state(cur) {
                LineState::Ready | LineState::Modified => {
                    if pins(cur) == PIN_MASK {
                        return Err(code::EOVERFLOW);
                    }
                    match w.compare_exchange(
                        cur,
                        (cur + PIN_ONE) | REF,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => {
                            return Ok(Lookup::Hit(
                                self.slot_of[p as usize].load(Ordering::Acquire),
                            ))
                        }
                        Err(now) => cur = now,
                    }
                }
                LineState::Busy => return Ok(Lookup::Busy),
                LineState::Invalid => match w.compare_exchange(
                    cur,
                    word(LineState::Busy),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Ok(Lookup::Miss),
                    Err(now) => cur = now,
                },
            }
        }
        Ok(Lookup::Busy)
    }

    /// Drops a pin taken by a hit or a fill.
    pub fn release(&self, p: u32) {
        let before = self.page[p as usize].fetch_sub(PIN_ONE, Ordering::Release);
        debug_assert!(pins(before) > 0, "release of an unpinned line {p}");
    }

    /// A pinned writer marks line `p` dirty (READY → MODIFIED; MODIFIED stays).
    pub fn mark_modified(&self, p: u32) {
        let before = self.page[p as usize].fetch_or(1 << STATE_SHIFT, Ordering::AcqRel);
        debug_assert!(pins(before) > 0 && resident(before));
    }

    /// The fill owner of a missed line finds it a slot: an empty one, or the clock's victim (a
    /// resident line with no pins whose reference bit is clear; a MODIFIED victim is written back
    /// with `write_back(line, slot)` first). After two turns of the hand: [`code::EBUSY`].
    pub fn claim_slot(
        &self,
        write_back: &mut dyn FnMut(u32, u32) -> Result<(), i32>,
    ) -> Result<u32, i32> {
        let n = self.slots();
        for _ in 0..2 * n + 1 {
            let s = self.hand.fetch_add(1, Ordering::Relaxed) % n;
            let o = self.owner[s as usize].load(Ordering::Acquire);
            if o == SLOT_EMPTY {
                if self.owner[s as usize]
                    .compare_exchange(
                        SLOT_EMPTY,
                        SLOT_RESERVED,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    return Ok(s);
                }
                continue;
            }
            if o == SLOT_RESERVED {
                continue;
            }
            let p = o - 1;
            let pw = &self.page[p as usize];
            let cur = pw.load(Ordering::Acquire);
            if pins(cur) != 0 || !resident(cur) {
                continue;
            }
            if cur & REF != 0 {
                pw.fetch_and(!REF, Ordering::Relaxed);
                continue;
            }
            if pw
                .compare_exchange(
                    cur,
                    with_state(cur, LineState::Busy),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                continue;
            }
            // The line is ours (BUSY). It may have left slot `s` and come back elsewhere between
            // reading `owner[s]` and the CAS: then put it back as it was.
            if self.slot_of[p as usize].load(Ordering::Acquire) != s {
                pw.store(cur, Ordering::Release);
                continue;
            }
            if state(cur) == LineState::Modified && write_back(p, s).is_err() {
                pw.store(cur, Ordering::Release);
                continue;
            }
            self.owner[s as usize].store(SLOT_RESERVED, Ordering::Relaxed);
            self.slot_of[p as usize].store(SLOT_RESERVED, Ordering::Relaxed);
            pw.store(word(LineState::Invalid), Ordering::Release);
            return Ok(s);
        }
        Err(code::EBUSY)
    }

    /// The fill owner's read of line `p` into slot `s` completed: READY, pinned once by the owner.
    pub fn fill_done(&self, p: u32, s: u32) {
        self.owner[s as usize].store(p + 1, Ordering::Relaxed);
        self.slot_of[p as usize].store(s, Ordering::Relaxed);
        debug_assert_eq!(
            state(self.page[p as usize].load(Ordering::Relaxed)),
            LineState::Busy
        );
        self.page[p as usize].store(word(LineState::Ready) | REF | PIN_ONE, Ordering::Release);
    }

    /// The fill failed (or no slot was found, `s` = `None`): the line goes back to INVALID, the slot
    /// to empty.
    pub fn fill_failed(&self, p: u32, s: Option<u32>) {
        if let Some(s) = s {
            self.owner[s as usize].store(SLOT_EMPTY, Ordering::Release);
        }
        self.page[p as usize].store(word(LineState::Invalid), Ordering::Release);
    }

    /// Looks line `p` up and fills it on a miss (`load(line, slot)`), backing off with `snooze`
    /// while it is busy, at most `waits` times ([`code::ETIMEDOUT`] then). Returns the slot, pinned.
    /// A miss that finds no slot gives the line back and returns [`code::EBUSY`] at once; the
    /// device's `acquire` (gpuio.cuh) calls the same transitions again after a pause, for up to
    /// `CLAIM_WAIT_NS`, since with thousands of warps missing at once that state passes.
    pub fn acquire(
        &self,
        p: u32,
        waits: u32,
        load: &mut dyn FnMut(u32, u32) -> Result<(), i32>,
        write_back: &mut dyn FnMut(u32, u32) -> Result<(), i32>,
        snooze: &mut dyn FnMut(),
    ) -> Result<u32, i32> {
        for _ in 0..=waits {
            match self.lookup(p)? {
                Lookup::Hit(s) => return Ok(s),
                Lookup::Busy => snooze(),
                Lookup::Miss => {
                    let s = match self.claim_slot(write_back) {
                        Ok(s) => s,
                        Err(e) => {
                            self.fill_failed(p, None);
                            return Err(e);
                        }
                    };
                    return match load(p, s) {
                        Ok(()) => {
                            self.fill_done(p, s);
                            Ok(s)
                        }
                        Err(e) => {
                            self.fill_failed(p, Some(s));
                            Err(e)
                        }
                    };
                }
            }
        }
        Err(code::ETIMEDOUT)
    }

    /// Writes line `p` back if it is MODIFIED and unpinned: `Ok(true)` if written, `Ok(false)` if
    /// clean or not resident, [`code::EBUSY`] if pinned or busy (flush again later), or the write-back's
    /// error (the line stays MODIFIED).
    pub fn flush_line(
        &self,
        p: u32,
        write_back: &mut dyn FnMut(u32, u32) -> Result<(), i32>,
    ) -> Result<bool, i32> {
        let pw = &self.page[p as usize];
        let cur = pw.load(Ordering::Acquire);
        match state(cur) {
            LineState::Modified => {}
            LineState::Busy => return Err(code::EBUSY),
            _ => return Ok(false),
        }
        if pins(cur) != 0 {
            return Err(code::EBUSY);
        }
        if pw
            .compare_exchange(
                cur,
                with_state(cur, LineState::Busy),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return Err(code::EBUSY);
        }
        let s = self.slot_of[p as usize].load(Ordering::Acquire);
        match write_back(p, s) {
            Ok(()) => {
                pw.store(with_state(cur, LineState::Ready), Ordering::Release);
                Ok(true)
            }
            Err(e) => {
                pw.store(cur, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Flushes every line; the number written back, or the first error after trying them all.
    pub fn flush_all(
        &self,
        write_back: &mut dyn FnMut(u32, u32) -> Result<(), i32>,
    ) -> Result<u32, i32> {
        let mut n = 0;
        let mut first = None;
        for p in 0..self.page.len() as u32 {
            match self.flush_line(p, write_back) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(n), Err)
    }

    /// Checks the structure when no thread is inside an operation: no pins, no BUSY lines; each
    /// resident line's slot names it, and no two resident lines share a slot. Describes the first
    /// problem.
    pub fn check_quiescent(&self) -> Result<(), String> {
        let mut seen = vec![None; self.owner.len()];
        for (p, w) in self.page.iter().enumerate() {
            let w = w.load(Ordering::Acquire);
            if pins(w) != 0 {
                return Err(format!("line {p} still has {} pins", pins(w)));
            }
            match state(w) {
                LineState::Busy => return Err(format!("line {p} is BUSY with no owner")),
                LineState::Invalid => {}
                _ => {
                    let s = self.slot_of[p].load(Ordering::Acquire);
                    if s as usize >= seen.len() {
                        return Err(format!("resident line {p} has no slot ({s})"));
                    }
                    if let Some(q) = seen[s as usize].replace(p) {
                        return Err(format!("lines {q} and {p} share slot {s}"));
                    }
                    let o = self.owner[s as usize].load(Ordering::Acquire);
                    if o != p as u32 + 1 {
                        return Err(format!("slot {s} holds line {p} but names {o}"));
                    }
                }
            }
            if w & !(PIN_MASK | STATE_MASK | REF) != 0 {
                return Err(format!("line {p}: reserved bits set in {w:#x}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(pages: u32, slots: u32) -> LineCache<AtomicU32> {
        LineCache::new(pages, slots, AtomicU32::new)
    }

    #[test]
    fn word_packing_matches_gpuio_cuh() {
        assert_eq!(word(LineState::Ready), 0x2_0000);
        assert_eq!(word(LineState::Modified) | REF | 3, 0x7_0003);
        assert_eq!(state(0x1_0000), LineState::Busy);
        assert_eq!(pins(0x6_ffff), 0xffff);
        // READY | bit 16 is MODIFIED: the writer's fetch_or.
        assert_eq!(
            state(word(LineState::Ready) | 1 << STATE_SHIFT),
            LineState::Modified
        );
    }

    #[test]
    fn miss_fill_hit_evict() {
        let c = cache(4, 2);
        let mut ok = |_: u32, _: u32| Ok(());
        let mut none = || {};
        let s0 = c
            .acquire(0, 0, &mut ok, &mut |_, _| Ok(()), &mut none)
            .unwrap();
        assert_eq!(c.lookup(0), Ok(Lookup::Hit(s0)));
        c.release(0);
        c.release(0);
        let s1 = c
            .acquire(1, 0, &mut ok, &mut |_, _| Ok(()), &mut none)
            .unwrap();
        assert_ne!(s0, s1);
        // Both pinned: no victim for a third line, and the line is left INVALID.
        c.lookup(0).unwrap();
        let e = c.acquire(2, 0, &mut ok, &mut |_, _| Ok(()), &mut none);
        assert_eq!(e, Err(code::EBUSY));
        assert_eq!(state(c.page[2].load(Ordering::Relaxed)), LineState::Invalid);
        c.release(0);
        c.release(1);
        // Now line 0 or 1 is evicted (after the hand clears their reference bits).
        let s2 = c
            .acquire(2, 0, &mut ok, &mut |_, _| Ok(()), &mut none)
            .unwrap();
        c.release(2);
        assert!(s2 < 2);
        c.check_quiescent().unwrap();
    }

    #[test]
    fn dirty_lines_are_written_back_on_eviction_and_flush() {
        let c = cache(3, 1);
        let mut wrote = Vec::new();
        let s = c
            .acquire(
                0,
                0,
                &mut |_, _| Ok(()),
                &mut |p, s| {
                    wrote.push((p, s));
                    Ok(())
                },
                &mut || {},
            )
            .unwrap();
        c.mark_modified(0);
        assert_eq!(c.flush_line(0, &mut |_, _| Ok(())), Err(code::EBUSY)); // pinned
        c.release(0);
        // A failing write-back keeps the line MODIFIED and resident: nothing else fits.
        let e = c.acquire(
            1,
            0,
            &mut |_, _| Ok(()),
            &mut |_, _| Err(code::EIO),
            &mut || {},
        );
        assert_eq!(e, Err(code::EBUSY));
        assert_eq!(
            state(c.page[0].load(Ordering::Relaxed)),
            LineState::Modified
        );
        let mut wb = Vec::new();
        let s1 = c
            .acquire(
                1,
                0,
                &mut |_, _| Ok(()),
                &mut |p, s| {
                    wb.push((p, s));
                    Ok(())
                },
                &mut || {},
            )
            .unwrap();
        assert_eq!((wb, s1), (vec![(0, s)], s));
        c.mark_modified(1);
        c.release(1);
        assert_eq!(c.flush_all(&mut |_, _| Ok(())), Ok(1));
        assert_eq!(state(c.page[1].load(Ordering::Relaxed)), LineState::Ready);
        assert!(wrote.is_empty());
        c.check_quiescent().unwrap();
    }

    #[test]
    fn failed_fill_and_pin_overflow() {
        let c = cache(2, 2);
        let e = c.acquire(
            0,
            0,
            &mut |_, _| Err(code::EIO),
            &mut |_, _| Ok(()),
            &mut || {},
        );
        assert_eq!(e, Err(code::EIO));
        c.check_quiescent().unwrap();
        assert_eq!(
            c.owner
                .iter()
                .filter(|o| o.load(Ordering::Relaxed) == SLOT_EMPTY)
                .count(),
            2
        );
        c.page[1].store(word(LineState::Ready) | PIN_MASK, Ordering::Relaxed);
        assert_eq!(c.lookup(1), Err(code::EOVERFLOW));
        c.page[1].store(word(LineState::Busy), Ordering::Relaxed);
        assert_eq!(c.lookup(1), Ok(Lookup::Busy));
        let mut waits = 0;
        let e = c.acquire(1, 3, &mut |_, _| Ok(()), &mut |_, _| Ok(()), &mut || {
            waits += 1
        });
        assert_eq!((e, waits), (Err(code::ETIMEDOUT), 4));
    }
}
