//! The pack format, byte by byte (docs/format.md is the same thing in prose): the fixed header, the
//! entry table, and the checks that turn any file into either a fully validated table or an error
//! naming the byte offset of the first bad field.
//!
//! Parsing never trusts a size it has not checked against what was actually read: the table is read
//! only after the header's checksum, sizes and the real file length agree, and it is bounded by
//! [`TABLE_LEN_MAX`]; every count is bounded by the table length; every chunk by the file. This module
//! does no I/O of its own beyond what its caller hands it.

use std::collections::HashMap;
use std::path::Path;

use gpuio::error::Op;
use gpuio::{Error, ErrorKind, Result};

use crate::codec::Codec;

/// The first eight bytes of every pack: `\x89` (not ASCII: a text-mode transfer shows), `GPUPK`, then
/// CR LF (a line-ending conversion shows).
pub const MAGIC: [u8; 8] = *b"\x89GPUPK\r\n";
/// The format version this code writes and the newest it reads.
pub const VERSION: u32 = 1;
/// Length of the version-1 header.
pub const HEADER_LEN: u32 = 64;
/// Largest header length any version may declare (so that its checksum can be checked before the
/// version is known).
pub const HEADER_LEN_MAX: u32 = 4096;
/// Size of one entry record in the table.
pub const ENTRY_RECORD: u64 = 32;
/// Size of one chunk record in the table.
pub const CHUNK_RECORD: u64 = 40;
/// Largest entry table a reader accepts (it is read into memory whole).
pub const TABLE_LEN_MAX: u64 = 1 << 30;
/// Largest chunk (logical bytes); a chunk is the unit of decompression.
pub const CHUNK_SIZE_MAX: u32 = 256 << 20;
/// Smallest chunk size the writer accepts (the reader accepts any non-zero size).
pub const CHUNK_SIZE_MIN: u32 = 512;
/// Largest payload alignment.
pub const ALIGN_MAX: u32 = 1 << 20;
/// Longest entry name, in bytes.
pub const NAME_LEN_MAX: u32 = 4096;

/// One entry (a named file) in a pack: its logical size, codec, chunk size and chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub name: String,
    /// Logical (uncompressed) size in bytes.
    pub size: u64,
    /// The codec the entry was packed with (each chunk is stored with it, or raw).
    pub codec: Codec,
    /// Logical bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    pub chunks: Vec<ChunkInfo>,
}

impl EntryInfo {
    /// Bytes its chunks take in the pack (without padding).
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.stored_len as u64).sum()
    }
}

/// One chunk of an entry: where its logical bytes are, where its stored bytes are, and their checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Offset of its first byte within the entry.
    pub logical_offset: u64,
    pub logical_len: u32,
    /// Offset of its stored bytes within the pack file.
    pub file_offset: u64,
    pub stored_len: u32,
    /// How the stored bytes are encoded: the entry's codec, or [`Codec::None`] when stored raw.
    pub codec: Codec,
    /// CRC-32C (Castagnoli) of the stored bytes.
    pub crc32c_stored: u32,
    /// CRC-32C of the logical (decompressed) bytes.
    pub crc32c_logical: u32,
}

pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

pub(crate) fn align_up(x: u64, align: u32) -> Option<u64> {
    let a = align as u64;
    x.checked_add(a - 1).map(|v| v / a * a)
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub header_len: u32,
    pub flags: u32,
    pub align: u32,
    pub file_len: u64,
    pub table_offset: u64,
    pub table_len: u32,
    pub entry_count: u32,
    pub chunk_count: u32,
    pub names_len: u32,
    pub table_crc32c: u32,
}

impl Header {
    /// The 64 bytes of a version-1 header, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.flags.to_le_bytes());
        b[20..24].copy_from_slice(&self.align.to_le_bytes());
        b[24..32].copy_from_slice(&self.file_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.table_offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.table_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.entry_count.to_le_bytes());
        b[48..52].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[52..56].copy_from_slice(&self.names_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.table_crc32c.to_le_bytes());
        let crc = crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Builds errors that name the pack and the byte offset (and width) of the field at fault.
pub(crate) struct Fault<'a> {
    pub path: &'a Path,
}

