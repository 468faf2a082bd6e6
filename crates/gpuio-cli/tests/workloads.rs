//! The page-cache workloads end to end: `graph gen` writes valid, deterministic `.bel` graphs; `bfs` gives
//! the same depths in every mode, equal to a reference BFS computed here from the files; bad `.bel` input
//! and bad workload arguments get one line and a non-zero exit, never a panic; `gather` reports what it
//! promises in JSON.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;

use common::{fails_with_error_line as fails_cleanly, gpuio, ok, ok_json, s};

/// A `.bel` file's header count and values.
fn read_bel_file(path: &Path) -> (u64, Vec<u64>) {
    let b = std::fs::read(path).unwrap();
    assert!(b.len() >= 16 && b.len() & 7 == 0, "{}", path.display());
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(word(1), 0, "reserved header word");
    let vals = (2..b.len() / 8).map(word).collect();
    (word(0), vals)
}

fn write_words(path: &Path, words: &[u64]) {
    let mut b = Vec::new();
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

/// Writes PREFIX.bel.col with header `col_count` and PREFIX.bel.dst with header `dst_count`.
fn write_graph(prefix: &Path, col_count: u64, col: &[u64], dst_count: u64, dst: &[u64]) {
    let mut c = vec![col_count, 0];
    c.extend_from_slice(col);
    write_words(&PathBuf::from(format!("{}.bel.col", prefix.display())), &c);
    let mut d = vec![dst_count, 0];
    d.extend_from_slice(dst);
    write_words(&PathBuf::from(format!("{}.bel.dst", prefix.display())), &d);
}

struct Graph {
    offsets: Vec<u64>,
    dst: Vec<u64>,
}

impl Graph {
    fn n(&self) -> usize {
        self.offsets.len() - 1
    }
    fn neighbours(&self, u: usize) -> &[u64] {
        &self.dst[self.offsets[u] as usize..self.offsets[u + 1] as usize]
    }
}

/// Reads a generated graph and checks everything `graph gen` promises about it.
fn load_and_check(prefix: &Path, n: usize) -> Graph {
    let (cc, offsets) = read_bel_file(&PathBuf::from(format!("{}.bel.col", prefix.display())));
    let (dc, dst) = read_bel_file(&PathBuf::from(format!("{}.bel.dst", prefix.display())));
    assert_eq!(cc as usize, n + 1, "n+1 offsets");
    assert_eq!(offsets.len(), n + 1);
    assert_eq!(dc as usize, dst.len());
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[n], dc);
    let g = Graph { offsets, dst };
    for u in 0..n {
        assert!(g.offsets[u] <= g.offsets[u + 1]);
        let l = g.neighbours(u);
        // Sorted, no repeats, no self-loops, every edge stored in both directions.
        assert!(l.windows(2).all(|w| w[0] < w[1]), "vertex {u}: {l:?}");
        for &v in l {
            assert!((v as usize) < n);
            assert_ne!(v as usize, u, "self-loop at {u}");
            assert!(
                g.neighbours(v as usize).binary_search(&(u as u64)).is_ok(),
                "edge {u}->{v} has no reverse"
            );
        }
    }
    g
}

fn reference_bfs(g: &Graph, source: usize) -> Vec<i32> {
    let mut d = vec![-1i32; g.n()];
    d[source] = 0;
    let mut q = VecDeque::from([source]);
    while let Some(u) = q.pop_front() {
        for &v in g.neighbours(u) {
            if d[v as usize] < 0 {
                d[v as usize] = d[u] + 1;
                q.push_back(v as usize);
            }
        }
    }
    d
}

fn read_depths(path: &Path) -> Vec<i32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn gen(dir: &Path, name: &str, kind: &str, scale: u32, degree: u32, seed: u64) -> (PathBuf, Value) {
    let prefix = dir.join(name);
    let v = ok_json(&[
        "graph",
        "gen",
        "--kind",
        kind,
        "--scale",
        &scale.to_string(),
        "--degree",
        &degree.to_string(),
        "--seed",
        &seed.to_string(),
        "-o",
        &s(&prefix),
        "--json",
    ]);
    (prefix, v)
}

