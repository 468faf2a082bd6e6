#!/usr/bin/env bash
# Prepares one GPU run (issue 12) here, on an ordinary x86-64 machine with Rust and network, so the GPU
# machine (CUDA driver, PyTorch, safetensors, CuPy; no Rust, no network) only runs it:
#
#   scripts/bench-gpu.sh              # here: .gpu/gpuio, .gpu/tests/*, .gpu/gpuio-*.whl, the peers' wheels in .whl/
#   python3 scripts/bench-gpu.py      # there, from the repository root; results in $OUT
#   DEVICE=cpu SIZE_GIB=0.5 python3 scripts/bench-gpu.py   # a rehearsal here, on the host stand-in
#
# scripts/bench-gpu.py says what it measures, section by section, each with a timeout and the whole
# within BUDGET_S seconds. .gpu/ and .whl/ are ignored by git (.git/info/exclude) and carried to the
# GPU machine; the wheels are for its Python 3.12 (fastsafetensors, InstantTensor, KvikIO and what
# KvikIO needs that the machine lacks).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/tests .whl
cargo build --release -p gpuio-cli
strip -o .gpu/gpuio "${CARGO_TARGET_DIR:-target}/release/gpuio"
cargo test -p gpuio-cuda --release --test gpu --test store --test staged_load --test zerocopy \
    --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, subprocess, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        dst = ".gpu/tests/" + m["target"]["name"]
        subprocess.run(["strip", "-o", dst, m["executable"]], check=True)
        print(dst)'
# The Python package (python/, abi3), for issue 14's load onto the GPU and its tests there.
rm -f .gpu/gpuio-*.whl
(cd python && PATH="$PWD/../target/py-venv/bin:$PATH" maturin build --release -q -o ../.gpu) \
    || { echo "bench-gpu.sh: building the Python wheel needs maturin (scripts/test-python.sh installs it)" >&2; exit 1; }
platforms=""
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms="$platforms --platform manylinux_${n}_x86_64"; done
for w in fastsafetensors==0.5.0 instanttensor==0.2.2 kvikio-cu13==26.10.0 libkvikio-cu13==26.10.0 \
    rapids-logger==0.3.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms -d .whl "$w"
done
du -sh .gpu .whl
