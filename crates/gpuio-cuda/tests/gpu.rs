//! The same loads, stores and copies on a real GPU (`cuda:0`), byte for byte. The cases live in
//! `tests/common/gpu_cases.rs`, which `tests/mock_driver.rs` also runs under the mock driver.
//!
//! Where no GPU (or no driver) is found each test skips, saying why: CI and the development machines
//! have none. On a GPU machine, set `GPUIO_REQUIRE_GPU=1` (scripts/bench-gpu.sh does) so that a
//! missing or unusable GPU fails every test instead of letting a run report "passed" with everything
//! skipped.

use std::sync::Arc;

mod common;

use common::gpu_cases;
use gpuio::{Engine, EngineConfig};
use gpuio_cuda::{cuda, Device};

/// Set to 1 where a GPU must be present: skips become failures.
const REQUIRE_GPU: &str = "GPUIO_REQUIRE_GPU";

fn gpu() -> Option<Arc<dyn Device>> {
    match cuda::CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var(REQUIRE_GPU).is_ok_and(|v| v == "1") => {
            panic!("{REQUIRE_GPU}=1 but cuda:0 cannot be opened: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no GPU here ({e}); set {REQUIRE_GPU}=1 to fail instead");
            None
        }
    }
}

#[test]
fn staged_loads_with_dma_and_programmed_io_are_byte_exact() {
    let Some(device) = gpu() else { return };
    let engine = Engine::new(EngineConfig::default()).unwrap();
    gpu_cases::staged_loads_with_dma_and_programmed_io(&device, &engine);
}

#[test]
fn zero_copy_mapping_reads_the_file_through_the_device() {
    let Some(device) = gpu() else { return };
    gpu_cases::zero_copy_mapping(&device);
}

#[test]
fn the_pio_dma_sweep_runs_and_checks_its_copies() {
    let Some(device) = gpu() else { return };
    gpu_cases::pio_dma_sweep(&device);
}

#[test]
fn out_of_device_memory_is_a_typed_error_and_releases_everything() {
    let Some(device) = gpu() else { return };
    gpu_cases::out_of_device_memory(&device);
}

#[test]
fn the_direct_path_through_cufile_is_byte_exact_where_cufile_works() {
    let Some(device) = gpu() else { return };
    // Whether cuFile serves this machine's filesystem is the machine's property, not a failure: the
    // case proves the direct load where it works and the automatic fallback where it does not.
    if let Some(why) = gpu_cases::direct_path_where_cufile_works(&device) {
        eprintln!("direct load not run: {why}");
    }
}
