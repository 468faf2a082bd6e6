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
    for n in ["pread loop", "threads", "mmap", "gpu-io local"] {
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
    // The same with each thread on its own ring: one pass in all too; random writes as well. On
    // /dev/shm the requests are served when taken (inline), so the run must still end on time.
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    let mut files = vec![f.clone()];
    if let Some(shm) = &shm {
        files.push(write_file(shm.path(), "s.bin", &vec![3u8; 8 << 20]));
    }
    for (f, pattern) in files
        .iter()
        .flat_map(|f| ["randread", "randwrite"].map(|p| (f, p)))
    {
        let out = gpuio(&[
            "bench",
            "--file",
            f,
            "--overwrite",
            "--pattern",
            pattern,
            "--queue-depth",
            "8",
            "--threads",
            "3",
            "--duration",
            if pattern == "randread" { "30" } else { "0.3" },
            "--local",
            "--compare",
            "--json",
        ]);
        let v = json_of(&out);
        assert!(
            v["backend"].as_str().unwrap().contains("local queue"),
            "{v}"
        );
        if pattern == "randread" {
            assert_eq!(v["ops"], 2048, "{v}");
        } else {
            assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
        }
        let names: Vec<&str> = v["baselines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"gpu-io engine"), "{names:?}");
    }
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

/// The subcommands `gpuio --help` lists, with `graph` as `graph gen` (its only subcommand).
fn subcommands() -> Vec<Vec<String>> {
    let out = gpuio(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let list = text.split("Commands:").nth(1).expect("a command list");
    let names: Vec<String> = list
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| n != "help")
        .collect();
    assert!(names.len() >= 13, "{text}");
    names
        .into_iter()
        .map(|n| {
            if n == "graph" {
                vec![n, "gen".into()]
            } else {
                vec![n]
            }
        })
        .collect()
}

/// Every `--long` flag in `text` (a word that starts with two dashes and a letter).
fn long_flags(text: &str) -> std::collections::BTreeSet<String> {
    let mut flags = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("--") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-') {
            continue;
        }
        let rest = &text[i + 2..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{}", name.trim_end_matches('-')));
        }
    }
    flags
}

/// README.md's `### Flags` entry for `gpuio CMD`: the list item that starts with it, to the next item.
fn readme_entry<'a>(readme: &'a str, cmd: &str) -> &'a str {
    let section = readme
        .split("\n### Flags\n")
        .nth(1)
        .expect("README.md has a ### Flags section");
    let section = section.split("\n#").next().unwrap();
    let head = format!("\n- `gpuio {cmd}");
    let start = section
        .find(&head)
        .unwrap_or_else(|| panic!("README.md's ### Flags has no entry for `gpuio {cmd}`"));
    let item = &section[start + 1..];
    let end = item[1..].find("\n- ").map_or(item.len(), |e| e + 1);
    let end = end.min(item.find("\n\n").unwrap_or(item.len()));
    &item[..end]
}

#[test]
fn every_flag_has_help_and_the_readme_lists_exactly_the_flags_of_each_command() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    for cmd in subcommands() {
        let mut args: Vec<&str> = cmd.iter().map(|s| s.as_str()).collect();
        args.push("--help");
        let out = gpuio(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let options = help.split("Options:").nth(1).expect("an Options section");
        // Every option line has help text: in the short layout on the same line, in the long layout
        // (some flag has long help) on the lines below it.
        let lines: Vec<&str> = options.lines().collect();
        let mut in_help = std::collections::BTreeSet::new();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            // An option line (`  -o, --output <OUTPUT>  help`), not help text that names a flag.
            if !t.starts_with('-') || l.len() - t.len() > 6 {
                continue;
            }
            in_help.extend(long_flags(t.split("  ").next().unwrap()));
            // Text, not just `[default: ...]` or `[possible values: ...]`.
            let text = |s: &str| !s.trim().is_empty() && !s.trim().starts_with('[');
            let own = t.split("  ").skip(1).any(text);
            let below = lines
                .get(i + 1)
                .is_some_and(|n| text(n) && n.len() - n.trim_start().len() > 6);
            assert!(
                own || below,
                "`gpuio {}`: no help for `{t}`:\n{help}",
                cmd.join(" ")
            );
        }
        in_help.remove("--help");
        let name = cmd.join(" ");
        let in_readme = long_flags(readme_entry(&readme, &name));
        assert_eq!(
            in_help, in_readme,
            "README.md's ### Flags entry for `gpuio {name}` and `gpuio {name} --help` differ"
        );
    }
}

