//! fio-style verify patterns: data that says where it belongs and when it was written.
//!
//! A [`Pattern`] divides a file into blocks of `block` bytes at offsets that are multiples of `block`.
//! Each block starts with a 32-byte header followed by a payload of seeded pseudo-random bytes:
//!
//! | bytes  | field        | meaning                                                        |
//! |--------|--------------|----------------------------------------------------------------|
//! | 0..4   | `magic`      | [`MAGIC`], little-endian                                       |
//! | 4..8   | `len`        | the block size (header included), u32                          |
//! | 8..16  | `offset`     | the file offset of the block's first byte, u64                 |
//! | 16..24 | `generation` | which write of the block this is (a sequence number), u64      |
//! | 24..28 | `data_crc`   | CRC-32C (iSCSI) of the payload, bytes `32..len`                 |
//! | 28..32 | `head_crc`   | CRC-32C of header bytes `0..28`                                 |
//!
//! The payload is a function of (pattern seed, offset, generation), so every byte of any file range is
//! known in advance: [`Pattern::fill`] writes any range, block-aligned or not, and [`Pattern::verify`]
//! checks any range. Because the header names the offset and the generation, a misdirected block (right
//! data, wrong place), a stale block (a lost write), and a torn block (header and payload from different
//! writes) are each reported as such, not only a flipped bit (STYLE item 8).
//!
//! This is test code: it never touches files itself; callers move the bytes.

use std::fmt;

use crate::rng::{mix64, Rng};

/// First four bytes of every block header ("GPVF" read as little-endian ASCII).
pub const MAGIC: u32 = u32::from_le_bytes(*b"GPVF");
/// Bytes of header at the start of every block.
pub const HEADER_LEN: usize = 32;
/// Smallest block a pattern accepts (header plus 32 bytes of payload).
pub const BLOCK_MIN: usize = 64;
/// Largest block a pattern accepts.
pub const BLOCK_MAX: usize = 1 << 30;

/// CRC-32C (Castagnoli, the iSCSI polynomial), as used in the headers.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// A decoded block header whose magic and header CRC are right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub offset: u64,
    pub generation: u64,
    pub data_crc: u32,
}

impl Header {
    /// Decodes the header at the start of `bytes` (at least [`HEADER_LEN`] bytes), checking the magic
    /// and the header CRC.
    pub fn decode(bytes: &[u8]) -> Result<Header, Problem> {
        let h = bytes
            .get(..HEADER_LEN)
            .ok_or(Problem::BadMagic { found: 0 })?;
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(Problem::BadMagic { found: magic });
        }
        let stored = u32_at(28);
        let computed = crc32c(&h[..28]);
        if stored != computed {
            return Err(Problem::BadHeaderCrc { stored, computed });
        }
        Ok(Header {
            len: u32_at(4),
            offset: u64_at(8),
            generation: u64_at(16),
            data_crc: u32_at(24),
        })
    }

    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..28].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c(&out[..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
    }
}

/// What is wrong with one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No header where one belongs (zeros from a hole or a lost write, or garbage).
    BadMagic { found: u32 },
    /// The header's own CRC fails: a flipped bit in it, or a header torn between two writes.
    BadHeaderCrc { stored: u32, computed: u32 },
    /// The header is intact but records another block size.
    WrongLength { expected: u32, found: u32 },
    /// An intact block that belongs at another file offset: a misdirected write or read.
    Misdirected { found_offset: u64 },
    /// An intact block from another generation: `found < expected` is a stale block (a lost write).
    WrongGeneration { expected: u64, found: u64 },
    /// The header is right but the payload fails its CRC: a flipped bit, or a torn write.
    BadPayloadCrc { stored: u32, computed: u32 },
    /// A byte differs from the pattern although every check above passed or could not run (the buffer
    /// holds only part of the block, or the payload comes from another pattern seed).
    Mismatch {
        file_offset: u64,
        expected: u8,
        found: u8,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::BadMagic { found } => {
                write!(f, "no block header: magic {found:#010x}, expected {MAGIC:#010x}")
            }
            Problem::BadHeaderCrc { stored, computed } => write!(
                f,
                "header CRC-32C {computed:#010x} does not match the stored {stored:#010x} (corrupt or torn header)"
            ),
            Problem::WrongLength { expected, found } => {
                write!(f, "header says block length {found}, expected {expected}")
            }
            Problem::Misdirected { found_offset } => write!(
                f,
                "misdirected: the block there belongs at file offset {found_offset}"
            ),
            Problem::WrongGeneration { expected, found } => write!(
                f,
                "{}: generation {found} found, {expected} expected",
                if found < expected {
                    "stale block (lost write)"
                } else {
                    "block from a newer generation"
                }
            ),
            Problem::BadPayloadCrc { stored, computed } => write!(
                f,
                "payload CRC-32C {computed:#010x} does not match the header's {stored:#010x} (corrupt or torn block)"
            ),
            Problem::Mismatch {
                file_offset,
                expected,
                found,
            } => write!(
                f,
                "byte at file offset {file_offset} is {found:#04x}, expected {expected:#04x}"
            ),
        }
    }
}

