#!/usr/bin/env bash
# Measures the two engine defaults chosen by measurement: the io_uring submission batch and the task
# size large commands are split into. Prints one line per round; fio runs in each round for reference.
#   scripts/sweep-engine-defaults.sh FILE
f=${1:?usage: sweep-engine-defaults.sh FILE (1 GiB or more)}
g=$(cd "$(dirname "$0")/.." && pwd)/target/release/gpuio
echo "submission batch sweep: randread 4K QD64, 3 s, IOPS (fio in the same round)"
for r in 1 2 3; do
  line="round $r:"
  for b in 1 2 4 8 16 64; do
    v=$($g bench --file $f --pattern randread --duration 3 --submit-batch $b --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(round(v["iops"]))')
    line="$line b$b=$v"
  done
  fv=$(fio --name=x --filename=$f --rw=randread --bs=4k --iodepth=64 --ioengine=io_uring --direct=1 --runtime=3 --size=1G --output-format=terse | awk -F';' '{print $8}')
  echo "$line fio=$fv"
done
echo "task size sweep: read, 16 MiB loads, QD16 (16 tasks in flight), MiB/s and CPU us per 16 MiB load"
for r in 1 2; do
  line="round $r:"
  for t in 256K 512K 1M 2M 4M 8M; do
    v=$($g bench --file $f --pattern read --block-size 16M --queue-depth 16 --task-size $t --duration 3 --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(str(round(v["bytes_per_sec"]/2**20))+"/"+str(round(v["cpu"]["per_io_us"])))')
    line="$line t$t=$v"
  done
  echo "$line"
done
