//! A pack entry as a pipeline [`Source`]: each slot is filled by [`Entry::load`], which reads only the
//! chunks the slot's range touches and decompresses them in parallel, so an entry streams through a
//! [`gpuio::Pipeline`] like a file does.
//!
//! A slot smaller than the entry's chunks (`--chunk-size 1` over a pack entry) would make every slot
//! decompress a whole chunk: 65,536 decodes of the same 64 KiB chunk for a 64 KiB entry. Such slots are
//! served instead from the last chunk decoded, kept by the source: each chunk is decoded (and its
//! checksums checked) once, when the first slot that needs it is filled, and the slots it holds are
//! copied from it.

use gpuio::pipeline::{SlotFuture, Source};
use gpuio::{IoBuffer, IoQueue, Result};

use crate::reader::Entry;

/// The logical bytes of a pack entry, loaded through a queue; see the module docs. Errors name the pack,
/// the entry, and (for damage) the chunk and its offset in the pack file.
#[derive(Debug, Clone)]
pub struct EntrySource {
    entry: Entry,
    queue: IoQueue,
    /// The last chunk decoded for slots smaller than a chunk: its logical offset and bytes.
    last_chunk: Option<(u64, Vec<u8>)>,
    /// Chunks decoded for small slots (for tests and statistics).
    chunks_decoded: u64,
}

impl EntrySource {
    pub fn new(entry: Entry, queue: &IoQueue) -> EntrySource {
        EntrySource {
            entry,
            queue: queue.clone(),
            last_chunk: None,
            chunks_decoded: 0,
        }
    }
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
    /// How many chunks were decoded whole to serve slots smaller than a chunk (see the module docs).
    pub fn small_slot_chunk_decodes(&self) -> u64 {
        self.chunks_decoded
    }

    /// Whether a slot of `len` bytes at `offset` is served from decoded chunks: it is smaller than the
    /// entry's chunks and lies within the entry (a range past the end takes the ordinary path, which
    /// reports it).
    fn small_slot(&self, offset: u64, len: usize) -> bool {
        let chunk = self.entry.info().chunk_size as usize;
        len > 0
            && len < chunk
            && offset
                .checked_add(len as u64)
                .is_some_and(|e| e <= self.entry.len())
    }

    /// Copies logical bytes `[offset, offset + out.len())` out of decoded chunks, decoding (blocking,
    /// through [`Entry::read_at`]) each chunk the range touches that is not the last one kept.
    fn copy_from_chunks(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let hit = matches!(&self.last_chunk, Some((start, bytes))
                if *start <= pos && pos < *start + bytes.len() as u64);
            if !hit {
                let chunks = &self.entry.info().chunks;
                let i = chunks.partition_point(|c| c.logical_offset + c.logical_len as u64 <= pos);
                let Some(c) = chunks.get(i) else {
                    // Within the entry's length there is always a chunk; a damaged index is refused
                    // by the ordinary path's checks.
                    return self.entry.read_at(&self.queue, pos, &mut out[done..]);
                };
                let mut bytes = self.last_chunk.take().map(|(_, b)| b).unwrap_or_default();
                bytes.resize(c.logical_len as usize, 0);
                self.entry
                    .read_at(&self.queue, c.logical_offset, &mut bytes)?;
                self.chunks_decoded += 1;
                self.last_chunk = Some((c.logical_offset, bytes));
            }
            let (start, bytes) = self.last_chunk.as_ref().expect("a chunk was just kept");
            let from = (pos - start) as usize;
            let n = (bytes.len() - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&bytes[from..from + n]);
            done += n;
        }
        Ok(())
    }
}

