//! Checkpoints of several safetensors files (shards), as HuggingFace writes them:
//! `model-00001-of-00004.safetensors` … with a `model.safetensors.index.json` whose `weight_map`
//! names, for every tensor, the shard that holds it. This module resolves and validates a checkpoint
//! — every header read and validated, every tensor the index names found in its shard, no tensor in
//! two shards, none left out of the index — before anything is allocated on a device, and loads it
//! through one [`Loader`] (its staging buffers set up once for all the shards; the reads of shard
//! `k+1` start while shard `k`'s last copies run, see [`Loader::load_checkpoint`]).
//!
//! [`open_and_load`] makes the loader and loads; asked to, it makes the loader on a helper thread
//! while this thread opens the shards and allocates their device memory, so the loader's set-up
//! (staging allocation, io_uring registration, page-locking with the device) costs only what it takes
//! beyond those steps (not measurably better on the stand-in or the mock: see its documentation).
//!
//! It must never allocate device memory for a checkpoint that fails validation, never read a file the
//! index does not name, never follow a shard name out of the index's directory (absolute names and
//! `..` are refused), and never leave device memory, staging buffers or page-locked memory behind on
//! an error: whatever was allocated is released before the error is returned.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::error::Op;
use gpuio::{Engine, Error, ErrorKind, File, Result};

use crate::device::{Device, DeviceBuffer};
use crate::loader::{LoadedModel, Loader, LoaderConfig, Route, Segment, SetupTimes};
use crate::safetensors::{self, Header};

/// Longest index file read (HuggingFace's for a 400B-parameter model is under 200 KB).
pub const INDEX_LEN_MAX: u64 = 64 << 20;
/// Most shards in one checkpoint.
pub const SHARDS_MAX: usize = 4096;

/// One shard: its path and validated header.
#[derive(Debug, Clone)]
pub struct Shard {
    pub path: PathBuf,
    pub header: Header,
}

/// A validated checkpoint: its shards in load order (the index's shards sorted by name, or the files
/// in the order given), and the index it came from.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub index: Option<PathBuf>,
    pub shards: Vec<Shard>,
    /// Reading the index and reading and validating every header.
    pub header_time: Duration,
}

/// Whether `path` names a checkpoint index (`*.index.json`, as HuggingFace names them).
pub fn is_index(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"))
}

fn corrupt(path: &Path, msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, msg).with_path(path)
}

impl Checkpoint {
    /// One index (`*.index.json`), or one or more safetensors files.
    pub fn open(inputs: &[PathBuf]) -> Result<Checkpoint> {
        match inputs {
            [one] if is_index(one) => Checkpoint::from_index(one),
            _ => {
                if let Some(ix) = inputs.iter().find(|p| is_index(p)) {
                    return Err(Error::invalid(
                        "an index names its own shards: give it alone, not with other files",
                    )
                    .with_path(ix));
                }
                Checkpoint::from_files(inputs)
            }
        }
    }

    /// Safetensors files loaded as the shards of one checkpoint, in the order given. A tensor name
    /// in two of them is an error naming both.
    pub fn from_files(paths: &[PathBuf]) -> Result<Checkpoint> {
        let t = Instant::now();
        check_count(paths.len())?;
        let mut shards = Vec::with_capacity(paths.len());
        for p in paths {
            shards.push(Shard {
                path: p.clone(),
                header: safetensors::read_header(p)?,
            });
        }
        check_unique(&shards)?;
        Ok(Checkpoint {
            index: None,
            shards,
            header_time: t.elapsed(),
        })
    }

