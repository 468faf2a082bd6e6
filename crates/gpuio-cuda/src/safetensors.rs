//! A strict parser for the safetensors format: an 8-byte little-endian header length `N`, `N` bytes
//! of UTF-8 JSON (an object of tensor name → `{"dtype", "shape", "data_offsets"}`, plus an optional
//! `"__metadata__"` object of strings), then the body the offsets point into.
//!
//! It checks everything the reference implementation checks — header length bounded, JSON an object,
//! offsets contiguous and in order from 0 to the end of the body without gaps or overlaps, shape ×
//! dtype size equal to the byte range, with overflow checks — and more: the body must be exactly the
//! rest of the file (a truncated or padded file is reported, not half-loaded), duplicate names and
//! unknown fields are refused, and rank is bounded. Every error is [`ErrorKind::Corrupt`] and names the
//! file, the tensor and the byte offset, so that a bad file fails before anything is allocated on a
//! device.
//!
//! This module never does I/O past the header and never allocates more than the header's length.

use std::fmt;
use std::io::Read;
use std::path::Path;

use gpuio::error::Op;
use gpuio::{Error, ErrorKind, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Largest header accepted (the reference implementation's limit).
pub const HEADER_LEN_MAX: u64 = 100_000_000;
/// Largest tensor rank accepted.
pub const RANK_MAX: usize = 64;
/// Bytes of the length prefix.
pub const PREFIX_LEN: u64 = 8;

/// An element type of the safetensors format, with its size in bits (sub-byte types pack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    C64,
    F4,
    F6_E2M3,
    F6_E3M2,
}

impl Dtype {
    /// Every dtype, in the order of [`Dtype::name`]s listed in errors.
    pub const ALL: [Dtype; 20] = [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
        Dtype::C64,
        Dtype::F4,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
    ];

    /// Size of one element in bits.
    pub const fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6_E2M3 | Dtype::F6_E3M2 => 6,
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::F8_E5M2 | Dtype::F8_E4M3 => 8,
            Dtype::F8_E8M0 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 64,
        }
    }

    /// The name used in the header (`"F32"`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::C64 => "C64",
            Dtype::F4 => "F4",
            Dtype::F6_E2M3 => "F6_E2M3",
            Dtype::F6_E3M2 => "F6_E3M2",
        }
    }

    /// The dtype of a header name, if it is one.
    pub fn from_name(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a header. Offsets are relative to the first byte of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// First byte in the body.
    pub begin: u64,
    /// One past the last byte in the body.
    pub end: u64,
}

impl TensorSpec {
    pub fn len(&self) -> u64 {
        self.end - self.begin
    }
    pub fn is_empty(&self) -> bool {
        self.begin == self.end
    }
}

/// A validated header: where the body is and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `N`, the JSON's length.
    pub header_len: u64,
    /// File offset of the body (`8 + N`).
    pub body_offset: u64,
    /// Bytes of the body (the file's length minus `8 + N`).
    pub body_len: u64,
    /// Tensors in body order.
    pub tensors: Vec<TensorSpec>,
    /// `__metadata__`, in name order.
    pub metadata: Vec<(String, String)>,
    /// The header's JSON bytes as they are in the file (so a model saved unchanged is written back
    /// with the very same header).
    pub json: Vec<u8>,
}

fn corrupt(path: &Path, offset: u64, len: u64, msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, format!("safetensors: {msg}"))
        .with_path(path)
        .with_range(offset, len)
}

/// Checks the length prefix against the file's length; returns `N`.
pub fn parse_prefix(prefix: &[u8], file_len: u64, path: &Path) -> Result<u64> {
    let Some(bytes) = prefix.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return Err(corrupt(
            path,
            0,
            file_len,
            format!("file of {file_len} bytes is shorter than the 8-byte header length"),
        ));
    };
    let n = u64::from_le_bytes(bytes);
    if n > HEADER_LEN_MAX {
        return Err(corrupt(
            path,
            0,
            8,
            format!("header length {n} exceeds the limit of {HEADER_LEN_MAX} bytes"),
        ));
    }
    if n < 2 {
        return Err(corrupt(
            path,
            0,
            8,
            format!("header length {n} is too short for a JSON object"),
        ));
    }
    if PREFIX_LEN + n > file_len {
        return Err(corrupt(
            path,
            0,
            8,
            format!(
                "header length {n} runs past the end of the file ({file_len} bytes, header ends at {})",
                PREFIX_LEN + n
            ),
        ));
    }
    Ok(n)
}

