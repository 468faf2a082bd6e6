/work/main/target/release/gpuio bench --file /dev/shm/gpuio-packs.WcDwyo/p.gpk:mixed.bin --pattern read --block-size 1M --queue-depth 16 --duration 5 --direct off --json
