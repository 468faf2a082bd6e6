//! Fault injection through the whole engine (STYLE items 7, 10, 11).
//!
//! Every test runs a real engine over a [`FaultBackend`] wrapping a real backend (io_uring where the
//! kernel allows it, the thread pool always; mmap in the random run), against direct files on `/tmp`
//! (ext4) and buffered ones (`/dev/shm`, `--direct off`, and a simulated O_DIRECT refusal).
//!
//! The random run checks each command against a byte model of the file: a command either returns
//! exactly the right bytes or fails with a typed error naming the file and an offset, and every I/O
//! error is matched to the fault that caused it. The specific tests pin down each errno's meaning:
//! EINTR/EAGAIN and short transfers are hidden (and counted), persistent EAGAIN exhausts the retries,
//! ENOSPC is `NoSpace`, EIO is `Io` with the offset. Every test also asserts that its faults fired.
//!
//! Reproduce one random run with `GPUIO_FAULT_SEED=<seed>` (add `GPUIO_FAULT_TRACE=1` to print each
//! step's commands); run more seeds per backend with `GPUIO_FAULT_SEEDS=<count>`. A seed fixes the
//! workload and the plan; which request each fault hits can still vary with thread timing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpuio::backend::{BackendKind, IoOp};
use gpuio::error::Op;
use gpuio::{
    AlignedBuf, Completion, DirectMode, EngineConfig, Error, ErrorKind, File, Finished, IoQueue,
    OpenOptions, Priority, QueueDesc, QueueKind, Status,
};
use gpuio_testkit::verify::Header;
use gpuio_testkit::{
    faulty_engine_with, kind_works, scratch_dir, test_config, Fault, FaultCounts, FaultHandle,
    FaultPlan, Injection, Pattern, Place, Problem, Rng,
};

/// Far longer than any command here needs; reaching it means a hang.
const WAIT: Duration = Duration::from_secs(60);
const BLOCK: usize = 4096;

// ---------------------------------------------------------------------------------------------------
// Setup.

/// How the test file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// On /tmp (ext4): O_DIRECT.
    Direct,
    /// On /tmp with direct I/O turned off.
    Buffered,
    /// On /dev/shm (tmpfs), direct if the kernel's tmpfs takes it.
    Shm,
    /// On /tmp, O_DIRECT refused (simulated): the buffered fallback.
    Refused,
}

impl Mode {
    fn place(self) -> Place {
        if self == Mode::Shm {
            Place::Shm
        } else {
            Place::Disk
        }
    }
    fn open(self, path: &Path) -> File {
        let o = OpenOptions::create();
        let o = match self {
            Mode::Direct | Mode::Shm => o.direct(DirectMode::Auto),
            Mode::Buffered => o.direct(DirectMode::Off),
            Mode::Refused => o.simulate_direct_refusal(),
        };
        let f = o.open(path).unwrap();
        if self == Mode::Direct {
            assert!(
                f.is_direct(),
                "{}: expected O_DIRECT on the temporary directory: {}",
                path.display(),
                f.direct_reason()
            );
        }
        f
    }
}

/// The inner backends the specific tests run on.
fn kinds() -> Vec<BackendKind> {
    let kinds: Vec<BackendKind> = [BackendKind::Uring, BackendKind::Threads]
        .into_iter()
        .filter(|&k| kind_works(k))
        .collect();
    assert!(kinds.contains(&BackendKind::Threads));
    kinds
}

/// A faulty engine, one queue on it, and a file holding `initial`.
struct Scenario {
    label: String,
    queue: IoQueue,
    faults: FaultHandle,
    path: PathBuf,
    file: File,
    _dir: tempfile::TempDir,
}

fn scenario(
    kind: BackendKind,
    mode: Mode,
    seed: u64,
    plan: FaultPlan,
    config: EngineConfig,
    desc: QueueDesc,
    initial: &[u8],
) -> Scenario {
    let dir = scratch_dir(mode.place());
    let path = dir.path().join("data.bin");
    std::fs::write(&path, initial).unwrap();
    let file = mode.open(&path);
    let mut config = config;
    config.backend.choice = gpuio_testkit::choice_for(kind);
    let (engine, faults) = faulty_engine_with(config, seed, plan).unwrap();
    let queue = engine.queue(desc).unwrap();
    Scenario {
        label: format!("{kind}/{mode:?}/seed {seed}"),
        queue,
        faults,
        path,
        file,
        _dir: dir,
    }
}

/// Waits for a command buffer, failing the test (instead of hanging) if it never finishes.
fn finish(c: Completion, what: &str) -> (Status, Finished) {
    if c.wait_timeout(WAIT).is_none() {
        panic!("{what}: command buffer still pending after {WAIT:?}: the engine hangs");
    }
    c.wait_parts()
}

/// The errors of a finished command buffer, by command index.
fn errors_of(status: &Status, what: &str) -> HashMap<usize, Error> {
    match status {
        Status::Complete => HashMap::new(),
        Status::Error(v) => v
            .iter()
            .map(|e| (e.command.index(), e.error.clone()))
            .collect(),
        other => panic!("{what}: unexpected final status {other:?}"),
    }
}

