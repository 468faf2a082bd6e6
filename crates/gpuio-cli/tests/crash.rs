//! Crash consistency of `gpuio cp` (STYLE item 12): a copy killed with SIGKILL at a random moment, many
//! times over — the destination absent before half of the runs and holding an older version before
//! the others — must leave the destination absent or the old version (killed before the rename) or an
//! exact copy (after it): never a torn or mixed file.
//!
//! A killed copy cannot remove its temporary file (`.NAME.PID-RAND.tmp` beside the destination); the
//! next `gpuio cp` to that destination removes those of processes that no longer exist, which the test
//! checks at the end. (What a power loss would do is not tested here: that needs a machine to cut; the
//! fsyncs before and after the rename are what guard it.)
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
        .unwrap_or(40);
    eprintln!("GPUIO_CRASH_SEED={seed} GPUIO_CRASH_RUNS={runs}");

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
    for run in 0..runs {
        let had_old = run % 2 == 1;
        if had_old {
            std::fs::write(&dst, &old).unwrap();
        } else {
            let _ = std::fs::remove_file(&dst);
        }
        let delay = full.mul_f64((next() % 1200) as f64 / 1000.0);
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
