#!/usr/bin/env bash
# Builds the Python package (python/, the gpuio-python crate) into a virtual environment and runs its
# pytest suite (python/tests). Exits non-zero on any failure.
#
#   scripts/test-python.sh            # venv in target/py-venv (reused), release build, pytest
#   PY=python3.12 scripts/test-python.sh
#   scripts/test-python.sh -k safetensors   # extra arguments go to pytest
#
# Needs CPython >= 3.9 with pip, and Rust. Installs from PyPI: maturin, numpy, safetensors, pytest.
# Where `python3 -m venv` is unavailable (Debian without python3-venv) it installs into the user's
# site-packages instead (pip --user), and says so. The Rust build shares the workspace's target
# directory (CARGO_TARGET_DIR if set), so after `cargo test --workspace --release` only the crate
# itself and pyo3 are compiled.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PY:-python3}"
venv="$root/target/py-venv"
start=$(date +%s)

"$py" -c 'import sys; assert sys.version_info >= (3, 9), sys.version' \
    || { echo "test-python: $py is older than 3.9" >&2; exit 1; }

pip_args=(--disable-pip-version-check --quiet)
if [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" >/dev/null 2>&1; then
    run_py="$venv/bin/python"
    echo "test-python: virtual environment $venv"
else
    rm -rf "$venv"
    run_py="$py"
    echo "test-python: '$py -m venv' is unavailable (install python3-venv to use one);" \
        "installing into the user's site-packages with pip --user instead"
    pip_args+=(--user)
    # PEP 668 (Debian 12+) marks the system interpreter externally managed; --user is still wanted.
    if "$py" -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
        pip_args+=(--break-system-packages)
    fi
fi

"$run_py" -m pip install "${pip_args[@]}" "maturin>=1.5,<2" "numpy>=1.22" safetensors pytest
# maturin's build backend runs the `maturin` program: put the directory pip installed it into first.
if [ "$run_py" = "$py" ]; then
    scheme='import os, sysconfig; print(sysconfig.get_path("scripts", os.name + "_user"))'
else
    scheme='import sysconfig; print(sysconfig.get_path("scripts"))'
fi
export PATH="$("$run_py" -c "$scheme"):$PATH"
# The package itself, built from this checkout (release, abi3) with the maturin just installed.
"$run_py" -m pip install "${pip_args[@]}" --no-build-isolation --force-reinstall --no-deps "$root/python"

# Run from the repository root so that the installed package, not python/gpuio's sources, is imported.
status=0
"$run_py" -m pytest -p no:cacheprovider -q -rs "$root/python/tests" "$@" || status=$?
echo "test-python: $(( $(date +%s) - start )) s"
exit "$status"
