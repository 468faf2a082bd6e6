/work/main/target/release/examples/cache_bench /tmp/gpuio-cache.sJHEeU/table.bin 1024 3
