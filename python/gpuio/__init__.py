"""gpu-io for Python: moves bytes between storage and memory at the speed of the hardware.

- ``gpuio.open(path, mode="r", direct="auto")`` → ``File``: ``pread(buf, offset)`` into any writable
  buffer, ``pwrite(buf, offset)``, ``read(offset, n)`` → numpy array, their ``*_async`` variants
  returning a ``Future`` (awaitable from asyncio), and ``pread_batch`` for many small reads in one
  engine commit. ``gpuio.Queue(priority=..., kind=...)`` orders and prioritises I/O (``queue=``).
- ``gpuio.Pack(path)`` reads compressed packs; ``gpuio.pack(paths, out, codec="lz4")`` writes them.
- ``gpuio.PageCache(size=..., line=...)`` and ``cache.array(path, dtype, shape)``: a software page
  cache with numpy-style gathers over files far larger than memory.
- ``gpuio.load_safetensors(path, device="cpu", framework="numpy")`` / ``save_safetensors``.
- ``gpuio.stream(input, output, fn, slots=3, chunk_size=4 << 20)``: read ‖ compute ‖ write.
- ``gpuio.graph.generate`` / ``gpuio.graph.bfs`` and ``gpuio.gather``: the CLI's workloads.

Errors are ``gpuio.Error`` subclasses that are also the matching built-in exceptions
(``FileNotFoundError``, ``PermissionError``, ``OSError`` with ``errno``, ...); see ``gpuio._errors``.

The GIL is released while gpu-io waits. Buffers passed to an I/O are held (kept alive, their memory
pinned by a buffer export) until the I/O is done with them. The engine (one I/O thread, io_uring
where the kernel allows) is made on first use and shared by the process; it does not survive
``fork()`` — use it in the child only if the parent never did.
"""

from __future__ import annotations

from . import _gpuio
from ._cache import CachedArray, PageCache
from ._errors import (
    CancelledError,
    CorruptError,
    EngineStoppedError,
    Error,
    InvalidInputError,
    IoError,
    IsDirectoryError,
    LimitError,
    NoSpaceError,
    NotFoundError,
    OutOfMemoryError,
    PermissionDeniedError,
    UnexpectedEofError,
    UnsupportedError,
)
from ._gpuio import (
    File,
    Future,
    Memory,
    Model,
    Pack,
    PackEntry,
    Queue,
    Tensor,
    engine_info,
    open,
    pack,
    stream,
)
from ._tensors import load_safetensors, save_safetensors
from ._workloads import gather, graph

__version__ = _gpuio.__version__

__all__ = [
    "CachedArray",
    "CancelledError",
    "CorruptError",
    "EngineStoppedError",
    "Error",
    "File",
    "Future",
    "InvalidInputError",
    "IoError",
    "IsDirectoryError",
    "LimitError",
    "Memory",
    "Model",
    "NoSpaceError",
    "NotFoundError",
    "OutOfMemoryError",
    "Pack",
    "PackEntry",
    "PageCache",
    "PermissionDeniedError",
    "Queue",
    "Tensor",
    "UnexpectedEofError",
    "UnsupportedError",
    "engine_info",
    "gather",
    "graph",
    "load_safetensors",
    "open",
    "pack",
    "save_safetensors",
    "stream",
]
