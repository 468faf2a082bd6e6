/work/main/target/release/gpuio pack /tmp/gpuio-packs.mLhbcP/mixed.bin -o /tmp/gpuio-packs.mLhbcP/mixed-zstd.gpk --codec zstd --json