/// A buffer of `pad + len` bytes whose bytes `pad..` hold `data` (so memory can start unaligned).
fn buf_with(pad: usize, data: &[u8]) -> AlignedBuf {
    let mut b = AlignedBuf::new(pad + data.len(), BLOCK).unwrap();
    b[pad..].copy_from_slice(data);
    b
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Describes where `found` (read at `file_offset`) differs from `expected`, with the verify header of
/// the block there when the buffer holds it: a stale or misdirected block then says so.
fn mismatch(found: &[u8], expected: &[u8], file_offset: u64) -> String {
    let Some(i) = first_diff(found, expected) else {
        return format!(
            "lengths differ: {} bytes found, {} expected",
            found.len(),
            expected.len()
        );
    };
    let at = file_offset + i as u64;
    let block = at - at % BLOCK as u64;
    let header = (block >= file_offset)
        .then(|| (block - file_offset) as usize)
        .and_then(|s| found.get(s..s + gpuio_testkit::verify::HEADER_LEN))
        .map(Header::decode);
    format!(
        "first difference at file offset {at}: found {:#04x}, expected {:#04x}; header of the block \
         at {block} as read: {header:?}",
        found[i], expected[i]
    )
}

/// Checks an I/O error against the injection that must have caused it: same file, offset, errno.
fn assert_injected(e: &Error, path: &Path, log: &[Injection], what: &str) {
    let errno = e
        .errno()
        .unwrap_or_else(|| panic!("{what}: {e} carries no errno"));
    let op = match e.op() {
        Some(Op::Read) => IoOp::Read,
        Some(Op::Write) => IoOp::Write,
        Some(Op::Sync) => IoOp::Sync,
        other => panic!("{what}: {e} has operation {other:?}"),
    };
    let found = log.iter().any(|inj| {
        inj.path == path
            && inj.op == op
            && Some(inj.offset) == e.offset()
            && matches!(inj.fault, Fault::Errno { errno: x, .. } if x == errno)
    });
    assert!(
        found,
        "{what}: error {e:?} matches no injected fault; injected: {log:#?}"
    );
}

/// Every error a user sees names the file and an offset.
fn assert_names_file(e: &Error, path: &Path, what: &str) {
    assert_eq!(e.path(), Some(path), "{what}: {e} does not name the file");
    assert!(e.offset().is_some(), "{what}: {e} names no offset");
    let shown = e.to_string();
    assert!(
        shown.contains(&path.display().to_string()) && shown.contains("at offset"),
        "{what}: message lacks file or offset: {shown}"
    );
}

// ---------------------------------------------------------------------------------------------------
// The random, model-checked run.

#[derive(Debug, Clone)]
enum Cmd {
    Load {
        offset: u64,
        len: usize,
        exact: bool,
        pad: usize,
    },
    Store {
        offset: u64,
        data: Vec<u8>,
        pad: usize,
    },
    Sync,
}

/// What the random runs of one backend did, to prove that faults fired and each outcome occurred.
#[derive(Debug, Default)]
struct Tally {
    seeds: u64,
    commands_ok: u64,
    failures: HashMap<ErrorKind, u64>,
    counts: FaultCounts,
    retries: u64,
    short_transfers: u64,
    direct_fallbacks: u64,
}

impl Tally {
    fn add_counts(&mut self, c: &FaultCounts) {
        let t = &mut self.counts;
        t.ops += c.ops;
        t.reads += c.reads;
        t.writes += c.writes;
        t.syncs += c.syncs;
        t.read_eio += c.read_eio;
        t.write_enospc += c.write_enospc;
        t.write_eio += c.write_eio;
        t.sync_eio += c.sync_eio;
        t.eintr += c.eintr;
        t.eagain += c.eagain;
        t.direct_einval += c.direct_einval;
        t.short_reads += c.short_reads;
        t.short_writes += c.short_writes;
        t.delays += c.delays;
        t.nth_failures += c.nth_failures;
    }
    fn failed(&self, k: ErrorKind) -> u64 {
        self.failures.get(&k).copied().unwrap_or(0)
    }
}

fn pick_len(rng: &mut Rng) -> usize {
    (match rng.below(7) {
        0 => rng.range(0, 64),
        1 => rng.range(1, 4097),
        2 => BLOCK as u64 * rng.range(1, 9),
        3 => rng.range(1, 70_000),
        4 => BLOCK as u64 * rng.range(1, 40),
        5 => rng.range(4000, 9000),
        _ => rng.range(1, 200_000),
    }) as usize
}

fn pick_offset(rng: &mut Rng, file_len: usize) -> u64 {
    let len = file_len as u64;
    match rng.below(6) {
        0 | 1 => BLOCK as u64 * rng.below(len / BLOCK as u64 + 2),
        2 => rng.below(len + 1),
        3 => len.saturating_sub(rng.below(6000)) + rng.below(3000),
        4 => len + rng.below(20_000),
        _ => rng.below(len + 8192),
    }
}

fn pick_pad(rng: &mut Rng) -> usize {
    match rng.below(8) {
        0..=4 => 0,
        5 => 512 * rng.range(1, 8) as usize,
        _ => rng.range(1, BLOCK as u64) as usize,
    }
}

/// Largest file the random run grows.
const FILE_MAX: u64 = 1 << 20;
/// Command buffers per seed.
const STEPS: usize = 10;

/// After a store failed, the file must hold, at each byte of the store's range, either the old byte or
/// the new one, and be unchanged elsewhere; its length may have grown up to the store's end. The model
/// then takes what the file holds.
fn resync(model: &mut Vec<u8>, path: &Path, offset: u64, data: &[u8], what: &str) {
    let actual = std::fs::read(path).unwrap();
    let start = offset as usize;
    let end = start + data.len();
    assert!(
        actual.len() >= model.len() && actual.len() <= model.len().max(end),
        "{what}: after a failed store of {start}..{end} the file has {} bytes (was {})",
        actual.len(),
        model.len()
    );
    for (i, &b) in actual.iter().enumerate() {
        let old = model.get(i).copied().unwrap_or(0);
        let new = (start..end).contains(&i).then(|| data[i - start]);
        assert!(
            b == old || Some(b) == new,
            "{what}: after a failed store of {start}..{end}, byte {i} is {b:#04x}: neither the old \
             {old:#04x} nor the new {new:?}"
        );
    }
    *model = actual;
}

fn random_run(seed: u64, kind: BackendKind, tally: &mut Tally) {
    let mut rng = Rng::new(seed);
    let mode = *rng.pick(&[
        Mode::Direct,
        Mode::Direct,
        Mode::Buffered,
        Mode::Shm,
        Mode::Refused,
    ]);
    // Benign plans (transients at most 20% per attempt, so the 8 retries do not run out) must be
    // invisible; chaos plans also fail commands.
    let benign = rng.chance(0.35);
    let p = 0.02 + rng.below(19) as f64 / 100.0;
    let mut plan = if benign {
        FaultPlan::benign(p)
    } else {
        FaultPlan::chaos(p, 0.01 + rng.below(8) as f64 / 100.0)
    };
    plan.delay_max = Duration::from_micros(rng.range(50, 2000));
    let mut config = test_config(kind);
    config.backend.queue_depth = *rng.pick(&[1, 4, 16, 32]);
    config.task_size_bytes = *rng.pick(&[16 << 10, 64 << 10]);
    config.bounce_buffers = *rng.pick(&[1, 2, 8]);
    let desc = QueueDesc {
        kind: *rng.pick(&[QueueKind::Serial, QueueKind::Concurrent]),
        priority: *rng.pick(&[Priority::Low, Priority::Normal, Priority::High]),
        command_buffers_max: 4,
        bytes_in_flight_max: *rng.pick(&[32 << 10, 256 << 10, 256 << 20]),
    };
    let pattern = Pattern::new(BLOCK, seed);
    let init_len = match rng.below(4) {
        0 => 0,
        1 => BLOCK * rng.range(1, 64) as usize,
        _ => rng.range(1, 300_000) as usize,
    };
    let mut model = pattern.bytes(0, init_len, 0);
    let s = scenario(kind, mode, seed, plan, config, desc, &model);
    let label = format!(
        "{} ({} plan p={p:.2}, {:?})",
        s.label,
        if benign { "benign" } else { "chaos" },
        plan
    );

    for step in 0..STEPS {
        let what = format!("{label}, step {step}");
        let mut cmds: Vec<Cmd> = Vec::new();
        let mut barrier_at = None;
        match rng.below(10) {
            0..=5 => {
                for _ in 0..rng.range(1, 5) {
                    cmds.push(Cmd::Load {
                        offset: pick_offset(&mut rng, model.len()),
                        len: pick_len(&mut rng),
                        exact: rng.chance(0.6),
                        pad: pick_pad(&mut rng),
                    });
                }
            }
            r => {
                let offset = pick_offset(&mut rng, model.len()).min(FILE_MAX);
                let len = pick_len(&mut rng).min((FILE_MAX + 8192 - offset) as usize);
                let data = pattern.bytes(offset, len, step as u64 + 1);
                cmds.push(Cmd::Store {
                    offset,
                    data,
                    pad: pick_pad(&mut rng),
                });
                if r == 9 {
                    barrier_at = Some(1);
                    cmds.push(Cmd::Sync);
                } else if rng.chance(0.5) {
                    barrier_at = Some(1);
                    cmds.push(Cmd::Load {
                        offset,
                        len,
                        exact: rng.chance(0.5),
                        pad: pick_pad(&mut rng),
                    });
                }
            }
        }

        if std::env::var("GPUIO_FAULT_TRACE").is_ok() {
            let c: Vec<String> = cmds.iter().map(short).collect();
            eprintln!("step {step}: {c:?} model len {}", model.len());
        }
        let mut cb = s.queue.command_buffer();
        let mut ids = Vec::new();
        for (i, cmd) in cmds.iter().enumerate() {
            if barrier_at == Some(i) {
                cb.barrier();
            }
            let id = match cmd {
                Cmd::Load {
                    offset,
                    len,
                    exact,
                    pad,
                } => {
                    let buf = AlignedBuf::new(pad + len, BLOCK).unwrap();
                    cb.load_range(&s.file, *offset, buf, *pad, *len as u64, *exact)
                }
                Cmd::Store { offset, data, pad } => cb.store_range(
                    &s.file,
                    *offset,
                    buf_with(*pad, data),
                    *pad,
                    data.len() as u64,
                ),
                Cmd::Sync => cb.sync(&s.file),
            };
            ids.push(id.unwrap());
        }
        let (status, mut fin) = finish(cb.commit().unwrap(), &what);
        let errors = errors_of(&status, &what);
        let log = s.faults.take_log();
        let counts = s.faults.counts();

        let mut failed_before_barrier = false;
        for (i, cmd) in cmds.iter().enumerate() {
            let what = format!("{what}, command {i} {}", short(cmd));
            let err = errors.get(&i);
            if barrier_at.is_some_and(|b| i >= b) && failed_before_barrier {
                let e = err.unwrap_or_else(|| {
                    panic!("{what}: ran although a command before its barrier failed")
                });
                assert_eq!(e.kind(), ErrorKind::Cancelled, "{what}: {e}");
                *tally.failures.entry(ErrorKind::Cancelled).or_default() += 1;
                continue;
            }
            if let Some(e) = err {
                *tally.failures.entry(e.kind()).or_default() += 1;
                if barrier_at.is_some_and(|b| i < b) {
                    failed_before_barrier = true;
                }
                assert_names_file(e, &s.path, &what);
                match e.kind() {
                    ErrorKind::UnexpectedEof => {}
                    _ if benign => {
                        panic!("{what}: a benign plan failed a command: {e:?}; injected: {log:#?}")
                    }
                    ErrorKind::Io | ErrorKind::NoSpace => assert_injected(e, &s.path, &log, &what),
                    ErrorKind::RetriesExhausted => {
                        if e.errno().is_some() {
                            assert_injected(e, &s.path, &log, &what);
                        } else {
                            assert!(counts.shorts() > 0, "{what}: {e:?} without short transfers");
                        }
                    }
                    _ => panic!("{what}: unexpected error kind: {e:?}"),
                }
            } else {
                tally.commands_ok += 1;
            }
            match cmd {
                Cmd::Load {
                    offset,
                    len,
                    exact,
                    pad,
                } => {
                    let start = (*offset as usize).min(model.len());
                    let end = (*offset as usize + len).min(model.len());
                    let past_eof = *len > 0 && *offset as usize + len > model.len();
                    match err {
                        Some(e) if e.kind() == ErrorKind::UnexpectedEof => {
                            assert!(*exact && past_eof, "{what}: {e:?} within the file");
                            assert_eq!(e.offset(), Some(*offset), "{what}: {e:?}");
                        }
                        Some(_) => {}
                        None => {
                            assert!(
                                !(*exact && past_eof),
                                "{what}: an exact load past the end of the {}-byte file succeeded",
                                model.len()
                            );
                            let n = fin.bytes(ids[i]) as usize;
                            assert_eq!(n, end - start, "{what}: bytes loaded");
                            let buf = fin.take_buffer(ids[i]).unwrap();
                            let got = &buf[*pad..*pad + n];
                            let want = &model[start..end];
                            assert!(got == want, "{what}: {}", mismatch(got, want, *offset));
                        }
                    }
                }
                Cmd::Store { offset, data, .. } => match err {
                    None => {
                        let start = *offset as usize;
                        if !data.is_empty() {
                            if model.len() < start + data.len() {
                                model.resize(start + data.len(), 0);
                            }
                            model[start..start + data.len()].copy_from_slice(data);
                        }
                    }
                    Some(_) => resync(&mut model, &s.path, *offset, data, &what),
                },
                Cmd::Sync => {}
            }
        }
    }

    // What the engine wrote is what the model holds, read back outside the engine.
    let on_disk = std::fs::read(&s.path).unwrap();
    assert!(
        on_disk == model,
        "{label}: file differs from the model ({} vs {} bytes): {}",
        on_disk.len(),
        model.len(),
        mismatch(&on_disk, &model, 0)
    );
    let stats = s.queue.stats();
    tally.seeds += 1;
    tally.add_counts(&s.faults.counts());
    tally.retries += stats.retries;
    tally.short_transfers += stats.short_transfers;
    tally.direct_fallbacks += stats.direct_fallbacks;
}

fn short(cmd: &Cmd) -> String {
    match cmd {
        Cmd::Load {
            offset,
            len,
            exact,
            pad,
        } => format!(
            "{} {offset}+{len} (memory +{pad})",
            if *exact { "load" } else { "load_upto" }
        ),
        Cmd::Store { offset, data, pad } => {
            format!("store {offset}+{} (memory +{pad})", data.len())
        }
        Cmd::Sync => "sync".into(),
    }
}

/// Runs the random scenario for `count` seeds from `first` (or the one in `GPUIO_FAULT_SEED`) and
/// checks that every kind of fault and outcome occurred.
fn random_runs(kind: BackendKind, first: u64, count: u64) {
    if !kind_works(kind) {
        eprintln!("{kind} does not start here; skipping its random fault runs");
        return;
    }
    let mut tally = Tally::default();
    if let Some(seed) = std::env::var("GPUIO_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        random_run(seed, kind, &mut tally);
        eprintln!("{kind}: seed {seed}: {tally:?}");
        return;
    }
    let count = std::env::var("GPUIO_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(count);
    for seed in first..first + count {
        random_run(seed, kind, &mut tally);
    }
    eprintln!("{kind}: {tally:#?}");
    // A fault test in which no fault fired proves nothing.
    let c = &tally.counts;
    assert!(
        c.read_eio > 0 && c.write_eio + c.write_enospc > 0,
        "{tally:#?}"
    );
    assert!(
        c.transients() > 0 && c.shorts() > 0 && c.delays > 0,
        "{tally:#?}"
    );
    assert!(tally.retries > 0 && tally.short_transfers > 0, "{tally:#?}");
    assert!(tally.commands_ok > tally.seeds, "{tally:#?}");
    for k in [ErrorKind::Io, ErrorKind::NoSpace, ErrorKind::UnexpectedEof] {
        assert!(
            tally.failed(k) > 0,
            "no command failed with {k:?}: {tally:#?}"
        );
    }
}

#[test]
fn random_loads_and_stores_through_faulty_uring() {
    random_runs(BackendKind::Uring, 1_000, 150);
}

#[test]
fn random_loads_and_stores_through_faulty_threads() {
    random_runs(BackendKind::Threads, 2_000, 150);
}

#[test]
fn random_loads_and_stores_through_faulty_mmap() {
    random_runs(BackendKind::Mmap, 3_000, 60);
}

// ---------------------------------------------------------------------------------------------------
// Specific faults, each alone.

/// A file of `len` pattern bytes (generation 0) in `mode`, and a faulty engine of `kind` over it.
fn pattern_scenario(
    kind: BackendKind,
    mode: Mode,
    plan: FaultPlan,
    config: EngineConfig,
    len: usize,
) -> (Scenario, Pattern) {
    let pattern = Pattern::new(BLOCK, 77);
    let s = scenario(
        kind,
        mode,
        77,
        plan,
        config,
        QueueDesc::default(),
        &pattern.bytes(0, len, 0),
    );
    (s, pattern)
}

/// Stores, a barrier, then loads that read everything back (exact and up to past the end), checking
/// every byte; returns the model of the file afterwards.
fn store_and_load_back(s: &Scenario, pattern: &Pattern, len: usize) -> Vec<u8> {
    let mut model = pattern.bytes(0, len, 0);
    let stores: [(u64, usize, usize); 3] = [
        (5_000, 100_000, 1_073),
        (200_704, 65_536, 0),
        (len as u64 - 700, 2_000, 512),
    ];
    let mut cb = s.queue.command_buffer();
    for &(off, n, pad) in &stores {
        let data = pattern.bytes(off, n, 1);
        cb.store_range(&s.file, off, buf_with(pad, &data), pad, n as u64)
            .unwrap();
        let end = off as usize + n;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&data);
    }
    cb.barrier();
    let all = cb
        .load(&s.file, 0, AlignedBuf::new(model.len(), BLOCK).unwrap())
        .unwrap();
    let upto = cb
        .load_range(
            &s.file,
            290_000,
            AlignedBuf::new(60_000 + 3, BLOCK).unwrap(),
            3,
            60_000,
            false,
        )
        .unwrap();
    let (status, mut fin) = finish(cb.commit().unwrap(), &s.label);
    assert!(status.is_complete(), "{}: {status:?}", s.label);
    let buf = fin.take_buffer(all).unwrap();
    assert!(
        buf[..] == model[..],
        "{}: {}",
        s.label,
        mismatch(&buf, &model, 0)
    );
    let n = fin.bytes(upto) as usize;
    assert_eq!(n, model.len() - 290_000, "{}", s.label);
    let buf = fin.take_buffer(upto).unwrap();
    assert!(
        buf[3..3 + n] == model[290_000..],
        "{}: {}",
        s.label,
        mismatch(&buf[3..3 + n], &model[290_000..], 290_000)
    );
    // The bytes on disk, read outside the engine, verify as the pattern generations written.
    let on_disk = std::fs::read(&s.path).unwrap();
    assert!(
        on_disk == model,
        "{}: {}",
        s.label,
        mismatch(&on_disk, &model, 0)
    );
    pattern
        .verify(&on_disk[..4096], 0, 0)
        .unwrap_or_else(|e| panic!("{}: {e}", s.label));
    pattern
        .verify(&on_disk[204_800..266_240], 204_800, 1)
        .unwrap_or_else(|e| panic!("{}: {e}", s.label));
    model
}

const FILE_LEN: usize = 300_001;

#[test]
fn transients_alone_are_retried_transparently() {
    for kind in kinds() {
        for mode in [Mode::Direct, Mode::Shm, Mode::Buffered] {
            let plan = FaultPlan::none().with_eintr(0.2).with_eagain(0.2);
            let mut config = test_config(kind);
            // 40% per attempt: 33 retries make running out impossible in practice.
            config.retries_max = 32;
            let (s, pattern) = pattern_scenario(kind, mode, plan, config, FILE_LEN);
            store_and_load_back(&s, &pattern, FILE_LEN);
            let c = s.faults.counts();
            let stats = s.queue.stats();
            assert!(c.eintr > 0 && c.eagain > 0, "{}: {c:?}", s.label);
            // Each injected transient was retried, and nothing else was.
            assert_eq!(stats.retries, c.transients(), "{}: {c:?}", s.label);
            assert_eq!(stats.ops, c.ops, "{}", s.label);
        }
    }
}

#[test]
fn short_transfers_alone_are_continued() {
    for kind in kinds() {
        for mode in [Mode::Direct, Mode::Shm, Mode::Buffered] {
            let plan = FaultPlan::none().with_short_read(0.5).with_short_write(0.5);
            let (s, pattern) = pattern_scenario(kind, mode, plan, test_config(kind), FILE_LEN);
            store_and_load_back(&s, &pattern, FILE_LEN);
            let c = s.faults.counts();
            let stats = s.queue.stats();
            assert!(
                c.short_reads > 0 && c.short_writes > 0,
                "{}: {c:?}",
                s.label
            );
            assert!(
                stats.short_transfers >= c.short_writes,
                "{}: {stats:?} {c:?}",
                s.label
            );
            assert_eq!(stats.retries, 0, "{}", s.label);
        }
    }
}

#[test]
fn delays_lose_and_mix_up_no_completions() {
    for kind in kinds() {
        let plan = FaultPlan::none().with_delay(0.7, Duration::from_millis(3));
        let (s, pattern) = pattern_scenario(kind, Mode::Direct, plan, test_config(kind), FILE_LEN);
        store_and_load_back(&s, &pattern, FILE_LEN);
        assert!(s.faults.counts().delays > 0, "{}", s.label);
    }
}

#[test]
fn direct_einval_falls_back_to_buffered() {
    for kind in kinds() {
        let plan = FaultPlan::none().with_direct_einval(1.0);
        let (s, pattern) = pattern_scenario(kind, Mode::Direct, plan, test_config(kind), FILE_LEN);
        store_and_load_back(&s, &pattern, FILE_LEN);
        let c = s.faults.counts();
        assert!(c.direct_einval > 0, "{}: {c:?}", s.label);
        assert_eq!(
            s.queue.stats().direct_fallbacks,
            c.direct_einval,
            "{}",
            s.label
        );
    }
}

/// Runs one command buffer holding one load or store and returns its error.
fn one_command_error(s: &Scenario, store: bool, offset: u64, len: usize) -> Error {
    let mut cb = s.queue.command_buffer();
    if store {
        cb.store(&s.file, offset, buf_with(0, &vec![0xAB; len]))
            .unwrap();
    } else {
        cb.load(&s.file, offset, AlignedBuf::new(len, BLOCK).unwrap())
            .unwrap();
    }
    let (status, _) = finish(cb.commit().unwrap(), &s.label);
    let errors = errors_of(&status, &s.label);
    assert_eq!(errors.len(), 1, "{}: {status:?}", s.label);
    errors[&0].clone()
}

#[test]
fn persistent_eagain_and_eintr_exhaust_retries() {
    for kind in kinds() {
        for mode in [Mode::Direct, Mode::Shm] {
            for (errno, plan) in [
                (libc::EAGAIN, FaultPlan::none().with_eagain(1.0)),
                (libc::EINTR, FaultPlan::none().with_eintr(1.0)),
            ] {
                let config = test_config(kind);
                let retries_max = config.retries_max;
                let (s, _) = pattern_scenario(kind, mode, plan, config, FILE_LEN);
                for (store, offset, len) in [(false, 8192, 4096), (true, 100, 10)] {
                    let what = format!("{}, errno {errno}, store {store}", s.label);
                    s.queue.reset_stats();
                    s.faults.reset();
                    let e = one_command_error(&s, store, offset, len);
                    assert_eq!(e.kind(), ErrorKind::RetriesExhausted, "{what}: {e:?}");
                    assert_eq!(e.errno(), Some(errno), "{what}: {e:?}");
                    assert_names_file(&e, &s.path, &what);
                    assert_eq!(e.offset(), Some(offset), "{what}: {e:?}");
                    // Bounded: exactly retries_max retries, then the error.
                    assert_eq!(s.queue.stats().retries, u64::from(retries_max), "{what}");
                    assert_eq!(
                        s.faults.counts().transients(),
                        u64::from(retries_max) + 1,
                        "{what}"
                    );
                }
            }
        }
    }
}

#[test]
fn enospc_on_store_is_no_space_naming_the_file() {
    for kind in kinds() {
        for mode in [Mode::Direct, Mode::Shm] {
            let plan = FaultPlan::none().with_write_enospc(1.0);
            let (s, pattern) = pattern_scenario(kind, mode, plan, test_config(kind), FILE_LEN);
            for (offset, len) in [(4096u64, 100_000usize), (777, 10), (FILE_LEN as u64, 8192)] {
                let what = format!("{}, store {offset}+{len}", s.label);
                let e = one_command_error(&s, true, offset, len);
                assert_eq!(e.kind(), ErrorKind::NoSpace, "{what}: {e:?}");
                assert_eq!(e.errno(), Some(libc::ENOSPC), "{what}: {e:?}");
                assert_eq!(e.op(), Some(Op::Write), "{what}: {e:?}");
                assert_names_file(&e, &s.path, &what);
                let at = e.offset().unwrap();
                assert!(at >= offset && at < offset + len as u64, "{what}: {e:?}");
                assert_injected(&e, &s.path, &s.faults.take_log(), &what);
            }
            // Nothing was written: the file still verifies as generation 0, whole.
            let on_disk = std::fs::read(&s.path).unwrap();
            assert_eq!(on_disk.len(), FILE_LEN, "{}", s.label);
            pattern
                .verify(&on_disk, 0, 0)
                .unwrap_or_else(|e| panic!("{}: {e}", s.label));
            // Loads on the same engine still work.
            s.faults.set_plan(FaultPlan::none());
            let mut cb = s.queue.command_buffer();
            let id = cb
                .load(&s.file, 0, AlignedBuf::new(FILE_LEN, BLOCK).unwrap())
                .unwrap();
            let mut fin = finish(cb.commit().unwrap(), &s.label).1;
            pattern
                .verify(&fin.take_buffer(id).unwrap(), 0, 0)
                .unwrap_or_else(|e| panic!("{}: {e}", s.label));
        }
    }
}

#[test]
fn eio_on_a_read_is_io_naming_file_and_offset() {
    for kind in kinds() {
        for mode in [Mode::Direct, Mode::Shm, Mode::Refused] {
            let plan = FaultPlan::none().with_read_eio(1.0);
            let (s, _) = pattern_scenario(kind, mode, plan, test_config(kind), FILE_LEN);
            for (offset, len) in [(8192u64, 4096usize), (5000, 100), (70_000, 200_000)] {
                let what = format!("{}, load {offset}+{len}", s.label);
                let e = one_command_error(&s, false, offset, len);
                assert_eq!(e.kind(), ErrorKind::Io, "{what}: {e:?}");
                assert_eq!(e.errno(), Some(libc::EIO), "{what}: {e:?}");
                assert_eq!(e.op(), Some(Op::Read), "{what}: {e:?}");
                assert_names_file(&e, &s.path, &what);
                // The offset of the failed device read: the command's, or the start of the block
                // around it when the read was widened for direct I/O.
                let at = e.offset().unwrap();
                assert!(
                    at + BLOCK as u64 > offset && at < offset + len as u64,
                    "{what}: {e:?}"
                );
                assert_injected(&e, &s.path, &s.faults.take_log(), &what);
            }
        }
    }
}

#[test]
fn eio_on_one_read_fails_only_its_command() {
    for kind in kinds() {
        for n in 1..=4u64 {
            let plan = FaultPlan::none().with_fail_nth(n, libc::EIO, false);
            let (s, pattern) =
                pattern_scenario(kind, Mode::Direct, plan, test_config(kind), FILE_LEN);
            let what = format!("{}, fail op {n}", s.label);
            let ranges = [
                (0u64, 4096usize),
                (12_288, 8192),
                (40_000, 1000),
                (65_536, 4096),
            ];
            let mut cb = s.queue.command_buffer();
            let ids: Vec<_> = ranges
                .iter()
                .map(|&(off, len)| {
                    cb.load(&s.file, off, AlignedBuf::new(len, BLOCK).unwrap())
                        .unwrap()
                })
                .collect();
            let (status, mut fin) = finish(cb.commit().unwrap(), &what);
            let errors = errors_of(&status, &what);
            assert_eq!(errors.len(), 1, "{what}: {status:?}");
            let log = s.faults.take_log();
            assert_eq!(log.len(), 1, "{what}: {log:?}");
            for (i, &(off, len)) in ranges.iter().enumerate() {
                match errors.get(&i) {
                    Some(e) => {
                        assert_eq!(e.kind(), ErrorKind::Io, "{what}: {e:?}");
                        assert_names_file(e, &s.path, &what);
                        assert_injected(e, &s.path, &log, &what);
                    }
                    None => {
                        let buf = fin.take_buffer(ids[i]).unwrap();
                        assert_eq!(buf.len(), len);
                        pattern
                            .verify(&buf, off, 0)
                            .unwrap_or_else(|e| panic!("{what}: command {i}: {e}"));
                    }
                }
            }
        }
    }
}

#[test]
fn eio_on_sync_is_io_and_the_store_before_it_stands() {
    for kind in kinds() {
        let plan = FaultPlan::none().with_sync_eio(1.0);
        let (s, pattern) = pattern_scenario(kind, Mode::Direct, plan, test_config(kind), FILE_LEN);
        let data = pattern.bytes(4096, 8192, 1);
        let mut cb = s.queue.command_buffer();
        cb.store(&s.file, 4096, buf_with(0, &data)).unwrap();
        cb.barrier();
        cb.sync(&s.file).unwrap();
        let (status, _) = finish(cb.commit().unwrap(), &s.label);
        let errors = errors_of(&status, &s.label);
        assert_eq!(errors.len(), 1, "{}: {status:?}", s.label);
        let e = &errors[&1];
        assert_eq!(e.kind(), ErrorKind::Io, "{}: {e:?}", s.label);
        assert_eq!(e.op(), Some(Op::Sync), "{}: {e:?}", s.label);
        assert_names_file(e, &s.path, &s.label);
        let on_disk = std::fs::read(&s.path).unwrap();
        pattern
            .verify(&on_disk[4096..12_288], 4096, 1)
            .unwrap_or_else(|e| panic!("{}: {e}", s.label));
    }
}

/// Regression: an unaligned store on a file whose direct-I/O alignment (512 B here) is finer than a
/// page wrote its buffered head and tail into the same pages as its direct middle, concurrently. The
/// kernel then cannot invalidate those pages after the direct write ("Page cache invalidation failure
/// on direct I/O"), fails the next fsync with EIO, and may write stale page contents back.
#[test]
fn unaligned_store_then_sync_succeeds_without_faults() {
    for kind in kinds() {
        let (s, pattern) = pattern_scenario(
            kind,
            Mode::Direct,
            FaultPlan::none(),
            test_config(kind),
            FILE_LEN,
        );
        let mut model = pattern.bytes(0, FILE_LEN, 0);
        for round in 0..20u64 {
            let what = format!("{}, round {round}", s.label);
            let off = 170_519 + round * 4_099;
            let data = pattern.bytes(off, 28_672, round + 1);
            let mut cb = s.queue.command_buffer();
            cb.store_range(&s.file, off, buf_with(1073, &data), 1073, data.len() as u64)
                .unwrap();
            cb.barrier();
            cb.sync(&s.file).unwrap();
            let (status, _) = finish(cb.commit().unwrap(), &what);
            assert!(status.is_complete(), "{what}: {status:?}");
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        let on_disk = std::fs::read(&s.path).unwrap();
        assert!(
            on_disk == model,
            "{}: {}",
            s.label,
            mismatch(&on_disk, &model, 0)
        );
    }
}

/// SQLite crash-VFS style: fail operation N (then, sticky, every one after it), for N = 1, 2, ...
/// until the workload runs with no failure. Each run either succeeds with the right bytes or fails
/// with typed errors, skips what follows a failed barrier, and leaves every byte old or new.
#[test]
fn fail_each_operation_in_turn() {
    for kind in kinds() {
        for sticky in [false, true] {
            let (s, pattern) = pattern_scenario(
                kind,
                Mode::Direct,
                FaultPlan::none(),
                test_config(kind),
                FILE_LEN,
            );
            let old = pattern.bytes(0, FILE_LEN, 0);
            let stores: [(u64, usize, usize); 2] = [(3_000, 70_000, 100), (131_072, 65_536, 0)];
            let mut new = old.clone();
            for &(off, len, _) in &stores {
                new[off as usize..off as usize + len].copy_from_slice(&pattern.bytes(off, len, 1));
            }
            let mut completed_at = None;
            for n in 1..=200u64 {
                let what = format!("{}, fail op {n}, sticky {sticky}", s.label);
                std::fs::write(&s.path, &old).unwrap();
                s.faults
                    .set_plan(FaultPlan::none().with_fail_nth(n, libc::EIO, sticky));
                s.faults.reset();
                let mut cb = s.queue.command_buffer();
                for &(off, len, pad) in &stores {
                    let data = &new[off as usize..off as usize + len];
                    cb.store_range(&s.file, off, buf_with(pad, data), pad, len as u64)
                        .unwrap();
                }
                cb.barrier();
                cb.sync(&s.file).unwrap();
                cb.barrier();
                let all = cb
                    .load(&s.file, 0, AlignedBuf::new(200_000, BLOCK).unwrap())
                    .unwrap();
                let upto = cb
                    .load_upto(&s.file, 150_000, AlignedBuf::new(200_000, BLOCK).unwrap())
                    .unwrap();
                let (status, mut fin) = finish(cb.commit().unwrap(), &what);
                let errors = errors_of(&status, &what);
                let log = s.faults.take_log();
                let counts = s.faults.counts();
                if counts.nth_failures == 0 {
                    assert!(status.is_complete(), "{what}: {status:?}");
                    let a = fin.take_buffer(all).unwrap();
                    assert!(a[..] == new[..200_000], "{what}: {}", mismatch(&a, &new, 0));
                    assert_eq!(fin.bytes(upto) as usize, FILE_LEN - 150_000, "{what}");
                    let b = fin.take_buffer(upto).unwrap();
                    assert!(b[..FILE_LEN - 150_000] == new[150_000..], "{what}");
                    completed_at = Some(n);
                    break;
                }
                assert!(
                    !errors.is_empty(),
                    "{what}: an injected EIO went unreported"
                );
                // The first failed stage decides what ran: later stages are skipped.
                let stages = [0..2, 2..3, 3..5];
                let first_bad = stages
                    .iter()
                    .position(|r| r.clone().any(|i| errors.contains_key(&i)))
                    .unwrap();
                for (si, r) in stages.iter().enumerate() {
                    for i in r.clone() {
                        match errors.get(&i) {
                            Some(e) if si > first_bad => {
                                assert_eq!(e.kind(), ErrorKind::Cancelled, "{what}: {e:?}")
                            }
                            Some(e) => {
                                assert_eq!(e.kind(), ErrorKind::Io, "{what}: command {i}: {e:?}");
                                assert_names_file(e, &s.path, &what);
                                assert_injected(e, &s.path, &log, &what);
                            }
                            None => assert!(si <= first_bad, "{what}: command {i} ran"),
                        }
                    }
                }
                // Loads that succeeded (when only a load failed) hold the new bytes.
                if first_bad == 2 {
                    if !errors.contains_key(&3) {
                        let a = fin.take_buffer(all).unwrap();
                        assert!(a[..] == new[..200_000], "{what}: {}", mismatch(&a, &new, 0));
                    }
                    if !errors.contains_key(&4) {
                        let b = fin.take_buffer(upto).unwrap();
                        let k = fin.bytes(upto) as usize;
                        assert_eq!(k, FILE_LEN - 150_000, "{what}");
                        assert!(b[..k] == new[150_000..], "{what}");
                    }
                }
                // Every byte on disk is the old or the new one, whatever failed.
                let on_disk = std::fs::read(&s.path).unwrap();
                assert_eq!(on_disk.len(), FILE_LEN, "{what}");
                for (i, &b) in on_disk.iter().enumerate() {
                    assert!(b == old[i] || b == new[i], "{what}: byte {i} is {b:#04x}");
                }
            }
            let n =
                completed_at.unwrap_or_else(|| panic!("{}: the workload never completed", s.label));
            assert!(
                n > 5,
                "{}: only {n} operations were failed in turn",
                s.label
            );
        }
    }
}

/// Faults the engine cannot see (it is told every transfer succeeded) are caught by the verify
/// pattern, each as what it is: a corrupt read as a CRC failure, a lost write as a stale block, a
/// misdirected write as a stale block where it belonged and a misdirected one where it landed.
#[test]
fn silent_faults_are_caught_by_verify() {
    for kind in kinds() {
        for mode in [Mode::Direct, Mode::Shm] {
            let (s, pattern) =
                pattern_scenario(kind, mode, FaultPlan::none(), test_config(kind), FILE_LEN);
            let load = |offset: u64, len: usize| -> Vec<u8> {
                let mut cb = s.queue.command_buffer();
                let id = cb
                    .load(&s.file, offset, AlignedBuf::new(len, BLOCK).unwrap())
                    .unwrap();
                let (status, mut fin) = finish(cb.commit().unwrap(), &s.label);
                assert!(status.is_complete(), "{}: {status:?}", s.label);
                fin.take_buffer(id).unwrap().to_vec()
            };
            let store = |offset: u64, data: &[u8]| {
                let mut cb = s.queue.command_buffer();
                cb.store(&s.file, offset, buf_with(0, data)).unwrap();
                let (status, _) = finish(cb.commit().unwrap(), &s.label);
                assert!(status.is_complete(), "{}: {status:?}", s.label);
            };

            // Corrupt reads: every load "succeeds", and every one fails verification.
            s.faults.set_plan(FaultPlan::none().with_corrupt_read(1.0));
            for round in 0..8u64 {
                let off = round * 3 * BLOCK as u64;
                let buf = load(off, 2 * BLOCK);
                let e = pattern
                    .verify(&buf, off, 0)
                    .expect_err("a corrupt read passed verification");
                assert!(
                    matches!(
                        e.problem,
                        Problem::BadPayloadCrc { .. }
                            | Problem::BadHeaderCrc { .. }
                            | Problem::BadMagic { .. }
                    ),
                    "{}: {e}",
                    s.label
                );
            }
            assert!(s.faults.counts().corrupt_reads >= 8, "{}", s.label);

            // A lost write: the store "succeeds", the block reads back stale.
            s.faults.set_plan(FaultPlan::none().with_lost_write(1.0));
            store(8 * BLOCK as u64, &pattern.bytes(8 * BLOCK as u64, BLOCK, 1));
            s.faults.set_plan(FaultPlan::none());
            let e = pattern
                .verify(&load(8 * BLOCK as u64, BLOCK), 8 * BLOCK as u64, 1)
                .expect_err("a lost write passed verification");
            assert_eq!(
                e.problem,
                Problem::WrongGeneration {
                    expected: 1,
                    found: 0
                },
                "{}: {e}",
                s.label
            );

            // A misdirected write: stale where it belonged, out of place where it landed.
            s.faults
                .set_plan(FaultPlan::none().with_misdirect_write(1.0));
            let at = 20 * BLOCK as u64;
            store(at, &pattern.bytes(at, BLOCK, 1));
            let log = s.faults.take_log();
            let shift = match log.last().map(|i| i.fault) {
                Some(Fault::Misdirected { shift }) => shift,
                other => panic!("{}: no misdirected write logged: {other:?}", s.label),
            };
            s.faults.set_plan(FaultPlan::none());
            let buf = load(at, 8 * BLOCK);
            let errors = pattern.verify_all(&buf, at, 0);
            assert_eq!(errors.len(), 1, "{}: {errors:?}", s.label);
            assert_eq!(errors[0].block_offset, at + shift, "{}", s.label);
            assert_eq!(
                errors[0].problem,
                Problem::Misdirected { found_offset: at },
                "{}",
                s.label
            );
            let e = pattern.verify(&buf[..BLOCK], at, 1).unwrap_err();
            assert_eq!(
                e.problem,
                Problem::WrongGeneration {
                    expected: 1,
                    found: 0
                },
                "{}",
                s.label
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// A mapped file truncated by someone else (SIGBUS): the mmap engine and `copy_from_mapping` must turn
// it into a short read or an error, never the death of the process.

/// `len` distinct bytes.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 + i / 4093) as u8).collect()
}

#[test]
fn copy_from_mapping_survives_a_file_truncated_under_its_mapping() {
    use gpuio::backend::mmap::{copy_from_mapping, mapping_fault_epoch};
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("shrinks.bin");
    let data = content(1 << 20);
    std::fs::write(&path, &data).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // SAFETY: a read-only mapping read only through copy_from_mapping; dropped after the fault.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let mut out = vec![0u8; data.len()];
    // SAFETY: the whole mapping, into a separate buffer of the same length.
    let clean = unsafe { copy_from_mapping(map.as_ptr(), out.as_mut_ptr(), out.len()) };
    assert!(clean && out == data, "an intact file copies cleanly");

    // Cut the file to 10000 bytes (inside its third page): the pages from the fourth on are gone.
    f.set_len(10_000).unwrap();
    let before = mapping_fault_epoch();
    // SAFETY: as above; the mapping stays alive during the copy.
    let clean = unsafe { copy_from_mapping(map.as_ptr(), out.as_mut_ptr(), out.len()) };
    assert!(
        !clean,
        "a copy over pages past the end of the file reports the fault"
    );
    assert!(mapping_fault_epoch() > before, "the fault was counted");
    drop(map);
    // A fresh mapping of what is left reads fine.
    // SAFETY: as above.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let mut out = vec![0u8; 10_000];
    // SAFETY: as above.
    let clean = unsafe { copy_from_mapping(map.as_ptr(), out.as_mut_ptr(), out.len()) };
    assert!(clean && out[..] == data[..10_000]);
}

/// Reads of one file through the mmap engine are not failed by SIGBUS faults on another file's
/// mapping: a fault there says nothing about this file's pages. (Every caught fault used to count
/// against every read in the process, and eight during one read's tries failed it with EIO: a random
/// fault run did so once while the flapping-file test below ran beside it.) A thread takes a fault
/// per copy, as fast as it can, from a fresh mapping of a file cut short.
#[test]
fn mmap_reads_of_one_file_are_not_failed_by_faults_on_another() {
    use gpuio::backend::mmap::{copy_from_mapping, mapping_fault_epoch};
    let dir = scratch_dir(Place::Disk);
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, content(1 << 20)).unwrap();
    let steady = dir.path().join("steady.bin");
    let data = content(8 << 20);
    std::fs::write(&steady, &data).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let faulter = {
        let (cut, stop) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let f = std::fs::File::open(&cut).unwrap();
            let len = 1 << 20;
            let mut out = vec![0u8; len];
            let mut faults = 0u64;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&cut)
                .unwrap()
                .set_len(10_000)
                .unwrap();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: a read-only mapping of 1 MiB over a 10000-byte file, read only through
                // copy_from_mapping (which survives the SIGBUS past the end), dropped after it.
                let map = unsafe { memmap2::MmapOptions::new().len(len).map(&f) }.unwrap();
                // SAFETY: the whole mapping, into a separate buffer of the same length.
                let clean = unsafe { copy_from_mapping(map.as_ptr(), out.as_mut_ptr(), len) };
                faults += u64::from(!clean);
            }
            faults
        })
    };
    // One task per load: each copy of 8 MiB takes long enough to see several of the other file's
    // faults, every try.
    let engine = gpuio::Engine::new(gpuio::EngineConfig {
        task_size_bytes: 8 << 20,
        ..gpuio_testkit::test_config(BackendKind::Mmap)
    })
    .unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&steady)
        .unwrap();
    let before = mapping_fault_epoch();
    let start = std::time::Instant::now();
    let mut loads = 0u32;
    let mut failure = None;
    while start.elapsed() < Duration::from_secs(1) {
        let mut cb = q.command_buffer();
        let id = cb
            .load(&file, 0, AlignedBuf::new(data.len(), 4096).unwrap())
            .unwrap();
        let (status, mut done) = finish(cb.commit().unwrap(), "load of the steady file");
        if !matches!(status, Status::Complete) {
            failure = status.first_error();
            break;
        }
        assert!(
            done.take_buffer(id).unwrap()[..] == data[..],
            "load {loads}: wrong bytes"
        );
        loads += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let faults = faulter.join().unwrap();
    let epochs = mapping_fault_epoch() - before;
    eprintln!(
        "{loads} loads of the steady file; {faults} SIGBUS taken on the other ({epochs} counted)"
    );
    assert!(
        failure.is_none(),
        "a read of a file nobody cut failed after {loads} loads, beside {faults} faults on another: {failure:?}"
    );
    // Without faults on the other file this proves nothing.
    assert!(faults > 100, "only {faults} SIGBUS were taken");
}