    /// The checkpoint an index describes: its `weight_map` (tensor → shard file name, relative to
    /// the index's directory) resolved, every shard's header read and validated, and checked both
    /// ways: every tensor the index names is in the shard it names, and every tensor of a shard is
    /// named by the index for that shard. Repeated keys anywhere in the index are refused.
    pub fn from_index(index: &Path) -> Result<Checkpoint> {
        let t = Instant::now();
        let map = read_weight_map(index)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        // Shard file name → the tensors the index puts there. Sorted by name: HuggingFace's
        // `-0000k-of-0000n` names sort in shard order.
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in &map {
            by_shard.entry(shard).or_default().push(tensor);
        }
        check_count(by_shard.len())?;
        let mut shards = Vec::with_capacity(by_shard.len());
        for (name, tensors) in &by_shard {
            let path = dir.join(name);
            let header = safetensors::read_header(&path).map_err(|e| {
                e.with_context(format!(
                    "shard '{name}' named by {}",
                    gpuio::input::escape_path(index)
                ))
            })?;
            let have: HashMap<&str, ()> = header
                .tensors
                .iter()
                .map(|t| (t.name.as_str(), ()))
                .collect();
            if let Some(missing) = tensors.iter().find(|t| !have.contains_key(*t)) {
                return Err(corrupt(
                    &path,
                    format!(
                        "tensor '{missing}' is in the weight_map of {} for this shard, which has no such tensor",
                        gpuio::input::escape_path(index)
                    ),
                ));
            }
            shards.push(Shard { path, header });
        }
        check_unique(&shards)?;
        // Every tensor of every shard is in the index, for that shard (a tensor in two shards was
        // refused just above).
        let listed: HashMap<&str, &str> =
            map.iter().map(|(t, s)| (t.as_str(), s.as_str())).collect();
        for (shard, name) in shards.iter().zip(by_shard.keys()) {
            for t in &shard.header.tensors {
                match listed.get(t.name.as_str()) {
                    Some(s) if s == name => {}
                    Some(s) => {
                        return Err(corrupt(
                            &shard.path,
                            format!(
                                "tensor '{}' is in this shard but {} puts it in '{s}'",
                                t.name,
                                gpuio::input::escape_path(index)
                            ),
                        ))
                    }
                    None => {
                        return Err(corrupt(
                            &shard.path,
                            format!(
                                "tensor '{}' is in this shard but not in the weight_map of {}",
                                t.name,
                                gpuio::input::escape_path(index)
                            ),
                        ))
                    }
                }
            }
        }
        Ok(Checkpoint {
            index: Some(index.to_path_buf()),
            shards,
            header_time: t.elapsed(),
        })
    }

    /// Body bytes of all shards.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header.body_len).sum()
    }
}

fn check_count(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("a checkpoint needs at least one shard"));
    }
    if n > SHARDS_MAX {
        return Err(Error::invalid(format!(
            "{n} shards: at most {SHARDS_MAX} in one checkpoint"
        )));
    }
    Ok(())
}

