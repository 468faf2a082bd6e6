#!/usr/bin/env bash
# Regenerates the embedded PTX with NVRTC (no GPU needed), and lowers the PTX ISA version so that
# drivers older than this NVRTC can JIT it (the kernels use nothing newer than the version set):
#   crates/gpuio-cuda/kernels/copy_kernel.ptx   from kernels/copy.cu       compute_75, ISA 7.0
#   crates/gpuio-cuda/device/workloads.ptx      from device/workloads.cu   compute_80, ISA 7.0
#                                               (with device/gpuio.cuh: sm_70 features, PTX 6.3)
# Checks each result with ptxas for the architectures it targets when one is given.
#
#   NVRTC=/path/to/libnvrtc.so.13 [PTXAS=/path/to/ptxas] scripts/gen-ptx.sh
#
# Without NVRTC set, it fetches the nvidia-cuda-nvrtc (and, for ptxas, nvidia-cuda-nvcc) wheels with
# pip into a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
C=crates/gpuio-cuda
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "${NVRTC:-}" ]; then
    pip download -q --no-deps -d "$tmp" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-nvcc==13.0.88"
    (cd "$tmp" && for w in *.whl; do unzip -qo "$w"; done)
    NVRTC=$(find "$tmp" -name 'libnvrtc.so.13' | head -1)
    PTXAS=${PTXAS:-$(find "$tmp" -name ptxas -type f | head -1)}
fi

# compile SRC ARCH OUT [HEADER]: NVRTC SRC (HEADER made includable by its file name) to OUT.
compile() {
    LD_LIBRARY_PATH="$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}" python3 - "$NVRTC" "$1" "$2" "${4:-}" >"$3" <<'PY'
import ctypes, os, sys
lib = ctypes.CDLL(sys.argv[1])
src = open(sys.argv[2], "rb").read()
arch = sys.argv[3]
hdr = sys.argv[4]
heads, names = [], []
if hdr:
    heads.append(open(hdr, "rb").read())
    names.append(os.path.basename(hdr).encode())
n = len(heads)
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(sys.argv[2]).encode(), n,
                              (ctypes.c_char_p * max(n, 1))(*heads), (ctypes.c_char_p * max(n, 1))(*names)) == 0
opts = [b"--gpu-architecture=" + arch.encode(), b"-default-device", b"--std=c++17"]
r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
lib.nvrtcGetProgramLog(prog, log)
if r != 0:
    sys.exit(log.value.decode())
lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
lib.nvrtcGetPTX(prog, ptx)
sys.stdout.write(ptx.value.decode())
PY
    sed -i 's/^\.version [0-9.]*$/.version 7.0/' "$3"
}

# check PTX ARCH...: assembles PTX for each ARCH when a ptxas is at hand.
check() {
    local ptx=$1
    shift
    [ -n "${PTXAS:-}" ] || return 0
    for arch in "$@"; do "$PTXAS" -arch="$arch" "$ptx" -o "$tmp/$arch.cubin"; done
    echo "ptxas: $(basename "$ptx"): $* ok"
}

compile "$C/kernels/copy.cu" compute_75 "$tmp/copy.ptx"
check "$tmp/copy.ptx" sm_75 sm_80 sm_90
cp "$tmp/copy.ptx" "$C/kernels/copy_kernel.ptx"
echo "$C/kernels/copy_kernel.ptx"

compile "$C/device/workloads.cu" compute_80 "$tmp/workloads.ptx" "$C/device/gpuio.cuh"
check "$tmp/workloads.ptx" sm_80 sm_90
cp "$tmp/workloads.ptx" "$C/device/workloads.ptx"
echo "$C/device/workloads.ptx"
