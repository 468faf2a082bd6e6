#!/usr/bin/env bash
# Measures the N-buffered pipeline (issue 5), all in one run:
#
#   1. calibration: `gpuio stream --compute none` reads the file; its read time per KiB becomes the
#      `--compute spin:NS` that makes compute take about as long as reading;
#   2. serial against overlapped: slots=1 and slots=3 with that compute, alternating which goes first,
#      ROUNDS rounds; per round the wall times, overlap efficiency (busiest stage's busy time / wall) and
#      the speedup; then medians against the goals (slots=3: efficiency >= 0.87, >= 1.6x serial);
#   3. a sweep of slots 1..6 x chunk sizes 256K, 1M, 4M (one run each, same compute);
#   4. `gpuio cp` of a CP_SIZE file against `cp` followed by `sync` and against
#      `dd bs=4M oflag=direct conv=fsync`, alternating, ROUNDS rounds: gpuio cp fsyncs the copy and its
#      directory, so the references are timed until their data is on disk too.
#
#   scripts/bench-pipeline.sh [SIZE] [ROUNDS] [CP_SIZE] [DIR]
#
# SIZE (default 1G) is the streamed file, CP_SIZE (default 2G) the copied one, both made once in DIR
# (default $TMPDIR or /tmp) and removed at the end. Page caches are dropped before each run when this
# runs as root (else the reads of `cp` and `dd` may be served from memory: the script says so; set
# DROP_CACHES=0 not to touch a machine others are measuring on); gpuio reads and writes with O_DIRECT
# where the filesystem allows. Needs python3. Every run's JSON and timing is kept under
# docs/bench-runs/DATE-COMMIT/.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
gpuio="$here/target/release/gpuio"
size=${1:-1G}
rounds=${2:-3}
cp_size=${3:-2G}
dir=${4:-${TMPDIR:-/tmp}}

command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
# The results directory (every stream run's JSON, the cp timings) is kept under docs/bench-runs/ with
# the command (see bench-runs.sh); the scratch files are removed.
. "$here/scripts/bench-runs.sh"
bench_runs_start "$0" "$@"

work=$(mktemp -d "$dir/gpuio-bench-pipeline.XXXXXX")
results="$runs_dir/results"
trap 'rm -rf "$work"' EXIT
mkdir -p "$results"
{
  echo "calibrate.json, s1-R.json, s3-R.json, sweep-SLOTS-CHUNK.json: gpuio stream --json outputs;"
  echo "cp-R.txt: seconds per copy. Commands: see scripts/bench-pipeline.sh at this commit, with"
  echo "SIZE=$size ROUNDS=$rounds CP_SIZE=$cp_size DIR=$dir"
} >"$results/README.txt"

bytes() { python3 -c "import sys; s=sys.argv[1].upper().rstrip('B').rstrip('I'); m={'K':1<<10,'M':1<<20,'G':1<<30,'T':1<<40}; print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))" "$1"; }

