//! `gpuio cat FILE|PACK:ENTRY [--offset N] [--length N]`: streams a byte range to stdout through the
//! engine, a few loads in flight at once; for a pack entry only the chunks the range touches are read and
//! decompressed. Handy, and an end-to-end test of the read paths.
//!
//! The range is checked against the size before a byte is written: a range past the end fails with
//! nothing printed. A file that reports size 0 but has content (procfs, sysfs) is read sequentially
//! into memory (up to [`PSEUDO_BYTES_MAX`]) first; FIFOs, sockets and devices are refused unopened.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use gpuio::{DirectMode, Engine, EngineConfig, Error, ErrorKind, OpenOptions, QueueDesc, Result};

/// Bytes per load, and loads kept in flight.
const CHUNK_BYTES: usize = 1 << 20;
const LOADS_IN_FLIGHT: usize = 4;
/// Most bytes read from a file of unknown size (a pseudo-file), which is held in memory.
pub const PSEUDO_BYTES_MAX: u64 = 64 << 20;

#[derive(Args, Debug)]
pub struct CatArgs {
    /// A file, or an entry of a pack as PACK:ENTRY.
    file: String,
    /// First byte to print.
    #[arg(long, value_parser = crate::parse_size, default_value = "0")]
    offset: u64,
    /// Bytes to print; default: to the end. Asking for bytes past the end is an error.
    #[arg(long, value_parser = crate::parse_size)]
    length: Option<u64>,
    /// Direct I/O (O_DIRECT) for reading: auto (where the filesystem allows it), on or off.
    #[arg(long, default_value = "auto")]
    direct: DirectMode,
}

/// The end of the byte range `a` asks for, from a source of `size` bytes named `name`; a range that
/// does not fit is refused here, before anything is written.
fn range_end(a: &CatArgs, size: u64, name: &Path) -> Result<u64> {
    if a.offset > size {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("offset {} is beyond the end ({size} bytes)", a.offset),
        )
        .with_path(name));
    }
    let end = match a.length {
        None => size,
        Some(l) => a.offset.checked_add(l).ok_or_else(|| {
            Error::invalid(format!("offset {} + length {l} overflows", a.offset)).with_path(name)
        })?,
    };
    if end > size {
        return Err(Error::new(
            ErrorKind::UnexpectedEof,
            format!(
                "the range ends at {end}, past the end of file ({size} bytes); nothing was written"
            ),
        )
        .with_path(name)
        .with_range(a.offset, end - a.offset));
    }
    Ok(end)
}

/// A failed write to standard output as an error (a closed pipe included: see out.rs).
fn stdout_error(e: std::io::Error) -> Result<()> {
    Err(crate::out::stdout_error(&e))
}

pub fn run(a: CatArgs) -> Result<()> {
    let engine = Engine::new(EngineConfig::default())?;
    let queue = engine.queue(QueueDesc::serial())?;
    let mut out = std::io::stdout().lock();
    if let Some((pack_path, entry_name)) = gpuio_pack::split_pack_path(&a.file) {
        let pack = gpuio_pack::Pack::open_with(&pack_path, a.direct)?;
        let entry = pack.entry(&entry_name)?;
        let name = PathBuf::from(&a.file);
        let end = range_end(&a, entry.len(), &name)?;
        crate::pack_cmd::stream_entry(
            &entry,
            &queue,
            a.offset,
            end,
            &mut out,
            Path::new(crate::out::STDOUT_NAME),
            None,
        )
        .map_err(crate::out::from_stdout_write)?;
        return out.flush().or_else(stdout_error);
    }
    let path = PathBuf::from(&a.file);
    if let Some(p) = crate::stream::probe_input(&a.file)? {
        if p.kind == gpuio::input::Kind::Pseudo {
            crate::stream::sequential_direct_check(&path, a.direct)?;
            let bytes = gpuio::input::read_pseudo(&path, PSEUDO_BYTES_MAX)?;
            let end = range_end(&a, bytes.len() as u64, &path)?;
            if let Err(e) = out.write_all(&bytes[a.offset as usize..end as usize]) {
                return stdout_error(e);
            }
            return out.flush().or_else(stdout_error);
        }
    }
    let file = OpenOptions::read().direct(a.direct).open(&path)?;
    let end = range_end(&a, file.len()?, &path)?;
    let pool = engine.buffer_pool(CHUNK_BYTES, LOADS_IN_FLIGHT + 1)?;
    let mut inflight = VecDeque::new();
    let mut next = a.offset;
    loop {
        while inflight.len() < LOADS_IN_FLIGHT && next < end {
            let len = CHUNK_BYTES.min((end - next) as usize);
            let mut buf = pool.get();
            buf.set_len(len)?;
            let mut cb = queue.command_buffer();
            // Exact: a --length past the end of the file fails with the offset where data ran out.
            let id = cb.load(&file, next, buf)?;
            inflight.push_back((id, cb.commit()?));
            next += len as u64;
        }
        let Some((id, c)) = inflight.pop_front() else {
            break;
        };
        let mut done = c.finish()?;
        let buf = done.take_buffer(id).expect("a load returns its buffer");
        if let Err(e) = out.write_all(&buf) {
            return stdout_error(e);
        }
    }
    out.flush().or_else(stdout_error)
}
