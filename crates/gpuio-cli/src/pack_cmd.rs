//! `gpuio pack`, `gpuio unpack` and `gpuio verify`: making, extracting and checking compressed packs.
//!
//! Never over the user's data: an output is never one of the command's inputs (the pack is not packed
//! into itself, an entry is not extracted over its pack: same device and inode, through any link); a
//! write-protected output is replaced only with `--force`; every output is written crash-safely
//! (`gpuio::ReplaceFile`), its temporary file removed on an error or SIGINT/SIGTERM/SIGHUP and, left by
//! a SIGKILLed run, by the next run. Everything is checked before the first byte is written.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use clap::Args;
use gpuio::{Engine, EngineConfig, Error, ErrorKind, QueueDesc, Result};
use gpuio_pack::{Codec, Entry, Pack, PackOptions};
use indicatif::{ProgressBar, ProgressStyle};

/// Bytes per load while streaming an entry out, and loads kept in flight.
const STREAM_CHUNK_BYTES: usize = 4 << 20;
const STREAM_LOADS_IN_FLIGHT: usize = 4;

#[derive(Args, Debug)]
pub struct PackArgs {
    /// Files or directories to pack (a directory packs every file below it, named by relative path).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The pack to write (replaced atomically if it exists).
    #[arg(short, long)]
    output: PathBuf,
    /// none, lz4, zstd, zlib, xz (lzma) or lzfse.
    #[arg(long, default_value = "lz4")]
    codec: Codec,
    /// Compression level (codec-specific; default: the codec's own).
    #[arg(long, allow_hyphen_values = true)]
    level: Option<i32>,
    /// Logical bytes per chunk: the unit of random access.
    #[arg(long, value_parser = crate::parse_size, default_value = "64K")]
    chunk_size: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Replace the output even if it is write-protected.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct UnpackArgs {
    /// The pack to extract from.
    pack: PathBuf,
    /// Directory to extract every entry into, or with --entry the file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Extract only this entry, to the file named by --output.
    #[arg(long)]
    entry: Option<String>,
    /// Replace existing files even if they are write-protected.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The pack to check.
    pack: PathBuf,
    /// Print one JSON object (pack, intact, entries, chunks, problems) instead of a summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn progress_bar(total: u64, msg: &str, show: bool) -> Option<ProgressBar> {
    show.then(|| {
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template(
                "{msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb.set_message(msg.to_string());
        pb
    })
}

pub(crate) fn on_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// The (entry name, path) pairs for the inputs: files by their file name, directories by the path of
/// each file below them relative to the directory. Named inputs that are FIFOs, sockets or devices
/// are refused (unopened); inside a directory such files are skipped with a note, and so are the
/// output pack and temporary files of it (packing a directory into itself twice does not nest the
/// old pack in the new one).
fn collect_inputs(inputs: &[PathBuf], output: &Path) -> Result<Vec<(String, PathBuf)>> {
    use gpuio::input::{escape_path, FileId, Kind};
    let out_id = FileId::of_path(output)?;
    let dir_id = |d: &Path| {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        FileId::of_path(d).ok().flatten()
    };
    let out_dir_id = dir_id(output.parent().unwrap_or(Path::new(".")));
    let skip = |path: &Path, why: &str| {
        errln!("gpuio: skipped {}: {why}", escape_path(path));
    };
    let mut out = Vec::new();
    for input in inputs {
        let probe = gpuio::input::probe(input)?;
        if probe.kind == Kind::Directory {
            let mut stack = vec![input.clone()];
            while let Some(dir) = stack.pop() {
                let rd = std::fs::read_dir(&dir)
                    .map_err(|e| Error::from_io(gpuio::error::Op::Open, &e).with_path(&dir))?;
                let mut children: Vec<PathBuf> =
                    rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                children.sort();
                for child in children {
                    let meta = std::fs::symlink_metadata(&child).map_err(|e| {
                        Error::from_io(gpuio::error::Op::Stat, &e).with_path(&child)
                    })?;
                    let ft = meta.file_type();
                    if ft.is_dir() {
                        stack.push(child);
                    } else if ft.is_file() {
                        if Some(FileId::of_metadata(&meta)) == out_id {
                            skip(&child, "it is the output pack");
                            continue;
                        }
                        let name = child.file_name().unwrap_or_default();
                        if gpuio::replace::is_temp_of(output, name)
                            && out_dir_id.is_some()
                            && child.parent().map(dir_id) == Some(out_dir_id)
                        {
                            skip(&child, "it is a temporary file of the output pack");
                            continue;
                        }
                        let rel = child.strip_prefix(input).expect("child is below its input");
                        out.push((rel.to_string_lossy().into_owned(), child));
                    } else if !ft.is_symlink() {
                        let kind = Kind::of_type(ft);
                        skip(&child, &format!("not a regular file ({kind:?})"));
                    }
                }
            }
        } else {
            match probe.kind {
                Kind::Regular | Kind::Pseudo => {}
                other => return Err(gpuio::input::refusal(other, input)),
            }
            let name = input.file_name().ok_or_else(|| {
                Error::invalid(format!("{} has no file name", escape_path(input)))
            })?;
            out.push((name.to_string_lossy().into_owned(), input.clone()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (name, path) in &out {
        if !seen.insert(name.as_str()) {
            return Err(Error::invalid(format!(
                "two inputs would both be entry '{}' (the second is {})",
                gpuio::input::escape(name),
                escape_path(path)
            )));
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("no files to pack in the given inputs"));
    }
    Ok(out)
}

pub fn pack(a: PackArgs) -> Result<()> {
    let chunk_size = u32::try_from(a.chunk_size)
        .map_err(|_| Error::invalid(format!("--chunk-size {} is too large", a.chunk_size)))?;
    // Temporary files of the output left by killed runs go first, so that none is taken for an input.
    crate::stream::remove_stale_temps(&a.output);
    let inputs = collect_inputs(&a.inputs, &a.output)?;
    let ids = inputs
        .iter()
        .map(|(_, path)| {
            Ok(gpuio::replace::InputFile {
                id: gpuio::input::FileId::of_path(path)?.ok_or_else(|| {
                    Error::from_errno(gpuio::error::Op::Stat, libc::ENOENT).with_path(path)
                })?,
                name: path.to_string_lossy().into_owned(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    crate::stream::check_output(&ids, &a.output, a.force)?;
    let opts = PackOptions {
        codec: a.codec,
        level: a.level,
        chunk_size,
        ..PackOptions::default()
    };
    let pb = progress_bar(0, "packing", !a.json && on_terminal());
    let mut progress = |done: u64, total: u64| {
        if let Some(pb) = &pb {
            pb.set_length(total);
            pb.set_position(done);
        }
    };
    let s = gpuio_pack::pack_files(&inputs, &a.output, &opts, &mut progress)?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let ratio = s.logical_bytes as f64 / (s.stored_bytes.max(1)) as f64;
    if a.json {
        let v = serde_json::json!({
            "pack": a.output.display().to_string(),
            "entries": s.entries,
            "codec": a.codec.name(),
            "chunk_size": chunk_size,
            "logical_bytes": s.logical_bytes,
            "stored_bytes": s.stored_bytes,
            "ratio": ratio,
            "seconds": secs,
            "bytes_per_sec": s.logical_bytes as f64 / secs,
        });
        crate::report::print_json(&v)?;
    } else {
        outln!(
            "packed {} entr{} into {}: {} -> {} ({ratio:.2}:1, {}) in {secs:.2} s, {}/s",
            s.entries,
            if s.entries == 1 { "y" } else { "ies" },
            gpuio::input::escape_path(&a.output),
            gpuio::size::format_bytes(s.logical_bytes as f64),
            gpuio::size::format_bytes(s.stored_bytes as f64),
            a.codec.name(),
            gpuio::size::format_bytes(s.logical_bytes as f64 / secs),
        )?;
    }
    Ok(())
}

/// Refuses entry names that would escape the output directory.
fn safe_relative(name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    let ok = !name.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "entry name '{}' is not a safe relative path; extract it alone with --entry NAME -o FILE",
                gpuio::input::escape(name)
            ),
        ));
    }
    Ok(p.to_path_buf())
}

/// Streams an entry's logical bytes to `out` through the engine, a few loads in flight.
pub(crate) fn stream_entry(
    entry: &Entry,
    queue: &gpuio::IoQueue,
    offset: u64,
    end: u64,
    out: &mut dyn Write,
    out_name: &Path,
    pb: Option<&ProgressBar>,
) -> Result<()> {
    let mut inflight = std::collections::VecDeque::new();
    let mut next = offset;
    loop {
        while inflight.len() < STREAM_LOADS_IN_FLIGHT && next < end {
            let len = STREAM_CHUNK_BYTES.min((end - next) as usize);
            let buf = gpuio::AlignedBuf::new(len, 4096)?;
            inflight.push_back(entry.load(queue, next, buf)?);
            next += len as u64;
        }
        let Some(load) = inflight.pop_front() else {
            break;
        };
        let buf = load.wait()?;
        if let Err(e) = out.write_all(&buf) {
            // A closed pipe too: the caller decides what it means (cat: see out.rs).
            return Err(Error::from_io(gpuio::error::Op::Write, &e).with_path(out_name));
        }
        if let Some(pb) = pb {
            pb.inc(buf.len() as u64);
        }
    }
    Ok(())
}

/// Writes an entry to `dest` crash-safely (a [`gpuio::ReplaceFile`]: temporary file beside it, fsync,
/// rename over it, directory fsync).
fn extract(
    entry: &Entry,
    queue: &gpuio::IoQueue,
    dest: &Path,
    pb: Option<&ProgressBar>,
) -> Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::from_io(gpuio::error::Op::Open, &e).with_path(dir))?;
    let tmp = gpuio::ReplaceFile::create(dest)?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
        stream_entry(entry, queue, 0, entry.len(), &mut w, dest, pb)?;
        w.flush()
            .map_err(|e| Error::from_io(gpuio::error::Op::Write, &e).with_path(dest))?;
    }
    tmp.commit()
}

pub fn unpack(a: UnpackArgs) -> Result<()> {
    let pack = Pack::open(&a.pack)?;
    let pack_id = gpuio::input::FileId::of_path(&a.pack)?.ok_or_else(|| {
        Error::from_errno(gpuio::error::Op::Stat, libc::ENOENT).with_path(&a.pack)
    })?;
    let inputs = [gpuio::replace::InputFile {
        id: pack_id,
        name: a.pack.to_string_lossy().into_owned(),
    }];
    let engine = Engine::new(EngineConfig::default())?;
    let queue = engine.queue(QueueDesc::default())?;
    let entries: Vec<Entry> = match &a.entry {
        Some(name) => vec![pack.entry(name)?],
        None => pack
            .entries()
            .iter()
            .map(|e| pack.entry(&e.name))
            .collect::<Result<_>>()?,
    };
    let total: u64 = entries.iter().map(Entry::len).sum();
    // Every destination is checked before the first is written.
    let mut dests = Vec::with_capacity(entries.len());
    for entry in &entries {
        let dest = match &a.entry {
            Some(_) => a.output.clone(),
            None => a.output.join(safe_relative(entry.name())?),
        };
        crate::stream::check_output(&inputs, &dest, a.force)?;
        dests.push(dest);
    }
    let pb = progress_bar(total, "unpacking", on_terminal());
    let start = Instant::now();
    for (entry, dest) in entries.iter().zip(&dests) {
        if dest.parent().is_some_and(Path::is_dir) {
            crate::stream::remove_stale_temps(dest);
        }
        extract(entry, &queue, dest, pb.as_ref())?;
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    errln!(
        "unpacked {} entr{} ({}) in {:.2} s",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        gpuio::size::format_bytes(total as f64),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Exit status: success when every checksum matches.
pub fn verify(a: VerifyArgs) -> Result<()> {
    let pack = Pack::open(&a.pack)?;
    let engine = Engine::new(EngineConfig::default())?;
    let queue = engine.queue(QueueDesc::default())?;
    let total: u64 = pack.entries().iter().map(|e| e.size).sum();
    let chunks: usize = pack.entries().iter().map(|e| e.chunks.len()).sum();
    let pb = progress_bar(total, "verifying", !a.json && on_terminal());
    let mut progress = |done: u64, _total: u64| {
        if let Some(pb) = &pb {
            pb.set_position(done);
        }
    };
    let problems = pack.verify(&queue, &mut progress)?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    if a.json {
        let v = serde_json::json!({
            "pack": a.pack.display().to_string(),
            "intact": problems.is_empty(),
            "entries": pack.entries().len(),
            "chunks": chunks,
            "problems": problems.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        });
        crate::report::print_json(&v)?;
    } else if problems.is_empty() {
        outln!(
            "{}: intact ({} entries, {chunks} chunks, {} checked)",
            gpuio::input::escape_path(&a.pack),
            pack.entries().len(),
            gpuio::size::format_bytes(total as f64)
        )?;
    } else {
        for p in &problems {
            outln!("{p}")?;
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: {} corrupt chunk(s)",
                gpuio::input::escape_path(&a.pack),
                problems.len()
            ),
        ))
    }
}
