//! Sharded checkpoints on the host stand-in: several safetensors files (or a HuggingFace index naming
//! them) loaded through one loader whose staging is set up once. Every tensor is checked byte for
//! byte (CRC of the device bytes read back against the bytes written); every refusal names the file;
//! every failure — a bad index, a bad shard, a read fault or a failed copy in the middle of shard 2,
//! the device full at shard 3 — leaves nothing allocated and every staging buffer back in its pool.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::crc;
use gpuio::backend::BackendKind;
use gpuio::ErrorKind;
use gpuio_cuda::safetensors::serialize;
use gpuio_cuda::{
    open_and_load, Checkpoint, Device, Dtype, HostDevice, HostDeviceConfig, LoadedCheckpoint,
    Loader, LoaderConfig,
};
use gpuio_testkit::{faulty_engine, FaultPlan, Rng};

const STAGING: usize = 64 << 10;

fn cfg(buffers: usize) -> LoaderConfig {
    LoaderConfig {
        staging_buffers: buffers,
        staging_bytes: STAGING,
        timeline: true,
        ..LoaderConfig::default()
    }
}

/// Tensor name → its bytes, over all shards.
type Want = Vec<(String, Vec<u8>)>;

/// `n` shards `model-0000k-of-0000n.safetensors` in `dir` (tensor names unique across shards, each
/// shard about `bytes` long, one shard-local empty tensor) and `model.safetensors.index.json`.
fn sharded(dir: &Path, seed: u64, n: usize, bytes: usize) -> (PathBuf, Vec<PathBuf>, Want) {
    let mut rng = Rng::new(seed);
    let mut want = Vec::new();
    let mut paths = Vec::new();
    let mut map = serde_json::Map::new();
    for k in 0..n {
        let name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let mut owned: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = Vec::new();
        let mut left = bytes;
        let mut i = 0;
        while left > 0 {
            let len = (1 + rng.below(bytes as u64 / 3) as usize).min(left) / 2 * 2;
            let len = len.max(2);
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            owned.push((
                format!("layers.{k}.{i}.weight"),
                Dtype::F16,
                vec![len as u64 / 2],
                data,
            ));
            left = left.saturating_sub(len);
            i += 1;
        }
        owned.push((format!("layers.{k}.empty"), Dtype::F32, vec![0], Vec::new()));
        let views: Vec<(&str, Dtype, &[u64], &[u8])> = owned
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
            .collect();
        let pad = "p".repeat(rng.below(40) as usize);
        let path = dir.join(&name);
        std::fs::write(&path, serialize(&views, &[("format", "pt"), ("pad", &pad)])).unwrap();
        for (t, ..) in &owned {
            map.insert(t.clone(), serde_json::Value::String(name.clone()));
        }
        want.extend(owned.into_iter().map(|(n, _, _, b)| (n, b)));
        paths.push(path);
    }
    let index = dir.join("model.safetensors.index.json");
    let v = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(&index, v.to_string()).unwrap();
    (index, paths, want)
}

/// Every tensor of `want` is on the device with exactly its bytes, in the shard it was written to.
fn check(c: &LoadedCheckpoint, want: &Want) {
    assert_eq!(c.tensor_count(), want.len());
    for (name, bytes) in want {
        let (m, t) = c
            .shards
            .iter()
            .find_map(|m| m.tensors.iter().find(|t| &t.name == name).map(|t| (m, t)))
            .unwrap_or_else(|| panic!("{name} not loaded"));
        assert_eq!(t.bytes as usize, bytes.len(), "{name}");
        assert_eq!(
            m.crc32c(t).unwrap(),
            crc(bytes),
            "{name}: device bytes differ"
        );
    }
}

fn host() -> (HostDevice, Arc<dyn Device>) {
    let dev = HostDevice::new(HostDeviceConfig::default());
    let d: Arc<dyn Device> = Arc::new(dev.clone());
    (dev, d)
}

