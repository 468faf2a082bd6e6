//! Test support for gpu-io: seeded randomness ([`rng`]), a fault-injecting backend ([`fault`]),
//! fio-style verify patterns ([`verify`]), and helpers that build engines and scratch directories so
//! one test body can run against every backend (STYLE item 5).
//!
//! Everything here is for tests: it panics on setup mistakes instead of returning errors, and it is
//! never published (`publish = false`).
//!
//! A verify pattern catches a block that landed in the wrong place, not only a flipped bit:
//!
//! ```
//! use gpuio_testkit::Pattern;
//! let p = Pattern::new(4096, 42);
//! let mut disk = p.bytes(0, 3 * 4096, 1);
//! assert!(p.verify(&disk, 0, 1).is_ok());
//! // A misdirected write: block 2's bytes stored where block 1 belongs.
//! let (a, b) = disk.split_at_mut(2 * 4096);
//! a[4096..].copy_from_slice(&b[..4096]);
//! assert!(p.verify(&disk, 0, 1).is_err());
//! ```

pub mod fault;
pub mod rng;
pub mod verify;

pub use fault::{
    Fault, FaultBackend, FaultCounts, FaultHandle, FaultPlan, Injection, NthFault, LOG_MAX,
};
pub use rng::Rng;
pub use verify::{Header, Pattern, Problem, VerifyError};

use std::path::{Path, PathBuf};

use gpuio::backend::{self, BackendChoice, BackendConfig, BackendKind};
use gpuio::{Engine, EngineConfig, MemoryBudget};

/// Every backend kind, in the order tests run them.
pub const ALL_KINDS: [BackendKind; 3] =
    [BackendKind::Uring, BackendKind::Threads, BackendKind::Mmap];

/// The [`BackendChoice`] that asks for exactly `kind`.
pub fn choice_for(kind: BackendKind) -> BackendChoice {
    match kind {
        BackendKind::Uring => BackendChoice::Uring,
        BackendKind::Threads => BackendChoice::Threads,
        BackendKind::Mmap => BackendChoice::Mmap,
    }
}

/// A small engine configuration for tests of `kind`: queue depth 16, 64 KiB tasks (so modest commands
/// still split into several tasks), 8 bounce buffers, a 256 MiB budget.
pub fn test_config(kind: BackendKind) -> EngineConfig {
    EngineConfig {
        backend: BackendConfig {
            choice: choice_for(kind),
            queue_depth: 16,
            ..BackendConfig::default()
        },
        task_size_bytes: 64 << 10,
        bounce_buffers: 8,
        memory_budget: MemoryBudget::new(256 << 20),
        ..EngineConfig::default()
    }
}

/// The environment variable that makes a missing io_uring a test failure instead of a skipped backend
/// (CI sets it where io_uring is known to work, so a broken probe cannot silently shrink the tests).
pub const REQUIRE_URING_ENV: &str = "GPUIO_REQUIRE_URING";

/// Whether [`REQUIRE_URING_ENV`] is set to `1`.
pub fn uring_required() -> bool {
    std::env::var(REQUIRE_URING_ENV).is_ok_and(|v| v.trim() == "1")
}

/// Says that a backend of `kind` cannot start here (`why`): a note on stderr, or, when `kind` is
/// io_uring and [`uring_required`], a panic that fails the test.
///
/// # Panics
/// As just said.
pub fn backend_unavailable(kind: BackendKind, why: &dyn std::fmt::Display) {
    if kind == BackendKind::Uring && uring_required() {
        panic!("{REQUIRE_URING_ENV}=1 but io_uring cannot start here: {why}");
    }
    eprintln!(
        "note: the {} backend cannot start here, skipped: {why}",
        kind.name()
    );
}

/// [`backend_unavailable`] for a [`BackendChoice`] (`Auto` is never skipped silently: it panics).
pub fn choice_unavailable(choice: BackendChoice, why: &dyn std::fmt::Display) {
    match choice {
        BackendChoice::Uring => backend_unavailable(BackendKind::Uring, why),
        BackendChoice::Threads => backend_unavailable(BackendKind::Threads, why),
        BackendChoice::Mmap => backend_unavailable(BackendKind::Mmap, why),
        _ => panic!("{choice:?} cannot start here: {why}"),
    }
}

/// Whether a backend of `kind` can start here (io_uring may be refused by the kernel or a sandbox).
///
/// # Panics
/// If io_uring is [required](uring_required) and cannot start.
pub fn kind_works(kind: BackendKind) -> bool {
    match backend::probe(&test_config(kind).backend) {
        Ok(_) => true,
        Err(e) => {
            backend_unavailable(kind, &e);
            false
        }
    }
}

/// The backend kinds that start here.
pub fn working_kinds() -> Vec<BackendKind> {
    ALL_KINDS.into_iter().filter(|&k| kind_works(k)).collect()
}

/// An engine of `kind` with [`test_config`].
pub fn engine(kind: BackendKind) -> gpuio::Result<Engine> {
    Engine::new(test_config(kind))
}

/// One engine for every backend kind that works here, labelled by kind name. io_uring is left out only
/// where the kernel refuses it (the label list says which ran), and never when [`uring_required`].
///
/// # Panics
/// If io_uring is required and cannot start.
pub fn engines() -> Vec<(String, Engine)> {
    ALL_KINDS
        .into_iter()
        .filter_map(|k| match engine(k) {
            Ok(e) => Some((k.name().to_string(), e)),
            Err(e) => {
                backend_unavailable(k, &e);
                None
            }
        })
        .collect()
}

