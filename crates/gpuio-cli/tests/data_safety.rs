//! No command loses a user's data (issue 13), one test per class of hazard, each run on every command
//! it applies to, checking the destination's bytes and the directory listing (no temporary file left):
//!
//! - pseudo-files (size 0 in `stat`, content when read) are read to their end or refused, never taken
//!   for empty;
//! - FIFOs and character devices are refused at once (a FIFO used to block forever);
//! - an output is never one of the command's inputs (same inode, through links), and packing a
//!   directory into itself does not nest the old pack;
//! - a write-protected destination is replaced only with `--force` (checked by mode bits, so it holds
//!   when the tests run as root);
//! - SIGINT, SIGTERM and SIGHUP remove the temporary file and still end the process by the signal;
//!   temporary files of SIGKILLed runs are removed by the next run;
//! - names with control characters are printed escaped; an unreadable pack says "permission denied";
//!   `cat` past the end writes nothing; `pack` keeps few files open.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{crc32c, data, fails_with_error_line, gpuio, ok, s, write};
use gpuio_testkit::temp_files;

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn no_temps(dir: &Path) {
    assert!(temp_files(dir).is_empty(), "{:?}", temp_files(dir));
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpuio"))
}

/// Waits for `child` at most `limit`; kills it and fails if it is still running then.
fn wait_at_most(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?} (blocked?)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs gpuio with `args`, failing the test if it takes more than 20 s.
fn run_bounded(args: &[&str]) -> Output {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_at_most(&mut child, Duration::from_secs(20), &format!("{args:?}"));
    child.wait_with_output().unwrap()
}

fn pack(dir: &Path, name: &str, inputs: &[&Path]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["pack".to_string()];
    args.extend(inputs.iter().map(|p| s(p)));
    args.extend(["-o".into(), s(&out), "--chunk-size".into(), "64K".into()]);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    out
}

/// A pseudo-file with stable content: its bytes as this process reads them.
const PSEUDO: &str = "/proc/version";

#[test]
fn pseudo_files_are_read_to_their_end_or_refused() {
    let want = read(Path::new(PSEUDO));
    assert!(!want.is_empty());
    assert_eq!(std::fs::metadata(PSEUDO).unwrap().len(), 0, "a pseudo-file");
    let dir = tempfile::tempdir().unwrap();
    let dst = write(dir.path(), "dst.txt", b"important\n");

    // cp: the whole content, replacing the old file.
    ok(&["cp", PSEUDO, &s(&dst)]);
    assert_eq!(read(&dst), want);
    // checksum: of the content, not of nothing.
    let out = ok(&["checksum", PSEUDO]);
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        line.starts_with(&format!("{:08x}", crc32c(&want))),
        "{line}"
    );
    // cat: the bytes, and a range of them.
    assert_eq!(ok(&["cat", PSEUDO]).stdout, want);
    assert_eq!(
        ok(&["cat", PSEUDO, "--offset", "2", "--length", "5"]).stdout,
        &want[2..7]
    );
    // pack: an entry with the content.
    let p = pack(dir.path(), "p.gpk", &[Path::new(PSEUDO)]);
    assert_eq!(ok(&["cat", &format!("{}:version", s(&p))]).stdout, want);
    // stream reads by offset and size: refused, saying why, the output not created.
    let out = dir.path().join("out");
    fails_with_error_line(
        &["stream", "--input", PSEUDO, "--output", &s(&out)],
        &[PSEUDO, "size of 0"],
    );
    assert!(!out.exists());
    // --direct on cannot be honoured: refused, the destination kept.
    write(dir.path(), "dst.txt", b"important\n");
    fails_with_error_line(&["cp", PSEUDO, &s(&dst), "--direct", "on"], &["direct"]);
    assert_eq!(read(&dst), b"important\n");
    no_temps(dir.path());
}