/// A JSON value in which no object repeats a key, at any depth. `serde_json::Value` keeps the last of
/// repeated keys; the reference implementation (the `safetensors` crate) derives `Deserialize` for its
/// tensor records, and serde's derived struct deserializers refuse a repeated field (`duplicate field
/// "dtype"`). We refuse repeated keys everywhere — tensor records, `__metadata__` and any value nested
/// in them — so a header never means two things.
struct StrictValue(Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<StrictValue, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrictValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::Bool(b)))
            }
            fn visit_i64<E>(self, n: i64) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::from(n)))
            }
            fn visit_u64<E>(self, n: u64) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::from(n)))
            }
            fn visit_f64<E>(self, n: f64) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::from(n)))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::String(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::String(s)))
            }
            fn visit_unit<E>(self) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::Null))
            }
            fn visit_none<E>(self) -> std::result::Result<StrictValue, E> {
                Ok(StrictValue(Value::Null))
            }
            fn visit_some<D2: Deserializer<'de>>(
                self,
                d: D2,
            ) -> std::result::Result<StrictValue, D2::Error> {
                serde::Deserialize::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<StrictValue, A::Error> {
                let mut v = Vec::new();
                while let Some(StrictValue(x)) = seq.next_element()? {
                    v.push(x);
                }
                Ok(StrictValue(Value::Array(v)))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<StrictValue, A::Error> {
                let mut map = serde_json::Map::new();
                while let Some(k) = m.next_key::<String>()? {
                    if map.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate key '{k}' in an object"
                        )));
                    }
                    let StrictValue(v) = m.next_value()?;
                    map.insert(k, v);
                }
                Ok(StrictValue(Value::Object(map)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses JSON refusing a repeated key in any object, at any depth (for files that sit beside
/// safetensors files, such as a checkpoint's index).
pub fn parse_strict_json(text: &[u8]) -> std::result::Result<Value, serde_json::Error> {
    serde_json::from_slice::<StrictValue>(text).map(|v| v.0)
}

/// Top-level entries in file order, duplicates kept (so they can be refused).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Entries, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    // Say whose record repeats a key (syntax errors pass through unchanged).
                    let StrictValue(val) = m.next_value::<StrictValue>().map_err(|e| {
                        let msg = e.to_string();
                        if msg.starts_with("duplicate key") {
                            let what = if k == "__metadata__" {
                                "'__metadata__'".to_string()
                            } else {
                                format!("tensor '{k}'")
                            };
                            let msg = msg.split(" at line ").next().unwrap_or(&msg);
                            serde::de::Error::custom(format!("{what}: {msg}"))
                        } else {
                            e
                        }
                    })?;
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates the header JSON of a file of `file_len` bytes whose prefix said `N =
/// json.len()`.
pub fn parse_header(json: &[u8], file_len: u64, path: &Path) -> Result<Header> {
    let n = json.len() as u64;
    let body_offset = PREFIX_LEN + n;
    let whole = |msg: String| corrupt(path, PREFIX_LEN, n, msg);
    if body_offset > file_len {
        return Err(whole(format!(
            "header of {n} bytes runs past the end of the file ({file_len} bytes)"
        )));
    }
    let text = std::str::from_utf8(json).map_err(|e| {
        corrupt(
            path,
            PREFIX_LEN + e.valid_up_to() as u64,
            1,
            "header is not UTF-8".into(),
        )
    })?;
    if !text.starts_with('{') {
        return Err(whole(
            "header JSON must be an object (it must start with '{')".into(),
        ));
    }
    let entries: Entries = serde_json::from_str(text).map_err(|e| {
        // Name the byte where the parser stopped (serde_json reports a line and a column).
        let at = byte_offset(text, e.line(), e.column());
        let msg = e.to_string();
        if msg.contains(": duplicate key") {
            corrupt(
                path,
                PREFIX_LEN + at,
                1,
                format!(
                    "header repeats a key: {} (a key may appear once per object)",
                    msg.split(" at line ").next().unwrap_or(&msg)
                ),
            )
        } else {
            corrupt(
                path,
                PREFIX_LEN + at,
                1,
                format!(
                    "header is not valid JSON: {e} (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        }
    })?;
    let body_len = file_len - body_offset;
    let mut tensors = Vec::with_capacity(entries.0.len());
    let mut metadata = None;
    let mut seen = std::collections::HashSet::with_capacity(entries.0.len());
    for (name, v) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(whole(if name == "__metadata__" {
                "'__metadata__' appears twice in the header".to_string()
            } else {
                format!("tensor '{name}' appears twice in the header")
            }));
        }
        if name == "__metadata__" {
            metadata = Some(parse_metadata(&v).map_err(whole)?);
            continue;
        }
        tensors.push(parse_tensor(&name, &v).map_err(|m| whole(format!("tensor '{name}': {m}")))?);
    }
    // The reference implementation sorts by offsets, then requires each tensor to start where the
    // previous one ended.
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut prev: Option<&TensorSpec> = None;
    for t in &tensors {
        let at = |off: u64| body_offset.saturating_add(off);
        let expected = prev.map_or(0, |p| p.end);
        if t.begin != expected {
            let msg = match prev {
                None => format!(
                    "tensor '{}' is the first in the body but starts at body offset {}, not 0 (gap of {} bytes)",
                    t.name, t.begin, t.begin
                ),
                Some(p) if t.begin < p.end => format!(
                    "tensor '{}' [{}, {}) overlaps tensor '{}' [{}, {})",
                    t.name, t.begin, t.end, p.name, p.begin, p.end
                ),
                Some(p) => format!(
                    "tensor '{}' starts at body offset {} but tensor '{}' before it ends at {} (gap of {} bytes)",
                    t.name,
                    t.begin,
                    p.name,
                    p.end,
                    t.begin - p.end
                ),
            };
            return Err(corrupt(path, at(t.begin), t.len(), msg));
        }
        if t.end > body_len {
            return Err(corrupt(
                path,
                at(t.begin),
                t.len(),
                format!(
                    "truncated body: tensor '{}' ends at body offset {} but the body has only {body_len} bytes",
                    t.name, t.end
                ),
            ));
        }
        prev = Some(t);
    }
    let end = prev.map_or(0, |p| p.end);
    if end != body_len {
        let after = prev.map_or("the header".to_string(), |p| format!("tensor '{}'", p.name));
        return Err(corrupt(
            path,
            body_offset + end,
            body_len - end,
            format!(
                "{} bytes after {after} belong to no tensor (the body is {body_len} bytes)",
                body_len - end
            ),
        ));
    }
    let mut metadata = metadata.unwrap_or_default();
    metadata.sort();
    Ok(Header {
        header_len: n,
        body_offset,
        body_len,
        tensors,
        metadata,
        json: json.to_vec(),
    })
}

/// The byte offset in `text` of serde_json's 1-based `line` and `column` (0 when it reports none).
fn byte_offset(text: &str, line: usize, column: usize) -> u64 {
    if line == 0 {
        return 0;
    }
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line - 1)
        .map(str::len)
        .sum();
    (line_start + column.saturating_sub(1)).min(text.len()) as u64
}

fn parse_metadata(v: &Value) -> std::result::Result<Vec<(String, String)>, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| "__metadata__ must be an object of strings".to_string())?;
    obj.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_string())),
            None => Err(format!("__metadata__ value of '{k}' is not a string: {v}")),
        })
        .collect()
}

