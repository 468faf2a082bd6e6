//! Quick measurements of the page cache: the hit path (resident lines looked up per second, one and
//! two threads) and the miss path (uniform 4 KiB gathers over a file 10x the cache: IOPS).
//!
//! ```sh
//! cargo run --release -p gpuio-cache --example cache_bench -- [FILE] [SIZE_MIB] [SECS]
//! ```
//! FILE defaults to `$TMPDIR/gpuio-cache-bench.bin` (made if missing or too small, 1024 MiB).
//! Compare with `fio --name=x --filename=FILE --rw=randread --bs=4k --iodepth=64
//! --ioengine=io_uring --direct=1 --runtime=5 --size=1G`.

use std::time::{Duration, Instant};

use gpuio::{Engine, EngineConfig, File};
use gpuio_cache::{Array, CacheConfig, PageCache};

fn main() -> gpuio::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().cloned().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("gpuio-cache-bench.bin")
            .display()
            .to_string()
    });
    let size_mib: u64 = args.get(1).map_or(1024, |s| s.parse().expect("SIZE_MIB"));
    let secs: f64 = args.get(2).map_or(5.0, |s| s.parse().expect("SECS"));
    let size = size_mib << 20;
    if std::fs::metadata(&path).map_or(true, |m| m.len() < size) {
        eprintln!("writing {size_mib} MiB to {path} ...");
        let mut x = 0x9e3779b97f4a7c15u64;
        let chunk: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut f = std::fs::File::create(&path).expect("create");
        for _ in 0..size_mib {
            std::io::Write::write_all(&mut f, &chunk).expect("write");
        }
        f.sync_all().expect("sync");
    }
    let engine = Engine::new(EngineConfig::default())?;
    let file = File::open(&path)?;
    println!(
        "backend {:?}, direct {} ({})",
        engine.backend_kind(),
        file.is_direct(),
        file.direct_reason()
    );

    // Hit path: 16 MiB resident, random Array<u64>::get.
    {
        let cache = PageCache::new(
            &engine,
            CacheConfig {
                capacity_bytes: 64 << 20,
                ..CacheConfig::default()
            },
        )?;
        let src = cache.attach_file(&file)?;
        let n = (16u64 << 20) / 8;
        let arr = Array::<u64>::from_offset(&cache, src, 0, n)?;
        cache.prefetch(src, 0, 16 << 20)?.wait()?;
        // The machine's ceiling for the same access pattern: the same random indices into a plain
        // 16 MiB array in memory (no pin, no table, no counters).
        {
            let plain: Vec<u64> = (0..n).collect();
            let dur = Duration::from_secs_f64(secs.min(2.0));
            let mut x = 0x1234_5678_9abc_def0u64 ^ 1;
            let (mut count, mut sink) = (0u64, 0u64);
            let t0 = Instant::now();
            while t0.elapsed() < dur {
                for _ in 0..4096 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    sink = sink.wrapping_add(plain[(x % n) as usize]);
                }
                count += 4096;
            }
            std::hint::black_box(sink);
            println!(
                "plain array, 1 thread: {:.1} M loads/s (the ceiling for the hit path below)",
                count as f64 / t0.elapsed().as_secs_f64() / 1e6
            );
        }
        for threads in [1usize, 2] {
            cache.reset_stats();
            let dur = Duration::from_secs_f64(secs.min(2.0));
            let t0 = Instant::now();
            let total: u64 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let arr = arr.clone();
                        s.spawn(move || {
                            let mut x = 0x1234_5678_9abc_def0u64 ^ (t as u64 + 1);
                            let mut count = 0u64;
                            let mut sink = 0u64;
                            let start = Instant::now();
                            while start.elapsed() < dur {
                                for _ in 0..4096 {
                                    x ^= x << 13;
                                    x ^= x >> 7;
                                    x ^= x << 17;
                                    sink = sink.wrapping_add(arr.get(x % n).unwrap());
                                }
                                count += 4096;
                            }
                            std::hint::black_box(sink);
                            count
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            let el = t0.elapsed().as_secs_f64();
            let st = cache.stats();
            println!(
                "hit path, {threads} thread(s): {:.1} M lookups/s total, {:.1} M/s per thread, hit rate {:.4}",
                total as f64 / el / 1e6,
                total as f64 / el / 1e6 / threads as f64,
                st.hit_rate()
            );
        }
    }

    // Miss path: uniform 4 KiB rows over the file, cache = file / 10.
    {
        let cache = PageCache::new(
            &engine,
            CacheConfig {
                capacity_bytes: size / 10,
                ..CacheConfig::default()
            },
        )?;
        let src = cache.attach_file(&file)?;
        let rows = size / 4096;
        let batch = 4096usize;
        let mut x = 0xdead_beef_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % rows
        };
        // Warm the cache so that it is full (misses then evict).
        for _ in 0..(rows / 10 / batch as u64 + 1) {
            let r: Vec<(u64, usize)> = (0..batch).map(|_| (next() * 4096, 4096)).collect();
            cache.gather(src, &r)?.wait()?;
        }
        cache.reset_stats();
        let t0 = Instant::now();
        let mut batches = 0u64;
        // Two gathers in flight: the next is issued while the previous completes.
        let mut prev: Option<gpuio_cache::Gather> = None;
        while t0.elapsed().as_secs_f64() < secs {
            let r: Vec<(u64, usize)> = (0..batch).map(|_| (next() * 4096, 4096)).collect();
            let g = cache.gather(src, &r)?;
            if let Some(p) = prev.replace(g) {
                p.wait()?;
            }
            batches += 1;
        }
        if let Some(p) = prev {
            p.wait()?;
        }
        let el = t0.elapsed().as_secs_f64();
        let st = cache.stats();
        println!(
            "miss path: {:.0} reads/s (IOPS), {:.0} rows/s, hit rate {:.3}, joined {}, batches {batches} of {batch}, {:.1} s",
            st.reads_issued as f64 / el,
            (batches * batch as u64) as f64 / el,
            st.hit_rate(),
            st.joined,
            el
        );
    }
    Ok(())
}
