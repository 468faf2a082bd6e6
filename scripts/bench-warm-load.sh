#!/usr/bin/env bash
# Loading a safetensors file into host memory, warm (in the page cache) and cold (dropped), against
# safetensors' own numpy loader and a plain buffered read of the same file, alternating, in one run.
#
#   scripts/bench-warm-load.sh [ROUNDS] [SIZE_MIB]
#
# Needs python3 with numpy and safetensors (pip install numpy safetensors). The file (default 512 MiB
# of float32 tensors) is made in $TMPDIR and removed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p gpuio-cli
exec python3 - "$here/target/release/gpuio" "${1:-5}" "${2:-512}" <<'PY'
import json, os, statistics, subprocess, sys, tempfile, time
import numpy as np
from safetensors.numpy import load_file, save_file

gpuio, rounds, size_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
work = tempfile.mkdtemp(prefix="gpuio-warm-")
path = os.path.join(work, "model.safetensors")
rng = np.random.default_rng(1)
n = 16
save_file({f"layer.{i}.weight": rng.standard_normal((size_mib << 20) // n // 4, dtype=np.float32)
           for i in range(n)}, path)
size = os.path.getsize(path)

def drop():
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

def warm():
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass

def t_gpuio():
    t = time.perf_counter()
    out = subprocess.run([gpuio, "load", path, "--device", "cpu", "--json"], check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    j = json.loads(out)
    return wall, j

def t_safetensors():
    t = time.perf_counter()
    d = load_file(path)
    el = time.perf_counter() - t
    assert len(d) == n
    return el

def t_read():
    buf = bytearray(size)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        mv = memoryview(buf)
        got = 0
        while got < size:
            k = f.readinto(mv[got:])
            if not k:
                break
            got += k
    return time.perf_counter() - t

print(f"{size / 2**20:.0f} MiB safetensors file, {rounds} rounds, {os.cpu_count()} CPUs, "
      f"kernel {os.uname().release}, {subprocess.run([gpuio, '--version'], capture_output=True, text=True).stdout.strip()}")
try:
    for state, prep in (("warm", warm), ("cold", drop)):
        rows = []
        for r in range(rounds):
            prep(); g_wall, j = t_gpuio()
            prep(); s = t_safetensors()
            prep(); b = t_read()
            gs = j.get("seconds", j.get("stats", {}).get("seconds", g_wall))
            rows.append((gs, g_wall, s, b))
            print(f"{state} round {r + 1}: gpuio load {gs:.3f} s (process {g_wall:.3f} s) | "
                  f"safetensors.numpy {s:.3f} s | buffered read {b:.3f} s | path {j.get('path', '?')} "
                  f"{j.get('note', '')}")
        med = lambda k: statistics.median(x[k] for x in rows)
        print(f"{state} median: gpuio {med(0):.3f} s ({size / med(0) / 1e9:.2f} GB/s, process {med(1):.3f} s), "
              f"safetensors {med(2):.3f} s, buffered read {med(3):.3f} s; "
              f"gpuio/safetensors speed {med(2) / med(0):.2f} x, gpuio/buffered-read speed {med(3) / med(0):.2f} x")
finally:
    os.unlink(path)
    os.rmdir(work)
PY
