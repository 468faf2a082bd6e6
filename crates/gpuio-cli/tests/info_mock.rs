//! `gpuio info` under the mock CUDA driver (`crates/gpuio-cuda/tests/mock_libcuda.c`, built with
//! `cc` and put first on `LD_LIBRARY_PATH`, which is where cudarc looks for libcuda): the GPU section
//! gets a request-rings section saying whether the device maps host memory, which completion
//! publisher the ring server would use and why, and the line copy threshold. The mock's attribute
//! overrides (`MOCK_CUDA_ATTR_<n>`) turn each answer the other way. Without `cc` the test skips,
//! saying so, unless `GPUIO_REQUIRE_CC=1`.

use std::process::Command;
use std::time::Duration;

#[path = "../../gpuio-cuda/tests/common/mock.rs"]
mod mock;

fn info(lib: &std::path::Path, json: bool, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuio"));
    cmd.arg("info").env("LD_LIBRARY_PATH", lib);
    if json {
        cmd.arg("--json");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = mock::output_within(cmd, Duration::from_secs(120), "gpuio info");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "gpuio info failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn rings(lib: &std::path::Path, env: &[(&str, &str)]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&info(lib, true, env)).unwrap();
    assert_eq!(v["gpu"]["driver_available"], true, "{v}");
    v["gpu"]["rings"].clone()
}

#[test]
fn info_has_a_rings_section_under_the_mock_driver() {
    let dir = tempfile::tempdir().unwrap();
    if mock::build_mock(dir.path()).is_none() {
        return;
    }
    let lib = dir.path();

    let r = rings(lib, &[]);
    assert_eq!(r["device"], "cuda:0", "{r}");
    assert_eq!(r["can_map_host_memory"], true, "{r}");
    assert_eq!(r["completion_publisher"], "stream-write", "{r}");
    let why = r["completion_publisher_reason"].as_str().unwrap();
    assert!(why.contains("cuStreamWriteValue64_v2"), "{r}");
    assert_eq!(r["pio_max_bytes"], 0, "{r}");
    assert!(
        r["pio_reason"]
            .as_str()
            .unwrap()
            .contains("DMA at every size"),
        "{r}"
    );

    // No 64-bit stream memory operations: the words are copied after the data, and it says why.
    let r = rings(lib, &[("MOCK_CUDA_ATTR_122", "0")]);
    assert_eq!(r["completion_publisher"], "copy-word", "{r}");
    let why = r["completion_publisher_reason"].as_str().unwrap();
    assert!(
        why.contains("CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS (122) is 0")
            && why.contains("NVreg_EnableStreamMemOPs"),
        "{r}"
    );

    // A device that cannot map host memory says so.
    let r = rings(lib, &[("MOCK_CUDA_ATTR_19", "0")]);
    assert_eq!(r["can_map_host_memory"], false, "{r}");

    // The text form has the same section.
    let text = info(lib, false, &[]);
    assert!(text.contains("request rings (cuda:0)"), "{text}");
    assert!(text.contains("maps host memory: yes"), "{text}");
    assert!(
        text.contains("completion publisher: stream-write: cuStreamWriteValue64_v2"),
        "{text}"
    );
    assert!(
        text.contains("line copies: lines are copied to the device by DMA at every size"),
        "{text}"
    );
}

/// Where no driver loads (an empty library path, and no real driver on this machine), there is no
/// rings section rather than a made-up one.
#[test]
fn info_has_no_rings_section_without_a_driver() {
    let dir = tempfile::tempdir().unwrap();
    let v: serde_json::Value = serde_json::from_str(&info(dir.path(), true, &[])).unwrap();
    if v["gpu"]["driver_available"] == true {
        eprintln!("skipped: a real CUDA driver is installed here");
        return;
    }
    assert!(v["gpu"]["rings"].is_null(), "{v}");
}
