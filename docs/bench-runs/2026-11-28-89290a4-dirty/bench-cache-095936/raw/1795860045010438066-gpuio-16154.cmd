/work/main/target/release/gpuio bfs /dev/shm/gpuio-cache.Vm2b7f/kron --source 1725327 --mode mmap --cache-size 20% --line-size 4K --queue-depth 64 --coalesce 0 --json