fn bel_bytes(prefix: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(format!("{}.bel.col", prefix.display())).unwrap(),
        std::fs::read(format!("{}.bel.dst", prefix.display())).unwrap(),
    )
}

#[test]
fn graph_gen_writes_valid_deterministic_graphs() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, scale, degree) in [("kron", 10, 8), ("urand", 11, 4)] {
        let (a, v) = gen(dir.path(), &format!("{kind}-a"), kind, scale, degree, 1);
        let n = 1usize << scale;
        assert_eq!(v["vertices"], n as u64);
        assert_eq!(v["generated_edges"], (degree as u64) << scale);
        let g = load_and_check(&a, n);
        assert_eq!(v["edges"], g.dst.len() as u64);
        // Both directions of every generated tuple, minus self-loops and duplicates.
        assert_eq!(
            g.dst.len() as u64,
            2 * ((degree as u64) << scale)
                - 2 * v["self_loops_dropped"].as_u64().unwrap()
                - v["duplicates_dropped"].as_u64().unwrap()
        );
        assert!(g.dst.len() > n, "{kind}: too few edges: {}", g.dst.len());
        assert!(v["bytes"].as_u64().unwrap() > 0 && v["seconds"].as_f64().is_some());

        let (b, _) = gen(dir.path(), &format!("{kind}-b"), kind, scale, degree, 1);
        assert!(
            bel_bytes(&a) == bel_bytes(&b),
            "{kind}: same seed, same bytes"
        );
        let (c, _) = gen(dir.path(), &format!("{kind}-c"), kind, scale, degree, 2);
        assert!(
            bel_bytes(&a) != bel_bytes(&c),
            "{kind}: another seed differs"
        );
    }
    // Kronecker graphs are skewed, uniform ones are not.
    let kron = load_and_check(&dir.path().join("kron-a"), 1 << 10);
    let max_deg = (0..kron.n())
        .map(|u| kron.neighbours(u).len())
        .max()
        .unwrap();
    assert!(max_deg > 100, "kron max degree {max_deg}");

    // The text summary.
    let out = ok(&[
        "graph",
        "gen",
        "--scale",
        "8",
        "-o",
        &s(&dir.path().join("t.bel")),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("256 vertices"), "{text}");
    assert!(dir.path().join("t.bel.col").exists() && dir.path().join("t.bel.dst").exists());
}

#[test]
fn graph_gen_refuses_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let o = s(&dir.path().join("g"));
    fails_cleanly(
        &["graph", "gen", "--scale", "31", "-o", &o],
        &["--scale 31", "out of range"],
    );
    fails_cleanly(&["graph", "gen", "--scale", "0", "-o", &o], &["--scale 0"]);
    fails_cleanly(
        &["graph", "gen", "--scale", "4", "--degree", "0", "-o", &o],
        &["--degree 0"],
    );
    let missing = s(&dir.path().join("no/such/dir/g"));
    fails_cleanly(
        &["graph", "gen", "--scale", "4", "-o", &missing],
        &["does not exist"],
    );
}

