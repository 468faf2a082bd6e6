//! Damaged packs: every single-byte change of a small pack is caught — at open, or by a read of the
//! affected range as a `Corrupt` error naming entry and chunk, and always by `verify` — and never
//! returns wrong bytes. Truncation at every length fails at open.

mod common;

use std::path::Path;

use common::{configs, data, fast_tempdir, make_pack, Kind};
use gpuio::{DirectMode, ErrorKind, IoQueue};
use gpuio_pack::{Codec, Pack, PackOptions};

struct Original {
    bytes: Vec<u8>,
    entries: Vec<(String, Vec<u8>)>,
    /// (file offset, stored length, entry, chunk index) of every payload.
    payloads: Vec<(u64, u64, String, usize)>,
    header_len: u64,
    table_offset: u64,
}

/// A pack of a few KiB: a compressible entry and an incompressible one (stored raw), small chunks,
/// 64-byte alignment so that there is padding between payloads.
fn small_pack(dir: &Path, codec: Codec) -> (std::path::PathBuf, Original) {
    let text = data(Kind::Text, 2500, 11);
    let rand = data(Kind::Random, 1300, 12);
    let opts = PackOptions {
        codec,
        chunk_size: 1024,
        align: 64,
        level: None,
        threads: 2,
    };
    let path = make_pack(
        dir,
        &format!("small-{codec}.gpk"),
        &[("text", &text), ("sub/rand", &rand)],
        &opts,
    );
    let pack = Pack::open_with(&path, DirectMode::Off).unwrap();
    let mut payloads = Vec::new();
    for e in pack.entries() {
        for (i, c) in e.chunks.iter().enumerate() {
            payloads.push((c.file_offset, c.stored_len as u64, e.name.clone(), i));
        }
    }
    let bytes = std::fs::read(&path).unwrap();
    let table_offset = u64::from_le_bytes(bytes[32..40].try_into().unwrap());
    let codecs: Vec<Codec> = pack
        .entries()
        .iter()
        .flat_map(|e| e.chunks.iter().map(|c| c.codec))
        .collect();
    assert!(
        codecs.contains(&codec) && codecs.contains(&Codec::None),
        "{codecs:?}"
    );
    (
        path,
        Original {
            bytes,
            entries: vec![("text".into(), text), ("sub/rand".into(), rand)],
            payloads,
            header_len: 64,
            table_offset,
        },
    )
}

/// Checks one damaged copy; returns how it was caught.
fn check_damaged(path: &Path, orig: &Original, pos: usize, queue: &IoQueue) -> &'static str {
    let pack = match Pack::open_with(path, DirectMode::Off) {
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    ErrorKind::Corrupt | ErrorKind::InvalidInput | ErrorKind::Unsupported
                ),
                "byte {pos}: {e}"
            );
            assert!(
                e.to_string().contains(path.to_str().unwrap()),
                "byte {pos}: {e}"
            );
            assert!(
                e.offset().is_some(),
                "byte {pos}: the error names the bad field's offset: {e}"
            );
            return "open";
        }
        Ok(p) => p,
    };
    // Opened: the header and table are intact, so the byte is in a payload or in padding.
    assert!(
        (orig.header_len..orig.table_offset).contains(&(pos as u64)),
        "byte {pos} is in the header or table, yet the pack opened"
    );
    let in_payload = orig
        .payloads
        .iter()
        .find(|(off, len, _, _)| (*off..off + len).contains(&(pos as u64)));
    let mut read_failed = false;
    for (name, want) in &orig.entries {
        let entry = pack.entry(name).unwrap();
        let mut out = vec![0u8; want.len()];
        match entry.read_at(queue, 0, &mut out) {
            Ok(()) => assert!(
                out == *want,
                "byte {pos}: entry {name} read wrong bytes without an error"
            ),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "byte {pos}: {e}");
                let (off, len, ename, chunk) =
                    in_payload.unwrap_or_else(|| panic!("byte {pos} is padding, yet {e}"));
                assert_eq!(ename, name, "byte {pos}: {e}");
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("entry '{name}' chunk {chunk}")),
                    "byte {pos}: {msg}"
                );
                assert_eq!(
                    (e.offset(), e.range_len()),
                    (Some(*off), Some(*len)),
                    "byte {pos}: {msg}"
                );
                read_failed = true;
            }
        }
    }
    assert_eq!(
        read_failed,
        in_payload.is_some(),
        "byte {pos}: a damaged payload is always noticed by a read"
    );
    // verify vouches for every byte of the file, padding included.
    let errors = pack.verify(queue, &mut |_, _| {}).unwrap();
    assert!(!errors.is_empty(), "byte {pos}: verify found nothing");
    for e in &errors {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        let (o, l) = (e.offset().unwrap(), e.range_len().unwrap());
        assert!(
            (o..o + l).contains(&(pos as u64)),
            "byte {pos}: verify blames {o}+{l}: {e}"
        );
    }
    if read_failed {
        "read"
    } else {
        "verify (padding)"
    }
}

