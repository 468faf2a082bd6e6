//! The ring server against CPU producers that speak the ring protocol on the same memory layout
//! (`gpuio_cuda::rings::producer`, the reference `device/gpuio.cuh` mirrors), over real files on
//! /tmp and /dev/shm, with the host stand-in as the device (its "device memory" is host memory, its
//! copies run on a worker thread and check that a staging buffer is not reused too early).
//!
//! Every byte a read delivers is checked against the file's model; every write is checked on disk
//! after shutdown; every wait is bounded, and every test body runs under a watchdog.

mod common;

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpuio::backend::{Backend, BackendKind, IoDone, IoOp, IoRequest, Waker};
use gpuio::{DirectMode, Engine, File, OpenOptions, Result as IoResult};
use gpuio_cuda::rings::layout::{
    self, code, OP_FLUSH, OP_FSYNC, OP_READ, OP_WRITE, SERVER_STOPPED,
};
use gpuio_cuda::rings::{
    DeliveryPath, HostStorePublish, Publish, Request, RingConfig, RingProducer, RingRegion,
    RingServer, RingStats, ServerConfig, ROUNDS_IN_FLIGHT_MAX,
};
use gpuio_cuda::{Device, DeviceBuffer, HostDevice, HostDeviceConfig};
use gpuio_testkit::{
    faulty_engine_with, kind_works, scratch_dir, test_config, within, FaultPlan, Place, Rng,
};

const LINE: usize = 4096;
const WAIT: Duration = Duration::from_secs(20);

/// The bytes of `line` at `version` (0: as the file was created).
fn content(line: u64, version: u64) -> Vec<u8> {
    common::rings::line_content(LINE, line, version)
}

fn make_file(dir: &std::path::Path, lines: u64) -> std::path::PathBuf {
    let path = dir.join("data.bin");
    let mut v = Vec::with_capacity(lines as usize * LINE);
    for l in 0..lines {
        v.extend(content(l, 0));
    }
    std::fs::write(&path, v).unwrap();
    path
}

fn dev_write(addr: u64, bytes: &[u8]) {
    // SAFETY: the stand-in's device addresses are host addresses of live allocations; the caller
    // owns this range (no request on it is in flight).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
}

fn dev_read(addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: as for dev_write; the request that filled it has completed (acquire on its word).
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) };
    v
}

fn publisher() -> Box<dyn Publish> {
    // SAFETY: every region here lives on the HostDevice stand-in.
    Box::new(unsafe { HostStorePublish::new() })
}

thread_local! {
    /// `rounds_in_flight` for every [`Rig`] this thread builds (set by [`with_rounds`]).
    static ROUNDS: Cell<Option<usize>> = const { Cell::new(None) };
    /// How every [`Rig`] this thread builds delivers rounds (`many_producers_...` run both).
    static DELIVERY: Cell<DeliveryPath> = const { Cell::new(DeliveryPath::Copies) };
}

/// Runs `f` once with one round in flight per polling thread and once with two.
fn with_rounds(f: impl Fn()) {
    for n in [1, 2] {
        eprintln!("-- rounds_in_flight {n}");
        ROUNDS.with(|r| r.set(Some(n)));
        f();
    }
    ROUNDS.with(|r| r.set(None));
}

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    host: HostDevice,
    region: Arc<RingRegion>,
    lines: DeviceBuffer,
    server: Option<RingServer>,
    producer: RingProducer,
}

impl Rig {
    #[allow(clippy::too_many_arguments)]
    fn new(
        place: Place,
        engine: &Engine,
        file_lines: u64,
        dev_lines: usize,
        ring: RingConfig,
        server: ServerConfig,
        dev: HostDeviceConfig,
        direct: DirectMode,
    ) -> Rig {
        let mut server = server;
        if let Some(n) = ROUNDS.with(|r| r.get()) {
            server.rounds_in_flight = n;
        }
        server.delivery = DELIVERY.with(|d| d.get());
        let dir = scratch_dir(place);
        let path = make_file(dir.path(), file_lines);
        let host = HostDevice::new(dev);
        let device: Arc<dyn Device> = Arc::new(host.clone());
        let region = Arc::new(RingRegion::new(&device, ring).unwrap());
        region.require_host_addressable().unwrap();
        let lines = DeviceBuffer::alloc(&device, dev_lines * LINE).unwrap();
        let rw = OpenOptions::read_write()
            .direct(direct)
            .open(&path)
            .unwrap();
        let ro = File::open(&path).unwrap();
        let server = RingServer::start(
            engine,
            region.clone(),
            vec![rw, ro],
            (lines.ptr(), lines.len()),
            &publisher,
            server,
        )
        .unwrap();
        // SAFETY: the stand-in's device memory is host memory.
        let producer = unsafe { RingProducer::new(region.clone()) };
        Rig {
            _dir: dir,
            path,
            host,
            region,
            lines,
            server: Some(server),
            producer,
        }
    }
    fn slot_addr(&self, i: usize) -> u64 {
        self.lines.ptr() + (i * LINE) as u64
    }
    fn shutdown(&mut self) -> RingStats {
        self.server.take().unwrap().shutdown()
    }
}

fn engines() -> Vec<(String, Engine)> {
    let mut v = Vec::new();
    for k in [BackendKind::Threads, BackendKind::Uring] {
        if kind_works(k) {
            v.push((k.name().to_string(), gpuio_testkit::engine(k).unwrap()));
        }
    }
    v
}

// -------------------------------------------------------------------------------------------------

