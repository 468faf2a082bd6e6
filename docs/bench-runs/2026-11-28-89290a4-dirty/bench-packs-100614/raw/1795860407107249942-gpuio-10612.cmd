/work/main/target/release/gpuio bench --file /tmp/gpuio-packs.mLhbcP/mixed-lz4.gpk:mixed.bin --pattern randread --block-size 4K --queue-depth 64 --duration 5 --json