#[test]
fn checksum_help_describes_no_write_stage_and_info_names_no_explicit_choice() {
    let out = gpuio(&["checksum", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        !help.contains("write") && !help.contains("output"),
        "checksum has no write stage: {help}"
    );
    // info probes every backend by naming it; nothing was chosen explicitly by the user.
    for args in [vec!["info"], vec!["info", "--json"]] {
        let out = gpuio(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert!(!text.contains("explicitly"), "{args:?}: {text}");
    }
}

#[test]
fn bench_refuses_a_scratch_file_larger_than_the_free_space_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = gpuio_in(
        tmp.path(),
        &["bench", "--size", "1000000T", "--duration", "0.1"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("gpuio: error:")
            && err.contains("1099511627776000000-byte file")
            && err.contains("bytes")
            && err.contains("free")
            && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // A --file bench would create is checked the same way.
    let f = tmp.path().join("new.bin").display().to_string();
    let out = gpuio_in(tmp.path(), &["bench", "--file", &f, "--size", "1000000T"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("free"));
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn sigterm_or_sigint_mid_bench_removes_the_scratch_file() {
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let tmp = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gpuio"))
            .args(["bench", "--size", "64M", "--pattern", "randwrite"])
            .args(["--duration", "60", "--json"])
            .env("TMPDIR", tmp.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the scratch file is there and fully written (the benchmark is running on it).
        let start = Instant::now();
        loop {
            let full = std::fs::read_dir(tmp.path())
                .unwrap()
                .filter_map(|e| e.ok()?.metadata().ok())
                .any(|m| m.len() == 64 << 20);
            if full {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no scratch file");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.signal(), Some(sig), "{out:?}");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "signal {sig} left {left:?}");
    }
}

/// The GPU-kernel commands on a machine without a GPU's kernels (the host stand-in): one clear line,
/// exit 1, nothing on standard output, before any file is touched. (`rings --device cpu` runs CPU
/// producers instead: the next test.)
#[test]
fn gpu_kernel_commands_say_they_need_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("t.bin");
    std::fs::write(&table, vec![1u8; 1 << 20]).unwrap();
    let t = table.to_str().unwrap();
    let args = [
        "gather",
        "--table",
        t,
        "--row-bytes",
        "4096",
        "--batch",
        "8",
        "--batches",
        "1",
        "--mode",
        "gpu-cache",
        "--device",
        "cpu",
    ];
    let out = gpuio(&args);
    assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    assert_clean_failure(&args, &["cpu runs no kernels (a GPU is needed)"]);
    let g = dir.path().join("g");
    let gs = g.to_str().unwrap();
    assert!(gpuio(&["graph", "gen", "--scale", "6", "-o", gs])
        .status
        .success());
    let args = [
        "bfs",
        gs,
        "--source",
        "1",
        "--mode",
        "gpu-cache",
        "--device",
        "cpu",
    ];
    assert_clean_failure(&args, &["cpu runs no kernels (a GPU is needed)"]);
}

/// `rings --device cpu`: CPU producers read through the rings on the host stand-in, every read
/// served, the sampled ones checked, the server's CPU time reported; a file too small for one read
/// is refused naming it.
#[test]
fn rings_on_the_cpu_serve_cpu_producers() {
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("t.bin");
    std::fs::write(
        &table,
        (0..1u32 << 18)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let t = table.to_str().unwrap();
    let args = [
        "rings",
        t,
        "--device",
        "cpu",
        "--reads",
        "3000",
        "--threads",
        "24",
        "--producers",
        "2",
        "--block-size",
        "16K",
        "--json",
    ];
    let out = gpuio(&args);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["random_reads"];
    assert_eq!(r["requests"], 3000, "{v}");
    assert_eq!(r["server"]["requests"], 3000, "{v}");
    assert_eq!(r["server"]["errors"], 0, "{v}");
    assert!(r["verified_bytes"].as_u64().unwrap() >= 16384, "{v}");
    assert!(
        v["cpu"]["server_us_per_request"].as_f64().unwrap() >= 0.0,
        "{v}"
    );
    let small = dir.path().join("small.bin");
    std::fs::write(&small, [0u8; 100]).unwrap();
    let s = small.to_str().unwrap();
    assert_clean_failure(
        &["rings", s, "--device", "cpu"],
        &["small.bin", "smaller than one"],
    );
}

/// `bench --warm` keeps the file's pages: a file just written is warm, so the automatic choice reads
/// it buffered and says so; without `--warm` reads are measured cold (on a filesystem that takes
/// O_DIRECT, direct).
#[test]
fn bench_warm_keeps_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("w.bin");
    std::fs::write(&f, vec![5u8; 8 << 20]).unwrap();
    let fs = f.to_str().unwrap();
    let run = |warm: bool| {
        let mut args = vec![
            "bench",
            "--file",
            fs,
            "--pattern",
            "read",
            "--block-size",
            "1M",
            "--duration",
            "1",
            "--json",
        ];
        if warm {
            args.push("--warm");
        }
        let out = gpuio(&args);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let warm = run(true);
    assert_eq!(
        warm["direct"], false,
        "a warm file is read from memory: {warm}"
    );
    let cold = run(false);
    let takes_direct = gpuio::File::open(&f)
        .map(|g| !g.is_memory_backed())
        .unwrap_or(false)
        && gpuio::OpenOptions::read()
            .direct(gpuio::DirectMode::On)
            .open(&f)
            .is_ok();
    if takes_direct {
        assert_eq!(
            cold["direct"], true,
            "cold reads measure the device: {cold}"
        );
    }
}