/// Many producer threads, random lines, reads and writes, adjacent runs: every byte checked.
fn random_traffic(place: Place, engine: &Engine, label: &str) {
    const THREADS: usize = 6;
    const PER: usize = 16; // device lines (and completion words) per producer
    const RO_LINES: u64 = 384;
    const RW_PER_THREAD: u64 = 24;
    let file_lines = RO_LINES + RW_PER_THREAD * THREADS as u64;
    let mut rig = Rig::new(
        place,
        engine,
        file_lines,
        THREADS * PER,
        RingConfig {
            ring_count: 3,
            slots_per_ring: 16,
            completion_count: (THREADS * PER) as u32,
            line_bytes: LINE as u32,
            max_request_bytes: LINE as u32,
        },
        ServerConfig {
            threads: 2,
            batch_max: 64,
            staging_bytes: 64 * LINE,
            ..ServerConfig::default()
        },
        HostDeviceConfig::default(),
        DirectMode::Auto,
    );
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let p = rig.producer.clone();
        let base = rig.slot_addr(t * PER);
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::new(0x5eed + t as u64);
            // This thread's writable lines and their versions.
            let own: Vec<u64> = (0..RW_PER_THREAD)
                .map(|i| RO_LINES + i * THREADS as u64 + t as u64)
                .collect();
            let mut ver = vec![0u64; own.len()];
            let mut tag = 1u32;
            let mut retries = 0u64;
            for round in 0..60 {
                let ring = (t as u32 + round) % 3;
                let n = 1 + rng.below(PER as u64) as usize;
                // What each of the n requests is: (opcode, file line, expected version or new one).
                let mut plan: Vec<(u16, u64, Option<usize>)> = Vec::new();
                let mut used_own = std::collections::HashSet::new();
                if rng.below(3) == 0 {
                    // An adjacent run of read-only lines: coalescing material.
                    let start = rng.below(RO_LINES - n as u64);
                    for k in 0..n as u64 {
                        plan.push((OP_READ, start + k, None));
                    }
                } else {
                    for _ in 0..n {
                        match rng.below(4) {
                            0 | 1 => plan.push((OP_READ, rng.below(RO_LINES), None)),
                            r => {
                                let i = rng.below(own.len() as u64) as usize;
                                if !used_own.insert(i) {
                                    plan.push((OP_READ, rng.below(RO_LINES), None));
                                    continue;
                                }
                                if r == 2 {
                                    plan.push((OP_READ, own[i], Some(i)));
                                } else {
                                    plan.push((OP_WRITE, own[i], Some(i)));
                                }
                            }
                        }
                    }
                }
                let mut sent = Vec::new();
                for (k, &(op, line, own_i)) in plan.iter().enumerate() {
                    let dst = base + (k * LINE) as u64;
                    if op == OP_WRITE {
                        let i = own_i.unwrap();
                        dev_write(dst, &content(line, ver[i] + 1));
                    }
                    tag = tag.wrapping_add(1).max(1);
                    let req = Request {
                        opcode: op,
                        file_id: 0,
                        offset: line * LINE as u64,
                        length: LINE as u32,
                        completion: (t * PER + k) as u32,
                        dev_addr: dst,
                        tag,
                    };
                    p.submit_until(ring, &req, Instant::now() + WAIT, &mut retries)
                        .unwrap_or_else(|e| panic!("submit: {}", code::name(e)));
                    sent.push(tag);
                }
                for (k, &(op, line, own_i)) in plan.iter().enumerate() {
                    let r = p.wait((t * PER + k) as u32, sent[k], WAIT);
                    assert_eq!(
                        r,
                        LINE as i32,
                        "thread {t} round {round} line {line}: {}",
                        code::name(r)
                    );
                    let dst = base + (k * LINE) as u64;
                    match (op, own_i) {
                        (OP_WRITE, Some(i)) => ver[i] += 1,
                        (_, Some(i)) => {
                            assert!(
                                dev_read(dst, LINE) == content(line, ver[i]),
                                "own line {line}"
                            )
                        }
                        _ => assert!(dev_read(dst, LINE) == content(line, 0), "line {line}"),
                    }
                }
            }
            own.into_iter().zip(ver).collect::<Vec<_>>()
        }));
    }
    let mut expect = Vec::new();
    for h in handles {
        expect.extend(h.join().unwrap());
    }
    let by_kernel = DELIVERY.with(|d| d.get()) == DeliveryPath::Kernel;
    let delivery = rig.server.as_ref().unwrap().delivery().to_string();
    assert_eq!(delivery.starts_with("kernel"), by_kernel, "{delivery}");
    let stats = rig.shutdown();
    assert_eq!(stats.errors, 0, "{label}: {stats:?}");
    assert_eq!(stats.requests, stats.reads + stats.writes);
    assert!(
        stats.coalesced_reads > 0,
        "{label}: no coalescing seen: {stats:?}"
    );
    assert!(stats.transfers < stats.requests, "{stats:?}");
    assert_eq!(rig.host.reuse_violations(), 0);
    let disk = std::fs::read(&rig.path).unwrap();
    for (line, v) in expect {
        let at = line as usize * LINE;
        assert!(
            disk[at..at + LINE] == content(line, v)[..],
            "{label}: line {line} on disk"
        );
    }
    eprintln!(
        "{label} {place:?}: {} requests in {} batches, {} transfers, {} coalesced reads ({} requests), {:.0} req/s",
        stats.requests,
        stats.batches,
        stats.transfers,
        stats.coalesced_reads,
        stats.coalesced_read_requests,
        stats.requests_per_sec()
    );
}

#[test]
fn many_producers_random_lines_every_byte_checked() {
    within(240, || {
        with_rounds(|| {
            for (label, engine) in engines() {
                for place in [Place::Disk, Place::Shm] {
                    random_traffic(place, &engine, &label);
                }
            }
        });
    });
}

/// The same traffic with every round delivered by the deliveries kernel (on the stand-in: each
/// delivery a mapped copy, then its word, in stream order).
#[test]
fn many_producers_kernel_delivery_every_byte_checked() {
    within(240, || {
        DELIVERY.with(|d| d.set(DeliveryPath::Kernel));
        with_rounds(|| {
            for (label, engine) in engines() {
                for place in [Place::Disk, Place::Shm] {
                    random_traffic(place, &engine, &label);
                }
            }
        });
        DELIVERY.with(|d| d.set(DeliveryPath::Copies));
    });
}

