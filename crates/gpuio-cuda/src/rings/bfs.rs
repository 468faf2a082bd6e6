//! Breadth-first search on a GPU with the edge array on storage (BaM's BFS; `gpuio bfs --mode
//! gpu-cache`): the vertex offsets and the depths live in device memory, the edges are read by the
//! kernel through the device cache (`gpuio_bfs_level` in `device/workloads.cu`), one launch per level,
//! served by a [`RingServer`] on this host.
//!
//! The result is every vertex's depth, as the host modes of `gpuio_workloads::bfs` report it (-1 for
//! unreachable), so the callers compare them. A read error, or a destination out of range (a corrupt
//! edge file), fails the search naming the cause; every wait is bounded.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::{Engine, Error, ErrorKind, File, Result};

use super::deliver::DeliveryPath;
use super::kernels::{upload, warp_grid, CacheArg, DeviceCache, Workloads};
use super::layout::RingConfig;
use super::region::RingRegion;
use super::server::{polling_threads, RingServer, RingStats, ServerConfig};
use crate::device::{Device, DeviceBuffer};

/// Bytes of a `.bel` file's header (u64 count, u64 reserved): two u64 elements before edge 0.
pub const BEL_HEADER_ELEMENTS: u64 = 2;

/// Vertices a warp takes at once from a level's shared counter (one per lane).
pub const GROUP_VERTICES: u64 = 32;

/// How the search runs.
#[derive(Debug, Clone)]
pub struct GpuBfsConfig {
    /// The device cache's capacity and line size.
    pub cache_bytes: u64,
    pub line_bytes: u32,
    /// Warps per level at most (each pins at most two lines at a time; capped at a quarter of the
    /// cache's lines).
    pub warps: u32,
    /// The ring server's polling threads, 0 for [`default_polling_threads`](super::default_polling_threads).
    pub server_threads: usize,
    /// How the server delivers lines to the device.
    pub delivery: DeliveryPath,
    pub rings: u32,
    /// The longest one level may take.
    pub level_timeout: Duration,
}

impl Default for GpuBfsConfig {
    fn default() -> Self {
        GpuBfsConfig {
            cache_bytes: 256 << 20,
            line_bytes: 16 << 10,
            warps: 8192,
            server_threads: 0,
            delivery: DeliveryPath::Copies,
            rings: 8,
            level_timeout: Duration::from_secs(120),
        }
    }
}

/// What the search found and cost.
#[derive(Debug, Clone)]
pub struct GpuBfsRun {
    /// Every vertex's depth, -1 for unreachable.
    pub depths: Vec<i32>,
    pub levels: u32,
    /// Edges scanned (every edge of every reached vertex with edges).
    pub edges_scanned: u64,
    /// From the first level's launch to the last level's end.
    pub seconds: f64,
    /// The server's counters over the search.
    pub server: RingStats,
    /// How completions reach device memory, and why.
    pub publisher: String,
    /// How the server delivered lines ([`RingServer::delivery`]).
    pub delivery: String,
    /// Warps launched over all levels (each takes groups of 32 vertices from the level's counter until
    /// none is left).
    pub warps_launched: u64,
}

