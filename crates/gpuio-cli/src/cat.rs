//! `gpuio cat FILE [--offset N] [--length N]`: streams a byte range to stdout through the engine, a few
//! loads in flight at once. Handy, and an end-to-end test of the read path.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use gpuio::{DirectMode, Engine, EngineConfig, Error, ErrorKind, OpenOptions, QueueDesc, Result};

/// Bytes per load, and loads kept in flight.
const CHUNK_BYTES: usize = 1 << 20;
const LOADS_IN_FLIGHT: usize = 4;

#[derive(Args, Debug)]
pub struct CatArgs {
    file: PathBuf,
    /// First byte to print.
    #[arg(long, value_parser = crate::parse_size, default_value = "0")]
    offset: u64,
    /// Bytes to print; default: to the end of the file. Asking for bytes past the end is an error.
    #[arg(long, value_parser = crate::parse_size)]
    length: Option<u64>,
    #[arg(long, default_value = "auto")]
    direct: DirectMode,
}

pub fn run(a: CatArgs) -> Result<()> {
    let file = OpenOptions::read().direct(a.direct).open(&a.file)?;
    let size = file.len()?;
    if a.offset > size {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "offset {} is beyond the end of the file ({size} bytes)",
                a.offset
            ),
        )
        .with_path(&a.file));
    }
    let end = match a.length {
        None => size,
        Some(l) => a
            .offset
            .checked_add(l)
            .ok_or_else(|| Error::invalid(format!("offset {} + length {l} overflows", a.offset)))?,
    };
    let engine = Engine::new(EngineConfig::default())?;
    let queue = engine.queue(QueueDesc::serial())?;
    let pool = engine.buffer_pool(CHUNK_BYTES, LOADS_IN_FLIGHT + 1)?;
    let mut out = std::io::stdout().lock();
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
        let buf = done.take_buffer(id).expect("load returns its buffer");
        if let Err(e) = out.write_all(&buf) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(()); // the reader has had enough (e.g. `| head`)
            }
            return Err(Error::from_io(gpuio::error::Op::Write, &e)
                .with_path(std::path::Path::new("<stdout>")));
        }
    }
    out.flush()
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| {
            Error::from_io(gpuio::error::Op::Write, &e).with_path(std::path::Path::new("<stdout>"))
        })
}