#[test]
fn an_index_loads_every_shard_byte_exact_with_staging_set_up_once() {
    let dir = tempfile::tempdir().unwrap();
    let (index, paths, want) = sharded(dir.path(), 1, 4, 300_000);
    for (label, engine) in gpuio_testkit::engines() {
        let (dev, device) = host();
        let loader = Loader::new(&engine, device, cfg(3)).unwrap();
        assert_eq!(dev.pin_calls(), 3, "{label}");
        let ckpt = Checkpoint::open(std::slice::from_ref(&index)).unwrap();
        assert_eq!(ckpt.index.as_deref(), Some(index.as_path()));
        assert_eq!(
            ckpt.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            paths.iter().collect::<Vec<_>>(),
            "shards in name order"
        );
        for _ in 0..2 {
            let c = loader.load_checkpoint(&ckpt).unwrap();
            check(&c, &want);
            assert_eq!(c.shards.len(), 4);
            assert_eq!(c.bytes(), ckpt.bytes());
            for (m, p) in c.shards.iter().zip(&paths) {
                assert_eq!(
                    m.stats.bytes,
                    std::fs::metadata(p).unwrap().len() - {
                        let h = gpuio_cuda::safetensors::read_header(p).unwrap();
                        h.body_offset
                    }
                );
                assert!(m.stats.chunks >= 4, "{label}: {:?}", m.stats);
            }
            drop(c);
            assert_eq!(dev.allocated_bytes(), 0, "{label}");
        }
        // One staging set-up for 8 shard loads: no buffer was pinned again, none is missing.
        assert_eq!(dev.pin_calls(), 3, "{label}: staging set up again");
        assert_eq!(
            dev.alloc_calls(),
            8,
            "{label}: one device allocation per shard"
        );
        assert_eq!(loader.staging_pool().unwrap().available(), 3, "{label}");
        assert_eq!(dev.reuse_violations(), 0, "{label}");
        drop(loader);
        assert_eq!(dev.pinned_bytes(), 0, "{label}");
    }
}

#[test]
fn several_files_load_as_one_checkpoint_and_the_next_shard_is_read_while_copies_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_, paths, want) = sharded(dir.path(), 2, 3, 400_000);
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let dev = HostDevice::new(HostDeviceConfig {
        copy_delay: Duration::from_millis(8),
        ..HostDeviceConfig::default()
    });
    let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(3)).unwrap();
    let c = loader.load_safetensors_many(&paths).unwrap();
    check(&c, &want);
    assert_eq!(c.paths, paths);
    assert!(c.index.is_none());
    let log = dev.copy_log();
    for k in 0..c.shards.len() - 1 {
        let last = c.shards[k].stats.timeline.last().unwrap();
        let done = log
            .iter()
            .find(|r| r.ticket == last.ticket)
            .unwrap()
            .finished;
        let next = c.shards[k + 1].stats.timeline[0].read_issued;
        assert!(
            next < done,
            "shard {} was not read while shard {k}'s last copy ran",
            k + 1
        );
        assert!(c.windows[k].0 <= c.windows[k].1);
    }
    // Copies went to each shard's own allocation, in order, covering it exactly.
    for m in &c.shards {
        let mut at = m.buffer.ptr();
        for t in &m.stats.timeline {
            let r = log.iter().find(|r| r.ticket == t.ticket).unwrap();
            assert_eq!(r.dst, at);
            at += r.len as u64;
        }
        assert_eq!(at, m.buffer.ptr() + m.buffer.len() as u64);
    }
    assert_eq!(dev.reuse_violations(), 0);
}

#[test]
fn open_and_load_overlapped_or_serial_loads_exact_bytes_and_reports_its_phases() {
    let dir = tempfile::tempdir().unwrap();
    let (index, _, want) = sharded(dir.path(), 3, 4, 200_000);
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    for overlap in [true, false] {
        let (dev, device) = host();
        let ckpt = Checkpoint::open(std::slice::from_ref(&index)).unwrap();
        let (loader, c) = open_and_load(&engine, &device, cfg(4), &ckpt, overlap).unwrap();
        check(&c, &want);
        let p = c.phases;
        assert_eq!(p.setup_overlapped, overlap);
        let setup = p.setup.unwrap();
        assert!(setup.total >= setup.staging_alloc + setup.registration + setup.pinning);
        assert!(p.transfer > Duration::ZERO && p.header > Duration::ZERO);
        // end to end covers every step on the critical path.
        assert!(p.end_to_end >= p.header + p.open + p.device_alloc + p.setup_wait + p.transfer);
        if !overlap {
            assert!(p.setup_wait >= setup.total, "{p:?}");
        }
        assert_eq!(dev.pin_calls(), 4);
        drop((loader, c));
        assert_eq!((dev.allocated_bytes(), dev.pinned_bytes()), (0, 0));
    }
}

