//! Crash consistency of `gpuio cp`, `unpack`, `graph gen`, `bfs --depths-out` and `load --save-to`
//! (STYLE item 12; issue 13).
//!
//! `cp`: a copy killed with SIGKILL at a random moment, many
//! times over — the destination absent before half of the runs and holding an older version before
//! the others — must leave the destination absent or the old version (killed before the rename) or an
//! exact copy (after it): never a torn or mixed file.
//!
//! A killed copy cannot remove its temporary file (`.NAME.PID-RAND.tmp` beside the destination); the
//! next `gpuio cp` to that destination removes those of processes that no longer exist, which the test
//! checks at the end. (What a power loss would do is not tested here: that needs a machine to cut; the
//! fsyncs before and after the rename are what guard it.)
//!
//! `unpack` and `graph gen` are killed the same way at random moments over a whole run: each output
//! file is afterwards its old version or its complete new one, and the next run leaves no temporary
//! file. (`graph gen` writes two files, each replaced whole; the pair is not one atomic step, see
//! `write_bel` in `src/graph.rs`, so each file is checked on its own.)
//!
//! `bfs --depths-out` and `load --save-to` (on the host stand-in, `--device cpu`) are killed the same
//! way: the depths file or the saved model is its old version or its complete new one, and the next
//! run removes the temporaries of the killed ones.
//!
//! Reproduce a run with `GPUIO_CRASH_SEED=<seed>` (printed); `GPUIO_CRASH_RUNS=<n>` runs more kills.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpuio_testkit::temp_files;

const NEW_BYTES: usize = 24 << 20;
const OLD_BYTES: usize = 9 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn cp(src: &Path, dst: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gpuio"));
    // Small slots: many steps at which to be killed.
    c.args(["cp", "--chunk-size", "512K"])
        .arg(src)
        .arg(dst)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

#[derive(Debug, Default)]
struct Outcomes {
    absent: u32,
    old: u32,
    new: u32,
}

#[test]
fn a_copy_killed_at_any_moment_leaves_the_old_file_or_the_new_one() {
    let (seed, runs) = seed_and_runs(40);

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    let new = pattern(NEW_BYTES, 1);
    let old = pattern(OLD_BYTES, 2);
    std::fs::write(&src, &new).unwrap();

    // How long a whole copy takes here, so that the kills spread over all of it (start-up included)
    // and a little past its end.
    let t = Instant::now();
    let st = cp(&src, &dst).status().unwrap();
    assert!(st.success());
    let full = t.elapsed();
    assert!(std::fs::read(&dst).unwrap() == new);
    eprintln!("a whole copy takes {full:?}");

    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seen = Outcomes::default();
    let started = Instant::now();
    // Random moments over the whole copy; then, on a machine loaded enough that no copy finished (or
    // none was killed before its rename) at those moments, later (earlier) ones until each side was
    // seen — a bounded number of them.
    let mut extra = 0u32;
    for run in 0.. {
        let delay = if run < runs {
            full.mul_f64((next() % 1200) as f64 / 1000.0)
        } else if seen.new == 0 && extra < 20 {
            extra += 1;
            full.mul_f64(3.0 * f64::from(extra))
        } else if seen.absent + seen.old == 0 && extra < 20 {
            extra += 1;
            Duration::ZERO
        } else {
            break;
        };
        let had_old = run % 2 == 1;
        if had_old {
            std::fs::write(&dst, &old).unwrap();
        } else {
            let _ = std::fs::remove_file(&dst);
        }
        let mut child = cp(&src, &dst).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL (it may have finished already)
        let status = child.wait().unwrap();
        let what = format!("run {run} (seed {seed}): killed after {delay:?} ({status})");
        match std::fs::read(&dst) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(!had_old, "{what}: the old version disappeared");
                seen.absent += 1;
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(got) if got == new => seen.new += 1,
            Ok(got) if got == old && had_old => seen.old += 1,
            Ok(got) => panic!(
                "{what}: torn destination: {} bytes, neither the old version ({}) nor the new ({})",
                got.len(),
                if had_old { OLD_BYTES } else { 0 },
                NEW_BYTES
            ),
        }
    }
    eprintln!(
        "{runs} kills in {:?}: {seen:?}; temporary files left by them: {}",
        started.elapsed(),
        temp_files(dir.path()).len()
    );
    // The test proves something only if kills landed both before and after the rename.
    assert!(
        seen.absent + seen.old > 0,
        "no kill landed before the rename: {seen:?}"
    );
    assert!(seen.new > 0, "no copy finished: {seen:?}");

    // The next copy removes what killed ones left behind, and completes.
    let st = cp(&src, &dst).status().unwrap();
    assert!(st.success());
    assert!(std::fs::read(&dst).unwrap() == new);
    assert!(
        temp_files(dir.path()).is_empty(),
        "stale temporary files kept: {:?}",
        temp_files(dir.path())
    );
    assert!(started.elapsed() < Duration::from_secs(120));
}

