//! The ring server end to end on the real CUDA code path (`gpuio_cuda::cuda`) under the mock driver
//! (`tests/mock_libcuda.c`): the host region pinned and mapped with `cuMemHostRegister`, the device
//! region and the line memory in the mock's device memory, copies on a real `CudaStream`, and the
//! completion words published by the publisher `RingServer::start_auto` picks for the device.
//!
//! CPU producer threads play the kernel: they claim slots and write descriptors into the host
//! region exactly as `device/gpuio.cuh` does (the shared `RingProducer`), and poll completion words
//! in the mock's device memory (host memory at a fixed offset, `mock_device_bias`). The mock runs
//! queued stream work only when the host waits for it and, with `MOCK_CUDA_COPY_DELAY_US`, sleeps
//! before each copy moves its bytes, so a completion word written before its data is seen by the
//! polling producer; every read's bytes are checked the moment its word is seen. A publisher that
//! writes words before the data (`child_rings_early_publisher_is_caught`) is caught by exactly that
//! check, which shows the check can fail.
//!
//! Each scenario runs in a child process under the mock (see `common::mock`); every wait is bounded,
//! and the child itself runs under a watchdog and is killed by the parent after a bound.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::mock::{assert_all_released, assert_clean_calls, counter, is_child, run_child};
use gpuio::backend::BackendKind;
use gpuio::{DirectMode, File, OpenOptions, Result};
use gpuio_cuda::cuda::CudaDevice;
use gpuio_cuda::device::{CopyStream, DevicePtr, Ticket};
use gpuio_cuda::rings::layout::{code, OP_READ, OP_WRITE};
use gpuio_cuda::rings::{
    DeliveryPath, Publish, PublisherChoice, PublisherKind, Request, RingConfig, RingProducer,
    RingRegion, RingServer, ServerConfig,
};
use gpuio_cuda::{Device, DeviceBuffer};
use gpuio_testkit::{faulty_engine_with, scratch_dir, test_config, within, FaultPlan, Place, Rng};

const LINE: usize = 4096;
const LINES: u64 = 64;
const WAIT: Duration = Duration::from_secs(20);

// ---- parent side ----

/// The GPU path: `cuStreamWriteValue64_v2` after the copies, copies slowed down so an early word
/// would be seen; engine faults injected.
#[test]
fn mock_rings_stream_write_publisher() {
    run_child(
        "child_rings_stream_write",
        &[("MOCK_CUDA_COPY_DELAY_US", "300")],
    );
}

/// Each polling round delivered by one launch of the deliveries kernel (`gpuio_deliver`): the
/// producers check every read's bytes the moment its word is seen, with engine faults injected;
/// no read goes by DMA and no word by a stream write.
#[test]
fn mock_rings_kernel_delivery() {
    run_child(
        "child_rings_kernel_delivery",
        &[("MOCK_CUDA_COPY_DELAY_US", "300")],
    );
}

/// A device whose 64-bit stream memory operations are off (attribute 122 = 0, v1 API off): the
/// words are copied from pinned memory on the same stream after the data.
#[test]
fn mock_rings_copy_word_fallback() {
    run_child(
        "child_rings_copy_word",
        &[
            ("MOCK_CUDA_COPY_DELAY_US", "300"),
            ("MOCK_CUDA_ATTR_122", "0"),
        ],
    );
}

/// Only the v1 API enabled (as with `NVreg_EnableStreamMemOPs=1` on a driver whose v2 attribute
/// is 0): the v1 `cuStreamWriteValue64` is used.
#[test]
fn mock_rings_v1_stream_write() {
    run_child(
        "child_rings_v1_stream_write",
        &[
            ("MOCK_CUDA_ATTR_122", "0"),
            ("MOCK_CUDA_ATTR_92", "1"),
            ("MOCK_CUDA_ATTR_93", "1"),
        ],
    );
}