/// Refusals happen while validating, so nothing is ever allocated for them.
fn refused(inputs: &[PathBuf], kind: ErrorKind, needles: &[&str]) {
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let (dev, device) = host();
    let loader = Loader::new(&engine, device.clone(), cfg(2)).unwrap();
    let e = Checkpoint::open(inputs)
        .and_then(|c| loader.load_checkpoint(&c))
        .unwrap_err();
    assert_eq!(e.kind(), kind, "{e}");
    let s = e.to_string();
    for n in needles {
        assert!(s.contains(n), "'{s}' lacks '{n}'");
    }
    assert_eq!(dev.alloc_calls(), 0, "{e}");
    drop(loader);
    assert_eq!(dev.pinned_bytes(), 0);
}

#[test]
fn bad_checkpoints_are_refused_naming_the_file_before_any_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (index, paths, _) = sharded(d, 4, 3, 50_000);
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    let one = |p: &Path| vec![p.to_path_buf()];
    let write_index = |file: &str, body: &str| {
        let p = d.join(file);
        std::fs::write(&p, body).unwrap();
        p
    };
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&index).unwrap()).unwrap()
            ["weight_map"]
            .as_object()
            .unwrap()
            .clone();

    // The same tensor in two files given as shards.
    refused(
        &[paths[0].clone(), paths[1].clone(), paths[0].clone()],
        ErrorKind::Corrupt,
        &["layers.0.0.weight", "is also in", &name(&paths[0])],
    );
    // A shard the index names is missing.
    std::fs::rename(&paths[1], d.join("moved")).unwrap();
    refused(
        &one(&index),
        ErrorKind::NotFound,
        &[&name(&paths[1]), "named by", "model.safetensors.index.json"],
    );
    std::fs::rename(d.join("moved"), &paths[1]).unwrap();
    // A tensor the index lists is not in its shard.
    map.insert("ghost".into(), serde_json::json!(name(&paths[2])));
    let ix = write_index(
        "ghost.safetensors.index.json",
        &serde_json::json!({ "weight_map": map }).to_string(),
    );
    refused(
        &one(&ix),
        ErrorKind::Corrupt,
        &["'ghost'", &name(&paths[2]), "no such tensor"],
    );
    map.remove("ghost");
    // A tensor of a shard that the index puts in another shard, and one it leaves out.
    map.insert(
        "layers.0.0.weight".into(),
        serde_json::json!(name(&paths[1])),
    );
    let ix = write_index(
        "moved.safetensors.index.json",
        &serde_json::json!({ "weight_map": map }).to_string(),
    );
    refused(&one(&ix), ErrorKind::Corrupt, &["layers.0.0.weight"]);
    map.remove("layers.0.0.weight");
    let ix = write_index(
        "missing.safetensors.index.json",
        &serde_json::json!({ "weight_map": map }).to_string(),
    );
    refused(
        &one(&ix),
        ErrorKind::Corrupt,
        &[
            "'layers.0.0.weight'",
            "not in the weight_map",
            &name(&paths[0]),
        ],
    );
    // Repeated keys, names out of the directory, no weight_map, not JSON.
    let ix = write_index(
        "dup.safetensors.index.json",
        &format!(
            r#"{{"weight_map":{{"a":"{0}","a":"{0}"}}}}"#,
            name(&paths[0])
        ),
    );
    refused(&one(&ix), ErrorKind::Corrupt, &["duplicate key 'a'"]);
    for bad in ["../x.safetensors", "/etc/passwd", ""] {
        let ix = write_index(
            "escape.safetensors.index.json",
            &serde_json::json!({"weight_map": {"a": bad}}).to_string(),
        );
        refused(&one(&ix), ErrorKind::Corrupt, &["relative to the index"]);
    }
    let ix = write_index("none.safetensors.index.json", r#"{"metadata":{}}"#);
    refused(&one(&ix), ErrorKind::Corrupt, &["no \"weight_map\""]);
    let ix = write_index("junk.safetensors.index.json", "{not json");
    refused(&one(&ix), ErrorKind::Corrupt, &["checkpoint index"]);
    // An index among other files.
    refused(
        &[paths[0].clone(), index.clone()],
        ErrorKind::InvalidInput,
        &["give it alone"],
    );
    // A corrupt shard.
    let mut img = std::fs::read(&paths[2]).unwrap();
    img.truncate(img.len() - 5);
    std::fs::write(&paths[2], &img).unwrap();
    refused(
        &one(&index),
        ErrorKind::Corrupt,
        &[&name(&paths[2]), "truncated body"],
    );
    refused(&paths, ErrorKind::Corrupt, &[&name(&paths[2])]);
}

