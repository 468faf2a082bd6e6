#!/usr/bin/env bash
# The mmap backend's read path before (OLD, the commit before the change) and after (NEW) the fault
# ranges: 4 KiB random reads and 1 MiB sequential reads of a page-cached file, alternating, 3 rounds.
set -euo pipefail
F=${FILE:-/var/tmp/m.st}
for round in 1 2 3; do
  for bin in "$OLD" "$NEW"; do
    for args in "--pattern randread --block-size 4K --queue-depth 64" "--pattern read --block-size 1M --queue-depth 16"; do
      echo "{\"round\": $round, \"bin\": \"$bin\", \"args\": \"$args\", \"r\": $($bin bench --file $F $args --backend mmap --warm --duration 2 --json | tr -d '\n')}"
    done
  done
done