/// An engine whose `inner` backend is wrapped in a [`FaultBackend`] with `seed` and `plan`, and the
/// handle to its fault counts. Uses [`test_config`].
pub fn faulty_engine(
    seed: u64,
    plan: FaultPlan,
    inner: BackendKind,
) -> gpuio::Result<(Engine, FaultHandle)> {
    faulty_engine_with(test_config(inner), seed, plan)
}

/// Like [`faulty_engine`] with a configuration of the caller's (its `backend.choice` picks the inner
/// engine).
pub fn faulty_engine_with(
    config: EngineConfig,
    seed: u64,
    plan: FaultPlan,
) -> gpuio::Result<(Engine, FaultHandle)> {
    let (inner, mut explain) = backend::probe(&config.backend)?;
    let (wrapped, handle) = FaultBackend::new(inner, seed, plan);
    explain
        .reasons
        .push(format!("wrapped in a fault-injecting backend, seed {seed}"));
    let engine = Engine::with_backend(config, Box::new(wrapped), explain)?;
    Ok((engine, handle))
}

/// A [`LocalQueue`](gpuio::LocalQueue) on a fault-injecting wrapper of the backend `config` asks for.
pub fn faulty_local_queue(
    config: gpuio::LocalConfig,
    seed: u64,
    plan: FaultPlan,
) -> gpuio::Result<(gpuio::LocalQueue, FaultHandle)> {
    let (inner, mut explain) = backend::probe(&config.backend)?;
    let (wrapped, handle) = FaultBackend::new(inner, seed, plan);
    explain
        .reasons
        .push(format!("wrapped in a fault-injecting backend, seed {seed}"));
    let queue = gpuio::LocalQueue::with_backend(config, Box::new(wrapped), explain)?;
    Ok((queue, handle))
}

/// Where a scratch directory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The system temporary directory (`/tmp`: ext4 here, where O_DIRECT works).
    Disk,
    /// `/dev/shm` (tmpfs: a page-cache-only filesystem), or the temporary directory where there is
    /// no `/dev/shm`.
    Shm,
}

/// A fresh scratch directory at `place`, removed when dropped.
///
/// # Panics
/// If it cannot be made.
pub fn scratch_dir(place: Place) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let made = match place {
        Place::Shm if shm.is_dir() => tempfile::Builder::new()
            .prefix("gpuio-test-")
            .tempdir_in(shm),
        _ => tempfile::Builder::new().prefix("gpuio-test-").tempdir(),
    };
    made.unwrap_or_else(|e| panic!("cannot make a scratch directory ({place:?}): {e}"))
}

/// A fresh scratch directory on a memory-backed filesystem (`/dev/shm` as tmpfs), or `None`, saying
/// why on standard error, where there is none to write to: for tests of what gpu-io does with such
/// files only (`File::is_memory_backed`).
pub fn memory_backed_dir() -> Option<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("gpuio-test-")
        .tempdir_in("/dev/shm")
        .ok();
    let backed = dir.as_ref().is_some_and(|d| {
        let probe = d.path().join("probe");
        std::fs::write(&probe, b"x").is_ok()
            && gpuio::File::open(&probe).is_ok_and(|f| f.is_memory_backed())
    });
    if !backed {
        eprintln!("skipped: no writable memory-backed /dev/shm here");
        return None;
    }
    dir
}

/// Runs `f` on its own thread and returns what it returns. Fails the test if `f` has not finished
/// after `secs` (a hang), and passes a panic of `f` on as it was.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let v = f();
        let _ = tx.send(());
        v
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        // Sent, or dropped while `f` unwound: either way the thread has ended or is ending.
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("hung: not finished within {secs} s")
        }
    }
}

/// The temporary files of crash-safe replacements (`.NAME.PID-RAND.tmp`, see `gpuio::replace`) in
/// `dir`: what a failed or killed write may leave behind.
///
/// # Panics
/// If `dir` cannot be read.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_returns_passes_panics_on_and_catches_hangs() {
        assert_eq!(within(10, || 7), 7);
        let panicked = std::panic::catch_unwind(|| within(10, || panic!("inner")));
        let msg = panicked.unwrap_err();
        assert_eq!(msg.downcast_ref::<&str>(), Some(&"inner"));
        let hung = std::panic::catch_unwind(|| {
            within(1, || std::thread::sleep(std::time::Duration::from_secs(3)))
        });
        let msg = hung.unwrap_err();
        assert!(msg.downcast_ref::<String>().unwrap().contains("hung"));
    }

    #[test]
    fn threads_always_work_and_engines_are_labelled() {
        assert!(kind_works(BackendKind::Threads));
        let es = engines();
        assert!(es.iter().any(|(l, _)| l == "threads"), "{es:?}");
        for (label, e) in &es {
            assert_eq!(e.backend_kind().name(), label);
        }
    }

    #[test]
    fn a_required_uring_that_is_missing_fails() {
        // Threads never panic; io_uring panics only when required (checked without touching the
        // environment, which other tests read concurrently).
        backend_unavailable(BackendKind::Threads, &"test");
        let required = std::panic::catch_unwind(|| {
            backend_unavailable(BackendKind::Uring, &"probe refused (test)")
        })
        .is_err();
        assert_eq!(required, uring_required());
        if uring_required() {
            assert!(kind_works(BackendKind::Uring), "required and probed");
        }
    }

    #[test]
    fn faulty_engine_explains_the_wrapper() {
        let (e, h) = faulty_engine(1, FaultPlan::none(), BackendKind::Threads).unwrap();
        assert_eq!(e.backend_kind(), BackendKind::Threads);
        assert!(
            e.explain().to_string().contains("fault-injecting"),
            "{}",
            e.explain()
        );
        assert_eq!(h.counts(), FaultCounts::default());
    }
}
