//! Model-checks the device cache's line state machine twin (`gpuio_cuda::rings::line`, the very
//! functions whose logic `device/gpuio.cuh` mirrors) with loom on tiny configurations: 1–3 lines,
//! 1–2 slots, 2–3 threads. The slot bytes and the backing file are `loom::cell::UnsafeCell`s, so loom
//! fails the test if a fill, a write-back, a reader or a writer could ever touch the same bytes
//! at once; every thread's observed value is checked too. Bounded waits may end in ETIMEDOUT and a
//! full cache in EBUSY: both are allowed outcomes, a hang or a wrong value is not.

use std::sync::atomic::Ordering;

use gpuio_cuda::rings::{code, LineCache, Word32};
use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU32;
use loom::sync::Arc;
use loom::thread;

struct W(AtomicU32);

impl Word32 for W {
    fn load(&self, o: Ordering) -> u32 {
        self.0.load(o)
    }
    fn store(&self, v: u32, o: Ordering) {
        self.0.store(v, o)
    }
    fn compare_exchange(&self, c: u32, n: u32, s: Ordering, f: Ordering) -> Result<u32, u32> {
        self.0.compare_exchange(c, n, s, f)
    }
    fn fetch_add(&self, v: u32, o: Ordering) -> u32 {
        self.0.fetch_add(v, o)
    }
    fn fetch_sub(&self, v: u32, o: Ordering) -> u32 {
        self.0.fetch_sub(v, o)
    }
    fn fetch_and(&self, v: u32, o: Ordering) -> u32 {
        self.0.fetch_and(v, o)
    }
    fn fetch_or(&self, v: u32, o: Ordering) -> u32 {
        self.0.fetch_or(v, o)
    }
}

struct World {
    c: LineCache<W>,
    backing: Vec<UnsafeCell<u64>>,
    data: Vec<UnsafeCell<u64>>,
}

fn get(c: &UnsafeCell<u64>) -> u64 {
    // SAFETY: a plain read; loom reports it if it can race with a write (that is the check).
    c.with(|p| unsafe { *p })
}
fn put(c: &UnsafeCell<u64>, v: u64) {
    // SAFETY: a plain write; loom reports it if it can race with any access (that is the check).
    c.with_mut(|p| unsafe { *p = v })
}

impl World {
    fn new(pages: u32, slots: u32) -> Arc<World> {
        Arc::new(World {
            c: LineCache::new(pages, slots, |v| W(AtomicU32::new(v))),
            backing: (0..pages)
                .map(|p| UnsafeCell::new(100 * p as u64))
                .collect(),
            data: (0..slots).map(|_| UnsafeCell::new(u64::MAX)).collect(),
        })
    }
    fn wb(&self) -> impl FnMut(u32, u32) -> Result<(), i32> + '_ {
        |p, s| {
            put(&self.backing[p as usize], get(&self.data[s as usize]));
            Ok(())
        }
    }
    fn acquire(&self, p: u32) -> Result<u32, i32> {
        let mut load = |p: u32, s: u32| {
            put(&self.data[s as usize], get(&self.backing[p as usize]));
            Ok(())
        };
        let mut wb = self.wb();
        self.c
            .acquire(p, 2, &mut load, &mut wb, &mut || thread::yield_now())
    }
    fn read(&self, p: u32) -> Result<u64, i32> {
        let s = self.acquire(p)?;
        let v = get(&self.data[s as usize]);
        self.c.release(p);
        Ok(v)
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn ok_or_bounded(r: Result<u64, i32>, want: &[u64]) {
    match r {
        Ok(v) => assert!(want.contains(&v), "read {v}, expected one of {want:?}"),
        Err(e) => assert!(e == code::ETIMEDOUT || e == code::EBUSY, "error {e}"),
    }
}

#[test]
fn two_threads_miss_on_one_line_one_fills_the_other_waits_or_hits() {
    model(|| {
        let w = World::new(1, 2);
        let w2 = w.clone();
        let t = thread::spawn(move || ok_or_bounded(w2.read(0), &[0]));
        ok_or_bounded(w.read(0), &[0]);
        t.join().unwrap();
        w.c.check_quiescent().unwrap();
    });
}

#[test]
fn eviction_skips_pinned_lines() {
    model(|| {
        // Two slots: line 0 stays pinned by the main thread; two threads want lines 1 and 2.
        let w = World::new(3, 2);
        let s0 = w.acquire(0).unwrap();
        let (a, b) = (w.clone(), w.clone());
        let ta = thread::spawn(move || ok_or_bounded(a.read(1), &[100]));
        let tb = thread::spawn(move || ok_or_bounded(b.read(2), &[200]));
        ta.join().unwrap();
        tb.join().unwrap();
        // Line 0 was never evicted: still in its slot with its bytes.
        assert_eq!(get(&w.data[s0 as usize]), 0);
        w.c.release(0);
        w.c.check_quiescent().unwrap();
    });
}

#[test]
fn write_marks_modified_and_flush_or_eviction_writes_it_back() {
    model(|| {
        let w = World::new(2, 1);
        let (a, b) = (w.clone(), w.clone());
        // Writer: line 0 := 7.
        let ta = thread::spawn(move || {
            if let Ok(s) = a.acquire(0) {
                put(&a.data[s as usize], 7);
                a.c.mark_modified(0);
                a.c.release(0);
                true
            } else {
                false
            }
        });
        // Another thread flushes, then reads line 1 (forcing line 0 out of the only slot).
        let tb = thread::spawn(move || {
            let mut wb = b.wb();
            let r = b.c.flush_all(&mut wb);
            assert!(matches!(r, Ok(_) | Err(code::EBUSY)), "{r:?}");
            drop(wb);
            ok_or_bounded(b.read(1), &[100]);
        });
        let wrote = ta.join().unwrap();
        tb.join().unwrap();
        let mut wb = w.wb();
        w.c.flush_all(&mut wb).unwrap();
        drop(wb);
        w.c.check_quiescent().unwrap();
        assert_eq!(get(&w.backing[0]), if wrote { 7 } else { 0 });
    });
}

#[test]
fn all_pinned_returns_ebusy_and_a_release_lets_a_retry_in() {
    model(|| {
        let w = World::new(3, 2);
        w.acquire(0).unwrap();
        w.acquire(1).unwrap();
        let w2 = w.clone();
        let t = thread::spawn(move || w2.read(2));
        w.c.release(1);
        let r = t.join().unwrap();
        assert!(matches!(r, Ok(200) | Err(code::EBUSY)), "{r:?}");
        w.c.release(0);
        assert_eq!(w.read(2), Ok(200));
        w.c.check_quiescent().unwrap();
    });
}

#[test]
fn three_threads_two_lines_two_slots() {
    model(|| {
        let w = World::new(2, 2);
        let ts: Vec<_> = (0..2u32)
            .map(|i| {
                let w = w.clone();
                thread::spawn(move || ok_or_bounded(w.read(i), &[100 * i as u64]))
            })
            .collect();
        ok_or_bounded(w.read(1), &[100]);
        for t in ts {
            t.join().unwrap();
        }
        w.c.check_quiescent().unwrap();
    });
}
