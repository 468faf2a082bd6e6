"""The workloads of the ``gpuio`` CLI as functions: ``gpuio.graph.generate`` and ``gpuio.graph.bfs``
(Graph500 graphs in the ``.bel`` format, breadth-first search over the page cache, memory or mmap), and
``gpuio.gather`` (DLRM-style embedding lookups through the page cache). The settings are the CLI's
flags, the results what it reports (``gpuio graph gen``, ``gpuio bfs``, ``gpuio gather --json``).

Each takes ``progress=callable``: it is called, on the calling thread with the GIL, with a dict

- ``phase``: what is running (``"generating edges"``, ``"building CSR"``, ``"writing"``;
  ``"searching"``, or ``"loading PATH"`` for BFS in memory mode; ``"gathering"``,
  ``"gathering with prefetch"``, ``"gathering synchronously (reference)"``), or None before the first;
- ``done`` and ``total``: units finished and in all — the three phases of ``generate``, the batches of
  ``gather`` (of both runs with ``prefetch``), the levels of ``bfs`` (``total`` is None until the last
  level, when it equals ``done``). ``done`` never decreases; a run that finishes ends with a call
  where ``done == total``;
- ``level``, ``reached``, ``frontier``: for ``bfs``, the level just finished, vertices reached so far
  and the next frontier's size (None otherwise);
- ``note``: a message to show (a stale temporary file removed), else None.

Calls come at most every ``progress_interval`` seconds (default 0.1; 0 for every report), except
that a new phase, the last step or level, and a note always come. An exception raised by the callable
stops the workload as soon as it can (between phases, batches or levels; no output is written) and is
raised to the caller. Ctrl-C is handled the same way, at the next report."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from . import _gpuio

_Path = Union[str, "os.PathLike[str]"]
_Progress = Optional[Callable[[Dict[str, Any]], Any]]


def generate(scale: int, output: _Path, *, degree: int = 16, seed: int = 1, kind: str = "kron",
             force: bool = False, progress: _Progress = None, progress_interval: float = 0.1) -> dict:
    """Writes a graph of 2**scale vertices at ``output`` (``OUTPUT.bel.col``, ``OUTPUT.bel.dst``),
    crash-safely; ``kind`` is ``"kron"`` (Graph500 Kronecker) or ``"urand"``. Returns its summary.
    ``progress``: see the module docs (one step per phase)."""
    return _gpuio._graph_generate(scale, os.fspath(output), degree, seed, kind, force, progress,
                                  progress_interval)


def bfs(prefix: _Path, source: int, *, mode: str = "cache", cache_size: Optional[str] = None,
        line_size: int = 16384, queue_depth: int = 64, coalesce: int = 131072,
        depths_out: Optional[_Path] = None, progress: _Progress = None,
        progress_interval: float = 0.1, device: str = "cuda:0", delivery: str = "copies",
        server_threads: int = 0) -> dict:
    """Breadth-first search of the graph at ``prefix`` from ``source``. ``mode``: ``"cache"`` (the
    edge file through gpu-io's page cache; ``cache_size`` like ``"20%"`` or ``"256M"``), ``"memory"``,
    ``"mmap"``, ``"gpu-cache"`` (on the GPU ``device``: a kernel reads the edges itself through a
    device cache of ``cache_size``) or ``"gpu-memory"`` (the same search with every edge copied into
    device memory first: gpu-cache's in-memory reference). In gpu-cache, ``delivery`` is how the ring
    server hands lines to the GPU (``"copies"`` or ``"kernel"``, as the CLI's ``--delivery``) and
    ``server_threads`` its polling threads (0: 4, at most half the cores). Returns the summary, with
    ``depths`` a numpy int32 array (-1: unreachable). ``progress``: see the module docs (one step per
    level)."""
    r = _gpuio._graph_bfs(os.fspath(prefix), source, mode, cache_size, line_size, queue_depth,
                          coalesce, None if depths_out is None else os.fspath(depths_out), progress,
                          progress_interval, device, delivery, server_threads)
    r["depths"] = np.frombuffer(r["depths"], dtype="<i4")
    return r


def gather(table: _Path, row_bytes: int, batch: int, batches: int, *, dist: str = "uniform",
           cache_size: Optional[str] = None, line_size: int = 4096, queue_depth: int = 64,
           prefetch: bool = False, compute_us: int = 0, seed: int = 1, progress: _Progress = None,
           progress_interval: float = 0.1, mode: str = "cache", device: str = "cuda:0",
           delivery: str = "copies", server_threads: int = 0) -> dict:
    """``batches`` gathers of ``batch`` rows of ``row_bytes`` from ``table`` through a page cache
    (``dist``: ``"uniform"`` or ``"zipf:S"``); with ``prefetch`` the next batch is issued before the
    current one is consumed, and a synchronous run over the same rows gives ``speedup``. ``mode``
    ``"gpu-cache"`` gathers on the GPU ``device`` (a kernel reads the rows through a device cache;
    same rows, same ``checksum``; ``delivery`` and ``server_threads`` as in :func:`bfs`).
    ``progress``: see the module docs (one step per batch)."""
    return _gpuio._gather(os.fspath(table), row_bytes, batch, batches, dist, cache_size, line_size,
                          queue_depth, prefetch, compute_us, seed, progress, progress_interval, mode,
                          device, delivery, server_threads)


graph = SimpleNamespace(generate=generate, bfs=bfs)
