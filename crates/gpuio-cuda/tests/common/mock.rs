//! Building the mock driver libraries and running a test scenario in a child process under them:
//! shared by `tests/mock_driver.rs`, `tests/rings_mock.rs` and (included by path) the CLI's
//! `tests/info_mock.rs`. Only std, libc and tempfile: nothing here knows what a scenario does.
//!
//! The mocks are `tests/mock_libcuda.c` and `tests/mock_libcufile.c`, compiled with `cc` as
//! `libcuda.so.1` (plus a `libcuda.so` link: cudarc tries that name first) and `libcufile.so.0`.
//! Without a C compiler the tests skip, saying so, unless `GPUIO_REQUIRE_CC=1` (CI), which makes
//! that a failure.
#![allow(dead_code)]

use std::ffi::{c_char, c_long, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Set in the child processes only; the `child_*` tests do nothing without it.
pub const CHILD_ENV: &str = "GPUIO_MOCK_CHILD";

/// Longest a child scenario may run before it is killed (a hang fails the test).
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(300);

fn tests_dir() -> PathBuf {
    // This file is gpuio-cuda/tests/common/mock.rs wherever it is included from.
    Path::new(file!())
        .parent()
        .and_then(Path::parent)
        .map(|p| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                // file!() is relative to the workspace root; tests run in their crate's directory.
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .ancestors()
                    .map(|a| a.join(p))
                    .find(|c| c.join("mock_libcuda.c").is_file())
                    .unwrap_or_else(|| p.to_path_buf())
            }
        })
        .expect("file!() has two parents")
}

/// Compiles the mocks into `dir` (libcuda, and libcufile beside it); `None` (saying why) where
/// there is no C compiler and `GPUIO_REQUIRE_CC` is not `1`.
pub fn build_mock(dir: &Path) -> Option<()> {
    compile(dir, "mock_libcuda.c", "libcuda.so.1")?;
    std::os::unix::fs::symlink("libcuda.so.1", dir.join("libcuda.so")).unwrap();
    compile(dir, "mock_libcufile.c", "libcufile.so.0")
}

fn compile(dir: &Path, source: &str, soname: &str) -> Option<()> {
    let src = tests_dir().join(source);
    assert!(src.is_file(), "mock source {} not found", src.display());
    let lib = dir.join(soname);
    let out = match Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall"])
        .arg(format!("-Wl,-soname,{soname}"))
        .arg("-o")
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
    {
        Ok(out) => out,
        Err(e) if std::env::var("GPUIO_REQUIRE_CC").is_ok_and(|v| v == "1") => {
            panic!("GPUIO_REQUIRE_CC=1 but the C compiler `cc` cannot run: {e}")
        }
        Err(e) => {
            eprintln!(
                "skipped: no C compiler `cc` to build the mock libcuda ({e}); set GPUIO_REQUIRE_CC=1 to fail instead"
            );
            return None;
        }
    };
    assert!(
        out.status.success(),
        "building {soname} from {source} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// Runs `cmd` (stdout and stderr captured) and kills it after `timeout`: its output, or a panic
/// naming it if it ran too long.
pub fn output_within(mut cmd: Command, timeout: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = t_err.join().unwrap_or_default();
            panic!(
                "{what} hung for {timeout:?} and was killed:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs `child` (a test of the current test executable) in a child process under the mock (with
/// `env` set from the start) and asserts that it ran and passed, within [`CHILD_TIMEOUT`].
pub fn run_child(child: &str, env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    if build_mock(dir.path()).is_none() {
        return;
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", child, "--nocapture", "--test-threads", "1"])
        .env("LD_LIBRARY_PATH", dir.path())
        .env(CHILD_ENV, "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output_within(cmd, CHILD_TIMEOUT, child);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{child} failed under the mock driver ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // A filter that matched nothing also "succeeds": make sure the scenario really ran.
    assert!(
        stdout.contains("1 passed"),
        "{child} did not run in the child:\n{stdout}\n{stderr}"
    );
}

/// Whether this process is a child started by [`run_child`]. The `child_*` tests return at once
/// (passing, doing nothing) in a normal test run, where no mock driver is loaded.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The loaded mock library (the one cudarc opened), for its counters.
pub fn mock() -> *mut libc::c_void {
    // SAFETY: RTLD_NOLOAD only looks the library up among those already loaded.
    let lib = unsafe { libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    assert!(!lib.is_null(), "libcuda is not loaded in this process");
    lib
}

/// A `long f(void)` function of the loaded mock (its counters, `mock_device_bias`).
pub fn counter(name: &str) -> i64 {
    let sym = CString::new(name).unwrap();
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    let f = unsafe { libc::dlsym(mock(), sym.as_ptr()) };
    assert!(
        !f.is_null(),
        "{name} missing: the loaded libcuda is not the mock"
    );
    // SAFETY: every mock_* counter is `long f(void)`.
    let f: extern "C" fn() -> c_long = unsafe { std::mem::transmute(f) };
    f() as i64
}

/// The mock's account of the last call it refused.
pub fn last_bad() -> String {
    // SAFETY: as in `counter`; mock_last_bad is `const char *f(void)` returning a static string.
    unsafe {
        let f = libc::dlsym(mock(), c"mock_last_bad".as_ptr());
        assert!(!f.is_null());
        let f: extern "C" fn() -> *const c_char = std::mem::transmute(f);
        CStr::from_ptr(f()).to_string_lossy().into_owned()
    }
}

/// No call was refused and no queued copy touched memory outside an allocation.
pub fn assert_clean_calls() {
    assert_eq!(counter("mock_bad_calls"), 0, "refused call: {}", last_bad());
    assert_eq!(counter("mock_faults"), 0, "a queued copy faulted");
}

/// Everything the device handed out has been given back.
pub fn assert_all_released() {
    assert_eq!(counter("mock_allocated_bytes"), 0, "device memory leaked");
    assert_eq!(counter("mock_registered"), 0, "host memory left registered");
    assert_eq!(counter("mock_live_streams"), 0, "stream leaked");
    assert_eq!(counter("mock_live_events"), 0, "event leaked");
    assert_eq!(counter("mock_live_modules"), 0, "kernel module left loaded");
}
