//! The workloads as a library: a generated graph reads back as what was written, BFS gives the same
//! depths in all three modes (and the reference's), gathers read exactly the table's bytes, configs are
//! checked with the CLI's messages, and progress is reported through the callback.

use std::path::Path;

use gpuio_workloads::bfs::{self, BfsConfig, Mode};
use gpuio_workloads::gather::{self, Dist, GatherConfig, Indices};
use gpuio_workloads::graph::{self, GraphGenConfig, Kind};
use gpuio_workloads::{no_progress, Progress};

/// Plain BFS over the `.bel` files read with std.
fn reference_depths(prefix: &Path, source: usize) -> Vec<i32> {
    let bel = graph::read_bel(prefix).unwrap();
    let bytes = std::fs::read(&bel.dst_path).unwrap();
    let dst: Vec<u64> = bytes[16..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut depths = vec![-1i32; bel.n];
    depths[source] = 0;
    let mut frontier = vec![source];
    let mut d = 0;
    while !frontier.is_empty() {
        d += 1;
        let mut next = Vec::new();
        for u in frontier {
            for &v in &dst[bel.offsets[u] as usize..bel.offsets[u + 1] as usize] {
                if depths[v as usize] < 0 {
                    depths[v as usize] = d;
                    next.push(v as usize);
                }
            }
        }
        frontier = next;
    }
    depths
}

#[test]
fn generated_graph_bfs_modes_agree() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("g");
    let mut cfg = GraphGenConfig::new(10, &prefix);
    cfg.degree = 8;
    cfg.seed = 5;
    let mut phases = Vec::new();
    let g = graph::generate(&cfg, &mut |p| {
        if let Progress::Phase(m) = p {
            phases.push(m)
        }
    })
    .unwrap();
    assert_eq!(phases, ["generating edges", "building CSR", "writing"]);
    assert_eq!(g.kind, Kind::Kron);
    assert_eq!(g.vertices, 1024);
    assert_eq!(g.generated_edges, 8 * 1024);
    assert_eq!(
        g.edges,
        2 * (g.generated_edges - g.self_loops_dropped) - g.duplicates_dropped
    );
    let bel = graph::read_bel(&prefix).unwrap();
    assert_eq!(bel.n as u64, g.vertices);
    assert_eq!(bel.m, g.edges);
    assert_eq!(
        g.bytes,
        std::fs::metadata(&g.col).unwrap().len() + std::fs::metadata(&g.dst).unwrap().len()
    );

    // The same config gives the same bytes.
    let again = dir.path().join("h");
    let mut cfg2 = cfg.clone();
    cfg2.output = again.clone();
    graph::generate(&cfg2, &mut no_progress).unwrap();
    let (c2, d2) = graph::bel_paths(&again);
    assert_eq!(std::fs::read(&g.col).unwrap(), std::fs::read(c2).unwrap());
    assert_eq!(std::fs::read(&g.dst).unwrap(), std::fs::read(d2).unwrap());

    // Start from the vertex with the most edges.
    let source = (0..bel.n)
        .max_by_key(|&u| bel.offsets[u + 1] - bel.offsets[u])
        .unwrap();
    let want = reference_depths(&prefix, source);
    for mode in [Mode::Cache, Mode::Memory, Mode::Mmap] {
        let mut c = BfsConfig::new(&prefix, source as u64);
        c.mode = mode;
        c.line_size = 4096;
        let out = dir.path().join(format!("depths-{}", mode.name()));
        c.depths_out = Some(out.clone());
        let mut levels = 0;
        let r = bfs::bfs(&c, &mut |p| {
            if let Progress::Level { level, .. } = p {
                levels = level
            }
        })
        .unwrap();
        assert_eq!(r.depths, want, "{}", mode.name());
        assert_eq!(r.levels, levels);
        assert_eq!(
            r.vertices_reached,
            want.iter().filter(|&&d| d >= 0).count() as u64
        );
        assert_eq!(r.note, None);
        assert_eq!(r.cache.is_some(), mode == Mode::Cache);
        assert_eq!(r.load_seconds.is_some(), mode == Mode::Memory);
        let file: Vec<i32> = std::fs::read(&out)
            .unwrap()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(file, want);
    }

    // The kernel's search (`--mode gpu-cache`) on GPUIO_TEST_DEVICE=cuda:N finds the same depths;
    // on the host stand-in (the default here) it is refused, saying why.
    let mut c = BfsConfig::new(&prefix, source as u64);
    c.mode = Mode::GpuCache;
    c.line_size = 4096;
    c.device = std::env::var("GPUIO_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    match bfs::bfs(&c, &mut no_progress) {
        Ok(r) => {
            assert_eq!(r.depths, want, "gpu-cache on {}", c.device);
            assert_eq!(
                r.vertices_reached,
                want.iter().filter(|&&d| d >= 0).count() as u64
            );
        }
        Err(e) if c.device == "cpu" => {
            assert_eq!(e.kind(), gpuio::ErrorKind::Unsupported, "{e}");
            assert!(e.to_string().contains("cpu runs no kernels"), "{e}");
        }
        Err(e) => panic!("gpu-cache on {}: {e}", c.device),
    }
}