#[test]
fn mmap_engine_reads_of_a_truncated_file_end_early_instead_of_faulting() {
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("cut.bin");
    let data = content(4 << 20);
    std::fs::write(&path, &data).unwrap();
    let engine = gpuio_testkit::engine(BackendKind::Mmap).unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&path)
        .unwrap();
    let load = |len: usize| {
        let mut cb = q.command_buffer();
        let id = cb
            .load_upto(&file, 0, AlignedBuf::new(len, 4096).unwrap())
            .unwrap();
        let (status, mut done) = finish(cb.commit().unwrap(), "load");
        (status, done.bytes(id), done.take_buffer(id))
    };
    // The first read maps the whole file.
    let (status, n, buf) = load(data.len());
    assert!(status.is_complete(), "{status:?}");
    assert_eq!(n as usize, data.len());
    assert!(buf.unwrap()[..] == data[..]);
    // Cut inside a page: a read of the whole file now gets exactly what is left (as pread would).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1_000_001)
        .unwrap();
    let (status, n, buf) = load(data.len());
    assert!(status.is_complete(), "{status:?}");
    assert_eq!(n, 1_000_001, "bytes read after the cut");
    assert!(buf.unwrap()[..1_000_001] == data[..1_000_001]);
    // An exact read past the new end fails with a typed error naming the file.
    let mut cb = q.command_buffer();
    cb.load(&file, 2 << 20, AlignedBuf::new(4096, 4096).unwrap())
        .unwrap();
    let (status, _) = finish(cb.commit().unwrap(), "exact load past the end");
    let e = status.first_error().expect("a load past the end fails");
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
    assert_names_file(&e, &path, "load past the end");
}

