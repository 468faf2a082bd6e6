//! One test body, every configuration (STYLE.md item 5, after ripgrep's `SearcherTester`).
//!
//! The same write-then-read workload runs under every backend (io_uring, thread pool, mmap) × every
//! direct-I/O mode (`O_DIRECT` on, off, and a simulated refusal that exercises the buffered fallback) ×
//! every location (a temporary directory on the root filesystem, and tmpfs under `/dev/shm`). Each run is
//! labelled, checked against an in-memory model, and the bytes every run read back must be identical.
//! A proptest then drives random loads and stores against a `Vec<u8>` model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use gpuio::{
    AlignedBuf, BackendChoice, BackendConfig, DirectMode, Engine, EngineConfig, ErrorKind, File,
    IoQueue, OpenOptions, QueueDesc, Status,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

/// Task size for these tests: small, so that large commands split into many tasks.
const TASK_BYTES: usize = 16 << 10;
/// Length of the file after the first round of stores: not a multiple of any block size.
const FILE_BYTES: u64 = (1 << 20) + 3 * 4096 + 777;

// ---------------------------------------------------------------------------------------------------
// Seeded data.

/// xorshift64*: small, seeded, the same on every machine.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
}

/// `len` pseudo-random bytes determined by `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, to fingerprint what a run read.
fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
}

/// Describes the first difference between two byte strings.
fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    Some(match at {
        Some(i) => format!(
            "first difference at byte {i} of {} (got {:#04x}, want {:#04x})",
            want.len(),
            got[i],
            want[i]
        ),
        None => format!("length {} instead of {}", got.len(), want.len()),
    })
}

/// `model[offset..offset + n]`, empty when `n` is 0 (even past the end).
fn model_range(model: &[u8], offset: u64, n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    &model[offset as usize..offset as usize + n]
}

/// A buffer of `cap` bytes filled with `fill` except `data` at `at`.
fn buf_with(cap: usize, at: usize, data: &[u8], fill: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(cap, 4096).expect("allocate test buffer");
    b.fill(fill);
    b[at..at + data.len()].copy_from_slice(data);
    b
}

/// A buffer offset that, on a page-aligned buffer, puts memory at every kind of alignment.
fn pick_buf_offset(rng: &mut Rng) -> usize {
    match rng.below(5) {
        0 => 0,
        1 => 4096,
        2 => 512 * rng.range(1, 8) as usize,
        _ => rng.range(1, 4096) as usize,
    }
}

// ---------------------------------------------------------------------------------------------------
// Configurations.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direct {
    On,
    Off,
    /// `O_DIRECT` refused at open (simulated): the buffered fallback.
    Refused,
}

impl Direct {
    const ALL: [Direct; 3] = [Direct::On, Direct::Off, Direct::Refused];
    fn name(self) -> &'static str {
        match self {
            Direct::On => "direct-on",
            Direct::Off => "direct-off",
            Direct::Refused => "direct-refused",
        }
    }
    fn options(self, base: OpenOptions) -> OpenOptions {
        match self {
            Direct::On => base.direct(DirectMode::On),
            Direct::Off => base.direct(DirectMode::Off),
            Direct::Refused => base.simulate_direct_refusal(),
        }
    }
}

const BACKENDS: [BackendChoice; 3] = [
    BackendChoice::Uring,
    BackendChoice::Threads,
    BackendChoice::Mmap,
];

fn backend_name(b: BackendChoice) -> &'static str {
    match b {
        BackendChoice::Uring => "uring",
        BackendChoice::Threads => "threads",
        BackendChoice::Mmap => "mmap",
        BackendChoice::Auto => "auto",
    }
}