#[test]
fn configs_are_checked_with_the_cli_messages() {
    let dir = tempfile::tempdir().unwrap();
    let e = graph::generate(
        &GraphGenConfig::new(31, dir.path().join("g")),
        &mut no_progress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--scale 31 is out of range"), "{e}");
    let mut g = GraphGenConfig::new(4, dir.path().join("g"));
    g.degree = 0;
    assert!(g.validate().unwrap_err().to_string().contains("--degree 0"));

    let prefix = dir.path().join("g");
    let mut small = GraphGenConfig::new(4, &prefix);
    small.degree = 2;
    graph::generate(&small, &mut no_progress).unwrap();
    let mut b = BfsConfig::new(&prefix, 0);
    b.line_size = 1000;
    let e = bfs::bfs(&b, &mut no_progress).unwrap_err();
    assert!(e.to_string().contains("--line-size 1000"), "{e}");
    let e = bfs::bfs(&BfsConfig::new(&prefix, 99), &mut no_progress).unwrap_err();
    assert!(e.to_string().contains("--source 99 is out of range"), "{e}");
    // The depths file may not be one of the inputs.
    let mut b = BfsConfig::new(&prefix, 0);
    b.depths_out = Some(graph::bel_paths(&prefix).1);
    let e = bfs::bfs(&b, &mut no_progress).unwrap_err();
    assert!(
        e.to_string().contains("refusing to overwrite an input"),
        "{e}"
    );

    let table = dir.path().join("t");
    std::fs::write(&table, vec![1u8; 8192]).unwrap();
    let e = gather::gather(&GatherConfig::new(&table, 64, 0, 1), &mut no_progress).unwrap_err();
    assert!(e.to_string().contains("--batch 0 is out of range"), "{e}");
    let mut c = GatherConfig::new(&table, 64, 1, 1);
    c.compute_us = 2_000_000;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("--compute-us"));
    let e = gather::gather(
        &GatherConfig::new(dir.path().join("none"), 64, 1, 1),
        &mut no_progress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn gather_reads_the_tables_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table");
    let mut rng = gpuio_workloads::rng::Rng::new(11);
    let bytes: Vec<u8> = (0..(1 << 20)).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&table, &bytes).unwrap();
    for dist in [Dist::Uniform, Dist::Zipf(1.1)] {
        for row_bytes in [256u64, 1000] {
            let mut cfg = GatherConfig::new(&table, row_bytes, 32, 20);
            cfg.dist = dist;
            cfg.seed = 3;
            cfg.prefetch = true;
            let mut phases = Vec::new();
            let r = gather::gather(&cfg, &mut |p| {
                if let Progress::Phase(m) = p {
                    phases.push(m)
                }
            })
            .unwrap();
            assert_eq!(
                phases,
                [
                    "gathering with prefetch",
                    "gathering synchronously (reference)"
                ]
            );
            // The same rows read directly from the bytes.
            let rows = bytes.len() as u64 / row_bytes;
            assert_eq!(r.rows, rows);
            assert_eq!(r.rows_gathered, 32 * 20);
            let mut idx = Indices::new(dist, rows, cfg.seed);
            let mut sum = 0u64;
            for _ in 0..r.rows_gathered {
                let row = idx.next_row();
                assert!(row < rows);
                let at = (row * row_bytes) as usize;
                sum = gather::fold_row(sum, &bytes[at..at + row_bytes as usize]);
            }
            assert_eq!(r.main.checksum, sum);
            let sync = r.sync.as_ref().unwrap();
            assert_eq!(sync.checksum, sum);
            assert!(r.speedup.is_some());
            assert!(r.main.hits + r.main.misses + r.main.joined > 0);
        }
    }
}