#[test]
fn host_region_bytes_are_the_spec() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let mut rig = Rig::new(
        Place::Shm,
        &engine,
        4,
        4,
        RingConfig::default(),
        ServerConfig::default(),
        HostDeviceConfig::default(),
        DirectMode::Auto,
    );
    let l = *rig.region.layout();
    // SAFETY: the host region is `host_bytes` long.
    let h = unsafe { std::slice::from_raw_parts(rig.region.host_ptr(), l.host_bytes) };
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    assert_eq!(&h[0..4], b"GPRQ");
    assert_eq!((h[4], h[5], h[6], h[7]), (1, 0, 1, 0), "version 1.1");
    assert_eq!(u32_at(h, 8), 128);
    assert_eq!(u32_at(h, 12), 4);
    assert_eq!(u32_at(h, 16), 256);
    assert_eq!(u32_at(h, 20), 64);
    assert_eq!(u32_at(h, 24), 4096);
    assert_eq!(u32_at(h, 28), 4096);
    assert_eq!(u64_at(h, 32), 128);
    assert_eq!(u64_at(h, 40), 384);
    assert_eq!(u64_at(h, 48), l.host_bytes as u64);
    assert_eq!(u64_at(h, 56), l.device_bytes as u64);
    assert_eq!(u64_at(h, 64), 64);
    assert_eq!(u64_at(h, 72), 320);
    assert_eq!(u32_at(h, 80), layout::SERVER_SERVING);
    assert_eq!(u32_at(h, 84), 64 << 10);
    let d = dev_read(rig.region.device_ptr(), 64);
    assert_eq!(&d[0..4], b"GPRD");
    assert_eq!((d[4], d[5], d[6], d[7]), (1, 0, 1, 0), "version 1.1");
    assert_eq!((u32_at(&d, 8), u32_at(&d, 12)), (4, 4096));
    let taken = |r: u32| u64_at(&dev_read(rig.region.tail_addr(r), 16), 8);
    assert_eq!(taken(2), 0, "nothing taken yet");
    // One request: its slot's bytes after the host took it (state FREE, lap 1, ring 2 slot 0).
    let req = Request {
        opcode: OP_READ,
        file_id: 0,
        offset: 4096,
        length: 4096,
        completion: 9,
        dev_addr: rig.slot_addr(1),
        tag: 0xabcd,
    };
    rig.producer.submit(2, &req).unwrap();
    assert_eq!(rig.producer.wait(9, 0xabcd, WAIT), 4096);
    let s = l.slot(2, 0);
    assert_eq!(u64_at(h, s), 1 << 32, "FREE for lap 1");
    assert_eq!(u32_at(h, s + 8) & 0xffff, OP_READ as u32);
    assert_eq!(u64_at(h, s + 16), 4096);
    assert_eq!(u32_at(h, s + 24), 4096);
    assert_eq!(u32_at(h, s + 28), 9);
    assert_eq!(u64_at(h, s + 32), rig.slot_addr(1));
    assert_eq!(u32_at(h, s + 40), 0xabcd);
    assert_eq!(u64_at(h, l.ring_control(2)), 1, "head");
    assert_eq!(u64_at(h, l.ring_control(2) + 8), 1, "completed");
    // The taken hint at offset 8 of the ring's tail line (device memory) came with the completion.
    assert_eq!(u64_at(&dev_read(rig.region.tail_addr(2), 16), 0), 1, "tail");
    assert_eq!(taken(2), 1, "taken hint");
    assert_eq!(taken(1), 0);
    let cw = dev_read(rig.region.completion_addr(9), 8);
    assert_eq!(
        u64::from_le_bytes(cw.try_into().unwrap()),
        (0xabcd << 32) | 4096
    );
    assert!(dev_read(rig.slot_addr(1), LINE) == content(1, 0));
    rig.shutdown();
    assert_eq!(u32_at(h, 80), SERVER_STOPPED);
}

/// Tiny rings and a slow copy engine: producers see EAGAIN, back off, and everything completes.
#[test]
fn full_rings_push_back_and_nothing_is_lost() {
    within(120, || {
        with_rounds(|| {
            let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
            const THREADS: usize = 4;
            const PER: usize = 8;
            let mut rig = Rig::new(
                Place::Shm,
                &engine,
                64,
                THREADS * PER,
                RingConfig {
                    ring_count: 1,
                    slots_per_ring: 2,
                    completion_count: (THREADS * PER) as u32,
                    line_bytes: LINE as u32,
                    max_request_bytes: LINE as u32,
                },
                ServerConfig {
                    batch_max: 2,
                    staging_bytes: 2 * LINE,
                    ..ServerConfig::default()
                },
                HostDeviceConfig {
                    copy_delay: Duration::from_micros(300),
                    ..HostDeviceConfig::default()
                },
                DirectMode::Auto,
            );
            let mut hs = Vec::new();
            for t in 0..THREADS {
                let p = rig.producer.clone();
                let base = rig.slot_addr(t * PER);
                hs.push(std::thread::spawn(move || {
                    let mut full = 0u64;
                    let mut tag = 0u32;
                    for round in 0..10u64 {
                        let mut tags = Vec::new();
                        for k in 0..PER {
                            tag += 1;
                            let line = (round * 7 + k as u64 * 3 + t as u64) % 64;
                            let req = Request {
                                opcode: OP_READ,
                                file_id: 1,
                                offset: line * LINE as u64,
                                length: LINE as u32,
                                completion: (t * PER + k) as u32,
                                dev_addr: base + (k * LINE) as u64,
                                tag,
                            };
                            let deadline = Instant::now() + WAIT;
                            loop {
                                match p.submit(0, &req) {
                                    Ok(()) => break,
                                    Err(code::EAGAIN) => {
                                        full += 1;
                                        assert!(Instant::now() < deadline, "ring stayed full");
                                        std::thread::sleep(Duration::from_micros(50));
                                    }
                                    Err(e) => panic!("{}", code::name(e)),
                                }
                            }
                            tags.push((tag, line));
                        }
                        for (k, &(tag, line)) in tags.iter().enumerate() {
                            assert_eq!(p.wait((t * PER + k) as u32, tag, WAIT), LINE as i32);
                            assert!(dev_read(base + (k * LINE) as u64, LINE) == content(line, 0));
                        }
                    }
                    full
                }));
            }
            let full: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
            let stats = rig.shutdown();
            assert!(full > 0, "the 2-slot ring never filled");
            assert_eq!(
                (stats.requests, stats.errors),
                (THREADS as u64 * PER as u64 * 10, 0)
            );
            eprintln!("full-ring retries: {full}; {stats:?}");
        });
    });
}

