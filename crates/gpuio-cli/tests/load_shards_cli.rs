//! `gpuio load` of a sharded checkpoint, end to end through the binary: as a HuggingFace index and as
//! several files, on the host stand-in and under the mock CUDA driver
//! (`crates/gpuio-cuda/tests/mock_libcuda.c`, built with `cc`; skipped, saying so, without one unless
//! `GPUIO_REQUIRE_CC=1`). Every tensor's CRC in the JSON must match the bytes written; `phases` must
//! account for the end-to-end time; every refusal is one line naming the file, with a non-zero exit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{crc32c, fails_cleanly, ok_json};
use gpuio_cuda::safetensors::serialize;
use gpuio_cuda::Dtype;

#[path = "../../gpuio-cuda/tests/common/mock.rs"]
mod mock;

/// Every tensor's name and bytes.
type Tensors = Vec<(String, Vec<u8>)>;

/// Three shards and their index in `dir`: (index, shards, every tensor's name and bytes).
fn shards(dir: &Path) -> (PathBuf, Vec<PathBuf>, Tensors) {
    let mut want = Vec::new();
    let mut paths = Vec::new();
    let mut map = serde_json::Map::new();
    for k in 0..3u32 {
        let file = format!("model-{:05}-of-00003.safetensors", k + 1);
        let a: Vec<u8> = (0..150_000u32 + k * 977)
            .map(|i| (i * (k + 3) + 1) as u8)
            .collect();
        let b: Vec<u8> = (0..4096u32).map(|i| (i >> (k + 1)) as u8).collect();
        let names = [format!("layers.{k}.mlp"), format!("layers.{k}.norm")];
        std::fs::write(
            dir.join(&file),
            serialize(
                &[
                    (&names[0], Dtype::U8, &[a.len() as u64], &a),
                    (&names[1], Dtype::BF16, &[2, 1024], &b),
                ],
                &[("format", "pt")],
            ),
        )
        .unwrap();
        for (n, bytes) in names.iter().zip([a, b]) {
            map.insert(n.clone(), serde_json::json!(file));
            want.push((n.clone(), bytes));
        }
        paths.push(dir.join(file));
    }
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        serde_json::json!({"metadata": {"total_size": 1}, "weight_map": map}).to_string(),
    )
    .unwrap();
    (index, paths, want)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The JSON of a sharded load: every tensor with its CRC, per-shard figures, phases.
fn check_json(v: &serde_json::Value, paths: &[PathBuf], want: &[(String, Vec<u8>)]) {
    let ts = v["tensors"].as_array().unwrap();
    assert_eq!(ts.len(), want.len(), "{v}");
    for (name, bytes) in want {
        let t = ts.iter().find(|t| t["name"] == name.as_str()).unwrap();
        assert_eq!(t["crc32c"], format!("{:08x}", crc32c(bytes)), "{name}");
    }
    let sh = v["shards"].as_array().unwrap();
    assert_eq!(sh.len(), paths.len());
    let mut total = 0;
    for (k, (j, p)) in sh.iter().zip(paths).enumerate() {
        assert_eq!(j["file"], s(p));
        assert_eq!(j["tensors"], 2);
        total += j["bytes"].as_u64().unwrap();
        assert!(ts.iter().filter(|t| t["shard"] == k).count() == 2);
        assert!(j["finished_s"].as_f64().unwrap() >= j["started_s"].as_f64().unwrap());
    }
    assert_eq!(v["bytes"], total);
    let ph = &v["phases"];
    for k in [
        "header_s",
        "open_s",
        "device_alloc_s",
        "setup_wait_s",
        "transfer_s",
        "other_s",
        "loader_setup_s",
        "engine_s_not_in_end_to_end",
        "device_open_s_not_in_end_to_end",
    ] {
        assert!(ph[k].as_f64().is_some_and(|x| x >= 0.0), "phases.{k}: {v}");
    }
    for k in [
        "staging_alloc_s",
        "registration_s",
        "pinning_s",
        "copy_stream_s",
    ] {
        assert!(ph["loader_setup"][k].as_f64().is_some(), "{k}: {v}");
    }
    // The critical path's steps fit in end to end.
    let sum: f64 = [
        "header_s",
        "open_s",
        "device_alloc_s",
        "setup_wait_s",
        "transfer_s",
        "other_s",
    ]
    .iter()
    .map(|k| ph[k].as_f64().unwrap())
    .sum();
    let e2e = v["end_to_end_s"].as_f64().unwrap();
    assert!(
        (sum - e2e).abs() < 1e-6,
        "phases {sum} != end to end {e2e}: {v}"
    );
}