/// No tensor name in two shards.
fn check_unique(shards: &[Shard]) -> Result<()> {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for s in shards {
        for t in &s.header.tensors {
            if let Some(first) = seen.insert(t.name.as_str(), &s.path) {
                return Err(corrupt(
                    &s.path,
                    format!(
                        "tensor '{}' is also in {}: a tensor may be in one shard only",
                        t.name,
                        gpuio::input::escape_path(first)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The index's `weight_map` as (tensor, shard file name) pairs, every name checked.
fn read_weight_map(index: &Path) -> Result<Vec<(String, String)>> {
    use std::io::Read;
    let f =
        std::fs::File::open(index).map_err(|e| Error::from_io(Op::Open, &e).with_path(index))?;
    let mut text = Vec::new();
    f.take(INDEX_LEN_MAX + 1)
        .read_to_end(&mut text)
        .map_err(|e| Error::from_io(Op::Read, &e).with_path(index))?;
    if text.len() as u64 > INDEX_LEN_MAX {
        return Err(corrupt(
            index,
            format!("checkpoint index is longer than {INDEX_LEN_MAX} bytes"),
        ));
    }
    let v = safetensors::parse_strict_json(&text)
        .map_err(|e| corrupt(index, format!("checkpoint index: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(corrupt(
            index,
            "checkpoint index: no \"weight_map\" object (tensor name → shard file)".into(),
        ));
    };
    let mut out = Vec::with_capacity(map.len());
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(corrupt(
                index,
                format!("checkpoint index: tensor '{tensor}' maps to {shard}, not a file name"),
            ));
        };
        let rel = Path::new(shard);
        let plain = !shard.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !plain {
            return Err(corrupt(
                index,
                format!(
                    "checkpoint index: tensor '{tensor}' maps to '{shard}': a shard must be a path relative to the index's directory, without '..'"
                ),
            ));
        }
        out.push((tensor.clone(), shard.to_string()));
    }
    if out.is_empty() {
        return Err(corrupt(
            index,
            "checkpoint index: the weight_map names no tensor".into(),
        ));
    }
    Ok(out)
}

/// A shard's file open and its device memory allocated, ready to load.
pub(crate) struct PreparedShard {
    pub file: File,
    pub buffer: DeviceBuffer,
    pub open: Duration,
    pub device_alloc: Duration,
}

/// Opens `path`, checks its length against `header` and allocates device memory for its body.
pub(crate) fn prepare_shard(
    device: &Arc<dyn Device>,
    path: &Path,
    header: &Header,
) -> Result<PreparedShard> {
    let t = Instant::now();
    let file = File::open(path)?;
    let len = file.len()?;
    if len != header.body_offset + header.body_len {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "safetensors: file changed since its header was read ({len} bytes, expected {})",
                header.body_offset + header.body_len
            ),
        )
        .with_path(path));
    }
    let open = t.elapsed();
    let body_len = usize::try_from(header.body_len)
        .map_err(|_| Error::invalid(format!("body of {} bytes is too large", header.body_len)))?;
    let t = Instant::now();
    // A file on a device, read with O_DIRECT, gets a buffer placed at its body's phase within a page,
    // so a device that reads files into its memory with O_DIRECT (the host stand-in's direct path)
    // needs no bounce. (tmpfs accepts O_DIRECT too, but there it is a memcpy like any read.)
    let buffer = if file.is_direct() && !file.is_memory_resident() {
        let phase = (header.body_offset % 4096) as usize;
        DeviceBuffer::alloc_phased(device, body_len, phase)
    } else {
        DeviceBuffer::alloc(device, body_len)
    }
    .map_err(|e| e.with_context(format!("loading {}", path.display())))?;
    Ok(PreparedShard {
        file,
        buffer,
        open,
        device_alloc: t.elapsed(),
    })
}

fn prepare_all(device: &Arc<dyn Device>, ckpt: &Checkpoint) -> Result<Vec<PreparedShard>> {
    ckpt.shards
        .iter()
        .map(|s| prepare_shard(device, &s.path, &s.header))
        .collect()
}

/// Where a checkpoint load's time went. The phases before `transfer` overlap the loader's set-up
/// when [`open_and_load`] ran it on its own thread; `end_to_end` is the wall time of it all.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadPhases {
    /// Reading the index and reading and validating every header.
    pub header: Duration,
    /// Opening the shards and checking their lengths.
    pub open: Duration,
    /// Allocating device memory for every shard's body.
    pub device_alloc: Duration,
    /// The loader's construction, step by step, where [`open_and_load`] made it.
    pub setup: Option<SetupTimes>,
    /// Whether the loader was made on a helper thread while the steps above ran.
    pub setup_overlapped: bool,
    /// Time spent waiting for the loader after the steps above (overlapped), or all of its
    /// construction (not overlapped).
    pub setup_wait: Duration,
    /// All shards' bytes to the device, to the last copy's completion.
    pub transfer: Duration,
    pub end_to_end: Duration,
}

/// A checkpoint on the device: one allocation per shard, in load order.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    pub index: Option<PathBuf>,
    pub paths: Vec<PathBuf>,
    pub shards: Vec<LoadedModel>,
    /// Per shard, since the transfer began: when its first read was issued and when its last copy
    /// was queued (the last shard's: when every copy had finished). With shards loaded one by one
    /// (the direct path) they are consecutive.
    pub windows: Vec<(Duration, Duration)>,
    pub phases: LoadPhases,
}

