//! BaM's array abstraction: a typed view of a source through the cache.

use std::fmt;
use std::marker::PhantomData;

use bytemuck::Pod;
use gpuio::{Error, Result};

use crate::{Gather, PageCache, SourceId};

/// Elements of plain-old-data type `T`, little-endian as stored, over a cached source. Read-only
/// over pack entries and read-only files (`set`/`scatter` fail with `PermissionDenied`).
pub struct Array<T: Pod> {
    cache: PageCache,
    src: SourceId,
    base: u64,
    len: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T: Pod> Clone for Array<T> {
    fn clone(&self) -> Self {
        Array {
            cache: self.cache.clone(),
            src: self.src,
            base: self.base,
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T: Pod> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array")
            .field("source", &self.src)
            .field("byte_offset", &self.base)
            .field("len", &self.len)
            .field("elem_bytes", &Self::SIZE)
            .finish()
    }
}

impl<T: Pod> Array<T> {
    const SIZE: usize = std::mem::size_of::<T>();

    /// The whole source as elements; `InvalidInput` if its length is not a multiple of the element
    /// size.
    pub fn new(cache: &PageCache, src: SourceId) -> Result<Array<T>> {
        let bytes = cache.len(src);
        Self::check_size()?;
        if bytes % Self::SIZE as u64 != 0 {
            return Err(Error::invalid(format!(
                "source of {bytes} bytes is not a whole number of {}-byte elements",
                Self::SIZE
            )));
        }
        Self::from_offset(cache, src, 0, bytes / Self::SIZE as u64)
    }

    /// `count` elements starting at `byte_offset` of the source (to skip a header).
    pub fn from_offset(
        cache: &PageCache,
        src: SourceId,
        byte_offset: u64,
        count: u64,
    ) -> Result<Array<T>> {
        Self::check_size()?;
        let bytes = cache.len(src);
        let end = count
            .checked_mul(Self::SIZE as u64)
            .and_then(|b| b.checked_add(byte_offset));
        if end.is_none_or(|e| e > bytes) {
            return Err(Error::invalid(format!(
                "{count} elements of {} bytes at offset {byte_offset} pass the end of the {bytes}-byte source",
                Self::SIZE
            )));
        }
        Ok(Array {
            cache: cache.clone(),
            src,
            base: byte_offset,
            len: count,
            _t: PhantomData,
        })
    }

    fn check_size() -> Result<()> {
        if Self::SIZE == 0 {
            return Err(Error::invalid("zero-sized element type"));
        }
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn cache(&self) -> &PageCache {
        &self.cache
    }
    pub fn source(&self) -> SourceId {
        self.src
    }

    fn offset(&self, i: u64) -> Result<u64> {
        if i >= self.len {
            return Err(Error::invalid(format!(
                "index {i} is out of range for an array of {} elements",
                self.len
            )));
        }
        Ok(self.base + i * Self::SIZE as u64)
    }

    #[inline]
    pub fn get(&self, i: u64) -> Result<T> {
        let offset = self.offset(i)?;
        if let Some(v) = self.cache.read_resident_value::<T>(self.src, offset) {
            return Ok(v);
        }
        let mut v = T::zeroed();
        self.cache
            .read(self.src, offset, bytemuck::bytes_of_mut(&mut v))?;
        Ok(v)
    }

    pub fn set(&self, i: u64, v: T) -> Result<()> {
        self.cache
            .write(self.src, self.offset(i)?, bytemuck::bytes_of(&v))
    }

    /// Elements at `idx`, in order (one batched [`PageCache::gather`]).
    pub fn gather(&self, idx: &[u64]) -> Result<Vec<T>> {
        self.gather_async(idx)?.wait()
    }

    /// Starts a gather of the elements at `idx`; the misses are in flight when this returns.
    pub fn gather_async(&self, idx: &[u64]) -> Result<ArrayGather<T>> {
        let ranges = idx
            .iter()
            .map(|&i| Ok((self.offset(i)?, Self::SIZE)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ArrayGather {
            inner: self.cache.gather(self.src, &ranges)?,
            _t: PhantomData,
        })
    }

    /// Writes `vals[k]` to element `idx[k]` for each k (later duplicates win).
    pub fn scatter(&self, idx: &[u64], vals: &[T]) -> Result<()> {
        if idx.len() != vals.len() {
            return Err(Error::invalid(format!(
                "scatter of {} indices with {} values",
                idx.len(),
                vals.len()
            )));
        }
        for (&i, v) in idx.iter().zip(vals) {
            self.set(i, *v)?;
        }
        Ok(())
    }

    /// Reads `out.len()` elements starting at `start`.
    pub fn read_range(&self, start: u64, out: &mut [T]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let last = start
            .checked_add(out.len() as u64 - 1)
            .ok_or_else(|| Error::invalid("range overflows"))?;
        self.offset(last)?;
        self.cache
            .read(self.src, self.offset(start)?, bytemuck::cast_slice_mut(out))
    }

    /// Every element in order, read a few lines at a time.
    pub fn iter(&self) -> ArrayIter<'_, T> {
        ArrayIter {
            array: self,
            next: 0,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

/// A pending [`Array::gather_async`].
pub struct ArrayGather<T: Pod> {
    inner: Gather,
    _t: PhantomData<fn() -> T>,
}

impl<T: Pod> fmt::Debug for ArrayGather<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArrayGather")
            .field("complete", &self.inner.is_complete())
            .finish()
    }
}

impl<T: Pod> ArrayGather<T> {
    pub fn is_complete(&self) -> bool {
        self.inner.is_complete()
    }
    pub fn wait(self) -> Result<Vec<T>> {
        let r = self.inner.wait()?;
        Ok(r.as_bytes()
            .chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }
}

/// Iterator over an [`Array`]'s elements.
pub struct ArrayIter<'a, T: Pod> {
    array: &'a Array<T>,
    next: u64,
    buf: Vec<T>,
    pos: usize,
}

impl<T: Pod> fmt::Debug for ArrayIter<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArrayIter")
            .field("next", &self.next)
            .finish()
    }
}

impl<T: Pod> Iterator for ArrayIter<'_, T> {
    type Item = Result<T>;
    fn next(&mut self) -> Option<Result<T>> {
        if self.pos < self.buf.len() {
            self.pos += 1;
            return Some(Ok(self.buf[self.pos - 1]));
        }
        if self.next >= self.array.len {
            return None;
        }
        let per = (4 * self.array.cache.line_bytes() / std::mem::size_of::<T>()).max(1) as u64;
        let n = per.min(self.array.len - self.next) as usize;
        self.buf.clear();
        self.buf.resize(n, T::zeroed());
        if let Err(e) = self.array.read_range(self.next, &mut self.buf) {
            self.next = self.array.len; // stop after reporting
            self.buf.clear();
            return Some(Err(e));
        }
        self.next += n as u64;
        self.pos = 1;
        Some(Ok(self.buf[0]))
    }
}
