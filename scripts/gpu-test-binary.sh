#!/usr/bin/env bash
# Builds gpuio-cuda's test binaries that exercise a real GPU (tests/gpu.rs; the GPU case of
# tests/store.rs) and copies them to target/gpu-tests/, fixed paths a GPU machine can run (it has no
# Rust toolchain): GPU_TESTS=target/gpu-tests scripts/bench-gpu.sh. On a machine without a GPU they
# skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/gpu-tests
cargo test -p gpuio-cuda --release --test gpu --test store --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, shutil, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("gpu", "store"):
        shutil.copy(m["executable"], "target/gpu-tests/" + m["target"]["name"])
        print("target/gpu-tests/" + m["target"]["name"])'
