//! `gpuio cp`, `gpuio stream` and `gpuio checksum` as a user meets them: exact copies that replace the
//! destination crash-safely (permissions kept, no temporary file left), every bad input refused with one
//! line and the destination untouched, the documented JSON keys, and checksums equal to a reference
//! CRC-32C (and to the standard check value of "123456789") for files and pack entries.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{crc32c, data, fails_cleanly, fails_with_error_line, gpuio, ok, ok_json, s, write};
use gpuio_testkit::temp_files;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The permission bits the kernel gives a new file created with `0o777` here: `0o777` less the umask
/// that gpuio (a child of this process) runs with.
fn umask_allows(dir: &Path) -> u32 {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("umask-probe");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o777)
        .open(&probe)
        .unwrap();
    let m = mode(&probe);
    std::fs::remove_file(&probe).unwrap();
    m
}

/// Asserts that a pipeline command's JSON has the keys every one of them reports, and `extra`.
fn has_keys(v: &serde_json::Value, extra: &[&str]) {
    let every = [
        "bytes_per_sec",
        "overlap_efficiency",
        "stages",
        "wall_s",
        "slots",
        "chunk_size",
        "bytes",
    ];
    for k in every.iter().chain(extra) {
        assert!(v.get(k).is_some(), "missing key {k}: {v}");
    }
}

#[test]
fn cp_copies_exactly_and_replaces_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (len, slots, chunk)) in [
        (0usize, "3", "4M"),
        (1, "1", "4K"),
        (4097, "2", "4K"),
        ((5 << 20) + 3, "3", "1M"),
        ((3 << 20) + 1, "6", "100000"),
    ]
    .into_iter()
    .enumerate()
    {
        let src = write(dir.path(), &format!("src{i}"), &data(len, i as u32 + 1));
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).unwrap();
        let dst = dir.path().join(format!("dst{i}"));
        let copy = || {
            ok(&[
                "cp",
                &s(&src),
                &s(&dst),
                "--slots",
                slots,
                "--chunk-size",
                chunk,
            ]);
            let same = std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap();
            assert!(same, "case {i}: the copy differs");
        };
        // New destination: the source's permissions, less the umask (as cp).
        copy();
        assert_eq!(mode(&dst), 0o750 & umask_allows(dir.path()), "case {i}");
        // Existing destination, longer than some sources: replaced, its own permissions kept.
        std::fs::write(&dst, [b'o'; 5000]).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).unwrap();
        copy();
        assert_eq!(mode(&dst), 0o600, "case {i}");
    }
    // Into a directory, as cp does; buffered on request.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let v = ok_json(&[
        "cp",
        &s(&dir.path().join("src3")),
        &s(&sub),
        "--direct",
        "off",
        "--json",
    ]);
    assert_eq!(v["dst"], s(&sub.join("src3")));
    assert_eq!(v["direct"]["write"], false);
    assert!(
        std::fs::read(sub.join("src3")).unwrap() == std::fs::read(dir.path().join("src3")).unwrap()
    );
    assert!(temp_files(dir.path()).is_empty() && temp_files(&sub).is_empty());
}

#[test]
fn cp_json_has_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "src", &data(3 << 20, 9));
    let dst = dir.path().join("dst");
    let v = ok_json(&["cp", &s(&src), &s(&dst), "--chunk-size", "1M", "--json"]);
    has_keys(
        &v,
        &["src", "dst", "direct", "crash_safe", "stale_temps_removed"],
    );
    assert_eq!(v["bytes"], 3 << 20);
    assert_eq!(v["chunk_size"], 1 << 20);
    assert_eq!(v["crash_safe"], true);
    let names: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["read", "compute", "write"]);
    let e = v["overlap_efficiency"].as_f64().unwrap();
    assert!(e > 0.0 && e <= 1.0, "{v}");
}

