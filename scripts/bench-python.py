#!/usr/bin/env python3
"""The Python package against the references issue 14 names, in one run, alternating, ratios.

    scripts/test-python.sh -q -k nothing     # builds the package into target/py-venv (once)
    target/py-venv/bin/python scripts/bench-python.py [ROUNDS] [SIZE_MIB]
    PARTS=loads TMPDIR=/mnt/lo target/py-venv/bin/python scripts/bench-python.py 5 1024

1. load_safetensors(device="cpu") against safetensors.numpy.load_file on the same file (float32
   tensors, SIZE_MIB in all), cold (page cache dropped: written back, then POSIX_FADV_DONTNEED) and
   warm (read once before).
2. 4 KiB random reads of a 1 GiB file, in the page cache and from the disk (dropped before each
   engine's run): gpuio File.pread_batch (256 per call) against an os.pread loop and numpy memmap
   fancy indexing, the same offsets for all three. gpuio reads into slices of one page-aligned numpy
   array, straight (no copy; the run prints File.copy_stats()'s count).
3. Per-call overhead: one 4 KiB File.pread at a time from Python, against the same reads from Rust
   (`gpuio bench --pattern randread --block-size 4K --queue-depth 1`, time per I/O), on /dev/shm.

Prints each round and the medians; writes every measurement as JSON lines to $OUT (default
docs/bench-runs/DATE-COMMIT-python/results.jsonl) with the command.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file, save_file

import gpuio

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SIZE_MIB = int(sys.argv[2]) if len(sys.argv) > 2 else 512
GPUIO = os.path.join(ROOT, "target/release/gpuio")


def out_dir():
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    d = os.environ.get("OUT") or os.path.join(ROOT, "docs/bench-runs",
                                              time.strftime("%Y-%m-%d") + f"-{commit}-python")
    os.makedirs(d, exist_ok=True)
    return d


OUT = out_dir()
RESULTS = open(os.path.join(OUT, "results.jsonl"), "a")
with open(os.path.join(OUT, "command.txt"), "w") as f:
    f.write(" ".join([sys.executable] + sys.argv) + "\n")


def record(**kv):
    RESULTS.write(json.dumps(kv) + "\n")
    RESULTS.flush()


def drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path):
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def timed(f):
    t = time.perf_counter()
    r = f()
    return time.perf_counter() - t, r


def loads(work):
    path = os.path.join(work, "model.safetensors")
    rng = np.random.default_rng(1)
    n = 16
    save_file({f"layer.{i}.weight": rng.standard_normal((SIZE_MIB << 20) // n // 4, dtype=np.float32)
               for i in range(n)}, path)
    ref = load_file(path)
    got = gpuio.load_safetensors(path)
    assert ref.keys() == got.keys() and all(np.array_equal(ref[k], got[k]) for k in ref)
    res = {"cold": {"gpuio": [], "safetensors": []}, "warm": {"gpuio": [], "safetensors": []}}
    for r in range(ROUNDS):
        for state in ("cold", "warm"):
            order = [("gpuio", lambda: gpuio.load_safetensors(path)), ("safetensors", lambda: load_file(path))]
            if r % 2:
                order.reverse()
            for name, f in order:
                drop(path) if state == "cold" else warm(path)
                s, d = timed(f)
                del d
                res[state][name].append(s)
                record(kind="load", state=state, loader=name, round=r, seconds=s, bytes=SIZE_MIB << 20)
        print(f"round {r}: " + "; ".join(
            f"{st} gpuio {res[st]['gpuio'][-1]:.3f} s, safetensors {res[st]['safetensors'][-1]:.3f} s"
            for st in ("cold", "warm")), flush=True)
    for st in ("cold", "warm"):
        g, s = statistics.median(res[st]["gpuio"]), statistics.median(res[st]["safetensors"])
        print(f"load_safetensors(cpu) {st}: gpuio {g:.3f} s, safetensors.numpy {s:.3f} s: {s / g:.2f} x")
    os.remove(path)


def page_aligned(n):
    """n bytes of a numpy array at a 4096-aligned address: gpu-io reads straight into it (no copy)
    even from an O_DIRECT file (File.copy_stats() counts it)."""
    arena = np.empty(n + 4096, dtype=np.uint8)
    skew = (-arena.ctypes.data) % 4096
    return arena[skew:skew + n]


def zero_copy_note(file):
    s = file.copy_stats()
    print(f"  ({s['reads_zero_copy']} reads straight into the caller's buffers, {s['reads_copied']} copied)")


def random_reads(work):
    path = os.path.join(work, "table.bin")
    size = 1 << 30
    with open(path, "wb") as f:
        block = np.random.default_rng(2).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
        for _ in range(size // len(block)):
            f.write(block)
    warm(path)
    n, batch = 65536, 256
    offs = (np.random.default_rng(3).integers(0, size // 4096, n) * 4096).tolist()
    # Slices of one aligned array: each batch is lent to the engine as one buffer (no copy).
    arena = page_aligned(batch * 4096)
    bufs = [arena[j * 4096:(j + 1) * 4096] for j in range(batch)]
    res = {"gpuio": [], "pread": [], "memmap": []}
    file = gpuio.open(path, direct="off")
    fd = os.open(path, os.O_RDONLY)
    rows = np.array(offs) // 4096

    def run_gpuio():
        for i in range(0, n, batch):
            file.pread_batch(list(zip(bufs, offs[i:i + batch])))

    def run_pread():
        for o in offs:
            os.pread(fd, 4096, o)

    def run_memmap(count=n):
        # Mapped only while it runs: pages mapped by a live mapping cannot be dropped for the cold runs.
        mm = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 4096)
        for i in range(0, count, batch):
            np.asarray(mm[rows[i:i + batch]])
        del mm

    for r in range(ROUNDS):
        for name, f in (("gpuio", run_gpuio), ("pread", run_pread), ("memmap", run_memmap)):
            s, _ = timed(f)
            res[name].append(n / s)
            record(kind="random_reads", engine=name, round=r, reads_per_sec=n / s, batch=batch)
        print(f"round {r}: 4 KiB reads/s gpuio {res['gpuio'][-1]:,.0f}, os.pread {res['pread'][-1]:,.0f}, "
              f"memmap {res['memmap'][-1]:,.0f}", flush=True)
    g = statistics.median(res["gpuio"])
    print(f"4 KiB random reads, page cache: gpuio (batches of {batch}) {g:,.0f}/s = "
          f"{g / statistics.median(res['pread']):.2f} x os.pread, {g / statistics.median(res['memmap']):.2f} x memmap")

    # The same from the disk: the page cache dropped before each engine's run, fewer reads.
    cold_n = 8192
    cold = {"gpuio": [], "pread": [], "memmap": []}
    for r in range(ROUNDS):
        for name, f in (("gpuio", lambda: [file.pread_batch(list(zip(bufs, offs[i:i + batch])))
                                           for i in range(0, cold_n, batch)]),
                        ("pread", lambda: [os.pread(fd, 4096, o) for o in offs[:cold_n]]),
                        ("memmap", lambda: run_memmap(cold_n))):
            drop(path)
            s, _ = timed(f)
            cold[name].append(cold_n / s)
            record(kind="random_reads_cold", engine=name, round=r, reads_per_sec=cold_n / s, batch=batch)
        print(f"round {r}, cold: 4 KiB reads/s gpuio {cold['gpuio'][-1]:,.0f}, os.pread {cold['pread'][-1]:,.0f}, "
              f"memmap {cold['memmap'][-1]:,.0f}", flush=True)
    g = statistics.median(cold["gpuio"])
    print(f"4 KiB random reads, cold: gpuio (batches of {batch}) {g:,.0f}/s = "
          f"{g / statistics.median(cold['pread']):.2f} x os.pread, {g / statistics.median(cold['memmap']):.2f} x memmap")
    zero_copy_note(file)
    file.close()
    os.close(fd)
    os.remove(path)


def per_call():
    """One 4 KiB read at a time from Python, against the same reads from Rust, on /dev/shm (no device
    and no page-cache miss in either figure: what is left is the binding's cost)."""
    path = "/dev/shm/gpuio-pybench.bin"
    size = 256 << 20
    with open(path, "wb") as f:
        f.write(np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8).tobytes())
    m = 20000
    offs = (np.random.default_rng(5).integers(0, size // 4096, m) * 4096).tolist()
    one = page_aligned(4096)
    file = gpuio.open(path)
    times = []
    for r in range(ROUNDS):
        t = time.perf_counter()
        for o in offs:
            file.pread(one, o)
        times.append((time.perf_counter() - t) / m * 1e6)
        record(kind="per_call", round=r, python_us=times[-1])
    zero_copy_note(file)
    file.close()
    cmd = [GPUIO, "bench", "--file", path, "--pattern", "randread", "--block-size", "4K",
           "--queue-depth", "1", "--duration", "2", "--json"]
    rust = subprocess.run(cmd, capture_output=True, text=True)
    record(kind="per_call_rust", command=" ".join(cmd), raw=rust.stdout)
    os.remove(path)
    try:
        rust_us = 1e6 / json.loads(rust.stdout)["iops"]
    except (ValueError, KeyError) as e:
        print(f"the Rust reference did not run: {e!r} {rust.stderr[-300:]}")
        return
    py = statistics.median(times)
    print(f"one 4 KiB read on /dev/shm: Python File.pread {py:.2f} us per call, Rust (gpuio bench QD 1) "
          f"{rust_us:.2f} us: {py - rust_us:.2f} us of binding overhead")


def main():
    work = tempfile.mkdtemp(prefix="gpuio-pybench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    # PARTS=loads,random,per_call (default all); TMPDIR picks the file system, e.g. one on a RAM-backed
    # loop device (`losetup --direct-io=on`) to stand in for storage faster than one core's copies.
    parts = os.environ.get("PARTS", "loads,random,per_call").split(",")
    try:
        if "loads" in parts:
            loads(work)
        if "random" in parts:
            random_reads(work)
        if "per_call" in parts:
            per_call()
    finally:
        os.rmdir(work)
    print(f"raw results: {OUT}")


main()
