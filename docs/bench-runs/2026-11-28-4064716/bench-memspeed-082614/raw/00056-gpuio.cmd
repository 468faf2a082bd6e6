/work/main/target/release/gpuio bench --file /dev/loop0 --overwrite --pattern read --block-size 1m --queue-depth 16 --duration 2 --json
