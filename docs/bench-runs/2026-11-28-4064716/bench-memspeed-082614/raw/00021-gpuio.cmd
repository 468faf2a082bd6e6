/work/main/target/release/gpuio bench --file /dev/shm/gpuio-memspeed.bin --overwrite --pattern read --block-size 1m --queue-depth 16 --duration 2 --json
