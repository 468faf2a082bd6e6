//! Round trips: whatever is packed comes back byte for byte, for any range, through `load` and
//! `read_at`, on every backend, direct and buffered.

mod common;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use common::{configs, data, fast_tempdir, make_pack, opts, Kind, KINDS};
use gpuio::{AlignedBuf, DirectMode, ErrorKind};
use gpuio_pack::{pack_files, split_pack_path, Codec, Pack, PackOptions};
use proptest::prelude::*;

const CHUNK_SIZES: [u32; 6] = [4096, 8192, 12_345, 65_536, 100_000, 262_144];

fn codec_strategy() -> impl Strategy<Value = Codec> {
    prop::sample::select(Codec::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random sizes (0, multiples of the chunk size and not), chunk sizes, codecs, data and ranges.
    #[test]
    fn any_range_of_any_entry_round_trips(
        codec in codec_strategy(),
        chunk_size in prop::sample::select(CHUNK_SIZES.to_vec()),
        kind_a in prop::sample::select(KINDS.to_vec()),
        kind_b in prop::sample::select(KINDS.to_vec()),
        size_a in prop_oneof![Just(0usize), 1usize..5000, 0usize..700_000],
        chunks_b in 0usize..5,
        seed in any::<u64>(),
        ranges in prop::collection::vec((any::<u64>(), any::<u64>()), 1..6),
    ) {
        let dir = fast_tempdir();
        let a = data(kind_a, size_a, seed);
        let b = data(kind_b, chunks_b * chunk_size as usize, seed ^ 1);
        let path = make_pack(dir.path(), "p.gpk", &[("a", &a), ("dir/b", &b)], &opts(codec, chunk_size));
        for (backend, direct, queue) in configs() {
            let pack = Pack::open_with(&path, direct).unwrap();
            for (name, want) in [("a", &a), ("dir/b", &b)] {
                let entry = pack.entry(name).unwrap();
                prop_assert_eq!(entry.len(), want.len() as u64);
                // The whole entry, through load.
                let got = entry.load(&queue, 0, AlignedBuf::new(want.len(), 4096).unwrap()).unwrap().wait().unwrap();
                prop_assert!(got[..] == want[..], "{:?} {:?} {} whole", backend, direct, name);
                // Random ranges, through load and read_at.
                for &(o, l) in &ranges {
                    let n = want.len() as u64;
                    let off = if n == 0 { 0 } else { o % (n + 1) };
                    let len = if n == off { 0 } else { l % (n - off + 1) } as usize;
                    let expect = &want[off as usize..off as usize + len];
                    let mut out = vec![0xA5u8; len];
                    entry.read_at(&queue, off, &mut out).unwrap();
                    prop_assert!(&out[..] == expect, "{:?} {:?} {} read_at {}+{}", backend, direct, name, off, len);
                    let got = entry.load(&queue, off, AlignedBuf::new(len, 4096).unwrap()).unwrap().wait().unwrap();
                    prop_assert!(&got[..] == expect, "{:?} {:?} {} load {}+{}", backend, direct, name, off, len);
                }
            }
        }
    }
}

#[test]
fn every_codec_and_kind_with_edge_ranges() {
    let dir = fast_tempdir();
    for codec in Codec::ALL {
        for kind in KINDS {
            let cs = 16_384u32;
            let want = data(kind, 5 * cs as usize + 123, codec as u64);
            let path = make_pack(dir.path(), "e.gpk", &[("x", &want)], &opts(codec, cs));
            let pack = Pack::open(&path).unwrap();
            let e = pack.entry("x").unwrap();
            let n = want.len() as u64;
            let c = cs as u64;
            let ranges = [
                (0, 0),
                (0, 1),
                (0, n),
                (c - 1, 2),
                (c, c),
                (c + 1, 3 * c),
                (n - 1, 1),
                (n, 0),
                (n - 123, 123),
                (5, n - 10),
            ];
            for (_, _, q) in configs() {
                for (off, len) in ranges {
                    let mut out = vec![0u8; len as usize];
                    e.read_at(&q, off, &mut out).unwrap();
                    assert!(
                        out[..] == want[off as usize..(off + len) as usize],
                        "{codec} {kind:?} {off}+{len}"
                    );
                }
            }
        }
    }
}

#[test]
fn past_the_end_fails_with_unexpected_eof_naming_pack_entry_and_offset() {
    let dir = fast_tempdir();
    let want = data(Kind::Text, 10_000, 1);
    let path = make_pack(
        dir.path(),
        "eof.gpk",
        &[("t.txt", &want)],
        &opts(Codec::Lz4, 4096),
    );
    let pack = Pack::open(&path).unwrap();
    let e = pack.entry("t.txt").unwrap();
    let (_, _, q) = configs().remove(0);
    let err = e
        .load(&q, 9_990, AlignedBuf::new(11, 4096).unwrap())
        .unwrap()
        .wait()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
    let msg = err.to_string();
    assert!(
        msg.contains("eof.gpk") && msg.contains("t.txt") && msg.contains("9990"),
        "{msg}"
    );
    let mut out = [0u8; 2];
    assert_eq!(
        e.read_at(&q, u64::MAX, &mut out).unwrap_err().kind(),
        ErrorKind::InvalidInput,
        "an offset that overflows is refused at call time"
    );
    // The buffer comes back on error, for reuse.
    let (r, buf) = e
        .load(&q, 10_000, AlignedBuf::new(1, 4096).unwrap())
        .unwrap()
        .wait_parts();
    let err = r.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("eof.gpk") && msg.contains("t.txt"), "{msg}");
    assert_eq!(buf.unwrap().len(), 1);
    // load_range into the middle of a bigger buffer leaves the rest alone.
    let mut buf = AlignedBuf::new(100, 4096).unwrap();
    buf.fill(7);
    let got = e.load_range(&q, 10, buf, 20, 50).unwrap().wait().unwrap();
    assert!(got[..20].iter().all(|&b| b == 7) && got[70..].iter().all(|&b| b == 7));
    assert_eq!(&got[20..70], &want[10..60]);
    let err = e
        .load_range(&q, 0, AlignedBuf::new(10, 4096).unwrap(), 5, 6)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

#[test]
fn missing_entry_lists_names() {
    let dir = fast_tempdir();
    let path = make_pack(
        dir.path(),
        "n.gpk",
        &[("alpha", b"1"), ("beta", b"22"), ("gamma/delta", b"")],
        &opts(Codec::Zstd, 4096),
    );
    let pack = Pack::open(&path).unwrap();
    let err = pack.entry("nope").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(
        msg.contains("nope") && msg.contains("alpha") && msg.contains("gamma/delta"),
        "{msg}"
    );
    assert_eq!(pack.entries().len(), 3);
    assert_eq!(pack.entry("gamma/delta").unwrap().len(), 0);
}

struct ThreadWaker(std::thread::Thread);
impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

fn block_on<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

#[test]
fn a_load_is_a_future_and_loads_run_side_by_side() {
    let dir = fast_tempdir();
    let want = data(Kind::Mixed, 3 << 20, 9);
    let path = make_pack(
        dir.path(),
        "f.gpk",
        &[("m", &want)],
        &opts(Codec::Lz4, 65_536),
    );
    let pack = Pack::open(&path).unwrap();
    let e = pack.entry("m").unwrap();
    let (_, _, q) = configs().remove(0);
    let got = block_on(
        e.load(&q, 100, AlignedBuf::new(1 << 20, 4096).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert!(got[..] == want[100..100 + (1 << 20)]);
    // Many loads in flight at once from several threads, on one queue.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (e, q, want) = (e.clone(), q.clone(), &want);
            s.spawn(move || {
                let loads: Vec<_> = (0..8u64)
                    .map(|i| {
                        let off = (t * 8 + i) * 90_001 % (want.len() as u64 - 70_000);
                        (
                            off,
                            e.load(&q, off, AlignedBuf::new(70_000, 4096).unwrap())
                                .unwrap(),
                        )
                    })
                    .collect();
                for (off, l) in loads {
                    let got = l.wait().unwrap();
                    assert!(got[..] == want[off as usize..off as usize + 70_000]);
                }
            });
        }
    });
}