/// Malformed requests get error results; the server keeps serving.
#[test]
fn bad_requests_get_error_results_never_a_panic() {
    within(60, || {
        with_rounds(|| {
            let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
            let mut rig = Rig::new(
                Place::Shm,
                &engine,
                8,
                4,
                RingConfig {
                    completion_count: 32,
                    ..RingConfig::default()
                },
                ServerConfig::default(),
                HostDeviceConfig::default(),
                DirectMode::Auto,
            );
            let good = Request {
                opcode: OP_READ,
                file_id: 0,
                offset: 0,
                length: LINE as u32,
                completion: 0,
                dev_addr: rig.slot_addr(0),
                tag: 1,
            };
            let outside = rig.slot_addr(4);
            let cases: Vec<(Request, i32)> = vec![
                (Request { file_id: 7, ..good }, code::EBADF),
                (
                    Request {
                        offset: 8 * LINE as u64 - 10,
                        ..good
                    },
                    code::ERANGE,
                ),
                (
                    Request {
                        offset: u64::MAX - 5,
                        ..good
                    },
                    code::ERANGE,
                ),
                (Request { length: 0, ..good }, code::EINVAL),
                (
                    Request {
                        length: (64 << 10) + 1,
                        ..good
                    },
                    code::EINVAL,
                ),
                (Request { opcode: 99, ..good }, code::EINVAL),
                (
                    Request {
                        dev_addr: outside,
                        ..good
                    },
                    code::EFAULT,
                ),
                (
                    Request {
                        dev_addr: rig.slot_addr(3) + 1,
                        ..good
                    },
                    code::EFAULT,
                ),
                (
                    Request {
                        dev_addr: 0,
                        ..good
                    },
                    code::EFAULT,
                ),
                (
                    Request {
                        opcode: OP_WRITE,
                        file_id: 1,
                        ..good
                    },
                    code::EACCES,
                ),
                (
                    Request {
                        opcode: OP_FSYNC,
                        file_id: 9,
                        ..good
                    },
                    code::EBADF,
                ),
                (good, LINE as i32),
                (
                    Request {
                        opcode: OP_FLUSH,
                        ..good
                    },
                    0,
                ),
                (
                    Request {
                        opcode: OP_FSYNC,
                        ..good
                    },
                    0,
                ),
            ];
            for (i, (req, want)) in cases.iter().enumerate() {
                let req = Request {
                    completion: i as u32,
                    tag: 100 + i as u32,
                    ..*req
                };
                rig.producer.submit(i as u32 % 4, &req).unwrap();
                assert_eq!(
                    rig.producer.wait(i as u32, req.tag, WAIT),
                    *want,
                    "case {i}: {req:?}"
                );
            }
            // A completion index out of range cannot be answered: counted, not crashed on.
            let req = Request {
                completion: 32,
                tag: 5,
                ..good
            };
            rig.producer.submit(0, &req).unwrap();
            let req = Request {
                completion: 31,
                tag: 6,
                ..good
            };
            rig.producer.submit(0, &req).unwrap();
            assert_eq!(rig.producer.wait(31, 6, WAIT), LINE as i32);
            assert_eq!(
                rig.producer.submit(0, &Request { tag: 0, ..good }),
                Err(code::EINVAL)
            );
            assert_eq!(rig.producer.submit(9, &good), Err(code::EINVAL));
            let stats = rig.shutdown();
            assert_eq!(stats.unanswerable, 1);
            assert_eq!(stats.errors, 11);
            assert_eq!(rig.producer.submit(0, &good), Err(code::ESHUTDOWN));
        });
    });
}

/// Faults injected under the engine: each read delivers exactly the file's bytes or an error, each
/// write lands or reports an error, and the errors are the injected ones.
#[test]
fn engine_faults_become_error_results_for_the_requests_they_hit() {
    within(180, || {
        with_rounds(|| {
            for seed in [1u64, 2, 3] {
                let plan = FaultPlan::none()
                    .with_read_eio(0.15)
                    .with_write_eio(0.15)
                    .with_short_read(0.2)
                    .with_short_write(0.2)
                    .with_eintr(0.1);
                let (engine, faults) =
                    faulty_engine_with(test_config(BackendKind::Threads), seed, plan).unwrap();
                const PER: usize = 32;
                let mut rig = Rig::new(
                    Place::Disk,
                    &engine,
                    128,
                    PER,
                    RingConfig {
                        ring_count: 1,
                        slots_per_ring: 64,
                        completion_count: PER as u32,
                        ..RingConfig::default()
                    },
                    ServerConfig::default(),
                    HostDeviceConfig::default(),
                    DirectMode::Auto,
                );
                let mut rng = Rng::new(seed);
                let mut ver = vec![0u64; 128];
                // The last write to a line failed: its new bytes may or may not have landed.
                let mut maybe = [false; 128];
                let (mut eio, mut ok) = (0, 0);
                let mut tag = 0u32;
                for _ in 0..30 {
                    // Adjacent reads of lines 0..64 (coalesced), writes to distinct lines of 64..128.
                    let start = rng.below(64 - PER as u64 / 2);
                    let wstart = 64 + rng.below(64 - PER as u64 / 2);
                    let reqs: Vec<(u16, u64)> = (0..PER as u64 / 2)
                        .map(|k| (OP_READ, start + k))
                        .chain((0..PER as u64 / 2).map(|k| (OP_WRITE, wstart + k)))
                        .collect();
                    for (k, &(op, line)) in reqs.iter().enumerate() {
                        if op == OP_WRITE {
                            dev_write(rig.slot_addr(k), &content(line, ver[line as usize] + 1));
                        }
                        tag += 1;
                        let req = Request {
                            opcode: op,
                            file_id: 0,
                            offset: line * LINE as u64,
                            length: LINE as u32,
                            completion: k as u32,
                            dev_addr: rig.slot_addr(k),
                            tag,
                        };
                        rig.producer.submit(0, &req).unwrap();
                    }
                    let first = tag - reqs.len() as u32 + 1;
                    for (k, &(op, line)) in reqs.iter().enumerate() {
                        let r = rig.producer.wait(k as u32, first + k as u32, WAIT);
                        let l = line as usize;
                        match r {
                            r if r == LINE as i32 => {
                                ok += 1;
                                if op == OP_READ {
                                    assert!(dev_read(rig.slot_addr(k), LINE) == content(line, 0));
                                } else {
                                    ver[l] += 1;
                                    maybe[l] = false;
                                }
                            }
                            code::EIO => {
                                eio += 1;
                                if op == OP_WRITE {
                                    maybe[l] = true;
                                }
                            }
                            r => panic!(
                                "seed {seed}: unexpected result {} for {op} {line}",
                                code::name(r)
                            ),
                        }
                    }
                }
                let stats = rig.shutdown();
                let f = faults.counts();
                assert!(
                    f.read_eio + f.write_eio > 0,
                    "seed {seed}: no hard fault fired: {f:?}"
                );
                assert!(eio > 0 && ok > 0, "seed {seed}: eio {eio} ok {ok}");
                assert!(
                    eio <= (f.read_eio + f.write_eio) as usize * 64,
                    "more errors than faults could explain"
                );
                assert!(
                    stats.split_retries > 0 || f.read_eio + f.write_eio <= 2,
                    "{stats:?}"
                );
                let disk = std::fs::read(&rig.path).unwrap();
                for l in 64..128usize {
                    let got = &disk[l * LINE..(l + 1) * LINE];
                    // A failed write may have landed in part: word by word old or new.
                    let ok = common::rings::line_on_disk_ok(LINE, got, l as u64, ver[l], maybe[l]);
                    assert!(
                        ok,
                        "seed {seed}: line {l} (version {}, maybe {})",
                        ver[l], maybe[l]
                    );
                }
                eprintln!("seed {seed}: {ok} ok, {eio} EIO; faults {f:?}; {stats:?}");
            }
        });
    });
}