/// Rows read in place (`PageCache::gather_held`) and rows copied out give the same checksum over
/// the same rows; the choice is reported, with the reason when rows are copied.
#[test]
fn gather_reads_rows_in_place_where_it_can_and_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table");
    let mut rng = gpuio_workloads::rng::Rng::new(12);
    let bytes: Vec<u8> = (0..(1 << 20)).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&table, &bytes).unwrap();
    let mut sums = Vec::new();
    for (row_bytes, batch, copy_rows, in_place) in [
        (256u64, 8usize, false, true),
        (256, 8, true, false),   // asked to copy
        (1000, 8, false, false), // rows cross lines
        (256, 32, false, false), // two batches' lines would take more than half the cache
    ] {
        let mut cfg = GatherConfig::new(&table, row_bytes, batch, 12);
        cfg.seed = 5;
        cfg.prefetch = true;
        cfg.copy_rows = copy_rows;
        let r = gather::gather(&cfg, &mut |_| {}).unwrap();
        assert_eq!(
            r.rows_in_place.is_ok(),
            in_place,
            "{row_bytes} {batch} {copy_rows}: {:?}",
            r.rows_in_place
        );
        let rows = bytes.len() as u64 / row_bytes;
        let mut idx = Indices::new(Dist::Uniform, rows, cfg.seed);
        let mut sum = 0u64;
        for _ in 0..r.rows_gathered {
            let at = (idx.next_row() * row_bytes) as usize;
            sum = gather::fold_row(sum, &bytes[at..at + row_bytes as usize]);
        }
        assert_eq!(r.main.checksum, sum, "{row_bytes} {batch} {copy_rows}");
        assert_eq!(r.sync.as_ref().unwrap().checksum, sum);
        sums.push(sum);
    }
    assert_eq!(
        sums[0], sums[1],
        "in place and copied: the same rows, the same bytes"
    );

    // On a GPU (GPUIO_TEST_DEVICE=cuda:N) the kernel's gather folds to the same checksum; on the host
    // stand-in (the default here) it is refused, saying why.
    let mut cfg = GatherConfig::new(&table, 256, 8, 12);
    cfg.seed = 5;
    cfg.prefetch = true;
    cfg.gpu = true;
    cfg.device = std::env::var("GPUIO_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    match gather::gather(&cfg, &mut |_| {}) {
        Ok(r) => {
            assert_eq!(r.main.checksum, sums[0], "gpu-cache on {}", cfg.device);
            assert_eq!(r.sync.as_ref().unwrap().checksum, sums[0]);
        }
        Err(e) if cfg.device == "cpu" => {
            assert_eq!(e.kind(), gpuio::ErrorKind::Unsupported, "{e}");
            assert!(e.to_string().contains("cpu runs no kernels"), "{e}");
        }
        Err(e) => panic!("gpu-cache on {}: {e}", cfg.device),
    }
}

#[test]
fn a_callback_can_stop_each_workload_and_steps_count_to_the_total() {
    use gpuio_workloads::Flow;
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("table");
    std::fs::write(&table, vec![7u8; 1 << 20]).unwrap();
    // Steps: 0..=total, never decreasing, over both runs with prefetch.
    let mut cfg = GatherConfig::new(&table, 512, 16, 30);
    cfg.prefetch = true;
    let mut steps = Vec::new();
    gather::gather(&cfg, &mut |p| {
        if let Progress::Step { done, total } = p {
            steps.push((done, total))
        }
    })
    .unwrap();
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "{steps:?}");
    assert_eq!(steps.first(), Some(&(0, 60)));
    assert_eq!(steps.last(), Some(&(60, 60)));
    // Stopped after the third batch: nothing more is reported, and the error says why.
    let mut seen = 0;
    let e = gather::gather_with(&cfg, &mut |p| match p {
        Progress::Step { done, .. } => {
            seen = done;
            if done >= 3 {
                Flow::Break(())
            } else {
                Flow::Continue(())
            }
        }
        _ => Flow::Continue(()),
    })
    .unwrap_err();
    assert_eq!(e.kind(), gpuio::ErrorKind::Cancelled, "{e}");
    assert_eq!(
        seen, 3,
        "the run stopped at the batch whose report said stop"
    );

    // Generation stopped before writing: no output files.
    let prefix = dir.path().join("g");
    let gcfg = GraphGenConfig::new(8, &prefix);
    let e = graph::generate_with(&gcfg, &mut |p| match p {
        Progress::Phase(m) if m == "writing" => Flow::Break(()),
        _ => Flow::Continue(()),
    })
    .unwrap_err();
    assert_eq!(e.kind(), gpuio::ErrorKind::Cancelled);
    let (col, dst) = graph::bel_paths(&prefix);
    assert!(!col.exists() && !dst.exists());
    let mut gsteps = Vec::new();
    graph::generate(&gcfg, &mut |p| {
        if let Progress::Step { done, total } = p {
            gsteps.push((done, total))
        }
    })
    .unwrap();
    assert_eq!(gsteps, [(0, 3), (1, 3), (2, 3), (3, 3)]);

    // BFS stopped after its first level: the depths file is not written, no temporary is left.
    let out = dir.path().join("depths");
    let mut b = BfsConfig::new(&prefix, 1);
    b.depths_out = Some(out.clone());
    let mut levels = 0;
    let e = bfs::bfs_with(&b, &mut |p| match p {
        Progress::Level { .. } => {
            levels += 1;
            Flow::Break(())
        }
        _ => Flow::Continue(()),
    })
    .unwrap_err();
    assert_eq!(e.kind(), gpuio::ErrorKind::Cancelled);
    assert_eq!(levels, 1);
    assert!(!out.exists());
    assert!(no_temps_left(dir.path()));
}

/// No crash-safe write temporaries (`.NAME.PID-RAND.tmp`) left in `dir`.
fn no_temps_left(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
}