#[test]
fn a_load_bigger_than_the_staging_limit_streams() {
    let dir = fast_tempdir();
    // Zeros with a marker every MiB: compresses to almost nothing, so the pack is quick to make.
    let n = 80usize << 20;
    let mut want = vec![0u8; n];
    for (i, b) in want.iter_mut().enumerate().step_by(1 << 20) {
        *b = (i >> 20) as u8 + 1;
    }
    let path = make_pack(
        dir.path(),
        "big.gpk",
        &[("z", &want)],
        &PackOptions {
            codec: Codec::Lz4,
            chunk_size: 1 << 20,
            ..PackOptions::default()
        },
    );
    let pack = Pack::open(&path).unwrap();
    let e = pack.entry("z").unwrap();
    for (_, _, q) in configs() {
        let load = e.load(&q, 0, AlignedBuf::new(n, 4096).unwrap()).unwrap();
        load.wait_complete();
        let stats = load.stats();
        let got = load.wait().unwrap();
        assert!(got[..] == want[..]);
        assert_eq!(stats.logical_bytes, n as u64);
        // Compressed about 128:1, so the whole entry is one small read.
        assert!(stats.bytes_read < n as u64 / 50, "{stats:?}");
    }
    // Stored raw (incompressible), 1.5 x the staging limit: it streams, never staging more than the
    // limit at once.
    let rand = data(
        Kind::Random,
        3 * (gpuio_pack::STAGING_BYTES_MAX as usize) / 2,
        3,
    );
    let path = make_pack(
        dir.path(),
        "rand.gpk",
        &[("r", &rand)],
        &opts(Codec::Lz4, 1 << 20),
    );
    let e = Pack::open(&path).unwrap().entry("r").unwrap();
    let load = e
        .load(
            &configs()[0].2,
            0,
            AlignedBuf::new(rand.len(), 4096).unwrap(),
        )
        .unwrap();
    load.wait_complete();
    let stats = load.stats();
    assert!(load.wait().unwrap()[..] == rand[..]);
    assert!(
        stats.staged_peak_bytes <= gpuio_pack::STAGING_BYTES_MAX,
        "{stats:?}"
    );
    assert!(stats.bytes_read >= rand.len() as u64, "{stats:?}");
    let mut out = vec![0u8; rand.len()];
    e.read_at(&configs()[0].2, 0, &mut out).unwrap();
    assert!(out == rand);
}

