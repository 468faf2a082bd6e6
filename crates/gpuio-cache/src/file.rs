//! A GPUfs-style file view over the cache.

use gpuio::Result;

use crate::{PageCache, SourceId};

/// A file (or pack entry) read and written through a [`PageCache`], like GPUfs's `gread`/`gwrite`.
///
/// Consistency is **close-to-open**, as in GPUfs (and NFS): every `CachedFile` over the same source
/// of the same cache sees every write at once (they share lines). Other processes, and other caches
/// or sources attached to the same file, see this view's writes only after [`flush`](Self::flush)
/// (the "close"), and this view sees theirs only if it was attached after they flushed (the "open"):
/// lines already cached are never re-read. The length is fixed when the source is attached.
#[derive(Debug, Clone)]
pub struct CachedFile {
    cache: PageCache,
    src: SourceId,
}

impl CachedFile {
    /// Attaches `file` to `cache` and returns the view.
    pub fn open(cache: &PageCache, file: &gpuio::File) -> Result<CachedFile> {
        let src = cache.attach_file(file)?;
        Ok(CachedFile {
            cache: cache.clone(),
            src,
        })
    }

    /// A view of a source already attached.
    pub fn from_source(cache: &PageCache, src: SourceId) -> CachedFile {
        CachedFile {
            cache: cache.clone(),
            src,
        }
    }

    pub fn source(&self) -> SourceId {
        self.src
    }
    pub fn len(&self) -> u64 {
        self.cache.len(self.src)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `out.len()` bytes at `offset` (`UnexpectedEof` past the end).
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.cache.read(self.src, offset, out)
    }

    /// Writes `data` at `offset`, within the file's length.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.cache.write(self.src, offset, data)
    }

    /// Writes this file's modified lines back (the "close" of close-to-open), `fdatasync`ing it if
    /// `fsync`.
    pub fn flush(&self, fsync: bool) -> Result<()> {
        self.cache.flush_source(self.src, fsync)
    }
}
