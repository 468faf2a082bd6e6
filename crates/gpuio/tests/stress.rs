//! Stress: several application threads commit thousands of command buffers — loads with their own
//! buffers, batches into one shared (sometimes registered) buffer, stores followed by a barrier and
//! a load-back — on queues of every priority and kind, and cancel or drop some of them mid-flight.
//! Every byte of every completed load is checked against a model of the file; every wait is bounded
//! (a hang fails the test); at the end every buffer is back in its pool and the memory budget is
//! where it started (nothing leaked, nothing still owned by the engine).
//!
//! `GPUIO_STRESS_ROUNDS=<n>` sets the command buffers per thread (default 1,000).

use std::sync::Arc;
use std::time::Duration;

use gpuio::backend::BackendKind;
use gpuio::{
    AlignedBuf, BufferPool, CommandId, Engine, EngineConfig, File, IoBuffer, IoQueue, MemoryBudget,
    OpenOptions, Priority, QueueDesc, QueueKind, Status,
};
use gpuio_testkit::{scratch_dir, test_config, working_kinds, Place, Rng};

const WAIT: Duration = Duration::from_secs(60);
const THREADS: usize = 4;
/// Bytes of the shared file each thread owns for its stores.
const REGION: usize = 256 << 10;

fn rounds() -> usize {
    std::env::var("GPUIO_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Read-only content: every 4-byte word holds its offset.
fn content(len: usize) -> Vec<u8> {
    (0..len.div_ceil(4) as u32)
        .flat_map(|i| (i * 4).to_le_bytes())
        .take(len)
        .collect()
}

/// What a thread does with a command buffer after committing it.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Wait,
    Cancel,
    Drop,
}

struct World {
    data: Arc<Vec<u8>>,
    /// The same read-only content on disk (cold, direct) and on tmpfs.
    inputs: Vec<File>,
    /// Stores go here, each thread into its own region.
    output: File,
    queues: Vec<IoQueue>,
    pool: BufferPool,
}

fn thread_body(w: &World, t: usize, seed: u64) -> (usize, usize, usize) {
    let mut rng = Rng::new(seed);
    let mut region = vec![0u8; REGION];
    let mut region_written = vec![false; REGION];
    let (mut verified, mut cancelled, mut dropped) = (0, 0, 0);
    let data = &w.data;
    for round in 0..rounds() {
        let queue = &w.queues[rng.below(w.queues.len() as u64) as usize];
        let file = &w.inputs[rng.below(w.inputs.len() as u64) as usize];
        let fate = match rng.below(10) {
            0 => Fate::Cancel,
            1 => Fate::Drop,
            _ => Fate::Wait,
        };
        let mut cb = queue.command_buffer();
        // What each command should find: (command index, expected bytes, where in which buffer).
        let mut expect: Vec<(CommandId, usize, usize, bool)> = Vec::new(); // (cmd, data off, len, shared)
        let mut buf_offsets: Vec<usize> = Vec::new();
        match rng.below(3) {
            // Loads into their own buffers, unaligned offsets, lengths and buffer starts.
            0 => {
                for _ in 0..1 + rng.below(6) {
                    let len = 1 + rng.below(200_000) as usize;
                    let off = rng.below((data.len() - len) as u64) as usize;
                    let pad = rng.below(3) as usize * 17;
                    let id = cb
                        .load_range(
                            file,
                            off as u64,
                            AlignedBuf::new(len + pad, 4096).unwrap(),
                            pad,
                            len as u64,
                            true,
                        )
                        .unwrap();
                    expect.push((id, off, len, false));
                    buf_offsets.push(pad);
                }
            }
            // A batch into one shared buffer, registered (from the pool) half the time.
            1 => {
                let shared: IoBuffer = if rng.chance(0.5) {
                    w.pool.get().into()
                } else {
                    AlignedBuf::new(w.pool.buf_size(), 4096).unwrap().into()
                };
                let cap = shared.len();
                cb.set_buffer(shared).unwrap();
                let mut at = 0;
                for _ in 0..1 + rng.below(64) {
                    let len = 1 + rng.below(8192) as usize;
                    if at + len > cap {
                        break;
                    }
                    let off = rng.below((data.len() - len) as u64) as usize;
                    let id = cb.load_into(file, off as u64, at, len).unwrap();
                    expect.push((id, off, len, true));
                    buf_offsets.push(at);
                    at += len + rng.below(32) as usize;
                }
            }
            // A store into this thread's region, a barrier, and a load of it back.
            _ => {
                let len = 1 + rng.below(64 << 10) as usize;
                let at = rng.below((REGION - len) as u64) as usize;
                let mut src = vec![0u8; len];
                rng.fill(&mut src);
                let mut out = AlignedBuf::new(len, 4096).unwrap();
                out.copy_from_slice(&src);
                let file_off = (t * REGION + at) as u64;
                cb.store(&w.output, file_off, out).unwrap();
                cb.barrier();
                let id = cb
                    .load(&w.output, file_off, AlignedBuf::new(len, 4096).unwrap())
                    .unwrap();
                // A store is only modelled when it is waited for (a cancelled or dropped one may
                // or may not land); such command buffers are always waited for.
                let c = cb.commit().unwrap();
                let status = c
                    .wait_timeout(WAIT)
                    .unwrap_or_else(|| panic!("thread {t} round {round}: store hung"));
                assert!(status.is_complete(), "thread {t} round {round}: {status:?}");
                let (_, mut done) = c.wait_parts();
                let back = done.take_buffer(id).unwrap();
                assert!(
                    back[..] == src[..],
                    "thread {t} round {round}: load after barrier differs from the store"
                );
                region[at..at + len].copy_from_slice(&src);
                region_written[at..at + len]
                    .iter_mut()
                    .for_each(|b| *b = true);
                verified += 1;
                continue;
            }
        }
        let c = cb.commit().unwrap();
        match fate {
            Fate::Drop => {
                dropped += 1;
                drop(c);
                continue;
            }
            Fate::Cancel => {
                c.try_cancel();
            }
            Fate::Wait => {}
        }
        let status = c
            .wait_timeout(WAIT)
            .unwrap_or_else(|| panic!("thread {t} round {round}: command buffer hung ({fate:?})"));
        let (_, mut done) = c.wait_parts();
        match status {
            Status::Complete => {
                let shared = done.take_shared_buffer();
                for (&(id, off, len, in_shared), &at) in expect.iter().zip(&buf_offsets) {
                    assert_eq!(done.bytes(id), len as u64, "thread {t} round {round}");
                    let got = if in_shared {
                        shared.as_ref().unwrap()[at..at + len].to_vec()
                    } else {
                        done.take_buffer(id).unwrap()[at..at + len].to_vec()
                    };
                    assert!(
                        got == data[off..off + len],
                        "thread {t} round {round}: {len} bytes at {off} wrong"
                    );
                }
                verified += 1;
            }
            Status::Cancelled => {
                // Buffers come back from a cancelled command buffer too.
                if expect.iter().any(|e| e.3) {
                    assert!(
                        done.take_shared_buffer().is_some(),
                        "thread {t}: shared buffer lost on cancel"
                    );
                }
                cancelled += 1;
            }
            other => panic!("thread {t} round {round}: {other:?}"),
        }
    }
    // The stores this thread waited for are all in the file.
    let written = std::fs::read(w.output.path()).unwrap();
    for i in 0..REGION {
        if region_written[i] {
            assert_eq!(
                written[t * REGION + i],
                region[i],
                "thread {t}: stored byte {i} lost"
            );
        }
    }
    (verified, cancelled, dropped)
}

#[test]
fn threads_commit_cancel_and_drop_thousands_of_command_buffers() {
    let data = Arc::new(content(16 << 20));
    let disk = scratch_dir(Place::Disk);
    let shm = scratch_dir(Place::Shm);
    std::fs::write(disk.path().join("in.bin"), &*data).unwrap();
    std::fs::write(shm.path().join("in.bin"), &*data).unwrap();
    for kind in working_kinds() {
        if kind == BackendKind::Mmap {
            continue; // the mmap engine's reads are copies; covered by the other tests
        }
        let budget = MemoryBudget::new(512 << 20);
        let config = EngineConfig {
            memory_budget: budget.clone(),
            ..test_config(kind)
        };
        let engine = Engine::new(config).unwrap();
        let baseline = budget.used_bytes();
        {
            let queues = vec![
                engine
                    .queue(QueueDesc::default().with_priority(Priority::High))
                    .unwrap(),
                engine.queue(QueueDesc::default()).unwrap(),
                engine
                    .queue(QueueDesc::default().with_priority(Priority::Low))
                    .unwrap(),
                engine
                    .queue(QueueDesc {
                        kind: QueueKind::Serial,
                        ..QueueDesc::default()
                    })
                    .unwrap(),
            ];
            let out_path = disk.path().join(format!("out-{kind}.bin"));
            let world = World {
                data: data.clone(),
                inputs: vec![
                    OpenOptions::read()
                        .cold(true)
                        .open(disk.path().join("in.bin"))
                        .unwrap(),
                    File::open(shm.path().join("in.bin")).unwrap(),
                ],
                output: OpenOptions::create()
                    .truncate(true)
                    .open(&out_path)
                    .unwrap(),
                queues,
                pool: engine.buffer_pool(256 << 10, 8).unwrap(),
            };
            world.output.set_len((THREADS * REGION) as u64).unwrap();
            let totals: Vec<(usize, usize, usize)> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let w = &world;
                        s.spawn(move || thread_body(w, t, 0x57E55 + t as u64))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let (v, c, d) = totals
                .iter()
                .fold((0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
            eprintln!("{kind}: {v} verified, {c} cancelled, {d} dropped");
            assert!(v > 0 && d > 0, "{kind}: the mix did not happen");
            // Dropped command buffers finish on their own; then every pool buffer is back.
            let deadline = std::time::Instant::now() + WAIT;
            while world.pool.available() < world.pool.count() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{kind}: pool buffers never came back"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Queues, files and the pool are gone; dropping the engine drains and stops its thread.
        // The pool was registered with the engine and lives as long as it: release both.
        drop(engine);
        assert_eq!(
            budget.used_bytes(),
            0,
            "{kind}: memory still charged after the engine stopped (baseline {baseline})"
        );
    }
}
