//! Gathers whose misses are spread over the cache's issue helpers (`CacheConfig::issue_threads`):
//! the bytes against the file on every backend, on a disk file and a memory-backed one; when the
//! cache spreads by itself; injected faults; several gathers at once joining each other's loads.

use std::path::Path;
use std::sync::Arc;

use gpuio::backend::BackendKind;
use gpuio::{ErrorKind, File};
use gpuio_cache::{CacheConfig, LineState, PageCache, ISSUE_CHUNK_LINES};
use gpuio_testkit::{within, FaultPlan, Rng};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

fn config(lines: u64, issue_threads: usize) -> CacheConfig {
    CacheConfig {
        line_bytes: 4096,
        capacity_bytes: lines * 4096,
        queue_depth: 64,
        issue_threads,
        ..CacheConfig::default()
    }
}

/// `n` ranges of 1..=`max_len` bytes at random offsets of a `size`-byte file (some crossing lines).
fn random_ranges(rng: &mut Rng, size: usize, n: usize, max_len: usize) -> Vec<(u64, usize)> {
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(max_len as u64) as usize;
            let off = rng.below((size - len) as u64);
            (off, len)
        })
        .collect()
}

fn shm_dir() -> Option<tempfile::TempDir> {
    gpuio_testkit::memory_backed_dir()
}

fn check(label: &str, data: &[u8], ranges: &[(u64, usize)], r: &gpuio_cache::GatherResult) {
    for (i, &(o, l)) in ranges.iter().enumerate() {
        assert_eq!(
            r.get(i),
            &data[o as usize..o as usize + l],
            "{label}: range {i} at {o}+{l}"
        );
    }
}

fn gathers_match(label: &str, engine: &gpuio::Engine, dir: &Path, seed: u64) {
    // 8 MiB: 2048 lines over a 256-line cache, so gathers also wait for lines they freed.
    let size = 8 << 20;
    let path = dir.join(format!("table-{seed}"));
    let data = pattern(size, seed);
    std::fs::write(&path, &data).unwrap();
    let cache = PageCache::new(engine, config(256, 4)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let mut rng = Rng::new(seed);
    for round in 0..6 {
        // Enough distinct lines for several chunks; some ranges cross a line boundary.
        let ranges = random_ranges(&mut rng, size, 40 * ISSUE_CHUNK_LINES / 8, 6000);
        let c = cache.clone();
        let rs = ranges.clone();
        let r = within(30, move || c.gather(src, &rs).unwrap().wait().unwrap());
        check(&format!("{label} round {round}"), &data, &ranges, &r);
    }
    // Every line the gathers left is whole: read it back as it is now, hit or miss.
    for line in 0..(size / 4096) as u64 {
        if cache.resident_state(src, line * 4096) == Some(LineState::Ready) {
            let mut out = vec![0u8; 4096];
            cache.read(src, line * 4096, &mut out).unwrap();
            assert_eq!(
                out,
                &data[line as usize * 4096..][..4096],
                "{label} line {line}"
            );
        }
    }
}

#[test]
fn spread_gathers_match_the_file_on_every_backend() {
    let disk = tempfile::tempdir().unwrap();
    let shm = shm_dir();
    if shm.is_none() {
        eprintln!("no writable memory-backed /dev/shm here: only the disk file is gathered from");
    }
    for (label, engine) in gpuio_testkit::engines() {
        gathers_match(&format!("{label} disk"), &engine, disk.path(), 1);
        if let Some(d) = &shm {
            gathers_match(&format!("{label} shm"), &engine, d.path(), 2);
        }
    }
}

#[test]
fn the_cache_spreads_memory_backed_misses_by_itself_and_nothing_else() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Some(shm) = shm_dir() else {
        eprintln!("skipped: no writable memory-backed /dev/shm, where the cache spreads by itself");
        return;
    };
    if cores < 2 {
        eprintln!("skipped: one core, so the cache's choice is the calling thread alone");
        return;
    }
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let size = 16 << 20;
    let data = pattern(size, 3);
    let mut rng = Rng::new(3);
    let ranges: Vec<Vec<(u64, usize)>> = (0..20)
        .map(|_| random_ranges(&mut rng, size, 16 * ISSUE_CHUNK_LINES, 4096))
        .collect();
    let mut helper_chunks = Vec::new();
    let disk = tempfile::tempdir().unwrap();
    for dir in [shm.path(), disk.path()] {
        let path = dir.join("table");
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        let cache = PageCache::new(&engine, config(512, 0)).unwrap();
        let src = cache.attach_file(&f).unwrap();
        // Whether a helper takes a chunk is a race with the calling thread, which issues whatever
        // is left: on a busy machine (CI's two cores shared with builds) a round of 20 gathers can
        // go by with no helper scheduled in time. Go on, bounded, until one has.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        for round in 0.. {
            for rs in &ranges {
                let r = cache.gather(src, rs).unwrap().wait().unwrap();
                check(&format!("{}", dir.display()), &data, rs, &r);
            }
            let done = !f.is_memory_backed()
                || cache.stats().helper_chunks > 0
                || std::time::Instant::now() > deadline;
            if done || round >= 200 {
                break;
            }
        }
        helper_chunks.push((f.is_memory_backed(), cache.stats().helper_chunks));
    }
    // /dev/shm: misses are copies on the issuing thread, so helpers take chunks (each gather of 16
    // chunks is a few hundred µs of copying per chunk; a helper wakes in microseconds).
    assert!(
        helper_chunks[0].0 && helper_chunks[0].1 > 0,
        "{helper_chunks:?}"
    );
    // A disk file (unless the temporary directory is itself memory-backed): the calling thread alone.
    if !helper_chunks[1].0 {
        assert_eq!(helper_chunks[1].1, 0, "{helper_chunks:?}");
    }
}

