//! The ring workloads' host side where no kernel can run: the host stand-in refuses to load them
//! with the reason, the device cache's arguments are checked before anything is allocated for a
//! kernel, and `rings::bench::run` fails first, saying why. (On a GPU, `gpuio rings` runs them:
//! scripts/bench-gpu.py, section `rings`; the argument layout is checked by tests/rings_nvrtc.rs.)

use std::sync::Arc;

use gpuio::ErrorKind;
use gpuio_cuda::rings::bench::{run, RingsBenchConfig};
use gpuio_cuda::rings::kernels::{DeviceCache, Workloads};
use gpuio_cuda::rings::{RingConfig, RingRegion};
use gpuio_cuda::{open_device, Device};

fn cpu() -> Arc<dyn Device> {
    open_device("cpu").unwrap()
}

#[test]
fn the_host_stand_in_runs_no_kernels() {
    let e = Workloads::load(&cpu()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("cpu runs no kernels"), "{e}");

    let engine = gpuio::Engine::new(gpuio::EngineConfig::default()).unwrap();
    let cfg = RingsBenchConfig {
        file: "/nonexistent/file".into(),
        ..RingsBenchConfig::default()
    };
    // The device is refused before the file is looked at.
    let e = run(&engine, &cpu(), &cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let bad = RingsBenchConfig {
        read_bytes: 1000,
        ..cfg
    };
    assert_eq!(
        run(&engine, &cpu(), &bad).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[test]
fn device_cache_arguments_are_checked() {
    let device = cpu();
    let region = RingRegion::new(
        &device,
        RingConfig {
            completion_count: 64,
            ..RingConfig::default()
        },
    )
    .unwrap();
    // More slots than completion words, an empty file, a file of more than 2^32 lines.
    for (bytes, slots, base) in [
        (1 << 20, 65, 0),
        (1 << 20, 32, 40),
        (0, 8, 0),
        (1 << 45, 8, 0),
    ] {
        let e = DeviceCache::new(&region, 0, bytes, slots, base).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::InvalidInput,
            "{bytes} {slots} {base}: {e}"
        );
    }
    let no_lines = RingRegion::new(
        &device,
        RingConfig {
            line_bytes: 0,
            ..RingConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        DeviceCache::new(&no_lines, 0, 1 << 20, 8, 0)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    // A valid one: 256 lines of 4 KiB over a 1 MiB file, 64 slots; everything zero (INVALID, empty).
    let c = DeviceCache::new(&region, 0, 1 << 20, 64, 0).unwrap();
    let a = c.arg();
    assert_eq!((a.pages, a.slots, a.line_bytes), (256, 64, 4096));
    assert_eq!(c.window().1, 64 * 4096);
}

#[test]
fn gpu_bfs_checks_its_graph_before_the_device() {
    use gpuio_cuda::rings::bfs::{bfs, GpuBfsConfig};
    let engine = gpuio::Engine::new(gpuio::EngineConfig::default()).unwrap();
    let c = GpuBfsConfig::default();
    let edges = std::path::Path::new("/nonexistent.bel.dst");
    let e = bfs(&engine, &cpu(), edges, &[0, 1, 2], 5, &c).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidInput,
        "source out of range: {e}"
    );
    let e = bfs(&engine, &cpu(), edges, &[0], 0, &c).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "no vertices: {e}");
    let e = bfs(&engine, &cpu(), edges, &[0, 1, 2], 1, &c).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
}

/// The host stand-in with a scripted kernel module: the layout probe answers with the host's sizes,
/// `gpuio_bfs_level_mem` runs a CPU twin of the kernel where the script says so (the same
/// parameters, the same counters, a sequential walk of the groups), every other launch runs nothing,
/// and a wait either "finishes" or times out with the kernel still running. What this checks is the
/// host side around a launch: a kernel that outlives its wait keeps its buffers (nothing freed under
/// it), a kernel that delivered nothing is caught by the check against the file, and the BFS's level
/// loop (counters zeroed, parameters in the kernel's order, the stop when a level claims nothing).
mod scripted {
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use gpuio::{Error, ErrorKind, Result};
    use gpuio_cuda::device::{CopyStream, DirectRead, MemInfo, Pinned};
    use gpuio_cuda::rings::kernels::{CacheArg, QueueArg};
    use gpuio_cuda::{Device, DevicePtr, HostDevice, HostDeviceConfig, KernelModule};

    #[derive(Debug, Clone)]
    pub struct Scripted {
        pub host: HostDevice,
        pub hang: Arc<AtomicBool>,
        /// Whether `gpuio_bfs_level_mem` runs its CPU twin (else nothing).
        pub bfs_twin: bool,
    }

    impl Scripted {
        pub fn new(hang: bool) -> Scripted {
            Scripted {
                host: HostDevice::new(HostDeviceConfig::default()),
                hang: Arc::new(AtomicBool::new(hang)),
                bfs_twin: false,
            }
        }
    }

    #[derive(Debug)]
    struct Module {
        hang: Arc<AtomicBool>,
        bfs_twin: bool,
        running: bool,
    }

    /// `gpuio_bfs_level_mem` (device/workloads.cu) on the CPU, one warp after another: each takes
    /// groups of 32 vertices from `cursor` until one past the last, expands the group's vertices at
    /// `level`, and claims unvisited destinations for level + 1, counting them in `found`.
    ///
    /// # Safety
    /// `params` are the kernel's ten, every pointer a live host address of the stand-in.
    unsafe fn bfs_level_twin(params: &[*mut c_void], warps: u64) {
        // SAFETY: per the function's contract.
        unsafe {
            let arg = |i: usize| *(params[i] as *const u64);
            let (edges, base, offsets, n) =
                (arg(0) as *const u64, arg(1), arg(2) as *const u64, arg(3));
            let depth = arg(4) as *mut u32;
            let level = *(params[5] as *const u32);
            let (cursor, found) = (arg(6) as *mut u32, arg(7) as *mut u32);
            let (errors, scanned) = (arg(8) as *mut i32, arg(9) as *mut u64);
            let groups = n.div_ceil(32);
            for _ in 0..warps {
                loop {
                    let g = *cursor as u64;
                    *cursor += 1;
                    if g >= groups {
                        break;
                    }
                    for v in g * 32..(g * 32 + 32).min(n) {
                        if *depth.add(v as usize) != level {
                            continue;
                        }
                        let (start, end) = (*offsets.add(v as usize), *offsets.add(v as usize + 1));
                        *scanned += end - start;
                        for e in start..end {
                            let u = *edges.add((e + base) as usize);
                            if u >= n {
                                *errors.add(1) += 1;
                            } else if *depth.add(u as usize) == u32::MAX {
                                *depth.add(u as usize) = level + 1;
                                *found += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    impl KernelModule for Module {
        unsafe fn launch(
            &mut self,
            entry: &str,
            grid: u32,
            block: u32,
            params: &mut [*mut c_void],
        ) -> Result<()> {
            if entry == "gpuio_bfs_level_mem" && self.bfs_twin {
                assert_eq!(params.len(), 10, "gpuio_bfs_level_mem takes ten parameters");
                // SAFETY: per the launch's contract, the kernel's parameters on the stand-in.
                unsafe { bfs_level_twin(params, grid as u64 * block as u64 / 32) };
                return Ok(());
            }
            if entry == "gpuio_layout_probe" {
                // SAFETY: the probe's one parameter is a u64 device address; on the stand-in it is
                // the host address of a live 24-byte allocation.
                unsafe {
                    let out = *(params[0] as *const u64) as *mut u64;
                    *out = std::mem::size_of::<QueueArg>() as u64;
                    *out.add(1) = std::mem::size_of::<CacheArg>() as u64;
                    *out.add(2) = std::mem::size_of::<CacheArg>() as u64;
                }
                return Ok(());
            }
            self.running = true;
            Ok(())
        }
        fn synchronize(&mut self, timeout: Duration) -> Result<()> {
            if self.running && self.hang.load(Ordering::Relaxed) {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("scripted: still running after {timeout:?}"),
                ));
            }
            self.running = false;
            Ok(())
        }
        fn running(&self) -> bool {
            self.running
        }
    }

    impl Device for Scripted {
        fn label(&self) -> String {
            "scripted".into()
        }
        fn description(&self) -> String {
            "the cpu stand-in with a scripted kernel module".into()
        }
        fn alloc_raw(&self, bytes: usize) -> Result<DevicePtr> {
            self.host.alloc_raw(bytes)
        }
        unsafe fn free_raw(&self, ptr: DevicePtr, bytes: usize) {
            // SAFETY: per the caller.
            unsafe { self.host.free_raw(ptr, bytes) }
        }
        unsafe fn pin_host(&self, ptr: *mut u8, len: usize) -> Result<Option<Pinned>> {
            // SAFETY: per the caller.
            unsafe { self.host.pin_host(ptr, len) }
        }
        unsafe fn unpin_host(&self, ptr: *mut u8, len: usize) {
            // SAFETY: per the caller.
            unsafe { self.host.unpin_host(ptr, len) }
        }
        fn copy_stream(&self) -> Result<Box<dyn CopyStream>> {
            self.host.copy_stream()
        }
        unsafe fn copy_d2h(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
            // SAFETY: per the caller.
            unsafe { self.host.copy_d2h(src, dst) }
        }
        fn mem_info(&self) -> Result<MemInfo> {
            self.host.mem_info()
        }
        fn direct_reader(&self) -> std::result::Result<Arc<dyn DirectRead>, String> {
            Err("scripted".into())
        }
        fn load_module(&self, _ptx: &str, _entries: &[&str]) -> Result<Box<dyn KernelModule>> {
            Ok(Box::new(Module {
                hang: self.hang.clone(),
                bfs_twin: self.bfs_twin,
                running: false,
            }))
        }
    }
}

#[test]
fn a_hung_kernel_keeps_its_buffers_and_an_idle_one_is_caught_by_the_check() {
    use gpuio_cuda::rings::kernels::random_reads;
    use gpuio_cuda::rings::{HostStorePublish, Publish, RingServer, ServerConfig};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(
        &path,
        (0..1u32 << 18)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let engine = gpuio::Engine::new(gpuio::EngineConfig::default()).unwrap();
    for hang in [true, false] {
        let s = scripted::Scripted::new(hang);
        let device: Arc<dyn Device> = Arc::new(s.clone());
        let mut w = Workloads::load(&device).unwrap();
        let region = Arc::new(RingRegion::new(&device, RingConfig::default()).unwrap());
        let dst = gpuio_cuda::DeviceBuffer::alloc(&device, 256 * 4096).unwrap();
        // SAFETY: the stand-in's device addresses are host addresses.
        let publish = || Box::new(unsafe { HostStorePublish::new() }) as Box<dyn Publish>;
        let server = RingServer::start(
            &engine,
            region.clone(),
            vec![gpuio::File::open(&path).unwrap()],
            (dst.ptr(), dst.len()),
            &publish,
            ServerConfig::default(),
        )
        .unwrap();
        let offsets: Vec<u64> = (0..512).map(|i| (i * 7 % 256) * 4096).collect();
        let before = s.host.allocated_bytes();
        let e = random_reads(
            &mut w,
            &server,
            &region,
            0,
            &path,
            &offsets,
            4096,
            256,
            &dst,
            Duration::from_millis(10),
        )
        .unwrap_err();
        server.shutdown();
        if hang {
            assert!(w.hung());
            assert_eq!(e.kind(), ErrorKind::Io, "{e}");
            // The offsets (512 × 8 bytes) and the error words (12) stay allocated: leaked.
            assert_eq!(s.host.allocated_bytes(), before + 512 * 8 + 12, "{e}");
        } else {
            assert!(!w.hung());
            // The kernel "ran" and delivered nothing: the check against the file says so.
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert!(e.to_string().contains("differs from the file"), "{e}");
            assert_eq!(s.host.allocated_bytes(), before, "buffers freed");
        }
    }
}

/// A small graph in the `.bel` layout the GPU search reads: `offsets` (n + 1) and the `.bel.dst`
/// file (16-byte header, u64 destinations); undirected, random, a few isolated vertices.
fn small_graph(dir: &std::path::Path, n: u64, seed: u64) -> (std::path::PathBuf, Vec<u64>) {
    let mut x = seed;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut adj = vec![Vec::new(); n as usize];
    for _ in 0..n * 3 {
        let (a, b) = (next() % (n - 8), next() % (n - 8)); // the last 8 stay unreachable
        adj[a as usize].push(b);
        adj[b as usize].push(a);
    }
    let mut offsets = vec![0u64];
    let mut bytes = vec![0u8; 16];
    for l in &adj {
        for &u in l {
            bytes.extend_from_slice(&u.to_le_bytes());
        }
        offsets.push(offsets.last().unwrap() + l.len() as u64);
    }
    bytes[..8].copy_from_slice(&offsets.last().unwrap().to_le_bytes());
    let path = dir.join("g.bel.dst");
    std::fs::write(&path, bytes).unwrap();
    (path, offsets)
}

/// The CPU's breadth-first depths of the same graph (-1: unreachable).
fn reference_depths(path: &std::path::Path, offsets: &[u64], source: u64) -> Vec<i32> {
    let bytes = std::fs::read(path).unwrap();
    let dst = |e: u64| {
        let i = 16 + e as usize * 8;
        u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap())
    };
    let n = offsets.len() - 1;
    let mut depth = vec![-1i32; n];
    depth[source as usize] = 0;
    let mut frontier = vec![source];
    let mut d = 0;
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for &v in &frontier {
            for e in offsets[v as usize]..offsets[v as usize + 1] {
                let u = dst(e);
                if depth[u as usize] < 0 {
                    depth[u as usize] = d + 1;
                    next.push(u);
                }
            }
        }
        frontier = next;
        d += 1;
    }
    depth
}

#[test]
fn the_gpu_bfs_level_loop_drives_the_kernel_twin_to_the_cpus_depths() {
    use gpuio_cuda::rings::bfs::{bfs_in_memory, GpuBfsConfig};
    let dir = tempfile::tempdir().unwrap();
    // 1000 vertices: 32 groups, one partial; more warps asked for than groups.
    let (path, offsets) = small_graph(dir.path(), 1000, 7);
    let mut s = scripted::Scripted::new(false);
    s.bfs_twin = true;
    let device: Arc<dyn Device> = Arc::new(s.clone());
    // (source, warps asked for, warps a level runs: at most one per group, whole blocks of 8 warps
    // rounded down, or one block of fewer).
    for (source, warps, run) in [(0, 8192, 32), (17, 1, 1), (999 - 8, 5, 5), (5, 13, 8)] {
        let c = GpuBfsConfig {
            warps,
            ..GpuBfsConfig::default()
        };
        let before = s.host.allocated_bytes();
        let r = bfs_in_memory(&device, &path, &offsets, source, &c).unwrap();
        let want = reference_depths(&path, &offsets, source);
        assert_eq!(r.depths, want, "source {source}, {warps} warps");
        let levels = *want.iter().max().unwrap() as u32 + 1;
        assert_eq!(
            r.levels, levels,
            "the last level claims nothing and ends the search"
        );
        let reached_edges: u64 = (0..1000)
            .filter(|&v| want[v] >= 0)
            .map(|v| offsets[v + 1] - offsets[v])
            .sum();
        assert_eq!(r.edges_scanned, reached_edges);
        assert_eq!(r.warps_launched, levels as u64 * run);
        assert_eq!(s.host.allocated_bytes(), before, "every buffer freed");
    }
}

#[test]
fn a_gpu_bfs_level_that_leaves_groups_untaken_fails_the_search() {
    use gpuio_cuda::rings::bfs::{bfs_in_memory, GpuBfsConfig};
    let dir = tempfile::tempdir().unwrap();
    let (path, offsets) = small_graph(dir.path(), 300, 3);
    // No twin: the "kernel" runs nothing, so no group is taken.
    let device: Arc<dyn Device> = Arc::new(scripted::Scripted::new(false));
    let e = bfs_in_memory(&device, &path, &offsets, 0, &GpuBfsConfig::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("took 0 of 10 vertex groups"), "{e}");
}

#[test]
fn a_grid_of_warps_never_exceeds_the_warps_asked_for() {
    use gpuio_cuda::rings::kernels::{warp_grid, BLOCK};
    assert_eq!(warp_grid(0), (1, 32), "at least one warp");
    assert_eq!(warp_grid(1), (1, 32));
    assert_eq!(warp_grid(7), (1, 224));
    assert_eq!(warp_grid(8), (1, BLOCK));
    assert_eq!(warp_grid(13), (1, BLOCK), "rounded down to whole blocks");
    assert_eq!(warp_grid(16), (2, BLOCK));
    for asked in 1..5000u32 {
        let (blocks, block) = warp_grid(asked);
        let run = blocks * block / 32;
        assert!(run <= asked && block % 32 == 0 && block <= BLOCK, "{asked}");
        assert!(run * 2 > asked, "{asked}: {run} is less than half");
    }
}
