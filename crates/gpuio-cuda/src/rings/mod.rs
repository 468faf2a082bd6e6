//! GPU kernels issue their own reads and writes (issue 15): request rings in host-mapped memory,
//! served by host polling threads through the gpu-io engine, and the device-side cache's line state
//! machine. The protocol is specified byte by byte in `docs/rings.md`; the device side is
//! `device/gpuio.cuh`.
//!
//! - [`layout`] — the `#[repr(C)]` structs, offsets, state words, opcodes and result codes.
//! - [`region`] — the host region (pinned, mapped) and the device region, through [`Device`](crate::Device).
//! - [`producer`] — the producer protocol on CPU threads (the reference `gpuio.cuh` mirrors; the
//!   tests' stand-in for kernels).
//! - [`server`] — the polling threads: batches, coalescing, copies, completions, statistics.
//! - [`publish`] — how completion words reach device memory after their data (a stream write, or a
//!   copy from pinned memory on the same stream), and which one a device gets, with the reason.
//! - [`kernels`] — the workload kernels on a GPU (`device/workloads.cu`): their arguments, the device
//!   cache's memory, random reads and an embedding gather issued by GPU threads, checked and timed.
//! - [`bfs`] — breadth-first search with the edge array on storage, a kernel launch per level.
//! - [`bench`] — `gpuio rings`: those workloads end to end, each on a fresh server.
//! - [`line`] — the Rust twin of the device cache's line state machine (model-checked with loom).
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use gpuio_cuda::rings::{layout, producer::Request, RingConfig, RingProducer, RingRegion,
//!     RingServer, ServerConfig, HostStorePublish};
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("table.bin");
//! # std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
//! let engine = gpuio::Engine::new(gpuio::EngineConfig::default())?;
//! let device = gpuio_cuda::open_device("cpu")?;
//! let region = Arc::new(RingRegion::new(&device, RingConfig::default())?);
//! let lines = gpuio_cuda::DeviceBuffer::alloc(&device, 16 * 4096)?;   // the cache's line memory
//! // SAFETY: the cpu stand-in's device addresses are host addresses.
//! let publish = || Box::new(unsafe { HostStorePublish::new() }) as Box<dyn gpuio_cuda::rings::Publish>;
//! let server = RingServer::start(&engine, region.clone(), vec![gpuio::File::open(&path)?],
//!     (lines.ptr(), lines.len()), &publish, ServerConfig::default())?;
//! // SAFETY: as above.
//! let p = unsafe { RingProducer::new(region.clone()) };
//! let req = Request { opcode: layout::OP_READ, file_id: 0, offset: 8192, length: 4096,
//!     completion: 0, dev_addr: lines.ptr(), tag: 1 };
//! p.submit(0, &req).unwrap();
//! assert_eq!(p.wait(0, 1, Duration::from_secs(10)), 4096);
//! let mut back = vec![0u8; 4096];
//! lines.read(0, &mut back)?;
//! assert!(back.iter().all(|&b| b == 7));
//! let stats = server.shutdown();
//! assert_eq!(stats.reads, 1);
//! # Ok::<(), gpuio::Error>(())
//! ```

pub mod bench;
pub mod bfs;
pub mod deliver;
pub mod host_bench;
pub mod kernels;
pub mod layout;
pub mod line;
pub mod producer;
pub mod publish;
pub mod region;
pub mod server;

pub use deliver::DeliveryPath;
pub use layout::{code, Layout, RingConfig};
pub use line::{LineCache, LineState, Lookup, Word32};
pub use producer::{Request, RingProducer};
pub use publish::{
    rings_info, CopyWordPublish, PublisherChoice, PublisherKind, RingsInfo, StreamWritePublish,
};
pub use region::RingRegion;
pub use server::{
    default_polling_threads, polling_threads, HostStorePublish, Publish, RingServer, RingStats,
    ServerConfig, ROUNDS_IN_FLIGHT_MAX,
};
