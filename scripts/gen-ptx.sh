#!/usr/bin/env bash
# Regenerates crates/gpuio-cuda/kernels/copy_kernel.ptx from kernels/copy.cu with NVRTC (no GPU
# needed), for compute_75, and lowers the PTX ISA version to 7.0 so drivers from CUDA 11 on can JIT it
# (the kernel uses nothing newer). Checks the result with ptxas for sm_75/80/90 when one is given.
#
#   NVRTC=/path/to/libnvrtc.so.13 [PTXAS=/path/to/ptxas] scripts/gen-ptx.sh
#
# Without NVRTC set, it fetches the nvidia-cuda-nvrtc (and, for ptxas, nvidia-cuda-nvcc) wheels with
# pip into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
K=crates/gpuio-cuda/kernels
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "${NVRTC:-}" ]; then
    pip download -q --no-deps -d "$tmp" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-nvcc==13.0.88"
    (cd "$tmp" && for w in *.whl; do unzip -qo "$w"; done)
    NVRTC=$(find "$tmp" -name 'libnvrtc.so.13' | head -1)
    PTXAS=${PTXAS:-$(find "$tmp" -name ptxas -type f | head -1)}
fi
LD_LIBRARY_PATH="$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}" python3 - "$NVRTC" "$K/copy.cu" >"$tmp/copy.ptx" <<'PY'
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
src = open(sys.argv[2], "rb").read()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"copy.cu", 0, None, None) == 0
opts = [b"--gpu-architecture=compute_75", b"-default-device", b"--std=c++17"]
r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
if r != 0:
    sys.exit(log.value.decode())
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
sys.stdout.write(ptx.value.decode())
PY
sed -i 's/^\.version [0-9.]*$/.version 7.0/' "$tmp/copy.ptx"
if [ -n "${PTXAS:-}" ]; then
    for arch in sm_75 sm_80 sm_90; do "$PTXAS" -arch=$arch "$tmp/copy.ptx" -o "$tmp/$arch.cubin"; done
    echo "ptxas: sm_75, sm_80, sm_90 ok"
fi
cp "$tmp/copy.ptx" "$K/copy_kernel.ptx"
echo "$K/copy_kernel.ptx"