#[test]
fn cp_refuses_bad_input_and_leaves_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "src", &data(100_000, 3));
    let dst = write(dir.path(), "dst", b"keep me");
    let (srcs, dsts) = (s(&src), s(&dst));
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("src", &link).unwrap();
    let hard = dir.path().join("hard");
    std::fs::hard_link(&src, &hard).unwrap();
    let missing = s(&dir.path().join("missing"));
    let no_dir = s(&dir.path().join("no-such-dir/out"));
    let no_dir_slash = format!("{}/", s(&dir.path().join("no-such-dir")));

    for same in [srcs.clone(), s(&link), s(&hard)] {
        fails_with_error_line(&["cp", &srcs, &same], &["input file itself"]);
    }
    fails_with_error_line(&["cp", &missing, &dsts], &["missing", "not found"]);
    fails_with_error_line(&["cp", &s(dir.path()), &dsts], &["is a directory"]);
    fails_with_error_line(&["cp", &srcs, &no_dir], &["no-such-dir", "not found"]);
    fails_with_error_line(&["cp", &srcs, &no_dir_slash], &["no-such-dir", "not found"]);
    fails_with_error_line(
        &["cp", &srcs, "/dev/null"],
        &["/dev/null", "not a regular file"],
    );
    fails_with_error_line(&["cp", &srcs, &dsts, "--slots", "0"], &["--slots 0"]);
    fails_with_error_line(&["cp", &srcs, &dsts, "--slots", "65"], &["--slots 65"]);
    fails_with_error_line(
        &["cp", &srcs, &dsts, "--chunk-size", "0"],
        &["--chunk-size 0"],
    );
    fails_with_error_line(
        &["cp", &srcs, &dsts, "--chunk-size", "1T"],
        &["--chunk-size"],
    );
    // Slots the memory budget can never hold are refused, not waited for.
    fails_with_error_line(
        &["cp", &srcs, &dsts, "--slots", "64", "--chunk-size", "256M"],
        &["memory budget"],
    );
    fails_cleanly(&["cp", &srcs, &dsts, "--chunk-size", "4X"], &["not a size"]);
    fails_cleanly(
        &["cp", &srcs, &dsts, "--direct", "sometimes"],
        &["not one of"],
    );
    fails_cleanly(&["cp", &srcs], &["DST"]);
    // --direct on where O_DIRECT is impossible fails at open.
    fails_with_error_line(
        &["cp", "/proc/self/status", &dsts, "--direct", "on"],
        &["direct"],
    );

    assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");
    assert!(
        std::fs::read(&src).unwrap() == data(100_000, 3),
        "the source is untouched"
    );
    assert!(
        temp_files(dir.path()).is_empty(),
        "{:?}",
        temp_files(dir.path())
    );
}

#[test]
fn cp_into_a_read_only_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = write(dir.path(), "src", &data(10_000, 4));
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(ro.join("dst"), b"old").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let args = ["cp".to_string(), s(&src), s(&ro.join("dst"))];
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } != 0 {
        gpuio(&args.iter().map(String::as_str).collect::<Vec<_>>())
    } else {
        // Root writes anywhere, so run the binary as `nobody` (setpriv, from util-linux).
        match Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_gpuio"))
            .args(&args)
            .output()
        {
            Ok(o) => o,
            Err(_) => {
                eprintln!(
                    "skipped: running as root and setpriv is not installed to drop to another user"
                );
                return;
            }
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "wrote into a read-only directory: {err}"
    );
    assert!(
        err.contains("permission denied") && err.contains(&s(&ro)),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(ro.join("dst")).unwrap(), b"old");
    assert!(temp_files(&ro).is_empty());
}

#[test]
fn stream_reports_every_stage_and_computes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data((4 << 20) + 5, 6);
    let src = write(dir.path(), "src", &bytes);
    let out = dir.path().join("out");
    let v = ok_json(&[
        "stream",
        "--input",
        &s(&src),
        "--compute",
        "crc32c",
        "--json",
    ]);
    has_keys(&v, &["input", "compute", "crc32c"]);
    assert_eq!(v["crc32c"], format!("{:08x}", crc32c(&bytes)));
    assert_eq!(
        v["stages"].as_array().unwrap().len(),
        2,
        "no write stage: {v}"
    );
    assert_eq!(v["bytes"], bytes.len());
    // spin:NS burns NS ns per KiB on the compute stage; with --output there is a write stage.
    let v = ok_json(&[
        "stream",
        "--input",
        &s(&src),
        "--output",
        &s(&out),
        "--compute",
        "spin:4000",
        "--slots",
        "2",
        "--chunk-size",
        "512K",
        "--json",
    ]);
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["read", "compute", "write"]);
    for st in stages {
        for k in ["busy_s", "idle_s"] {
            assert!(st[k].as_f64().unwrap() >= 0.0, "{st}");
        }
    }
    let compute_s = stages[1]["busy_s"].as_f64().unwrap();
    let want_s = 4000e-9 * (bytes.len() as f64 / 1024.0);
    assert!(
        compute_s >= want_s * 0.99,
        "compute busy {compute_s} s < {want_s} s"
    );
    assert_eq!(v["slots"], 2);
    assert_eq!(v["chunk_size"], 512 << 10);
    assert!(std::fs::read(&out).unwrap() == bytes);
    // The table, for people.
    let o = ok(&["stream", "--input", &s(&src), "--compute", "crc32c"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for w in ["read", "compute", "overlap efficiency", "crc32c: "] {
        assert!(text.contains(w), "{w}: {text}");
    }
}

#[test]
fn stream_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let src = s(&write(dir.path(), "src", &data(10_000, 7)));
    fails_cleanly(
        &["stream", "--input", &src, "--compute", "md5"],
        &["not one of"],
    );
    fails_cleanly(
        &["stream", "--input", &src, "--compute", "spin:x"],
        &["spin"],
    );
    fails_cleanly(
        &["stream", "--input", &src, "--compute", "spin:99999999999"],
        &["at most"],
    );
    fails_with_error_line(&["stream", "--input", &src, "--slots", "0"], &["--slots 0"]);
    fails_with_error_line(
        &["stream", "--input", &src, "--chunk-size", "0"],
        &["--chunk-size 0"],
    );
    fails_with_error_line(
        &["stream", "--input", &src, "--output", &src],
        &["input file itself"],
    );
    fails_cleanly(&["stream"], &["--input"]);
    assert!(std::fs::read(&src).unwrap() == data(10_000, 7));
}

