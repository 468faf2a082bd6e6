/work/main/target/release/gpuio bfs /tmp/gpuio-cache.sJHEeU/kron --source 1725327 --mode cache --cache-size 20% --line-size 4K --queue-depth 64 --coalesce 0 --json
