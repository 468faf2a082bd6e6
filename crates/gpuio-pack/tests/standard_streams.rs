//! Each compressed chunk is a standard stream of its codec: the codec's own decoder (and its
//! command-line tool, where one is installed) decodes it alone, given only `file_offset` and
//! `stored_len` from the table. Incompressible chunks are stored raw.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use common::{data, fast_tempdir, make_pack, opts, Kind};
use gpuio::DirectMode;
use gpuio_pack::{Codec, Pack, PackOptions};

fn decode_with_library(codec: Codec, stored: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match codec {
        Codec::None => out.extend_from_slice(stored),
        Codec::Lz4 => {
            lz4_flex::frame::FrameDecoder::new(stored)
                .read_to_end(&mut out)
                .unwrap();
        }
        Codec::Zstd => out = zstd::decode_all(stored).unwrap(),
        Codec::Zlib => {
            flate2::read::ZlibDecoder::new(stored)
                .read_to_end(&mut out)
                .unwrap();
        }
        Codec::Xz => {
            liblzma::read::XzDecoder::new(stored)
                .read_to_end(&mut out)
                .unwrap();
        }
        Codec::Lzfse => {
            lzfse_rust::decode_bytes(stored, &mut out).unwrap();
        }
    }
    out
}

/// The codec's command-line tool, if installed: `None` when it is not.
fn decode_with_tool(codec: Codec, stored: &[u8]) -> Option<Vec<u8>> {
    let (prog, args): (&str, &[&str]) = match codec {
        Codec::Lz4 => ("lz4", &["-d", "-c"]),
        Codec::Zstd => ("zstd", &["-d", "-c", "-q"]),
        Codec::Xz => ("xz", &["-d", "-c"]),
        Codec::Zlib => ("python3", &["-c", "import sys, zlib; sys.stdout.buffer.write(zlib.decompress(sys.stdin.buffer.read()))"]),
        _ => return None,
    };
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take().unwrap();
    let input = stored.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{prog}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

#[test]
fn every_compressed_chunk_is_a_standard_stream() {
    let dir = fast_tempdir();
    let text = data(Kind::Text, 300_000, 1);
    let floats = data(Kind::Floats, 150_000, 2);
    for codec in Codec::ALL {
        // Chunk sizes around the LZ4 block sizes, and one above the largest (multi-block frames).
        for chunk_size in [65_536, 100_000, 5 << 20] {
            let o = PackOptions {
                chunk_size,
                ..opts(codec, chunk_size)
            };
            let big = data(Kind::Text, 6 << 20, 3);
            let entries: Vec<(&str, &[u8])> = if chunk_size > 1 << 20 {
                vec![("big", &big)]
            } else {
                vec![("text", &text), ("floats", &floats)]
            };
            let path = make_pack(dir.path(), "std.gpk", &entries, &o);
            let bytes = std::fs::read(&path).unwrap();
            let pack = Pack::open_with(&path, DirectMode::Off).unwrap();
            let mut tools = 0;
            for (e, (_, want)) in pack.entries().iter().zip(&entries) {
                for c in &e.chunks {
                    let stored = &bytes
                        [c.file_offset as usize..(c.file_offset + c.stored_len as u64) as usize];
                    let logical = &want[c.logical_offset as usize
                        ..(c.logical_offset + c.logical_len as u64) as usize];
                    if codec != Codec::None && e.name != "floats" {
                        assert_eq!(c.codec, codec, "text chunks are compressed");
                    }
                    assert!(
                        decode_with_library(c.codec, stored) == logical,
                        "{codec} {}",
                        e.name
                    );
                    if let Some(out) = decode_with_tool(c.codec, stored) {
                        assert!(out == logical, "{codec} tool {}", e.name);
                        tools += 1;
                    }
                }
            }
            if tools == 0 && matches!(codec, Codec::Lz4 | Codec::Zstd | Codec::Xz | Codec::Zlib) {
                eprintln!(
                    "note: no command-line tool for {codec} here; checked with the library only"
                );
            }
        }
    }
}

#[test]
fn incompressible_data_is_stored_raw() {
    let dir = fast_tempdir();
    let rand = data(Kind::Random, 200_000, 7);
    let mixed = data(Kind::Mixed, 400_000, 8);
    for codec in Codec::ALL {
        let path = make_pack(
            dir.path(),
            "raw.gpk",
            &[("r", &rand), ("m", &mixed)],
            &opts(codec, 16_384),
        );
        let pack = Pack::open_with(&path, DirectMode::Off).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let r = &pack.entries()[0];
        assert_eq!(
            r.codec, codec,
            "the entry records the codec it was packed with"
        );
        for c in &r.chunks {
            assert_eq!(
                c.codec,
                Codec::None,
                "{codec}: random chunks are stored raw"
            );
            assert_eq!(c.stored_len, c.logical_len);
            assert_eq!(c.crc32c_stored, c.crc32c_logical);
            let stored = &bytes[c.file_offset as usize..][..c.stored_len as usize];
            assert!(stored == &rand[c.logical_offset as usize..][..c.logical_len as usize]);
        }
        assert_eq!(r.stored_bytes(), rand.len() as u64);
        // Payloads are aligned, so that reads of them can go direct.
        for c in pack.entries().iter().flat_map(|e| &e.chunks) {
            assert_eq!(c.file_offset % 4096, 0);
        }
        if codec != Codec::None {
            let m = &pack.entries()[1];
            let kinds: std::collections::HashSet<_> = m.chunks.iter().map(|c| c.codec).collect();
            assert_eq!(
                kinds.len(),
                2,
                "{codec}: mixed data has raw and compressed chunks: {kinds:?}"
            );
            assert!(m.stored_bytes() < mixed.len() as u64);
        }
    }
}