impl LoadedCheckpoint {
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|m| m.stats.bytes).sum()
    }
    /// Seconds of the transfer phase, all shards.
    pub fn seconds(&self) -> f64 {
        self.phases.transfer.as_secs_f64()
    }
    pub fn tensor_count(&self) -> usize {
        self.shards.iter().map(|m| m.tensors.len()).sum()
    }
}

impl Loader {
    /// Validates nothing more (a [`Checkpoint`] is validated when made), allocates device memory
    /// for every shard and loads them all through this loader's staging buffers. Staged shards go
    /// through one pipelined run ([`Loader::staged_segments`]): shard `k+1`'s first reads overlap
    /// shard `k`'s last copies. Where the direct path is taken the shards load one after another.
    /// On error every shard's device memory is freed and every staging buffer is back in the pool.
    pub fn load_checkpoint(&self, ckpt: &Checkpoint) -> Result<LoadedCheckpoint> {
        let begun = Instant::now();
        let prepared = prepare_all(&self.device, ckpt)?;
        let mut phases = LoadPhases {
            header: ckpt.header_time,
            ..LoadPhases::default()
        };
        for p in &prepared {
            phases.open += p.open;
            phases.device_alloc += p.device_alloc;
        }
        let mut loaded = self.load_prepared(ckpt, prepared)?;
        loaded.phases.header = phases.header;
        loaded.phases.open = phases.open;
        loaded.phases.device_alloc = phases.device_alloc;
        loaded.phases.end_to_end = ckpt.header_time + begun.elapsed();
        Ok(loaded)
    }

    /// [`Checkpoint::from_files`] then [`load_checkpoint`](Self::load_checkpoint).
    pub fn load_safetensors_many(&self, paths: &[PathBuf]) -> Result<LoadedCheckpoint> {
        self.load_checkpoint(&Checkpoint::from_files(paths)?)
    }

    /// Loads shards whose files are open and device memory allocated; fills `windows`, `shards` and
    /// `phases.transfer`.
    pub(crate) fn load_prepared(
        &self,
        ckpt: &Checkpoint,
        prepared: Vec<PreparedShard>,
    ) -> Result<LoadedCheckpoint> {
        let t = Instant::now();
        let mut notes = Vec::with_capacity(prepared.len());
        let mut all_staged = true;
        for p in &prepared {
            match self.route(&p.file)? {
                Route::Staged(why) => notes.push(why),
                Route::Direct(_) => all_staged = false,
            }
        }
        let n = prepared.len();
        let (stats, windows) = if all_staged {
            let mut segs = Vec::with_capacity(n);
            for (p, s) in prepared.iter().zip(&ckpt.shards) {
                segs.push(Segment::new(
                    crate::loader::Origin::File(&p.file),
                    s.header.body_offset,
                    &p.buffer,
                    0,
                    s.header.body_len,
                )?);
            }
            let run = self.staged_segments(segs)?;
            let mut stats = run.stats;
            for (st, why) in stats.iter_mut().zip(notes) {
                if let Some(why) = why {
                    st.add_note(why);
                }
            }
            (stats, run.windows)
        } else {
            let mut stats = Vec::with_capacity(n);
            let mut windows = Vec::with_capacity(n);
            for (k, (p, s)) in prepared.iter().zip(&ckpt.shards).enumerate() {
                let from = t.elapsed();
                let st = self
                    .load_range(
                        &p.file,
                        s.header.body_offset,
                        &p.buffer,
                        0,
                        s.header.body_len,
                    )
                    .map_err(|e| e.with_context(format!("shard {} of {n}", k + 1)))?;
                stats.push(st);
                windows.push((from, t.elapsed()));
            }
            (stats, windows)
        };
        let transfer = t.elapsed();
        let mut shards = Vec::with_capacity(n);
        for ((p, s), mut st) in prepared.into_iter().zip(&ckpt.shards).zip(stats) {
            st.open = p.open;
            st.device_alloc = p.device_alloc;
            shards.push(LoadedModel::new(p.buffer, &s.header, st));
        }
        Ok(LoadedCheckpoint {
            index: ckpt.index.clone(),
            paths: ckpt.shards.iter().map(|s| s.path.clone()).collect(),
            shards,
            windows,
            phases: LoadPhases {
                transfer,
                ..LoadPhases::default()
            },
        })
    }
}