fn seed_and_runs(default_runs: u32) -> (u64, u32) {
    let seed: u64 = std::env::var("GPUIO_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let runs: u32 = std::env::var("GPUIO_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_runs);
    eprintln!("GPUIO_CRASH_SEED={seed} GPUIO_CRASH_RUNS={runs}");
    (seed, runs)
}

/// Kills `make()` after random delays over 0..1.2 times a whole run, `runs` times; before each run
/// `reset()` puts the old version in place, after it `check(run, what)` judges the outputs. Then a
/// last, unkilled run must complete and leave no temporary file in `dir`.
fn kill_at_random_moments(
    seed: u64,
    runs: u32,
    dir: &Path,
    make: &dyn Fn() -> Command,
    reset: &dyn Fn(u32),
    check: &mut dyn FnMut(u32, &str),
) {
    reset(0);
    let t = Instant::now();
    assert!(make().status().unwrap().success());
    let full = t.elapsed();
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for run in 0..runs {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        reset(run);
        let delay = full.mul_f64((rng % 1200) as f64 / 1000.0);
        let mut child = make().spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().unwrap();
        check(
            run,
            &format!("run {run} (seed {seed}): killed after {delay:?} of {full:?} ({status})"),
        );
    }
    assert!(make().status().unwrap().success());
    assert!(
        temp_files(dir).is_empty(),
        "stale temporary files kept: {:?}",
        temp_files(dir)
    );
}

#[test]
fn an_unpack_killed_at_any_moment_leaves_the_old_file_or_the_new_one() {
    let (seed, runs) = seed_and_runs(16);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("w.bin");
    let new = pattern(NEW_BYTES, 3);
    std::fs::write(&src, &new).unwrap();
    let pack = dir.path().join("m.gpk");
    let st = Command::new(env!("CARGO_BIN_EXE_gpuio"))
        .args(["pack", "--codec", "none"])
        .arg(&src)
        .arg("-o")
        .arg(&pack)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.path().join("out.bin");
    let old = pattern(OLD_BYTES, 4);
    let make = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpuio"));
        c.arg("unpack")
            .arg(&pack)
            .args(["--entry", "w.bin", "-o"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let reset = |run: u32| {
        if run % 2 == 1 {
            std::fs::write(&out, &old).unwrap();
        } else {
            let _ = std::fs::remove_file(&out);
        }
    };
    let mut seen = Outcomes::default();
    kill_at_random_moments(seed, runs, dir.path(), &make, &reset, &mut |run, what| {
        match std::fs::read(&out) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(run % 2 == 0, "{what}: the old version disappeared");
                seen.absent += 1;
            }
            Err(e) => panic!("{what}: {e}"),
            Ok(got) if got == new => seen.new += 1,
            Ok(got) if got == old && run % 2 == 1 => seen.old += 1,
            Ok(got) => panic!("{what}: torn output of {} bytes", got.len()),
        }
    });
    eprintln!("unpack: {seen:?}");
    assert!(std::fs::read(&out).unwrap() == new);
}

