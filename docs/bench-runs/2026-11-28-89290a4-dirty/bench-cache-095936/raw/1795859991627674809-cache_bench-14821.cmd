/work/main/target/release/examples/cache_bench /dev/shm/gpuio-cache.Vm2b7f/table.bin 1024 3
