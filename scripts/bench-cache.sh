#!/usr/bin/env bash
# The page cache against its references, in one run (issue 4).
#
#   scripts/bench-cache.sh [SECONDS] [GRAPH_SCALE]
#
# 1. Miss-bound: uniform 4 KiB-row gather over a 1 GiB table 10x the cache, against fio's 4 KiB random
#    read at the same queue depth on the same file, alternating.
# 2. Hit-bound: resident-line lookups per second on one and two threads (examples/cache_bench).
# 3. Overlap: gather with compute per batch about equal to its I/O time, prefetch on against off.
# 4. BFS on a Kronecker graph whose edge file is 5x the cache (cache = 20 % of edge bytes): cache
#    against memory and mmap (cold) runs of the same BFS.
# The raw output of every run, with its command, is kept under docs/bench-runs/DATE-COMMIT/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
g="$here/target/release/gpuio"
secs=${1:-5}
scale=${2:-21}
cargo build --release --quiet --manifest-path "$here/Cargo.toml" --bins --examples
# Every gpuio and fio run's raw JSON and exact command kept under docs/bench-runs/ (see bench-runs.sh).
. "$here/scripts/bench-runs.sh"
bench_runs_start "$0" "$@"
g=$(bench_runs_wrap "$g")
cache_bench=$(bench_runs_wrap "$here/target/release/examples/cache_bench")
bench_runs_wrap_on_path fio
work=$(mktemp -d "${TMPDIR:-/tmp}/gpuio-cache.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "$(nproc) CPUs, kernel $(uname -r), $("$g" --version), $(fio --version)"
table="$work/table.bin"
fio --name=prepare --filename="$table" --rw=write --bs=1M --size=1G --direct=1 --ioengine=io_uring \
    --iodepth=16 >/dev/null
j() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }

echo
echo "== 1. miss-bound gather, 4 KiB rows, table 1 GiB, cache 102 MiB, QD 64 =="
batches=$((secs * 20))
for r in 1 2 3; do
  gi=$("$g" gather --table "$table" --row-bytes 4096 --batch 4096 --batches "$batches" --dist uniform \
        --cache-size 10% --queue-depth 64 --json | j 'round(v["iops"])')
  fi=$(fio --name=ref --filename="$table" --rw=randread --bs=4k --iodepth=64 --ioengine=io_uring --direct=1 \
        --runtime="${secs}s" --time_based --size=1G --output-format=terse | awk -F';' '{print $8}')
  python3 -c "print('round $r: gather $gi IOPS, fio $fi IOPS, ratio %.3f' % ($gi / $fi))"
done

echo
echo "== 2. hit-bound lookups =="
"$cache_bench" "$table" 1024 "$secs" 2>&1 | grep -iE "hit|thread|lookup" || true

echo
echo "== 3. overlap: compute per batch ~ I/O time per batch =="
# Measure one batch's I/O time without compute, then compute that long per batch.
io_us=$("$g" gather --table "$table" --row-bytes 4096 --batch 256 --batches 200 --dist uniform \
        --cache-size 10% --queue-depth 64 --json | j 'round(v["seconds"] * 1e6 / 200)')
echo "one batch of 256 rows takes about $io_us us of I/O"
for r in 1 2 3; do
  "$g" gather --table "$table" --row-bytes 4096 --batch 256 --batches 400 --dist uniform --cache-size 10% \
      --queue-depth 64 --prefetch on --compute-us "$io_us" --json | \
      j '"round %s: prefetch speedup %.2f, rows/s %.0f, hit rate %.3f" % ('"$r"', v["speedup"], v["rows_per_sec"], v["hit_rate"])'
done

echo
echo "== 4. BFS, Kronecker scale $scale, degree 16, cache = 20 % of the edge file =="
"$g" graph gen --kind kron --scale "$scale" --degree 16 --seed 1 -o "$work/kron" --json | j '"%d vertices, %d edges" % (v.get("vertices", 0), v.get("edges", 0))'
ls -la "$work"/kron.bel.*
sync # so that dropping the edge file's pages from the page cache (mmap mode) really drops them
# Graph500 starts from a vertex with edges: take the one with the most.
src=$(python3 - "$work/kron.bel.col" <<'PY'
import sys
from array import array
a = array("Q")
with open(sys.argv[1], "rb") as f:
    f.read(16)
    a.frombytes(f.read())
best = max(range(len(a) - 1), key=lambda i: a[i + 1] - a[i])
print(best)
PY
)
echo "source vertex $src"
bfs() { # label mode line-size queue-depth coalesce [cgroup]
  local cmd=("$g" bfs "$work/kron" --source "$src" --mode "$2" --cache-size 20% --line-size "$3" --queue-depth "$4" --coalesce "$5" --json)
  if [ -n "${6:-}" ]; then
    bash -c 'echo $$ > "$0/tasks"; exec "$@"' "$6" "${cmd[@]}"
  else
    "${cmd[@]}"
  fi | j '"%-44s %.2f s, %6.1f M TEPS, hit rate %s, reads %s (%s lines), IOPS %s" % ("'"$1"'", v["seconds"], v["teps"] / 1e6, v.get("hit_rate"), v.get("reads_issued"), v.get("lines_loaded"), round(v["iops"]) if v.get("iops") else None)'
}
for round in $(seq 1 "${BFS_ROUNDS:-2}"); do
  echo "-- round $round"
  bfs "memory (all in RAM)" memory 4K 64 0
  bfs "mmap (page cache unbounded)" mmap 4K 64 0
  bfs "cache 4 KiB lines, QD 64, no coalescing" cache 4K 64 0
  bfs "cache 4 KiB lines, QD 64, coalesce 128 KiB" cache 4K 64 128K
  bfs "cache 16 KiB lines, QD 64, coalesce 128 KiB" cache 16K 64 128K
done
echo "-- coalescing sweep (4 KiB lines, QD 64)"
for c in 16K 32K 64K 128K 256K 1M; do
  bfs "cache 4 KiB lines, coalesce $c" cache 4K 64 "$c"
done
# Equal memory: the same cgroup v1 memory limit for mmap (its page cache counts) and for the cache.
cg=/sys/fs/cgroup/memory/gpuio-bench-$$
if mkdir "$cg" 2>/dev/null; then
  dst=$(stat -c %s "$work/kron.bel.dst")
  limit=$((dst / 5 + 200 * 1024 * 1024))
  echo $limit > "$cg/memory.limit_in_bytes"
  echo "-- equal memory: cgroup limit $((limit >> 20)) MiB for each run"
  for round in $(seq 1 "${BFS_ROUNDS:-2}"); do
    bfs "mmap, limited" mmap 4K 64 0 "$cg"
    bfs "cache 4 KiB lines, no coalescing, limited" cache 4K 64 0 "$cg"
    bfs "cache 4 KiB lines, coalesce 128 KiB, limited" cache 4K 64 128K "$cg"
    bfs "cache 16 KiB lines, coalesce 128 KiB, limited" cache 16K 64 128K "$cg"
  done
  rmdir "$cg" 2>/dev/null || true
else
  echo "-- no cgroup v1 memory controller here: equal-memory runs skipped"
fi
