//! Page cache behaviour against simple models, on every backend, with injected faults.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use gpuio::backend::BackendKind;
use gpuio::{ErrorKind, File, OpenOptions};
use gpuio_cache::{Array, CacheConfig, CachedFile, LineState, PageCache};
use gpuio_testkit::{within, FaultPlan, Rng};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

fn config(lines: u64, line: usize) -> CacheConfig {
    CacheConfig {
        line_bytes: line,
        capacity_bytes: lines * line as u64,
        queue_depth: 16,
        ..CacheConfig::default()
    }
}

fn rw(path: &std::path::Path) -> File {
    OpenOptions::read_write().open(path).unwrap()
}

#[test]
fn reads_and_gathers_match_the_file_on_every_backend() {
    for (label, engine) in gpuio_testkit::engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(100_000, 1); // not a multiple of the line: a short last line
        std::fs::write(&path, &data).unwrap();
        let cache = PageCache::new(&engine, config(8, 4096)).unwrap();
        let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
        assert_eq!(cache.len(src), 100_000);
        let mut rng = Rng::new(7);
        for _ in 0..300 {
            let len = rng.below(9000) as usize;
            let off = rng.below(100_000 - len as u64);
            let mut out = vec![0u8; len];
            cache.read(src, off, &mut out).unwrap();
            assert_eq!(out, data[off as usize..off as usize + len], "{label}");
        }
        let ranges: Vec<(u64, usize)> = (0..200)
            .map(|_| {
                let len = rng.below(300) as usize + 1;
                (rng.below(100_000 - len as u64), len)
            })
            .collect();
        let r = cache.gather(src, &ranges).unwrap().wait().unwrap();
        assert_eq!(r.len(), ranges.len());
        for (i, &(o, l)) in ranges.iter().enumerate() {
            assert_eq!(
                r.get(i),
                &data[o as usize..o as usize + l],
                "{label} range {i}"
            );
        }
        // A reused result buffer, longer than needed and full of other bytes, gives the same bytes.
        let mut reused = r.into_bytes();
        reused.resize(reused.len() + 5000, 0xEE);
        let r = cache
            .gather_into(src, &ranges, reused)
            .unwrap()
            .wait()
            .unwrap();
        let want: Vec<u8> = ranges
            .iter()
            .flat_map(|&(o, l)| data[o as usize..o as usize + l].to_vec())
            .collect();
        assert_eq!(r.as_bytes(), &want[..], "{label}");
        let st = cache.stats();
        assert_eq!(st.accesses, st.hits + st.misses);
        assert!(st.evictions > 0 && st.reads_issued > 0, "{label} {st:?}");
        assert!(st.read_amplification() > 0.0);
        // The tail line and past-the-end reads.
        let mut out = vec![0u8; 10];
        cache.read(src, 99_990, &mut out).unwrap();
        assert_eq!(out, data[99_990..]);
        let e = cache.read(src, 99_995, &mut out).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
        let e = cache.gather(src, &[(0, 1), (100_000, 1)]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
    }
}

