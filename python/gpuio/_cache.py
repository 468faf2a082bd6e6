"""``gpuio.PageCache`` and the typed array over it (BaM's ``Array<T>``, with numpy-style indexing)."""

from __future__ import annotations

import math
import operator
import os
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import numpy as np

from . import _gpuio


class PageCache(_gpuio.PageCache):
    """A software page cache of ``size`` bytes in lines of ``line`` bytes (a power of two from 512
    to 65536), all allocated when it is made, over files far larger than memory.

    Reads go through it: resident lines are copied from memory without a lock, misses are loaded
    through the engine (a batch's misses all at once, adjacent ones as one read, a line already being
    loaded joined rather than read again), and lines are replaced by the clock. ``queue_depth`` is
    how many misses it aims to keep in flight. ``stats()`` counts hits, misses, reads issued and
    bytes read. Use ``array()`` for a typed view with numpy-style indexing.
    """

    def array(
        self,
        path: Union[str, "os.PathLike[str]"],
        dtype: Any,
        shape: Union[int, Sequence[int], None] = None,
        *,
        offset: int = 0,
        writable: bool = False,
        direct: str = "auto",
    ) -> "CachedArray":
        """A typed array over the file at ``path`` read through this cache: elements of ``dtype``
        (little-endian as stored) in C order with ``shape`` (``None``: 1-D, as many elements as the
        file holds; ``shape[0]`` may be ``-1`` to take every whole row), starting at byte
        ``offset`` (to skip a header). ``writable`` opens the file for writing: assignments then go
        into the cache and reach the file on eviction or ``flush()``."""
        return CachedArray(self, path, dtype, shape, offset=offset, writable=writable, direct=direct)


