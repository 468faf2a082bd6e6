//! Caller memory lent to the engine (`AlignedBuf::from_raw_parts`), through the whole engine.
//!
//! Every backend that starts here (io_uring, thread pool, mmap) × direct I/O on (`/tmp`, ext4) and off:
//! loads into lent memory at aligned and unaligned addresses, offsets and lengths, a short read at end
//! of file, a batch into one lent shared buffer, and a store from lent memory. Each checks the bytes
//! against the file, that the keep-alive is dropped exactly once after the caller lets the buffer go,
//! and — with O_DIRECT on a backend that honours it — that an aligned buffer goes to the device with no
//! bounce (the queue's `bounce_bytes` does not move) while a misaligned one is bounced by the engine.
//! Then the same loads over a fault-injecting backend (`gpuio-testkit`'s `FaultBackend`): EINTR and
//! short reads are hidden and the bytes still right; EIO fails the command with a typed error naming
//! the file and offset; the keep-alive is released once either way.

use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use gpuio::backend::BackendKind;
use gpuio::{AlignedBuf, DirectMode, ErrorKind, File, IoQueue, OpenOptions, QueueDesc, Status};
use gpuio_testkit::{engines, faulty_engine, scratch_dir, FaultPlan, Place};

/// Length of the test file: not a multiple of any block size.
const FILE_BYTES: usize = (1 << 20) + 3 * 4096 + 777;

/// Counts its drops (the keep-alive under test).
struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Caller memory: a heap allocation with room to place a slice at any alignment.
struct Mem {
    v: Vec<u8>,
}

impl Mem {
    fn new(len: usize) -> Mem {
        Mem {
            v: vec![0xEE; len + 2 * 4096],
        }
    }
    /// `len` bytes at an address that is `misalign` past a 4096-byte boundary.
    fn at(&mut self, misalign: usize, len: usize) -> &mut [u8] {
        let skew = (4096 - self.v.as_ptr() as usize % 4096) % 4096;
        &mut self.v[skew + misalign..skew + misalign + len]
    }
}

