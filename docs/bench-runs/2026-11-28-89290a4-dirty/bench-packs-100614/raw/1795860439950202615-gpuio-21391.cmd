/work/main/target/release/gpuio pack /tmp/gpuio-packs.mLhbcP/mixed.bin -o /tmp/gpuio-packs.mLhbcP/mixed-zlib.gpk --codec zlib --json
