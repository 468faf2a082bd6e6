//! The strict safetensors parser: good files parse to the right table; every kind of damage the issue
//! lists fails with a `Corrupt` error that names the file, the tensor and the byte offset.

use std::path::Path;

use gpuio::ErrorKind;
use gpuio_cuda::safetensors::{parse_header, parse_prefix, read_header, serialize, HEADER_LEN_MAX};
use gpuio_cuda::Dtype;

/// A file image from a header JSON string and a body of `body_len` bytes.
fn image(json: &str, body_len: usize) -> Vec<u8> {
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.extend(std::iter::repeat_n(7u8, body_len));
    v
}

/// Parses an image the way a reader of a file would.
fn parse(img: &[u8]) -> gpuio::Result<gpuio_cuda::Header> {
    let p = Path::new("/m/x.safetensors");
    let n = parse_prefix(img, img.len() as u64, p)?;
    parse_header(&img[8..8 + n as usize], img.len() as u64, p)
}

/// Asserts a Corrupt error whose message contains every needle and that names the file.
fn bad(img: &[u8], needles: &[&str]) -> gpuio::Error {
    let e = parse(img).expect_err("must be refused");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let s = e.to_string();
    assert!(s.contains("/m/x.safetensors"), "no file in: {s}");
    for n in needles {
        assert!(s.contains(n), "'{n}' not in: {s}");
    }
    assert!(e.offset().is_some(), "no offset in: {s}");
    e
}

#[test]
fn reference_layout_parses() {
    let a: Vec<u8> = (0..24).collect();
    let b: Vec<u8> = (0..4).collect();
    let img = serialize(
        &[("a", Dtype::F32, &[2, 3], &a), ("b", Dtype::BF16, &[2], &b)],
        &[("format", "pt")],
    );
    let h = parse(&img).unwrap();
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.tensors[0].name, "a");
    assert_eq!((h.tensors[0].begin, h.tensors[0].end), (0, 24));
    assert_eq!(h.tensors[1].dtype, Dtype::BF16);
    assert_eq!(h.tensors[1].shape, vec![2]);
    assert_eq!(h.body_len, 28);
    assert_eq!(h.body_offset, 8 + h.header_len);
    assert_eq!(h.metadata, vec![("format".into(), "pt".into())]);
}

#[test]
fn json_order_does_not_matter_and_scalars_and_empty_tensors_work() {
    // b listed first but placed second; a scalar (shape []) of 8 bytes; an empty tensor.
    let json = r#"{"b":{"dtype":"I64","shape":[],"data_offsets":[4,12]},"e":{"dtype":"F16","shape":[0,3],"data_offsets":[12,12]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
    let h = parse(&image(json, 12)).unwrap();
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "e"]);
}

#[test]
fn every_dtype_is_known_with_its_size() {
    for d in Dtype::ALL {
        assert_eq!(Dtype::from_name(d.name()), Some(d));
    }
    assert_eq!(Dtype::F4.bits(), 4);
    assert_eq!(Dtype::C64.bits(), 64);
    // Sub-byte types must fill whole bytes.
    let json = r#"{"q":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
    bad(&image(json, 2), &["'q'", "12 bits"]);
    let json = r#"{"q":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#;
    parse(&image(json, 2)).unwrap();
}

#[test]
fn truncated_body_names_the_tensor() {
    let a = vec![1u8; 400];
    let mut img = serialize(&[("w.0", Dtype::F32, &[100], &a)], &[]);
    img.truncate(img.len() - 10);
    bad(
        &img,
        &["truncated body", "'w.0'", "ends at body offset 400"],
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let a = vec![1u8; 16];
    let mut img = serialize(&[("w", Dtype::F32, &[4], &a)], &[]);
    img.extend_from_slice(&[0; 5]);
    bad(&img, &["5 bytes after tensor 'w'"]);
}

#[test]
fn header_length_past_the_end_or_too_large() {
    let mut img = image(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        1,
    );
    img[..8].copy_from_slice(&1000u64.to_le_bytes());
    bad(&img, &["header length 1000 runs past the end of the file"]);
    img[..8].copy_from_slice(&(HEADER_LEN_MAX + 1).to_le_bytes());
    bad(&img, &["exceeds the limit"]);
    bad(&img[..5], &["shorter than the 8-byte header length"]);
}

#[test]
fn overlapping_offsets_name_both_tensors() {
    let json = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#;
    bad(
        &image(json, 12),
        &["'b' [4, 12) overlaps tensor 'a' [0, 8)"],
    );
}

#[test]
fn gaps_and_reversed_offsets_are_refused() {
    let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
    bad(
        &image(json, 12),
        &["'b' starts at body offset 8", "gap of 4 bytes"],
    );
    let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
    bad(&image(json, 8), &["'a' is the first", "not 0"]);
    let json = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}}"#;
    bad(&image(json, 8), &["'a'", "end before they begin"]);
}