fn parse_tensor(name: &str, v: &Value) -> std::result::Result<TensorSpec, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected an object, found {v}"))?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(format!("unknown field '{k}'"));
    }
    let dtype_name = obj
        .get("dtype")
        .ok_or("missing 'dtype'")?
        .as_str()
        .ok_or("'dtype' is not a string")?;
    let dtype = Dtype::from_name(dtype_name).ok_or_else(|| {
        let known: Vec<&str> = Dtype::ALL.iter().map(|d| d.name()).collect();
        format!("unknown dtype '{dtype_name}' (known: {})", known.join(", "))
    })?;
    let shape_v = obj
        .get("shape")
        .ok_or("missing 'shape'")?
        .as_array()
        .ok_or("'shape' is not an array")?;
    if shape_v.len() > RANK_MAX {
        return Err(format!(
            "rank {} exceeds the limit of {RANK_MAX}",
            shape_v.len()
        ));
    }
    let shape = shape_v
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| format!("shape dimension {d} is not a non-negative integer"))
        })
        .collect::<std::result::Result<Vec<u64>, String>>()?;
    let offs = obj
        .get("data_offsets")
        .ok_or("missing 'data_offsets'")?
        .as_array()
        .ok_or("'data_offsets' is not an array")?;
    let (begin, end) = match offs.as_slice() {
        [b, e] => (
            b.as_u64()
                .ok_or("data_offsets[0] is not a non-negative integer")?,
            e.as_u64()
                .ok_or("data_offsets[1] is not a non-negative integer")?,
        ),
        _ => {
            return Err(format!(
                "data_offsets must be [begin, end], found {} values",
                offs.len()
            ))
        }
    };
    if end < begin {
        return Err(format!(
            "data_offsets [{begin}, {end}] end before they begin"
        ));
    }
    let elems = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has more elements than fit in 64 bits"))?;
    let bits = elems
        .checked_mul(dtype.bits())
        .ok_or_else(|| format!("shape {shape:?} of {dtype} overflows 64 bits"))?;
    if bits % 8 != 0 {
        return Err(format!(
            "shape {shape:?} of {dtype} is {bits} bits, not a whole number of bytes"
        ));
    }
    if bits / 8 != end - begin {
        return Err(format!(
            "shape {shape:?} of {dtype} is {} bytes but data_offsets [{begin}, {end}] hold {}",
            bits / 8,
            end - begin
        ));
    }
    Ok(TensorSpec {
        name: name.to_string(),
        dtype,
        shape,
        begin,
        end,
    })
}

