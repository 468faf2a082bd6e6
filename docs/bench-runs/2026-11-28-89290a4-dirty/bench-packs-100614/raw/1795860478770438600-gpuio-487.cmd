/work/main/target/release/gpuio pack /tmp/gpuio-packs.mLhbcP/mixed.bin -o /tmp/gpuio-packs.mLhbcP/mixed-xz.gpk --codec xz --json