/// Searches from `source` the graph whose `n + 1` vertex `offsets` are given and whose edges are
/// `edge_file` (a `.bel.dst`: 16-byte header, then u64 destinations).
pub fn bfs(
    engine: &Engine,
    device: &Arc<dyn Device>,
    edge_file: &Path,
    offsets: &[u64],
    source: u64,
    c: &GpuBfsConfig,
) -> Result<GpuBfsRun> {
    let n = check_graph(offsets, source)?;
    let mut w = Workloads::load(device)?;
    let file = File::open(edge_file)?;
    let size = file.len()?;
    check_edges_fit(offsets, size, edge_file)?;
    let slots = (c.cache_bytes / c.line_bytes.max(1) as u64).clamp(4, 1 << 22) as u32;
    let region = Arc::new(RingRegion::new(
        device,
        RingConfig {
            ring_count: c.rings,
            slots_per_ring: 1024,
            completion_count: slots,
            line_bytes: c.line_bytes,
            max_request_bytes: c.line_bytes,
        },
    )?);
    let cache = DeviceCache::new(&region, 0, size, slots, 0)?;
    let server = RingServer::start_auto(
        engine,
        region.clone(),
        vec![file],
        cache.window(),
        ServerConfig {
            threads: polling_threads(c.server_threads),
            delivery: c.delivery,
            ..ServerConfig::default()
        },
    )?;
    let publisher = server
        .publisher()
        .map_or_else(String::new, |p| format!("{}: {}", p.kind.name(), p.reason));
    let r = search(&mut w, Edges::Cache(&cache), offsets, n, source, c);
    if r.is_err() && w.hung() {
        // A kernel still running reads the cache and the rings: keep them.
        std::mem::forget(cache);
        std::mem::forget(region);
    }
    let delivery = server.delivery().to_string();
    let stats = server.shutdown();
    let (depths, levels, edges_scanned, seconds, warps_launched) = r?;
    Ok(GpuBfsRun {
        depths,
        levels,
        edges_scanned,
        seconds,
        server: stats,
        publisher,
        delivery,
        warps_launched,
    })
}

/// What [`bfs_in_memory`] found and cost.
#[derive(Debug, Clone)]
pub struct GpuMemoryBfsRun {
    /// Every vertex's depth, -1 for unreachable.
    pub depths: Vec<i32>,
    pub levels: u32,
    pub edges_scanned: u64,
    /// From the first level's launch to the last level's end.
    pub seconds: f64,
    /// Reading the edge file and copying it into device memory, before the search.
    pub load_seconds: f64,
    pub warps_launched: u64,
}

/// The reference of [`bfs`]: the same search (the same kernel template and vertex order) with the whole
/// edge file copied into device memory first (`gpuio_bfs_level_mem`); what BaM calls the
/// in-memory BFS. Needs device memory for the edge file and the depths.
pub fn bfs_in_memory(
    device: &Arc<dyn Device>,
    edge_file: &Path,
    offsets: &[u64],
    source: u64,
    c: &GpuBfsConfig,
) -> Result<GpuMemoryBfsRun> {
    let n = check_graph(offsets, source)?;
    let mut w = Workloads::load(device)?;
    let t0 = Instant::now();
    let bytes = std::fs::read(edge_file)
        .map_err(|e| Error::from_io(gpuio::error::Op::Read, &e).with_path(edge_file))?;
    check_edges_fit(offsets, bytes.len() as u64, edge_file)?;
    let edges = DeviceBuffer::alloc(device, bytes.len().max(8))?;
    upload(device.as_ref(), &bytes, edges.ptr())?;
    drop(bytes);
    let load_seconds = t0.elapsed().as_secs_f64();
    let r = search(&mut w, Edges::Memory(edges.ptr()), offsets, n, source, c);
    if r.is_err() && w.hung() {
        std::mem::forget(edges); // a kernel still running reads it
    }
    let (depths, levels, edges_scanned, seconds, warps_launched) = r?;
    Ok(GpuMemoryBfsRun {
        depths,
        levels,
        edges_scanned,
        seconds,
        load_seconds,
        warps_launched,
    })
}

/// Where a level's kernel reads the edges.
#[derive(Clone, Copy)]
enum Edges<'a> {
    /// Through the device cache (`gpuio_bfs_level`).
    Cache(&'a DeviceCache),
    /// The edge file in device memory at this address (`gpuio_bfs_level_mem`).
    Memory(u64),
}