/// Reads and validates the header of the file at `path` (plain reads of the first `8 + N` bytes).
///
/// Only regular files (and block devices) are read: a FIFO, socket or character device has no offsets
/// to load tensors from, and opening a FIFO would wait for a writer for ever — so it is opened
/// non-blocking and refused with [`ErrorKind::Unsupported`].
pub fn read_header(path: &Path) -> Result<Header> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::from_io(Op::Open, &e).with_path(path))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::from_io(Op::Stat, &e).with_path(path))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::new(ErrorKind::IsADirectory, "is a directory").with_path(path));
    }
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "not a regular file (a FIFO, socket or character device): a safetensors file is read at offsets",
        )
        .with_op(Op::Open)
        .with_path(path));
    }
    let file_len = meta.len();
    let mut prefix = [0u8; 8];
    let got = read_full(&mut f, &mut prefix, path)?;
    let n = parse_prefix(&prefix[..got], file_len, path)?;
    // n <= HEADER_LEN_MAX and <= the file's length: bounded.
    let mut json = vec![0u8; n as usize];
    let got = read_full(&mut f, &mut json, path)?;
    if got != json.len() {
        return Err(corrupt(
            path,
            PREFIX_LEN + got as u64,
            n - got as u64,
            "file shrank while its header was read".into(),
        ));
    }
    parse_header(&json, file_len, path)
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(Op::Read, &e).with_path(path)),
        }
    }
    Ok(got)
}

/// Builds a safetensors file image from `(name, dtype, shape, bytes)` in body order, with optional
/// metadata. For tests and tools; the header is padded with spaces to a multiple of 8 bytes as the
/// reference writer does.
pub fn serialize(tensors: &[(&str, Dtype, &[u64], &[u8])], metadata: &[(&str, &str)]) -> Vec<u8> {
    let json = header_json(
        tensors
            .iter()
            .map(|&(name, dtype, shape, bytes)| (name, dtype, shape, bytes.len() as u64)),
        metadata.iter().copied(),
    );
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for (.., bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

/// The header JSON for tensors given as `(name, dtype, shape, byte length)` in body order (laid out
/// contiguously from body offset 0) and metadata: padded with spaces to a multiple of 8 bytes as the
/// reference writer does. Not validated: parse the result with [`parse_header`] to check it.
pub fn header_json<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [u64], u64)>,
    metadata: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let m: serde_json::Map<String, Value> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    if !m.is_empty() {
        header.insert("__metadata__".into(), Value::Object(m));
    }
    let mut off = 0u64;
    for (name, dtype, shape, len) in tensors {
        let end = off.saturating_add(len);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [off, end]}),
        );
        off = end;
    }
    let mut json = Value::Object(header).to_string().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    json
}