#[test]
fn a_graph_gen_killed_at_any_moment_leaves_old_or_new_files() {
    let (seed, runs) = seed_and_runs(16);
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("g");
    let gen = |seed: &str, prefix: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpuio"));
        c.args(["graph", "gen", "--scale", "16", "--seed", seed, "-o"])
            .arg(prefix)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    // The old and the new versions, made once elsewhere.
    let refs = tempfile::tempdir().unwrap();
    let (old_p, new_p) = (refs.path().join("old"), refs.path().join("new"));
    assert!(gen("2", &old_p).status().unwrap().success());
    assert!(gen("1", &new_p).status().unwrap().success());
    let files = |p: &Path| {
        ["bel.col", "bel.dst"].map(|ext| {
            let mut s = p.as_os_str().to_owned();
            s.push(format!(".{ext}"));
            std::path::PathBuf::from(s)
        })
    };
    let old: Vec<Vec<u8>> = files(&old_p)
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    let new: Vec<Vec<u8>> = files(&new_p)
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(old != new);
    let outs = files(&prefix);
    let make = || gen("1", &prefix);
    let reset = |_run: u32| {
        for (f, b) in outs.iter().zip(&old) {
            std::fs::write(f, b).unwrap();
        }
    };
    let mut seen = Outcomes::default();
    kill_at_random_moments(seed, runs, dir.path(), &make, &reset, &mut |_run, what| {
        let mut all_new = true;
        for (i, f) in outs.iter().enumerate() {
            let got = std::fs::read(f).unwrap_or_else(|e| panic!("{what}: {}: {e}", f.display()));
            assert!(
                got == old[i] || got == new[i],
                "{what}: {} torn: {} bytes",
                f.display(),
                got.len()
            );
            all_new &= got == new[i];
        }
        if all_new {
            seen.new += 1;
        } else {
            seen.old += 1;
        }
    });
    eprintln!("graph gen: {seen:?}");
    for (f, b) in outs.iter().zip(&new) {
        assert!(&std::fs::read(f).unwrap() == b);
    }
}

/// Kills runs of `make` that replace `out` (old version `old` before odd runs, absent before even
/// ones) and checks that `out` is afterwards absent, old or complete; `new` is what a whole run writes.
fn check_single_output(
    seed: u64,
    runs: u32,
    dir: &Path,
    out: &Path,
    old: &[u8],
    make: &dyn Fn() -> Command,
    label: &str,
) {
    // What a whole run writes, made by one unkilled run.
    let _ = std::fs::remove_file(out);
    let st = make().status().unwrap();
    assert!(st.success(), "{label}: {st}");
    let new = std::fs::read(out).unwrap();
    assert!(new != old && !new.is_empty());
    let reset = |run: u32| {
        if run % 2 == 1 {
            std::fs::write(out, old).unwrap();
        } else {
            let _ = std::fs::remove_file(out);
        }
    };
    let mut seen = Outcomes::default();
    kill_at_random_moments(
        seed,
        runs,
        dir,
        make,
        &reset,
        &mut |run, what| match std::fs::read(out) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(run % 2 == 0, "{label} {what}: the old version disappeared");
                seen.absent += 1;
            }
            Err(e) => panic!("{label} {what}: {e}"),
            Ok(got) if got == new => seen.new += 1,
            Ok(got) if got == old && run % 2 == 1 => seen.old += 1,
            Ok(got) => panic!("{label} {what}: torn output of {} bytes", got.len()),
        },
    );
    eprintln!("{label}: {seen:?}");
    assert!(std::fs::read(out).unwrap() == new);
}

#[test]
fn a_bfs_killed_at_any_moment_leaves_the_old_depths_or_the_new_ones() {
    let (seed, runs) = seed_and_runs(16);
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("g");
    let st = Command::new(env!("CARGO_BIN_EXE_gpuio"))
        .args(["graph", "gen", "--scale", "17", "--seed", "1", "-o"])
        .arg(&prefix)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let out = dir.path().join("depths.bin");
    let make = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpuio"));
        // Vertex 1 has edges in this graph (vertex 0 may not): the depths differ from the old file.
        c.arg("bfs")
            .arg(&prefix)
            .args(["--source", "1", "--mode", "memory", "--depths-out"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let old = pattern(4 << 17, 5);
    check_single_output(
        seed,
        runs,
        dir.path(),
        &out,
        &old,
        &make,
        "bfs --depths-out",
    );
}

/// A safetensors file of `tensors` F32 tensors of `elems` elements each, filled from `pattern`.
fn safetensors(path: &Path, tensors: usize, elems: usize) {
    let mut header = String::from("{");
    for i in 0..tensors {
        let (a, b) = (i * elems * 4, (i + 1) * elems * 4);
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""t{i}":{{"dtype":"F32","shape":[{elems}],"data_offsets":[{a},{b}]}}"#
        ));
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(pattern(tensors * elems * 4, 6));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_load_killed_while_saving_leaves_the_old_file_or_the_new_one() {
    let (seed, runs) = seed_and_runs(16);
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    safetensors(&model, 6, 1 << 20); // 24 MiB
    let out = dir.path().join("saved.safetensors");
    let make = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpuio"));
        c.arg("load")
            .arg(&model)
            .args(["--device", "cpu", "--save-to"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let old = pattern(OLD_BYTES, 7);
    check_single_output(seed, runs, dir.path(), &out, &old, &make, "load --save-to");
}
