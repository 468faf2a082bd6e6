//! Model-checks the line state machine (`gpuio_cache::line`, the very functions the cache uses)
//! with loom, in an ordinary `cargo test`: the functions are generic over the atomic word, and here
//! they run on loom's atomics, so loom explores every interleaving (and memory-order outcome) of a
//! tiny configuration. The line's bytes are a `loom::cell::UnsafeCell`: loom fails the test if a
//! reader and a writer or loader could ever touch them at the same time.

use std::sync::atomic::Ordering;

use gpuio_cache::line::{self, LineState, Word};
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;

struct LoomWord(AtomicU64);

impl Word for LoomWord {
    fn load(&self, o: Ordering) -> u64 {
        self.0.load(o)
    }
    fn store(&self, v: u64, o: Ordering) {
        self.0.store(v, o)
    }
    fn compare_exchange(&self, c: u64, n: u64, s: Ordering, f: Ordering) -> Result<u64, u64> {
        self.0.compare_exchange(c, n, s, f)
    }
    fn fetch_add(&self, v: u64, o: Ordering) -> u64 {
        self.0.fetch_add(v, o)
    }
    fn fetch_sub(&self, v: u64, o: Ordering) -> u64 {
        self.0.fetch_sub(v, o)
    }
    fn fetch_and(&self, v: u64, o: Ordering) -> u64 {
        self.0.fetch_and(v, o)
    }
}

/// One slot: its word, its tag (which line it holds), and its bytes (here: the line's value).
struct Slot {
    word: LoomWord,
    tag: AtomicU64,
    data: UnsafeCell<u64>,
}

fn get(c: &UnsafeCell<u64>) -> u64 {
    // SAFETY: a plain read; loom reports it if it can race with a write (that is the check).
    c.with(|p| unsafe { *p })
}

fn put(c: &UnsafeCell<u64>, v: u64) {
    // SAFETY: a plain write; loom reports it if it can race with any access (that is the check).
    c.with_mut(|p| unsafe { *p = v })
}

const READY: u64 = (LineState::Ready as u64) << line::STATE_SHIFT;

fn slot_with(tag: u64, value: u64) -> Arc<Slot> {
    Arc::new(Slot {
        word: LoomWord(AtomicU64::new(READY)),
        tag: AtomicU64::new(tag),
        data: UnsafeCell::new(value),
    })
}

/// The reader's hit path: pin, check, copy, unpin. Returns the value if it was a hit on `tag`.
fn read(s: &Slot, tag: u64) -> Option<u64> {
    let seen = line::pin(&s.word);
    let v = (line::readable(seen) && s.tag.load(Ordering::Acquire) == tag).then(|| get(&s.data));
    line::unpin(&s.word);
    v
}

#[test]
fn a_reader_never_sees_a_line_being_replaced() {
    // Line 1 holds value 10; the clock evicts it and loads line 2 (value 20). A reader of line 1
    // sees 10 or misses; a reader of line 2 sees 20 or misses — never anything else.
    loom::model(|| {
        let s = slot_with(1, 10);
        let s2 = s.clone();
        let evictor = thread::spawn(move || {
            if line::try_claim(&s2.word).is_some() {
                s2.tag.store(2, Ordering::Release);
                put(&s2.data, 20);
                line::publish(&s2.word, LineState::Ready, true);
            }
        });
        let r1 = read(&s, 1);
        assert!(r1.is_none() || r1 == Some(10), "{r1:?}");
        let r2 = read(&s, 2);
        assert!(r2.is_none() || r2 == Some(20), "{r2:?}");
        evictor.join().unwrap();
    });
}

#[test]
fn a_writer_excludes_readers_and_claims() {
    // A writer sets WRITER, waits until alone, writes, ends the write (Modified). Concurrently a
    // reader reads and an evictor tries to claim the line. Loom checks the bytes are never shared
    // with a writer; the evictor may only win before the writer pinned (then the writer backs off).
    loom::model(|| {
        let s = slot_with(1, 10);
        let (sw, se) = (s.clone(), s.clone());
        let writer = thread::spawn(move || {
            let seen = line::pin(&sw.word);
            let mut wrote = false;
            if line::readable(seen)
                && sw.tag.load(Ordering::Acquire) == 1
                && line::try_begin_write(&sw.word)
            {
                while !line::writer_alone(&sw.word) {
                    thread::yield_now();
                }
                put(&sw.data, 11);
                line::end_write(&sw.word);
                wrote = true;
            } else {
                line::unpin(&sw.word);
            }
            wrote
        });
        let evictor = thread::spawn(move || {
            let claimed = line::try_claim(&se.word);
            if let Some(prev) = claimed {
                // Evicting: the bytes are ours until we publish.
                put(&se.data, 0);
                se.tag.store(0, Ordering::Release);
                line::publish(&se.word, LineState::Invalid, false);
                assert!(matches!(prev, LineState::Ready | LineState::Modified));
            }
            claimed.is_some()
        });
        let r = read(&s, 1);
        assert!(matches!(r, None | Some(10) | Some(11)), "{r:?}");
        let wrote = writer.join().unwrap();
        let evicted = evictor.join().unwrap();
        let w = s.word.load(Ordering::Acquire);
        assert_eq!(line::active(w), 0);
        assert_eq!(w & line::WRITER, 0);
        if wrote && !evicted {
            assert_eq!(line::state(w), LineState::Modified);
            assert_eq!(get(&s.data), 11);
        }
        assert!(!(wrote && evicted && line::state(w) == LineState::Modified));
    });
}

#[test]
fn only_one_of_two_claimers_wins_and_flush_waits_for_pins() {
    loom::model(|| {
        let s = Arc::new(Slot {
            word: LoomWord(AtomicU64::new(
                (LineState::Modified as u64) << line::STATE_SHIFT,
            )),
            tag: AtomicU64::new(1),
            data: UnsafeCell::new(5),
        });
        let (a, b) = (s.clone(), s.clone());
        let t1 = thread::spawn(move || {
            let won = line::try_claim(&a.word).is_some();
            if won {
                put(&a.data, 6);
                line::publish(&a.word, LineState::Invalid, false);
            }
            won
        });
        let t2 = thread::spawn(move || {
            let won = line::try_claim_writeback(&b.word);
            if won {
                let v = get(&b.data);
                assert!(v == 5 || v == 6);
                line::publish(&b.word, LineState::Ready, false);
            }
            won
        });
        let (w1, w2) = (t1.join().unwrap(), t2.join().unwrap());
        // Both may succeed one after the other, never at once (loom checks the cell).
        assert!(w1 || w2 || line::state(s.word.load(Ordering::Acquire)) == LineState::Modified);
        assert_eq!(line::active(s.word.load(Ordering::Acquire)), 0);
    });
}
