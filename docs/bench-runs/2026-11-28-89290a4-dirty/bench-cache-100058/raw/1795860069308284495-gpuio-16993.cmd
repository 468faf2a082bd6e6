/work/main/target/release/gpuio gather --table /tmp/gpuio-cache.sJHEeU/table.bin --row-bytes 4096 --batch 4096 --batches 60 --dist uniform --cache-size 10% --queue-depth 64 --json
