//! The kernel saying no, for real: io_uring blocked by a seccomp filter, and fixed-buffer registration
//! refused by `RLIMIT_MEMLOCK`. Each case runs in a child process (this test binary re-run with an
//! environment variable naming the case), because both restrictions are irreversible for a process.
//! The engine must fall back, say why, and still move the right bytes.

use std::io::Write;
use std::process::Command;

use gpuio::mem::Registration;
use gpuio::{AlignedBuf, BackendKind, Engine, EngineConfig, OpenOptions, QueueDesc};

const CHILD: &str = "GPUIO_REFUSAL_CHILD";

/// Runs test `name` of this binary in a child with `CHILD=name`; the child does the real work.
fn run_child(name: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child {name} failed:\n{text}");
    assert!(
        text.contains("CHILD-OK"),
        "child {name} did not run its checks:\n{text}"
    );
}

fn in_child(name: &str) -> bool {
    std::env::var(CHILD).is_ok_and(|v| v == name)
}

/// Loads a file through `engine` and checks the bytes.
fn round_trip(engine: &Engine) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    let file = OpenOptions::read().open(&path).unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let mut cb = q.command_buffer();
    let id = cb
        .load(&file, 1000, AlignedBuf::new(150_000, 4096).unwrap())
        .unwrap();
    let mut done = cb.commit().unwrap().finish().unwrap();
    assert_eq!(&done.take_buffer(id).unwrap()[..], &data[1000..151_000]);
}

/// A seccomp filter that makes `io_uring_setup` fail with EPERM, as container runtimes do.
fn block_io_uring() {
    const SYS_IO_URING_SETUP: u32 = 425;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    // BPF_LD|BPF_W|BPF_ABS = 0x20, BPF_JMP|BPF_JEQ|BPF_K = 0x15, BPF_RET|BPF_K = 0x06.
    let prog = [
        stmt(0x20, 4), // seccomp_data.arch
        jump(0x15, AUDIT_ARCH_X86_64, 1, 0),
        stmt(0x06, SECCOMP_RET_ALLOW), // another architecture: leave it alone
        stmt(0x20, 0),                 // seccomp_data.nr
        jump(0x15, SYS_IO_URING_SETUP, 0, 1),
        stmt(0x06, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(0x06, SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut _,
    };
    // SAFETY: plain prctl calls; the filter program outlives the call that copies it.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const _
            ),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn io_uring_blocked_by_seccomp_falls_back_to_threads() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipped: the seccomp filter here is written for x86-64 syscall numbers");
        return;
    }
    if !in_child("io_uring_blocked_by_seccomp_falls_back_to_threads") {
        return run_child("io_uring_blocked_by_seccomp_falls_back_to_threads");
    }
    block_io_uring();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    assert_eq!(engine.backend_kind(), BackendKind::Threads);
    let why = engine.explain().to_string();
    assert!(why.contains("io_uring refused"), "{why}");
    assert!(
        why.contains("seccomp") || why.contains("not permitted"),
        "{why}"
    );
    // Asking for io_uring explicitly is a clear error, not a silent fallback.
    let mut cfg = EngineConfig::default();
    cfg.backend.choice = gpuio::BackendChoice::Uring;
    let err = Engine::new(cfg).unwrap_err();
    assert_eq!(err.kind(), gpuio::ErrorKind::Unsupported, "{err}");
    round_trip(&engine);
    println!("CHILD-OK");
}

/// Drops CAP_IPC_LOCK from this thread's capability sets (threads created later inherit that), so the
/// memlock limit applies even to root.
fn drop_ipc_lock() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget/capset with a version-3 header and two data words, as the ABI defines.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
        d[0].effective &= !(1 << CAP_IPC_LOCK);
        d[0].permitted &= !(1 << CAP_IPC_LOCK);
        assert_eq!(libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()), 0);
    }
}

#[test]
fn memlock_limit_refuses_registration_and_io_goes_on_unregistered() {
    if !in_child("memlock_limit_refuses_registration_and_io_goes_on_unregistered") {
        return run_child("memlock_limit_refuses_registration_and_io_goes_on_unregistered");
    }
    drop_ipc_lock();
    let lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: lowering our own limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) }, 0);
    let mut cfg = EngineConfig {
        bounce_buffers: 1,
        task_size_bytes: 64 << 10, // the engine's own bounce buffer (64 KiB) fits under 1 MiB
        ..EngineConfig::default()
    };
    cfg.backend.choice = gpuio::BackendChoice::Uring;
    let engine = match Engine::new(cfg) {
        Ok(e) => e,
        Err(e) => {
            // Panics (failing the test) where io_uring is required (GPUIO_REQUIRE_URING=1).
            gpuio_testkit::backend_unavailable(BackendKind::Uring, &e);
            println!("CHILD-OK skipped: io_uring unavailable here: {e}");
            return;
        }
    };
    let pool = engine.buffer_pool(1 << 20, 8).unwrap();
    match pool.registration() {
        Registration::Refused(why) => {
            assert!(why.contains("RLIMIT_MEMLOCK"), "{why}");
        }
        other => panic!("8 MiB under a 1 MiB memlock limit should be refused, got {other:?}"),
    }
    // I/O with the unregistered buffers still works.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let file = OpenOptions::read().open(&path).unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let mut cb = q.command_buffer();
    let buf = pool.get();
    assert_eq!(buf.fixed_index(), None);
    let id = cb.load(&file, 1 << 20, buf).unwrap();
    let mut done = cb.commit().unwrap().finish().unwrap();
    assert_eq!(&done.take_buffer(id).unwrap()[..], &data[1 << 20..2 << 20]);
    round_trip(&engine);
    println!("CHILD-OK");
}
