#!/usr/bin/env bash
# The engine at memory speed: gpu-io against fio (io_uring, O_DIRECT) on storage that is not the
# bottleneck — a 1 GiB file in /dev/shm and a RAM-backed loop device — alternating which runs first,
# several rounds, printing each round and the median ratio.
#
#   scripts/bench-memspeed.sh [ROUNDS] [SECONDS] [TARGETS] [WORKLOADS]
#
#   ROUNDS     rounds per workload (default 5)
#   SECONDS    seconds per run (default 3; reads also stop after one pass over the file)
#   TARGETS    comma-separated: shm, loop (default shm,loop; loop needs root and losetup)
#   WORKLOADS  comma-separated PATTERN:BS:QD[:THREADS] (default
#              randread:4k:64,randwrite:4k:64,read:1m:16,randread:4k:64:2)
#
# CPU per I/O is counted the same way for both: all CPU of the process, its io_uring worker threads
# (iou-wrk, which copy tmpfs data) included — gpu-io from its own getrusage, fio from the rusage of the
# finished child. fio's own report (usr_cpu/sys_cpu) counts only its job thread; it is printed too.
# Env: GPUIO_BENCH_ARGS adds flags to every gpu-io run (e.g. "--backend threads").
#      GPUIO_BENCH_ALT runs a second gpu-io variant in every round, with these flags added (e.g.
#      "--local": each thread on its own ring), so both are measured against the same fio runs.
# The raw JSON of every run, with its command, is kept under docs/bench-runs/DATE-COMMIT/.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
command -v fio >/dev/null || { echo "fio is not installed (apt-get install -y fio)" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$here/Cargo.toml" -p gpuio-cli
# Every run's raw JSON and exact command kept under docs/bench-runs/ (see bench-runs.sh); the runs are
# recorded by the Python below, not by a wrapper, which would add its own CPU time to what is measured.
. "$here/scripts/bench-runs.sh"
bench_runs_start "$0" "$@"
export BENCH_RUNS_RAW="$runs_dir/raw"

exec python3 - "$here/target/release/gpuio" "${1:-5}" "${2:-3}" "${3:-shm,loop}" \
  "${4:-randread:4k:64,randwrite:4k:64,read:1m:16,randread:4k:64:2}" <<'PY'
import json, os, resource, shlex, statistics, subprocess, sys, tempfile

gpuio, rounds, secs, targets, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
extra = shlex.split(os.environ.get("GPUIO_BENCH_ARGS", ""))
alt = shlex.split(os.environ.get("GPUIO_BENCH_ALT", ""))
SIZE = 1 << 30

RUNS = [0]

def keep(cmd, out):
    """Keeps a run's exact command and raw output under $BENCH_RUNS_RAW (scripts/bench-runs.sh)."""
    RUNS[0] += 1
    base = os.path.join(os.environ["BENCH_RUNS_RAW"], f"{RUNS[0]:05d}-{os.path.basename(cmd[0])}")
    with open(base + ".cmd", "w") as f:
        f.write(shlex.join(cmd) + "\n")
    with open(base + ".out", "w") as f:
        f.write(out)

def run(cmd):
    """Runs cmd; returns (stdout, CPU seconds of the child and all its threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    keep(cmd, out)
    return out, cpu

def gpuio_run(path, pattern, bs, qd, threads, flags=()):
    cmd = [gpuio, "bench", "--file", path, "--overwrite", "--pattern", pattern, "--block-size", bs,
           "--queue-depth", str(qd), "--duration", secs, "--json", *extra, *flags]
    if threads > 1:
        cmd += ["--threads", str(threads)]
    out, _ = run(cmd)
    g = json.loads(out)
    return g["iops"], g["bytes_per_sec"], g["cpu"]["per_io_us"], g["cpu"]["per_io_us"]

def fio_run(path, pattern, bs, qd, threads):
    cmd = ["fio", "--name=ref", f"--filename={path}", f"--rw={pattern}", f"--bs={bs}", f"--iodepth={qd}",
           "--ioengine=io_uring", "--direct=1", f"--runtime={secs}s", f"--size={SIZE}",
           f"--numjobs={threads}", "--group_reporting", "--invalidate=1", "--randrepeat=0",
           "--output-format=json"]
    if "write" in pattern:
        cmd.append("--time_based")
    out, cpu = run(cmd)
    f = json.loads(out[out.index("{"):])["jobs"][0]
    side = "write" if "write" in pattern else "read"
    ios = max(f[side]["total_ios"], 1)
    rt = f["job_runtime"] / 1000.0 / threads
    own = (f["usr_cpu"] + f["sys_cpu"]) / 100.0 * rt * threads / ios * 1e6
    return f[side]["iops"], f[side]["bw_bytes"], cpu / ios * 1e6, own

def prepare():
    paths = {}
    shm = "/dev/shm/gpuio-memspeed.bin"
    with open(shm, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(SIZE >> 20):
            f.write(chunk)
    loop = None
    for t in targets.split(","):
        if t == "shm":
            paths["shm"] = shm
        elif t == "loop":
            try:
                loop = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", shm], check=True,
                                      capture_output=True, text=True).stdout.strip()
                paths["loop"] = loop
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"loop target skipped: losetup failed ({e})")
    return shm, loop, paths

shm, loop, paths = prepare()
print(f"{rounds} rounds of {secs} s, {os.cpu_count()} CPUs, kernel {os.uname().release}, "
      f"{subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip()}, "
      f"{subprocess.run([gpuio, '--version'], capture_output=True, text=True).stdout.strip()}"
      + (f", gpu-io flags: {' '.join(extra)}" if extra else "")
      + (f", alternate gpu-io run with: {' '.join(alt)}" if alt else ""))

def alt_run(path, pattern, bs, qd, threads):
    return gpuio_run(path, pattern, bs, qd, threads, alt)
try:
    for name, path in paths.items():
        for w in workloads.split(","):
            parts = w.split(":")
            pattern, bs, qd = parts[0], parts[1], int(parts[2])
            threads = int(parts[3]) if len(parts) > 3 else 1
            print(f"\n== {name} ({path}): {pattern} bs={bs} QD={qd} threads={threads} ==")
            rows, alt_ratios = [], []
            for r in range(rounds):
                fns = [gpuio_run, fio_run] + ([alt_run] if alt else [])
                # Each runner goes first in turn, so no one always meets a cold or a warm machine.
                order = fns[r % len(fns):] + fns[:r % len(fns)]
                res = {fn: fn(path, pattern, bs, qd, threads) for fn in order}
                g, f = res[gpuio_run], res[fio_run]
                rows.append((g, f))
                line = (f"round {r + 1}: gpu-io {g[0]:9.0f} IOPS {g[1] / 2**30:6.2f} GiB/s {g[2]:5.2f} us/IO | "
                        f"fio {f[0]:9.0f} IOPS {f[1] / 2**30:6.2f} GiB/s {f[2]:5.2f} us/IO (own thread {f[3]:4.2f}) "
                        f"| ratio {g[0] / f[0]:.3f}")
                if alt:
                    a = res[alt_run]
                    alt_ratios.append(a[0] / f[0])
                    line += f" | alternate {a[0]:9.0f} IOPS {a[2]:5.2f} us/IO, ratio {a[0] / f[0]:.3f}"
                print(line)
            ratios = [g[0] / f[0] for g, f in rows]
            med = statistics.median
            print(f"median gpu-io/fio IOPS ratio {med(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
                  f"median CPU us/IO gpu-io {med(g[2] for g, _ in rows):.2f}, fio {med(f[2] for _, f in rows):.2f} "
                  f"(fio's own thread {med(f[3] for _, f in rows):.2f}); median IOPS gpu-io "
                  f"{med(g[0] for g, _ in rows):.0f}, fio {med(f[0] for _, f in rows):.0f}")
            if alt:
                print(f"alternate ({' '.join(alt)}): median ratio to fio {med(alt_ratios):.3f} "
                      f"(min {min(alt_ratios):.3f}, max {max(alt_ratios):.3f})")
finally:
    if loop:
        subprocess.run(["losetup", "-d", loop])
    os.unlink(shm)
PY
