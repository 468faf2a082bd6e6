//! The `gpuio` binary as a new user meets it: every bad input gets one line naming the cause and a
//! non-zero exit, never a panic or a backtrace; the happy paths print what the README promises.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fails_cleanly as assert_clean_failure, gpuio, gpuio_in};

/// The one JSON object a successful run printed (the run's stderr if it failed).
fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn bad_input_gets_one_line_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing").display().to_string();
    let d = dir.path().display().to_string();
    let empty = write_file(dir.path(), "empty", b"");
    let small = write_file(dir.path(), "small", &[1u8; 10000]);

    assert_clean_failure(&["cat", &missing], &["missing", "not found"]);
    assert_clean_failure(&["cat", &d], &["is a directory"]);
    assert_clean_failure(
        &["cat", &small, "--offset", "20000"],
        &["beyond the end", "small"],
    );
    assert_clean_failure(
        &["cat", &small, "--offset", "9000", "--length", "5000"],
        &["end of file", "small", "9000"],
    );
    // bench creates a missing --file (as fio does), but not a missing directory.
    let missing_dir = dir.path().join("no-such-dir/f").display().to_string();
    assert_clean_failure(
        &[
            "bench",
            "--file",
            &missing_dir,
            "--pattern",
            "randread",
            "--duration",
            "0.1",
        ],
        &["no-such-dir", "not found"],
    );
    assert_clean_failure(
        &[
            "bench",
            "--file",
            &d,
            "--pattern",
            "randread",
            "--duration",
            "0.1",
        ],
        &["is a directory"],
    );
    assert_clean_failure(
        &[
            "bench",
            "--file",
            &empty,
            "--pattern",
            "read",
            "--duration",
            "0.1",
        ],
        &["empty"],
    );
    assert_clean_failure(
        &[
            "bench",
            "--file",
            &small,
            "--pattern",
            "read",
            "--block-size",
            "1M",
            "--duration",
            "0.1",
        ],
        &["larger than"],
    );
    assert_clean_failure(
        &[
            "bench",
            "--file",
            &small,
            "--pattern",
            "write",
            "--duration",
            "0.1",
        ],
        &["--overwrite"],
    );
    assert_clean_failure(
        &["bench", "--queue-depth", "0", "--duration", "0.1"],
        &["queue-depth"],
    );
    assert_clean_failure(
        &["bench", "--queue-depth", "1000000", "--duration", "0.1"],
        &["queue-depth"],
    );
    assert_clean_failure(
        &["bench", "--block-size", "0", "--duration", "0.1"],
        &["block-size"],
    );
    assert_clean_failure(
        &["bench", "--block-size", "1T", "--duration", "0.1"],
        &["block-size"],
    );
    assert_clean_failure(
        &["bench", "--block-size", "4X", "--duration", "0.1"],
        &["not a size"],
    );
    assert_clean_failure(&["bench", "--duration=-1"], &["duration"]);
    assert_clean_failure(&["bench", "--duration", "0"], &["duration"]);
    assert_clean_failure(&["bench", "--backend", "nvme"], &["not one of"]);
    assert_clean_failure(
        &[
            "bench",
            "--task-size",
            "100",
            "--duration",
            "0.1",
            "--size",
            "1M",
        ],
        &["task size"],
    );
    assert_clean_failure(&["info", &missing], &["missing"]);
}

