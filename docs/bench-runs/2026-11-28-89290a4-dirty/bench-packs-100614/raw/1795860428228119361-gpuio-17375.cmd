/work/main/target/release/gpuio bench --file /tmp/gpuio-packs.mLhbcP/mixed.bin --pattern read --block-size 1M --queue-depth 16 --duration 5 --json
