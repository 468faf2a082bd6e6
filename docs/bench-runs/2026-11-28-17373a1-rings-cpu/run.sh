#!/usr/bin/env bash
# The ring server on the host stand-in (CPU producers, 64 reads in flight, 1 polling thread) against
# the engine's own random reads (QD 64, one thread) of the same file, same sizes, alternating, 3 rounds.
set -euo pipefail
G=${GPUIO:-target/release/gpuio}
F=${FILE:-/dev/shm/t1g}
for round in 1 2 3; do
  for bs in 4K 16K 64K; do
    n=200000; [ $bs = 64K ] && n=60000
    echo "{\"round\": $round, \"bs\": \"$bs\", \"engine\": $($G bench --file $F --pattern randread --block-size $bs --queue-depth 64 --duration 2 --json | tr -d '\n'), \"rings\": $($G rings $F --device cpu --block-size $bs --reads $n --threads 64 --server-threads 1 --json | tr -d '\n')}"
  done
done