#[test]
fn mmap_engine_survives_a_file_truncated_by_another_thread_mid_read() {
    // One thread cuts the file and writes it back, over and over; this one reads it whole through the
    // mmap engine. Every read gives the file's bytes (or zeros where a task found the file short) or
    // a typed error; the process must not die of SIGBUS (which it did before the guard).
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("flapping.bin");
    let data = std::sync::Arc::new(content(2 << 20));
    std::fs::write(&path, &data[..]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cutter = {
        let (path, data, stop) = (path.clone(), data.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut cuts = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let at = (cuts * 1_234_567) % (data.len() as u64);
                f.set_len(at).unwrap();
                std::thread::sleep(Duration::from_micros(300));
                f.write_all_at(&data[at as usize..], at).unwrap();
                cuts += 1;
            }
            cuts
        })
    };
    let engine = gpuio_testkit::engine(BackendKind::Mmap).unwrap();
    let q = engine.queue(QueueDesc::default()).unwrap();
    let file = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(&path)
        .unwrap();
    let (mut whole, mut short, mut failed) = (0u32, 0u32, 0u32);
    let start = std::time::Instant::now();
    let faults_before = gpuio::backend::mmap::mapping_fault_epoch();
    while start.elapsed() < Duration::from_secs(2) {
        let mut cb = q.command_buffer();
        let id = cb
            .load_upto(&file, 0, AlignedBuf::new(data.len(), 4096).unwrap())
            .unwrap();
        let (status, mut done) = finish(cb.commit().unwrap(), "load while cut");
        match &status {
            Status::Complete => {
                let n = done.bytes(id) as usize;
                let buf = done.take_buffer(id).unwrap();
                // A load is cut into tasks read independently; a task that ran while the file was
                // short found its end (as pread would) even if later tasks found it written back, so
                // a part may be left as the zeroed buffer was. Any other byte must be the file's.
                if let Some(i) = (0..n).find(|&i| buf[i] != data[i] && buf[i] != 0) {
                    panic!("byte {i} of a read of {n} bytes is neither the file's nor zero");
                }
                if n == data.len() {
                    whole += 1
                } else {
                    short += 1
                }
            }
            _ => {
                let e = status.first_error().expect("an error");
                assert!(
                    matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::Io),
                    "unexpected error: {e}"
                );
                assert_names_file(&e, &path, "load while cut");
                failed += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let cuts = cutter.join().unwrap();
    let faults = gpuio::backend::mmap::mapping_fault_epoch() - faults_before;
    eprintln!(
        "{cuts} cuts; reads: {whole} whole, {short} short, {failed} failed; {faults} SIGBUS caught"
    );
    assert!(cuts > 0 && whole + short + failed > 0);
}
