//! `rings::host_bench`: CPU producers drive the ring server on the host stand-in (what
//! `gpuio rings --device cpu` runs). Every read is accounted for, the sampled ones are compared
//! with the file, and engine faults become an error naming the file and offset, never a hang or a
//! wrong count.

use std::sync::Arc;
use std::time::Duration;

use gpuio::backend::BackendKind;
use gpuio::{Engine, EngineConfig, ErrorKind};
use gpuio_cuda::rings::host_bench::{run, HostRingsConfig, VERIFY_EVERY};
use gpuio_cuda::rings::ServerConfig;
use gpuio_cuda::{open_device, Device};
use gpuio_testkit::{faulty_engine_with, test_config, within, FaultPlan};

fn file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("f.bin");
    let bytes: Vec<u8> = (0..(4u32 << 20) / 4)
        .flat_map(|i| i.to_le_bytes())
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn config(path: std::path::PathBuf, producers: usize, in_flight: u32) -> HostRingsConfig {
    HostRingsConfig {
        file: path,
        read_bytes: 4096,
        reads: 2000,
        in_flight,
        producers,
        server: ServerConfig {
            threads: 2,
            ..ServerConfig::default()
        },
        rings: 4,
        seed: 5,
        timeout: Duration::from_secs(60),
    }
}

#[test]
fn cpu_producers_read_through_the_server_and_every_sample_matches_the_file() {
    within(120, || {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path());
        let device: Arc<dyn Device> = open_device("cpu").unwrap();
        let engine = Engine::new(EngineConfig::default()).unwrap();
        // One producer with one read in flight, and three sharing 31 (an uneven split).
        for (producers, in_flight) in [(1, 1), (3, 31)] {
            let r = run(
                &engine,
                &device,
                &config(path.clone(), producers, in_flight),
            )
            .unwrap();
            let k = &r.reads;
            assert_eq!(k.requests, 2000);
            assert_eq!(k.threads, in_flight as u64);
            assert_eq!(
                k.server.requests, 2000,
                "every read reached the server once"
            );
            assert_eq!(k.server.errors, 0);
            assert_eq!(k.server.bytes_read, 2000 * 4096);
            assert_eq!(k.verified_bytes, 2000u64.div_ceil(VERIFY_EVERY) * 4096);
            assert!(k.requests_per_sec() > 0.0 && r.process_cpu_s >= r.producer_cpu_s);
        }
    });
}

/// The error of a run on an engine with `plan`'s faults (seeded), which must fail.
fn fail_with(plan: FaultPlan, seed: u64, producers: usize, in_flight: u32) -> gpuio::Error {
    let dir = tempfile::tempdir().unwrap();
    let path = file(dir.path());
    let device: Arc<dyn Device> = open_device("cpu").unwrap();
    let (engine, _faults) =
        faulty_engine_with(test_config(BackendKind::Threads), seed, plan).unwrap();
    run(&engine, &device, &config(path, producers, in_flight)).unwrap_err()
}

#[test]
fn engine_faults_fail_the_run_naming_the_file_and_offset() {
    within(120, || {
        let e = fail_with(FaultPlan::none().with_read_eio(0.05), 3, 2, 16);
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("f.bin") && msg.contains("at offset"), "{msg}");
    });
}

#[test]
fn bytes_that_differ_from_the_file_are_caught_by_the_sample() {
    within(120, || {
        // Every read delivers its full length with wrong bytes: only the comparison can tell.
        let e = fail_with(FaultPlan::none().with_corrupt_read(1.0), 4, 1, 8);
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("differs from the file"), "{e}");
    });
}

#[test]
fn bad_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(dir.path());
    let device: Arc<dyn Device> = open_device("cpu").unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    for c in [
        HostRingsConfig {
            read_bytes: 1000,
            ..config(path.clone(), 1, 1)
        },
        HostRingsConfig {
            producers: 0,
            ..config(path.clone(), 1, 1)
        },
        HostRingsConfig {
            in_flight: 0,
            ..config(path.clone(), 1, 1)
        },
        HostRingsConfig {
            read_bytes: 8 << 20,
            ..config(path.clone(), 1, 1)
        },
    ] {
        let e = run(&engine, &device, &c).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
}