/// The negative control: a publisher that writes the words before the copies ran is caught.
#[test]
fn mock_rings_early_publisher_is_caught() {
    run_child(
        "child_rings_early_publisher_is_caught",
        &[("MOCK_CUDA_COPY_DELAY_US", "20000")],
    );
}

/// The staging slabs are registered with `cuMemHostRegister` once each at start and unregistered
/// once each at shutdown and on drop; a registration the driver refuses half way fails the start
/// with every earlier one unregistered.
#[test]
fn mock_rings_staging_is_registered_once_and_released() {
    run_child("child_rings_staging_registration", &[]);
}

#[test]
fn mock_rings_failed_registration_fails_start_cleanly() {
    // Call 1 registers the host region; 2 and 3 are thread 1's slabs, 4 thread 2's first.
    run_child(
        "child_rings_failed_registration",
        &[("MOCK_CUDA_FAIL_REGISTER_NTH", "4")],
    );
}

/// The workload kernels on a driver that refuses their image (the mock JIT-compiles nothing but the
/// copy kernel): a clear `Unsupported` naming the step, and nothing left loaded or retained.
#[test]
fn mock_rings_workloads_refused_cleanly() {
    run_child("child_rings_workloads_refused", &[]);
}

// ---- child side ----

#[test]
fn child_rings_workloads_refused() {
    if !is_child() {
        return;
    }
    within(60, || {
        let device: Arc<dyn Device> = CudaDevice::open(0).unwrap();
        let e = gpuio_cuda::rings::kernels::Workloads::load(&device).unwrap_err();
        assert_eq!(e.kind(), gpuio::ErrorKind::Unsupported, "{e}");
        assert!(
            e.to_string()
                .contains("cuda:0 cannot load the kernels: the driver refused the PTX"),
            "{e}"
        );
        // The module's own stream was never made, nothing is loaded, and its hold on the primary
        // context is released (the device's own hold remains until it is dropped).
        assert_eq!(counter("mock_live_modules"), 0);
        assert_eq!(counter("mock_live_streams"), 0);
        drop(device);
        assert_all_released();
    });
}

/// The bytes of `line` at `version` (0: as the file was created).
fn content(line: u64, version: u64) -> Vec<u8> {
    common::rings::line_content(LINE, line, version)
}

/// Reads `len` bytes of "device" memory at host address `host` word by word with atomic loads
/// (the mock may be copying into it right now, which is what the early-word check looks for).
fn snapshot(host: usize, len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| {
            // SAFETY: `host` is the host address of live, 8-aligned mock device memory.
            unsafe { AtomicU64::from_ptr((host + i * 8) as *mut u64) }
                .load(Ordering::Relaxed)
                .to_le_bytes()
        })
        .collect()
}

fn fill(host: usize, bytes: &[u8]) {
    // SAFETY: as for `snapshot`; no request on this range is in flight.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host as *mut u8, bytes.len()) };
}

/// What a scenario saw.
#[derive(Debug, Default)]
struct Seen {
    ok: u64,
    failed: u64,
    /// Reads whose word said success while their bytes were not (yet) the file's.
    early: u64,
}

struct Setup {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    device: Arc<dyn Device>,
    region: Arc<RingRegion>,
    lines: DeviceBuffer,
}

const PRODUCERS: usize = 4;
/// Device line slots (and completion words) per producer.
const SLOTS: usize = 8;

fn setup() -> Setup {
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("data.bin");
    let mut v = Vec::new();
    for l in 0..LINES {
        v.extend(content(l, 0));
    }
    std::fs::write(&path, v).unwrap();
    let device: Arc<dyn Device> = CudaDevice::open(0).unwrap();
    let region = Arc::new(
        RingRegion::new(
            &device,
            RingConfig {
                ring_count: 4,
                slots_per_ring: 16,
                completion_count: (PRODUCERS * SLOTS) as u32,
                ..RingConfig::default()
            },
        )
        .unwrap(),
    );
    assert!(
        region.host_mapped().is_some(),
        "the host region was not mapped"
    );
    let lines = DeviceBuffer::alloc(&device, PRODUCERS * SLOTS * LINE).unwrap();
    Setup {
        _dir: dir,
        path,
        device,
        region,
        lines,
    }
}

