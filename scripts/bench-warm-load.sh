#!/usr/bin/env bash
# Loading a safetensors file into host memory, warm (in the page cache) and cold (dropped), against
# safetensors' own numpy loader and a plain buffered read of the same file, alternating, in one run.
#
#   scripts/bench-warm-load.sh [ROUNDS] [SIZE_MIB]
#
# Needs python3 with numpy and safetensors (pip install numpy safetensors). The file (default 512 MiB
# of float32 tensors) is made in $TMPDIR and removed at the end. The raw JSON of every gpuio run, with
# its command, is kept under docs/bench-runs/DATE-COMMIT/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p gpuio-cli
# Every gpuio run's raw JSON and exact command kept under docs/bench-runs/ (see bench-runs.sh); the
# Python below records them after timing each run (a wrapper would add to the time measured).
. "$here/scripts/bench-runs.sh"
bench_runs_start "$0" "$@"
export BENCH_RUNS_RAW="$runs_dir/raw"
exec python3 - "$here/target/release/gpuio" "${1:-5}" "${2:-512}" <<'PY'
import json, os, shlex, statistics, subprocess, sys, tempfile, time
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

RUNS = [0]

def keep(cmd, out):
    """Keeps a run's exact command and raw output under $BENCH_RUNS_RAW (scripts/bench-runs.sh)."""
    RUNS[0] += 1
    base = os.path.join(os.environ["BENCH_RUNS_RAW"], f"{RUNS[0]:05d}-{os.path.basename(cmd[0])}")
    with open(base + ".cmd", "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    with open(base + ".out", "w") as f:
        f.write(out)

def t_gpuio():
    cmd = [gpuio, "load", path, "--device", "cpu", "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    keep(cmd, out)
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