#[test]
fn split_pack_path_and_is_pack() {
    let dir = fast_tempdir();
    let path = make_pack(
        dir.path(),
        "s.gpk",
        &[("a:b", b"x"), ("c", b"y")],
        &opts(Codec::None, 4096),
    );
    let s = path.to_str().unwrap();
    assert!(Pack::is_pack(&path));
    assert!(!Pack::is_pack(&dir.path().join("s.gpk.input0")));
    assert!(!Pack::is_pack(&dir.path().join("missing")));
    assert!(!Pack::is_pack(dir.path()));
    assert_eq!(
        split_pack_path(&format!("{s}:c")),
        Some((path.clone(), "c".into()))
    );
    assert_eq!(
        split_pack_path(&format!("{s}:a:b")),
        Some((path.clone(), "a:b".into()))
    );
    assert_eq!(
        split_pack_path(&format!("{s}:dir/x")),
        Some((path.clone(), "dir/x".into()))
    );
    assert_eq!(split_pack_path(s), None, "the pack itself is a plain path");
    let plain = dir.path().join("s.gpk.input0");
    assert_eq!(
        split_pack_path(&format!("{}:c", plain.display())),
        None,
        "not a pack"
    );
    assert_eq!(split_pack_path("/nonexistent/file:c"), None);
}

