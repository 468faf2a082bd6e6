/work/main/target/release/gpuio bench --file /dev/loop0 --overwrite --pattern randwrite --block-size 4k --queue-depth 64 --duration 2 --json