impl Fault<'_> {
    pub fn at(&self, kind: ErrorKind, offset: u64, width: u64, msg: impl Into<String>) -> Error {
        Error::new(kind, msg)
            .with_op(Op::Open)
            .with_path(self.path)
            .with_range(offset, width)
    }
    pub fn corrupt(&self, offset: u64, width: u64, msg: impl Into<String>) -> Error {
        self.at(ErrorKind::Corrupt, offset, width, msg)
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Whether `prefix` starts with the pack magic.
pub fn has_magic(prefix: &[u8]) -> bool {
    prefix.len() >= MAGIC.len() && prefix[..MAGIC.len()] == MAGIC
}

/// Decodes and checks the header. `read_at(offset, buf)` reads exactly `buf.len()` bytes of the file;
/// `actual_len` is the file's real length.
pub(crate) fn parse_header(
    fault: &Fault<'_>,
    actual_len: u64,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<Header> {
    let mut first = [0u8; HEADER_LEN as usize];
    let have = actual_len.min(HEADER_LEN as u64) as usize;
    read_at(0, &mut first[..have])?;
    if !has_magic(&first[..have]) {
        return Err(fault.at(
            ErrorKind::InvalidInput,
            0,
            8,
            if have < MAGIC.len() {
                format!("not a gpuio pack: the file is only {actual_len} bytes")
            } else {
                format!(
                    "not a gpuio pack: it starts with {:02x?}, a pack with {:02x?}",
                    &first[..8],
                    MAGIC
                )
            },
        ));
    }
    if have < HEADER_LEN as usize {
        return Err(fault.corrupt(
            actual_len,
            0,
            format!(
                "pack is truncated: {actual_len} bytes, shorter than its {HEADER_LEN}-byte header"
            ),
        ));
    }
    let version = le32(&first, 8);
    let header_len = le32(&first, 12);
    let newer =
        || format!("pack version {version} is newer than this gpuio understands ({VERSION})");
    if !(HEADER_LEN..=HEADER_LEN_MAX).contains(&header_len) || header_len % 4 != 0 {
        let msg = if version > VERSION {
            format!(
                "{} (or its header is damaged: header length {header_len})",
                newer()
            )
        } else {
            format!("header length {header_len} is not a multiple of 4 in {HEADER_LEN}..={HEADER_LEN_MAX}")
        };
        return Err(fault.corrupt(12, 4, msg));
    }
    if header_len as u64 > actual_len {
        return Err(fault.corrupt(
            12,
            4,
            format!(
                "header length {header_len} exceeds the file's {actual_len} bytes (truncated?)"
            ),
        ));
    }
    let mut header = first.to_vec();
    if header_len > HEADER_LEN {
        header.resize(header_len as usize, 0);
        read_at(HEADER_LEN as u64, &mut header[HEADER_LEN as usize..])?;
    }
    let crc_at = header_len as usize - 4;
    let stored_crc = le32(&header, crc_at);
    let crc = crc32c(&header[..crc_at]);
    if version > VERSION {
        let msg = if crc == stored_crc {
            newer()
        } else {
            format!(
                "{} (or its header is damaged: its checksum does not match)",
                newer()
            )
        };
        return Err(fault.at(ErrorKind::Unsupported, 8, 4, msg));
    }
    if crc != stored_crc {
        return Err(fault.corrupt(
            crc_at as u64,
            4,
            format!("header checksum mismatch: stored {stored_crc:#010x}, computed {crc:#010x}"),
        ));
    }
    if version == 0 {
        return Err(fault.corrupt(8, 4, "pack version 0 is not valid"));
    }
    if header_len != HEADER_LEN {
        return Err(fault.corrupt(
            12,
            4,
            format!("a version-{version} header is {HEADER_LEN} bytes, not {header_len}"),
        ));
    }
    let h = Header {
        version,
        header_len,
        flags: le32(&header, 16),
        align: le32(&header, 20),
        file_len: le64(&header, 24),
        table_offset: le64(&header, 32),
        table_len: le32(&header, 40),
        entry_count: le32(&header, 44),
        chunk_count: le32(&header, 48),
        names_len: le32(&header, 52),
        table_crc32c: le32(&header, 56),
    };
    if h.flags != 0 {
        return Err(fault.at(
            ErrorKind::Unsupported,
            16,
            4,
            format!(
                "pack uses flags {:#x} that this gpuio does not understand",
                h.flags
            ),
        ));
    }
    if !h.align.is_power_of_two() || h.align > ALIGN_MAX {
        return Err(fault.corrupt(
            20,
            4,
            format!(
                "payload alignment {} is not a power of two up to {ALIGN_MAX}",
                h.align
            ),
        ));
    }
    if h.file_len != actual_len {
        let what = if actual_len < h.file_len {
            "truncated"
        } else {
            "has bytes past its end"
        };
        return Err(fault.corrupt(
            24,
            8,
            format!(
                "pack {what}: the file is {actual_len} bytes, its header says {}",
                h.file_len
            ),
        ));
    }
    let table_len = h.table_len as u64;
    if table_len > TABLE_LEN_MAX {
        return Err(fault.corrupt(
            40,
            4,
            format!("entry table of {table_len} bytes exceeds the limit of {TABLE_LEN_MAX}"),
        ));
    }
    let expected = h.entry_count as u64 * ENTRY_RECORD
        + h.chunk_count as u64 * CHUNK_RECORD
        + h.names_len as u64;
    if expected != table_len {
        return Err(fault.corrupt(
            40,
            4,
            format!(
                "entry table length {table_len} does not match {} entries, {} chunks and {} bytes of names ({expected})",
                h.entry_count, h.chunk_count, h.names_len
            ),
        ));
    }
    if h.table_offset < header_len as u64
        || h.table_offset.checked_add(table_len) != Some(h.file_len)
    {
        return Err(fault.corrupt(
            32,
            8,
            format!(
                "entry table at {} (+{table_len} bytes) does not end the {}-byte file",
                h.table_offset, h.file_len
            ),
        ));
    }
    Ok(h)
}

/// Decodes and checks the entry table (already read: `table` is exactly `header.table_len` bytes).
/// Every structural rule of docs/format.md is checked here, so that a pack that opens can be read
/// without further bounds checks.
pub(crate) fn parse_table(fault: &Fault<'_>, h: &Header, table: &[u8]) -> Result<Vec<EntryInfo>> {
    let base = h.table_offset;
    let crc = crc32c(table);
    if crc != h.table_crc32c {
        return Err(fault.corrupt(
            base,
            table.len() as u64,
            format!(
                "entry table checksum mismatch: header says {:#010x}, computed {crc:#010x}",
                h.table_crc32c
            ),
        ));
    }
    let entries_at = 0usize;
    let chunks_at = h.entry_count as usize * ENTRY_RECORD as usize;
    let names_at = chunks_at + h.chunk_count as usize * CHUNK_RECORD as usize;
    let names = &table[names_at..];

    let mut out = Vec::with_capacity(h.entry_count as usize);
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(h.entry_count as usize);
    let mut next_chunk: u64 = 0;
    let mut next_name: u64 = 0;
    // Where the next payload must start: payloads follow the header in table order, each at the
    // next multiple of the alignment.
    let mut next_payload = h.header_len as u64;

    for e in 0..h.entry_count as usize {
        let rec = &table[entries_at + e * ENTRY_RECORD as usize..][..ENTRY_RECORD as usize];
        let rec_off = base + (entries_at + e * ENTRY_RECORD as usize) as u64;
        let field = |o: u64, w: u64, msg: String| {
            fault.corrupt(rec_off + o, w, format!("entry {e}: {msg}"))
        };
        let size = le64(rec, 0);
        let first_chunk = le32(rec, 8);
        let chunk_count = le32(rec, 12);
        let chunk_size = le32(rec, 16);
        let name_offset = le32(rec, 20);
        let name_len = le32(rec, 24);
        let codec_id = rec[28];
        if rec[29..32] != [0, 0, 0] {
            return Err(field(29, 3, "reserved bytes are not zero".into()));
        }
        let codec = Codec::from_id(codec_id)
            .ok_or_else(|| field(28, 1, format!("unknown codec id {codec_id}")))?;
        if name_offset as u64 != next_name {
            return Err(field(
                20,
                4,
                format!("name offset {name_offset}, expected {next_name} (names are stored in entry order)"),
            ));
        }
        if name_len == 0 || name_len > NAME_LEN_MAX {
            return Err(field(
                24,
                4,
                format!("name length {name_len} is not in 1..={NAME_LEN_MAX}"),
            ));
        }
        let name_end = next_name + name_len as u64;
        if name_end > names.len() as u64 {
            return Err(field(
                24,
                4,
                format!(
                    "name of {name_len} bytes at {name_offset} runs past the {} bytes of names",
                    names.len()
                ),
            ));
        }
        let name_bytes = &names[name_offset as usize..name_end as usize];
        let name_pos = base + names_at as u64 + name_offset as u64;
        let name = std::str::from_utf8(name_bytes).map_err(|_| {
            fault.corrupt(
                name_pos,
                name_len as u64,
                format!("entry {e}: name is not UTF-8"),
            )
        })?;
        if let Err(why) = check_name(name) {
            return Err(fault.corrupt(
                name_pos,
                name_len as u64,
                format!("entry {e}: name {name:?} {why}"),
            ));
        }
        if let Some(prev) = seen.insert(name, e) {
            return Err(fault.corrupt(
                name_pos,
                name_len as u64,
                format!("entry {e}: name {name:?} is also the name of entry {prev}"),
            ));
        }
        next_name = name_end;
        if chunk_size == 0 || chunk_size > CHUNK_SIZE_MAX {
            return Err(field(
                16,
                4,
                format!("chunk size {chunk_size} is not in 1..={CHUNK_SIZE_MAX}"),
            ));
        }
        let want_chunks = size.div_ceil(chunk_size as u64);
        if want_chunks != chunk_count as u64 {
            return Err(field(
                12,
                4,
                format!("{chunk_count} chunks, but {size} bytes in chunks of {chunk_size} need {want_chunks}"),
            ));
        }
        if first_chunk as u64 != next_chunk {
            return Err(field(
                8,
                4,
                format!("first chunk {first_chunk}, expected {next_chunk} (chunks are stored in entry order)"),
            ));
        }
        let chunk_end = next_chunk + chunk_count as u64;
        if chunk_end > h.chunk_count as u64 {
            return Err(field(
                12,
                4,
                format!(
                    "chunks {next_chunk}..{chunk_end} run past the table's {} chunks",
                    h.chunk_count
                ),
            ));
        }
        let mut chunks = Vec::with_capacity(chunk_count as usize);
        for i in 0..chunk_count as u64 {
            let g = (next_chunk + i) as usize;
            let at = chunks_at + g * CHUNK_RECORD as usize;
            let c = &table[at..at + CHUNK_RECORD as usize];
            let c_off = base + at as u64;
            let cf = |o: u64, w: u64, msg: String| {
                fault.corrupt(c_off + o, w, format!("entry {name:?} chunk {i}: {msg}"))
            };
            let logical_offset = le64(c, 0);
            let file_offset = le64(c, 8);
            let logical_len = le32(c, 16);
            let stored_len = le32(c, 20);
            let crc32c_stored = le32(c, 24);
            let crc32c_logical = le32(c, 28);
            let codec_id = c[32];
            if c[33..40].iter().any(|&b| b != 0) {
                return Err(cf(33, 7, "reserved bytes are not zero".into()));
            }
            let want_off = i * chunk_size as u64;
            if logical_offset != want_off {
                return Err(cf(
                    0,
                    8,
                    format!("logical offset {logical_offset}, expected {want_off}"),
                ));
            }
            let want_len = (size - want_off).min(chunk_size as u64);
            if logical_len as u64 != want_len {
                return Err(cf(
                    16,
                    4,
                    format!("logical length {logical_len}, expected {want_len}"),
                ));
            }
            let ccodec = Codec::from_id(codec_id)
                .ok_or_else(|| cf(32, 1, format!("unknown codec id {codec_id}")))?;
            if ccodec != Codec::None && ccodec != codec {
                return Err(cf(
                    32,
                    1,
                    format!("codec {ccodec} in an entry packed with {codec}"),
                ));
            }
            if ccodec == Codec::None {
                if stored_len != logical_len {
                    return Err(cf(
                        20,
                        4,
                        format!(
                            "stored raw but {stored_len} stored bytes for {logical_len} logical"
                        ),
                    ));
                }
                if crc32c_stored != crc32c_logical {
                    return Err(cf(24, 8, "stored raw but the two checksums differ".into()));
                }
            } else if stored_len == 0 || stored_len >= logical_len {
                return Err(cf(
                    20,
                    4,
                    format!(
                        "compressed to {stored_len} bytes from {logical_len} (a compressed chunk is non-empty and smaller)"
                    ),
                ));
            }
            let want_file = align_up(next_payload, h.align).unwrap_or(u64::MAX);
            if file_offset != want_file {
                return Err(cf(
                    8,
                    8,
                    format!("payload at {file_offset}, expected {want_file} (payloads follow each other in table order)"),
                ));
            }
            let end = file_offset.saturating_add(stored_len as u64);
            if end > h.table_offset {
                return Err(cf(
                    20,
                    4,
                    format!(
                        "payload {file_offset}+{stored_len} runs into the entry table at {}",
                        h.table_offset
                    ),
                ));
            }
            next_payload = end;
            chunks.push(ChunkInfo {
                logical_offset,
                logical_len,
                file_offset,
                stored_len,
                codec: ccodec,
                crc32c_stored,
                crc32c_logical,
            });
        }
        next_chunk = chunk_end;
        out.push(EntryInfo {
            name: name.to_string(),
            size,
            codec,
            chunk_size,
            chunks,
        });
    }
    if next_chunk != h.chunk_count as u64 {
        return Err(fault.corrupt(
            48,
            4,
            format!(
                "header says {} chunks, the entries have {next_chunk}",
                h.chunk_count
            ),
        ));
    }
    if next_name != h.names_len as u64 {
        return Err(fault.corrupt(
            52,
            4,
            format!(
                "header says {} bytes of names, the entries use {next_name}",
                h.names_len
            ),
        ));
    }
    let want_table = align_up(next_payload, h.align).unwrap_or(u64::MAX);
    if h.table_offset != want_table {
        return Err(fault.corrupt(
            32,
            8,
            format!(
                "entry table at {}, expected {want_table} (right after the last payload, aligned)",
                h.table_offset
            ),
        ));
    }
    Ok(out)
}

/// Entry names are relative paths, `/`-separated, so that unpacking can place them under a directory
/// and nothing else: no empty, `.` or `..` component, no leading `/`, no NUL or backslash.
pub fn check_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > NAME_LEN_MAX as usize {
        return Err("is longer than 4096 bytes");
    }
    if name.contains('\0') {
        return Err("contains a NUL byte");
    }
    if name.contains('\\') {
        return Err("contains a backslash (names use '/')");
    }
    if name.starts_with('/') {
        return Err("is absolute (names are relative paths)");
    }
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("has an empty, '.' or '..' path component");
    }
    Ok(())
}

