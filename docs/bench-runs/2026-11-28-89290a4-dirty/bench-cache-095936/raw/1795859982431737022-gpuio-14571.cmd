/work/main/target/release/gpuio gather --table /dev/shm/gpuio-cache.Vm2b7f/table.bin --row-bytes 4096 --batch 4096 --batches 60 --dist uniform --cache-size 10% --queue-depth 64 --json
