//! Compressed chunked packs with inline, random-access decompression (Metal's fast resource loading,
//! with integrity).
//!
//! A pack holds named entries (files). Each entry is cut into chunks (64 KiB by default) compressed
//! alone with one codec — lz4, zstd, zlib, xz or lzfse — or stored raw when that does not make them
//! smaller; every chunk carries a CRC-32C of its stored and of its decompressed bytes. Any logical
//! byte range of an entry can be loaded through a gpuio command queue: only the chunks it touches are
//! read (adjacent ones in one I/O), and they are decompressed in parallel, on a pool of worker threads,
//! straight into the destination. The format is in `docs/format.md`; each compressed payload is a
//! standard stream of its codec, so other tools can decode any chunk alone.
//!
//! ```
//! use gpuio::{AlignedBuf, IoQueue, QueueDesc};
//! use gpuio_pack::{pack_files, Codec, Pack, PackOptions};
//! # let dir = tempfile::tempdir().unwrap();
//! # let input = dir.path().join("weights.bin");
//! # std::fs::write(&input, b"0123456789".repeat(100_000)).unwrap();
//! let out = dir.path().join("assets.gpk");
//! let opts = PackOptions { codec: Codec::Zstd, ..PackOptions::default() };
//! let summary = pack_files(&[("weights.bin".into(), input)], &out, &opts, &mut |_, _| {})?;
//! assert!(summary.stored_bytes < summary.logical_bytes);
//!
//! let pack = Pack::open(&out)?;
//! let entry = pack.entry("weights.bin")?;
//! let queue = IoQueue::new(QueueDesc::default())?;
//! let buf = entry.load(&queue, 5, AlignedBuf::new(100_000, 4096)?)?.wait()?;
//! assert_eq!(&buf[..5], b"56789");
//! # Ok::<(), gpuio::Error>(())
//! ```
//!
//! Memory: a load stages at most [`STAGING_BYTES_MAX`] of stored bytes at once (a load of any size
//! streams); staging buffers are recycled process-wide, up to 64 MiB kept idle; the decompression pool
//! ([`decode_threads`], one thread per core) is started on first use and shared by every pack.
//!
//! This crate never writes into an existing pack (packs are rewritten whole, atomically) and never
//! decompresses on the gpuio engine thread: a read's completion callback only hands the staged chunks
//! to the pool.

mod codec;
pub mod format;
mod pool;
mod reader;
mod source;
mod staging;
mod writer;

use std::path::PathBuf;

pub use codec::Codec;
pub use format::{ChunkInfo, EntryInfo};
pub use pool::decode_threads;
pub use reader::{Entry, LoadStats, Pack, PackLoad, GROUP_BYTES_MAX, STAGING_BYTES_MAX};
pub use source::EntrySource;
pub use writer::{inputs_from_paths, pack_files, PackOptions, PackSummary};

/// Splits `"PACK:ENTRY"` when the part before a `':'` is an existing pack file: the last `':'` first,
/// then earlier ones (so entry names may contain `':'`). `None` when `s` itself names an existing
/// path, or no prefix is a pack. A prefix that is a regular file this process may not read counts as
/// a pack, so that opening it reports why (permission denied) rather than "not found".
pub fn split_pack_path(s: &str) -> Option<(PathBuf, String)> {
    if std::path::Path::new(s).exists() {
        return None;
    }
    s.char_indices()
        .filter(|&(_, ch)| ch == ':')
        .map(|(i, _)| i)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find_map(|i| {
            let (pack, entry) = (&s[..i], &s[i + 1..]);
            let path = PathBuf::from(pack);
            let is_pack = match Pack::probe_magic(&path) {
                Ok(yes) => yes,
                Err(e) => e.kind() == gpuio::ErrorKind::PermissionDenied,
            };
            (!pack.is_empty() && path.is_file() && is_pack).then(|| (path, entry.to_string()))
        })
}