/// An engine with small tasks and a modest queue depth; `None` (with the reason) if this backend
/// cannot run here (io_uring disabled, say).
fn engine_for(choice: BackendChoice) -> Result<Engine, String> {
    let config = EngineConfig {
        backend: BackendConfig {
            choice,
            queue_depth: 8,
            ..BackendConfig::default()
        },
        task_size_bytes: TASK_BYTES,
        bounce_buffers: 8,
        ..EngineConfig::default()
    };
    match Engine::new(config) {
        Ok(e) => Ok(e),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            // Fails the test instead when io_uring is required (GPUIO_REQUIRE_URING=1).
            gpuio_testkit::choice_unavailable(choice, &e);
            Err(e.to_string())
        }
        Err(e) => panic!("{}: engine failed to start: {e}", backend_name(choice)),
    }
}

/// The directories to run in: a temporary directory (the root filesystem, ext4 on the project's
/// machines) and one on tmpfs.
fn places() -> Vec<(&'static str, tempfile::TempDir)> {
    let mut v = vec![("tmp", tempfile::tempdir().expect("temporary directory"))];
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => v.push(("shm", d)),
        Err(e) => {
            eprintln!("note: no tmpfs directory under /dev/shm ({e}); skipping that location")
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------------
// The body.

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// What one run produced, for comparison across runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    /// The whole file, read back through the engine.
    readback: Vec<u8>,
    /// A fingerprint of every load's offset, length and bytes.
    loads: u64,
}

enum Run {
    Done(Outcome),
    Skipped(String),
}

fn ok_or_status(status: Status, what: &str) -> Result<(), String> {
    match status {
        Status::Complete => Ok(()),
        other => Err(format!("{what}: {other:?}")),
    }
}

/// Write phase 1: tile `0..FILE_BYTES` with non-overlapping stores of every shape, spread over a few
/// concurrently committed command buffers.
fn store_tiles(queue: &IoQueue, file: &File, model: &[u8]) -> Result<(), String> {
    let mut rng = Rng::new(0x5707E);
    let mut cbs: Vec<_> = (0..3).map(|_| queue.command_buffer()).collect();
    let mut pos = 0u64;
    let mut n = 0usize;
    while pos < FILE_BYTES {
        let len = match rng.below(4) {
            0 => 4096 * rng.range(1, 24),
            1 => rng.range(1, 70_000),
            2 => rng.range(1, 700),
            _ => 512 * rng.range(1, 40),
        }
        .min(FILE_BYTES - pos);
        let data = &model[pos as usize..(pos + len) as usize];
        let at = pick_buf_offset(&mut rng);
        let slack = rng.below(3) as usize * 100;
        let cb = &mut cbs[n % 3];
        if at == 0 && slack == 0 {
            cb.store(file, pos, buf_with(len as usize, 0, data, 0xEE))
        } else {
            let buf = buf_with(at + len as usize + slack, at, data, 0xEE);
            cb.store_range(file, pos, buf, at, len)
        }
        .map_err(|e| format!("recording store at {pos}+{len}: {e}"))?;
        pos += len;
        n += 1;
    }
    let done: Vec<_> = cbs
        .into_iter()
        .map(|cb| cb.commit().map_err(|e| format!("commit: {e}")))
        .collect::<Result<_, _>>()?;
    for c in done {
        ok_or_status(c.wait(), "tile stores")?;
    }
    Ok(())
}

/// Write phase 2: overlapping stores, kept in order by barriers, the last one extending the file;
/// then a sync. Applies each to `model`.
fn store_overwrites(queue: &IoQueue, file: &File, model: &mut Vec<u8>) -> Result<(), String> {
    let mut rng = Rng::new(0x0BE5);
    let mut cb = queue.command_buffer();
    for i in 0..24u64 {
        let (off, len) = if i == 23 {
            (model.len() as u64 - 100, 5000)
        } else if i % 3 == 0 {
            (4096 * rng.below(200), 4096 * rng.range(1, 8))
        } else {
            (rng.below(model.len() as u64 - 80_000), rng.range(1, 80_000))
        };
        let data = pattern(0xD00D + i, len as usize);
        let end = (off + len) as usize;
        if end > model.len() {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
        let at = pick_buf_offset(&mut rng);
        cb.store_range(
            file,
            off,
            buf_with(at + len as usize, at, &data, 0x11),
            at,
            len,
        )
        .map_err(|e| format!("recording overwrite at {off}+{len}: {e}"))?;
        cb.barrier();
    }
    let sync = cb.sync(file).map_err(|e| format!("recording sync: {e}"))?;
    let (status, done) = cb
        .commit()
        .map_err(|e| format!("commit overwrites: {e}"))?
        .wait_parts();
    ok_or_status(status, "overwrite stores")?;
    ensure!(done.bytes(sync) == 0, "a sync transfers no bytes");
    Ok(())
}

/// One load to check: where, how much, into which part of which buffer.
struct LoadCheck {
    id: gpuio::CommandId,
    offset: u64,
    len: usize,
    at: usize,
    cap: usize,
    expect: usize,
}

/// Many loads of every shape, several command buffers in flight at once.
fn random_loads(queue: &IoQueue, file: &File, model: &[u8]) -> Result<u64, String> {
    let size = model.len() as u64;
    let mut rng = Rng::new(0x10AD);
    let mut hash = 0xCBF2_9CE4_8422_2325u64;
    for round in 0..4 {
        let mut pending = Vec::new();
        for _ in 0..5 {
            let mut cb = queue.command_buffer();
            let mut checks = Vec::new();
            for _ in 0..10 {
                let (offset, len, exact) = match rng.below(6) {
                    // Small, anywhere inside.
                    0 => {
                        let off = rng.below(size - 1);
                        (off, rng.range(1, 5000).min(size - off), true)
                    }
                    // Block-aligned.
                    1 => {
                        let off = 4096 * rng.below(size / 4096 - 40);
                        (off, 4096 * rng.range(1, 40), true)
                    }
                    // Large: many tasks.
                    2 => {
                        let len = rng.range(100_000, 400_000);
                        (rng.below(size - len), len, true)
                    }
                    // Crossing the end of the file.
                    3 => (
                        size - rng.range(1, 20_000),
                        rng.range(20_000, 60_000),
                        false,
                    ),
                    // Entirely past the end.
                    4 => (size + rng.below(10_000), rng.range(1, 9000), false),
                    // Up-to load that happens to fit.
                    _ => {
                        let off = rng.below(size / 2);
                        (off, rng.range(1, 70_000), false)
                    }
                };
                let len = len as usize;
                let at = pick_buf_offset(&mut rng);
                let cap = at + len + rng.below(2) as usize * 333;
                let buf = buf_with(cap, 0, &[], 0xA5);
                let id = cb
                    .load_range(file, offset, buf, at, len as u64, exact)
                    .map_err(|e| format!("recording load at {offset}+{len}: {e}"))?;
                let expect = len.min(size.saturating_sub(offset) as usize);
                checks.push(LoadCheck {
                    id,
                    offset,
                    len,
                    at,
                    cap,
                    expect,
                });
            }
            let c = cb.commit().map_err(|e| format!("commit loads: {e}"))?;
            pending.push((c, checks));
        }
        for (c, checks) in pending {
            let (status, mut done) = c.wait_parts();
            ok_or_status(status, &format!("loads, round {round}"))?;
            for k in checks {
                let what = format!("load at {}+{} into buffer offset {}", k.offset, k.len, k.at);
                let got = done.bytes(k.id) as usize;
                ensure!(
                    got == k.expect,
                    "{what}: {got} bytes, expected {}",
                    k.expect
                );
                let buf = done
                    .take_buffer(k.id)
                    .ok_or_else(|| format!("{what}: buffer not returned"))?;
                ensure!(buf.len() == k.cap, "{what}: buffer length changed");
                let data = &buf[k.at..k.at + got];
                let want = model_range(model, k.offset, got);
                if let Some(d) = first_diff(data, want) {
                    return Err(format!("{what}: {d}"));
                }
                let outside = buf[..k.at].iter().chain(&buf[k.at + k.len..]);
                ensure!(
                    outside.into_iter().all(|&b| b == 0xA5),
                    "{what}: bytes outside the load's range were written"
                );
                fnv(&mut hash, &k.offset.to_le_bytes());
                fnv(&mut hash, &(got as u64).to_le_bytes());
                fnv(&mut hash, data);
            }
        }
    }
    Ok(hash)
}

/// The whole test body for one configuration.
fn body(engine: &Engine, direct: Direct, dir: &Path, name: &str) -> Result<Run, String> {
    let path = dir.join(format!("{name}.bin"));
    let file = match direct
        .options(OpenOptions::create().truncate(true))
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if direct == Direct::On && e.kind() == ErrorKind::Unsupported => {
            return Ok(Run::Skipped(format!("O_DIRECT not possible here: {e}")))
        }
        Err(e) => return Err(format!("open: {e}")),
    };
    ensure!(
        file.is_direct() == (direct == Direct::On),
        "is_direct() is {} ({})",
        file.is_direct(),
        file.direct_reason()
    );
    if direct == Direct::Refused {
        ensure!(
            file.direct_reason().contains("simulated"),
            "direct_reason does not explain the refusal: {}",
            file.direct_reason()
        );
    }
    let queue = engine
        .queue(QueueDesc::default())
        .map_err(|e| format!("queue: {e}"))?;

    let mut model = pattern(0xF11E, FILE_BYTES as usize);
    store_tiles(&queue, &file, &model)?;
    store_overwrites(&queue, &file, &mut model)?;

    let len = file.len().map_err(|e| format!("len: {e}"))?;
    ensure!(
        len == model.len() as u64,
        "file is {len} bytes, model {}",
        model.len()
    );
    let on_disk = std::fs::read(&path).map_err(|e| format!("std::fs::read: {e}"))?;
    if let Some(d) = first_diff(&on_disk, &model) {
        return Err(format!(
            "file contents after the stores (std::fs::read): {d}"
        ));
    }

    let loads = random_loads(&queue, &file, &model)?;

    // The whole file in one load, memory not co-aligned with the file, asking for more than exists.
    let mut cb = queue.command_buffer();
    let want = model.len() + 10_000;
    let id = cb
        .load_range(
            &file,
            0,
            buf_with(want + 3, 0, &[], 0),
            3,
            want as u64,
            false,
        )
        .map_err(|e| format!("recording readback: {e}"))?;
    let (status, mut done) = cb
        .commit()
        .map_err(|e| format!("commit readback: {e}"))?
        .wait_parts();
    ok_or_status(status, "readback")?;
    ensure!(
        done.bytes(id) == model.len() as u64,
        "readback returned {} bytes, file has {}",
        done.bytes(id),
        model.len()
    );
    let buf = done.take_buffer(id).ok_or("readback buffer not returned")?;
    let readback = buf[3..3 + model.len()].to_vec();
    if let Some(d) = first_diff(&readback, &model) {
        return Err(format!("readback: {d}"));
    }
    Ok(Run::Done(Outcome { readback, loads }))
}

#[test]
fn every_configuration_returns_the_same_bytes() {
    let places = places();
    let mut results: Vec<(String, Outcome)> = Vec::new();
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    for backend in BACKENDS {
        let engine = match engine_for(backend) {
            Ok(e) => e,
            Err(why) => {
                skipped.push(format!("{}: {why}", backend_name(backend)));
                continue;
            }
        };
        for (place, dir) in &places {
            for direct in Direct::ALL {
                let label = format!("{}/{}/{place}", backend_name(backend), direct.name());
                let name = label.replace('/', "-");
                match body(&engine, direct, dir.path(), &name) {
                    Ok(Run::Done(o)) => results.push((label, o)),
                    Ok(Run::Skipped(why)) => skipped.push(format!("{label}: {why}")),
                    Err(e) => failures.push(format!("[{label}] {e}")),
                }
            }
        }
    }
    for s in &skipped {
        eprintln!("skipped {s}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} configurations failed:\n{}",
        failures.len(),
        failures.len() + results.len(),
        failures.join("\n")
    );
    // The model is the same for every run, so every run must have read exactly the same bytes.
    let (first_label, first) = results.first().expect("at least one configuration ran");
    for (label, o) in &results[1..] {
        assert!(
            o == first,
            "[{label}] read different bytes than [{first_label}]"
        );
    }
    // Threads and mmap always work; every direct mode must have run on the root filesystem for them.
    for need in [
        "threads/direct-off/tmp",
        "threads/direct-refused/tmp",
        "mmap/direct-off/tmp",
    ] {
        assert!(
            results.iter().any(|(l, _)| l == need),
            "configuration {need} did not run"
        );
    }
    eprintln!(
        "{} configurations ran and agreed: {}",
        results.len(),
        results
            .iter()
            .map(|(l, _)| l.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

// ---------------------------------------------------------------------------------------------------
// Proptest: random loads and stores against a Vec<u8> model.

#[derive(Debug, Clone)]
enum Op {
    Store {
        offset: u64,
        len: usize,
        buf_offset: usize,
        seed: u64,
    },
    Load {
        offset: u64,
        len: usize,
        buf_offset: usize,
        exact: bool,
    },
}

fn offset_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![(0u64..64).prop_map(|k| k * 4096), 0u64..300_000]
}
fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        (1usize..40).prop_map(|k| k * 4096),
        0usize..70_000,
        0usize..600
    ]
}
fn buf_offset_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(4096), 1usize..4096]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            offset_strategy(),
            len_strategy(),
            buf_offset_strategy(),
            any::<u64>()
        )
            .prop_map(|(offset, len, buf_offset, seed)| Op::Store {
                offset,
                len,
                buf_offset,
                seed
            }),
        (
            offset_strategy(),
            len_strategy(),
            buf_offset_strategy(),
            any::<bool>()
        )
            .prop_map(|(offset, len, buf_offset, exact)| Op::Load {
                offset,
                len,
                buf_offset,
                exact
            }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    backend: usize,
    direct: Direct,
    initial_len: usize,
    /// All ops in one command buffer separated by barriers, or one command buffer per op.
    batched: bool,
    ops: Vec<Op>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        0usize..3,
        prop_oneof![Just(Direct::On), Just(Direct::Off), Just(Direct::Refused)],
        prop_oneof![Just(0usize), 0usize..200_000],
        any::<bool>(),
        prop::collection::vec(op_strategy(), 1..10),
    )
        .prop_map(|(backend, direct, initial_len, batched, ops)| Case {
            backend,
            direct,
            initial_len,
            batched,
            ops,
        })
}

