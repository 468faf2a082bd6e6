//! Writing packs: files in, one pack out, compressed in parallel, replaced atomically.
//!
//! The calling thread hands chunk jobs to `threads` workers (each reads its chunk from the input with
//! `pread`, checksums it, compresses it) and writes the results in table order, a bounded window of
//! chunks at a time. The pack is written to a temporary file beside the output, synced, renamed over
//! the output, and the directory synced: a crash leaves either the old file or the complete new one.
//!
//! Inputs are checked without blocking before anything is written (`gpuio::input::probe`): FIFOs,
//! sockets and devices are refused unopened, the output itself is refused as an input, and a
//! pseudo-file (procfs, sysfs: size 0 in `stat`, content when read) is read whole into memory, up to
//! [`PSEUDO_BYTES_MAX`] in all. An input file is opened when its first chunk is handed out and closed
//! when its last chunk is compressed, so at most a window of chunks' worth of inputs
//! ([`INPUTS_OPEN_MAX`] at most) is open at once, however many files a pack holds.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuio::error::Op;
use gpuio::input::{FileId, Kind};
use gpuio::{Error, ErrorKind, ReplaceFile, Result};

use crate::codec::{self, Codec};
use crate::format::{
    self, align_up, check_name, crc32c, ChunkInfo, EntryInfo, Header, ALIGN_MAX, CHUNK_RECORD,
    CHUNK_SIZE_MAX, CHUNK_SIZE_MIN, ENTRY_RECORD, HEADER_LEN, TABLE_LEN_MAX, VERSION,
};

/// How to write a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    pub codec: Codec,
    /// Compression level (zstd: its range, default 3; zlib and xz: 0..=9, default 6). Codecs without
    /// levels (none, lz4, lzfse) refuse one.
    pub level: Option<i32>,
    /// Logical bytes per chunk, the unit of random access (512 B ..= 256 MiB; default 64 KiB).
    pub chunk_size: u32,
    /// Payload alignment in the file (a power of two up to 1 MiB; default 4096, so that reads of
    /// chunks can go direct). 1 packs payloads back to back.
    pub align: u32,
    /// Compression threads (0: one per core; the default).
    pub threads: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            codec: Codec::Lz4,
            level: None,
            chunk_size: 64 << 10,
            align: 4096,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// What [`pack_files`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    pub entries: usize,
    /// Bytes of the inputs.
    pub logical_bytes: u64,
    /// Bytes of chunk payloads in the pack (without header, table and padding).
    pub stored_bytes: u64,
    /// Length of the pack file.
    pub file_bytes: u64,
    pub elapsed: Duration,
}

const THREADS_MAX: usize = 1024;
/// Most bytes read into memory from inputs of unknown size (pseudo-files) for one pack.
pub const PSEUDO_BYTES_MAX: u64 = 64 << 20;
/// Most chunks in flight between the calling thread and the workers, and so the most input files
/// open at once.
pub const INPUTS_OPEN_MAX: usize = 512;

/// Where an entry's bytes come from.
enum Input {
    /// A regular file, opened when its turn comes; its identity, checked again then.
    File(FileId),
    /// The whole content of a pseudo-file, read up front.
    Bytes(Arc<[u8]>),
}

/// What a chunk job reads from.
#[derive(Clone)]
enum JobData {
    File(Arc<fs::File>),
    Bytes(Arc<[u8]>),
}