/// A failed device copy fails the reads of its round with EIO; later rounds work again.
#[test]
fn a_failed_device_copy_fails_its_reads_only() {
    within(60, || {
        with_rounds(|| {
            let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
            let mut rig = Rig::new(
                Place::Shm,
                &engine,
                16,
                4,
                RingConfig::default(),
                ServerConfig::default(),
                HostDeviceConfig {
                    fail_copy_nth: Some(3),
                    ..HostDeviceConfig::default()
                },
                DirectMode::Auto,
            );
            let mut results = Vec::new();
            for i in 0..6u32 {
                let req = Request {
                    opcode: OP_READ,
                    file_id: 0,
                    offset: (i as u64 % 16) * LINE as u64,
                    length: LINE as u32,
                    completion: 0,
                    dev_addr: rig.slot_addr(0),
                    tag: i + 1,
                };
                rig.producer.submit(0, &req).unwrap();
                let r = rig.producer.wait(0, i + 1, WAIT);
                if r == LINE as i32 {
                    assert!(dev_read(rig.slot_addr(0), LINE) == content(i as u64, 0));
                }
                results.push(r);
            }
            // Copy 1 is the region's initialisation; copy 3 is the second read's.
            assert_eq!(results[1], code::EIO, "{results:?}");
            assert!(
                results.iter().filter(|&&r| r == LINE as i32).count() == 5,
                "{results:?}"
            );
            rig.shutdown();
        });
    });
}

/// Writes, then FLUSH and FSYNC; the bytes are on disk.
#[test]
fn writes_flush_and_fsync() {
    within(60, || {
        with_rounds(|| {
            let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
            let mut rig = Rig::new(
                Place::Disk,
                &engine,
                16,
                8,
                RingConfig::default(),
                ServerConfig::default(),
                HostDeviceConfig::default(),
                DirectMode::Auto,
            );
            for k in 0..8u64 {
                dev_write(rig.slot_addr(k as usize), &content(k + 4, 1));
                let tag = k as u32 + 1;
                let req = Request {
                    opcode: OP_WRITE,
                    file_id: 0,
                    offset: (k + 4) * LINE as u64,
                    length: LINE as u32,
                    completion: k as u32,
                    dev_addr: rig.slot_addr(k as usize),
                    tag,
                };
                rig.producer.submit(1, &req).unwrap();
            }
            let flush = Request {
                opcode: OP_FLUSH,
                file_id: 0,
                offset: 0,
                length: 0,
                completion: 100,
                dev_addr: 0,
                tag: 1000,
            };
            rig.producer.submit(1, &flush).unwrap();
            let fsync = Request {
                opcode: OP_FSYNC,
                completion: 101,
                tag: 1001,
                ..flush
            };
            rig.producer.submit(1, &fsync).unwrap();
            assert_eq!(rig.producer.wait(100, 1000, WAIT), 0);
            assert_eq!(rig.producer.wait(101, 1001, WAIT), 0);
            for k in 0..8u32 {
                assert_eq!(rig.producer.wait(k, k + 1, WAIT), LINE as i32);
            }
            let stats = rig.shutdown();
            assert_eq!((stats.writes, stats.flushes, stats.fsyncs), (8, 1, 1));
            assert!(stats.coalesced_writes >= 1, "{stats:?}");
            let disk = std::fs::read(&rig.path).unwrap();
            for l in 0..16u64 {
                let v = if (4..12).contains(&l) { 1 } else { 0 };
                assert!(
                    disk[l as usize * LINE..][..LINE] == content(l, v)[..],
                    "line {l}"
                );
            }
        });
    });
}