#[test]
fn permission_denied_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "secret", &[1u8; 4096]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert_clean_failure(&["cat", &p], &["secret", "permission denied"]);
        return;
    }
    // Root reads anything, so run the binary as `nobody` (setpriv, from util-linux).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_gpuio"))
        .args(["cat", &p])
        .output();
    let Ok(out) = out else {
        eprintln!("skipped: running as root and setpriv is not installed to drop to another user");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody read a 000 file: {err}");
    assert!(
        err.contains("secret") && err.contains("permission denied"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn direct_on_where_impossible_is_refused_clearly() {
    // /proc files never accept O_DIRECT; --direct on must fail at open, naming the file.
    assert_clean_failure(
        &["cat", "/proc/self/status", "--direct", "on"],
        &["/proc/self/status", "direct"],
    );
}

#[test]
fn cat_prints_exact_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let p = write_file(dir.path(), "data", &data);
    for (off, len) in [
        (0usize, 100usize),
        (4095, 4099),
        (1_000_001, 1_500_000),
        (2_999_990, 10),
    ] {
        let out = gpuio(&[
            "cat",
            &p,
            "--offset",
            &off.to_string(),
            "--length",
            &len.to_string(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, &data[off..off + len], "range {off}+{len}");
    }
    let all = gpuio(&["cat", &p]);
    assert_eq!(all.stdout, data);
}

#[test]
fn bench_json_has_the_documented_keys() {
    let out = gpuio(&[
        "bench",
        "--size",
        "8M",
        "--pattern",
        "randread",
        "--duration",
        "0.3",
        "--queue-depth",
        "8",
        "--json",
    ]);
    let v = json_of(&out);
    for k in [
        "pattern",
        "block_size",
        "queue_depth",
        "backend",
        "direct",
        "iops",
        "bytes_per_sec",
        "latency_us",
        "cpu",
    ] {
        assert!(v.get(k).is_some(), "missing key {k}: {v}");
    }
    assert_eq!(v["pattern"], "randread");
    assert_eq!(v["block_size"], 4096);
    assert!(v["iops"].as_f64().unwrap() > 0.0);
    assert!(v["latency_us"]["p99"].as_f64().unwrap() >= v["latency_us"]["p50"].as_f64().unwrap());
}

#[test]
fn bench_compare_reports_ratios_for_every_reference() {
    let out = gpuio(&[
        "bench",
        "--size",
        "8M",
        "--pattern",
        "read",
        "--block-size",
        "64K",
        "--duration",
        "0.3",
        "--compare",
        "--json",
    ]);
    let v = json_of(&out);
    let names: Vec<&str> = v["baselines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    for n in ["pread loop", "threads", "mmap"] {
        assert!(names.contains(&n), "missing reference {n}: {names:?}");
    }
    for b in v["baselines"].as_array().unwrap() {
        assert!(b["gpuio_ratio"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_suite_runs_on_every_backend_and_cleans_up() {
    for backend in ["uring", "threads", "mmap"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = gpuio_in(
            tmp.path(),
            &[
                "bench",
                "--size",
                "4M",
                "--duration",
                "0.2",
                "--backend",
                backend,
                "--queue-depth",
                "4",
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for p in ["randread", "read", "write", "randwrite"] {
            assert!(stdout.contains(p), "{backend}: table lacks {p}: {stdout}");
        }
        assert!(
            stdout.contains(backend),
            "{backend}: table names the backend: {stdout}"
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            left.is_empty(),
            "{backend}: scratch files left behind: {left:?}"
        );
    }
}

#[test]
fn info_explains_the_choice() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "f", &[0u8; 8192]);
    let out = gpuio(&["info", &p, "--json"]);
    let v = json_of(&out);
    assert!(!v["reasons"].as_array().unwrap().is_empty());
    assert!(v["file"]["direct_reason"].as_str().unwrap().len() > 5);
    let human = gpuio(&["info"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("chosen backend"));
}

#[test]
fn a_reader_that_goes_away_ends_output_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "big", &vec![b'x'; 8 << 20]);
    // A pack of 2048 chunks: its JSON description is far larger than a pipe's buffer.
    let pack = dir.path().join("big.gpk").display().to_string();
    let made = gpuio(&["pack", &p, "-o", &pack, "--chunk-size", "4K"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    for args in [
        vec!["cat", p.as_str()],
        vec!["info", pack.as_str(), "--json"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpuio"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 10];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn bench_threads_split_one_pass_and_info_says_where_bytes_live() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.bin").display().to_string();
    // 8 MiB, 2048 blocks of 4 KiB: three threads share one pass, so every block is read once in all.
    std::fs::write(&f, vec![3u8; 8 << 20]).unwrap();
    let out = gpuio(&[
        "bench",
        "--file",
        &f,
        "--pattern",
        "randread",
        "--queue-depth",
        "8",
        "--threads",
        "3",
        "--duration",
        "30",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["threads"], 3);
    assert_eq!(v["ops"], 2048, "{v}");
    assert_clean_failure(
        &["bench", "--threads", "0", "--duration", "0.1"],
        &["threads"],
    );

    // Just written: warm, read buffered, and said so; on tmpfs: memory-resident.
    let out = gpuio(&["info", &f]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    // (A temporary directory on tmpfs is memory-resident without being "warm".)
    assert!(
        text.contains("memory-resident") && (text.contains("warm") || text.contains("tmpfs")),
        "{text}"
    );
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        let s = write_file(shm.path(), "s.bin", &[1u8; 1 << 20]);
        let out = gpuio(&["info", &s, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["file"]["memory_resident"], true, "{v}");
    }
}