#[test]
fn fifos_and_devices_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let dst = write(dir.path(), "dst", b"keep");
    let (f, d) = (s(&fifo), s(&dst));
    for (special, why) in [(f.as_str(), "FIFO"), ("/dev/zero", "character device")] {
        let p = s(&dir.path().join("p.gpk"));
        let unpacked = s(&dir.path().join("unpacked"));
        let cases: Vec<Vec<&str>> = vec![
            vec!["cp", special, &d],
            vec!["checksum", special],
            vec!["cat", special],
            vec!["stream", "--input", special],
            vec!["info", special],
            vec!["verify", special],
            vec!["pack", special, "-o", &p],
            vec!["unpack", special, "-o", &unpacked],
        ];
        for args in cases {
            let out = run_bounded(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(
                err.starts_with("gpuio: error:") && err.contains(why) && err.contains(special),
                "{args:?}: {err}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        }
        assert!(!Path::new(&p).exists() && !Path::new(&unpacked).exists());
    }
    assert_eq!(read(&dst), b"keep");
    no_temps(dir.path());
}

#[test]
fn no_command_writes_over_its_own_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bytes = data(200_000, 1);
    let src = write(d, "a.bin", &bytes);
    let link = d.join("link");
    std::os::unix::fs::symlink("a.bin", &link).unwrap();
    let hard = d.join("hard");
    std::fs::hard_link(&src, &hard).unwrap();
    let tree = d.join("tree");
    std::fs::create_dir_all(tree.join("layers")).unwrap();
    write(&tree.join("layers"), "0.bin", &data(100_000, 2));
    let p = pack(d, "m.gpk", &[&tree]);
    let pack_bytes = read(&p);
    let p_link = d.join("m-link.gpk");
    std::os::unix::fs::symlink("m.gpk", &p_link).unwrap();
    let (srcs, ps) = (s(&src), s(&p));
    for same in [&src, &link, &hard] {
        let same = s(same);
        for args in [
            vec!["cp", srcs.as_str(), &same],
            vec!["stream", "--input", &srcs, "--output", &same],
            vec!["pack", &srcs, "-o", &same],
        ] {
            fails_with_error_line(&args, &["input file itself"]);
            // --force does not make it right.
            let mut forced = args.clone();
            forced.push("--force");
            fails_with_error_line(&forced, &["input file itself"]);
        }
    }
    for out in [&p, &p_link] {
        fails_with_error_line(
            &["unpack", &ps, "--entry", "layers/0.bin", "-o", &s(out)],
            &["input file itself"],
        );
        fails_with_error_line(
            &["cp", &format!("{ps}:layers/0.bin"), &s(out)],
            &["input file itself"],
        );
    }
    assert!(read(&src) == bytes);
    assert!(read(&p) == pack_bytes);

    // A directory packed into itself, twice: the old pack is not an entry of the new one.
    let inner = tree.join("p.gpk");
    for _ in 0..2 {
        let out = ok(&["pack", &s(&tree), "-o", &s(&inner)]);
        assert!(out.status.success());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&ok(&["info", &s(&inner), "--json"]).stdout).unwrap();
    let names: Vec<String> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["layers/0.bin"], "{v}");
    for dir in [d, tree.as_path()] {
        no_temps(dir);
    }
}

#[test]
fn write_protected_destinations_are_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let new = data(150_000, 3);
    let src = write(d, "src.bin", &new);
    let p = pack(d, "m.gpk", &[&src]);
    let ro = |name: &str| {
        let f = write(d, name, b"protected");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444)).unwrap();
        f
    };
    let unpack_dir = d.join("out");
    std::fs::create_dir(&unpack_dir).unwrap();
    let in_dir = write(&unpack_dir, "src.bin", b"protected");
    std::fs::set_permissions(&in_dir, std::fs::Permissions::from_mode(0o444)).unwrap();
    let g_col = ro("g.bel.col");
    let (cp_dst, st_dst, pk_dst, un_dst) = (
        ro("cp.bin"),
        ro("stream.bin"),
        ro("new.gpk"),
        ro("entry.bin"),
    );
    let (srcs, ps) = (s(&src), s(&p));
    let cases: Vec<(Vec<String>, PathBuf)> = vec![
        (vec!["cp".into(), srcs.clone(), s(&cp_dst)], cp_dst.clone()),
        (
            vec![
                "stream".into(),
                "--input".into(),
                srcs.clone(),
                "--output".into(),
                s(&st_dst),
            ],
            st_dst.clone(),
        ),
        (
            vec!["pack".into(), srcs.clone(), "-o".into(), s(&pk_dst)],
            pk_dst.clone(),
        ),
        (
            vec![
                "unpack".into(),
                ps.clone(),
                "--entry".into(),
                "src.bin".into(),
                "-o".into(),
                s(&un_dst),
            ],
            un_dst.clone(),
        ),
        (
            vec!["unpack".into(), ps.clone(), "-o".into(), s(&unpack_dir)],
            in_dir.clone(),
        ),
        (
            vec![
                "graph".into(),
                "gen".into(),
                "--scale".into(),
                "6".into(),
                "-o".into(),
                s(&d.join("g")),
            ],
            g_col.clone(),
        ),
    ];
    for (args, target) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with_error_line(&a, &["write-protected", "--force", &s(target)]);
        assert_eq!(read(target), b"protected", "{args:?}");
        no_temps(d);
        no_temps(&unpack_dir);
    }
    for (args, target) in &cases {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.push("--force");
        ok(&a);
        let got = read(target);
        if args[0] == "pack" {
            assert_eq!(&got[..4], &read(&p)[..4], "a pack: {args:?}");
        } else if args[0] == "graph" {
            assert_ne!(got, b"protected", "{args:?}");
        } else {
            assert!(got == new, "{args:?}");
        }
    }
    no_temps(d);
    no_temps(&unpack_dir);
}

