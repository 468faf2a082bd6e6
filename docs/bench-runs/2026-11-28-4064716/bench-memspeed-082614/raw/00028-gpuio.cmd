/work/main/target/release/gpuio bench --file /dev/shm/gpuio-memspeed.bin --overwrite --pattern randread --block-size 4k --queue-depth 64 --duration 2 --json --threads 2