#[test]
fn an_index_and_several_files_load_every_tensor_with_per_shard_figures() {
    let dir = tempfile::tempdir().unwrap();
    let (index, paths, want) = shards(dir.path());
    let v = ok_json(&["load", s(&index), "--json", "--staging-size", "64K"]);
    check_json(&v, &paths, &want);
    assert_eq!(v["index"], s(&index));
    assert_eq!(v["phases"]["setup_overlapped"], false);
    let args: Vec<&str> = [
        "load",
        "--json",
        "--overlap-setup",
        "--path",
        "staged",
        "--staging-buffers",
        "2",
    ]
    .into_iter()
    .chain(paths.iter().map(|p| s(p)))
    .collect();
    let v = ok_json(&args);
    check_json(&v, &paths, &want);
    assert!(v["index"].is_null());
    assert_eq!(v["phases"]["setup_overlapped"], true);
    assert_eq!(v["staging_buffers"], 2);
    // The text form says how many shards and where set-up went.
    let out = common::ok(&["load", s(&index)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("loaded 6 tensors from 3 shards"), "{text}");
    assert!(text.contains("loader set-up"), "{text}");
}

#[test]
fn bad_checkpoints_fail_with_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (index, paths, _) = shards(dir.path());
    // The same file twice: its tensors are in two shards.
    fails_cleanly(
        &["load", s(&paths[0]), s(&paths[1]), s(&paths[0])],
        &[
            "layers.0.mlp",
            "is also in",
            "model-00001-of-00003.safetensors",
        ],
    );
    // Several shards cannot be saved to one file, nor mapped.
    let out = dir.path().join("out.safetensors");
    fails_cleanly(
        &["load", s(&index), "--save-to", s(&out)],
        &["--save-to writes one safetensors file"],
    );
    assert!(!out.exists());
    fails_cleanly(
        &["load", s(&index), "--path", "zero-copy"],
        &["zero-copy maps one file"],
    );
    // A corrupt shard.
    let good = std::fs::read(&paths[1]).unwrap();
    std::fs::write(&paths[1], &good[..good.len() - 2]).unwrap();
    fails_cleanly(
        &["load", s(&index)],
        &["model-00002-of-00003.safetensors", "truncated body"],
    );
    std::fs::write(&paths[1], &good).unwrap();
    // A missing shard.
    std::fs::remove_file(&paths[2]).unwrap();
    fails_cleanly(
        &["load", s(&index), "--json"],
        &["model-00003-of-00003.safetensors", "named by"],
    );
}

#[test]
fn an_index_loads_onto_the_mock_gpu() {
    let lib = tempfile::tempdir().unwrap();
    if mock::build_mock(lib.path()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (index, paths, want) = shards(dir.path());
    for extra in [&[][..], &["--overlap-setup"][..]] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuio"));
        cmd.args(["load", s(&index), "--device", "cuda:0", "--json"])
            .args(extra)
            .args(["--staging-size", "64K"])
            .env("LD_LIBRARY_PATH", lib.path());
        let out = mock::output_within(cmd, Duration::from_secs(120), "gpuio load under the mock");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["device"], "cuda:0", "{v}");
        check_json(&v, &paths, &want);
        eprintln!(
            "mock libcuda {extra:?}: end_to_end_s {} phases {}",
            v["end_to_end_s"], v["phases"]
        );
    }
}
