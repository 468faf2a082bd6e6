//! The ring server's host side at full speed, with no GPU: how many 4 KiB random reads per second its
//! polling threads can take, read and deliver when delivering costs the device nothing.
//!
//! ```text
//! cargo run --release -p gpuio-cuda --example rings_host -- FILE [REQUESTS] [PRODUCERS] [IN_FLIGHT] [SERVER_THREADS] [copies|kernel]
//! cargo run --release -p gpuio-cuda --example rings_host -- /dev/shm/t1g 1000000 1 1024 1 kernel
//! ```
//!
//! CPU threads play the kernels (`RingProducer`, the protocol twin of `device/gpuio.cuh`), each
//! keeping IN_FLIGHT reads in flight on its own completion words. The device is the host stand-in's
//! memory with an "instant" copy stream: a copy, a value write or a delivery happens on the calling
//! polling thread when queued (a memcpy, a release store). So the figure is the server's own cost —
//! taking slots, validating, the engine's reads, building the copies or descriptors — plus the
//! producers', which a GPU would not charge to the CPU; compare it with `gpuio bench --pattern
//! randread --block-size 4K` on the same file (the host engine alone). The last read of every
//! completion word is checked against the file.
//!
//! An example, not a test or a library path: what it measures is in docs/BENCHMARKS.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::{Engine, EngineConfig, File, Result};
use gpuio_cuda::device::{CopyStream, DeliveryDesc, Device, DevicePtr, MemInfo, Pinned, Ticket};
use gpuio_cuda::rings::{
    code, DeliveryPath, Request, RingConfig, RingProducer, RingRegion, RingServer, ServerConfig,
};
use gpuio_cuda::{DeviceBuffer, HostDevice, HostDeviceConfig};

/// The stand-in's memory, with copies done when queued.
#[derive(Clone)]
struct Instant0(HostDevice);

impl std::fmt::Debug for Instant0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("instant")
    }
}

impl Device for Instant0 {
    fn label(&self) -> String {
        "instant".into()
    }
    fn description(&self) -> String {
        "host memory with copies done when queued".into()
    }
    fn alloc_raw(&self, bytes: usize) -> Result<DevicePtr> {
        self.0.alloc_raw(bytes)
    }
    unsafe fn free_raw(&self, ptr: DevicePtr, bytes: usize) {
        // SAFETY: per the caller.
        unsafe { self.0.free_raw(ptr, bytes) }
    }
    unsafe fn pin_host(&self, ptr: *mut u8, len: usize) -> Result<Option<Pinned>> {
        // SAFETY: per the caller.
        unsafe { self.0.pin_host(ptr, len) }
    }
    unsafe fn unpin_host(&self, ptr: *mut u8, len: usize) {
        // SAFETY: per the caller.
        unsafe { self.0.unpin_host(ptr, len) }
    }
    fn copy_stream(&self) -> Result<Box<dyn CopyStream>> {
        Ok(Box::new(InstantStream { next: 1 }))
    }
    unsafe fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        // SAFETY: per the caller.
        unsafe { self.0.copy_d2h(src, dst) }
    }
    fn mem_info(&self) -> Result<MemInfo> {
        self.0.mem_info()
    }
    fn stream_write_u64(&self) -> std::result::Result<String, String> {
        Ok("a release store when queued".into())
    }
    fn can_map_host_memory(&self) -> std::result::Result<bool, String> {
        Ok(true)
    }
}

/// Does each operation when it is queued: device addresses are host addresses here.
#[derive(Debug)]
struct InstantStream {
    next: Ticket,
}

impl InstantStream {
    fn ticket(&mut self) -> Ticket {
        self.next += 1;
        self.next - 1
    }
}