#[test]
fn a_spread_gather_reports_injected_faults_and_leaves_no_line_busy() {
    let mut reported = 0;
    for seed in 0..6u64 {
        let (engine, h) =
            gpuio_testkit::faulty_engine(seed, FaultPlan::none(), BackendKind::Threads).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table");
        let size = 4 << 20;
        let data = pattern(size, seed);
        std::fs::write(&path, &data).unwrap();
        let cache = PageCache::new(&engine, config(256, 4)).unwrap();
        let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
        let mut rng = Rng::new(seed + 100);
        let ranges = random_ranges(&mut rng, size, 8 * ISSUE_CHUNK_LINES, 4096);
        // Even seeds: benign faults only (EINTR, EAGAIN, short reads, delays), which the engine
        // hides. Odd seeds: hard errors on some reads as well, which the gather must report.
        let plan = match seed % 2 {
            0 => FaultPlan::benign(0.2),
            _ => FaultPlan::benign(0.2).with_read_eio(0.05),
        };
        h.set_plan(plan);
        let c = cache.clone();
        let rs = ranges.clone();
        let r = within(30, move || c.gather(src, &rs).and_then(|g| g.wait()));
        let counts = h.counts();
        assert!(
            counts.transients() + counts.shorts() > 0,
            "seed {seed}: no fault injected"
        );
        match (counts.hard_errors(), r) {
            (0, Ok(r)) => check(&format!("seed {seed}"), &data, &ranges, &r),
            (0, Err(e)) => panic!("seed {seed}: benign faults only, yet {e}"),
            (n, Ok(_)) => panic!("seed {seed}: {n} failed reads went unreported"),
            (_, Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::Io, "seed {seed}: {e}");
                reported += 1;
            }
        }
        assert!(seed % 2 == 1 || counts.hard_errors() == 0);
        // No line is left Busy or wrong: without faults, the same gather returns the file's bytes.
        h.set_plan(FaultPlan::none());
        let c = cache.clone();
        let rs = ranges.clone();
        let r = within(30, move || c.gather(src, &rs).unwrap().wait().unwrap());
        check(&format!("seed {seed}, after"), &data, &ranges, &r);
    }
    assert!(
        reported > 0,
        "no seed injected a hard error: the error path was not tested"
    );
}

#[test]
fn concurrent_spread_gathers_join_each_others_loads() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dir = shm_dir().unwrap_or_else(|| tempfile::tempdir().unwrap());
    let path = dir.path().join("table");
    let size = 4 << 20;
    let data = Arc::new(pattern(size, 9));
    std::fs::write(&path, &*data).unwrap();
    let cache = PageCache::new(&engine, config(1024, 3)).unwrap();
    let src = cache.attach_file(&File::open(&path).unwrap()).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (cache, data) = (cache.clone(), data.clone());
            std::thread::spawn(move || {
                // The same ranges in every thread, in a different order: their misses overlap.
                let mut rng = Rng::new(9);
                let mut ranges = random_ranges(&mut rng, size, 6 * ISSUE_CHUNK_LINES, 4096);
                ranges.rotate_left(t as usize * 97);
                for _ in 0..4 {
                    let r = cache.gather(src, &ranges).unwrap().wait().unwrap();
                    check(&format!("thread {t}"), &data, &ranges, &r);
                }
            })
        })
        .collect();
    within(60, move || {
        for t in threads {
            t.join().unwrap();
        }
    });
    let st = cache.stats();
    assert!(st.joined + st.hits > 0, "{st:?}");
}