/// Encodes the entry table and the header for `entries`, whose chunks were written in table order.
pub(crate) fn encode_table(entries: &[EntryInfo]) -> Result<(Vec<u8>, u32, u32, u32)> {
    let chunk_count: u64 = entries.iter().map(|e| e.chunks.len() as u64).sum();
    let names_len: u64 = entries.iter().map(|e| e.name.len() as u64).sum();
    let table_len = entries.len() as u64 * ENTRY_RECORD + chunk_count * CHUNK_RECORD + names_len;
    if table_len > TABLE_LEN_MAX || entries.len() as u64 > u32::MAX as u64 {
        return Err(Error::invalid(format!(
            "{} entries with {chunk_count} chunks need an entry table of {table_len} bytes, over the limit of {TABLE_LEN_MAX}: use a larger chunk size",
            entries.len()
        )));
    }
    let mut t = Vec::with_capacity(table_len as usize);
    let mut first_chunk = 0u32;
    let mut name_offset = 0u32;
    for e in entries {
        t.extend_from_slice(&e.size.to_le_bytes());
        t.extend_from_slice(&first_chunk.to_le_bytes());
        t.extend_from_slice(&(e.chunks.len() as u32).to_le_bytes());
        t.extend_from_slice(&e.chunk_size.to_le_bytes());
        t.extend_from_slice(&name_offset.to_le_bytes());
        t.extend_from_slice(&(e.name.len() as u32).to_le_bytes());
        t.extend_from_slice(&[e.codec.id(), 0, 0, 0]);
        first_chunk += e.chunks.len() as u32;
        name_offset += e.name.len() as u32;
    }
    for e in entries {
        for c in &e.chunks {
            t.extend_from_slice(&c.logical_offset.to_le_bytes());
            t.extend_from_slice(&c.file_offset.to_le_bytes());
            t.extend_from_slice(&c.logical_len.to_le_bytes());
            t.extend_from_slice(&c.stored_len.to_le_bytes());
            t.extend_from_slice(&c.crc32c_stored.to_le_bytes());
            t.extend_from_slice(&c.crc32c_logical.to_le_bytes());
            t.extend_from_slice(&[c.codec.id(), 0, 0, 0, 0, 0, 0, 0]);
        }
    }
    for e in entries {
        t.extend_from_slice(e.name.as_bytes());
    }
    debug_assert_eq!(t.len() as u64, table_len);
    Ok((
        t,
        chunk_count as u32,
        names_len as u32,
        entries.len() as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "dir/file.bin", "a b/ü/c:d"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/./b",
            "../x",
            "a/..",
            "x\\y",
            "nul\0",
            "trailing/",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value docs/format.md gives.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn header_bytes_are_where_the_format_says() {
        let h = Header {
            version: 1,
            header_len: 64,
            flags: 0,
            align: 4096,
            file_len: 0x1122_3344_5566_7788,
            table_offset: 0x0102_0304_0506_0708,
            table_len: 0xA1A2_A3A4,
            entry_count: 0xB1B2_B3B4,
            chunk_count: 0xC1C2_C3C4,
            names_len: 0xD1D2_D3D4,
            table_crc32c: 0xE1E2_E3E4,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], b"\x89GPUPK\r\n");
        assert_eq!(le32(&b, 8), 1);
        assert_eq!(le32(&b, 12), 64);
        assert_eq!(le32(&b, 20), 4096);
        assert_eq!(le64(&b, 24), 0x1122_3344_5566_7788);
        assert_eq!(le64(&b, 32), 0x0102_0304_0506_0708);
        assert_eq!(le32(&b, 40), 0xA1A2_A3A4);
        assert_eq!(le32(&b, 44), 0xB1B2_B3B4);
        assert_eq!(le32(&b, 48), 0xC1C2_C3C4);
        assert_eq!(le32(&b, 52), 0xD1D2_D3D4);
        assert_eq!(le32(&b, 56), 0xE1E2_E3E4);
        assert_eq!(le32(&b, 60), crc32c(&b[..60]));
    }

    #[test]
    fn header_round_trip_and_crc() {
        let h = Header {
            version: VERSION,
            header_len: HEADER_LEN,
            flags: 0,
            align: 4096,
            file_len: 4096 + 32,
            table_offset: 4096,
            table_len: 32 + 1,
            entry_count: 1,
            chunk_count: 0,
            names_len: 1,
            table_crc32c: 7,
        };
        let bytes = h.encode();
        assert!(has_magic(&bytes));
        let mut file = bytes.to_vec();
        file.resize(4096 + 33, 0);
        let path = Path::new("/x.gpk");
        let fault = Fault { path };
        let mut read = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&file[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let mut h2 = h;
        h2.file_len = 4096 + 33;
        let bytes2 = h2.encode();
        let mut file2 = bytes2.to_vec();
        file2.resize(4096 + 33, 0);
        let mut read2 = |off: u64, buf: &mut [u8]| -> Result<()> {
            buf.copy_from_slice(&file2[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        assert_eq!(parse_header(&fault, 4096 + 33, &mut read2).unwrap(), h2);
        // file_len disagrees with the real length.
        let e = parse_header(&fault, 4096 + 33, &mut read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.offset(), Some(24));
    }
}