impl Source for EntrySource {
    fn len(&self) -> u64 {
        self.entry.len()
    }
    fn fill(&mut self, offset: u64, mut buf: IoBuffer) -> Result<SlotFuture> {
        if !self.small_slot(offset, buf.len()) {
            return Ok(Box::pin(self.entry.load(&self.queue, offset, buf)?));
        }
        // Served now; an error is the slot's result, in order with the slots before it.
        let r = self.copy_from_chunks(offset, &mut buf).map(|()| buf);
        Ok(Box::pin(std::future::ready(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pack_files, Codec, Pack, PackOptions};
    use gpuio::pipeline::Stage;
    use gpuio::{DirectMode, Engine, EngineConfig, ErrorKind, Pipeline, QueueDesc};

    fn sample(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        let want: Vec<u8> = (0..1_000_003u32)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect();
        let input = dir.join("w.bin");
        std::fs::write(&input, &want).unwrap();
        let out = dir.join("p.gpk");
        let opts = PackOptions {
            codec: Codec::Lz4,
            chunk_size: 16 << 10,
            ..PackOptions::default()
        };
        pack_files(&[("w".into(), input)], &out, &opts, &mut |_, _| {}).unwrap();
        (out, want)
    }

    #[test]
    fn an_entry_streams_through_a_pipeline_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (pack_path, want) = sample(dir.path());
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let entry = Pack::open(&pack_path).unwrap().entry("w").unwrap();
        // Unaligned chunks that do not match the pack's own.
        for (slots, chunk) in [(1, 100_000), (3, 65_536), (5, 7_777)] {
            let mut got = Vec::new();
            let stats = Pipeline::new(&engine, EntrySource::new(entry.clone(), &queue))
                .slots(slots)
                .chunk_size(chunk)
                .run(|slot| {
                    assert_eq!(slot.offset(), got.len() as u64, "in order");
                    got.extend_from_slice(slot.bytes());
                    Ok(())
                })
                .unwrap();
            assert!(got == want, "slots {slots}, chunk {chunk}");
            assert_eq!(stats.bytes_in, want.len() as u64);
            assert!(stats.slots_peak <= slots);
        }
    }

    #[test]
    fn slots_smaller_than_a_chunk_decode_each_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let (pack_path, want) = sample(dir.path());
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let entry = Pack::open(&pack_path).unwrap().entry("w").unwrap();
        let chunks = entry.info().chunks.len() as u64;
        // 1-byte slots over the first 40,000 bytes, 1000-byte (crossing chunk edges) and 7-byte
        // slots over all of it.
        for (chunk, upto) in [
            (1usize, 40_000u64),
            (1000, want.len() as u64),
            (7, want.len() as u64),
        ] {
            let mut src = EntrySource::new(entry.clone(), &queue);
            let mut got = Vec::new();
            let mut off = 0u64;
            while off < upto {
                let len = (chunk as u64).min(upto - off) as usize;
                let mut buf = gpuio::AlignedBuf::new(len, 4096).unwrap();
                buf.fill(0xEE);
                let fut = src.fill(off, buf.into()).unwrap();
                let b = block_on(fut).unwrap();
                got.extend_from_slice(&b);
                off += len as u64;
            }
            assert!(got[..] == want[..upto as usize], "chunk {chunk}");
            let touched = upto.div_ceil(16 << 10);
            assert_eq!(
                src.small_slot_chunk_decodes(),
                touched.min(chunks),
                "chunk {chunk}"
            );
        }
        // Through a pipeline too, byte for byte.
        let mut got = Vec::new();
        Pipeline::new(&engine, EntrySource::new(entry.clone(), &queue))
            .slots(3)
            .chunk_size(333)
            .run(|slot| {
                got.extend_from_slice(slot.bytes());
                Ok(())
            })
            .unwrap();
        assert!(got == want);
    }

    /// Polls a ready-or-not future to completion on this thread.
    fn block_on(mut fut: SlotFuture) -> Result<gpuio::IoBuffer> {
        use std::task::{Context, Poll, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                return r;
            }
            std::thread::yield_now();
        }
    }

    /// The sample pack with one byte of chunk `index` of entry "w" flipped, opened buffered; its
    /// entry "w" and an engine and queue to read it with.
    fn damaged(dir: &std::path::Path, index: usize) -> (Engine, gpuio::IoQueue, Entry) {
        let (pack_path, _) = sample(dir);
        let pack = Pack::open(&pack_path).unwrap();
        let chunk = pack.entries()[0].chunks[index];
        let mut bytes = std::fs::read(&pack_path).unwrap();
        bytes[chunk.file_offset as usize + 5] ^= 0x40;
        std::fs::write(&pack_path, &bytes).unwrap();
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let entry = Pack::open_with(&pack_path, DirectMode::Off)
            .unwrap()
            .entry("w")
            .unwrap();
        (engine, queue, entry)
    }

    #[test]
    fn a_damaged_chunk_under_small_slots_fails_at_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, queue, entry) = damaged(dir.path(), 3); // logical 48 KiB..64 KiB
        let mut seen = 0u64;
        let err = Pipeline::new(&engine, EntrySource::new(entry, &queue))
            .chunk_size(1000)
            .run(|slot| {
                seen = slot.offset() + slot.bytes().len() as u64;
                Ok(())
            })
            .unwrap_err();
        assert_eq!(err.stage(), Stage::Read, "{err}");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert_eq!(
            err.offset(),
            Some(49_000),
            "the slot reaching into chunk 3: {err}"
        );
        assert_eq!(seen, 49_000, "every slot before it was computed");
        assert!(err.to_string().contains("p.gpk"), "{err}");
    }

    #[test]
    fn a_damaged_chunk_stops_the_pipeline_at_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, queue, entry) = damaged(dir.path(), 30); // logical 480 KiB..496 KiB
        let err = Pipeline::new(&engine, EntrySource::new(entry, &queue))
            .chunk_size(128 << 10)
            .run(|_| Ok(()))
            .unwrap_err();
        assert_eq!(err.stage(), Stage::Read, "{err}");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert_eq!(
            err.offset(),
            Some(384 << 10),
            "the slot holding chunk 30: {err}"
        );
    }
}