#[test]
fn a_read_fault_in_the_middle_of_shard_2_releases_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (_, paths, want) = sharded(dir.path(), 5, 3, 6 * STAGING);
    // Shard 1 is 6 or 7 chunks (its body starts unaligned), read one operation each through the
    // page cache; the 10th read is the 3rd or 4th chunk of shard 2 (of 7).
    for (nth, errno) in [(10u64, libc::EIO), (11, libc::EIO)] {
        let plan = FaultPlan::none().with_fail_nth(nth, errno, false);
        let (engine, handle) = faulty_engine(nth, plan, BackendKind::Threads).unwrap();
        let dev = HostDevice::new(HostDeviceConfig {
            copy_delay: Duration::from_millis(1),
            ..HostDeviceConfig::default()
        });
        let loader = Loader::new(&engine, Arc::new(dev.clone()), cfg(3)).unwrap();
        let e = loader.load_safetensors_many(&paths).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        let s = e.to_string();
        assert!(
            s.contains("reading chunk") && s.contains(paths[1].to_str().unwrap()),
            "not shard 2: {s}"
        );
        assert!(handle.counts().hard_errors() >= 1);
        assert_eq!(dev.allocated_bytes(), 0, "device memory left after a fault");
        assert_eq!(
            loader.staging_pool().unwrap().available(),
            3,
            "staging not returned"
        );
        // The same loader loads the checkpoint once the fault is gone.
        handle.set_plan(FaultPlan::none());
        check(&loader.load_safetensors_many(&paths).unwrap(), &want);
        assert_eq!(dev.pin_calls(), 3);
        drop(loader);
        assert_eq!((dev.allocated_bytes(), dev.pinned_bytes()), (0, 0));
    }
}

#[test]
fn short_reads_and_transient_faults_across_shards_still_load_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (index, _, want) = sharded(dir.path(), 6, 4, 4 * STAGING);
    let plan = FaultPlan::benign(0.3)
        .with_short_read(0.5)
        .with_delay(0.3, Duration::from_millis(2));
    let (engine, handle) = faulty_engine(6, plan, BackendKind::Threads).unwrap();
    let (dev, device) = host();
    let ckpt = Checkpoint::open(&[index]).unwrap();
    let (loader, c) = open_and_load(&engine, &device, cfg(3), &ckpt, true).unwrap();
    check(&c, &want);
    assert!(handle.counts().total() > 0, "no fault was injected");
    drop((loader, c));
    assert_eq!((dev.allocated_bytes(), dev.pinned_bytes()), (0, 0));
}