/// `mem` lent to the engine, and its keep-alive's drop counter.
fn lend(mem: &mut [u8]) -> (AlignedBuf, Arc<AtomicUsize>) {
    let drops = Arc::new(AtomicUsize::new(0));
    let ptr = NonNull::new(mem.as_mut_ptr()).unwrap();
    // SAFETY: every test reads `mem` only after the buffer was dropped (the counter proves it).
    let buf =
        unsafe { AlignedBuf::from_raw_parts(ptr, mem.len(), Box::new(Counted(drops.clone()))) }
            .unwrap();
    (buf, drops)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn open(path: &Path, direct: bool) -> File {
    let mode = if direct {
        DirectMode::Auto
    } else {
        DirectMode::Off
    };
    let f = OpenOptions::read_write().direct(mode).open(path).unwrap();
    if direct {
        assert!(
            f.is_direct(),
            "{}: expected O_DIRECT in the temporary directory: {}",
            path.display(),
            f.direct_reason()
        );
    }
    f
}

/// Loads `len` bytes at `offset` into lent memory `misalign` past a page; checks bytes, the keep-alive
/// and (when `expect_bounce` says) whether the engine bounced. Returns the bytes bounced.
fn load_case(
    label: &str,
    q: &IoQueue,
    f: &File,
    data: &[u8],
    (misalign, offset, len): (usize, usize, usize),
) -> u64 {
    let mut mem = Mem::new(len);
    let dst = mem.at(misalign, len);
    let (buf, drops) = lend(dst);
    let bounce0 = q.stats().bounce_bytes;
    let mut cb = q.command_buffer();
    let id = cb.load_upto(f, offset as u64, buf).unwrap();
    let mut done = cb
        .commit()
        .unwrap()
        .finish()
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = &data[offset.min(data.len())..(offset + len).min(data.len())];
    assert_eq!(done.bytes(id), want.len() as u64, "{label}: bytes read");
    let back = done.take_buffer(id).unwrap();
    assert!(back.is_foreign(), "{label}: the lent buffer comes back");
    assert_eq!(
        drops.load(Ordering::SeqCst),
        0,
        "{label}: held until let go"
    );
    drop((back, done));
    assert_eq!(drops.load(Ordering::SeqCst), 1, "{label}: released once");
    let dst = mem.at(misalign, len);
    assert!(dst[..want.len()] == *want, "{label}: bytes differ");
    assert!(
        dst[want.len()..].iter().all(|&b| b == 0xEE),
        "{label}: wrote past the bytes read"
    );
    q.stats().bounce_bytes - bounce0
}

#[test]
fn loads_and_stores_through_lent_memory_on_every_backend() {
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("data.bin");
    let data = pattern(FILE_BYTES, 1);
    std::fs::write(&path, &data).unwrap();
    let mut ran = Vec::new();
    for (name, engine) in engines() {
        let kind = engine.backend_kind();
        for direct in [true, false] {
            let label = format!("{name} direct={direct}");
            let f = open(&path, direct);
            let q = engine.queue(QueueDesc::default()).unwrap();
            // Aligned address, offset and length: straight to the device.
            let bounced = load_case(&label, &q, &f, &data, (0, 8192, 256 << 10));
            assert_eq!(
                bounced, 0,
                "{label}: an aligned lent buffer is never bounced"
            );
            // One block, as in 4 KiB random reads.
            load_case(&label, &q, &f, &data, (0, 4096 * 7, 4096));
            // Misaligned address: correct bytes; with O_DIRECT the engine bounces.
            let bounced = load_case(&label, &q, &f, &data, (1, 8192, 100_000));
            if direct && kind != BackendKind::Mmap {
                assert!(bounced > 0, "{label}: a misaligned buffer must be bounced");
            }
            // Misaligned offset and length, co-aligned address: head and tail only.
            load_case(&label, &q, &f, &data, (517, 4096 + 517, 70_001));
            // Across the end of the file: a short read, nothing written past it.
            load_case(&label, &q, &f, &data, (0, FILE_BYTES - 5000, 16384));

            // A batch of small reads into one lent shared buffer.
            let mut mem = Mem::new(64 * 4096);
            let (buf, drops) = lend(mem.at(0, 64 * 4096));
            let mut cb = q.command_buffer();
            cb.set_buffer(buf).unwrap();
            let offs: Vec<usize> = (0..64).map(|i| (i * 37 % 250) * 4096).collect();
            let ids: Vec<_> = offs
                .iter()
                .enumerate()
                .map(|(i, &o)| cb.load_into(&f, o as u64, i * 4096, 4096).unwrap())
                .collect();
            let mut done = cb.commit().unwrap().finish().unwrap();
            assert!(ids.iter().all(|&id| done.bytes(id) == 4096), "{label}");
            assert!(done.take_shared_buffer().unwrap().is_foreign());
            drop(done);
            assert_eq!(
                drops.load(Ordering::SeqCst),
                1,
                "{label}: batch released once"
            );
            let got = mem.at(0, 64 * 4096);
            for (i, &o) in offs.iter().enumerate() {
                assert!(
                    got[i * 4096..(i + 1) * 4096] == data[o..o + 4096],
                    "{label}: batch item {i}"
                );
            }

            // A store from lent memory, read back through a plain read.
            let src = pattern(12_345, 9);
            let wpath = dir.path().join(format!("w-{name}-{direct}.bin"));
            let wf = OpenOptions::create()
                .direct(if direct {
                    DirectMode::Auto
                } else {
                    DirectMode::Off
                })
                .open(&wpath)
                .unwrap();
            let mut mem = Mem::new(src.len());
            mem.at(3, src.len()).copy_from_slice(&src);
            let (buf, drops) = lend(mem.at(3, src.len()));
            let mut cb = q.command_buffer();
            cb.store(&wf, 4096, buf).unwrap();
            cb.commit().unwrap().finish().unwrap();
            assert_eq!(drops.load(Ordering::SeqCst), 1, "{label}: store released");
            let back = std::fs::read(&wpath).unwrap();
            assert!(back[4096..] == src[..], "{label}: stored bytes");
            ran.push(label);
        }
    }
    assert!(
        ran.iter().any(|l| l.starts_with("threads")),
        "the thread pool always runs: {ran:?}"
    );
}

#[test]
fn lent_memory_under_injected_faults() {
    let dir = scratch_dir(Place::Disk);
    let path = dir.path().join("data.bin");
    let data = pattern(FILE_BYTES, 2);
    std::fs::write(&path, &data).unwrap();
    for kind in gpuio_testkit::working_kinds() {
        for direct in [true, false] {
            let label = format!("{} direct={direct}", kind.name());
            // EINTR and short reads: hidden by the engine; the bytes are right.
            let plan = FaultPlan::none().with_eintr(0.3).with_short_read(0.3);
            let (engine, faults) = faulty_engine(7, plan, kind).unwrap();
            let q = engine.queue(QueueDesc::default()).unwrap();
            let f = open(&path, direct);
            for (i, case) in [(0, 0, 512 << 10), (1, 4096, 300_001), (0, 12288, 4096)]
                .into_iter()
                .enumerate()
            {
                load_case(&format!("{label} benign {i}"), &q, &f, &data, case);
            }
            let c = faults.counts();
            assert!(
                c.transients() > 0 && c.shorts() > 0,
                "{label}: faults fired: {c:?}"
            );
            assert!(q.stats().retries > 0, "{label}: EINTR retried");

            // EIO: the command fails naming the file and an offset in its range; memory released.
            let (engine, faults) =
                faulty_engine(8, FaultPlan::none().with_read_eio(1.0), kind).unwrap();
            let q = engine.queue(QueueDesc::default()).unwrap();
            let mut mem = Mem::new(64 << 10);
            let (buf, drops) = lend(mem.at(0, 64 << 10));
            let mut cb = q.command_buffer();
            cb.load(&f, 8192, buf).unwrap();
            let (status, done) = cb.commit().unwrap().wait_parts();
            let e = match &status {
                Status::Error(errs) => errs[0].error.clone(),
                other => panic!("{label}: EIO must fail the read, got {other:?}"),
            };
            assert_eq!(e.kind(), ErrorKind::Io, "{label}: {e}");
            assert_eq!(e.path(), Some(path.as_path()), "{label}: {e}");
            let off = e
                .offset()
                .unwrap_or_else(|| panic!("{label}: no offset: {e}"));
            assert!((8192..8192 + (64 << 10)).contains(&off), "{label}: {e}");
            assert!(faults.counts().hard_errors() > 0, "{label}: EIO fired");
            drop(done);
            assert_eq!(
                drops.load(Ordering::SeqCst),
                1,
                "{label}: released after EIO"
            );

            // The engine shut down with a failing read in flight: released once, by the engine.
            let (engine, _faults) = faulty_engine(
                9,
                FaultPlan::none()
                    .with_read_eio(0.5)
                    .with_delay(1.0, std::time::Duration::from_millis(5)),
                kind,
            )
            .unwrap();
            let q = engine.queue(QueueDesc::default()).unwrap();
            let (buf, drops) = lend(mem.at(0, 64 << 10));
            let mut cb = q.command_buffer();
            cb.load(&f, 0, buf).unwrap();
            let c = cb.commit().unwrap();
            drop((c, q, engine));
            assert_eq!(
                drops.load(Ordering::SeqCst),
                1,
                "{label}: released at shutdown"
            );
        }
    }
}
