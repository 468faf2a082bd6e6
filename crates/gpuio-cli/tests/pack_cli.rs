//! The pack commands end to end: pack a directory, describe it, read ranges of entries, unpack, verify;
//! and the failures a user meets: a corrupt pack, something that is not a pack, unsafe entry names.

mod common;

use std::path::Path;

use common::{fails_cleanly, ok};

/// Text-and-numbers content that compresses, of `len` bytes.
fn compressible(len: usize, seed: u32) -> Vec<u8> {
    let words = [
        "tensor",
        "weight",
        "layer",
        "bias",
        "gradient",
        "token",
        "embedding",
        "0.125",
        "3.5",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(words[(x % words.len() as u32) as usize].as_bytes());
        out.push(if x % 7 < 1 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

fn setup(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let a = compressible(300_000, 1);
    let b: Vec<u8> = (0..70_001u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("a.txt"), &a).unwrap();
    std::fs::write(src.join("sub/b.bin"), &b).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    (a, b)
}

#[test]
fn pack_info_cat_unpack_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = setup(dir.path());
    let src = dir.path().join("src").display().to_string();
    for codec in ["none", "lz4", "zstd", "zlib", "xz", "lzfse"] {
        let pack = dir
            .path()
            .join(format!("p-{codec}.gpk"))
            .display()
            .to_string();
        let out = ok(&[
            "pack",
            &src,
            "-o",
            &pack,
            "--codec",
            codec,
            "--chunk-size",
            "16K",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["entries"], 3);
        assert_eq!(v["logical_bytes"], 370_001);

        let info = ok(&["info", &pack, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let entries = v["entries"].as_array().unwrap();
        let ea = entries
            .iter()
            .find(|e| e["name"] == "a.txt")
            .expect("entry a.txt");
        assert_eq!(ea["size"], 300_000);
        assert_eq!(ea["chunk_size"], 16384);
        let chunks = ea["chunks"].as_array().unwrap();
        assert_eq!(chunks.len(), 300_000usize.div_ceil(16384));
        for k in [
            "logical_offset",
            "logical_length",
            "file_offset",
            "stored_length",
            "codec",
            "crc32c",
        ] {
            assert!(chunks[0].get(k).is_some(), "chunk lacks {k}");
        }
        if codec != "none" {
            assert!(
                ea["ratio"].as_f64().unwrap() > 1.5,
                "{codec}: text should compress"
            );
        }

        for (off, len) in [
            (0usize, 10usize),
            (16_000, 1000),
            (16_380, 20_000),
            (299_990, 10),
        ] {
            let out = ok(&[
                "cat",
                &format!("{pack}:a.txt"),
                "--offset",
                &off.to_string(),
                "--length",
                &len.to_string(),
            ]);
            assert_eq!(out.stdout, &a[off..off + len], "{codec} a.txt {off}+{len}");
        }
        assert_eq!(ok(&["cat", &format!("{pack}:sub/b.bin")]).stdout, b);
        assert!(ok(&["cat", &format!("{pack}:empty")]).stdout.is_empty());

        let outdir = dir.path().join(format!("out-{codec}"));
        ok(&["unpack", &pack, "-o", &outdir.display().to_string()]);
        assert_eq!(std::fs::read(outdir.join("a.txt")).unwrap(), a);
        assert_eq!(std::fs::read(outdir.join("sub/b.bin")).unwrap(), b);
        assert_eq!(std::fs::read(outdir.join("empty")).unwrap(), b"");
        let one = dir.path().join(format!("one-{codec}"));
        ok(&[
            "unpack",
            &pack,
            "--entry",
            "sub/b.bin",
            "-o",
            &one.display().to_string(),
        ]);
        assert_eq!(std::fs::read(&one).unwrap(), b);

        let out = ok(&["verify", &pack]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));
    }
}

#[test]
fn verify_and_cat_catch_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = setup(dir.path());
    let pack = dir.path().join("p.gpk");
    let p = pack.display().to_string();
    ok(&[
        "pack",
        &dir.path().join("src/a.txt").display().to_string(),
        "-o",
        &p,
        "--codec",
        "lz4",
        "--chunk-size",
        "16K",
    ]);
    let info = ok(&["info", &p, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let chunk = &v["entries"][0]["chunks"][3];
    let at = chunk["file_offset"].as_u64().unwrap() + chunk["stored_length"].as_u64().unwrap() / 2;
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();

    fails_cleanly(&["verify", &p], &["corrupt"]);
    // A range that does not touch chunk 3 still reads; one that does fails, naming entry and chunk.
    let out = ok(&["cat", &format!("{p}:a.txt"), "--length", "16384"]);
    assert_eq!(out.stdout, &a[..16384]);
    fails_cleanly(
        &[
            "cat",
            &format!("{p}:a.txt"),
            "--offset",
            "49152",
            "--length",
            "100",
        ],
        &["a.txt", "chunk 3"],
    );
}

#[test]
fn bad_packs_and_names_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let p = dir.path().join("p.gpk").display().to_string();
    ok(&[
        "pack",
        &dir.path().join("src").display().to_string(),
        "-o",
        &p,
    ]);
    fails_cleanly(&["cat", &format!("{p}:nope")], &["nope"]);
    fails_cleanly(
        &[
            "cat",
            &format!("{p}:a.txt"),
            "--offset",
            "299000",
            "--length",
            "5000",
        ],
        &["a.txt"],
    );
    let bytes = std::fs::read(&p).unwrap();
    let trunc = dir.path().join("trunc.gpk");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    fails_cleanly(&["verify", &trunc.display().to_string()], &["trunc.gpk"]);
    fails_cleanly(
        &[
            "unpack",
            &trunc.display().to_string(),
            "-o",
            &dir.path().join("x").display().to_string(),
        ],
        &["trunc.gpk"],
    );
    let not_pack = dir.path().join("src/a.txt").display().to_string();
    fails_cleanly(&["verify", &not_pack], &["a.txt"]);
    fails_cleanly(
        &[
            "pack",
            &dir.path().join("missing").display().to_string(),
            "-o",
            &p,
        ],
        &["missing"],
    );
    fails_cleanly(
        &["pack", &not_pack, "-o", &p, "--codec", "brotli"],
        &["brotli"],
    );
    fails_cleanly(
        &[
            "bench",
            "--file",
            &format!("{p}:a.txt"),
            "--pattern",
            "write",
            "--duration",
            "0.1",
        ],
        &["read-only"],
    );
}

#[test]
fn bench_reads_through_a_pack_in_logical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let p = dir.path().join("p.gpk").display().to_string();
    ok(&[
        "pack",
        &dir.path().join("src/a.txt").display().to_string(),
        "-o",
        &p,
        "--chunk-size",
        "16K",
    ]);
    let out = ok(&[
        "bench",
        "--file",
        &format!("{p}:a.txt"),
        "--pattern",
        "randread",
        "--queue-depth",
        "4",
        "--duration",
        "0.3",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["iops"].as_f64().unwrap() > 0.0);
    assert_eq!(v["pattern"], "randread");
}
