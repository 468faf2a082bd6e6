//! The direct load path ([`load_range_direct`]) on the host-memory stand-in, whose direct reader
//! `pread`s straight into "device" memory: the same chunking, threading and error code that drives
//! cuFile on a GPU. Every load is checked byte for byte against the file, and the bytes around the
//! destination range against a sentinel (nothing written outside it); every failure must name the
//! file and offset and leave no read running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuio::{DirectMode, ErrorKind, File, OpenOptions};
use gpuio_cuda::device::DirectRead;
use gpuio_cuda::{
    load_range_direct, Device, DeviceBuffer, DevicePtr, DirectConfig, HostDevice, HostDeviceConfig,
};
use gpuio_testkit::{scratch_dir, Place, Rng};

const SENTINEL: u8 = 0xA5;
const PAGE: u64 = 4096;

fn write_file(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut bytes = vec![0u8; len];
    Rng::new(seed).fill(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// The file opened through the page cache and, where the filesystem allows, with `O_DIRECT`.
fn open_both(path: &Path) -> Vec<(&'static str, File)> {
    let buffered = OpenOptions::read()
        .direct(DirectMode::Off)
        .open(path)
        .unwrap();
    assert!(!buffered.is_direct());
    let mut files = vec![("buffered", buffered)];
    match OpenOptions::read().direct(DirectMode::On).open(path) {
        Ok(direct) => {
            assert!(direct.is_direct(), "{}", direct.direct_reason());
            files.push(("direct", direct));
        }
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            eprintln!(
                "O_DIRECT unavailable for {}: only buffered runs: {e}",
                path.display()
            )
        }
        Err(e) => panic!("opening {} with O_DIRECT: {e}", path.display()),
    }
    files
}

/// A stand-in device offering direct reads (failing the `fail_nth` one), as the loaders see it.
fn device(fail_nth: Option<u64>) -> (HostDevice, Arc<dyn Device>, Arc<dyn DirectRead>) {
    let dev = HostDevice::new(HostDeviceConfig {
        direct_reads: true,
        fail_direct_read_nth: fail_nth,
        ..HostDeviceConfig::default()
    });
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let reader = device.direct_reader().unwrap();
    (dev, device, reader)
}

/// A device buffer of `len` bytes, every byte `SENTINEL`.
fn sentinel_buffer(device: &Arc<dyn Device>, len: usize) -> DeviceBuffer {
    let buf = DeviceBuffer::alloc(device, len).unwrap();
    let src = vec![SENTINEL; len];
    let mut stream = device.copy_stream().unwrap();
    // SAFETY: src outlives the synchronize below; the destination is the whole live buffer.
    unsafe { stream.copy_h2d_async(src.as_ptr(), len, buf.ptr()) }.unwrap();
    stream.synchronize().unwrap();
    buf
}

fn read_back(buf: &DeviceBuffer) -> Vec<u8> {
    let mut v = vec![0u8; buf.len()];
    buf.read(0, &mut v).unwrap();
    v
}

/// Chunks of a range, counted independently of the driver: the first starts at `offset`, each later
/// one at the next multiple of `chunk` past `offset` rounded down to the page.
fn expected_chunks(offset: u64, len: u64, chunk: u64) -> usize {
    let (base, end) = (offset / PAGE * PAGE, offset + len);
    let mut at = offset;
    let mut n = 0;
    while at < end {
        let mut next = base;
        while next <= at {
            next += chunk;
        }
        at = next.min(end);
        n += 1;
    }
    n
}

fn cfg(threads: usize, chunk_bytes: usize) -> DirectConfig {
    DirectConfig {
        threads,
        chunk_bytes,
    }
}

#[test]
fn loads_are_byte_exact_for_every_thread_count_chunk_size_length_and_file_mode() {
    let dir = scratch_dir(Place::Disk);
    let file_len = (3 << 20) + (512 << 10) + 777;
    let (path, want) = write_file(dir.path(), "data", file_len, 1);
    let cases: [(u64, u64); 9] = [
        (0, 0),
        (4096, 0),
        (0, 1),
        (12_345, 1),
        (4095, 100_003),
        (8192, 5 * (64 << 10)),
        (777, file_len as u64 - 777 - 5),
        (0, file_len as u64),
        (file_len as u64 - 3, 3),
    ];
    for (mode, file) in open_both(&path) {
        for threads in [1, 2, 4] {
            for chunk in [64 << 10, 1 << 20] {
                let (dev, device, reader) = device(None);
                for (i, &(offset, len)) in cases.iter().enumerate() {
                    let label = format!(
                        "{mode}, {threads} threads, {chunk}-byte chunks, {len} bytes at {offset}"
                    );
                    let (head, tail) = (13 + i, 101);
                    let buf = sentinel_buffer(&device, head + len as usize + tail);
                    let stats = load_range_direct(
                        &reader,
                        &file,
                        offset,
                        &buf,
                        head as u64,
                        len,
                        cfg(threads, chunk),
                    )
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                    let got = read_back(&buf);
                    let (o, l) = (offset as usize, len as usize);
                    assert!(
                        got[..head].iter().all(|&b| b == SENTINEL),
                        "{label}: bytes before the range were written"
                    );
                    assert!(
                        got[head + l..].iter().all(|&b| b == SENTINEL),
                        "{label}: bytes after the range were written"
                    );
                    assert!(
                        got[head..head + l] == want[o..o + l],
                        "{label}: device bytes differ from the file"
                    );
                    let chunks = expected_chunks(offset, len, chunk as u64);
                    assert_eq!(stats.bytes, len, "{label}");
                    assert_eq!(stats.chunks, chunks, "{label}");
                    assert_eq!(stats.threads, threads.min(chunks), "{label}");
                    assert_eq!(stats.chunk_bytes, chunk, "{label}");
                    assert_eq!(stats.reader, reader.describe(), "{label}");
                }
                assert!(dev.direct_reads() > 0);
            }
        }
    }
}

/// Buffers placed at the range's phase within a page (`DeviceBuffer::alloc_phased`, as the
/// safetensors loaders allocate a body): the stand-in reads the aligned middle of each chunk with
/// `O_DIRECT` straight into them, the unaligned head and tail buffered, and every byte still equals
/// the file's; with the phase wrong, or a buffered file, nothing goes `O_DIRECT` and the bytes are
/// the same.
#[test]
fn phased_buffers_take_o_direct_reads_for_the_aligned_middle_byte_exact() {
    let dir = scratch_dir(Place::Disk);
    let file_len = (2 << 20) + 4321;
    let (path, want) = write_file(dir.path(), "data", file_len, 9);
    let cases: [(u64, u64); 7] = [
        (0, file_len as u64),
        (1, 4095),
        (100, 3 * 4096),
        (4095, 1 << 20),
        (8192, 64 << 10),
        (12_345, file_len as u64 - 12_345),
        (file_len as u64 - 5000, 5000),
    ];
    for (mode, file) in open_both(&path) {
        for right_phase in [true, false] {
            for &(offset, len) in &cases {
                let (dev, device, reader) = device(None);
                let label = format!("{mode}, {len} bytes at {offset}, phase right: {right_phase}");
                let phase = (offset % PAGE) as usize + usize::from(!right_phase) * 8;
                let buf = DeviceBuffer::alloc_phased(&device, len as usize, phase).unwrap();
                assert_eq!(buf.ptr() % PAGE, (phase as u64) % PAGE, "{label}");
                load_range_direct(&reader, &file, offset, &buf, 0, len, cfg(2, 64 << 10))
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                let (o, l) = (offset as usize, len as usize);
                assert!(
                    read_back(&buf) == want[o..o + l],
                    "{label}: bytes differ from the file"
                );
                // Exactly the whole blocks of the file's direct alignment inside the range went
                // O_DIRECT (chunks after the first start on a page), or none did.
                let a = file.align();
                let block = u64::from(a.offset_align.max(a.mem_align)).max(1);
                let whole = ((offset + len) / block).saturating_sub(offset.div_ceil(block)) * block;
                if mode == "direct" && right_phase {
                    assert_eq!(dev.direct_io_bytes(), whole, "{label}");
                } else {
                    assert_eq!(dev.direct_io_bytes(), 0, "{label}");
                }
            }
        }
    }
}

/// A file system that accepts the `O_DIRECT` open but refuses the read (EINVAL): every byte still
/// arrives, read buffered, and nothing counts as read O_DIRECT.
#[test]
fn o_direct_reads_refused_with_einval_fall_back_to_buffered_byte_exact() {
    let dir = scratch_dir(Place::Disk);
    let file_len = (1 << 20) + 999;
    let (path, want) = write_file(dir.path(), "data", file_len, 11);
    let Some((_, file)) = open_both(&path).into_iter().find(|(m, _)| *m == "direct") else {
        eprintln!("skipped: O_DIRECT unavailable on this file system (see above)");
        return;
    };
    let dev = HostDevice::new(HostDeviceConfig {
        direct_reads: true,
        refuse_o_direct_reads: true,
        ..HostDeviceConfig::default()
    });
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    let reader = device.direct_reader().unwrap();
    for (offset, len) in [(0u64, file_len as u64), (4095, 300_000), (8192, 64 << 10)] {
        let buf =
            DeviceBuffer::alloc_phased(&device, len as usize, (offset % PAGE) as usize).unwrap();
        load_range_direct(&reader, &file, offset, &buf, 0, len, cfg(2, 64 << 10)).unwrap();
        let (o, l) = (offset as usize, len as usize);
        assert!(read_back(&buf) == want[o..o + l], "{len} bytes at {offset}");
    }
    assert_eq!(dev.direct_io_bytes(), 0);
    assert!(dev.direct_reads() > 0);
}

/// One call of a wrapped reader.
#[derive(Debug, Clone, Copy)]
struct Call {
    offset: u64,
    dst: DevicePtr,
    len: usize,
}

/// Wraps a reader: records every call and the most calls in flight at once; each call waits a
/// little first, so workers overlap.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn DirectRead>,
    delay: Duration,
    calls: Mutex<Vec<Call>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Recording {
    fn new(inner: Arc<dyn DirectRead>, delay: Duration) -> Arc<Recording> {
        Arc::new(Recording {
            inner,
            delay,
            calls: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }
}

impl DirectRead for Recording {
    fn describe(&self) -> String {
        format!("recording {}", self.inner.describe())
    }
    unsafe fn read(
        &self,
        file: &File,
        offset: u64,
        dst: DevicePtr,
        len: usize,
    ) -> gpuio::Result<usize> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.calls.lock().unwrap().push(Call { offset, dst, len });
        std::thread::sleep(self.delay);
        // SAFETY: forwarded as received; the caller's promise covers it.
        let r = unsafe { self.inner.read(file, offset, dst, len) };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

#[test]
fn chunks_tile_the_range_page_aligned_after_the_first_with_at_most_threads_in_flight() {
    let dir = scratch_dir(Place::Disk);
    let (path, want) = write_file(dir.path(), "data", 1 << 20, 2);
    let file = File::open(&path).unwrap();
    let chunk = 64 << 10;
    for threads in [1, 2, 4] {
        let (_dev, device, inner) = device(None);
        let rec = Recording::new(inner, Duration::from_millis(10));
        let reader: Arc<dyn DirectRead> = rec.clone();
        let (offset, len) = (5000u64, 9 * chunk as u64 + 333);
        let buf = sentinel_buffer(&device, len as usize);
        let stats =
            load_range_direct(&reader, &file, offset, &buf, 0, len, cfg(threads, chunk)).unwrap();
        assert!(read_back(&buf) == want[offset as usize..(offset + len) as usize]);
        let mut calls = rec.calls.lock().unwrap().clone();
        calls.sort_by_key(|c| c.offset);
        assert_eq!(
            calls.len(),
            stats.chunks,
            "{threads} threads: one call per chunk"
        );
        // (5000 + 9·64K + 333 − 4096) / 64K rounded up: ten chunks, the first one short.
        assert_eq!(stats.chunks, 10);
        assert_eq!(stats.chunks, expected_chunks(offset, len, chunk as u64));
        let mut at = offset;
        for (k, c) in calls.iter().enumerate() {
            assert_eq!(c.offset, at, "chunk {k}: gap or overlap");
            assert_eq!(
                c.dst,
                buf.ptr() + (c.offset - offset),
                "chunk {k}: wrong device address"
            );
            assert!(c.len > 0 && c.len <= chunk, "chunk {k}: {} bytes", c.len);
            if k > 0 {
                assert_eq!(
                    c.offset % PAGE,
                    0,
                    "chunk {k} starts unaligned at {}",
                    c.offset
                );
            }
            at += c.len as u64;
        }
        assert_eq!(at, offset + len);
        let max = rec.max_in_flight.load(Ordering::SeqCst);
        assert!(
            max <= threads,
            "{max} reads in flight with {threads} threads"
        );
        if threads > 1 {
            assert!(max >= 2, "{threads} threads never overlapped reads");
        }
        assert_eq!(rec.in_flight.load(Ordering::SeqCst), 0);
    }
}

#[test]
fn an_empty_range_reads_nothing() {
    let dir = scratch_dir(Place::Disk);
    let (path, _) = write_file(dir.path(), "data", 10_000, 3);
    let file = File::open(&path).unwrap();
    let (_dev, device, inner) = device(None);
    let rec = Recording::new(inner, Duration::ZERO);
    let reader: Arc<dyn DirectRead> = rec.clone();
    let buf = sentinel_buffer(&device, 16);
    let stats =
        load_range_direct(&reader, &file, 123, &buf, 16, 0, DirectConfig::default()).unwrap();
    assert_eq!((stats.bytes, stats.chunks, stats.threads), (0, 0, 0));
    assert!(rec.calls.lock().unwrap().is_empty());
    assert!(read_back(&buf).iter().all(|&b| b == SENTINEL));
}

#[test]
fn the_nth_read_failing_stops_the_load_names_file_and_offset_and_leaves_nothing_running() {
    let dir = scratch_dir(Place::Disk);
    let chunk = 64 << 10;
    let (offset, len) = (100u64, 12 * chunk as u64);
    let (path, _) = write_file(dir.path(), "data", (offset + len) as usize + 10, 4);
    let chunks = expected_chunks(offset, len, chunk as u64);
    for threads in [1, 4] {
        for n in 1..=chunks as u64 + 1 {
            let label = format!("{threads} threads, read {n} of {chunks} fails");
            let file = File::open(&path).unwrap();
            let (dev, device, reader) = device(Some(n));
            let buf = DeviceBuffer::alloc(&device, len as usize).unwrap();
            let r = load_range_direct(&reader, &file, offset, &buf, 0, len, cfg(threads, chunk));
            let reads = dev.direct_reads();
            if n > chunks as u64 {
                // Never reached: the load must succeed, so the failures above are the injection's.
                r.unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(reads, chunks as u64);
                continue;
            }
            let e = r.expect_err(&label);
            assert_eq!(e.kind(), ErrorKind::Io, "{label}: {e}");
            assert_eq!(e.path(), Some(path.as_path()), "{label}: {e}");
            let at = e
                .offset()
                .unwrap_or_else(|| panic!("{label}: no offset in {e}"));
            assert!(at >= offset && at < offset + len, "{label}: offset {at}");
            let text = e.to_string();
            assert!(text.contains("direct read of chunk"), "{label}: {text}");
            assert!(
                text.contains(&format!("at file offset {at}")),
                "{label}: {text}"
            );
            if threads == 1 {
                // Chunks go in order: the failed one is chunk n-1, and none is started after it.
                let k = n as usize - 1;
                let start = if k == 0 {
                    offset
                } else {
                    (offset / PAGE * PAGE) + k as u64 * chunk as u64
                };
                assert!(
                    text.contains(&format!("chunk {k} at file offset {start}")),
                    "{label}: {text}"
                );
                assert_eq!(at, start, "{label}");
                assert_eq!(reads, n, "{label}: reads went on after the failure");
            } else {
                // The failing read's worker raises the stop flag only after its read returns, and
                // can be preempted in between while the others keep starting chunks, so the bound
                // is the chunks (with n + threads - 1 this test failed once on 2 busy cores; the
                // message was not kept, and that bound is the one this race breaks). That nothing
                // starts after the load returned is checked below.
                assert!(
                    reads >= n && reads <= chunks as u64,
                    "{label}: {reads} reads"
                );
            }
            // Every worker was joined before the error came back: no read starts later.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(
                dev.direct_reads(),
                reads,
                "{label}: a read ran after the load returned"
            );
        }
    }
}

#[test]
fn a_file_shorter_than_the_range_is_unexpected_eof_at_its_end() {
    let dir = scratch_dir(Place::Disk);
    let (path, want) = write_file(dir.path(), "short", 100_000, 5);
    for (mode, file) in open_both(&path) {
        for threads in [1, 4] {
            let label = format!("{mode}, {threads} threads");
            let (_dev, device, reader) = device(None);
            let buf = DeviceBuffer::alloc(&device, 100_000).unwrap();
            let c = cfg(threads, 64 << 10);
            // Up to the last byte: fine.
            load_range_direct(&reader, &file, 50_000, &buf, 0, 50_000, c).unwrap();
            let got = read_back(&buf);
            assert!(got[..50_000] == want[50_000..], "{label}");
            // One byte more than there is.
            for (offset, len, first_missing) in [
                (50_000u64, 50_001u64, 100_000u64),
                (50_000, 100_000, 100_000),
                (200_000, 10, 200_000),
            ] {
                let e =
                    load_range_direct(&reader, &file, offset, &buf, 0, len, c).expect_err(&label);
                assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{label}: {e}");
                assert_eq!(e.path(), Some(path.as_path()), "{label}: {e}");
                let at = e
                    .offset()
                    .unwrap_or_else(|| panic!("{label}: no offset in {e}"));
                if threads == 1 {
                    assert_eq!(at, first_missing, "{label}: {e}");
                } else {
                    assert!(at >= first_missing && at < offset + len, "{label}: {e}");
                }
                assert!(
                    e.to_string().contains("direct read of chunk"),
                    "{label}: {e}"
                );
            }
        }
    }
}

#[test]
fn bad_configs_and_ranges_are_rejected_before_any_read() {
    let dir = scratch_dir(Place::Disk);
    let (path, _) = write_file(dir.path(), "data", 1 << 20, 6);
    let file = File::open(&path).unwrap();
    let (dev, device, reader) = device(None);
    let buf = DeviceBuffer::alloc(&device, 1 << 16).unwrap();
    for bad in [
        cfg(0, 1 << 20),
        cfg(33, 1 << 20),
        cfg(4, 0),
        cfg(4, 32 << 10),
        cfg(4, (64 << 10) + 4095),
        cfg(4, 512 << 20),
    ] {
        let e = load_range_direct(&reader, &file, 0, &buf, 0, 100, bad).expect_err("bad config");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    let good = cfg(32, 256 << 20);
    assert!(good.validate().is_ok());
    for (offset, dst_offset, len) in [
        (0u64, 0u64, (1 << 16) + 1),
        (0, 1, 1 << 16),
        (0, u64::MAX, 2),
        (u64::MAX - 1, 0, 2),
        (i64::MAX as u64, 0, 2),
    ] {
        let e = load_range_direct(&reader, &file, offset, &buf, dst_offset, len, good)
            .expect_err("bad range");
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidInput,
            "{offset} {dst_offset} {len}: {e}"
        );
    }
    assert_eq!(
        dev.direct_reads(),
        0,
        "a read was issued for a rejected load"
    );
}

#[test]
fn a_buffer_of_another_device_is_an_error_not_a_write() {
    let dir = scratch_dir(Place::Disk);
    let (path, _) = write_file(dir.path(), "data", 300_000, 7);
    let file = File::open(&path).unwrap();
    let (_a, _da, reader_a) = device(None);
    let (_b, device_b, _rb) = device(None);
    let buf = sentinel_buffer(&device_b, 300_000);
    let e = load_range_direct(&reader_a, &file, 0, &buf, 0, 300_000, cfg(4, 64 << 10))
        .expect_err("a reader wrote into another device's buffer");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(read_back(&buf).iter().all(|&b| b == SENTINEL));
}

#[test]
fn the_stand_in_offers_no_direct_reader_unless_configured_to() {
    let dev = HostDevice::new(HostDeviceConfig::default());
    let why = dev
        .direct_reader()
        .expect_err("direct reads are off by default");
    assert!(!why.trim().is_empty());
    let (_dev, _device, reader) = device(None);
    assert!(!reader.describe().is_empty());
}