/// A block that failed verification: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// File offset of the failing block's first byte.
    pub block_offset: u64,
    /// Position of the failing block among the blocks the checked range overlaps (0 = first).
    pub block_index: usize,
    pub problem: Problem,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "verify failed in block {} (file offset {}): {}",
            self.block_index, self.block_offset, self.problem
        )
    }
}

impl std::error::Error for VerifyError {}

/// A verify pattern: block size and seed. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    block: usize,
    seed: u64,
}

impl Pattern {
    /// A pattern of `block`-byte blocks whose payloads derive from `seed`.
    ///
    /// # Panics
    /// If `block` is outside [`BLOCK_MIN`]`..=`[`BLOCK_MAX`] (a test-setup mistake).
    pub fn new(block: usize, seed: u64) -> Pattern {
        assert!(
            (BLOCK_MIN..=BLOCK_MAX).contains(&block),
            "verify block size {block} is outside {BLOCK_MIN}..={BLOCK_MAX}"
        );
        Pattern { block, seed }
    }

    pub fn block(&self) -> usize {
        self.block
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Writes the whole block that starts at `block_offset` (a multiple of the block size) into `out`
    /// (exactly one block long).
    fn write_block(&self, out: &mut [u8], block_offset: u64, generation: u64) {
        debug_assert_eq!(out.len(), self.block);
        let mut rng = Rng::new(self.seed ^ mix64(block_offset ^ mix64(generation)));
        let payload = &mut out[HEADER_LEN..];
        rng.fill(payload);
        let header = Header {
            len: self.block as u32,
            offset: block_offset,
            generation,
            data_crc: crc32c(payload),
        };
        header.encode(&mut out[..HEADER_LEN]);
    }

    /// The whole block at `block_offset` for `generation`.
    pub fn block_bytes(&self, block_offset: u64, generation: u64) -> Vec<u8> {
        let mut v = vec![0u8; self.block];
        self.write_block(&mut v, block_offset, generation);
        v
    }

    /// Calls `f(block_offset, range_in_block, range_in_buf)` for each block that the file range
    /// `file_offset..file_offset+len` overlaps.
    fn for_blocks(
        &self,
        file_offset: u64,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>, std::ops::Range<usize>) -> bool,
    ) {
        let b = self.block as u64;
        let end = file_offset + len as u64;
        let mut pos = file_offset;
        while pos < end {
            let block_offset = pos - pos % b;
            let in_block = (pos - block_offset) as usize;
            let n = ((block_offset + b).min(end) - pos) as usize;
            let in_buf = (pos - file_offset) as usize;
            if !f(block_offset, in_block..in_block + n, in_buf..in_buf + n) {
                return;
            }
            pos += n as u64;
        }
    }

    /// Fills `buf` with the bytes the pattern puts at file range `file_offset..+buf.len()` for
    /// `generation`. Any offset and length: partial blocks at either end get their share.
    pub fn fill(&self, buf: &mut [u8], file_offset: u64, generation: u64) {
        let mut scratch = Vec::new();
        self.for_blocks(file_offset, buf.len(), |block_offset, in_block, in_buf| {
            if in_block.len() == self.block {
                self.write_block(&mut buf[in_buf], block_offset, generation);
            } else {
                scratch.resize(self.block, 0);
                self.write_block(&mut scratch, block_offset, generation);
                buf[in_buf].copy_from_slice(&scratch[in_block]);
            }
            true
        });
    }

