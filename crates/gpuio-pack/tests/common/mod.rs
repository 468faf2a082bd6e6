//! Shared by the pack tests: engines for every backend, data that compresses like real assets, and a
//! small pack builder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use gpuio::{BackendChoice, BackendConfig, Engine, EngineConfig, ErrorKind, IoQueue, QueueDesc};
use gpuio_pack::{pack_files, Codec, PackOptions};

/// A deterministic generator (splitmix64), so that failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// What the bytes of a test entry look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Words: compresses well.
    Text,
    /// A smooth f32 signal with noise in the low bits: compresses a little.
    Floats,
    /// Incompressible.
    Random,
    Zeros,
    /// Runs of each of the above: some chunks compress, some are stored raw.
    Mixed,
}

pub const KINDS: [Kind; 5] = [
    Kind::Text,
    Kind::Floats,
    Kind::Random,
    Kind::Zeros,
    Kind::Mixed,
];

pub fn data(kind: Kind, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    match kind {
        Kind::Text => {
            const WORDS: [&str; 16] = [
                "tensor ",
                "weight ",
                "layer ",
                "the ",
                "of ",
                "gpu ",
                "chunk ",
                "pack ",
                "load ",
                "stream ",
                "io ",
                "bias ",
                "norm ",
                "attention ",
                "\n",
                "0.125 ",
            ];
            while out.len() < len {
                out.extend_from_slice(WORDS[rng.below(16) as usize].as_bytes());
            }
        }
        Kind::Floats => {
            let mut i = 0u32;
            while out.len() < len {
                let x = (i as f32 * 0.01).sin() + (rng.below(16) as f32) * 1e-4;
                out.extend_from_slice(&x.to_le_bytes());
                i += 1;
            }
        }
        Kind::Random => {
            while out.len() < len {
                out.extend_from_slice(&rng.next().to_le_bytes());
            }
        }
        Kind::Zeros => out.resize(len, 0),
        Kind::Mixed => {
            while out.len() < len {
                let run = 1 + rng.below(40_000) as usize;
                let k =
                    [Kind::Text, Kind::Floats, Kind::Random, Kind::Zeros][rng.below(4) as usize];
                out.extend_from_slice(&data(k, run, rng.next()));
            }
        }
    }
    out.truncate(len);
    out
}

/// Writes `entries` (name, bytes) as input files in `dir` and packs them into `dir/name`.
pub fn make_pack(dir: &Path, name: &str, entries: &[(&str, &[u8])], opts: &PackOptions) -> PathBuf {
    let inputs: Vec<(String, PathBuf)> = entries
        .iter()
        .enumerate()
        .map(|(i, (n, bytes))| {
            let p = dir.join(format!("{name}.input{i}"));
            std::fs::write(&p, bytes).unwrap();
            (n.to_string(), p)
        })
        .collect();
    let out = dir.join(name);
    pack_files(&inputs, &out, opts, &mut |_, _| {}).unwrap();
    out
}

pub fn opts(codec: Codec, chunk_size: u32) -> PackOptions {
    PackOptions {
        codec,
        chunk_size,
        // Quick levels: the tests check correctness, not ratios.
        level: match codec {
            Codec::Zstd => Some(1),
            Codec::Zlib | Codec::Xz => Some(1),
            _ => None,
        },
        ..PackOptions::default()
    }
}

/// A queue on an engine with `choice`, or `None` (with a note) where that backend cannot run here.
pub fn queue(choice: BackendChoice) -> Option<IoQueue> {
    static URING: OnceLock<Option<IoQueue>> = OnceLock::new();
    static THREADS: OnceLock<Option<IoQueue>> = OnceLock::new();
    static MMAP: OnceLock<Option<IoQueue>> = OnceLock::new();
    let cell = match choice {
        BackendChoice::Uring => &URING,
        BackendChoice::Threads => &THREADS,
        BackendChoice::Mmap => &MMAP,
        BackendChoice::Auto => panic!("tests name their backend"),
    };
    cell.get_or_init(|| {
        let config = EngineConfig {
            backend: BackendConfig {
                choice,
                queue_depth: 16,
                ..BackendConfig::default()
            },
            // Small tasks: a group of chunks becomes several requests, as on a big load.
            task_size_bytes: 64 << 10,
            bounce_buffers: 8,
            ..EngineConfig::default()
        };
        match Engine::new(config) {
            Ok(e) => Some(e.queue(QueueDesc::default()).unwrap()),
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                eprintln!("note: backend {choice:?} cannot run here: {e}");
                None
            }
            Err(e) => panic!("engine {choice:?} failed to start: {e}"),
        }
    })
    .clone()
}

/// Every (backend, direct mode) a pack can be read with here: io_uring and the thread pool, each
/// direct and buffered, and the mmap backend (which reads through the page cache either way).
pub fn configs() -> Vec<(BackendChoice, gpuio::DirectMode, IoQueue)> {
    let mut v = Vec::new();
    for b in [BackendChoice::Uring, BackendChoice::Threads] {
        if let Some(q) = queue(b) {
            for d in [gpuio::DirectMode::Auto, gpuio::DirectMode::Off] {
                v.push((b, d, q.clone()));
            }
        }
    }
    if let Some(q) = queue(BackendChoice::Mmap) {
        v.push((BackendChoice::Mmap, gpuio::DirectMode::Off, q));
    }
    assert!(!v.is_empty(), "no backend can run here");
    v
}

/// A directory on tmpfs when there is one (fast for tests that rewrite a file thousands of times).
pub fn fast_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}