/// What an op should do, given the model before it.
enum Expect {
    Bytes(usize),
    Eof,
}

fn run_case(
    engines: &[Option<Engine>],
    dir: &Path,
    counter: &AtomicU64,
    case: &Case,
) -> Result<(), TestCaseError> {
    let Some(engine) = engines[case.backend]
        .as_ref()
        .or_else(|| engines.iter().flatten().next())
    else {
        return Ok(());
    };
    let path: PathBuf = dir.join(format!("case-{}", counter.fetch_add(1, Ordering::Relaxed)));
    let mut model = pattern(case.initial_len as u64, case.initial_len);
    std::fs::write(&path, &model).unwrap();
    let file = match case.direct.options(OpenOptions::read_write()).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::Unsupported => OpenOptions::read_write().open(&path)?,
        Err(e) => return Err(TestCaseError::fail(format!("open: {e}"))),
    };
    let queue = engine.queue(QueueDesc::default())?;

    // Record, and work out what each op should produce.
    let mut cbs = vec![queue.command_buffer()];
    let mut expected = Vec::new();
    for op in &case.ops {
        if !case.batched && !cbs.last().unwrap().is_empty() {
            cbs.push(queue.command_buffer());
        }
        let cb = cbs.last_mut().unwrap();
        match *op {
            Op::Store {
                offset,
                len,
                buf_offset,
                seed,
            } => {
                let data = pattern(seed, len);
                let buf = buf_with(buf_offset + len, buf_offset, &data, 0x77);
                let id = cb.store_range(&file, offset, buf, buf_offset, len as u64)?;
                expected.push((id, Expect::Bytes(len), Some((offset, data))));
            }
            Op::Load {
                offset,
                len,
                buf_offset,
                exact,
            } => {
                let buf = buf_with(buf_offset + len, 0, &[], 0x33);
                let id = cb.load_range(&file, offset, buf, buf_offset, len as u64, exact)?;
                let avail = (model.len() as u64).saturating_sub(offset) as usize;
                let e = if exact && len > avail {
                    Expect::Eof
                } else {
                    Expect::Bytes(len.min(avail))
                };
                expected.push((id, e, None));
            }
        }
        // Keep the model up to date as we go, assuming success (a failure stops the batch below).
        if let Some((_, Expect::Bytes(_), Some((offset, data)))) = expected.last() {
            if !data.is_empty() {
                let end = *offset as usize + data.len();
                if end > model.len() {
                    model.resize(end, 0);
                }
                model[*offset as usize..end].copy_from_slice(data);
            }
        }
        if case.batched {
            cbs.last_mut().unwrap().barrier();
        }
    }
    // The model above assumed every store ran; rebuild it while checking, honouring failures.
    let mut model = pattern(case.initial_len as u64, case.initial_len);
    let mut op_index = 0;
    let mut stopped = false;
    for cb in cbs {
        let (status, mut done) = cb.commit()?.wait_parts();
        let errors = match &status {
            Status::Complete => Vec::new(),
            Status::Error(v) => v.clone(),
            other => return Err(TestCaseError::fail(format!("status {other:?}"))),
        };
        let n = if case.batched { case.ops.len() } else { 1 };
        for (id, expect, store) in &expected[op_index..op_index + n] {
            let err = errors
                .iter()
                .find(|e| e.command == *id)
                .map(|e| e.error.kind());
            let op = &case.ops[op_index + id.index()];
            if stopped {
                prop_assert_eq!(err, Some(ErrorKind::Cancelled), "{:?} after a failure", op);
                continue;
            }
            match expect {
                Expect::Eof => {
                    prop_assert_eq!(err, Some(ErrorKind::UnexpectedEof), "{:?}", op);
                    // Commands after a failed one's barrier are skipped.
                    stopped = case.batched;
                }
                Expect::Bytes(n) => {
                    prop_assert_eq!(err, None, "{:?}", op);
                    prop_assert_eq!(done.bytes(*id), *n as u64, "{:?}", op);
                    match (op, store) {
                        (_, Some((offset, data))) => {
                            if !data.is_empty() {
                                let end = *offset as usize + data.len();
                                if end > model.len() {
                                    model.resize(end, 0);
                                }
                                model[*offset as usize..end].copy_from_slice(data);
                            }
                        }
                        (
                            Op::Load {
                                offset, buf_offset, ..
                            },
                            None,
                        ) => {
                            let buf = done.take_buffer(*id).expect("load buffer returned");
                            let got = &buf[*buf_offset..*buf_offset + n];
                            let want = model_range(&model, *offset, *n);
                            prop_assert!(
                                got == want,
                                "{:?}: {}",
                                op,
                                first_diff(got, want).unwrap_or_default()
                            );
                        }
                        _ => unreachable!(),
                    }
                }
            }
        }
        op_index += n;
    }
    prop_assert_eq!(file.len()?, model.len() as u64);
    let on_disk = std::fs::read(&path).unwrap();
    prop_assert!(
        on_disk == model,
        "file contents: {}",
        first_diff(&on_disk, &model).unwrap_or_default()
    );
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

#[test]
fn random_loads_and_stores_match_a_model() {
    let engines: Vec<Option<Engine>> = BACKENDS
        .iter()
        .map(|&b| match engine_for(b) {
            Ok(e) => Some(e),
            Err(why) => {
                eprintln!("skipped {}: {why}", backend_name(b));
                None
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let counter = AtomicU64::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&case_strategy(), |case| {
        run_case(&engines, dir.path(), &counter, &case)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
