//! Running the `gpuio` binary from integration tests, shared by every test file of the CLI.
#![allow(dead_code)] // each test file uses a different subset

use std::path::Path;
use std::process::{Command, Output};

/// Runs gpuio with the system temp directory as its TMPDIR.
pub fn gpuio(args: &[&str]) -> Output {
    gpuio_in(&std::env::temp_dir(), args)
}

/// Runs gpuio with `tmp` as its temp directory (where scratch files go).
pub fn gpuio_in(tmp: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpuio"))
        .args(args)
        .env("TMPDIR", tmp)
        .output()
        .expect("run gpuio")
}

/// Runs gpuio and asserts it succeeded.
pub fn ok(args: &[&str]) -> Output {
    let out = gpuio(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs gpuio, asserts it succeeded, and parses its standard output as JSON.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = ok(args);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Asserts gpuio fails without a panic, naming every one of `needles` on stderr; gpuio's own errors
/// (as opposed to clap's usage messages) must be one line. Returns stderr.
pub fn fails_cleanly(args: &[&str], needles: &[&str]) -> String {
    let out = gpuio(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks '{n}': {err}");
    }
    if err.starts_with("gpuio: error:") {
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
    }
    err
}

/// Like [`fails_cleanly`], and the failure must be gpuio's own one-line error, not a usage message.
pub fn fails_with_error_line(args: &[&str], needles: &[&str]) {
    let err = fails_cleanly(args, needles);
    assert!(err.starts_with("gpuio: error:"), "{args:?}: {err}");
}

/// `len` bytes of a seeded xorshift sequence (files whose contents any misplaced byte would show).
pub fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// CRC-32C, the checksum `gpuio checksum` and the loaders print.
pub fn crc32c(b: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}
