/work/main/target/release/gpuio --version
