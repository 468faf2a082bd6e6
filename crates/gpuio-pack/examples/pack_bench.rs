//! A quick measurement of pack loading against reading the raw file, through the same engine, direct
//! I/O: `cargo run --release -p gpuio-pack --example pack_bench -- [MiB] [mix|text|random] [codec...]`.
//!
//! The data: `mix` alternates 64 KiB of English-like text with 64 KiB of f32 noise (about 2:1 with
//! lz4), `text` is text only, `random` is incompressible. Files go to $TMPDIR (the root filesystem
//! here; tmpfs would measure memory, not the disk).

use std::path::{Path, PathBuf};
use std::time::Instant;

use gpuio::{AlignedBuf, Engine, EngineConfig, IoQueue, OpenOptions, QueueDesc};
use gpuio_pack::{pack_files, Codec, Pack, PackOptions};

fn make_data(kind: &str, len: usize) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "the ",
        "model ",
        "weights ",
        "are ",
        "loaded ",
        "from ",
        "disk ",
        "into ",
        "memory ",
        "and ",
        "then ",
        "copied ",
        "to ",
        "a ",
        "device ",
        "where ",
        "kernels ",
        "read ",
        "them ",
        "quickly, ",
        "while ",
        "compression ",
        "saves ",
        "bandwidth.\n",
    ];
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = Vec::with_capacity(len + 64);
    let mut block = 0usize;
    while out.len() < len {
        let text = match kind {
            "text" => true,
            "random" => false,
            _ => block % 2 == 0,
        };
        let end = out.len() + (64 << 10);
        while out.len() < end {
            if text {
                out.extend_from_slice(WORDS[(next() % 24) as usize].as_bytes());
            } else if kind == "random" {
                out.extend_from_slice(&next().to_le_bytes());
            } else {
                // f32 values with random mantissas: the exponent bytes repeat, the rest does not.
                let v = f32::from_bits(0x3f80_0000 | (next() as u32 & 0x007f_ffff));
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        block += 1;
    }
    out.truncate(len);
    out
}

/// Reads the raw file in 4 MiB commands, 16 in flight, into recycled buffers.
fn read_raw(queue: &IoQueue, path: &Path) -> f64 {
    let file = OpenOptions::read().cold(true).open(path).unwrap();
    let len = file.len().unwrap();
    let piece = 4u64 << 20;
    let mut free: Vec<AlignedBuf> = (0..16)
        .map(|_| AlignedBuf::new(piece as usize, 4096).unwrap())
        .collect();
    let started = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    let mut off = 0;
    while off < len || !inflight.is_empty() {
        while off < len && !free.is_empty() {
            let n = piece.min(len - off);
            let mut cb = queue.command_buffer();
            let buf = free.pop().unwrap();
            let id = cb.load_range(&file, off, buf, 0, n, true).unwrap();
            inflight.push_back((id, cb.commit().unwrap()));
            off += n;
        }
        let (id, c) = inflight.pop_front().unwrap();
        let mut done = c.finish().unwrap();
        free.push(done.take_buffer(id).unwrap().into_owned().unwrap());
    }
    len as f64 / started.elapsed().as_secs_f64()
}

/// Loads the whole entry in 64 MiB loads, 2 in flight, into recycled buffers; then random 4 KiB
/// logical reads, 64 in flight.
fn read_pack(queue: &IoQueue, path: &Path) -> (f64, f64) {
    // Dropped before the pack opens, so that it opens cold (direct), as a pack on a device would.
    drop(OpenOptions::read().cold(true).open(path).unwrap());
    let pack = Pack::open(path).unwrap();
    let e = pack.entry("data").unwrap();
    let len = e.len();
    let piece = 64u64 << 20;
    let mut free: Vec<gpuio::IoBuffer> = (0..2)
        .map(|_| AlignedBuf::new(piece as usize, 4096).unwrap().into())
        .collect();
    let started = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    let mut off = 0;
    while off < len || !inflight.is_empty() {
        while off < len && !free.is_empty() {
            let n = piece.min(len - off);
            inflight.push_back(e.load_range(queue, off, free.pop().unwrap(), 0, n).unwrap());
            off += n;
        }
        let l: gpuio_pack::PackLoad = inflight.pop_front().unwrap();
        free.push(l.wait().unwrap());
    }
    let seq = len as f64 / started.elapsed().as_secs_f64();
    let mut s = 42u64;
    let n = 20_000;
    let started = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for _ in 0..n {
        if inflight.len() >= 64 {
            let l: gpuio_pack::PackLoad = inflight.pop_front().unwrap();
            l.wait().unwrap();
        }
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (s >> 11) % (len - 4096) / 4096 * 4096;
        inflight.push_back(
            e.load(queue, off, AlignedBuf::new(4096, 4096).unwrap())
                .unwrap(),
        );
    }
    for l in inflight {
        l.wait().unwrap();
    }
    (seq, n as f64 / started.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.first().map_or(512, |s| s.parse().unwrap());
    let kind = args.get(1).map_or("mix", String::as_str);
    let codecs: Vec<Codec> = if args.len() > 2 {
        args[2..].iter().map(|s| s.parse().unwrap()).collect()
    } else {
        Codec::ALL.to_vec()
    };
    let dir = tempfile::tempdir().unwrap();
    let raw: PathBuf = dir.path().join("raw.bin");
    std::fs::write(&raw, make_data(kind, mib << 20)).unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let queue = engine.queue(QueueDesc::default()).unwrap();
    println!(
        "{mib} MiB of '{kind}' data; decode threads {}",
        gpuio_pack::decode_threads()
    );
    println!("codec   ratio  pack MB/s  raw GB/s  pack GB/s (logical)  x raw  4K reads/s");
    for codec in codecs {
        let out = dir.path().join(format!("{codec}.gpk"));
        let opts = PackOptions {
            codec,
            ..PackOptions::default()
        };
        let s = pack_files(&[("data".into(), raw.clone())], &out, &opts, &mut |_, _| {}).unwrap();
        let ratio = s.logical_bytes as f64 / s.stored_bytes as f64;
        let pack_mbs = s.logical_bytes as f64 / s.elapsed.as_secs_f64() / 1e6;
        // Alternate raw and pack reads; medians of the rounds.
        let (mut raws, mut packs, mut rpss) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..3 {
            if round % 2 == 0 {
                raws.push(read_raw(&queue, &raw));
            }
            let (bw, rps) = read_pack(&queue, &out);
            packs.push(bw);
            rpss.push(rps);
            if round % 2 == 1 {
                raws.push(read_raw(&queue, &raw));
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let raw_avg = median(&mut raws);
        let pack_bw = median(&mut packs);
        let rps = median(&mut rpss);
        println!(
            "{:<6} {ratio:6.2} {pack_mbs:10.0} {:9.2} {:20.2} {:6.2} {rps:11.0}",
            codec.name(),
            raw_avg / 1e9,
            pack_bw / 1e9,
            pack_bw / raw_avg
        );
        std::fs::remove_file(&out).unwrap();
    }
}