#[test]
fn every_single_byte_change_is_caught() {
    let dir = fast_tempdir();
    let (_, _, queue) = configs().remove(0);
    for codec in [Codec::Lz4, Codec::Zstd, Codec::Xz] {
        let (path, orig) = small_pack(dir.path(), codec);
        // The intact pack verifies clean and reads back.
        let pack = Pack::open_with(&path, DirectMode::Off).unwrap();
        assert!(pack.verify(&queue, &mut |_, _| {}).unwrap().is_empty());
        let damaged = dir.path().join("damaged.gpk");
        let mut counts = std::collections::BTreeMap::new();
        for pos in 0..orig.bytes.len() {
            // A low bit and a whole byte: CRC-32C catches any change of up to 32 bits.
            for mask in [0x01u8, 0xFF] {
                let mut b = orig.bytes.clone();
                b[pos] ^= mask;
                std::fs::write(&damaged, &b).unwrap();
                *counts
                    .entry(check_damaged(&damaged, &orig, pos, &queue))
                    .or_insert(0) += 1;
            }
        }
        eprintln!("{codec}: {} bytes, caught by {counts:?}", orig.bytes.len());
        assert!(counts.len() == 3, "every kind of byte occurs: {counts:?}");
    }
}

#[test]
fn truncation_at_every_length_and_extension_fail_at_open() {
    let dir = fast_tempdir();
    let (_, orig) = small_pack(dir.path(), Codec::Lz4);
    let p = dir.path().join("cut.gpk");
    for len in 0..orig.bytes.len() {
        std::fs::write(&p, &orig.bytes[..len]).unwrap();
        let e = Pack::open_with(&p, DirectMode::Off).unwrap_err();
        let want = if len < 8 {
            ErrorKind::InvalidInput
        } else {
            ErrorKind::Corrupt
        };
        assert_eq!(e.kind(), want, "{len}: {e}");
        if len >= 64 {
            assert!(e.to_string().contains("truncated"), "{len}: {e}");
        }
    }
    let mut longer = orig.bytes.clone();
    longer.push(0);
    std::fs::write(&p, &longer).unwrap();
    let e = Pack::open_with(&p, DirectMode::Off).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("past its end"), "{e}");
}

#[test]
fn a_damaged_chunk_fails_only_the_reads_that_touch_it() {
    let dir = fast_tempdir();
    let want = data(Kind::Text, 64 << 10, 3);
    let path = make_pack(
        dir.path(),
        "c.gpk",
        &[("t", &want)],
        &PackOptions {
            codec: Codec::Lz4,
            chunk_size: 8192,
            ..PackOptions::default()
        },
    );
    let pack = Pack::open(&path).unwrap();
    let c3 = pack.entries()[0].chunks[3];
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[c3.file_offset as usize + 10] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    for (_, direct, q) in configs() {
        let e = Pack::open_with(&path, direct).unwrap().entry("t").unwrap();
        let mut out = vec![0u8; 8192];
        // Chunks 2 and 4 are fine.
        e.read_at(&q, 2 * 8192, &mut out).unwrap();
        assert!(out[..] == want[2 * 8192..3 * 8192]);
        e.read_at(&q, 4 * 8192, &mut out).unwrap();
        // Any range touching chunk 3 fails, naming it.
        for (off, len) in [(3 * 8192 + 5, 1), (2 * 8192 + 8000, 500), (0, want.len())] {
            let mut out = vec![0u8; len];
            let err = e.read_at(&q, off as u64, &mut out).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt);
            let msg = err.to_string();
            assert!(
                msg.contains("entry 't' chunk 3") && msg.contains("c.gpk"),
                "{msg}"
            );
            assert!(msg.contains("CRC-32C"), "{msg}");
        }
        let errors = Pack::open_with(&path, direct)
            .unwrap()
            .verify(&q, &mut |_, _| {})
            .unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
    }
}