#[test]
fn unknown_dtype_names_the_tensor() {
    let json = r#"{"layer.1":{"dtype":"F12","shape":[1],"data_offsets":[0,2]}}"#;
    bad(&image(json, 2), &["'layer.1'", "unknown dtype 'F12'"]);
}

#[test]
fn shape_and_range_disagreeing() {
    let json = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
    bad(
        &image(json, 12),
        &["'w'", "16 bytes but data_offsets [0, 12] hold 12"],
    );
    // Overflow of the element count, not a wrap-around that happens to match.
    let json = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
    bad(&image(json, 0), &["'w'", "64 bits"]);
    let json = r#"{"w":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}"#;
    bad(&image(json, 0), &["'w'", "overflows"]);
}

#[test]
fn malformed_headers() {
    bad(&image("[1,2,3]", 0), &["must be an object"]);
    bad(&image("{\"a\":", 0), &["not valid JSON"]);
    bad(
        &image(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            2,
        ),
        &["'a' appears twice"],
    );
    bad(
        &image(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}"#,
            1,
        ),
        &["'a'", "unknown field 'x'"],
    );
    bad(
        &image(
            r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
            1,
        ),
        &["'a'", "non-negative"],
    );
    bad(
        &image(r#"{"__metadata__":{"k":1}}"#, 0),
        &["__metadata__ value of 'k'"],
    );
    let mut img = image(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        1,
    );
    img[12] = 0xff;
    bad(&img, &["not UTF-8"]);
}

/// Repeated keys anywhere in the header: the reference implementation refuses a repeated field of a
/// tensor record (serde's derived deserializer: "duplicate field"), and serde_json's `Value` would keep
/// the last one silently — so a header could mean two things. Each row: header, body bytes, needles.
#[test]
fn repeated_keys_are_refused_everywhere() {
    let t = r#""dtype":"U8","shape":[1],"data_offsets":[0,1]"#;
    let table: Vec<(String, usize, Vec<&str>)> = vec![
        // A tensor's field twice: the last value would win (U8 → F32 changes the size check too).
        (
            format!(r#"{{"a":{{{t},"dtype":"I8"}}}}"#),
            1,
            vec!["tensor 'a'", "duplicate key 'dtype'"],
        ),
        (
            format!(r#"{{"a":{{"shape":[1],{t}}}}}"#),
            1,
            vec!["tensor 'a'", "duplicate key 'shape'"],
        ),
        (
            format!(r#"{{"a":{{"data_offsets":[0,1],{t}}}}}"#),
            1,
            vec!["tensor 'a'", "duplicate key 'data_offsets'"],
        ),
        // In the second tensor, with the first one fine.
        (
            format!(
                r#"{{"a":{{{t}}},"b":{{"dtype":"U8","shape":[1],"shape":[1],"data_offsets":[1,2]}}}}"#
            ),
            2,
            vec!["tensor 'b'", "duplicate key 'shape'"],
        ),
        // The same tensor name twice.
        (
            format!(r#"{{"a":{{{t}}},"a":{{{t}}}}}"#),
            1,
            vec!["tensor 'a' appears twice"],
        ),
        // __metadata__ twice, and a key twice inside it.
        (
            format!(r#"{{"__metadata__":{{"k":"v"}},"a":{{{t}}},"__metadata__":{{"k":"w"}}}}"#),
            1,
            vec!["'__metadata__' appears twice"],
        ),
        (
            format!(r#"{{"__metadata__":{{"k":"v","k":"w"}},"a":{{{t}}}}}"#),
            1,
            vec!["'__metadata__'", "duplicate key 'k'"],
        ),
        // Deeper: an object nested in a value that is later refused anyway must not hide a repeat.
        (
            format!(r#"{{"__metadata__":{{"k":{{"x":1,"x":2}}}},"a":{{{t}}}}}"#),
            1,
            vec!["'__metadata__'", "duplicate key 'x'"],
        ),
    ];
    for (json, body, needles) in &table {
        let e = bad(&image(json, *body), needles);
        let s = e.to_string();
        // The offset points into the header, at or past the repeated key.
        let off = e.offset().unwrap();
        assert!(off >= 8 && off <= 8 + json.len() as u64, "{off}: {s}");
        if s.contains("duplicate key") {
            let key = needles[1]
                .trim_start_matches("duplicate key ")
                .trim_matches('\'');
            let first = json.find(&format!("\"{key}\"")).unwrap() as u64;
            assert!(
                off > 8 + first,
                "offset {off} is not past the first '{key}': {s}"
            );
        }
    }
    // Control: the same records without repeats parse.
    parse(&image(
        &format!(r#"{{"__metadata__":{{"k":"v"}},"a":{{{t}}}}}"#),
        1,
    ))
    .unwrap();
}

#[test]
fn read_header_from_a_file_and_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    std::fs::write(&p, serialize(&[("x", Dtype::U8, &[3], &[1, 2, 3])], &[])).unwrap();
    let h = read_header(&p).unwrap();
    assert_eq!(h.tensors[0].name, "x");
    let e = read_header(&dir.path().join("nope")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    std::fs::write(&p, b"abc").unwrap();
    let e = read_header(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
}