/// Makes a loader and loads a validated checkpoint, as a caller with nothing set up yet waits for
/// it. With `overlap`, the loader is made on a helper thread while this thread opens the shards and
/// allocates their device memory — independent steps: on a GPU `cuMemAlloc` of the bodies and the
/// staging set-up (`cuMemHostRegister`, io_uring registration) need nothing from each other — and
/// the transfer starts when both are done; without it, one after the other. Measured with
/// `gpuio load --json` (medians of 5, 256 MiB in one file and in 4 shards): on the mock libcuda, where
/// allocation is as cheap as a GPU's, there was nothing to overlap (0.1 ms) and no gain; on the 2-core
/// host stand-in, whose allocation zeroes host pages as the staging set-up does, the two contended
/// and end to end went from 34 ms better to 46 ms worse over three runs. So the CLI leaves it off unless asked
/// (`--overlap-setup`) until a GPU run shows what `cuMemAlloc` of a model's size costs. The
/// headers are read before (by [`Checkpoint::open`]), so a bad file is refused before a device is
/// opened. Returns the loader too (to load more, or to save from). On error everything is released:
/// device memory, staging buffers, page-locked memory.
pub fn open_and_load(
    engine: &Engine,
    device: &Arc<dyn Device>,
    cfg: LoaderConfig,
    ckpt: &Checkpoint,
    overlap: bool,
) -> Result<(Loader, LoadedCheckpoint)> {
    cfg.validate()?;
    let begun = Instant::now();
    let mut phases = LoadPhases {
        header: ckpt.header_time,
        setup_overlapped: overlap,
        ..LoadPhases::default()
    };
    let (loader, prepared) = if overlap {
        std::thread::scope(|s| {
            let helper = std::thread::Builder::new()
                .name("gpuio-loader-setup".into())
                .spawn_scoped(s, || Loader::new(engine, device.clone(), cfg))
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        format!("cannot start the loader's set-up thread: {e}"),
                    )
                })?;
            let prepared = prepare_all(device, ckpt);
            let t = Instant::now();
            // Joined whatever `prepared` is, so a loader made for a checkpoint that failed is
            // dropped (unpinned, its staging back to the engine) before the error returns.
            let loader = helper
                .join()
                .map_err(|_| Error::new(ErrorKind::Io, "the loader's set-up thread panicked"))?;
            phases.setup_wait = t.elapsed();
            let prepared = prepared?;
            Ok::<_, Error>((loader?, prepared))
        })?
    } else {
        let prepared = prepare_all(device, ckpt)?;
        let t = Instant::now();
        let loader = Loader::new(engine, device.clone(), cfg)?;
        phases.setup_wait = t.elapsed();
        (loader, prepared)
    };
    for p in &prepared {
        phases.open += p.open;
        phases.device_alloc += p.device_alloc;
    }
    phases.setup = Some(loader.setup_times());
    let mut loaded = loader.load_prepared(ckpt, prepared)?;
    phases.transfer = loaded.phases.transfer;
    phases.end_to_end = ckpt.header_time + begun.elapsed();
    loaded.phases = phases;
    Ok((loader, loaded))
}