/// Packs files as named entries into `out`: `inputs` are (entry name, file) pairs. The pack is written
/// through a [`ReplaceFile`] (a temporary file in `out`'s directory, synced, renamed over `out`, the
/// directory synced), so a crash never leaves a partial pack at `out`. Compression runs on `opts.threads` threads.
/// `progress(done_logical_bytes, total_logical_bytes)` is called now and then from the calling thread.
///
/// Entry names are relative `/`-separated paths without empty, `.` or `..` components (so that
/// unpacking can only create files under its target directory), unique within the pack.
pub fn pack_files(
    inputs: &[(String, PathBuf)],
    out: &Path,
    opts: &PackOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackSummary> {
    let started = Instant::now();
    let level = opts.codec.resolve_level(opts.level)?;
    if !(CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX).contains(&opts.chunk_size) {
        return Err(Error::invalid(format!(
            "chunk size {} is out of range {CHUNK_SIZE_MIN}..={CHUNK_SIZE_MAX}",
            opts.chunk_size
        )));
    }
    if !opts.align.is_power_of_two() || opts.align > ALIGN_MAX {
        return Err(Error::invalid(format!(
            "alignment {} is not a power of two up to {ALIGN_MAX}",
            opts.align
        )));
    }
    let threads = match opts.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n.min(THREADS_MAX),
    };

    // Inputs: names, kinds, sizes; nothing kept open.
    let out_id = FileId::of_path(out)?;
    let mut seen = std::collections::HashSet::new();
    let mut sources = Vec::with_capacity(inputs.len());
    let mut entries: Vec<EntryInfo> = Vec::with_capacity(inputs.len());
    let mut pseudo_bytes = 0u64;
    for (name, path) in inputs {
        if let Err(why) = check_name(name) {
            return Err(Error::invalid(format!("entry name {name:?} {why}")).with_path(path));
        }
        if !seen.insert(name.as_str()) {
            return Err(
                Error::invalid(format!("entry name {name:?} is given twice")).with_path(path),
            );
        }
        let p = gpuio::input::probe(path)?;
        if Some(p.id) == out_id {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "is the output pack itself: it would be replaced while being read",
            )
            .with_op(Op::Open)
            .with_path(path));
        }
        let (source, size) = match p.kind {
            Kind::Regular => (Input::File(p.id), p.size),
            Kind::Pseudo => {
                let bytes = gpuio::input::read_pseudo(path, PSEUDO_BYTES_MAX - pseudo_bytes)?;
                pseudo_bytes += bytes.len() as u64;
                let len = bytes.len() as u64;
                (Input::Bytes(bytes.into()), len)
            }
            Kind::BlockDevice => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "a block device, not a regular file: packs take regular files",
                )
                .with_op(Op::Open)
                .with_path(path))
            }
            other => return Err(gpuio::input::refusal(other, path)),
        };
        sources.push(source);
        entries.push(EntryInfo {
            name: name.clone(),
            size,
            codec: opts.codec,
            chunk_size: opts.chunk_size,
            chunks: Vec::new(),
        });
    }
    let total_chunks: u64 = entries
        .iter()
        .map(|e| e.size.div_ceil(opts.chunk_size as u64))
        .sum();
    let names_len: u64 = entries.iter().map(|e| e.name.len() as u64).sum();
    let table_len = entries.len() as u64 * ENTRY_RECORD + total_chunks * CHUNK_RECORD + names_len;
    if table_len > TABLE_LEN_MAX {
        return Err(Error::invalid(format!(
            "{} entries in {total_chunks} chunks need an entry table of {table_len} bytes, over the limit of {TABLE_LEN_MAX}: use a larger chunk size",
            entries.len()
        )));
    }
    let logical_total: u64 = entries.iter().map(|e| e.size).sum();
    progress(0, logical_total);

    let tmp = ReplaceFile::create(out)?;
    let werr = |e: std::io::Error| Error::from_io(Op::Write, &e).with_path(tmp.temp_path());
    let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
    w.write_all(&[0u8; HEADER_LEN as usize]).map_err(werr)?;
    let mut pos = HEADER_LEN as u64;
    let mut stored_total = 0u64;

    // Chunk jobs in table order; `seq` numbers them.
    let mut order = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        order.push((i, e.size.div_ceil(opts.chunk_size as u64)));
    }
    let window = (threads * 4).clamp(4, INPUTS_OPEN_MAX) as u64;
    let chunk_size = opts.chunk_size;
    let codec = opts.codec;
    let done_bytes = AtomicU64::new(0);

    std::thread::scope(|scope| -> Result<()> {
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(window as usize);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<(u64, Result<Done>)>();
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            scope.spawn(move || {
                let (mut input, mut check) = (Vec::new(), Vec::new());
                while let Ok(job) = job_rx.recv() {
                    let r = compress_job(
                        &job.data,
                        &inputs[job.entry].1,
                        &job,
                        codec,
                        level,
                        &mut input,
                        &mut check,
                    );
                    if done_tx.send((job.seq, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(job_rx);

        let mut jobs = order
            .iter()
            .flat_map(|&(entry, n)| (0..n).map(move |c| (entry, c)));
        let mut dispatched = 0u64;
        let mut written = 0u64;
        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        let mut last_report = Instant::now();
        // The input being handed out: opened at its first chunk, dropped here after its last (the
        // jobs in flight hold it until they are done).
        let mut current: Option<(usize, JobData)> = None;
        let result = (|| -> Result<()> {
            while written < total_chunks {
                while dispatched < total_chunks && dispatched - written < window {
                    let (entry, c) = jobs.next().expect("a job per chunk");
                    let offset = c * chunk_size as u64;
                    let len = (entries[entry].size - offset).min(chunk_size as u64) as u32;
                    if current.as_ref().map(|(e, _)| *e) != Some(entry) {
                        current = None;
                        current = Some((entry, open_input(&sources[entry], &inputs[entry].1)?));
                    }
                    let data = current.as_ref().expect("just opened").1.clone();
                    let job = Job {
                        seq: dispatched,
                        entry,
                        offset,
                        len,
                        data,
                    };
                    if job_tx.send(job).is_err() {
                        return Err(Error::new(ErrorKind::Io, "compression threads stopped"));
                    }
                    dispatched += 1;
                }
                let (seq, done) = done_rx
                    .recv()
                    .map_err(|_| Error::new(ErrorKind::Io, "compression threads stopped"))?;
                pending.insert(seq, done?);
                while let Some(d) = pending.remove(&written) {
                    let at = align_up(pos, opts.align).expect("file offsets fit u64");
                    write_zeros(&mut w, at - pos).map_err(werr)?;
                    w.write_all(&d.stored).map_err(werr)?;
                    pos = at + d.stored.len() as u64;
                    stored_total += d.stored.len() as u64;
                    entries[d.entry].chunks.push(ChunkInfo {
                        logical_offset: d.offset,
                        logical_len: d.logical_len,
                        file_offset: at,
                        stored_len: d.stored.len() as u32,
                        codec: d.codec,
                        crc32c_stored: d.crc_stored,
                        crc32c_logical: d.crc_logical,
                    });
                    written += 1;
                    let n = done_bytes.fetch_add(d.logical_len as u64, Ordering::Relaxed)
                        + d.logical_len as u64;
                    if last_report.elapsed() >= Duration::from_millis(50) {
                        progress(n, logical_total);
                        last_report = Instant::now();
                    }
                }
            }
            Ok(())
        })();
        drop(job_tx); // workers finish and the scope joins them
        result
    })?;

    // The entry table, after the last payload at the next aligned offset, then the header.
    let table_offset = align_up(pos, opts.align).expect("file offsets fit u64");
    write_zeros(&mut w, table_offset - pos).map_err(werr)?;
    let (table, chunk_count, names_len, entry_count) = format::encode_table(&entries)?;
    w.write_all(&table).map_err(werr)?;
    w.flush().map_err(werr)?;
    drop(w);
    let file_len = table_offset + table.len() as u64;
    let header = Header {
        version: VERSION,
        header_len: HEADER_LEN,
        flags: 0,
        align: opts.align,
        file_len,
        table_offset,
        table_len: table.len() as u32,
        entry_count,
        chunk_count,
        names_len,
        table_crc32c: crc32c(&table),
    };
    tmp.as_file()
        .write_all_at(&header.encode(), 0)
        .map_err(werr)?;
    tmp.commit()?;
    progress(logical_total, logical_total);
    Ok(PackSummary {
        entries: entries.len(),
        logical_bytes: logical_total,
        stored_bytes: stored_total,
        file_bytes: file_len,
        elapsed: started.elapsed(),
    })
}

/// Expands command-line inputs into (entry name, file) pairs: a file becomes an entry named by its
/// file name; a directory contributes every regular file below it (symbolic links followed), named by
/// its path relative to the directory, `/`-separated, in sorted order.
pub fn inputs_from_paths(paths: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for p in paths {
        let meta = fs::metadata(p).map_err(|e| Error::from_io(Op::Stat, &e).with_path(p))?;
        if meta.is_dir() {
            walk(p, "", &mut out, 0)?;
        } else {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::invalid("file name is not UTF-8").with_path(p))?;
            out.push((name.to_string(), p.clone()));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>, depth: usize) -> Result<()> {
    if depth > 64 {
        return Err(
            Error::invalid("directories nested more than 64 deep (a symlink loop?)").with_path(dir),
        );
    }
    let rd = fs::read_dir(dir).map_err(|e| Error::from_io(Op::Open, &e).with_path(dir))?;
    let mut items = Vec::new();
    for item in rd {
        let item = item.map_err(|e| Error::from_io(Op::Read, &e).with_path(dir))?;
        items.push(item.path());
    }
    items.sort();
    for path in items {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid("file name is not UTF-8").with_path(&path))?;
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        let meta =
            fs::metadata(&path).map_err(|e| Error::from_io(Op::Stat, &e).with_path(&path))?;
        if meta.is_dir() {
            walk(&path, &rel, out, depth + 1)?;
        } else if meta.is_file() {
            out.push((rel, path));
        }
    }
    Ok(())
}

struct Job {
    seq: u64,
    entry: usize,
    offset: u64,
    len: u32,
    data: JobData,
}

/// Opens an input for its chunks: the file checked to be the one probed (not swapped since).
fn open_input(source: &Input, path: &Path) -> Result<JobData> {
    match source {
        Input::Bytes(b) => Ok(JobData::Bytes(b.clone())),
        Input::File(id) => {
            let f = gpuio::input::open_nonblocking(path)?;
            let meta = f
                .metadata()
                .map_err(|e| Error::from_io(Op::Stat, &e).with_path(path))?;
            if FileId::of_metadata(&meta) != *id || !meta.is_file() {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "was replaced by another file while the pack was being written",
                )
                .with_op(Op::Open)
                .with_path(path));
            }
            Ok(JobData::File(Arc::new(f)))
        }
    }
}

struct Done {
    entry: usize,
    offset: u64,
    logical_len: u32,
    codec: Codec,
    stored: Vec<u8>,
    crc_stored: u32,
    crc_logical: u32,
}

/// On a compression thread: reads, checksums and compresses one chunk.
fn compress_job(
    data: &JobData,
    path: &Path,
    job: &Job,
    codec: Codec,
    level: i32,
    input: &mut Vec<u8>,
    check: &mut Vec<u8>,
) -> Result<Done> {
    input.resize(job.len as usize, 0);
    let file = match data {
        JobData::File(f) => f,
        JobData::Bytes(b) => {
            let at = job.offset as usize;
            input.copy_from_slice(&b[at..at + job.len as usize]);
            return compress_read(path, job, codec, level, input, check);
        }
    };
    file.read_exact_at(input, job.offset).map_err(|e| {
        let err = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::new(
                ErrorKind::UnexpectedEof,
                "the file shrank while it was being packed",
            )
        } else {
            Error::from_io(Op::Read, &e)
        };
        err.with_op(Op::Read)
            .with_path(path)
            .with_range(job.offset, job.len as u64)
    })?;
    compress_read(path, job, codec, level, input, check)
}

/// Checksums and compresses one chunk already read into `input`.
fn compress_read(
    path: &Path,
    job: &Job,
    codec: Codec,
    level: i32,
    input: &mut Vec<u8>,
    check: &mut Vec<u8>,
) -> Result<Done> {
    let crc_logical = crc32c(input);
    let mut out = Vec::new();
    let compressed = codec::compress(codec, level, input, &mut out)
        .map_err(|e| e.with_path(path).with_range(job.offset, job.len as u64))?;
    let (stored, used) = if compressed {
        // Decode what the compressor wrote before it goes into the pack: a compressor bug must fail
        // the packing, not the reads of a pack whose original may be gone (this caught one in zlib-rs).
        check.resize(input.len(), 0);
        let back = codec::decompress(codec, &out, check).map(|()| crc32c(check));
        if back != Ok(crc_logical) {
            let why = back.err().unwrap_or_else(|| "different bytes".into());
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("the {codec} compressor wrote a stream that does not decode back ({why}); try another codec or level"),
            )
            .with_op(Op::Write)
            .with_path(path)
            .with_range(job.offset, job.len as u64));
        }
        (out, codec)
    } else {
        (std::mem::take(input), Codec::None)
    };
    let crc_stored = if used == Codec::None {
        crc_logical
    } else {
        crc32c(&stored)
    };
    Ok(Done {
        entry: job.entry,
        offset: job.offset,
        logical_len: job.len,
        codec: used,
        stored,
        crc_stored,
        crc_logical,
    })
}

fn write_zeros(w: &mut impl Write, n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut left = n;
    while left > 0 {
        let k = left.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        left -= k as u64;
    }
    Ok(())
}
