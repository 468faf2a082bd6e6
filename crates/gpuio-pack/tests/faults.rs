//! Pack loads through a fault-injecting engine (gpuio-testkit): transient faults are hidden, bits
//! flipped in flight are caught by the chunk CRCs (never wrong bytes), I/O errors are reported as
//! such, and no load hangs.

mod common;

use common::{data, fast_tempdir, make_pack, opts, Kind};
use gpuio::backend::BackendKind;
use gpuio::{DirectMode, ErrorKind, QueueDesc};
use gpuio_pack::{Codec, Pack};
use gpuio_testkit::{faulty_engine, working_kinds, FaultPlan};

fn sample() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = fast_tempdir();
    let want = data(Kind::Mixed, 1 << 20, 21);
    let path = make_pack(
        dir.path(),
        "f.gpk",
        &[("m", &want)],
        &opts(Codec::Lz4, 32_768),
    );
    (dir, path, want)
}

#[test]
fn benign_faults_are_hidden() {
    let (_dir, path, want) = sample();
    for kind in working_kinds()
        .into_iter()
        .filter(|k| *k != BackendKind::Mmap)
    {
        let (engine, handle) = faulty_engine(7, FaultPlan::benign(0.2), kind).unwrap();
        let q = engine.queue(QueueDesc::default()).unwrap();
        let e = Pack::open_with(&path, DirectMode::Off)
            .unwrap()
            .entry("m")
            .unwrap();
        for i in 0..20u64 {
            let off = i * 45_000;
            let mut out = vec![0u8; 100_000];
            e.read_at(&q, off, &mut out).unwrap();
            assert!(
                out[..] == want[off as usize..off as usize + 100_000],
                "{kind:?}"
            );
        }
        assert!(handle.counts().total() > 0, "faults were injected");
    }
}

#[test]
fn bits_flipped_in_flight_never_reach_the_caller() {
    let (_dir, path, want) = sample();
    for kind in working_kinds()
        .into_iter()
        .filter(|k| *k != BackendKind::Mmap)
    {
        let plan = FaultPlan {
            corrupt_read: 0.3,
            ..FaultPlan::none()
        };
        let (engine, handle) = faulty_engine(11, plan, kind).unwrap();
        let q = engine.queue(QueueDesc::default()).unwrap();
        let pack = Pack::open_with(&path, DirectMode::Off).unwrap();
        let e = pack.entry("m").unwrap();
        let (mut ok, mut caught) = (0, 0);
        for i in 0..60u64 {
            let off = i * 16_000 % (want.len() as u64 - 70_000);
            let mut out = vec![0u8; 70_000];
            match e.read_at(&q, off, &mut out) {
                Ok(()) => {
                    assert!(
                        out[..] == want[off as usize..off as usize + 70_000],
                        "{kind:?}: wrong bytes"
                    );
                    ok += 1;
                }
                Err(err) => {
                    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
                    assert!(err.to_string().contains("entry 'm' chunk"), "{err}");
                    caught += 1;
                }
            }
        }
        assert!(handle.counts().silent() > 0);
        assert!(
            caught > 0 && ok > 0,
            "{kind:?}: {ok} clean, {caught} caught"
        );
        // verify sees flipped bits too (and reports them as corruption, not I/O failure).
        let mut found = false;
        for _ in 0..5 {
            found |= !pack.verify(&q, &mut |_, _| {}).unwrap().is_empty();
        }
        assert!(found);
    }
}

#[test]
fn io_errors_are_reported_and_nothing_hangs() {
    let (_dir, path, want) = sample();
    for kind in working_kinds()
        .into_iter()
        .filter(|k| *k != BackendKind::Mmap)
    {
        let plan = FaultPlan {
            read_eio: 0.2,
            ..FaultPlan::none()
        };
        let (engine, _handle) = faulty_engine(3, plan, kind).unwrap();
        let q = engine.queue(QueueDesc::default()).unwrap();
        let pack = Pack::open_with(&path, DirectMode::Off).unwrap();
        let e = pack.entry("m").unwrap();
        let mut failed = 0;
        for i in 0..30u64 {
            let off = i * 30_000;
            let mut out = vec![0u8; 60_000];
            match e.read_at(&q, off, &mut out) {
                Ok(()) => assert!(out[..] == want[off as usize..off as usize + 60_000]),
                Err(err) => {
                    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
                    assert!(err.to_string().contains("f.gpk"), "{err}");
                    failed += 1;
                }
            }
        }
        assert!(failed > 0);
        // The whole entry at once: many reads, some fail; the load still completes.
        let mut out = vec![0u8; want.len()];
        assert_eq!(
            e.read_at(&q, 0, &mut out).unwrap_err().kind(),
            ErrorKind::Io
        );
        assert_eq!(
            pack.verify(&q, &mut |_, _| {}).unwrap_err().kind(),
            ErrorKind::Io
        );
    }
}

#[test]
fn a_pack_truncated_after_open_fails_reads_cleanly() {
    let (_dir, path, want) = sample();
    let (_, _, q) = common::configs().remove(0);
    let pack = Pack::open(&path).unwrap();
    let e = pack.entry("m").unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut out = vec![0u8; want.len()];
    let err = e.read_at(&q, 0, &mut out).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    let err = pack.verify(&q, &mut |_, _| {}).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(
        err.to_string().contains(name),
        "the error names the pack: {err}"
    );
}