fn server_config() -> ServerConfig {
    ServerConfig {
        threads: 2,
        batch_max: 16,
        staging_bytes: 1 << 20,
        io_timeout: Duration::from_secs(10),
        ..ServerConfig::default()
    }
}

/// `PRODUCERS` threads, each `rounds` times submitting a batch of reads and writes of its own file
/// lines (line % PRODUCERS == thread) into its own device slots, then waiting for each; every read's
/// bytes are checked against the model when its word is seen; then the file is checked. `writes`:
/// a third of the requests are writes. A result other than success or EIO fails the test.
fn produce(s: &Setup, producer: &RingProducer, rounds: usize, writes: bool) -> (Seen, Vec<u64>) {
    let seen = std::thread::scope(|sc| {
        let mut hs = Vec::new();
        for t in 0..PRODUCERS {
            let p = producer.clone();
            let base = s.lines.ptr();
            hs.push(sc.spawn(move || producer_thread(t, &p, base, rounds, writes)));
        }
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut total = Seen::default();
    let mut ver = vec![0u64; LINES as usize];
    let mut maybe = vec![false; LINES as usize];
    for (sn, v, m) in seen {
        total.ok += sn.ok;
        total.failed += sn.failed;
        total.early += sn.early;
        for l in 0..LINES as usize {
            if l % PRODUCERS == v.0 {
                ver[l] = v.1[l];
                maybe[l] = m[l];
            }
        }
    }
    // Every line on disk: the model's version, or for a failed last write, word by word old or new.
    let disk = std::fs::read(&s.path).unwrap();
    for l in 0..LINES as usize {
        let got = &disk[l * LINE..(l + 1) * LINE];
        let ok = common::rings::line_on_disk_ok(LINE, got, l as u64, ver[l], maybe[l]);
        assert!(
            ok,
            "line {l} on disk is not version {} (maybe {})",
            ver[l], maybe[l]
        );
    }
    (total, ver)
}

#[allow(clippy::type_complexity)]
/// Every request's tag, unique across the process (never 0).
static NEXT_TAG: AtomicU32 = AtomicU32::new(1);

fn producer_thread(
    t: usize,
    p: &RingProducer,
    base: DevicePtr,
    rounds: usize,
    writes: bool,
) -> (Seen, (usize, Vec<u64>), Vec<bool>) {
    let mut rng = Rng::new(1000 + t as u64);
    let mut seen = Seen::default();
    let mut ver = vec![0u64; LINES as usize];
    let mut maybe = vec![false; LINES as usize];
    let mine: Vec<u64> = (0..LINES)
        .filter(|l| *l as usize % PRODUCERS == t)
        .collect();
    // Tags from one counter for the whole process: `produce` runs more than once on a region, and a
    // tag its completion word already holds would read as complete before the data (docs/rings.md,
    // 1.6).
    let next_tag = || NEXT_TAG.fetch_add(1, Ordering::Relaxed);
    for _ in 0..rounds {
        // A batch of distinct lines of this thread, each read or written.
        let k = 1 + rng.below(SLOTS as u64) as usize;
        let first = rng.below(mine.len() as u64) as usize;
        let mut batch = Vec::new();
        for j in 0..k {
            let line = mine[(first + j) % mine.len()];
            let op = if writes && rng.below(3) == 0 {
                OP_WRITE
            } else {
                OP_READ
            };
            let slot = t * SLOTS + j;
            let dev = base + (slot * LINE) as u64;
            if op == OP_WRITE {
                fill(p.host_address(dev), &content(line, ver[line as usize] + 1));
            } else {
                // Poison the slot, so bytes not delivered yet cannot pass for the file's.
                fill(p.host_address(dev), &[0xEE; LINE]);
            }
            let tag = next_tag();
            let req = Request {
                opcode: op,
                file_id: 0,
                offset: line * LINE as u64,
                length: LINE as u32,
                completion: slot as u32,
                dev_addr: dev,
                tag,
            };
            let mut retries = 0;
            let ring = rng.below(4) as u32;
            p.submit_until(ring, &req, Instant::now() + WAIT, &mut retries)
                .unwrap_or_else(|e| panic!("submit: {}", code::name(e)));
            batch.push((op, line, slot, dev, tag));
        }
        for (op, line, slot, dev, tag) in batch {
            let deadline = Instant::now() + WAIT;
            let r = loop {
                if let Some(r) = p.poll(slot as u32, tag) {
                    break r;
                }
                assert!(
                    Instant::now() < deadline,
                    "request {tag} never completed (server running: {})",
                    p.region().serving()
                );
                std::hint::spin_loop();
            };
            let l = line as usize;
            if r == LINE as i32 {
                seen.ok += 1;
                if op == OP_READ {
                    // Checked at once: the word must not be visible before the bytes.
                    if snapshot(p.host_address(dev), LINE) != content(line, ver[l]) {
                        seen.early += 1;
                    }
                } else {
                    ver[l] += 1;
                    maybe[l] = false;
                }
            } else {
                assert_eq!(r, code::EIO, "unexpected result {}", code::name(r));
                seen.failed += 1;
                if op == OP_WRITE {
                    maybe[l] = true;
                }
            }
        }
    }
    (seen, (t, ver), maybe)
}

fn open_rw(path: &std::path::Path) -> File {
    OpenOptions::read_write()
        .direct(DirectMode::Off)
        .open(path)
        .unwrap()
}

/// The full scenario with the publisher the device calls for, which must be `want`, and the rounds
/// delivered by `delivery`.
fn serve_and_check(
    want: PublisherKind,
    symbol: &str,
    faults: bool,
    rounds: usize,
    delivery: DeliveryPath,
) {
    let s = setup();
    let plan = if faults {
        FaultPlan::none()
            .with_read_eio(0.05)
            .with_write_eio(0.05)
            .with_short_read(0.2)
            .with_eintr(0.1)
    } else {
        FaultPlan::none()
    };
    let (engine, injected) =
        faulty_engine_with(test_config(BackendKind::Threads), 7, plan).unwrap();
    let server = RingServer::start_auto(
        &engine,
        s.region.clone(),
        vec![open_rw(&s.path)],
        (s.lines.ptr(), s.lines.len()),
        ServerConfig {
            delivery,
            // Small rounds that fill up: the kernel's descriptor array then holds a full round
            // and the taken hints in one launch.
            batch_max: if delivery == DeliveryPath::Kernel {
                4
            } else {
                server_config().batch_max
            },
            ..server_config()
        },
    )
    .unwrap();
    let by_kernel = delivery == DeliveryPath::Kernel;
    assert_eq!(
        server.delivery().starts_with("kernel"),
        by_kernel,
        "{}",
        server.delivery()
    );
    let choice = server.publisher().cloned().unwrap();
    assert_eq!(choice.kind, want, "{choice:?}");
    assert!(choice.reason.contains(symbol), "{choice:?}");
    assert_eq!(
        choice,
        PublisherChoice::for_device(s.device.as_ref()),
        "start_auto and for_device disagree"
    );
    let bias = counter("mock_device_bias") as u64;
    // SAFETY: the mock's device memory is host memory at `device address - bias`
    // (mock_libcuda.c, DEV_BIAS), live while `s` is.
    let producer = unsafe { RingProducer::with_device_bias(s.region.clone(), bias) };
    let writes_before = counter("mock_stream_writes");
    let (deliveries_before, h2d_before) = (counter("mock_deliveries"), counter("mock_h2d_copies"));
    // From here the CPU producers play a kernel that spins on the rings: the server may load no
    // code now (a GPU driver's lazy loading would deadlock).
    counter("mock_kernel_started");
    let (seen, _) = {
        let stats_seen = produce(&s, &producer, rounds, true);
        counter("mock_kernel_stopped");
        let stats = server.shutdown();
        eprintln!("{want}: {:?}; {stats:?}", stats_seen.0);
        assert_eq!(stats.requests, stats_seen.0.ok + stats_seen.0.failed);
        assert_eq!(stats.errors, stats_seen.0.failed);
        stats_seen
    };
    assert_eq!(seen.early, 0, "a completion was visible before its data");
    assert!(seen.ok > 0, "{seen:?}");
    let f = injected.counts();
    if faults {
        assert!(
            seen.failed > 0 || f.read_eio + f.write_eio == 0,
            "{seen:?} {f:?}"
        );
    } else {
        assert_eq!(seen.failed, 0, "{seen:?}");
    }
    let stream_writes = counter("mock_stream_writes") - writes_before;
    let deliveries = (counter("mock_deliveries") - deliveries_before) as u64;
    if by_kernel {
        // Every request's word (and every read's bytes) went out through the kernel: no DMA, no
        // stream write (no delivery failed here, so the publisher never stood in).
        assert!(
            deliveries >= seen.ok + seen.failed,
            "{deliveries} deliveries for {} requests",
            seen.ok + seen.failed
        );
        assert_eq!(stream_writes, 0);
        assert_eq!(
            counter("mock_h2d_copies"),
            h2d_before,
            "reads copied by DMA"
        );
    } else {
        assert_eq!(
            deliveries, 0,
            "the copies path launched the deliveries kernel"
        );
    }
    match want {
        _ if by_kernel => {}
        PublisherKind::StreamWrite => assert!(
            stream_writes as u64 >= seen.ok + seen.failed,
            "{stream_writes} stream writes for {} requests",
            seen.ok + seen.failed
        ),
        _ => assert_eq!(stream_writes, 0, "the fallback used stream writes"),
    }
    assert_clean_calls();
    drop(producer);
    drop(s);
    drop(engine);
    assert_all_released();
}

#[test]
fn child_rings_stream_write() {
    if !is_child() {
        return;
    }
    within(240, || {
        serve_and_check(
            PublisherKind::StreamWrite,
            "cuStreamWriteValue64_v2",
            true,
            40,
            DeliveryPath::Copies,
        )
    });
}

#[test]
fn child_rings_copy_word() {
    if !is_child() {
        return;
    }
    within(240, || {
        serve_and_check(
            PublisherKind::CopyWord,
            "CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS (122) is 0",
            true,
            40,
            DeliveryPath::Copies,
        )
    });
}

#[test]
fn child_rings_v1_stream_write() {
    if !is_child() {
        return;
    }
    within(240, || {
        serve_and_check(
            PublisherKind::StreamWrite,
            "cuStreamWriteValue64 on",
            false,
            10,
            DeliveryPath::Copies,
        )
    });
}

#[test]
fn child_rings_kernel_delivery() {
    if !is_child() {
        return;
    }
    within(240, || {
        serve_and_check(
            PublisherKind::StreamWrite,
            "cuStreamWriteValue64_v2",
            true,
            40,
            DeliveryPath::Kernel,
        )
    });
}

/// Writes the words at once, before the copies queued ahead of them have run: what a publisher
/// that ignores stream order would do.
#[derive(Debug)]
struct EarlyPublish {
    bias: u64,
}

impl Publish for EarlyPublish {
    fn publish(
        &mut self,
        _stream: &mut dyn CopyStream,
        _after: Option<Ticket>,
        words: &[(DevicePtr, u64)],
    ) -> Result<()> {
        for &(addr, w) in words {
            // SAFETY: completion words are live mock device memory at `addr - bias`.
            unsafe { AtomicU64::from_ptr(addr.wrapping_sub(self.bias) as *mut u64) }
                .store(w, Ordering::Release);
        }
        Ok(())
    }
}

#[test]
fn child_rings_early_publisher_is_caught() {
    if !is_child() {
        return;
    }
    within(240, || {
        let s = setup();
        let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
        let bias = counter("mock_device_bias") as u64;
        let server = RingServer::start(
            &engine,
            s.region.clone(),
            vec![open_rw(&s.path)],
            (s.lines.ptr(), s.lines.len()),
            &|| Box::new(EarlyPublish { bias }) as Box<dyn Publish>,
            server_config(),
        )
        .unwrap();
        // SAFETY: as in serve_and_check.
        let producer = unsafe { RingProducer::with_device_bias(s.region.clone(), bias) };
        let (seen, _) = produce(&s, &producer, 2, false);
        server.shutdown();
        assert!(
            seen.early > 0,
            "no completion was seen before its data with a publisher that writes words first: the check cannot fail ({seen:?})"
        );
        eprintln!("early publisher caught: {seen:?}");
    });
}

#[test]
fn child_rings_staging_registration() {
    if !is_child() {
        return;
    }
    within(240, || {
        let s = setup();
        let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
        let cfg = server_config();
        let slabs = (cfg.threads * cfg.rounds_in_flight) as i64;
        for explicit in [true, false] {
            let (calls, unreg, live) = (
                counter("mock_register_calls"),
                counter("mock_unregister_calls"),
                counter("mock_registered"),
            );
            let server = RingServer::start_auto(
                &engine,
                s.region.clone(),
                vec![open_rw(&s.path)],
                (s.lines.ptr(), s.lines.len()),
                cfg.clone(),
            )
            .unwrap();
            // The stream-write publisher registers nothing of its own: every new registration is
            // a staging slab.
            assert_eq!(server.publisher().unwrap().kind, PublisherKind::StreamWrite);
            assert_eq!(counter("mock_register_calls") - calls, slabs);
            assert_eq!(counter("mock_registered") - live, slabs);
            assert_eq!(server.stats().staging_pinned, slabs as u64);
            let bias = counter("mock_device_bias") as u64;
            // SAFETY: as in serve_and_check.
            let producer = unsafe { RingProducer::with_device_bias(s.region.clone(), bias) };
            // Reads only: each iteration checks against the file as created.
            let (seen, _) = produce(&s, &producer, 4, false);
            assert_eq!((seen.early, seen.failed), (0, 0), "{seen:?}");
            if explicit {
                server.shutdown();
            } else {
                drop(server);
            }
            assert_eq!(counter("mock_unregister_calls") - unreg, slabs);
            assert_eq!(counter("mock_registered"), live, "a slab left registered");
            assert_eq!(counter("mock_register_calls") - calls, slabs);
        }
        assert_clean_calls();
        drop(s);
        drop(engine);
        assert_all_released();
    });
}

#[test]
fn child_rings_failed_registration() {
    if !is_child() {
        return;
    }
    within(240, || {
        let s = setup();
        assert_eq!(
            counter("mock_register_calls"),
            1,
            "the region registers once"
        );
        let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
        let e = RingServer::start_auto(
            &engine,
            s.region.clone(),
            vec![open_rw(&s.path)],
            (s.lines.ptr(), s.lines.len()),
            server_config(),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("page-locking staging slab 1 of 2")
                && msg.contains("polling thread 2 of 2"),
            "{msg}"
        );
        assert!(msg.contains("cuMemHostRegister"), "{msg}");
        assert_eq!(counter("mock_register_calls"), 4);
        assert_eq!(
            counter("mock_unregister_calls"),
            2,
            "thread 1's slabs unregistered once"
        );
        assert_eq!(
            counter("mock_registered"),
            1,
            "only the region is registered"
        );
        assert!(!s.region.serving(), "a failed start said it was serving");
        assert_clean_calls();
        drop(s);
        drop(engine);
        assert_all_released();
    });
}
