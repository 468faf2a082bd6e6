//! The parser against hostile input: arbitrary bytes, mutated packs, and packs whose checksums were
//! recomputed after absurd values were written into them (so that the structural checks, not the
//! CRCs, must catch them). Opening never panics, never allocates by a size it has not bounded, and
//! fails with an error naming the path and the offset of the bad field.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{configs, data, fast_tempdir, make_pack, Kind};
use gpuio::{DirectMode, ErrorKind};
use gpuio_pack::format::{CHUNK_RECORD, ENTRY_RECORD};
use gpuio_pack::{Codec, Pack, PackOptions};
use proptest::prelude::*;

fn crc(b: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes the table and header checksums (as a forger would).
fn reseal(b: &mut [u8]) {
    let table_offset = u64_at(b, 32) as usize;
    if table_offset <= b.len() {
        let c = crc(&b[table_offset..]);
        put32(b, 56, c);
    }
    let c = crc(&b[..60]);
    put32(b, 60, c);
}

/// A sample pack: 3 entries, one empty, lz4, small chunks.
fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
    let a = data(Kind::Mixed, 20_000, 1);
    let b = data(Kind::Text, 9_000, 2);
    let path = make_pack(
        dir,
        "sample.gpk",
        &[("a", &a), ("empty", b""), ("dir/b", &b)],
        &PackOptions {
            codec: Codec::Lz4,
            chunk_size: 4096,
            ..PackOptions::default()
        },
    );
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

struct Layout {
    table: usize,
    entries: usize,
    names: usize,
}

fn layout(b: &[u8]) -> Layout {
    let table = u64_at(b, 32) as usize;
    let entries = u32_at(b, 44) as usize;
    let chunks = u32_at(b, 48) as usize;
    Layout {
        table,
        entries,
        names: table + entries * ENTRY_RECORD as usize + chunks * CHUNK_RECORD as usize,
    }
}

/// Opens `bytes` as a pack; if it opens, reads every entry whole (no panic, Ok or a clean error).
fn open_and_read(path: &Path, bytes: &[u8]) -> Result<(), gpuio::Error> {
    std::fs::write(path, bytes).unwrap();
    let started = Instant::now();
    let r = Pack::open_with(path, DirectMode::Off);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "open took {:?}",
        started.elapsed()
    );
    check_memory();
    let pack = r?;
    let q = &configs()[0].2;
    for e in pack.entries() {
        let entry = pack.entry(&e.name).unwrap();
        let mut out = vec![0u8; e.size.min(1 << 24) as usize];
        let _ = entry.read_at(q, 0, &mut out);
    }
    let _ = pack.verify(q, &mut |_, _| {});
    check_memory();
    Ok(())
}

