//! gpu-io's accelerator target: device memory as a destination and a source of file I/O.
//!
//! - [`safetensors`] — a strict parser of the safetensors format (errors name the file, the tensor and
//!   the byte offset; nothing is allocated on a device for a bad file).
//! - [`device`] — the [`Device`] / [`CopyStream`] / [`DirectRead`] traits the loaders use,
//!   [`DeviceBuffer`], and [`HostDevice`], a host-memory stand-in that runs the same staging,
//!   ordering and error code where there is no GPU (CI, `--device cpu`).
//! - [`loader`] — the staged path (storage or a pack entry → pinned staging buffers → device copies
//!   on a copy stream, `n ≥ 2` buffers overlapping reads and copies, small copies by programmed I/O
//!   when asked), the choice between staged and direct ([`PathChoice`]), and the safetensors
//!   [`Loader`].
//! - [`checkpoint`] — sharded checkpoints (several safetensors files, or a HuggingFace
//!   `*.safetensors.index.json`): validated across shards before any allocation, loaded through one
//!   loader whose staging is set up once, with the loader's set-up overlapping header reads and device
//!   allocation ([`open_and_load`]).
//! - [`host`] — loads into host memory: straight into the destination when the file is already in
//!   memory, staged when it is cold on a disk.
//! - [`direct`] — the direct path (storage → device memory through a [`DirectRead`], cuFile on a
//!   GPU): a file range in page-aligned chunks read by a bounded set of worker threads.
//! - [`store`] — the reverse: device memory → pinned staging → storage, and saving a loaded model as
//!   safetensors with a crash-safe replacement.
//! - [`zerocopy`] — a file mapped read-only into the device's address space; nothing copied.
//! - [`sweep`] — the programmed-I/O vs DMA sweep that sets the small-copy threshold.
//! - [`rings`] — request rings GPU kernels submit file I/O through, served by host polling threads
//!   (docs/rings.md), and the device cache's line state machine.
//! - [`cuda`] — the real device through the CUDA driver API, loaded at run time: no CUDA is needed to
//!   build, and a missing driver or GPU is a typed error that names what was looked for, never a panic.
//! - [`kernel`] — the programmed-I/O copy kernel (embedded PTX, JIT-compiled by the driver).
//! - [`cufile`] — GPUDirect Storage through libcufile loaded at run time: its status with reasons,
//!   and the [`DirectRead`] that reads with `cuFileRead`.
//!
//! ```
//! use std::sync::Arc;
//! use gpuio_cuda::{open_device, Loader, LoaderConfig};
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("m.safetensors");
//! # let w: Vec<u8> = (0..64u8).collect();
//! # std::fs::write(&path, gpuio_cuda::safetensors::serialize(
//! #     &[("w", gpuio_cuda::Dtype::F32, &[4, 4], &w)], &[])).unwrap();
//! let engine = gpuio::Engine::new(gpuio::EngineConfig::default())?;
//! let device = open_device("cpu")?;            // or "cuda:0" on a machine with a GPU
//! let loader = Loader::new(&engine, device, LoaderConfig::default())?;
//! let model = loader.load_safetensors(&path)?;
//! let w = &model.tensors[0];
//! assert_eq!((w.name.as_str(), w.bytes), ("w", 64));
//! let _ptr = w.device_ptr;                      // hand to a framework
//! # Ok::<(), gpuio::Error>(())
//! ```

pub mod checkpoint;
pub mod cuda;
pub mod cufile;
pub mod device;
pub mod direct;
pub mod host;
pub mod kernel;
mod limits;
pub mod loader;
mod module;
pub mod rings;
pub mod safetensors;
pub mod store;
pub mod sweep;
pub mod zerocopy;

use std::sync::Arc;

pub use checkpoint::{open_and_load, Checkpoint, LoadPhases, LoadedCheckpoint, Shard};
pub use device::{
    CopyKind, CopyRecord, CopyStream, DeliveryDesc, Device, DeviceBuffer, DevicePtr, DirectRead,
    HostDevice, HostDeviceConfig, HostToDevice, KernelModule, MemInfo, Pinned, Ticket,
};
pub use direct::{load_range_direct, DirectConfig, DirectStats};
pub use loader::{
    ChunkTiming, DeviceTensor, LoadPath, LoadStats, LoadedModel, Loader, LoaderConfig, PathChoice,
    SetupTimes,
};
pub use safetensors::{Dtype, Header, TensorSpec};
pub use store::{encode_safetensors_header, StoreChunkTiming, StoreStats};
pub use zerocopy::{map_safetensors, MappedModel};

use gpuio::{Error, Result};

/// Where bytes should land: host memory standing in for a device, or GPU `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target> {
        match s {
            "cpu" => Ok(Target::Cpu),
            "cuda" => Ok(Target::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) if n < 1024 => Ok(Target::Cuda(n)),
                _ => Err(Error::invalid(format!(
                    "unknown device '{s}': expected cpu or cuda:N"
                ))),
            },
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cpu => f.write_str("cpu"),
            Target::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Opens a device by name (`cpu`, `cuda`, `cuda:N`). `cuda:N` fails with
/// [`gpuio::ErrorKind::Unsupported`] where there is no driver or no such GPU, saying why.
pub fn open_device(spec: &str) -> Result<Arc<dyn Device>> {
    open_target(spec.parse()?)
}

/// Opens a [`Target`].
pub fn open_target(t: Target) -> Result<Arc<dyn Device>> {
    match t {
        // The tests' instruments (a CRC of every copied byte, a log of every copy) are for tests
        // that hold the HostDevice itself; through this handle nothing could read them.
        Target::Cpu => Ok(Arc::new(HostDevice::new(HostDeviceConfig {
            skip_instruments: true,
            ..HostDeviceConfig::default()
        }))),
        Target::Cuda(n) => Ok(cuda::CudaDevice::open(n)?),
    }
}