#[test]
fn pack_files_checks_its_inputs_and_replaces_the_output_atomically() {
    let dir = fast_tempdir();
    let input = dir.path().join("in");
    std::fs::write(&input, data(Kind::Text, 100_000, 5)).unwrap();
    let out = dir.path().join("o.gpk");
    std::fs::write(&out, b"old contents").unwrap();
    let o = PackOptions::default();
    let bad = |inputs: &[(String, std::path::PathBuf)], o: &PackOptions| {
        let e = pack_files(inputs, &out, o, &mut |_, _| {}).unwrap_err();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"old contents",
            "a failed pack leaves the old file"
        );
        e
    };
    for name in ["", "/abs", "../up", "a//b", "a\\b"] {
        assert_eq!(
            bad(&[(name.into(), input.clone())], &o).kind(),
            ErrorKind::InvalidInput,
            "{name:?}"
        );
    }
    let dup = [("x".into(), input.clone()), ("x".into(), input.clone())];
    assert_eq!(bad(&dup, &o).kind(), ErrorKind::InvalidInput);
    assert_eq!(
        bad(&[("m".into(), dir.path().join("missing"))], &o).kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        bad(&[("d".into(), dir.path().to_path_buf())], &o).kind(),
        ErrorKind::IsADirectory
    );
    let lvl = PackOptions {
        codec: Codec::Lz4,
        level: Some(3),
        ..o.clone()
    };
    assert_eq!(
        bad(&[("x".into(), input.clone())], &lvl).kind(),
        ErrorKind::InvalidInput
    );
    let cs = PackOptions {
        chunk_size: 100,
        ..o.clone()
    };
    assert_eq!(
        bad(&[("x".into(), input.clone())], &cs).kind(),
        ErrorKind::InvalidInput
    );
    let al = PackOptions {
        align: 3000,
        ..o.clone()
    };
    assert_eq!(
        bad(&[("x".into(), input.clone())], &al).kind(),
        ErrorKind::InvalidInput
    );
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Success: progress ends at the total, the summary adds up, the old file is replaced.
    let mut calls = Vec::new();
    let o1 = PackOptions {
        codec: Codec::Zstd,
        threads: 1,
        ..o.clone()
    };
    let s = pack_files(&[("x".into(), input.clone())], &out, &o1, &mut |d, t| {
        calls.push((d, t))
    })
    .unwrap();
    assert_eq!(calls.last(), Some(&(100_000, 100_000)));
    assert_eq!(calls.first(), Some(&(0, 100_000)));
    assert_eq!((s.entries, s.logical_bytes), (1, 100_000));
    assert!(s.stored_bytes < 50_000, "{s:?}");
    assert_eq!(s.file_bytes, std::fs::metadata(&out).unwrap().len());
    let pack = Pack::open(&out).unwrap();
    assert_eq!(pack.entries()[0].stored_bytes(), s.stored_bytes);
    // The same pack from 1 thread and from many is byte-identical (order does not depend on timing).
    let out2 = dir.path().join("o2.gpk");
    let o8 = PackOptions { threads: 8, ..o1 };
    pack_files(&[("x".into(), input.clone())], &out2, &o8, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn inputs_from_paths_walks_directories() {
    let dir = fast_tempdir();
    let root = dir.path().join("assets");
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("b.bin"), b"b").unwrap();
    std::fs::write(root.join("sub/a.txt"), b"a").unwrap();
    std::fs::write(root.join("sub/deeper/c"), b"c").unwrap();
    let single = dir.path().join("single.dat");
    std::fs::write(&single, b"s").unwrap();
    let got = gpuio_pack::inputs_from_paths(&[root.clone(), single.clone()]).unwrap();
    let names: Vec<_> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["b.bin", "sub/a.txt", "sub/deeper/c", "single.dat"]);
    let out = dir.path().join("w.gpk");
    pack_files(&got, &out, &PackOptions::default(), &mut |_, _| {}).unwrap();
    let pack = Pack::open_with(&out, DirectMode::Off).unwrap();
    let mut buf = [0u8; 1];
    pack.entry("sub/deeper/c")
        .unwrap()
        .read_at(&configs()[0].2, 0, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"c");
}

#[test]
fn empty_packs_and_empty_entries() {
    let dir = fast_tempdir();
    let q = &configs()[0].2;
    // No entries at all.
    let out = dir.path().join("none.gpk");
    let s = pack_files(&[], &out, &PackOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!((s.entries, s.logical_bytes, s.stored_bytes), (0, 0, 0));
    let pack = Pack::open(&out).unwrap();
    assert!(pack.entries().is_empty());
    assert!(pack.verify(q, &mut |_, _| {}).unwrap().is_empty());
    assert_eq!(pack.entry("x").unwrap_err().kind(), ErrorKind::NotFound);
    // Only empty entries, unaligned.
    let path = make_pack(
        dir.path(),
        "empties.gpk",
        &[("a", b""), ("b", b"")],
        &PackOptions {
            align: 1,
            ..opts(Codec::Xz, 4096)
        },
    );
    let pack = Pack::open(&path).unwrap();
    assert!(pack.verify(q, &mut |_, _| {}).unwrap().is_empty());
    let e = pack.entry("b").unwrap();
    assert!(e.is_empty());
    let got = e
        .load(q, 0, AlignedBuf::new(0, 4096).unwrap())
        .unwrap()
        .wait()
        .unwrap();
    assert!(got.is_empty());
    let err = e
        .load(q, 1, AlignedBuf::new(0, 4096).unwrap())
        .unwrap()
        .wait()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Pack>();
    check::<gpuio_pack::Entry>();
    check::<gpuio_pack::PackLoad>();
    check::<gpuio_pack::EntryInfo>();
}