    /// The bytes at file range `file_offset..+len` for `generation`.
    pub fn bytes(&self, file_offset: u64, len: usize, generation: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v, file_offset, generation);
        v
    }

    /// Diagnoses one block (or the part of it in `found`) whose bytes differ from `expected`.
    fn diagnose(
        &self,
        found: &[u8],
        expected: &[u8],
        block_offset: u64,
        in_block: std::ops::Range<usize>,
        generation: u64,
    ) -> Problem {
        let whole_header = in_block.start == 0 && found.len() >= HEADER_LEN;
        if whole_header {
            match Header::decode(found) {
                Err(p) => return p,
                Ok(h) => {
                    if h.len as usize != self.block {
                        return Problem::WrongLength {
                            expected: self.block as u32,
                            found: h.len,
                        };
                    }
                    if h.offset != block_offset {
                        return Problem::Misdirected {
                            found_offset: h.offset,
                        };
                    }
                    if h.generation != generation {
                        return Problem::WrongGeneration {
                            expected: generation,
                            found: h.generation,
                        };
                    }
                    if found.len() == self.block {
                        let computed = crc32c(&found[HEADER_LEN..]);
                        if computed != h.data_crc {
                            return Problem::BadPayloadCrc {
                                stored: h.data_crc,
                                computed,
                            };
                        }
                    }
                }
            }
        }
        let i = found
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        Problem::Mismatch {
            file_offset: block_offset + (in_block.start + i) as u64,
            expected: expected[i],
            found: found[i],
        }
    }

    /// Checks that `buf` holds exactly what the pattern puts at `file_offset..+buf.len()` for
    /// `generation`; on the first bad block, says which block and what is wrong with it.
    pub fn verify(&self, buf: &[u8], file_offset: u64, generation: u64) -> Result<(), VerifyError> {
        match self
            .check(buf, file_offset, generation, true)
            .into_iter()
            .next()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Like [`verify`](Self::verify), but reports every bad block.
    pub fn verify_all(&self, buf: &[u8], file_offset: u64, generation: u64) -> Vec<VerifyError> {
        self.check(buf, file_offset, generation, false)
    }

    fn check(
        &self,
        buf: &[u8],
        file_offset: u64,
        generation: u64,
        first_only: bool,
    ) -> Vec<VerifyError> {
        let mut errors = Vec::new();
        let mut expected = vec![0u8; self.block];
        let mut index = 0;
        self.for_blocks(file_offset, buf.len(), |block_offset, in_block, in_buf| {
            self.write_block(&mut expected, block_offset, generation);
            let found = &buf[in_buf];
            let want = &expected[in_block.clone()];
            if found != want {
                errors.push(VerifyError {
                    block_offset,
                    block_index: index,
                    problem: self.diagnose(found, want, block_offset, in_block, generation),
                });
            }
            index += 1;
            errors.is_empty() || !first_only
        });
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = 4096;

    fn good(p: &Pattern, off: u64, blocks: usize, generation: u64) -> Vec<u8> {
        let mut v = vec![0u8; blocks * p.block()];
        p.fill(&mut v, off, generation);
        v
    }

    #[test]
    fn a_good_buffer_verifies_and_headers_decode() {
        let p = Pattern::new(B, 11);
        let v = good(&p, 8 * B as u64, 4, 3);
        p.verify(&v, 8 * B as u64, 3).unwrap();
        let h = Header::decode(&v[B..]).unwrap();
        assert_eq!(h.offset, 9 * B as u64);
        assert_eq!(h.generation, 3);
        assert_eq!(h.len as usize, B);
        assert_eq!(h.data_crc, crc32c(&v[B + HEADER_LEN..2 * B]));
    }

    #[test]
    fn crc32c_is_the_iscsi_polynomial() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn flipped_payload_byte_is_caught_with_its_block() {
        let p = Pattern::new(B, 1);
        let mut v = good(&p, 0, 4, 1);
        v[2 * B + 100] ^= 0x01;
        let e = p.verify(&v, 0, 1).unwrap_err();
        assert_eq!(e.block_index, 2);
        assert_eq!(e.block_offset, 2 * B as u64);
        assert!(
            matches!(e.problem, Problem::BadPayloadCrc { .. }),
            "{e}: {:?}",
            e.problem
        );
        assert!(e.to_string().contains("file offset 8192"), "{e}");
    }

    #[test]
    fn flipped_header_byte_is_caught() {
        let p = Pattern::new(B, 1);
        let mut v = good(&p, 0, 2, 1);
        v[B + 9] ^= 0x80; // inside the offset field
        let e = p.verify(&v, 0, 1).unwrap_err();
        assert_eq!(e.block_index, 1);
        assert!(
            matches!(e.problem, Problem::BadHeaderCrc { .. }),
            "{:?}",
            e.problem
        );
        let mut v = good(&p, 0, 2, 1);
        v[0] ^= 0xFF; // the magic
        let e = p.verify(&v, 0, 1).unwrap_err();
        assert!(
            matches!(e.problem, Problem::BadMagic { .. }),
            "{:?}",
            e.problem
        );
    }

    #[test]
    fn swapped_blocks_are_reported_misdirected() {
        let p = Pattern::new(B, 5);
        let mut v = good(&p, 0, 4, 1);
        let (a, b) = v.split_at_mut(2 * B);
        a[B..2 * B].swap_with_slice(&mut b[..B]);
        let errs = p.verify_all(&v, 0, 1);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].block_offset, B as u64);
        assert_eq!(
            errs[0].problem,
            Problem::Misdirected {
                found_offset: 2 * B as u64
            }
        );
        assert_eq!(errs[1].block_offset, 2 * B as u64);
        assert_eq!(
            errs[1].problem,
            Problem::Misdirected {
                found_offset: B as u64
            }
        );
    }

    #[test]
    fn an_old_generation_is_reported_stale() {
        let p = Pattern::new(B, 5);
        let mut v = good(&p, 0, 3, 2);
        // Block 1 missed its second write: it still holds generation 1.
        p.fill(&mut v[B..2 * B], B as u64, 1);
        let e = p.verify(&v, 0, 2).unwrap_err();
        assert_eq!(e.block_index, 1);
        assert_eq!(
            e.problem,
            Problem::WrongGeneration {
                expected: 2,
                found: 1
            }
        );
        assert!(e.to_string().contains("stale"), "{e}");
    }

    #[test]
    fn a_torn_block_is_caught() {
        let p = Pattern::new(B, 5);
        let mut v = good(&p, 0, 1, 2);
        // The first 512 bytes (with the header) are new, the rest is still generation 1.
        let old = p.bytes(0, B, 1);
        v[512..].copy_from_slice(&old[512..]);
        let e = p.verify(&v, 0, 2).unwrap_err();
        assert!(
            matches!(e.problem, Problem::BadPayloadCrc { .. }),
            "{:?}",
            e.problem
        );
    }

    #[test]
    fn zeros_are_not_a_block() {
        let p = Pattern::new(B, 5);
        let v = vec![0u8; B];
        let e = p.verify(&v, 0, 1).unwrap_err();
        assert_eq!(e.problem, Problem::BadMagic { found: 0 });
    }

    #[test]
    fn another_seed_is_caught_even_with_valid_crcs() {
        let p = Pattern::new(B, 5);
        let q = Pattern::new(B, 6);
        let v = good(&q, 0, 1, 1);
        let e = p.verify(&v, 0, 1).unwrap_err();
        assert!(
            matches!(e.problem, Problem::Mismatch { .. }),
            "{:?}",
            e.problem
        );
    }

    #[test]
    fn unaligned_ranges_fill_and_verify() {
        let p = Pattern::new(512, 9);
        let whole = p.bytes(0, 512 * 8, 4);
        for (off, len) in [
            (0usize, 1usize),
            (100, 1000),
            (511, 2),
            (700, 3000),
            (4000, 96),
        ] {
            let part = p.bytes(off as u64, len, 4);
            assert_eq!(part, &whole[off..off + len], "{off}+{len}");
            p.verify(&part, off as u64, 4).unwrap();
            // A flipped byte in a partial block is still located.
            let mut bad = part.clone();
            let i = len / 2;
            bad[i] ^= 0x40;
            let e = p.verify(&bad, off as u64, 4).unwrap_err();
            let at = (off + i) as u64;
            assert_eq!(e.block_offset, at - at % 512, "{e}");
        }
        // A partial block that holds a whole header still names a stale generation.
        let stale = p.bytes(1024, 100, 3);
        let e = p.verify(&stale, 1024, 4).unwrap_err();
        assert_eq!(
            e.problem,
            Problem::WrongGeneration {
                expected: 4,
                found: 3
            }
        );
    }

    #[test]
    fn empty_range_verifies() {
        let p = Pattern::new(B, 1);
        p.verify(&[], 12345, 1).unwrap();
        assert!(p.bytes(5, 0, 1).is_empty());
    }
}