/// Starts `cmd`, waits until a temporary file shows up in `dir`, sends `sig`, and checks that the
/// process died of it and that the temporary file is gone. Returns false if the run ended before a
/// temporary file was seen (too fast to catch).
fn interrupt_while_writing(mut cmd: Command, dir: &Path, sig: i32, what: &str) -> bool {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec. The signal starts at its default
    // disposition whatever this test process inherited (a background job ignores SIGINT).
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(sig, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if !temp_files(dir).is_empty() {
            break;
        }
        if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
    let st = wait_at_most(&mut child, Duration::from_secs(30), what);
    assert_eq!(st.signal(), Some(sig), "{what}: {st}");
    assert!(temp_files(dir).is_empty(), "{what}: {:?}", temp_files(dir));
    true
}

#[test]
fn signals_remove_temporary_files_and_still_end_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let big = data(48 << 20, 5);
    let src = write(d, "big.bin", &big);
    let p = pack(d, "big.gpk", &[&src]);
    let work = d.join("work");
    std::fs::create_dir(&work).unwrap();
    let old = write(&work, "dst", b"old version");
    let old_col = write(&work, "g.bel.col", b"old graph");
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let mut caught = 0;
        for (name, target) in ["cp", "unpack", "pack", "graph"]
            .iter()
            .zip([&old, &old, &old, &old_col])
        {
            let mut cmd = bin();
            match *name {
                "cp" => cmd.args(["cp", "--chunk-size", "64K"]).arg(&src).arg(&old),
                "unpack" => cmd
                    .args(["unpack", "--entry", "big.bin", "-o"])
                    .arg(&old)
                    .arg(&p),
                "pack" => cmd.arg("pack").arg(&src).arg("-o").arg(&old),
                _ => cmd
                    .args(["graph", "gen", "--scale", "17", "-o"])
                    .arg(work.join("g")),
            };
            let what = format!("{name} stopped by signal {sig}");
            if interrupt_while_writing(cmd, &work, sig, &what) {
                caught += 1;
                assert_eq!(
                    read(target),
                    if *name == "graph" {
                        &b"old graph"[..]
                    } else {
                        &b"old version"[..]
                    },
                    "{what}"
                );
            } else {
                eprintln!("{what}: finished before a temporary file was seen");
            }
            // Start the next command from the old version again.
            write(&work, "dst", b"old version");
            write(&work, "g.bel.col", b"old graph");
            let _ = std::fs::remove_file(work.join("g.bel.dst"));
        }
        assert!(
            caught >= 2,
            "signal {sig}: only {caught} runs caught writing"
        );
    }
    no_temps(&work);
}

#[test]
fn temporaries_of_killed_runs_are_removed_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bytes = data(100_000, 6);
    let src = write(d, "src.bin", &bytes);
    let p = pack(d, "m.gpk", &[&src]);
    // A PID that is no longer running: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = |name: &str| write(d, &format!(".{name}.{dead}-deadbeef.tmp"), b"stale");
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["cp".into(), s(&src), s(&d.join("c.bin"))],
            vec!["c.bin"],
        ),
        (
            vec![
                "stream".into(),
                "--input".into(),
                s(&src),
                "--output".into(),
                s(&d.join("s.bin")),
            ],
            vec!["s.bin"],
        ),
        (
            vec!["pack".into(), s(&src), "-o".into(), s(&d.join("n.gpk"))],
            vec!["n.gpk"],
        ),
        (
            vec![
                "unpack".into(),
                s(&p),
                "--entry".into(),
                "src.bin".into(),
                "-o".into(),
                s(&d.join("u.bin")),
            ],
            vec!["u.bin"],
        ),
        (
            vec![
                "graph".into(),
                "gen".into(),
                "--scale".into(),
                "5".into(),
                "-o".into(),
                s(&d.join("g")),
            ],
            vec!["g.bel.col", "g.bel.dst"],
        ),
    ];
    for (args, names) in &cases {
        let temps: Vec<PathBuf> = names.iter().map(|n| stale(n)).collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&a);
        for t in temps {
            assert!(!t.exists(), "{args:?} kept {}", t.display());
        }
        no_temps(d);
    }
    // unpack into a directory: each destination's stale temporaries.
    let t = out.join(format!(".src.bin.{dead}-deadbeef.tmp"));
    std::fs::write(&t, b"stale").unwrap();
    ok(&["unpack", &s(&p), "-o", &s(&out)]);
    assert!(read(&out.join("src.bin")) == bytes);
    no_temps(&out);
}