fn bfs_json(prefix: &Path, source: usize, mode: &str, extra: &[&str], out: &Path) -> Value {
    let mut args = vec![
        "bfs".to_string(),
        s(prefix),
        "--source".into(),
        source.to_string(),
        "--mode".into(),
        mode.into(),
        "--depths-out".into(),
        s(out),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok_json(&args)
}

#[test]
fn bfs_modes_agree_with_reference() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, scale, degree) in [("kron", 12, 8), ("urand", 11, 4)] {
        let (prefix, _) = gen(dir.path(), kind, kind, scale, degree, 7);
        let g = load_and_check(&prefix, 1 << scale);
        // The vertex of highest degree: in the big component.
        let source = (0..g.n()).max_by_key(|&u| g.neighbours(u).len()).unwrap();
        let want = reference_bfs(&g, source);
        let reached = want.iter().filter(|&&d| d >= 0).count() as u64;
        let levels = *want.iter().max().unwrap() as u64 + 1;
        let scanned: u64 = (0..g.n())
            .filter(|&u| want[u] >= 0)
            .map(|u| g.neighbours(u).len() as u64)
            .sum();
        assert!(reached > 100, "{kind}: reached {reached}");

        let runs: [(&str, &[&str]); 7] = [
            ("memory", &[]),
            ("mmap", &[]),
            ("cache", &[]),
            // 4 KiB lines read one at a time, and in coalesced runs.
            ("cache", &["--line-size", "4K", "--coalesce", "0"]),
            ("cache", &["--line-size", "4K", "--coalesce", "64K"]),
            // A cache of a few lines: most reads miss, lines are evicted and reloaded.
            (
                "cache",
                &[
                    "--cache-size",
                    "16K",
                    "--line-size",
                    "512",
                    "--queue-depth",
                    "4",
                ],
            ),
            ("cache", &["--cache-size", "100%", "--queue-depth", "128"]),
        ];
        for (i, (mode, extra)) in runs.iter().enumerate() {
            let out = dir.path().join(format!("{kind}-{i}.depths"));
            let v = bfs_json(&prefix, source, mode, extra, &out);
            assert_eq!(read_depths(&out), want, "{kind} {mode} {extra:?}");
            assert_eq!(v["mode"], *mode);
            assert_eq!(v["vertices_reached"], reached);
            assert_eq!(v["levels"], levels);
            assert_eq!(v["edges_traversed"], scanned);
            for k in [
                "seconds",
                "teps",
                "edges_traversed",
                "vertices_reached",
                "levels",
                "hit_rate",
                "reads_issued",
                "iops",
                "mode",
            ] {
                assert!(v.get(k).is_some(), "{mode}: key {k} missing: {v}");
            }
            assert!(v["teps"].as_f64().unwrap() > 0.0);
            if *mode == "cache" {
                let hr = v["hit_rate"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&hr), "{hr}");
                assert!(v["reads_issued"].as_u64().unwrap() > 0);
                assert!(v["iops"].as_f64().unwrap() > 0.0);
            } else {
                assert!(v["hit_rate"].is_null());
            }
            if *mode == "memory" {
                assert!(v["load_seconds"].as_f64().is_some());
            }
        }
        // The first scan of a line misses; a cache of 16K over this edge file must also evict.
        let small = bfs_json(
            &prefix,
            source,
            "cache",
            &["--cache-size", "16K", "--line-size", "512"],
            &dir.path().join("x.depths"),
        );
        assert!(small["evictions"].as_u64().unwrap_or(1) > 0, "{small}");
    }
    // The text report.
    let out = ok(&[
        "bfs",
        &s(&dir.path().join("kron")),
        "--source",
        "0",
        "--mode",
        "cache",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TEPS") && text.contains("hit rate"), "{text}");
}

/// The path 0-1-2-3 as n+1 offsets, and the same graph with n offsets (the last one implied).
#[test]
fn bfs_accepts_n_or_n_plus_one_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let dst = [1, 0, 2, 1, 3, 2];
    let a = dir.path().join("a");
    write_graph(&a, 5, &[0, 1, 3, 5, 6], 6, &dst);
    let b = dir.path().join("b");
    write_graph(&b, 4, &[0, 1, 3, 5], 6, &dst);
    for (p, mode) in [(&a, "memory"), (&b, "memory"), (&b, "mmap"), (&b, "cache")] {
        let out = dir.path().join("d");
        let v = bfs_json(p, 0, mode, &[], &out);
        assert_eq!(read_depths(&out), vec![0, 1, 2, 3], "{p:?} {mode}");
        assert_eq!(v["vertices"], 4);
        assert_eq!(v["levels"], 4);
        assert_eq!(v["edges_traversed"], 6);
    }
    // An unreachable vertex is -1; the prefix may name the .bel or either file.
    let c = dir.path().join("c");
    write_graph(&c, 5, &[0, 1, 2, 2, 2], 2, &[1, 0]);
    let out = dir.path().join("d");
    bfs_json(
        &PathBuf::from(format!("{}.bel.col", c.display())),
        0,
        "cache",
        &[],
        &out,
    );
    assert_eq!(read_depths(&out), vec![0, 1, -1, -1]);
}