impl CopyStream for InstantStream {
    unsafe fn copy_h2d_async(
        &mut self,
        src: *const u8,
        len: usize,
        dst: DevicePtr,
    ) -> Result<Ticket> {
        // SAFETY: per the caller; the stand-in's device memory is host memory.
        unsafe { std::ptr::copy_nonoverlapping(src, dst as *mut u8, len) };
        Ok(self.ticket())
    }
    unsafe fn copy_d2h_async(
        &mut self,
        src: DevicePtr,
        dst: *mut u8,
        len: usize,
    ) -> Result<Ticket> {
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst, len) };
        Ok(self.ticket())
    }
    unsafe fn write_u64_async(&mut self, dst: DevicePtr, value: u64) -> Result<Ticket> {
        // SAFETY: per the caller, 8-aligned inside a live allocation.
        unsafe { AtomicU64::from_ptr(dst as *mut u64) }.store(value, Ordering::Release);
        Ok(self.ticket())
    }
    unsafe fn deliver_async(
        &mut self,
        descs: *const DeliveryDesc,
        _mapped: DevicePtr,
        n: usize,
    ) -> Result<Ticket> {
        for k in 0..n {
            // SAFETY: per the caller, n descriptors; mapped addresses are host addresses here.
            let d = unsafe { descs.add(k).read() };
            if d.len > 0 {
                // SAFETY: as for copy_h2d_async.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        d.src as *const u8,
                        d.dst as *mut u8,
                        d.len as usize,
                    )
                };
            }
            if d.word_addr != 0 {
                // SAFETY: as for write_u64_async.
                unsafe { AtomicU64::from_ptr(d.word_addr as *mut u64) }
                    .store(d.word, Ordering::Release);
            }
        }
        Ok(self.ticket())
    }
    fn is_done(&mut self, _: Ticket) -> Result<bool> {
        Ok(true)
    }
    fn wait(&mut self, _: Ticket) -> Result<()> {
        Ok(())
    }
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1).cloned() else {
        eprintln!("usage: rings_host FILE [REQUESTS] [PRODUCERS] [IN_FLIGHT] [SERVER_THREADS] [copies|kernel]");
        std::process::exit(2);
    };
    let requests: u64 = arg(&args, 2, 1_000_000);
    let producers: usize = arg(&args, 3, 1);
    let in_flight: usize = arg(&args, 4, 1024);
    let server_threads: usize = arg(&args, 5, 1);
    let delivery: DeliveryPath = arg(&args, 6, DeliveryPath::Copies);
    const LEN: usize = 4096;

    let engine = Engine::new(EngineConfig::default())?;
    let device: Arc<dyn Device> = Arc::new(Instant0(HostDevice::new(HostDeviceConfig::default())));
    let file = File::open(&path)?;
    let blocks = file.len()? / LEN as u64;
    let words = producers * in_flight;
    let region = Arc::new(RingRegion::new(
        &device,
        RingConfig {
            ring_count: 8,
            slots_per_ring: 1024,
            completion_count: words as u32,
            line_bytes: LEN as u32,
            max_request_bytes: LEN as u32,
        },
    )?);
    let dst = DeviceBuffer::alloc(&device, words * LEN)?;
    let server = RingServer::start_auto(
        &engine,
        region.clone(),
        vec![file.clone()],
        (dst.ptr(), dst.len()),
        ServerConfig {
            threads: server_threads,
            delivery,
            ..ServerConfig::default()
        },
    )?;
    // SAFETY: the stand-in's device addresses are host addresses of live memory.
    let producer = unsafe { RingProducer::new(region.clone()) };
    let per = requests / producers as u64;
    let base = dst.ptr();
    let start = Instant::now();
    let last: Vec<Vec<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..producers)
            .map(|p| {
                let producer = producer.clone();
                s.spawn(move || {
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ p as u64;
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % blocks
                    };
                    let mut tags = vec![0u32; in_flight];
                    let mut offsets = vec![u64::MAX; in_flight];
                    let (mut sent, mut done) = (0u64, 0u64);
                    let word = |k: usize| (p * in_flight + k) as u32;
                    while done < per {
                        for k in 0..in_flight {
                            if tags[k] != 0 {
                                match producer.poll(word(k), tags[k]) {
                                    None => continue,
                                    Some(r) if r == LEN as i32 => done += 1,
                                    Some(r) => panic!("read failed: {}", code::name(r)),
                                }
                                tags[k] = 0;
                            }
                            if sent < per {
                                let off = next() * LEN as u64;
                                let tag = (sent as u32).wrapping_add(1).max(1);
                                let req = Request {
                                    opcode: gpuio_cuda::rings::layout::OP_READ,
                                    file_id: 0,
                                    offset: off,
                                    length: LEN as u32,
                                    completion: word(k),
                                    dev_addr: base + (word(k) as usize * LEN) as u64,
                                    tag,
                                };
                                let mut retries = 0;
                                producer
                                    .submit_until(
                                        (p + k) as u32 % 8,
                                        &req,
                                        Instant::now() + Duration::from_secs(10),
                                        &mut retries,
                                    )
                                    .unwrap_or_else(|e| panic!("submit: {}", code::name(e)));
                                tags[k] = tag;
                                offsets[k] = off;
                                sent += 1;
                            }
                        }
                    }
                    offsets
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let how = server.delivery().to_string();
    let stats = server.shutdown();
    // Every completion word's last read, against the file.
    let mut checked = 0;
    let plain = std::fs::File::open(&path)
        .map_err(|e| gpuio::Error::from_io(gpuio::error::Op::Open, &e))?;
    let mut want = vec![0u8; LEN];
    let mut got = vec![0u8; LEN];
    for (p, offs) in last.iter().enumerate() {
        for (k, &off) in offs.iter().enumerate() {
            if off == u64::MAX {
                continue;
            }
            std::os::unix::fs::FileExt::read_exact_at(&plain, &mut want, off)
                .map_err(|e| gpuio::Error::from_io(gpuio::error::Op::Read, &e))?;
            dst.read((p * in_flight + k) * LEN, &mut got)?;
            assert!(
                got == want,
                "word {} holds the wrong bytes",
                p * in_flight + k
            );
            checked += 1;
        }
    }
    let done = per * producers as u64;
    println!(
        "{done} reads of 4 KiB in {secs:.3} s: {:.0} reads/s ({producers} producers x {in_flight} in flight, {server_threads} polling threads, {}); {} rounds ({:.1} requests each), {checked} reads checked",
        done as f64 / secs,
        how.split(':').next().unwrap_or(""),
        stats.batches,
        stats.requests as f64 / stats.batches.max(1) as f64,
    );
    Ok(())
}