class CachedArray:
    """A typed view of a file through a ``PageCache``: ``a[i]`` (a row), ``a[i:j]`` (rows, one read
    through the cache), ``a[idx]`` with an integer array of any shape (a gather: one batched request
    for all the rows, the result shaped ``idx.shape + a.shape[1:]``), ``a[idx, ...]`` with further
    numpy indices applied to the gathered rows, boolean masks over rows. Results are new numpy
    arrays (copies of the cached bytes)."""

    def __init__(
        self,
        cache: PageCache,
        path: Union[str, "os.PathLike[str]"],
        dtype: Any,
        shape: Union[int, Sequence[int], None] = None,
        *,
        offset: int = 0,
        writable: bool = False,
        direct: str = "auto",
    ) -> None:
        self._cache = cache
        self.path = os.fspath(path)
        self.dtype = np.dtype(dtype)
        if self.dtype.itemsize == 0 or self.dtype.hasobject:
            raise ValueError(f"dtype {self.dtype} cannot be stored in a file")
        self.offset = operator.index(offset)
        if self.offset < 0:
            raise ValueError(f"negative offset {offset}")
        self._src = cache._attach(self.path, writable, direct)
        self.writable = writable
        size = cache._len(self._src)
        if shape is None:
            shape = (-1,)
        elif isinstance(shape, (int, np.integer)):
            shape = (int(shape),)
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise ValueError("shape must have at least one dimension (rows)")
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        self.row_bytes = row_elems * self.dtype.itemsize
        if self.row_bytes == 0:
            raise ValueError(f"rows of shape {shape[1:]} hold no bytes")
        avail = max(size - self.offset, 0) // self.row_bytes
        if shape[0] == -1:
            shape = (avail,) + shape[1:]
        if shape[0] < 0 or shape[0] > avail:
            raise ValueError(
                f"{self.path}: {shape[0]} rows of {self.row_bytes} bytes at offset {self.offset} "
                f"do not fit in its {size} bytes"
            )
        self.shape: Tuple[int, ...] = shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<gpuio.CachedArray {self.path!r} dtype={self.dtype} shape={self.shape}>"

    def _rows(self, flat: np.ndarray) -> np.ndarray:
        idx = np.ascontiguousarray(flat, dtype=np.int64)
        raw = self._cache._gather_rows(self._src, idx, self.row_bytes, self.offset, self.shape[0])
        return raw.view(self.dtype).reshape((len(idx),) + self.shape[1:])

    def _index_array(self, key: Any) -> np.ndarray:
        idx = np.asarray(key)
        if idx.dtype == np.bool_:
            if idx.shape != (self.shape[0],):
                raise IndexError(f"boolean index of shape {idx.shape} does not match {self.shape[0]} rows")
            return np.nonzero(idx)[0]
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"arrays used as indices must be of integer type, not {idx.dtype}")
        idx = idx.astype(np.int64, copy=True)
        n = self.shape[0]
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise IndexError(f"index {int(idx[bad].flat[0])} is out of bounds for axis 0 with size {n}")
        idx[idx < 0] += n
        return idx

    def gather(self, indices: Any) -> np.ndarray:
        """Rows ``indices`` (an integer array of any shape) as one array shaped
        ``indices.shape + shape[1:]``: one batched request through the cache."""
        idx = self._index_array(indices)
        return self._rows(idx.reshape(-1)).reshape(idx.shape + self.shape[1:])

    def __getitem__(self, key: Any) -> Any:
        rest: Tuple[Any, ...] = ()
        if isinstance(key, tuple):
            if not key:
                key = slice(None)
            else:
                key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            n = self.shape[0]
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for axis 0 with size {n}")
            out = self._rows(np.array([i % n]))[0]
            return out[rest] if rest else out
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                count = max(stop - start, 0)
                raw = self._cache._read(self._src, self.offset + start * self.row_bytes, count * self.row_bytes)
                out = raw.view(self.dtype).reshape((count,) + self.shape[1:])
            else:
                out = self._rows(np.arange(start, stop, step, dtype=np.int64))
        elif key is Ellipsis:
            out = self[:]
        else:
            out = self.gather(key)
        if rest:
            lead = out.ndim - (self.ndim - 1)
            return out[(slice(None),) * lead + rest]
        return out

    def __setitem__(self, key: Any, value: Any) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path}: the array was opened read-only (writable=False)")
        if isinstance(key, (int, np.integer)):
            rows = np.array([int(key) % self.shape[0]]) if -self.shape[0] <= int(key) < self.shape[0] else None
            if rows is None:
                raise IndexError(f"index {int(key)} is out of bounds for axis 0 with size {self.shape[0]}")
        elif isinstance(key, slice):
            rows = np.arange(*key.indices(self.shape[0]), dtype=np.int64)
        else:
            rows = self._index_array(key).reshape(-1)
        vals = np.broadcast_to(np.asarray(value, dtype=self.dtype), (len(rows),) + self.shape[1:])
        vals = np.ascontiguousarray(vals.astype(self.dtype.newbyteorder("<"), copy=False))
        flat = vals.reshape(len(rows), -1).view(np.uint8)
        for r, row in zip(rows.tolist(), flat):
            self._cache._write(self._src, self.offset + r * self.row_bytes, row)

    def prefetch(self, indices: Iterable[int], *, wait: bool = False) -> None:
        """Starts loading rows ``indices`` into the cache and returns at once (``wait=True``: when
        they are resident), so that a later gather of them hits. Adjacent rows are asked for as one
        range."""
        idx = np.unique(self._index_array(np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)).reshape(-1))
        ranges = []
        if idx.size:
            breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
            for run in np.split(idx, breaks):
                first, count = int(run[0]), int(run.size)
                ranges.append((self.offset + first * self.row_bytes, count * self.row_bytes))
        self._cache._prefetch(self._src, ranges, wait)

    def flush(self, sync: bool = True) -> None:
        """Writes modified lines back to the file (all of the cache's: see ``PageCache.flush``)."""
        self._cache.flush(sync)

    def stats(self) -> dict:
        """The cache's counters (see ``PageCache.stats``)."""
        return self._cache.stats()
