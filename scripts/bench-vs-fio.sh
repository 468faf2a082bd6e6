#!/usr/bin/env bash
# Measures gpu-io against fio on the same file, alternating which runs first, several rounds, and prints
# each round's ratio and the median. Also runs `gpuio bench --compare` once per workload for the other
# references (single-thread pread loop, thread-pool and mmap backends).
#
#   scripts/bench-vs-fio.sh [FILE] [ROUNDS] [SECONDS]
#
# FILE defaults to a 1 GiB scratch file in $TMPDIR (made once, removed at the end). Needs fio and python3.
# The raw JSON of every run, with its command, is kept under docs/bench-runs/DATE-COMMIT/.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
gpuio="$here/target/release/gpuio"
file=${1:-}
rounds=${2:-5}
secs=${3:-5}

command -v fio >/dev/null || { echo "fio is not installed (apt-get install -y fio)" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
# Every gpuio and fio run's raw JSON and exact command kept under docs/bench-runs/ (see bench-runs.sh).
. "$here/scripts/bench-runs.sh"
bench_runs_start "$0" "$@"
gpuio=$(bench_runs_wrap "$gpuio")
bench_runs_wrap_on_path fio

cleanup=
if [ -z "$file" ]; then
  file=$(mktemp "${TMPDIR:-/tmp}/gpuio-vs-fio.XXXXXX")
  cleanup=$file
  fio --name=prepare --filename="$file" --rw=write --bs=1M --size=1G --direct=1 \
      --ioengine=io_uring --iodepth=16 >/dev/null
fi
trap '[ -n "$cleanup" ] && rm -f "$cleanup"' EXIT
size=$(stat -c %s "$file")

echo "file: $file ($size bytes), $rounds rounds of $secs s, $(nproc) CPUs, kernel $(uname -r), $(fio --version)"
echo "gpu-io: $("$gpuio" --version)"

run_gpuio() { # pattern bs qd -> json
  "$gpuio" bench --file "$file" --overwrite --pattern "$1" --block-size "$2" --queue-depth "$3" \
    --duration "$secs" --json
}
run_fio() { # pattern bs qd -> json
  # Like gpuio bench: reads make one pass over the file (a second pass may be served by the host's
  # cache of the virtual disk), writes run for the whole duration.
  local timed=--time_based
  case $1 in *read) timed= ;; esac
  fio --name=ref --filename="$file" --rw="$1" --bs="$2" --iodepth="$3" --ioengine=io_uring --direct=1 \
    --runtime="${secs}s" $timed --size="$size" --numjobs=1 --invalidate=1 --output-format=json
}

for w in "randread 4k 64" "read 1m 16" "write 1m 16"; do
  set -- $w
  pattern=$1 bs=$2 qd=$3
  echo
  echo "== $pattern bs=$bs QD=$qd =="
  tmp="$runs_dir/$pattern-$bs-qd$qd" # gR.json, fR.json: round R's gpu-io and fio JSON, kept
  mkdir -p "$tmp"
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then
      run_gpuio "$pattern" "$bs" "$qd" >"$tmp/g$r.json"; run_fio "$pattern" "$bs" "$qd" >"$tmp/f$r.json"
    else
      run_fio "$pattern" "$bs" "$qd" >"$tmp/f$r.json"; run_gpuio "$pattern" "$bs" "$qd" >"$tmp/g$r.json"
    fi
  done
  python3 - "$tmp" "$rounds" "$pattern" <<'PY'
import json, statistics, sys
d, rounds, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3]
side = "write" if "write" in pattern else "read"
rows = []
for r in range(1, rounds + 1):
    g = json.load(open(f"{d}/g{r}.json"))
    ftxt = open(f"{d}/f{r}.json").read()
    f = json.loads(ftxt[ftxt.index("{"):])["jobs"][0]
    fs = f[side]
    rt = f["job_runtime"] / 1000.0
    f_iops, f_bw = fs["iops"], fs["bw_bytes"]
    f_cpu = (f["usr_cpu"] + f["sys_cpu"]) / 100.0 * rt / max(fs["total_ios"], 1) * 1e6
    g_cpu = g["cpu"]["per_io_us"]
    rows.append((g["iops"], f_iops, g["bytes_per_sec"], f_bw, g_cpu, f_cpu,
                 g["latency_us"]["p50"], fs["clat_ns"]["percentile"]["50.000000"] / 1000))
    print(f"round {r}: gpu-io {g['iops']:9.0f} IOPS {g['bytes_per_sec']/2**20:8.1f} MiB/s cpu {g_cpu:5.1f} us/IO p50 {rows[-1][6]:7.0f} us | "
          f"fio {f_iops:9.0f} IOPS {f_bw/2**20:8.1f} MiB/s cpu {f_cpu:5.1f} us/IO p50 {rows[-1][7]:7.0f} us | ratio {g['iops']/f_iops:.3f}")
ratios = [a / b for a, b, *_ in rows]
print(f"median gpu-io/fio IOPS ratio: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
      f"median CPU us/IO gpu-io {statistics.median(r[4] for r in rows):.1f} vs fio {statistics.median(r[5] for r in rows):.1f}")
PY
  echo "-- same run, other references (gpuio bench --compare):"
  "$gpuio" bench --file "$file" --overwrite --pattern "$pattern" --block-size "$bs" --queue-depth "$qd" \
    --duration "$secs" --compare | sed -n '/┌/,/┘/p'
done