/// Shutdown while producers are busy: every request either completes correctly or fails with
/// ESHUTDOWN (or, if it was published after the final drain, times out and then reports
/// ESHUTDOWN); nobody hangs; afterwards submission is refused.
#[test]
fn shutdown_with_requests_in_flight_finishes_or_fails_them() {
    within(90, || {
        with_rounds(|| {
            let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
            const THREADS: usize = 4;
            const PER: usize = 8;
            let mut rig = Rig::new(
                Place::Shm,
                &engine,
                64,
                THREADS * PER,
                RingConfig {
                    ring_count: 2,
                    slots_per_ring: 8,
                    completion_count: (THREADS * PER) as u32,
                    ..RingConfig::default()
                },
                ServerConfig {
                    batch_max: 4,
                    ..ServerConfig::default()
                },
                HostDeviceConfig {
                    copy_delay: Duration::from_micros(500),
                    ..HostDeviceConfig::default()
                },
                DirectMode::Auto,
            );
            let mut hs = Vec::new();
            for t in 0..THREADS {
                let p = rig.producer.clone();
                let base = rig.slot_addr(t * PER);
                hs.push(std::thread::spawn(move || {
                    let (mut ok, mut refused, mut tag) = (0u64, 0u64, 0u32);
                    loop {
                        let mut sent = Vec::new();
                        for k in 0..PER {
                            tag += 1;
                            let line = (tag as u64 * 13 + t as u64) % 64;
                            let req = Request {
                                opcode: OP_READ,
                                file_id: 1,
                                offset: line * LINE as u64,
                                length: LINE as u32,
                                completion: (t * PER + k) as u32,
                                dev_addr: base + (k * LINE) as u64,
                                tag,
                            };
                            let mut retries = 0;
                            match p.submit_until(
                                t as u32 % 2,
                                &req,
                                Instant::now() + WAIT,
                                &mut retries,
                            ) {
                                Ok(()) => sent.push((k, tag, line)),
                                Err(code::ESHUTDOWN) => {
                                    refused += 1;
                                    break;
                                }
                                Err(e) => panic!("{}", code::name(e)),
                            }
                        }
                        for &(k, tag, line) in &sent {
                            match p.wait((t * PER + k) as u32, tag, Duration::from_secs(2)) {
                                r if r == LINE as i32 => {
                                    ok += 1;
                                    assert!(
                                        dev_read(base + (k * LINE) as u64, LINE)
                                            == content(line, 0)
                                    );
                                }
                                code::ESHUTDOWN => refused += 1,
                                r => panic!("unexpected {}", code::name(r)),
                            }
                        }
                        if refused > 0 {
                            return (ok, refused);
                        }
                    }
                }));
            }
            std::thread::sleep(Duration::from_millis(300));
            let stats = rig.shutdown();
            let mut total_ok = 0;
            for h in hs {
                let (ok, refused) = h.join().unwrap();
                assert!(refused > 0);
                total_ok += ok;
            }
            assert!(total_ok > 0);
            assert_eq!(
                rig.region
                    .header()
                    .server_state
                    .load(std::sync::atomic::Ordering::Acquire),
                SERVER_STOPPED
            );
            eprintln!("shutdown: {total_ok} completed; {stats:?}");
        });
    });
}

// -------------------------------------------------------------------------------------------------

/// What a [`GateBackend`] saw, in order: a request handed to it, a completion it reported (by file
/// offset).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Pushed(u64),
    Done(u64),
}

/// The state a [`GateBackend`] shares with its test: reads of `held_offset` are kept back until
/// `open`.
#[derive(Debug)]
struct Gate {
    held_offset: u64,
    open: AtomicBool,
    log: Mutex<Vec<Seen>>,
}