#[test]
fn bad_bel_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let dst = [1u64, 0, 2, 1, 3, 2];
    let modes = ["memory", "mmap", "cache"];
    let bfs = |prefix: &Path, source: &str, mode: &str, needles: &[&str]| {
        fails_cleanly(
            &["bfs", &s(prefix), "--source", source, "--mode", mode],
            needles,
        )
    };

    // .col header count disagrees with the file's size.
    write_graph(&p("colcount"), 10, &[0, 1, 3, 5, 6], 6, &dst);
    // .dst header count disagrees with the file's size.
    write_graph(&p("dstcount"), 5, &[0, 1, 3, 5, 6], 9, &dst);
    // Offsets that decrease.
    write_graph(&p("decrease"), 5, &[0, 3, 2, 5, 6], 6, &dst);
    // An offset past the edge file.
    write_graph(&p("past"), 5, &[0, 1, 3, 9, 6], 6, &dst);
    // A first offset that is not 0.
    write_graph(&p("first"), 5, &[1, 1, 3, 5, 6], 6, &dst);
    // A destination that is not a vertex, on edge 4 (reached from vertex 2).
    write_graph(&p("baddst"), 5, &[0, 1, 3, 5, 6], 6, &[1, 0, 2, 1, 7, 2]);
    // A .col too short for its header.
    std::fs::write(p("short.bel.col"), [0u8; 10]).unwrap();
    write_words(&p("short.bel.dst"), &[0, 0]);
    // A graph with no vertices.
    write_graph(&p("empty"), 0, &[], 0, &[]);
    for mode in modes {
        bfs(
            &p("colcount"),
            "0",
            mode,
            &["colcount.bel.col", "header count 10", "96 bytes", "56"],
        );
        bfs(
            &p("dstcount"),
            "0",
            mode,
            &["dstcount.bel.dst", "header count 9"],
        );
        bfs(
            &p("decrease"),
            "0",
            mode,
            &[
                "decrease.bel.col",
                "offset 2 is 2",
                "offset 1 (3)",
                "must not decrease",
            ],
        );
        bfs(
            &p("past"),
            "0",
            mode,
            &["past.bel.col", "offset 3 is 9", "past the 6 edges"],
        );
        bfs(&p("first"), "0", mode, &["first.bel.col", "offset 0 is 1"]);
        bfs(
            &p("baddst"),
            "0",
            mode,
            &["baddst.bel.dst", "edge 4 has destination 7", "4 vertices"],
        );
        bfs(&p("short"), "0", mode, &["short.bel.col", "shorter than"]);
        bfs(&p("empty"), "0", mode, &["empty.bel.col", "no vertices"]);
        bfs(&p("missing"), "0", mode, &["missing.bel.dst", "not found"]);
        // A source that is not a vertex.
        write_graph(&p("ok"), 5, &[0, 1, 3, 5, 6], 6, &dst);
        bfs(
            &p("ok"),
            "4",
            mode,
            &["--source 4", "out of range", "4 vertices"],
        );
    }
    // A cache smaller than one line.
    fails_cleanly(
        &["bfs", &s(&p("ok")), "--source", "0", "--cache-size", "100"],
        &["--cache-size 100", "smaller than one cache line"],
    );
    fails_cleanly(
        &["bfs", &s(&p("ok")), "--source", "0", "--cache-size", "1%"],
        &["smaller than one cache line"],
    );
}