#[test]
fn names_are_escaped_and_errors_say_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let odd = "odd\nname\u{1b}[31m";
    let src = write(d, odd, b"contents");
    let dst = d.join(format!("{odd}.copy"));
    for args in [
        vec!["cp".to_string(), s(&src), s(&dst)],
        vec!["checksum".to_string(), s(&src)],
        vec![
            "pack".to_string(),
            s(&src),
            "-o".to_string(),
            s(&d.join(format!("{odd}.gpk"))),
        ],
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ok(&a);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            !text.contains('\u{1b}') && text.trim_end().lines().count() == 1,
            "{args:?}: {text:?}"
        );
        assert!(text.contains("odd\\nname\\u{1b}[31m"), "{args:?}: {text:?}");
    }
    assert_eq!(read(&dst), b"contents");

    // cat past the end fails before writing a byte.
    let out = gpuio(&["cat", &s(&src), "--length", "1T"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{} bytes written", out.stdout.len());
    let entry_src = write(d, "m-src", &data(70_000, 7));
    let p = pack(d, "m.gpk", &[&entry_src]);
    let out = gpuio(&["cat", &format!("{}:m-src", s(&p)), "--length", "1T"]);
    assert!(!out.status.success() && out.stdout.is_empty());

    // An unreadable pack: "permission denied", not "not found" (as another user: root reads anything).
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    for cmd in ["cat", "checksum"] {
        let spec = format!("{}:m-src", s(&p));
        // SAFETY: geteuid has no preconditions.
        let out = if unsafe { libc::geteuid() } != 0 {
            gpuio(&[cmd, &spec])
        } else {
            match Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_gpuio"))
                .args([cmd, &spec])
                .output()
            {
                Ok(o) => o,
                Err(_) => {
                    eprintln!("skipped the unreadable-pack case: root, and no setpriv to drop to another user");
                    return;
                }
            }
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}: {err}");
        assert!(
            err.contains("permission denied") && !err.contains("not found"),
            "{cmd}: {err}"
        );
    }
}

#[test]
fn pack_keeps_few_files_open() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    const FILES: usize = 1100;
    for i in 0..FILES {
        std::fs::write(tree.join(format!("f{i:04}")), format!("file {i}\n")).unwrap();
    }
    let out = dir.path().join("p.gpk");
    // Fewer descriptors than files: keeping every input open runs out (EMFILE).
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 256 && exec '{}' pack '{}' -o '{}'",
            env!("CARGO_BIN_EXE_gpuio"),
            tree.display(),
            out.display()
        ))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&ok(&["info", &s(&out), "--json"]).stdout).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), FILES);
    assert_eq!(
        ok(&["cat", &format!("{}:f1099", s(&out))]).stdout,
        b"file 1099\n"
    );
    no_temps(dir.path());
}

#[test]
fn load_save_to_never_replaces_its_input_or_a_protected_file_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = gpuio_cuda::safetensors::serialize(
        &[("w", gpuio_cuda::Dtype::U8, &[5][..], &b"abcde"[..])],
        &[],
    );
    let input = write(d, "m.safetensors", &model);
    let link = d.join("link.safetensors");
    std::os::unix::fs::symlink("m.safetensors", &link).unwrap();
    let p = pack(d, "m.gpk", &[&input]);
    let pack_bytes = read(&p);
    // The input itself, through a symbolic link, and the pack of a PACK:ENTRY input: refused, even
    // with --force, before anything is loaded.
    for (src, out) in [
        (s(&input), s(&input)),
        (s(&input), s(&link)),
        (format!("{}:m.safetensors", s(&p)), s(&p)),
    ] {
        for force in [false, true] {
            let mut args = vec!["load", src.as_str(), "--save-to", out.as_str()];
            if force {
                args.push("--force");
            }
            fails_with_error_line(&args, &[]);
        }
    }
    assert_eq!(read(&input), model);
    assert_eq!(read(&p), pack_bytes);
    // A write-protected destination: refused without --force, replaced with it.
    let ro = write(d, "ro.safetensors", b"protected");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    fails_with_error_line(&["load", &s(&input), "--save-to", &s(&ro)], &["--force"]);
    assert_eq!(read(&ro), b"protected");
    ok(&["load", &s(&input), "--save-to", &s(&ro), "--force"]);
    assert_eq!(read(&ro), model);
    no_temps(d);
}
