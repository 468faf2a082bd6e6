//! The per-line state machine, packed into one 64-bit word (BaM's per-line state + reference count).
//!
//! ```text
//! bits  0..24  active   short-term pins: a copy in progress, a load's owner, a writer
//! bits 24..44  held     long-term residency pins (`PinnedLines`)
//! bits 44..46  state    Invalid | Busy | Ready | Modified
//! bit  46      REF      clock (second-chance) reference bit
//! bit  47      WRITER   a writer is copying into the line (readers back off)
//! ```
//!
//! Transitions (all by atomic read-modify-write on the word):
//!
//! - reader: `pin` (active + 1); the line is usable if it was Ready/Modified with no WRITER and the
//!   slot's tag (checked after pinning) names the wanted line; `unpin` (active − 1).
//! - claim (eviction, or filling an empty slot): CAS from {Invalid, Ready, Modified} with active = 0,
//!   held = 0, no WRITER, to Busy with active = 1 (the claimer's own pin). Nobody else can be using
//!   the bytes: readers pin before they look.
//! - claim for write-back (flush): the same from Modified only, held pins allowed (the line stays).
//! - publish: Busy → Ready / Modified / Invalid, active − 1, in one CAS loop.
//! - write: a pinned reader sets WRITER (CAS, only if unset), waits until active = 1 (itself), copies,
//!   then `end_write`: state = Modified, WRITER cleared, active − 1.
//!
//! The functions are generic over [`Word`] so that `tests/loom.rs` model-checks these exact functions
//! with loom's atomics in an ordinary `cargo test`.

use std::sync::atomic::{AtomicU64, Ordering};

pub const ACTIVE_ONE: u64 = 1;
pub const ACTIVE_MASK: u64 = (1 << 24) - 1;
pub const HELD_ONE: u64 = 1 << 24;
pub const HELD_MASK: u64 = ((1 << 20) - 1) << 24;
pub const STATE_SHIFT: u32 = 44;
pub const STATE_MASK: u64 = 3 << STATE_SHIFT;
pub const REF: u64 = 1 << 46;
pub const WRITER: u64 = 1 << 47;

/// Where a line stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineState {
    /// Holds nothing usable.
    Invalid = 0,
    /// Owned by one thread: being loaded, written back, or reassigned.
    Busy = 1,
    /// Holds the source's bytes.
    Ready = 2,
    /// Holds bytes newer than the source's (write-back pending).
    Modified = 3,
}

/// The atomic operations the state machine needs (std's `AtomicU64`, or loom's in the model test).
pub trait Word {
    fn load(&self, o: Ordering) -> u64;
    fn store(&self, v: u64, o: Ordering);
    fn compare_exchange(&self, cur: u64, new: u64, s: Ordering, f: Ordering) -> Result<u64, u64>;
    fn fetch_add(&self, v: u64, o: Ordering) -> u64;
    fn fetch_sub(&self, v: u64, o: Ordering) -> u64;
    fn fetch_and(&self, v: u64, o: Ordering) -> u64;
}

impl Word for AtomicU64 {
    #[inline]
    fn load(&self, o: Ordering) -> u64 {
        AtomicU64::load(self, o)
    }
    #[inline]
    fn store(&self, v: u64, o: Ordering) {
        AtomicU64::store(self, v, o)
    }
    #[inline]
    fn compare_exchange(&self, cur: u64, new: u64, s: Ordering, f: Ordering) -> Result<u64, u64> {
        AtomicU64::compare_exchange(self, cur, new, s, f)
    }
    #[inline]
    fn fetch_add(&self, v: u64, o: Ordering) -> u64 {
        AtomicU64::fetch_add(self, v, o)
    }
    #[inline]
    fn fetch_sub(&self, v: u64, o: Ordering) -> u64 {
        AtomicU64::fetch_sub(self, v, o)
    }
    #[inline]
    fn fetch_and(&self, v: u64, o: Ordering) -> u64 {
        AtomicU64::fetch_and(self, v, o)
    }
}

#[inline]
pub fn state(w: u64) -> LineState {
    match (w & STATE_MASK) >> STATE_SHIFT {
        0 => LineState::Invalid,
        1 => LineState::Busy,
        2 => LineState::Ready,
        _ => LineState::Modified,
    }
}
#[inline]
pub fn active(w: u64) -> u64 {
    w & ACTIVE_MASK
}
#[inline]
pub fn held(w: u64) -> u64 {
    (w & HELD_MASK) >> 24
}
#[inline]
fn with_state(w: u64, s: LineState) -> u64 {
    (w & !STATE_MASK) | ((s as u64) << STATE_SHIFT)
}

/// Whether a word (as returned by [`pin`]) describes a line whose bytes may be read.
#[inline]
pub fn readable(w: u64) -> bool {
    w & WRITER == 0 && matches!(state(w), LineState::Ready | LineState::Modified)
}

/// Takes a short-term pin; returns the word as it was before.
#[inline]
pub fn pin<W: Word>(w: &W) -> u64 {
    w.fetch_add(ACTIVE_ONE, Ordering::AcqRel)
}

