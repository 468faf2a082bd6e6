//! The device cache's line state machine twin (`gpuio_cuda::rings::line`, the same word and
//! transitions as `device/gpuio.cuh`) under random operations from several threads, checked against
//! a sequential model of the file's contents: every value a reader sees names its own line (never
//! another line's bytes: a slot mix-up) and a version its writer had already begun; the owner of a
//! line reads back exactly what it wrote; after a final flush the backing store equals the model, and
//! the structure is consistent (no pins, no BUSY, one slot per resident line).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio_cuda::rings::code;
use gpuio_cuda::rings::LineCache;
use gpuio_testkit::Rng;

struct World {
    cache: LineCache<AtomicU32>,
    /// The file: one u64 per line.
    backing: Vec<AtomicU64>,
    /// The cache's slot memory: one u64 per slot.
    data: Vec<AtomicU64>,
    /// Highest version each line's writer has started (published before the bytes).
    started: Vec<AtomicU64>,
}

fn val(line: u32, version: u64) -> u64 {
    (line as u64) << 32 | version
}

impl World {
    fn new(pages: u32, slots: u32) -> World {
        World {
            cache: LineCache::new(pages, slots, AtomicU32::new),
            backing: (0..pages).map(|p| AtomicU64::new(val(p, 0))).collect(),
            data: (0..slots).map(|_| AtomicU64::new(u64::MAX)).collect(),
            started: (0..pages).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn acquire(&self, p: u32) -> Result<u32, i32> {
        let mut load = |p: u32, s: u32| {
            self.data[s as usize].store(
                self.backing[p as usize].load(Ordering::Acquire),
                Ordering::Release,
            );
            Ok(())
        };
        let mut wb = |p: u32, s: u32| {
            self.backing[p as usize].store(
                self.data[s as usize].load(Ordering::Acquire),
                Ordering::Release,
            );
            Ok(())
        };
        let mut spins = 0u32;
        let mut snooze = || {
            spins += 1;
            if spins > 8 {
                std::thread::yield_now();
            }
        };
        self.cache
            .acquire(p, 100_000, &mut load, &mut wb, &mut snooze)
    }
    fn flush(&self) -> Result<u32, i32> {
        self.cache.flush_all(&mut |p, s| {
            self.backing[p as usize].store(
                self.data[s as usize].load(Ordering::Acquire),
                Ordering::Release,
            );
            Ok(())
        })
    }
}

fn run(pages: u32, slots: u32, threads: u32, ops: u32, hold_max: usize, seed: u64) {
    let w = Arc::new(World::new(pages, slots));
    let deadline = Instant::now() + Duration::from_secs(60);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed * 1000 + t as u64);
                let mut mine: Vec<u64> = vec![0; pages as usize]; // versions of my lines
                let mut held: Vec<u32> = Vec::new();
                let mut busy = 0u64;
                for _ in 0..ops {
                    assert!(
                        Instant::now() < deadline,
                        "model test ran too long (a hang?)"
                    );
                    let p = rng.below(pages as u64) as u32;
                    let owner = p % threads == t;
                    match rng.below(10) {
                        // Flush now and then (pinned lines report EBUSY: fine).
                        0 => match w.flush() {
                            Ok(_) | Err(code::EBUSY) => {}
                            Err(e) => panic!("flush: {e}"),
                        },
                        // Hold a pin across operations (exercises eviction skipping pinned lines).
                        1 if held.len() < hold_max => match w.acquire(p) {
                            Ok(_) => held.push(p),
                            Err(code::EBUSY) => busy += 1,
                            Err(e) => panic!("acquire: {e}"),
                        },
                        2 if !held.is_empty() => {
                            let q = held.swap_remove(rng.below(held.len() as u64) as usize);
                            w.cache.release(q);
                        }
                        // Write one of my lines.
                        3..=5 if owner => match w.acquire(p) {
                            Ok(s) => {
                                mine[p as usize] += 1;
                                let v = mine[p as usize];
                                w.started[p as usize].store(v, Ordering::Release);
                                w.data[s as usize].store(val(p, v), Ordering::Release);
                                w.cache.mark_modified(p);
                                w.cache.release(p);
                            }
                            Err(code::EBUSY) => busy += 1,
                            Err(e) => panic!("acquire for write: {e}"),
                        },
                        // Read any line.
                        _ => match w.acquire(p) {
                            Ok(s) => {
                                let got = w.data[s as usize].load(Ordering::Acquire);
                                assert_eq!(
                                    got >> 32,
                                    p as u64,
                                    "line {p} read another line's bytes ({got:#x}) from slot {s}"
                                );
                                let v = got & 0xffff_ffff;
                                if owner {
                                    assert_eq!(v, mine[p as usize], "line {p}: my own write lost");
                                } else {
                                    assert!(
                                        v <= w.started[p as usize].load(Ordering::Acquire),
                                        "line {p}: version {v} from the future"
                                    );
                                }
                                w.cache.release(p);
                            }
                            Err(code::EBUSY) => busy += 1,
                            Err(e) => panic!("acquire for read: {e}"),
                        },
                    }
                }
                for q in held {
                    w.cache.release(q);
                }
                (mine, busy)
            })
        })
        .collect();
    let mut model = vec![0u64; pages as usize];
    let mut busy = 0;
    for (t, h) in hs.into_iter().enumerate() {
        let (mine, b) = h.join().unwrap();
        busy += b;
        for p in 0..pages as usize {
            if p as u32 % threads == t as u32 {
                model[p] = mine[p];
            }
        }
    }
    w.cache.check_quiescent().unwrap();
    w.flush().unwrap();
    w.cache.check_quiescent().unwrap();
    for p in 0..pages {
        assert_eq!(
            w.backing[p as usize].load(Ordering::Acquire),
            val(p, model[p as usize]),
            "line {p} after flush"
        );
    }
    eprintln!("{pages} lines / {slots} slots / {threads} threads: {busy} EBUSY (all pinned)");
}

#[test]
fn random_operations_from_threads_match_the_model() {
    for seed in 1..=3 {
        run(64, 8, 4, 20_000, 2, seed);
        run(16, 2, 3, 20_000, 1, seed);
        run(256, 64, 6, 10_000, 4, seed);
    }
}

#[test]
fn all_lines_pinned_is_an_error_not_a_hang() {
    let w = World::new(8, 3);
    for p in 0..3 {
        w.acquire(p).unwrap();
    }
    let t = Instant::now();
    assert_eq!(w.acquire(5), Err(code::EBUSY));
    assert!(t.elapsed() < Duration::from_secs(1));
    // Resident lines still hit.
    assert!(w.acquire(1).is_ok());
    for p in [0, 1, 1, 2] {
        w.cache.release(p);
    }
    assert!(w.acquire(5).is_ok());
    w.cache.release(5);
    w.cache.check_quiescent().unwrap();
}
