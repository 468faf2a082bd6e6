#!/usr/bin/env bash
# Every test: the Rust workspace (unit, integration, mock-driver, fault-injection and CLI tests), then
# the Python package's pytest suite (scripts/test-python.sh builds it into target/py-venv).
#
#   scripts/test.sh
#
# Needs Rust, a C compiler (the mock CUDA driver), and CPython >= 3.9 with pip (PyPI reachable).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
scripts/test-python.sh