can_drop=no
if [ "${DROP_CACHES:-1}" != 0 ] && [ -w /proc/sys/vm/drop_caches ]; then can_drop=yes; fi
drop_caches() {
  sync
  if [ "$can_drop" = yes ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

make_file() { # path size
  local n=$(( $(bytes "$2") / 4194304 )) rest=$(( $(bytes "$2") % 4194304 ))
  head -c $(( n * 4194304 + rest )) /dev/urandom >"$1"
  sync
}

now() { date +%s.%N; }

echo "pipeline benchmark: stream $size, cp $cp_size, $rounds rounds, in $work"
echo "$(nproc) CPUs, kernel $(uname -r), $("$gpuio" --version), drop caches: $can_drop"
[ "$can_drop" = yes ] || echo "note: page caches are not dropped (not root, or DROP_CACHES=0): cp and dd may read from memory"

src="$work/stream.bin"
make_file "$src" "$size"

# 1. Calibration: read-only throughput.
drop_caches
"$gpuio" stream --input "$src" --compute none --slots 3 --json >"$results/calibrate.json"
ns=$(python3 - "$results/calibrate.json" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
read = next(s for s in v["stages"] if s["name"] == "read")
kib = v["bytes"] / 1024
print(max(1, round(read["busy_s"] * 1e9 / kib)))
PY
)
echo
echo "== calibration: read-only, slots=3: $(python3 -c "import json;v=json.load(open('$results/calibrate.json'));print(f\"{v['bytes_per_sec']/2**20:.0f} MiB/s\")"); compute set to spin:$ns (ns per KiB) =="

stream() { # slots chunk out.json
  drop_caches
  "$gpuio" stream --input "$src" --compute "spin:$ns" --slots "$1" --chunk-size "$2" --json >"$3"
}

# 2. Serial against overlapped, alternating.
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then
    stream 1 4M "$results/s1-$r.json"; stream 3 4M "$results/s3-$r.json"
  else
    stream 3 4M "$results/s3-$r.json"; stream 1 4M "$results/s1-$r.json"
  fi
done
echo
echo "== slots=1 (serial) against slots=3, chunk 4M, compute spin:$ns =="
python3 - "$results" "$rounds" <<'PY'
import json, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
def busy(v):
    return {s["name"]: s["busy_s"] for s in v["stages"]}
rows = []
for r in range(1, rounds + 1):
    a = json.load(open(f"{d}/s1-{r}.json")); b = json.load(open(f"{d}/s3-{r}.json"))
    ba, bb = busy(a), busy(b)
    slowest = max(bb.values())
    rows.append((a["wall_s"], b["wall_s"], a["overlap_efficiency"], b["overlap_efficiency"], slowest))
    print(f"round {r}: slots=1 wall {a['wall_s']:.3f} s (read {ba['read']:.3f}, compute {ba['compute']:.3f}) eff {a['overlap_efficiency']:.2f} | "
          f"slots=3 wall {b['wall_s']:.3f} s (read {bb['read']:.3f}, compute {bb['compute']:.3f}) eff {b['overlap_efficiency']:.2f} "
          f"= {b['wall_s']/slowest:.3f} x slowest stage | speedup {a['wall_s']/b['wall_s']:.2f}")
eff = statistics.median(r[3] for r in rows)
speed = statistics.median(r[0] / r[1] for r in rows)
ratio = statistics.median(r[1] / r[4] for r in rows)
print(f"median: slots=3 overlap efficiency {eff:.3f} (goal >= 0.87), wall = {ratio:.3f} x slowest stage (goal <= 1.15), "
      f"speedup over serial {speed:.2f} x (goal >= 1.6)")
PY

# 3. Sweep.
echo
echo "== sweep: slots 1..6 x chunk sizes, compute spin:$ns =="
for chunk in 256K 1M 4M; do
  for slots in 1 2 3 4 5 6; do
    stream "$slots" "$chunk" "$results/sweep-$slots-$chunk.json"
  done
done
python3 - "$results" <<'PY'
import json, sys
d = sys.argv[1]
chunks = ["256K", "1M", "4M"]
print("| slots | " + " | ".join(f"{c}: MiB/s, efficiency" for c in chunks) + " |")
print("|---|" + "---|" * len(chunks))
for slots in range(1, 7):
    cells = []
    for c in chunks:
        v = json.load(open(f"{d}/sweep-{slots}-{c}.json"))
        cells.append(f"{v['bytes_per_sec']/2**20:.0f}, {v['overlap_efficiency']:.2f}")
    print(f"| {slots} | " + " | ".join(cells) + " |")
PY

# 4. gpuio cp against cp + sync and dd oflag=direct.
rm -f "$src"
csrc="$work/cp-src.bin"
dst="$work/cp-dst.bin"
make_file "$csrc" "$cp_size"
timed() { # name out-file command...
  local name=$1 out=$2; shift 2
  rm -f "$dst"; drop_caches
  local t0 t1; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now)
  echo "$name $(python3 -c "print($t1 - $t0)")" >>"$out"
  cmp -s "$csrc" "$dst" || { echo "$name: the copy differs" >&2; exit 1; }
}
run_gpuio() { "$gpuio" cp "$csrc" "$dst"; }
run_cp() { cp "$csrc" "$dst" && sync; }
run_dd() { dd if="$csrc" of="$dst" bs=4M oflag=direct conv=fsync; }
for r in $(seq 1 "$rounds"); do
  out="$results/cp-$r.txt"
  case $((r % 3)) in
    1) timed gpuio "$out" run_gpuio; timed cp "$out" run_cp; timed dd "$out" run_dd ;;
    2) timed cp "$out" run_cp; timed dd "$out" run_dd; timed gpuio "$out" run_gpuio ;;
    0) timed dd "$out" run_dd; timed gpuio "$out" run_gpuio; timed cp "$out" run_cp ;;
  esac
done
echo
echo "== gpuio cp $cp_size against cp + sync and dd bs=4M oflag=direct conv=fsync (seconds, each to stable storage) =="
python3 - "$results" "$rounds" "$(bytes "$cp_size")" <<'PY'
import statistics, sys
d, rounds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = []
for r in range(1, rounds + 1):
    t = dict(l.split() for l in open(f"{d}/cp-{r}.txt"))
    t = {k: float(v) for k, v in t.items()}
    rows.append(t)
    print(f"round {r}: gpuio cp {t['gpuio']:.2f} s ({size/t['gpuio']/2**20:.0f} MiB/s) | cp+sync {t['cp']:.2f} s | dd {t['dd']:.2f} s | "
          f"gpuio x cp {t['cp']/t['gpuio']:.2f}, gpuio x dd {t['dd']/t['gpuio']:.2f}")
for ref in ["cp", "dd"]:
    print(f"median speed of gpuio cp relative to {ref}: {statistics.median(r[ref] / r['gpuio'] for r in rows):.2f} x")
PY