fn expect_err(path: &Path, bytes: &[u8], kind: ErrorKind, offset: u64, needle: &str) {
    let e = open_and_read(path, bytes).expect_err(needle);
    assert_eq!(e.kind(), kind, "{e}");
    assert_eq!(e.offset(), Some(offset), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    assert!(msg.contains(needle), "wanted {needle:?} in: {msg}");
}

#[test]
fn absurd_values_with_valid_checksums_are_refused_naming_the_field() {
    let dir = fast_tempdir();
    let (_, orig) = sample(dir.path());
    let p = dir.path().join("forged.gpk");
    let l = layout(&orig);
    let chunk = |i: usize| l.table + l.entries * ENTRY_RECORD as usize + i * CHUNK_RECORD as usize;
    let entry = |i: usize| l.table + i * ENTRY_RECORD as usize;
    type Edit<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
    let cases: Vec<(&str, Edit<'_>, ErrorKind, u64, &str)> = vec![
        (
            "chunk stored length 2^31",
            Box::new(move |b| put32(b, chunk(0) + 20, 1 << 31)),
            ErrorKind::Corrupt,
            (chunk(0) + 20) as u64,
            "2147483648 stored bytes",
        ),
        (
            "chunk stored length u32::MAX",
            Box::new(move |b| put32(b, chunk(1) + 20, u32::MAX)),
            ErrorKind::Corrupt,
            (chunk(1) + 20) as u64,
            "chunk 1",
        ),
        (
            "chunk file offset 2^63",
            Box::new(move |b| put64(b, chunk(1) + 8, 1 << 63)),
            ErrorKind::Corrupt,
            (chunk(1) + 8) as u64,
            "payload at 9223372036854775808",
        ),
        (
            "chunk overlapping the previous",
            Box::new(move |b| {
                let o = u64_at(b, chunk(0) + 8);
                put64(b, chunk(1) + 8, o)
            }),
            ErrorKind::Corrupt,
            (chunk(1) + 8) as u64,
            "expected",
        ),
        (
            "chunk logical length 2^31",
            Box::new(move |b| put32(b, chunk(2) + 16, 1 << 31)),
            ErrorKind::Corrupt,
            (chunk(2) + 16) as u64,
            "logical length",
        ),
        (
            "chunk codec 9",
            Box::new(move |b| b[chunk(2) + 32] = 9),
            ErrorKind::Corrupt,
            (chunk(2) + 32) as u64,
            "unknown codec id 9",
        ),
        (
            "entry size 2^63",
            Box::new(move |b| put64(b, entry(0), 1 << 63)),
            ErrorKind::Corrupt,
            (entry(0) + 12) as u64,
            "chunks",
        ),
        (
            "entry chunk size 0",
            Box::new(move |b| put32(b, entry(0) + 16, 0)),
            ErrorKind::Corrupt,
            (entry(0) + 16) as u64,
            "chunk size 0",
        ),
        (
            "entry name length past the table",
            Box::new(move |b| put32(b, entry(2) + 24, 1 << 30)),
            ErrorKind::Corrupt,
            (entry(2) + 24) as u64,
            "name length",
        ),
        (
            "entry name length 4000",
            Box::new(move |b| put32(b, entry(2) + 24, 4000)),
            ErrorKind::Corrupt,
            (entry(2) + 24) as u64,
            "runs past",
        ),
        (
            "entry name '.'",
            Box::new(move |b| b[l.names] = b'.'),
            ErrorKind::Corrupt,
            l.names as u64,
            "'.'",
        ),
        (
            "entry name '/'",
            Box::new(move |b| b[l.names + 1 + 4] = b'/'),
            ErrorKind::Corrupt,
            (l.names + 1) as u64,
            "empty",
        ),
        (
            "two entries named alike",
            Box::new(move |b| {
                b[l.names + 1..l.names + 6].copy_from_slice(b"dir/b");
                b[l.names + 6..l.names + 11].copy_from_slice(b"dir/b")
            }),
            ErrorKind::Corrupt,
            (l.names + 6) as u64,
            "also the name of entry 1",
        ),
        (
            "entry first chunk off",
            Box::new(move |b| put32(b, entry(2) + 8, 0)),
            ErrorKind::Corrupt,
            (entry(2) + 8) as u64,
            "first chunk",
        ),
        (
            "entry count 2^32 - 1",
            Box::new(|b| put32(b, 44, u32::MAX)),
            ErrorKind::Corrupt,
            40,
            "does not match",
        ),
        (
            "chunk count 2^32 - 1",
            Box::new(|b| put32(b, 48, u32::MAX)),
            ErrorKind::Corrupt,
            40,
            "does not match",
        ),
        (
            "table length 2^31",
            Box::new(|b| put32(b, 40, 1 << 31)),
            ErrorKind::Corrupt,
            40,
            "exceeds the limit",
        ),
        (
            "table offset 2^63",
            Box::new(|b| put64(b, 32, 1 << 63)),
            ErrorKind::Corrupt,
            32,
            "does not end",
        ),
        (
            "file length 2^63",
            Box::new(|b| put64(b, 24, 1 << 63)),
            ErrorKind::Corrupt,
            24,
            "truncated",
        ),
        (
            "alignment 3",
            Box::new(|b| put32(b, 20, 3)),
            ErrorKind::Corrupt,
            20,
            "alignment 3",
        ),
        (
            "alignment 2^30",
            Box::new(|b| put32(b, 20, 1 << 30)),
            ErrorKind::Corrupt,
            20,
            "alignment",
        ),
        (
            "flags",
            Box::new(|b| put32(b, 16, 1)),
            ErrorKind::Unsupported,
            16,
            "flags 0x1",
        ),
        (
            "version 0",
            Box::new(|b| put32(b, 8, 0)),
            ErrorKind::Corrupt,
            8,
            "version 0",
        ),
        (
            "header length 65",
            Box::new(|b| put32(b, 12, 65)),
            ErrorKind::Corrupt,
            12,
            "header length",
        ),
        (
            "header length 2^31",
            Box::new(|b| put32(b, 12, 1 << 31)),
            ErrorKind::Corrupt,
            12,
            "header length",
        ),
    ];
    for (what, f, kind, offset, needle) in cases {
        let mut b = orig.clone();
        f(&mut b);
        reseal(&mut b);
        eprintln!("{what}");
        expect_err(&p, &b, kind, offset, needle);
    }
}

#[test]
fn newer_versions_are_refused_clearly() {
    let dir = fast_tempdir();
    let (_, orig) = sample(dir.path());
    let p = dir.path().join("v7.gpk");
    let mut b = orig.clone();
    put32(&mut b, 8, 7);
    reseal(&mut b);
    let e = open_and_read(&p, &b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(
        e.to_string()
            .ends_with("pack version 7 is newer than this gpuio understands (1)"),
        "{e}"
    );
    // A newer version may have a longer header: its checksum is still found through the length field.
    let mut long = orig[..60].to_vec();
    put32(&mut long, 8, 2);
    put32(&mut long, 12, 128);
    long.resize(124, 0);
    let c = crc(&long);
    long.extend_from_slice(&c.to_le_bytes());
    let e = open_and_read(&p, &long).unwrap_err();
    assert_eq!(
        e.to_string().split(": ").last(),
        Some("pack version 2 is newer than this gpuio understands (1)")
    );
    // Damaged rather than newer: said so.
    let mut b = orig.clone();
    put32(&mut b, 8, 300);
    let e = open_and_read(&p, &b).unwrap_err();
    assert!(e.to_string().contains("or its header is damaged"), "{e}");
}

#[test]
fn files_that_are_not_packs() {
    let dir = fast_tempdir();
    let p = dir.path().join("x");
    for (bytes, needle) in [
        (&b""[..], "only 0 bytes"),
        (b"hello", "only 5 bytes"),
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not a gpuio pack"),
        (&[0u8; 100_000][..], "not a gpuio pack"),
    ] {
        let e = open_and_read(&p, bytes).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains(needle), "{e}");
        assert_eq!(e.offset(), Some(0));
    }
    // The magic and nothing else.
    let e = open_and_read(&p, b"\x89GPUPK\r\n\0\0").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("truncated"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>(), seal in any::<bool>()) {
        let dir = fast_tempdir();
        let p = dir.path().join("junk");
        if magic && bytes.len() >= 64 {
            bytes[..8].copy_from_slice(b"\x89GPUPK\r\n");
            put32(&mut bytes, 8, 1);
            put32(&mut bytes, 12, 64);
            if seal {
                let n = bytes.len() as u64;
                put64(&mut bytes, 24, n);
                reseal(&mut bytes);
            }
        }
        let _ = open_and_read(&p, &bytes);
    }

    /// A valid pack with a few values changed — arbitrary bytes or absurd words — in the header or
    /// table, checksums sometimes recomputed.
    #[test]
    fn mutated_packs_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop_oneof![
            any::<u8>().prop_map(|v| vec![v]),
            Just(u32::MAX.to_le_bytes().to_vec()),
            Just((1u32 << 31).to_le_bytes().to_vec()),
            Just((1u64 << 63).to_le_bytes().to_vec()),
            Just(0u32.to_le_bytes().to_vec()),
        ]), 1..6),
        in_table in any::<bool>(),
        seal in any::<bool>(),
    ) {
        static SAMPLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let orig = SAMPLE.get_or_init(|| sample(fast_tempdir().path()).1);
        let dir = fast_tempdir();
        let p = dir.path().join("m.gpk");
        let l = layout(orig);
        let mut b = orig.clone();
        for (at, value) in edits {
            let (lo, hi) = if in_table { (l.table, b.len()) } else { (0, 64) };
            let pos = lo + at.index(hi - lo);
            let end = (pos + value.len()).min(b.len());
            b[pos..end].copy_from_slice(&value[..end - pos]);
        }
        if seal {
            reseal(&mut b);
        }
        if let Err(e) = open_and_read(&p, &b) {
            prop_assert!(e.to_string().contains(p.to_str().unwrap()), "{}", e);
        }
    }
}

/// Peak memory of this test process stays modest: no absurd size was ever allocated.
fn check_memory() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:")) {
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(kb < 1 << 20, "peak RSS {kb} KiB");
    }
}
