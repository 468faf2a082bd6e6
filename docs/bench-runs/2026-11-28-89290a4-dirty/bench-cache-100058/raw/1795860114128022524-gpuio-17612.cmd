/work/main/target/release/gpuio graph gen --kind kron --scale 21 --degree 16 --seed 1 -o /tmp/gpuio-cache.sJHEeU/kron --json
