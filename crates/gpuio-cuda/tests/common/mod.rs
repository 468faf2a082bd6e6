//! Test inputs and checks shared by the loader tests (each test binary uses a part of them).
#![allow(dead_code)]

pub mod gpu_cases;
pub mod mock;
pub mod rings;

use std::path::{Path, PathBuf};

use gpuio_cuda::safetensors::serialize;
use gpuio_cuda::{Dtype, LoadedModel};
use gpuio_testkit::Rng;

/// Tensors as (name, bytes).
pub type Tensors = Vec<(String, Vec<u8>)>;

/// A random safetensors file `m{seed}.safetensors` in `dir`: `n` tensors of random dtypes and
/// shapes (rows up to `max_elems`; the middle one empty) and a metadata entry of random length, so
/// the body starts at an unaligned offset. Returns its path and each tensor's (name, bytes).
pub fn random_model(
    dir: &Path,
    seed: u64,
    n: usize,
    max_elems: u64,
) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    random_model_in(dir, seed, n, max_elems, "", &format!("m{seed}.safetensors"))
}

/// `n` random shards (as [`random_model`], tensor names prefixed `s{k}.` so no two shards share one)
/// named `model-0000k-of-0000n.safetensors`, and a HuggingFace index naming them. Returns the index,
/// the shards' paths and every tensor's (name, bytes).
pub fn random_shards(
    dir: &Path,
    seed: u64,
    n: usize,
    tensors: usize,
    max_elems: u64,
) -> (PathBuf, Vec<PathBuf>, Tensors) {
    let mut map = serde_json::Map::new();
    let (mut paths, mut want) = (Vec::new(), Vec::new());
    for k in 0..n {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let (p, w) = random_model_in(
            dir,
            seed + k as u64,
            tensors,
            max_elems,
            &format!("s{k}."),
            &file,
        );
        for (name, _) in &w {
            map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        paths.push(p);
        want.extend(w);
    }
    let index = dir.join("model.safetensors.index.json");
    let v = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(&index, v.to_string()).unwrap();
    (index, paths, want)
}

fn random_model_in(
    dir: &Path,
    seed: u64,
    n: usize,
    max_elems: u64,
    prefix: &str,
    file: &str,
) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let mut rng = Rng::new(seed);
    let dtypes = [
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::U8,
        Dtype::F64,
    ];
    let mut owned: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = Vec::new();
    for i in 0..n {
        let d = *rng.pick(&dtypes);
        let rows = if i == n / 2 {
            0
        } else {
            1 + rng.below(max_elems)
        };
        let cols = 1 + rng.below(3);
        let mut data = vec![0u8; (rows * cols * d.bits() / 8) as usize];
        rng.fill(&mut data);
        owned.push((
            format!("{prefix}layer.{i}.weight"),
            d,
            vec![rows, cols],
            data,
        ));
    }
    let pad = "x".repeat(rng.below(50) as usize);
    let views: Vec<(&str, Dtype, &[u64], &[u8])> = owned
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
        .collect();
    let path = dir.join(file);
    std::fs::write(&path, serialize(&views, &[("pad", &pad), ("format", "pt")])).unwrap();
    (path, owned.into_iter().map(|(n, _, _, b)| (n, b)).collect())
}

/// CRC-32C (Castagnoli), bit by bit: the loaders' checksum, computed independently of the crate.
pub fn crc(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Checks every tensor read back from the device against the file's bytes.
pub fn check_model(model: &LoadedModel, want: &[(String, Vec<u8>)]) {
    assert_eq!(model.tensors.len(), want.len());
    for (name, bytes) in want {
        let t = model.tensors.iter().find(|t| &t.name == name).unwrap();
        assert_eq!(t.bytes as usize, bytes.len(), "{name}");
        assert_eq!(
            model.crc32c(t).unwrap(),
            crc(bytes),
            "{name}: device bytes differ"
        );
        assert_eq!(t.device_ptr, model.buffer.ptr() + t.offset);
    }
}