#[test]
fn bad_configuration_and_input_are_errors() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    for (cfg, what) in [
        (config(1, 4096).with_cap(4095), "smaller than one"),
        (config(4, 3000), "power of two"),
        (config(4, 256), "power of two"),
        (config(4, 1 << 17), "power of two"),
        (
            CacheConfig {
                queue_depth: 0,
                ..config(4, 4096)
            },
            "queue depth",
        ),
    ] {
        let e = PageCache::new(&engine, cfg).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains(what), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, pattern(10_000, 2)).unwrap();
    let cache = PageCache::new(&engine, config(4, 4096)).unwrap();
    let ro = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let e = cache.write(ro, 0, b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let w = cache.attach_file(&rw(&path)).unwrap();
    let e = cache.write(w, 9_999, b"xy").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = cache.read(w, u64::MAX, &mut [0u8; 2]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
    assert_eq!(Array::<u64>::new(&cache, w).unwrap().len(), 1250);
    let e = Array::<[u8; 3]>::new(&cache, w).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let a = Array::<u32>::from_offset(&cache, w, 16, 10).unwrap();
    assert_eq!(a.get(10).unwrap_err().kind(), ErrorKind::InvalidInput);
    assert!(Array::<u32>::from_offset(&cache, w, 16, 2497).is_err());
}

trait WithCap {
    fn with_cap(self, c: u64) -> Self;
}
impl WithCap for CacheConfig {
    fn with_cap(mut self, c: u64) -> Self {
        self.capacity_bytes = c;
        self
    }
}

#[test]
fn concurrent_misses_on_one_line_issue_one_read() {
    // Slow completions so that every thread arrives while the load is in flight.
    let (engine, _h) = gpuio_testkit::faulty_engine(
        3,
        FaultPlan::none().with_delay(1.0, Duration::from_millis(50)),
        BackendKind::Threads,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(64 << 10, 3);
    std::fs::write(&path, &data).unwrap();
    let cache = PageCache::new(&engine, config(16, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let n = 16;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|t| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut out = vec![0u8; 100];
                cache.read(src, 8192 + t as u64 * 10, &mut out).unwrap();
                out
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        let o = 8192 + t * 10;
        assert_eq!(h.join().unwrap(), data[o..o + 100]);
    }
    let st = cache.stats();
    assert_eq!(st.reads_issued, 1, "{st:?}");
    assert!(st.joined > 0, "{st:?}");
    assert_eq!(st.accesses, n as u64);
}

#[test]
fn a_cache_whose_lines_are_all_held_says_so() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, pattern(64 << 10, 4)).unwrap();
    let cache = PageCache::new(&engine, config(4, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let held = cache.pin(src, 0, 4 * 4096).unwrap();
    assert_eq!(held.lines(), 4);
    let c2 = cache.clone();
    let e = within(10, move || {
        c2.read(src, 5 * 4096, &mut [0u8; 8]).unwrap_err()
    });
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    assert!(e.to_string().contains("all 4 lines are pinned"), "{e}");
    let e = cache.gather(src, &[(40_000, 8)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock);
    // Held lines are still readable; released, the cache works again.
    cache.read(src, 100, &mut [0u8; 8]).unwrap();
    drop(held);
    cache.read(src, 5 * 4096, &mut [0u8; 8]).unwrap();
}

#[test]
fn a_failed_read_leaves_no_ready_line_and_a_retry_succeeds() {
    let (engine, h) =
        gpuio_testkit::faulty_engine(5, FaultPlan::none(), BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(64 << 10, 5);
    std::fs::write(&path, &data).unwrap();
    let cache = PageCache::new(&engine, config(8, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    h.set_plan(FaultPlan::none().with_read_eio(1.0));
    let ranges = [(0u64, 10usize), (5000, 10), (20_000, 5000)];
    let c2 = cache.clone();
    let r = within(10, move || c2.gather(src, &ranges).unwrap().wait());
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    for &(o, _) in &ranges {
        assert_ne!(cache.resident_state(src, o), Some(LineState::Ready));
    }
    let c2 = cache.clone();
    let e = within(10, move || c2.read(src, 0, &mut [0u8; 4]).unwrap_err());
    assert_eq!(e.kind(), ErrorKind::Io);
    h.set_plan(FaultPlan::none());
    let before = cache.stats().reads_issued;
    let r = cache.gather(src, &ranges).unwrap().wait().unwrap();
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert_eq!(r.get(i), &data[o as usize..o as usize + l]);
        assert_eq!(cache.resident_state(src, o), Some(LineState::Ready));
    }
    // Lines 0, 1, 4, 5, 6; an 8-line cache coalesces at most 2 adjacent lines: [0 1] [4 5] [6].
    let st = cache.stats();
    assert_eq!(st.reads_issued - before, 3, "{st:?}");
}

#[test]
fn adjacent_misses_are_read_together_and_land_in_their_lines() {
    for (label, engine) in gpuio_testkit::engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(1_000_000, 21); // a short last line
        std::fs::write(&path, &data).unwrap();
        for coalesce in [0, 4096, 16 << 10, 128 << 10] {
            // Queue depth 64: a bounce buffer for every run here, so none falls back to line reads.
            let cfg = CacheConfig {
                coalesce_bytes: coalesce,
                queue_depth: 64,
                ..config(256, 4096)
            };
            let cache = PageCache::new(&engine, cfg).unwrap();
            let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
            // 40 adjacent lines, a gap, the last 5 lines (the final one short), one line resident
            // already in the middle of the first run.
            cache.read(src, 20 * 4096, &mut [0u8; 1]).unwrap();
            let ranges = [(0u64, 40 * 4096usize), (900_000, 100_000), (12345, 7)];
            let r = cache.gather(src, &ranges).unwrap().wait().unwrap();
            for (i, &(o, l)) in ranges.iter().enumerate() {
                assert_eq!(
                    r.get(i),
                    &data[o as usize..o as usize + l],
                    "{label} {coalesce}"
                );
            }
            let st = cache.stats();
            let lines = 1 + 39 + 26; // the first read, the rest of [0, 40), lines 219..=244
            assert_eq!(st.lines_loaded, lines, "{label} {coalesce} {st:?}");
            let reads = match coalesce {
                // One line a read.
                0 | 4096 => lines,
                // 4-line runs: [0,20) = 5, [21,40) = 5, [219,245) = 7, plus the first read.
                16384 => 1 + 5 + 5 + 7,
                // 32-line runs (capped at a quarter of the 256 lines = 64): 1, 1, 1, and the first.
                _ => 1 + 1 + 1 + 1,
            };
            assert_eq!(st.reads_issued, reads, "{label} {coalesce} {st:?}");
            // Every line landed whole: read each back as a hit.
            cache.reset_stats();
            let mut out = vec![0u8; 40 * 4096];
            cache.read(src, 0, &mut out).unwrap();
            assert_eq!(out, data[..40 * 4096]);
            assert_eq!(cache.stats().misses, 0, "{label} {coalesce}");
        }
    }
}

#[test]
fn a_failed_coalesced_read_fails_every_line_of_its_run() {
    let (engine, h) =
        gpuio_testkit::faulty_engine(22, FaultPlan::none(), BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(1 << 20, 22);
    std::fs::write(&path, &data).unwrap();
    let cache = PageCache::new(&engine, config(64, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    // The second of three reads fails: lines [0,16) come, [16,32) fail, [32,48) come.
    h.set_plan(FaultPlan::none().with_fail_nth(2, libc_eio(), false));
    let ranges = [(0u64, 48 * 4096usize)];
    let c2 = cache.clone();
    let e = within(10, move || c2.gather(src, &ranges).unwrap().wait()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert_eq!(cache.stats().reads_issued, 3);
    for line in 0..48u64 {
        let st = cache.resident_state(src, line * 4096);
        if (16..32).contains(&line) {
            assert_ne!(st, Some(LineState::Ready), "line {line}");
        } else {
            assert_eq!(st, Some(LineState::Ready), "line {line}");
        }
    }
    h.set_plan(FaultPlan::none());
    let r = cache.gather(src, &ranges).unwrap().wait().unwrap();
    assert_eq!(r.get(0), &data[..48 * 4096]);
}

#[test]
fn with_every_bounce_buffer_busy_a_run_waits_for_one() {
    // Slow reads so that the bounce buffers (2: the least a cache has) are all in flight.
    let (engine, _h) = gpuio_testkit::faulty_engine(
        23,
        FaultPlan::none().with_delay(1.0, Duration::from_millis(30)),
        BackendKind::Threads,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(1 << 20, 23);
    std::fs::write(&path, &data).unwrap();
    let cfg = CacheConfig {
        queue_depth: 1,
        coalesce_bytes: 8192,
        ..config(64, 4096)
    };
    let cache = PageCache::new(&engine, cfg).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    // Five runs of two lines, separated by gaps: two take the bounce buffers, the others wait for
    // them and are still read whole.
    let ranges: Vec<(u64, usize)> = (0..5).map(|k| (k * 4 * 4096, 8192usize)).collect();
    let c2 = cache.clone();
    let r2 = ranges.clone();
    let r = within(10, move || c2.gather(src, &r2).unwrap().wait().unwrap());
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert_eq!(r.get(i), &data[o as usize..o as usize + l]);
    }
    let st = cache.stats();
    // Every run read whole (line by line it would be 10 reads).
    assert_eq!((st.lines_loaded, st.reads_issued), (10, 5), "{st:?}");
}

#[test]
fn a_failed_write_back_keeps_the_line_dirty_and_flush_reports_it() {
    let (engine, h) =
        gpuio_testkit::faulty_engine(6, FaultPlan::none(), BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let mut model = pattern(32 << 10, 6);
    std::fs::write(&path, &model).unwrap();
    let cache = PageCache::new(&engine, config(4, 4096)).unwrap();
    let src = cache.attach_file(&rw(&path)).unwrap();
    for l in 0..4u64 {
        let line = vec![l as u8 + 1; 4096];
        cache.write(src, l * 4096, &line).unwrap(); // whole lines: no reads
        model[l as usize * 4096..(l as usize + 1) * 4096].copy_from_slice(&line);
    }
    assert_eq!(cache.stats().reads_issued, 0);
    assert_eq!(cache.resident_state(src, 0), Some(LineState::Modified));
    // The first operation from now on (the first eviction's write-back) fails.
    h.set_plan(FaultPlan::none().with_fail_nth(1, libc_eio(), false));
    let c2 = cache.clone();
    let mut out = [0u8; 16];
    let got = within(10, move || c2.read(src, 5 * 4096, &mut out).map(|()| out)).unwrap();
    assert_eq!(got[..], model[5 * 4096..5 * 4096 + 16]);
    let dirty = (0..4u64)
        .filter(|l| cache.resident_state(src, l * 4096) == Some(LineState::Modified))
        .count();
    assert_eq!(
        dirty, 3,
        "the failed line stays dirty, one other was written back"
    );
    let e = cache.flush(true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("since the last flush"), "{e}");
    cache.flush(true).unwrap();
    for l in 0..4u64 {
        if let Some(s) = cache.resident_state(src, l * 4096) {
            assert_eq!(s, LineState::Ready);
        }
    }
    assert_eq!(std::fs::read(&path).unwrap(), model);
    // A flush whose own write-back fails reports it and keeps the line dirty.
    cache.write(src, 100, b"hello").unwrap();
    model[100..105].copy_from_slice(b"hello");
    h.set_plan(FaultPlan::none().with_write_eio(1.0));
    assert_eq!(cache.flush(false).unwrap_err().kind(), ErrorKind::Io);
    assert_eq!(cache.resident_state(src, 0), Some(LineState::Modified));
    h.set_plan(FaultPlan::none());
    cache.flush(false).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model);
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn pack_entries_are_read_only_sources() {
    use gpuio_pack::{pack_files, Codec, Pack, PackOptions};
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("w.bin");
    let data: Vec<u8> = (0..300_000u32)
        .flat_map(|i| (i / 7).to_le_bytes())
        .collect();
    std::fs::write(&input, &data).unwrap();
    let out = dir.path().join("p.gpk");
    let opts = PackOptions {
        codec: Codec::Lz4,
        ..PackOptions::default()
    };
    pack_files(&[("w.bin".into(), input)], &out, &opts, &mut |_, _| {}).unwrap();
    let pack = Pack::open(&out).unwrap();
    let cache = PageCache::new(&engine, config(16, 8192)).unwrap();
    let src = cache.attach_entry(&pack.entry("w.bin").unwrap()).unwrap();
    assert!(!cache.is_writable(src));
    let arr = Array::<u32>::new(&cache, src).unwrap();
    assert_eq!(arr.len(), 300_000);
    let mut rng = Rng::new(8);
    let idx: Vec<u64> = (0..500).map(|_| rng.below(300_000)).collect();
    let got = within(20, move || arr.gather(&idx).map(|v| (v, idx))).unwrap();
    for (v, i) in got.0.iter().zip(&got.1) {
        assert_eq!(*v, *i as u32 / 7);
    }
    let e = cache.write(src, 0, b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    let mut out = vec![0u8; 50_000];
    cache.read(src, 1_000_000, &mut out).unwrap();
    assert_eq!(out, data[1_000_000..1_050_000]);
}

#[test]
fn array_operations_match_a_vec() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let n = 20_000u64;
    let mut model: Vec<u64> = (0..n).map(|i| i * 3 + 1).collect();
    let mut bytes = vec![0u8; 16]; // a header to skip
    bytes.extend(model.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(&path, &bytes).unwrap();
    let cache = PageCache::new(&engine, config(8, 1024)).unwrap();
    let src = cache.attach_file(&rw(&path)).unwrap();
    let a = Array::<u64>::from_offset(&cache, src, 16, n).unwrap();
    let mut rng = Rng::new(9);
    for round in 0..20 {
        let idx: Vec<u64> = (0..100).map(|_| rng.below(n)).collect();
        let vals: Vec<u64> = idx.iter().map(|_| rng.next_u64()).collect();
        a.scatter(&idx, &vals).unwrap();
        for (&i, &v) in idx.iter().zip(&vals) {
            model[i as usize] = v;
        }
        let i = rng.below(n);
        a.set(i, round).unwrap();
        model[i as usize] = round;
        let q: Vec<u64> = (0..300).map(|_| rng.below(n)).collect();
        let want: Vec<u64> = q.iter().map(|&i| model[i as usize]).collect();
        assert_eq!(a.gather(&q).unwrap(), want);
        assert_eq!(a.gather_async(&q).unwrap().wait().unwrap(), want);
        let k = rng.below(n);
        assert_eq!(a.get(k).unwrap(), model[k as usize]);
        let s = rng.below(n - 500);
        let mut out = vec![0u64; 500];
        a.read_range(s, &mut out).unwrap();
        assert_eq!(out, model[s as usize..s as usize + 500]);
    }
    let all: Vec<u64> = a.iter().collect::<gpuio::Result<_>>().unwrap();
    assert_eq!(all, model);
    cache.flush(true).unwrap();
    let disk = std::fs::read(&path).unwrap();
    let on_disk: Vec<u64> = disk[16..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(on_disk, model);
    // A CachedFile view of the same source sees the same bytes.
    let f = CachedFile::from_source(&cache, src);
    let mut b = [0u8; 8];
    f.read_at(16 + 8 * 5, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), model[5]);
    f.write_at(16, &7u64.to_le_bytes()).unwrap();
    assert_eq!(a.get(0).unwrap(), 7);
    f.flush(true).unwrap();
}

#[test]
fn many_threads_read_and_write_against_a_model() {
    for (label, engine) in gpuio_testkit::engines() {
        if label == "mmap" {
            continue; // same engine code; keep the run short
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let size = 256 << 10;
        let init = pattern(size, 10);
        std::fs::write(&path, &init).unwrap();
        // 8 lines of 1 KiB over 256 KiB: evictions all the time. Runs of 2 lines are coalesced on
        // the threads engine, not on io_uring, so both ways are checked.
        let coalesce = if label == "threads" { 2048 } else { 0 };
        let cfg = CacheConfig {
            coalesce_bytes: coalesce,
            ..config(8, 1024)
        };
        let cache = PageCache::new(&engine, cfg).unwrap();
        let src = cache.attach_file(&rw(&path)).unwrap();
        // Each thread owns the 100-byte slots k with k % threads == t (ranges may span lines, and
        // lines are shared between threads), so the model is well defined.
        let threads = 4;
        let slot = 100usize;
        let slots = size / slot;
        let model = Arc::new(parking_lot::Mutex::new(init));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (cache, model) = (cache.clone(), model.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(100 + t as u64);
                    let mut mine: Vec<usize> = (0..slots).filter(|k| k % threads == t).collect();
                    mine.truncate(400);
                    for step in 0..600 {
                        let k = mine[rng.below(mine.len() as u64) as usize];
                        let off = k * slot;
                        match rng.below(3) {
                            0 => {
                                let v = pattern(slot, rng.next_u64());
                                cache.write(src, off as u64, &v).unwrap();
                                model.lock()[off..off + slot].copy_from_slice(&v);
                            }
                            1 => {
                                let mut out = vec![0u8; slot];
                                cache.read(src, off as u64, &mut out).unwrap();
                                assert_eq!(out, model.lock()[off..off + slot], "step {step}");
                            }
                            _ => {
                                let ks: Vec<usize> = (0..8)
                                    .map(|_| mine[rng.below(mine.len() as u64) as usize])
                                    .collect();
                                let ranges: Vec<(u64, usize)> =
                                    ks.iter().map(|&k| ((k * slot) as u64, slot)).collect();
                                let r = cache.gather(src, &ranges).unwrap().wait().unwrap();
                                let m = model.lock();
                                for (i, &k) in ks.iter().enumerate() {
                                    assert_eq!(r.get(i), &m[k * slot..(k + 1) * slot]);
                                }
                            }
                        }
                        if step % 200 == 199 && t == 0 {
                            cache.flush(false).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        cache.flush(true).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap(), &*model.lock(), "{label}");
        let st = cache.stats();
        assert!(st.evictions > 100 && st.writes_issued > 0, "{label} {st:?}");
    }
}

#[test]
fn gather_returns_before_its_misses_complete_and_can_be_awaited() {
    let (engine, _h) = gpuio_testkit::faulty_engine(
        11,
        FaultPlan::none().with_delay(1.0, Duration::from_millis(30)),
        BackendKind::Threads,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(1 << 20, 11);
    std::fs::write(&path, &data).unwrap();
    let cache = PageCache::new(&engine, config(64, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let ranges: Vec<(u64, usize)> = (0..32).map(|i| (i * 30_000, 64)).collect();
    let g = cache.gather(src, &ranges).unwrap();
    assert!(!g.is_complete());
    // A tiny executor: poll until ready.
    let r = block_on(g).unwrap();
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert_eq!(r.get(i), &data[o as usize..o as usize + l]);
    }
    let p = cache.prefetch(src, 0, 64 * 4096).unwrap();
    p.wait().unwrap();
    cache.reset_stats();
    cache.read(src, 60 * 4096, &mut [0u8; 8]).unwrap();
    assert_eq!(cache.stats().hits, 1);
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct W(std::thread::Thread);
    impl Wake for W {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(W(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "future hung");
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// `Array::get` has a fast path for a value inside one resident line; values that straddle two lines
/// and values not yet resident go the general way. Either way the value is the file's and the access
/// is counted once (a straddling value touches two lines: two accesses, as a `read` of it would).
#[test]
fn array_get_reads_values_within_and_across_lines_and_counts_them_once() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let n = 300u64; // 4 + 2400 bytes: three 1 KiB lines, all resident after the first pass
    let model: Vec<u64> = (0..n)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let mut bytes = vec![0u8; 4]; // elements at 4 + 8k: k = 127 and 255 straddle a line boundary
    bytes.extend(model.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(&path, &bytes).unwrap();
    let cache = PageCache::new(&engine, config(8, 1024)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let a = Array::<u64>::from_offset(&cache, src, 4, n).unwrap();
    for pass in 0..2 {
        cache.reset_stats();
        for k in 0..n {
            assert_eq!(
                a.get(k).unwrap(),
                model[k as usize],
                "pass {pass}, element {k}"
            );
        }
        let s = cache.stats();
        assert_eq!(s.accesses, n + 2, "pass {pass}: {s:?}");
        assert_eq!(s.hits + s.misses, s.accesses, "pass {pass}: {s:?}");
        assert_eq!(s.bytes_requested, 8 * n, "pass {pass}: {s:?}");
        if pass == 1 {
            assert_eq!(s.hits, n + 2, "every line is resident: {s:?}");
        }
    }
    assert_eq!(
        a.get(n).unwrap_err().kind(),
        ErrorKind::InvalidInput,
        "past the end"
    );
}

/// Random rows inside lines, on every backend: in-place rows equal the file, counted once, and
/// once dropped their lines are replaceable again (a later gather over more lines than the cache
/// holds succeeds).
#[test]
fn held_gathers_hand_out_the_files_bytes_in_place() {
    for (label, engine) in gpuio_testkit::engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(200_000, 11); // a short last line
        std::fs::write(&path, &data).unwrap();
        let cache = PageCache::new(&engine, config(16, 4096)).unwrap();
        let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
        let mut rng = Rng::new(3);
        for round in 0..30 {
            // At most 6 distinct lines per batch: well within 16.
            let ranges: Vec<(u64, usize)> = (0..12)
                .map(|_| {
                    let line = (rng.below(6) * 8 + round % 8).min(48);
                    let line_len = (data.len() as u64 - line * 4096).min(4096);
                    let len = rng.below(300 + 1); // 0 included
                    (line * 4096 + rng.below(line_len - len + 1), len as usize)
                })
                .collect();
            cache.reset_stats();
            let rows = cache.gather_held(src, &ranges).unwrap().wait().unwrap();
            assert_eq!(rows.len(), ranges.len());
            for (i, &(o, l)) in ranges.iter().enumerate() {
                assert_eq!(
                    rows.get(i),
                    &data[o as usize..o as usize + l],
                    "{label} round {round} row {i}"
                );
            }
            let st = cache.stats();
            let want: u64 = ranges.iter().map(|r| r.1 as u64).sum();
            assert_eq!(st.bytes_requested, want, "{label}: {st:?}");
            assert_eq!(st.hits + st.misses, st.accesses, "{label}: {st:?}");
        }
        // Every line replaceable again: a copy gather over all 49 lines of the file (3 × the cache).
        let all: Vec<(u64, usize)> = (0..49).map(|l| (l * 4096, 8)).collect();
        let r = cache.gather(src, &all).unwrap().wait().unwrap();
        for (i, &(o, l)) in all.iter().enumerate() {
            assert_eq!(r.get(i), &data[o as usize..o as usize + l], "{label}");
        }
    }
}

/// Held lines are never replaced: while rows are held, gathers over many other lines evict only
/// the others, and the held rows still read as the file.
#[test]
fn held_rows_survive_eviction_pressure() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(64 * 4096, 12);
    std::fs::write(&path, &data).unwrap();
    let cache = PageCache::new(&engine, config(8, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let held = [
        (3 * 4096u64 + 100, 500usize),
        (9 * 4096, 4096),
        (40 * 4096 + 7, 1),
    ];
    let rows = cache.gather_held(src, &held).unwrap().wait().unwrap();
    assert_eq!(rows.lines(), 3);
    let before = cache.stats().evictions;
    for l in (10..64).filter(|l| *l != 40) {
        cache.read(src, l * 4096, &mut [0u8; 16]).unwrap();
    }
    assert!(cache.stats().evictions - before > 40, "{:?}", cache.stats());
    for (i, &(o, l)) in held.iter().enumerate() {
        assert_eq!(rows.get(i), &data[o as usize..o as usize + l], "row {i}");
        assert_eq!(cache.resident_state(src, o), Some(LineState::Ready));
    }
    drop(rows);
    // Released: the clock may take them now.
    for l in 10..64 {
        cache.read(src, l * 4096, &mut [0u8; 16]).unwrap();
    }
    assert_ne!(cache.resident_state(src, 3 * 4096), Some(LineState::Ready));
}

#[test]
fn held_gathers_refuse_what_they_cannot_hand_out_in_place() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, pattern(64 * 4096, 13)).unwrap();
    let cache = PageCache::new(&engine, config(8, 4096)).unwrap();
    let ro = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let rw_src = cache.attach_file(&rw(&path)).unwrap();
    let e = cache.gather_held(rw_src, &[(0, 8)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let e = cache.gather_held(ro, &[(4090, 8)]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "crosses a line: {e}");
    assert!(
        cache.gather_held(ro, &[(64 * 4096 - 4, 8)]).is_err(),
        "past the end"
    );
    // More distinct lines than the cache has: WouldBlock, bounded, and nothing stays held.
    let many: Vec<(u64, usize)> = (0..12).map(|l| (l * 4096, 8)).collect();
    let c2 = cache.clone();
    let e = within(30, move || c2.gather_held(ro, &many).and_then(|g| g.wait())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    let all: Vec<(u64, usize)> = (0..8).map(|l| (l * 4096, 8)).collect();
    cache.gather_held(ro, &all).unwrap().wait().unwrap();
}

/// An injected EIO fails the wait, releases what was held, and a retry succeeds.
#[test]
fn a_failed_held_gather_releases_its_lines() {
    let (engine, h) =
        gpuio_testkit::faulty_engine(7, FaultPlan::none(), BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = pattern(32 * 4096, 14);
    std::fs::write(&path, &data).unwrap();
    let cache = PageCache::new(&engine, config(8, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    // Lines 0-3 resident and held by the failing gather; lines 20-23 fail to load.
    cache
        .gather(src, &[(0, 1), (4096, 1), (8192, 1), (12288, 1)])
        .unwrap()
        .wait()
        .unwrap();
    h.set_plan(FaultPlan::none().with_read_eio(1.0));
    let ranges: Vec<(u64, usize)> = [0u64, 1, 2, 3, 20, 21, 22, 23]
        .iter()
        .map(|l| (l * 4096, 64))
        .collect();
    let c2 = cache.clone();
    let r2 = ranges.clone();
    let e = within(20, move || c2.gather_held(src, &r2).and_then(|g| g.wait())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    h.set_plan(FaultPlan::none());
    // All 8 lines of the cache are needed at once: only possible if the failed gather let go.
    let rows = cache.gather_held(src, &ranges).unwrap().wait().unwrap();
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert_eq!(rows.get(i), &data[o as usize..o as usize + l]);
    }
}

/// Several threads gather from one read-only source at once, some rows in place and some copied, in
/// a cache small enough that the copies keep evicting: every row of every batch is the file's while
/// it is held, and nothing hangs (a watchdog bounds the whole run).
#[test]
fn concurrent_held_and_copied_gathers_under_eviction() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let data = Arc::new(pattern(256 * 4096, 21));
    std::fs::write(&path, &*data).unwrap();
    let cache = PageCache::new(&engine, config(48, 4096)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let r = within(120, move || {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let (cache, data, barrier) = (cache.clone(), data.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(100 + t);
                    barrier.wait();
                    for round in 0..150 {
                        // Up to 6 distinct lines held per thread (24 of the 48 at most at once).
                        let ranges: Vec<(u64, usize)> = (0..10)
                            .map(|_| {
                                let line = rng.below(6) + (round * 7 + t * 61) % 250;
                                let len = rng.below(512) as usize + 1;
                                (line * 4096 + rng.below(4096 - len as u64), len)
                            })
                            .collect();
                        if (round + t) % 2 == 0 {
                            let rows = cache.gather_held(src, &ranges)?.wait()?;
                            // Let the other threads evict around the held lines before checking.
                            std::thread::yield_now();
                            for (i, &(o, l)) in ranges.iter().enumerate() {
                                assert_eq!(
                                    rows.get(i),
                                    &data[o as usize..o as usize + l],
                                    "thread {t} round {round} row {i}"
                                );
                            }
                        } else {
                            let r = cache.gather(src, &ranges)?.wait()?;
                            for (i, &(o, l)) in ranges.iter().enumerate() {
                                assert_eq!(r.get(i), &data[o as usize..o as usize + l]);
                            }
                        }
                    }
                    Ok::<_, gpuio::Error>(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no thread panicked"))
            .collect::<gpuio::Result<Vec<()>>>()
    });
    r.unwrap();
}

/// The fault matrix over in-place gathers, 6 seeds: benign faults (EINTR, EAGAIN, short reads,
/// delays) are hidden and the rows are the file's; hard errors are reported as `Io`; either way no
/// line stays held (all 16 of the cache's lines can be held at once afterwards).
#[test]
fn held_gathers_under_injected_faults() {
    let mut reported = 0;
    for seed in 0..6u64 {
        let (engine, h) =
            gpuio_testkit::faulty_engine(seed, FaultPlan::none(), BackendKind::Threads).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = pattern(64 * 4096, seed + 30);
        std::fs::write(&path, &data).unwrap();
        let cache = PageCache::new(&engine, config(16, 4096)).unwrap();
        let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
        let mut rng = Rng::new(seed);
        let ranges: Vec<(u64, usize)> = (0..12)
            .map(|k| {
                (
                    (k * 5 % 64) * 4096 + rng.below(2048),
                    rng.below(2048) as usize + 1,
                )
            })
            .collect();
        h.set_plan(match seed % 2 {
            0 => FaultPlan::benign(0.3),
            _ => FaultPlan::benign(0.3).with_read_eio(0.2),
        });
        let (c, rs) = (cache.clone(), ranges.clone());
        let r = within(30, move || {
            c.gather_held(src, &rs).and_then(|g| g.wait()).map(|rows| {
                (0..rows.len())
                    .map(|i| rows.get(i).to_vec())
                    .collect::<Vec<_>>()
            })
        });
        let counts = h.counts();
        assert!(
            counts.transients() + counts.shorts() > 0,
            "seed {seed}: no fault injected"
        );
        match (counts.hard_errors(), r) {
            (0, Ok(rows)) => {
                for (i, &(o, l)) in ranges.iter().enumerate() {
                    assert_eq!(
                        rows[i],
                        &data[o as usize..o as usize + l],
                        "seed {seed} row {i}"
                    );
                }
            }
            (0, Err(e)) => panic!("seed {seed}: benign faults only, yet {e}"),
            (n, Ok(_)) => panic!("seed {seed}: {n} failed reads went unreported"),
            (_, Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::Io, "seed {seed}: {e}");
                reported += 1;
            }
        }
        h.set_plan(FaultPlan::none());
        let all: Vec<(u64, usize)> = (0..16).map(|l| (l * 4096, 16)).collect();
        let c = cache.clone();
        let rows = within(30, move || {
            c.gather_held(src, &all).unwrap().wait().unwrap()
        });
        assert_eq!(rows.lines(), 16, "seed {seed}: a line stayed held");
    }
    assert!(
        reported > 0,
        "no seed injected a hard error: the error path was not tested"
    );
}