/// The kernels read element `e + BEL_HEADER_ELEMENTS` of the edge file for every edge e the
/// offsets name (through the cache's line table, or the copy in device memory): all of them must be
/// in the file's `len` bytes, or a kernel would index past what was allocated for it.
fn check_edges_fit(offsets: &[u64], len: u64, edge_file: &Path) -> Result<()> {
    let need = offsets
        .last()
        .and_then(|&m| m.checked_add(BEL_HEADER_ELEMENTS))
        .and_then(|e| e.checked_mul(8))
        .unwrap_or(u64::MAX);
    if len < need {
        return Err(Error::new(
            ErrorKind::UnexpectedEof,
            format!(
                "the edge file has {len} bytes; the vertex offsets name edges up to byte {need}"
            ),
        )
        .with_path(edge_file));
    }
    Ok(())
}

/// The vertex count of a graph with these offsets, checked against the source.
fn check_graph(offsets: &[u64], source: u64) -> Result<u64> {
    let n = offsets.len().saturating_sub(1) as u64;
    if n == 0 || n >= u32::MAX as u64 {
        return Err(Error::invalid(format!(
            "a graph of {n} vertices: 1..2^32-1 are supported"
        )));
    }
    if source >= n {
        return Err(Error::invalid(format!(
            "source vertex {source} is not in a graph of {n} vertices"
        )));
    }
    Ok(n)
}

fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Depths, levels, edges scanned, seconds, warps launched.
type Found = (Vec<i32>, u32, u64, f64, u64);

fn search(
    w: &mut Workloads,
    edges: Edges<'_>,
    offsets: &[u64],
    n: u64,
    source: u64,
    c: &GpuBfsConfig,
) -> Result<Found> {
    let device = w.device().clone();
    let d = device.as_ref();
    let off = DeviceBuffer::alloc(&device, offsets.len() * 8)?;
    let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    upload(d, &bytes, off.ptr())?;
    drop(bytes);
    let mut depth_init = vec![u32::MAX; n as usize];
    depth_init[source as usize] = 0;
    let depth = DeviceBuffer::alloc(&device, n as usize * 4)?;
    upload(d, &words(&depth_init), depth.ptr())?;
    drop(depth_init);
    // The level's two counters: the next group of 32 vertices to hand out, then the claims.
    let counters = DeviceBuffer::alloc(&device, 8)?;
    let errors = DeviceBuffer::alloc(&device, 16)?;
    upload(d, &[0u8; 16], errors.ptr())?;
    let scanned = DeviceBuffer::alloc(&device, 8)?;
    upload(d, &[0u8; 8], scanned.ptr())?;

    let groups = n.div_ceil(GROUP_VERTICES);
    let max_warps = match edges {
        Edges::Cache(cache) => c.warps.clamp(1, (cache.arg().slots / 4).max(1)),
        Edges::Memory(_) => c.warps.max(1),
    };
    let kernel = match edges {
        Edges::Cache(_) => super::kernels::BFS_LEVEL,
        Edges::Memory(_) => super::kernels::BFS_LEVEL_MEM,
    };
    // Every level scans every group; more warps than groups would find nothing to take.
    let (blocks, block) = warp_grid((max_warps as u64).min(groups) as u32);
    let warps = blocks * block / 32;
    let mut warps_launched = 0u64;
    let mut level = 0u32;
    let t0 = Instant::now();
    loop {
        upload(d, &[0u8; 8], counters.ptr())?;
        warps_launched += warps as u64;
        // The first parameter: the cache's descriptor, or the edges' device address.
        let (mut a, mut edges_ptr) = match edges {
            Edges::Cache(cache) => (Some(cache.arg()), 0u64),
            Edges::Memory(ptr) => (None, ptr),
        };
        let first = match a.as_mut() {
            Some(a) => a as *mut CacheArg as *mut std::ffi::c_void,
            None => &mut edges_ptr as *mut u64 as *mut std::ffi::c_void,
        };
        let (mut base, mut op, mut nn, mut dp, mut lv, mut cp, mut fp, mut ep, mut sp): (
            u64,
            u64,
            u64,
            u64,
            u32,
            u64,
            u64,
            u64,
            u64,
        ) = (
            BEL_HEADER_ELEMENTS,
            off.ptr(),
            n,
            depth.ptr(),
            level,
            counters.ptr(),
            counters.ptr() + 4,
            errors.ptr(),
            scanned.ptr(),
        );
        let mut params = [
            first,
            &mut base as *mut u64 as *mut _,
            &mut op as *mut u64 as *mut _,
            &mut nn as *mut u64 as *mut _,
            &mut dp as *mut u64 as *mut _,
            &mut lv as *mut u32 as *mut _,
            &mut cp as *mut u64 as *mut _,
            &mut fp as *mut u64 as *mut _,
            &mut ep as *mut u64 as *mut _,
            &mut sp as *mut u64 as *mut _,
        ];
        // SAFETY: the parameters match gpuio_bfs_level(array<u64>, u64 edge_base, const u64*
        // offsets, u64 n, u32* depth, u32 level, u32* cursor, u32* found, int* errors, u64*
        // scanned), or gpuio_bfs_level_mem with a const u64* first; every buffer (and `a` or
        // `edges_ptr`) lives past the wait below.
        unsafe { w.module().launch(kernel, blocks, block, &mut params)? };
        if let Err(e) = w.module().synchronize(c.level_timeout) {
            if w.hung() {
                // The kernel may still use every one of them.
                std::mem::forget((off, depth, counters, errors, scanned));
            }
            return Err(e);
        }
        check_errors(d, &errors, level)?;
        let mut cf = [0u8; 8];
        counters.read(0, &mut cf)?;
        let taken = u32::from_le_bytes(cf[..4].try_into().expect("4 bytes"));
        let found = u32::from_le_bytes(cf[4..].try_into().expect("4 bytes"));
        // Each warp takes groups until one past the last: fewer means a warp stopped early.
        if (taken as u64) < groups {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("level {level}: the kernel took {taken} of {groups} vertex groups"),
            ));
        }
        if found == 0 {
            break;
        }
        if found as u64 > n {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("level {level} claims {found} new vertices of {n}: the kernel misbehaved"),
            ));
        }
        level += 1;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut back = vec![0u8; n as usize * 4];
    depth.read(0, &mut back)?;
    let depths = back
        .chunks_exact(4)
        .map(|b| {
            let v = u32::from_le_bytes(b.try_into().expect("4 bytes"));
            if v == u32::MAX {
                -1
            } else {
                v as i32
            }
        })
        .collect();
    let mut s = [0u8; 8];
    scanned.read(0, &mut s)?;
    Ok((
        depths,
        level + 1,
        u64::from_le_bytes(s),
        seconds,
        warps_launched,
    ))
}