#[test]
fn a_copy_failing_in_shard_2_or_the_device_full_at_shard_3_releases_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (index, paths, _) = sharded(dir.path(), 7, 3, 4 * STAGING);
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let ckpt = Checkpoint::open(&[index]).unwrap();
    // Shard 1 is 5 chunks (its body starts unaligned): copy 7 is in shard 2. The device counts
    // copies over its life, so each try gets a fresh one.
    for overlap in [true, false] {
        let dev = HostDevice::new(HostDeviceConfig {
            fail_copy_nth: Some(7),
            ..HostDeviceConfig::default()
        });
        let device: Arc<dyn Device> = Arc::new(dev.clone());
        let e = open_and_load(&engine, &device, cfg(3), &ckpt, overlap).unwrap_err();
        assert!(e.to_string().contains("injected failure of copy 7"), "{e}");
        assert!(e.to_string().contains(paths[1].to_str().unwrap()), "{e}");
        // The loader open_and_load made is gone too: nothing pinned.
        assert_eq!((dev.allocated_bytes(), dev.pinned_bytes()), (0, 0));
    }
    // Room for two shards and not three: the third allocation fails, the first two are freed.
    let two = ckpt.shards[0].header.body_len + ckpt.shards[1].header.body_len;
    let dev = HostDevice::new(HostDeviceConfig {
        capacity_bytes: Some(two + 1000),
        ..HostDeviceConfig::default()
    });
    let device: Arc<dyn Device> = Arc::new(dev.clone());
    for overlap in [true, false] {
        let e = open_and_load(&engine, &device, cfg(3), &ckpt, overlap).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
        assert!(e.to_string().contains(paths[2].to_str().unwrap()), "{e}");
        assert_eq!((dev.allocated_bytes(), dev.pinned_bytes()), (0, 0));
    }
}

/// Shards written by the reference implementation (`safetensors.numpy.save_file`), where Python has
/// it: the bytes each tensor should have come from numpy, as CRC-32 (zlib) computed in Python.
#[test]
fn shards_written_by_python_safetensors_load_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import json, sys, zlib
import numpy as np
from safetensors.numpy import save_file
d = sys.argv[1]
rng = np.random.default_rng(9)
wm, crcs = {}, {}
dtypes = [np.float32, np.float16, np.int64, np.uint8, np.float64]
for k in range(3):
    name = "model-%05d-of-00003.safetensors" % (k + 1)
    ts = {}
    for j in range(5):
        shape = (int(rng.integers(1, 300)), int(rng.integers(1, 70)))
        a = rng.integers(0, 255, size=shape).astype(dtypes[j % len(dtypes)])
        ts["layer.%d.%d" % (k, j)] = a
    ts["layer.%d.empty" % k] = np.zeros((0, 3), dtype=np.float32)
    save_file(ts, d + "/" + name, metadata={"format": "np"})
    for t, a in ts.items():
        wm[t] = name
        crcs[t] = zlib.crc32(np.ascontiguousarray(a).tobytes()) & 0xffffffff
json.dump({"metadata": {}, "weight_map": wm}, open(d + "/model.safetensors.index.json", "w"))
json.dump(crcs, open(d + "/crcs.json", "w"))
"#;
    let out = match Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.path())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: python3 cannot run here ({e})");
            return;
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("ModuleNotFoundError") {
            eprintln!("skipped: python3 has no numpy or safetensors: {err}");
            return;
        }
        panic!("the Python writer failed: {err}");
    }
    let crcs: std::collections::BTreeMap<String, u32> =
        serde_json::from_slice(&std::fs::read(dir.path().join("crcs.json")).unwrap()).unwrap();
    let engine = gpuio_testkit::engine(BackendKind::Threads).unwrap();
    let (dev, device) = host();
    let ckpt = Checkpoint::open(&[dir.path().join("model.safetensors.index.json")]).unwrap();
    assert_eq!(ckpt.shards.len(), 3);
    let (loader, c) = open_and_load(&engine, &device, cfg(2), &ckpt, true).unwrap();
    assert_eq!(c.tensor_count(), crcs.len());
    for m in &c.shards {
        for t in &m.tensors {
            assert_eq!(m.crc32_ieee(t).unwrap(), crcs[&t.name], "{}", t.name);
        }
    }
    drop((loader, c));
    assert_eq!(dev.allocated_bytes(), 0);
}