impl Gate {
    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
    /// Whether `what` was seen within `WAIT` (polled).
    fn wait_for(&self, what: Seen) -> bool {
        let until = Instant::now() + WAIT;
        while Instant::now() < until {
            if self.seen().contains(&what) {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        false
    }
}

/// A backend that passes everything to a real one, except that it holds reads of one offset until
/// the test opens the gate, and logs what was pushed and what completed.
struct GateBackend {
    inner: Box<dyn Backend>,
    gate: Arc<Gate>,
    held: VecDeque<IoRequest>,
    offsets: HashMap<u64, u64>,
}

impl Backend for GateBackend {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
    fn attach_thread(&mut self) -> IoResult<()> {
        self.inner.attach_thread()
    }
    unsafe fn push(&mut self, req: IoRequest) -> std::result::Result<(), IoRequest> {
        let (tag, off) = (req.tag, req.offset);
        let open = self.gate.open.load(std::sync::atomic::Ordering::Acquire);
        if req.op() == IoOp::Read && off == self.gate.held_offset && !open {
            self.held.push_back(req);
        } else {
            // SAFETY: the caller's contract for `req` is passed on unchanged.
            unsafe { self.inner.push(req) }?;
        }
        self.offsets.insert(tag, off);
        self.gate.log.lock().unwrap().push(Seen::Pushed(off));
        Ok(())
    }
    fn submit_and_reap(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<IoDone>,
    ) -> IoResult<()> {
        if self.gate.open.load(std::sync::atomic::Ordering::Acquire) {
            while let Some(req) = self.held.pop_front() {
                // SAFETY: as in `push`: the memory stays valid until this request is reaped.
                if let Err(req) = unsafe { self.inner.push(req) } {
                    self.held.push_front(req);
                    break;
                }
            }
        }
        let from = out.len();
        if self.held.is_empty() {
            self.inner.submit_and_reap(min_complete, timeout, out)?;
        } else {
            // Held requests complete only after the gate opens: wait in short slices to notice it.
            let slice = Duration::from_millis(1);
            let slice = timeout.map_or(slice, |t| t.min(slice));
            if self.inner.in_flight() == 0 {
                std::thread::sleep(slice);
            } else {
                let min = min_complete.min(self.inner.in_flight());
                self.inner.submit_and_reap(min, Some(slice), out)?;
            }
        }
        let mut log = self.gate.log.lock().unwrap();
        for d in &out[from..] {
            if let Some(off) = self.offsets.remove(&d.tag) {
                log.push(Seen::Done(off));
            }
        }
        Ok(())
    }
    fn waker(&self) -> Option<Waker> {
        self.inner.waker()
    }
    fn notes(&self) -> Vec<String> {
        let mut n = self.inner.notes();
        n.push("gated by tests/rings.rs".into());
        n
    }
}

/// Opens the gate when dropped, so a failed assertion does not leave a read held forever (the
/// server's shutdown would wait for it).
struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0
            .open
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

fn gated_engine(held_offset: u64) -> (Engine, Arc<Gate>) {
    let config = test_config(BackendKind::Threads);
    let (inner, explain) = gpuio::backend::probe(&config.backend).unwrap();
    let gate = Arc::new(Gate {
        held_offset,
        open: AtomicBool::new(false),
        log: Mutex::new(Vec::new()),
    });
    let backend = GateBackend {
        inner,
        gate: gate.clone(),
        held: VecDeque::new(),
        offsets: HashMap::new(),
    };
    let engine = Engine::with_backend(config, Box::new(backend), explain).unwrap();
    (engine, gate)
}

/// Pipelining, shown by order rather than by time: round 1's read is held in the backend. With two
/// rounds in flight, round 2's read is submitted, completed and answered while round 1's is still
/// held; with one (the control), round 2's read reaches the backend only after round 1's completed.
#[test]
fn a_second_round_is_served_while_the_first_is_held() {
    within(90, || {
        const HELD: u64 = 5;
        const OTHER: u64 = 9;
        let (h, o) = (HELD * LINE as u64, OTHER * LINE as u64);
        for rounds in [1, 2] {
            let (engine, gate) = gated_engine(h);
            let mut rig = Rig::new(
                Place::Shm,
                &engine,
                16,
                2,
                RingConfig {
                    ring_count: 1,
                    slots_per_ring: 4,
                    completion_count: 2,
                    ..RingConfig::default()
                },
                ServerConfig {
                    rounds_in_flight: rounds,
                    ..ServerConfig::default()
                },
                HostDeviceConfig::default(),
                DirectMode::Auto,
            );
            let read = |line: u64, k: usize, tag: u32| Request {
                opcode: OP_READ,
                file_id: 1,
                offset: line * LINE as u64,
                length: LINE as u32,
                completion: k as u32,
                dev_addr: rig.slot_addr(k),
                tag,
            };
            // Declared after the rig, so dropped (gate opened) before it when an assertion fails.
            let _open = OpenOnDrop(gate.clone());
            let p = rig.producer.clone();
            let mut retries = 0;
            p.submit_until(0, &read(HELD, 0, 1), Instant::now() + WAIT, &mut retries)
                .unwrap();
            // Once the backend has it, round 1 is committed: the next request is a new round.
            assert!(gate.wait_for(Seen::Pushed(h)), "{:?}", gate.seen());
            p.submit_until(0, &read(OTHER, 1, 2), Instant::now() + WAIT, &mut retries)
                .unwrap();
            if rounds >= 2 {
                let r = p.wait(1, 2, WAIT);
                assert_eq!(r, LINE as i32, "round 2: {}", code::name(r));
                assert!(dev_read(rig.slot_addr(1), LINE) == content(OTHER, 0));
                // The gate is still closed, so round 1 cannot have completed.
                assert_eq!(
                    gate.seen(),
                    vec![Seen::Pushed(h), Seen::Pushed(o), Seen::Done(o)]
                );
                gate.open.store(true, std::sync::atomic::Ordering::Release);
                assert_eq!(p.wait(0, 1, WAIT), LINE as i32);
            } else {
                gate.open.store(true, std::sync::atomic::Ordering::Release);
                assert_eq!(p.wait(0, 1, WAIT), LINE as i32);
                assert_eq!(p.wait(1, 2, WAIT), LINE as i32);
                let seen = gate.seen();
                let at = |s: Seen| seen.iter().position(|x| *x == s).unwrap();
                assert!(
                    at(Seen::Done(h)) < at(Seen::Pushed(o)),
                    "one round in flight, yet round 2's read was submitted first: {seen:?}"
                );
            }
            assert!(dev_read(rig.slot_addr(0), LINE) == content(HELD, 0));
            let stats = rig.shutdown();
            assert_eq!((stats.batches, stats.errors), (2, 0), "{stats:?}");
            assert_eq!(rig.host.reuse_violations(), 0);
            eprintln!("rounds_in_flight {rounds}: {:?}", gate.seen());
        }
    });
}

#[test]
fn rounds_in_flight_is_bounded() {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let host = HostDevice::new(HostDeviceConfig::default());
    let device: Arc<dyn Device> = Arc::new(host);
    let region = Arc::new(RingRegion::new(&device, RingConfig::default()).unwrap());
    let lines = DeviceBuffer::alloc(&device, LINE).unwrap();
    for (n, ok) in [(0, false), (1, true), (ROUNDS_IN_FLIGHT_MAX, true)] {
        let r = RingServer::start(
            &engine,
            region.clone(),
            vec![],
            (lines.ptr(), lines.len()),
            &publisher,
            ServerConfig {
                rounds_in_flight: n,
                ..ServerConfig::default()
            },
        );
        assert_eq!(r.is_ok(), ok, "rounds_in_flight {n}: {r:?}");
    }
    let r = RingServer::start(
        &engine,
        region,
        vec![],
        (lines.ptr(), lines.len()),
        &publisher,
        ServerConfig {
            rounds_in_flight: ROUNDS_IN_FLIGHT_MAX + 1,
            ..ServerConfig::default()
        },
    );
    assert!(r.is_err());
}

// ---- page-locked staging (docs/rings.md, "Staging memory is page-locked") ----

/// A stand-in with a region of 4 rings, a line buffer and a file of 16 lines.
struct PinRig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    host: HostDevice,
    region: Arc<RingRegion>,
    lines: DeviceBuffer,
}

fn pin_rig(dev: HostDeviceConfig) -> PinRig {
    let dir = scratch_dir(Place::Shm);
    let path = make_file(dir.path(), 16);
    let host = HostDevice::new(dev);
    let device: Arc<dyn Device> = Arc::new(host.clone());
    let region = Arc::new(
        RingRegion::new(
            &device,
            RingConfig {
                ring_count: 4,
                slots_per_ring: 4,
                completion_count: 4,
                line_bytes: LINE as u32,
                max_request_bytes: LINE as u32,
            },
        )
        .unwrap(),
    );
    let lines = DeviceBuffer::alloc(&device, 4 * LINE).unwrap();
    PinRig {
        _dir: dir,
        path,
        host,
        region,
        lines,
    }
}

fn pin_config(threads: usize, rounds: usize) -> ServerConfig {
    ServerConfig {
        threads,
        batch_max: 4,
        staging_bytes: 4 * LINE,
        rounds_in_flight: rounds,
        io_timeout: WAIT,
        ..ServerConfig::default()
    }
}

fn pin_start(engine: &Engine, rig: &PinRig, cfg: ServerConfig) -> IoResult<RingServer> {
    RingServer::start(
        engine,
        rig.region.clone(),
        vec![File::open(&rig.path).unwrap()],
        (rig.lines.ptr(), rig.lines.len()),
        &publisher,
        cfg,
    )
}

/// One read on every ring, each checked: the server serves with its staging as it is.
fn pin_serve(rig: &PinRig) {
    // SAFETY: the stand-in's device memory is host memory.
    let p = unsafe { RingProducer::new(rig.region.clone()) };
    for r in 0..4u32 {
        let line = 3 + r as u64;
        let dev = rig.lines.ptr() + (r as usize * LINE) as u64;
        let tag = 100 + r;
        let req = Request {
            opcode: OP_READ,
            file_id: 0,
            offset: line * LINE as u64,
            length: LINE as u32,
            completion: r,
            dev_addr: dev,
            tag,
        };
        let mut retries = 0;
        p.submit_until(r, &req, Instant::now() + WAIT, &mut retries)
            .unwrap_or_else(|e| panic!("submit: {}", code::name(e)));
        assert_eq!(p.wait(r, tag, WAIT), LINE as i32, "read on ring {r}");
        assert!(dev_read(dev, LINE) == content(line, 0), "bytes of ring {r}");
    }
}

/// Every staging slab is page-locked once at start (one pin per slab: threads × rounds in flight),
/// and unpinned exactly once after shutdown, and after a drop without shutdown.
#[test]
fn staging_slabs_are_pinned_at_start_and_unpinned_once_at_shutdown_and_drop() {
    within(120, || {
        let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
        for (threads, rounds) in [(1, 1), (2, 2), (3, ROUNDS_IN_FLIGHT_MAX)] {
            let rig = pin_rig(HostDeviceConfig::default());
            let slabs = (threads * rounds) as u64;
            let slab_bytes = 4 * LINE as u64;
            for explicit in [true, false] {
                let (pins, unpins, bytes) = (
                    rig.host.pin_calls(),
                    rig.host.unpin_calls(),
                    rig.host.pinned_bytes(),
                );
                let server = pin_start(&engine, &rig, pin_config(threads, rounds)).unwrap();
                assert_eq!(rig.host.pin_calls() - pins, slabs, "pin calls at start");
                assert_eq!(rig.host.unpin_calls(), unpins, "unpinned while serving");
                assert_eq!(rig.host.pinned_bytes() - bytes, slabs * slab_bytes);
                assert_eq!(server.stats().staging_pinned, slabs);
                assert!(
                    server.staging_pinning().contains(&format!(
                        "{slabs} staging slabs of {slab_bytes} bytes page-locked"
                    )),
                    "{}",
                    server.staging_pinning()
                );
                pin_serve(&rig);
                assert_eq!(
                    rig.host.pin_calls() - pins,
                    slabs,
                    "pinned again while serving"
                );
                if explicit {
                    server.shutdown();
                } else {
                    drop(server);
                }
                assert_eq!(
                    rig.host.unpin_calls() - unpins,
                    slabs,
                    "unpins after {}",
                    if explicit { "shutdown" } else { "drop" }
                );
                assert_eq!(rig.host.pinned_bytes(), bytes, "left pinned");
                assert_eq!(rig.host.reuse_violations(), 0);
            }
        }
    });
}

/// A pin that fails (the first, a middle and the last slab's) fails the start with an error naming
/// the slab, and leaves nothing of the server pinned: each earlier pin was undone once.
#[test]
fn a_failed_pin_fails_start_and_unpins_what_was_pinned() {
    within(120, || {
        let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
        let (threads, rounds) = (2, 2);
        for k in 1..=(threads * rounds) as u64 {
            // Pin call 1 is the region's host memory; the slabs' pins follow.
            let rig = pin_rig(HostDeviceConfig {
                fail_pin_nth: Some(1 + k),
                ..HostDeviceConfig::default()
            });
            assert_eq!(rig.host.pin_calls(), 1, "the region pins once");
            let bytes = rig.host.pinned_bytes();
            let e = pin_start(&engine, &rig, pin_config(threads, rounds)).unwrap_err();
            let msg = e.to_string();
            let slab = (k - 1) % rounds as u64 + 1;
            let thread = (k - 1) / rounds as u64 + 1;
            assert!(
                msg.contains(&format!(
                    "page-locking staging slab {slab} of {rounds} ({} bytes) of polling thread {thread} of {threads}",
                    4 * LINE
                )) && msg.contains("injected failure of pin"),
                "{msg}"
            );
            assert_eq!(e.kind(), gpuio::ErrorKind::OutOfMemory, "{msg}");
            assert_eq!(rig.host.pin_calls(), 1 + k, "pinned on after the failure");
            assert_eq!(
                rig.host.unpin_calls(),
                k - 1,
                "pins before the failure undone once"
            );
            assert_eq!(rig.host.pinned_bytes(), bytes, "a slab left pinned");
            assert_ne!(
                rig.region
                    .header()
                    .server_state
                    .load(std::sync::atomic::Ordering::Acquire),
                layout::SERVER_SERVING,
                "a failed start said it was serving"
            );
        }
    });
}

/// A device that cannot page-lock host memory: the server runs unpinned, as the loader does, and
/// says why; nothing is unpinned that was not pinned.
#[test]
fn a_device_that_cannot_pin_serves_unpinned_and_says_why() {
    within(120, || {
        let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
        let rig = pin_rig(HostDeviceConfig {
            no_pinning: true,
            ..HostDeviceConfig::default()
        });
        let pins = rig.host.pin_calls();
        let server = pin_start(&engine, &rig, pin_config(2, 2)).unwrap();
        assert_eq!(
            rig.host.pin_calls() - pins,
            1,
            "asked once, then stopped asking"
        );
        assert_eq!(server.stats().staging_pinned, 0);
        let note = server.staging_pinning().to_string();
        assert!(
            note.contains("not page-locked") && note.contains("cpu does not page-lock host memory"),
            "{note}"
        );
        pin_serve(&rig);
        server.shutdown();
        assert_eq!(rig.host.unpin_calls(), 0, "unpinned what was never pinned");
        assert_eq!(rig.host.pinned_bytes(), 0);
    });
}