/// A table of `len` deterministic bytes.
fn table(dir: &Path, len: usize) -> PathBuf {
    let mut b = Vec::with_capacity(len);
    let mut x = 0x1234_5678_9ABC_DEF1u64;
    while b.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.truncate(len);
    let p = dir.join("table.bin");
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn gather_reports_rows_iops_hit_rate_and_speedup() {
    let dir = tempfile::tempdir().unwrap();
    let t = s(&table(dir.path(), 8 << 20));
    for (dist, prefetch, row) in [
        ("uniform", "off", "4K"),
        ("uniform", "on", "4K"),
        ("zipf:1.1", "off", "4K"),
        ("zipf:1.1", "on", "4K"),
        ("zipf:0.8", "on", "100"),
    ] {
        let v = ok_json(&[
            "gather",
            "--table",
            &t,
            "--row-bytes",
            row,
            "--batch",
            "64",
            "--batches",
            "20",
            "--dist",
            dist,
            "--cache-size",
            "2M",
            "--queue-depth",
            "32",
            "--prefetch",
            prefetch,
            "--compute-us",
            "50",
            "--seed",
            "3",
            "--json",
        ]);
        let what = format!("{dist} prefetch {prefetch} row {row}: {v}");
        for k in [
            "rows_per_sec",
            "iops",
            "hit_rate",
            "seconds",
            "reads_issued",
        ] {
            assert!(v.get(k).is_some(), "key {k} missing: {what}");
        }
        assert!(v["rows_per_sec"].as_f64().unwrap() > 0.0, "{what}");
        assert!(v["reads_issued"].as_u64().unwrap() > 0, "{what}");
        let hr = v["hit_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&hr), "{what}");
        if dist == "zipf:1.1" {
            assert!(hr > 0.1, "hot rows hit: {what}");
        }
        if prefetch == "on" {
            assert!(v["speedup"].as_f64().unwrap() > 0.0, "{what}");
            assert!(v["sync"]["rows_per_sec"].as_f64().is_some(), "{what}");
        } else {
            assert!(v.get("speedup").is_none(), "{what}");
        }
    }
    // Same seed, same rows: the same bytes read (the checksum), whatever the prefetch setting.
    let sum = |prefetch: &str| {
        ok_json(&[
            "gather",
            "--table",
            &t,
            "--row-bytes",
            "4K",
            "--batch",
            "32",
            "--batches",
            "5",
            "--dist",
            "zipf:1.2",
            "--prefetch",
            prefetch,
            "--json",
        ])["checksum"]
            .clone()
    };
    assert_eq!(sum("on"), sum("off"));
    // The text report.
    let out = ok(&[
        "gather",
        "--table",
        &t,
        "--row-bytes",
        "4K",
        "--batch",
        "16",
        "--batches",
        "4",
        "--prefetch",
        "on",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("speedup") && text.contains("IOPS"), "{text}");
}

#[test]
fn gather_bad_arguments_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let t = s(&table(dir.path(), 1 << 20));
    let missing = s(&dir.path().join("nope.bin"));
    let base = |table: &str, row: &str, batch: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "gather",
            "--table",
            table,
            "--row-bytes",
            row,
            "--batch",
            batch,
            "--batches",
            "2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let check = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_cleanly(&a, needles);
    };
    check(
        base(&missing, "4K", "8", &[]),
        &["nope.bin", "does not exist", "gpuio bench"],
    );
    check(base(&t, "0", "8", &[]), &["--row-bytes"]);
    check(base(&t, "4K", "0", &[]), &["--batch 0"]);
    check(base(&t, "2M", "8", &[]), &["smaller than one row"]);
    check(
        base(&t, "4K", "8", &["--cache-size", "100"]),
        &["--cache-size 100", "smaller than one cache line"],
    );
    check(
        base(&t, "4K", "64", &["--cache-size", "64K"]),
        &["raise --cache-size"],
    );
    check(
        base(&t, "4K", "8", &["--queue-depth", "0"]),
        &["--queue-depth 0"],
    );
    let d = s(dir.path());
    check(base(&d, "4K", "8", &[]), &["is a directory"]);
    // A line size the cache does not support.
    let out = gpuio(
        &base(&t, "4K", "8", &["--line-size", "1000"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
}

// ---------------------------------------------------------------------------------------------------
// Issue 13: numeric flags checked before use, outputs that never overwrite inputs, a source without
// edges said so, and edge files cut while a BFS reads them.

#[test]
fn bfs_and_gather_check_their_numeric_flags_before_using_them() {
    let dir = tempfile::tempdir().unwrap();
    let (prefix, _) = gen(dir.path(), "g", "kron", 8, 4, 1);
    let g = s(&prefix);
    let t = s(&table(dir.path(), 1 << 20));
    for mode in ["memory", "mmap", "cache"] {
        let bfs = |extra: &[&str], needles: &[&str]| {
            let mut a = vec!["bfs", &g, "--source", "1", "--mode", mode];
            a.extend_from_slice(extra);
            fails_cleanly(&a, needles);
        };
        // Before: 0 divided by zero; 1T spoke of the cache size; both now name the flag and bounds.
        for v in ["0", "1000", "1T", "128K", "18446744073709551615"] {
            bfs(&["--line-size", v], &["--line-size", "512..=65536"]);
        }
        bfs(&["--queue-depth", "0"], &["--queue-depth 0", "1..="]);
        bfs(&["--queue-depth", "5000"], &["--queue-depth 5000", "1..="]);
        bfs(&["--coalesce", "1G"], &["--coalesce", "0..="]);
    }
    // The required flags with sound values, each unless `extra` gives it.
    let gather = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["gather", "--table", &t];
        for (flag, value) in [("--row-bytes", "4K"), ("--batch", "8"), ("--batches", "2")] {
            if !extra.contains(&flag) {
                a.extend_from_slice(&[flag, value]);
            }
        }
        a.extend_from_slice(extra);
        fails_cleanly(&a, needles);
    };
    for v in ["0", "1000", "1T", "128K"] {
        gather(&["--line-size", v], &["--line-size", "512..=65536"]);
    }
    // Before: busy-waited for ever.
    for v in ["18446744073709551615", "1000001"] {
        gather(&["--compute-us", v], &["--compute-us", "0..=1000000"]);
    }
    gather(&["--batches", "0"], &["--batches 0", "1..="]);
    gather(
        &["--batches", "100000000"],
        &["--batches 100000000", "1..="],
    );
    gather(&["--coalesce", "8M"], &["--coalesce", "0..="]);
    gather(&["--queue-depth", "99999"], &["--queue-depth 99999"]);
    // A huge row and batch no longer overflow the line arithmetic.
    gather(
        &["--row-bytes", "9223372036854775807", "--batch", "1048576"],
        &[],
    );
    // The flags are checked before the table is looked at.
    let missing = s(&dir.path().join("nope.bin"));
    fails_cleanly(
        &[
            "gather",
            "--table",
            &missing,
            "--row-bytes",
            "4K",
            "--batch",
            "8",
            "--batches",
            "2",
            "--line-size",
            "0",
        ],
        &["--line-size 0"],
    );
}

#[test]
fn bfs_never_writes_over_its_own_input_and_replaces_its_output_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (prefix, _) = gen(dir.path(), "g", "kron", 9, 4, 3);
    let g = s(&prefix);
    let before = bel_bytes(&prefix);
    let col = dir.path().join("g.bel.col");
    let dst = dir.path().join("g.bel.dst");
    let hard = dir.path().join("hard-link");
    std::fs::hard_link(&dst, &hard).unwrap();
    let soft = dir.path().join("soft-link");
    std::os::unix::fs::symlink(&col, &soft).unwrap();
    for (out, input) in [
        (&dst, "g.bel.dst"),
        (&col, "g.bel.col"),
        (&hard, "g.bel.dst"),
        (&soft, "g.bel.col"),
    ] {
        for mode in ["memory", "mmap", "cache"] {
            fails_cleanly(
                &[
                    "bfs",
                    &g,
                    "--source",
                    "1",
                    "--mode",
                    mode,
                    "--depths-out",
                    &s(out),
                ],
                &["--depths-out", input, "refusing to overwrite an input"],
            );
        }
    }
    assert!(bel_bytes(&prefix) == before, "the graph is untouched");
    // A relative spelling of the same file is refused too.
    let out = common::gpuio_in(dir.path(), &["--version"]);
    assert!(out.status.success());
    let rel = std::process::Command::new(env!("CARGO_BIN_EXE_gpuio"))
        .current_dir(dir.path())
        .args(["bfs", "g", "--source", "1", "--depths-out", "./g.bel.dst"])
        .output()
        .unwrap();
    assert!(!rel.status.success());
    assert!(bel_bytes(&prefix) == before, "the graph is untouched");

    // An existing output is replaced whole (a new file renamed over it), no temporary file is left,
    // and an output in a missing directory fails before the search runs.
    let depths = dir.path().join("depths.bin");
    std::fs::write(&depths, vec![0xAAu8; 1 << 20]).unwrap();
    let v = bfs_json(&prefix, 1, "memory", &[], &depths);
    let got = read_depths(&depths);
    assert_eq!(got.len() as u64, v["vertices"].as_u64().unwrap());
    assert!(gpuio_testkit::temp_files(dir.path()).is_empty());
    fails_cleanly(
        &[
            "bfs",
            &g,
            "--source",
            "1",
            "--depths-out",
            &s(&dir.path().join("no-such-dir/depths.bin")),
        ],
        &["no-such-dir"],
    );
}

#[test]
fn bfs_says_when_the_source_vertex_has_no_edges() {
    let dir = tempfile::tempdir().unwrap();
    // The path 0-1-2 and vertex 3 alone: 4 vertices, offsets 0,1,3,4,4.
    let prefix = dir.path().join("lonely");
    write_graph(&prefix, 5, &[0, 1, 3, 4, 4], 4, &[1, 0, 2, 1]);
    let p = s(&prefix);
    for mode in ["memory", "mmap", "cache"] {
        let out = ok(&["bfs", &p, "--source", "3", "--mode", mode]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("note: source vertex 3 has no edges")
                && text.contains("reaches only the source")
                && text.contains("--source 1"),
            "{mode}: {text}"
        );
        let v = ok_json(&["bfs", &p, "--source", "3", "--mode", mode, "--json"]);
        assert_eq!(v["vertices_reached"], 1, "{v}");
        assert_eq!(v["source_degree"], 0, "{v}");
        assert!(
            v["note"].as_str().is_some_and(|n| n.contains("no edges")),
            "{v}"
        );
        // A source with edges has no note.
        let v = ok_json(&["bfs", &p, "--source", "0", "--mode", mode, "--json"]);
        assert!(v["note"].is_null(), "{v}");
        let out = ok(&["bfs", &p, "--source", "0", "--mode", mode]);
        assert!(!String::from_utf8_lossy(&out.stdout).contains("note:"));
    }
}

#[test]
fn bfs_with_its_edge_file_cut_mid_run_fails_with_one_line() {
    // Another process truncates the edge file while the search runs: every mode must end with success
    // (the cut came too late) or one line naming the file — never a signal (mmap: SIGBUS) or a panic.
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (prefix, _) = gen(dir.path(), "big", "kron", 15, 16, 5);
    let dst = dir.path().join("big.bel.dst");
    let whole = std::fs::read(&dst).unwrap();
    let g = s(&prefix);
    let mut failures = 0;
    for mode in ["memory", "mmap", "cache"] {
        for delay_ms in [0u64, 2, 10, 30, 100] {
            std::fs::write(&dst, &whole).unwrap();
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gpuio"))
                .args(["bfs", &g, "--source", "1", "--mode", mode])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(delay_ms));
            std::fs::OpenOptions::new()
                .write(true)
                .open(&dst)
                .unwrap()
                .set_len(whole.len() as u64 / 3)
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{mode}, cut after {delay_ms} ms: still running after 60 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(
                status.signal().is_none(),
                "{mode}, cut after {delay_ms} ms: killed by signal {:?}; stderr: {err}",
                status.signal()
            );
            if !status.success() {
                failures += 1;
                assert_eq!(status.code(), Some(1), "{mode}: {err}");
                assert!(
                    err.starts_with("gpuio: error:")
                        && err.trim_end().lines().count() == 1
                        && err.contains("big.bel.dst")
                        && !err.contains("panicked"),
                    "{mode}, cut after {delay_ms} ms: {err}"
                );
                if mode != "cache" && err.contains("shrank") || err.contains("ended early") {
                    assert!(err.contains("at offset"), "{mode}: {err}");
                }
            }
        }
    }
    assert!(failures > 0, "no run saw the cut: the test proves nothing");
}
