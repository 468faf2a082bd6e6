//! A pack entry as a pipeline [`Source`]: each slot is filled by [`Entry::load`], which reads only the
//! chunks the slot's range touches and decompresses them in parallel, so an entry streams through a
//! [`gpuio::Pipeline`] like a file does.

use gpuio::pipeline::{SlotFuture, Source};
use gpuio::{IoBuffer, IoQueue, Result};

use crate::reader::Entry;

/// The logical bytes of a pack entry, loaded through a queue; see the module docs. Errors name the pack,
/// the entry, and (for damage) the chunk and its offset in the pack file.
#[derive(Debug, Clone)]
pub struct EntrySource {
    entry: Entry,
    queue: IoQueue,
}

impl EntrySource {
    pub fn new(entry: Entry, queue: &IoQueue) -> EntrySource {
        EntrySource {
            entry,
            queue: queue.clone(),
        }
    }
    pub fn entry(&self) -> &Entry {
        &self.entry
    }
}

impl Source for EntrySource {
    fn len(&self) -> u64 {
        self.entry.len()
    }
    fn fill(&mut self, offset: u64, buf: IoBuffer) -> Result<SlotFuture> {
        Ok(Box::pin(self.entry.load(&self.queue, offset, buf)?))
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
    fn a_damaged_chunk_stops_the_pipeline_at_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (pack_path, _) = sample(dir.path());
        let pack = Pack::open(&pack_path).unwrap();
        let chunk = pack.entries()[0].chunks[30]; // logical 480 KiB..496 KiB
        let mut bytes = std::fs::read(&pack_path).unwrap();
        bytes[chunk.file_offset as usize + 5] ^= 0x40;
        std::fs::write(&pack_path, &bytes).unwrap();
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let queue = engine.queue(QueueDesc::default()).unwrap();
        let entry = Pack::open_with(&pack_path, DirectMode::Off)
            .unwrap()
            .entry("w")
            .unwrap();
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