/// Drops a short-term pin.
#[inline]
pub fn unpin<W: Word>(w: &W) {
    w.fetch_sub(ACTIVE_ONE, Ordering::AcqRel);
}

/// Clears the reference bit (the clock hand's second chance).
#[inline]
pub fn clear_ref<W: Word>(w: &W) {
    w.fetch_and(!REF, Ordering::AcqRel);
}

/// Sets the reference bit if it is not set (a hit); `seen` is the word the caller already has.
#[inline]
pub fn touch<W: Word>(w: &W, seen: u64) {
    if seen & REF == 0 {
        // A CAS that fails means someone else changed the word: harmless, the bit is a hint.
        let cur = w.load(Ordering::Relaxed);
        let _ = w.compare_exchange(cur, cur | REF, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Whether the clock may take this line now (nobody uses or holds it).
#[inline]
pub fn claimable(w: u64) -> bool {
    active(w) == 0 && held(w) == 0 && w & WRITER == 0 && state(w) != LineState::Busy
}

/// Claims an unused line exclusively (Busy, active = 1); returns the state it had.
pub fn try_claim<W: Word>(w: &W) -> Option<LineState> {
    let cur = w.load(Ordering::Acquire);
    if !claimable(cur) {
        return None;
    }
    let new = with_state(cur & !REF, LineState::Busy) + ACTIVE_ONE;
    w.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
        .ok()
        .map(state)
}

/// Claims a Modified line for write-back (Busy, active = 1); residency pins may stay.
pub fn try_claim_writeback<W: Word>(w: &W) -> bool {
    let cur = w.load(Ordering::Acquire);
    if state(cur) != LineState::Modified || active(cur) != 0 || cur & WRITER != 0 {
        return false;
    }
    let new = with_state(cur, LineState::Busy) + ACTIVE_ONE;
    w.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Ends a claim: Busy → `to`, dropping the claimer's pin. `touched` sets the reference bit.
pub fn publish<W: Word>(w: &W, to: LineState, touched: bool) {
    let mut cur = w.load(Ordering::Acquire);
    loop {
        debug_assert_eq!(state(cur), LineState::Busy);
        debug_assert!(active(cur) >= 1);
        let mut new = with_state(cur, to) - ACTIVE_ONE;
        if touched {
            new |= REF;
        }
        match w.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// A pinned caller asks to write: sets WRITER if the line is readable and no other writer has it.
pub fn try_begin_write<W: Word>(w: &W) -> bool {
    let cur = w.load(Ordering::Acquire);
    if !readable(cur) || active(cur) == 0 {
        return false;
    }
    w.compare_exchange(cur, cur | WRITER, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Whether the writer (holding WRITER and one pin) is now alone on the line.
#[inline]
pub fn writer_alone<W: Word>(w: &W) -> bool {
    active(w.load(Ordering::Acquire)) == 1
}

/// Ends a write: Modified, WRITER cleared, the writer's pin dropped, REF set.
pub fn end_write<W: Word>(w: &W) {
    let mut cur = w.load(Ordering::Acquire);
    loop {
        let new = (with_state(cur, LineState::Modified) & !WRITER | REF) - ACTIVE_ONE;
        match w.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// Adds a residency pin to a line the caller has pinned.
pub fn hold<W: Word>(w: &W) {
    w.fetch_add(HELD_ONE, Ordering::AcqRel);
}

/// Drops a residency pin.
pub fn release_hold<W: Word>(w: &W) {
    w.fetch_sub(HELD_ONE, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(s: LineState) -> AtomicU64 {
        AtomicU64::new(with_state(0, s))
    }

    #[test]
    fn claim_requires_no_pins() {
        let w = word(LineState::Ready);
        let seen = pin(&w);
        assert!(readable(seen));
        assert_eq!(try_claim(&w), None);
        unpin(&w);
        assert_eq!(try_claim(&w), Some(LineState::Ready));
        assert_eq!(state(w.load(Ordering::Relaxed)), LineState::Busy);
        assert_eq!(try_claim(&w), None);
        publish(&w, LineState::Ready, true);
        let v = w.load(Ordering::Relaxed);
        assert_eq!(
            (state(v), active(v), v & REF != 0),
            (LineState::Ready, 0, true)
        );
        hold(&w);
        assert_eq!(try_claim(&w), None);
        release_hold(&w);
        assert!(try_claim(&w).is_some());
    }

    #[test]
    fn writer_excludes_writers_and_marks_modified() {
        let w = word(LineState::Ready);
        pin(&w);
        assert!(try_begin_write(&w));
        pin(&w);
        assert!(!try_begin_write(&w));
        assert!(!readable(w.load(Ordering::Relaxed)));
        assert!(!writer_alone(&w));
        unpin(&w);
        assert!(writer_alone(&w));
        end_write(&w);
        let v = w.load(Ordering::Relaxed);
        assert_eq!(
            (state(v), active(v), v & WRITER),
            (LineState::Modified, 0, 0)
        );
        assert!(!try_claim_writeback(&AtomicU64::new(v + 1)));
        assert!(try_claim_writeback(&w));
        publish(&w, LineState::Ready, false);
        assert_eq!(state(w.load(Ordering::Relaxed)), LineState::Ready);
    }
}
