#!/usr/bin/env bash
# Packs against the raw files they came from, per codec, in one run (issue 3).
#
#   scripts/bench-packs.sh [SIZE] [SECONDS]
#   CODECS="none lz4 zstd" scripts/bench-packs.sh ...   # a subset (default: every codec)
#
# For data that compresses about 2:1 (scripts/gen-bench-data.py mixed) and incompressible data (random),
# and each codec: the pack ratio and packing speed; the effective load bandwidth of the pack entry
# (logical bytes/s, 1 MiB reads at QD 16, direct I/O, one pass) against reading the raw file the same way,
# alternating which runs first; random 4 KiB logical reads per second; and decompression scaling from one
# to two cores (pack copied to /dev/shm so that storage is not the limit; taskset pins the process).
# The raw JSON of every run, with its command, is kept under docs/bench-runs/DATE-COMMIT/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
g="$here/target/release/gpuio"
size=${1:-1G}
secs=${2:-5}
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
# Every gpuio run's raw JSON and exact command kept under docs/bench-runs/ (see bench-runs.sh).
. "$here/scripts/bench-runs.sh"
bench_runs_start "$0" "$@"
g=$(bench_runs_wrap "$g")
work=$(mktemp -d "${TMPDIR:-/tmp}/gpuio-packs.XXXXXX")
shm=$(mktemp -d /dev/shm/gpuio-packs.XXXXXX)
trap 'rm -rf "$work" "$shm"' EXIT
echo "$(nproc) CPUs, kernel $(uname -r), $size per data set, $secs s per run; $("$g" --version)"

json() { python3 -c "import json,sys; v=json.load(sys.stdin); print($1)"; }
bw() { "$g" bench --file "$1" --pattern read --block-size 1M --queue-depth 16 --duration "$secs" --json | json 'v["bytes_per_sec"]'; }
iops4k() { "$g" bench --file "$1" --pattern randread --block-size 4K --queue-depth 64 --duration "$secs" --json | json 'v["iops"]'; }

for data in mixed random; do
  raw="$work/$data.bin"
  python3 "$here/scripts/gen-bench-data.py" "$data" "$size" "$raw"
  echo
  echo "== $data data =="
  printf '%-6s %7s %10s %12s %12s %9s %14s %9s\n' codec ratio "pack MB/s" "raw GB/s" "pack GB/s" "pack/raw" "4K reads/s" "2c/1c"
  for codec in ${CODECS:-none lz4 zstd zlib xz lzfse}; do
    pack="$work/$data-$codec.gpk"
    p=$("$g" pack "$raw" -o "$pack" --codec "$codec" --json)
    ratio=$(echo "$p" | json 'round(v["ratio"], 2)')
    pmbs=$(echo "$p" | json 'round(v["bytes_per_sec"] / 1e6)')
    # Alternate raw and pack so that drift in the shared disk hits both.
    r1=$(bw "$raw"); k1=$(bw "$pack:$data.bin"); k2=$(bw "$pack:$data.bin"); r2=$(bw "$raw")
    read -r rawbw packbw rel < <(python3 -c "r=($r1+$r2)/2; k=($k1+$k2)/2; print(round(r/1e9,2), round(k/1e9,2), round(k/r,2))")
    rnd=$(iops4k "$pack:$data.bin")
    cp "$pack" "$shm/p.gpk"
    one=$(taskset -c 0 "$g" bench --file "$shm/p.gpk:$data.bin" --pattern read --block-size 1M --queue-depth 16 --duration "$secs" --direct off --json | json 'v["bytes_per_sec"]')
    two=$("$g" bench --file "$shm/p.gpk:$data.bin" --pattern read --block-size 1M --queue-depth 16 --duration "$secs" --direct off --json | json 'v["bytes_per_sec"]')
    rm -f "$shm/p.gpk" "$pack"
    scale=$(python3 -c "print(round($two/$one, 2))")
    printf '%-6s %7s %10s %12s %12s %9s %14.0f %9s\n' "$codec" "$ratio" "$pmbs" "$rawbw" "$packbw" "$rel" "$rnd" "$scale"
  done
  rm -f "$raw"
done