/// Failed reads fail the search with their code (`Io`); destinations out of range mean a corrupt
/// edge file (`Corrupt`, naming the first such edge's position, modulo 2^31).
fn check_errors(device: &dyn Device, errors: &DeviceBuffer, level: u32) -> Result<()> {
    let mut b = [0u8; 16];
    errors.read(0, &mut b)?;
    let w = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let (failed, bad, code, edge) = (w(0), w(1), w(2), w(3));
    if failed > 0 {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "level {level}: {failed} edge reads by the kernel on {} failed ({})",
                device.label(),
                super::layout::code::name(code)
            ),
        ));
    }
    if bad > 0 {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "level {level}: {bad} edge destinations are not vertices of the graph (the first seen at edge {edge} modulo 2^31): the edge file is corrupt"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use gpuio::ErrorKind;

    use super::check_edges_fit;

    #[test]
    fn an_edge_file_shorter_than_the_offsets_name_is_refused_before_a_kernel_runs() {
        let f = Path::new("g.bel.dst");
        // 5 edges after the 16-byte header: 56 bytes needed.
        let offsets = [0, 2, 5];
        assert!(check_edges_fit(&offsets, 56, f).is_ok());
        assert!(check_edges_fit(&offsets, 1 << 20, f).is_ok());
        let e = check_edges_fit(&offsets, 55, f).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("g.bel.dst"), "{e}");
        assert!(e.to_string().contains("56"), "{e}");
        assert!(check_edges_fit(&[0, u64::MAX], u64::MAX - 1, f).is_err());
    }
}