#[test]
fn checksum_is_crc32c_of_the_logical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let check = write(dir.path(), "check", b"123456789");
    let o = ok(&["checksum", &s(&check)]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("e3069283  {}\n", s(&check)),
        "the standard CRC-32C check value"
    );
    let empty = write(dir.path(), "empty", b"");
    let v = ok_json(&["checksum", &s(&empty), "--json"]);
    has_keys(&v, &["path", "crc32c"]);
    assert_eq!(v["crc32c"], "00000000");
    assert_eq!(v["bytes"], 0);
    let bytes = data((3 << 20) + 77, 8);
    let f = write(dir.path(), "f", &bytes);
    for (slots, chunk) in [("1", "4K"), ("3", "1M"), ("5", "100000")] {
        let v = ok_json(&[
            "checksum",
            &s(&f),
            "--slots",
            slots,
            "--chunk-size",
            chunk,
            "--json",
        ]);
        assert_eq!(
            v["crc32c"],
            format!("{:08x}", crc32c(&bytes)),
            "{slots} x {chunk}"
        );
        assert_eq!(v["path"], s(&f));
    }
    // One changed byte changes it.
    let mut changed = bytes.clone();
    changed[2 << 20] ^= 1;
    let g = write(dir.path(), "g", &changed);
    let v = ok_json(&["checksum", &s(&g), "--json"]);
    assert_ne!(v["crc32c"], format!("{:08x}", crc32c(&bytes)));
    fails_with_error_line(
        &["checksum", &s(&dir.path().join("nope"))],
        &["nope", "not found"],
    );
}

#[test]
fn pack_entries_stream_checksum_and_copy_out() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let text: Vec<u8> = b"weights and biases, layer after layer\n"
        .iter()
        .copied()
        .cycle()
        .take(2_000_003)
        .collect();
    std::fs::write(src.join("sub/w.txt"), &text).unwrap();
    let pack = s(&dir.path().join("p.gpk"));
    ok(&[
        "pack",
        &s(&src),
        "-o",
        &pack,
        "--codec",
        "zstd",
        "--chunk-size",
        "16K",
    ]);
    let entry = format!("{pack}:sub/w.txt");

    let v = ok_json(&["checksum", &entry, "--json"]);
    assert_eq!(v["crc32c"], format!("{:08x}", crc32c(&text)));
    assert_eq!(v["bytes"], text.len());

    let v = ok_json(&[
        "stream",
        "--input",
        &entry,
        "--compute",
        "crc32c",
        "--chunk-size",
        "100K",
        "--json",
    ]);
    assert_eq!(v["crc32c"], format!("{:08x}", crc32c(&text)));

    // cp PACK:ENTRY DIR names the copy after the entry.
    let outdir = dir.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    ok(&["cp", &entry, &s(&outdir)]);
    assert!(std::fs::read(outdir.join("w.txt")).unwrap() == text);
    // Over the pack itself: refused.
    fails_with_error_line(&["cp", &entry, &pack], &["input file itself"]);

    // A damaged chunk: the checksum fails naming the damage, never prints a value.
    let info = ok_json(&["info", &pack, "--json"]);
    let chunk = &info["entries"][0]["chunks"][60];
    let at = chunk["file_offset"].as_u64().unwrap() + chunk["stored_length"].as_u64().unwrap() / 2;
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[at as usize] ^= 0x10;
    std::fs::write(&pack, &bytes).unwrap();
    let dst = write(dir.path(), "dst", b"old");
    fails_with_error_line(&["checksum", &entry], &["chunk 60", "CRC-32C"]);
    fails_with_error_line(
        &["cp", &entry, &s(&dst)],
        &["chunk 60", "pipeline read stage"],
    );
    assert_eq!(std::fs::read(&dst).unwrap(), b"old");
    assert!(temp_files(dir.path()).is_empty());
}
