/work/main/target/release/gpuio pack /tmp/gpuio-packs.mLhbcP/mixed.bin -o /tmp/gpuio-packs.mLhbcP/mixed-lz4.gpk --codec lz4 --json
