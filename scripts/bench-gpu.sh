#!/usr/bin/env bash
# GPU measurements for issue 6, run on the GPU machine (CUDA 13 driver, PyTorch, safetensors, CuPy;
# no Rust, no network). The gpuio binary is built on an ordinary machine and carried:
#
#   cargo build --release && scripts/gpu-test-binary.sh   # here: the CLI and the GPU test binary
#   GPUIO=target/release/gpuio SIZE_GIB=4 scripts/bench-gpu.sh   # there; results in $OUT (or ./bench-gpu-out)
#
# What it measures, each against its reference in the same run:
#   1. a safetensors file of SIZE_GIB GiB made with torch (bf16/fp32 tensors of mixed shapes);
#   2. gpuio load --device cuda:0 --json with 1, 2 and 3 staging buffers, against
#      safetensors.torch.load_file(path, device="cuda") and against torch reading the file through mmap
#      then .cuda(); every tensor checked (gpuio's CRC-32 of device memory read back = zlib.crc32 of the
#      file's bytes = zlib.crc32 of the tensor safetensors put on the GPU; torch.equal of mmap vs
#      safetensors);
#   3. file -> GPU bytes/s (gpuio bench --target cuda:0) against fio's sequential read of the same file;
#   4. the PIO/DMA threshold: per-transfer time of a DMA copy (cudaMemcpyAsync from pinned memory) vs a
#      kernel reading mapped pinned host memory in place (zero-copy), 64 B .. 1 MiB;
#   5. gpuio info --json (driver, GPU, cuFile status and reasons);
#   6. gpuio's own PIO/DMA sweep (gpuio bench --target cuda:0 --pio-sweep), the threshold the loaders use;
#   7. zero-copy mapping (gpuio load --path zero-copy) and a zstd/lz4 pack of the model loaded onto the
#      GPU (PACK:ENTRY), each checked against the staged load's CRCs;
#   8. the GPU test binaries (byte-exact staged/PIO/zero-copy/direct loads, stores and saves from
#      device memory, out-of-memory) when carried (GPU_TESTS=target/gpu-tests, built by
#      scripts/gpu-test-binary.sh);
#   9. GDS against staged: gpuio load --path direct vs --path staged (when cuFile works there; else
#      the reason), and a load + save from device memory (--save-to) compared byte for byte.
# Page cache: dropped before each cold run when /proc/sys/vm/drop_caches is writable (root); the
# results say whether it was. gpuio reads with O_DIRECT, safetensors and torch through the page cache.
set -euo pipefail

GPUIO=${GPUIO:-./target/release/gpuio}
SIZE_GIB=${SIZE_GIB:-4}
ROUNDS=${ROUNDS:-3}
DIR=${DIR:-${TMPDIR:-/tmp}/gpuio-bench-gpu}
OUT=${OUT:-./bench-gpu-out}
PY=${PY:-python3}
mkdir -p "$DIR" "$OUT"
FILE="$DIR/model-${SIZE_GIB}g.safetensors"
LOG="$OUT/bench-gpu.log"
: >"$LOG"
log() { echo "$*" | tee -a "$LOG" >&2; }

[ -x "$GPUIO" ] || { log "no gpuio binary at $GPUIO (set GPUIO=...)"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG" 2>&1 || true
"$GPUIO" info --json >"$OUT/info.json" 2>>"$LOG" || log "gpuio info failed"

drop_caches() {
    if [ -w /proc/sys/vm/drop_caches ]; then
        sync && echo 3 >/proc/sys/vm/drop_caches && echo cold
    else
        echo warm
    fi
}

if [ ! -s "$FILE" ]; then
    log "making $FILE ($SIZE_GIB GiB)"
    "$PY" - "$FILE" "$SIZE_GIB" <<'EOF'
import sys, torch
from safetensors.torch import save_file
path, gib = sys.argv[1], float(sys.argv[2])
target = int(gib * (1 << 30))
g = torch.Generator(device="cuda").manual_seed(1)
tensors, total, i = {}, 0, 0
shapes = [(4096, 4096), (4096, 11008), (11008, 4096), (4096,), (32000, 4096), (3,), ()]
while total < target:
    s = shapes[i % len(shapes)]
    dt = torch.float32 if i % 5 == 3 else torch.bfloat16
    t = torch.randn(s, generator=g, device="cuda", dtype=torch.float32).to(dt).cpu()
    tensors[f"layers.{i}.w"] = t
    total += t.numel() * t.element_size()
    i += 1
save_file(tensors, path, metadata={"format": "pt"})
print(f"{len(tensors)} tensors, {total} bytes")
EOF
fi
ls -l "$FILE" >>"$LOG"

# 2. gpuio load with 1/2/3 staging buffers, then the torch references, alternating rounds.
for r in $(seq 1 "$ROUNDS"); do
    for n in 1 2 3; do
        cache=$(drop_caches)
        "$GPUIO" load "$FILE" --device cuda:0 --json --staging-buffers "$n" >"$OUT/load-n$n-r$r.json"
        log "round $r gpuio staging=$n ($cache): $("$PY" -c "import json,sys; v=json.load(open(sys.argv[1])); print('%.3f s %.2f GB/s' % (v['seconds'], v['bytes_per_sec'] / 1e9))" "$OUT/load-n$n-r$r.json")"
    done
    cache=$(drop_caches)
    "$PY" - "$FILE" "$OUT/torch-r$r.json" "$cache" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, time, torch
from safetensors.torch import load_file
path, out, cache = sys.argv[1:4]
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
t = time.perf_counter(); st = load_file(path, device="cuda"); torch.cuda.synchronize()
st_s = time.perf_counter() - t
nbytes = sum(v.numel() * v.element_size() for v in st.values())
del st; torch.cuda.empty_cache()
import subprocess
subprocess.run(["sh", "-c", "[ -w /proc/sys/vm/drop_caches ] && sync && echo 3 > /proc/sys/vm/drop_caches || true"])
# torch through mmap: map the file, view each tensor's bytes in place, then .cuda().
import numpy as np
t = time.perf_counter()
mm = np.memmap(path, dtype=np.uint8, mode="r")
n = int.from_bytes(mm[:8].tobytes(), "little")
hdr = json.loads(mm[8:8 + n].tobytes())
base = 8 + n
dt = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
res = {}
for k, v in hdr.items():
    if k == "__metadata__": continue
    b, e = v["data_offsets"]
    res[k] = torch.frombuffer(memoryview(mm[base + b:base + e]), dtype=dt[v["dtype"]]).reshape(v["shape"]).cuda()
torch.cuda.synchronize()
mm_s = time.perf_counter() - t
json.dump({"bytes": nbytes, "safetensors_s": st_s, "mmap_cuda_s": mm_s, "cache": cache}, open(out, "w"))
print(f"safetensors.load_file(cuda) {st_s:.3f} s {nbytes/st_s/1e9:.2f} GB/s; mmap+.cuda() {mm_s:.3f} s {nbytes/mm_s/1e9:.2f} GB/s ({cache})")
EOF
done

# Verification: every tensor, three ways.
"$PY" - "$FILE" "$OUT/load-n2-r1.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, zlib, torch, numpy as np
from safetensors.torch import load_file
path, gj = sys.argv[1:3]
g = {t["name"]: t for t in json.load(open(gj))["tensors"]}
mm = np.memmap(path, dtype=np.uint8, mode="r")
n = int.from_bytes(mm[:8].tobytes(), "little")
hdr = json.loads(mm[8:8 + n].tobytes()); base = 8 + n
st = load_file(path, device="cuda")
bad = 0
for k, v in hdr.items():
    if k == "__metadata__": continue
    b, e = v["data_offsets"]
    file_crc = "%08x" % zlib.crc32(memoryview(mm[base + b:base + e]))
    st_bytes = st[k].detach().reshape(-1).view(torch.uint8).cpu().numpy() if st[k].numel() else np.zeros(0, np.uint8)
    st_crc = "%08x" % zlib.crc32(memoryview(st_bytes))
    if not (g[k]["crc32"] == file_crc == st_crc) or g[k]["bytes"] != e - b:
        bad += 1; print("MISMATCH", k, g[k]["crc32"], file_crc, st_crc)
print(f"verify: {len(g)} tensors, {bad} mismatches (gpuio device readback vs file vs safetensors on GPU)")
sys.exit(1 if bad else 0)
EOF

# 3. file -> GPU against fio on the same file (1 GiB+).
cache=$(drop_caches)
"$GPUIO" bench --target cuda:0 --file "$FILE" --pattern read --compare --json >"$OUT/bench-target-cuda.json" 2>>"$LOG" || log "bench --target failed"
log "file->GPU vs fio ($cache): $(cat "$OUT/bench-target-cuda.json" 2>/dev/null)"
for n in 1 2 3; do
    "$GPUIO" bench --target cuda:0 --file "$FILE" --pattern read --staging-buffers "$n" --json >"$OUT/bench-target-n$n.json" 2>>"$LOG" || true
done

# 4. PIO (kernel reads mapped pinned host memory) vs DMA (memcpy from pinned) per transfer size.
"$PY" - "$OUT/pio-dma.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys, time
import cupy as cp
rt = cp.cuda.runtime
copy = cp.RawKernel(r'''
extern "C" __global__ void copy(const unsigned char* __restrict__ src, unsigned char* dst, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) dst[i] = src[i];
}''', "copy")
stream = cp.cuda.Stream(non_blocking=True)
rows, reps = [], 200
size = 64
while size <= (1 << 20):
    hp = rt.hostAlloc(size, 2)                  # cudaHostAllocMapped
    dp = rt.hostGetDevicePointer(hp, 0)
    dst = cp.empty(size, dtype=cp.uint8)
    mapped = cp.ndarray(size, cp.uint8, cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(dp, size, None), 0))
    blocks = max(1, min(1024, size // 4096))
    def dma():
        rt.memcpyAsync(dst.data.ptr, hp, size, 1, stream.ptr); stream.synchronize()
    def pio():
        with stream: copy((blocks,), (256,), (mapped, dst, cp.uint64(size)))
        stream.synchronize()
    res = {}
    for name, f in (("dma", dma), ("pio", pio)):
        for _ in range(20): f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        ts.sort(); res[name] = ts[len(ts) // 2] * 1e6
    rows.append({"bytes": size, "dma_us": res["dma"], "pio_us": res["pio"]})
    print(f"{size:>8} B  DMA {res['dma']:8.2f} us  PIO(mapped) {res['pio']:8.2f} us")
    rt.freeHost(hp)
    size *= 4
cross = next((r["bytes"] for r in rows if r["dma_us"] < r["pio_us"]), None)
json.dump({"rows": rows, "dma_wins_from_bytes": cross}, open(sys.argv[1], "w"), indent=1)
print(f"DMA is faster from {cross} bytes (median of {reps})")
EOF
# 6. gpuio's own PIO/DMA sweep.
"$GPUIO" bench --target cuda:0 --pio-sweep --pio-max-size 1M --json >"$OUT/pio-sweep-gpuio.json" 2>>"$LOG" || log "gpuio pio sweep failed"
log "gpuio PIO/DMA sweep: $(cat "$OUT/pio-sweep-gpuio.json" 2>/dev/null)"

# 7. zero-copy and packs, checked against the staged load's CRCs.
crcs() { "$PY" -c "import json,sys; v=json.load(open(sys.argv[1])); print(sorted((t['name'], t['crc32c']) for t in v['tensors']) == sorted((t['name'], t['crc32c']) for t in json.load(open(sys.argv[2]))['tensors']))" "$1" "$2"; }
cache=$(drop_caches)
"$GPUIO" load "$FILE" --device cuda:0 --path zero-copy --json >"$OUT/load-zero-copy.json" 2>>"$LOG" || log "zero-copy load failed"
log "zero-copy ($cache): $("$PY" -c "import json,sys; v=json.load(open(sys.argv[1])); print('%.3f s, %s' % (v['seconds'], v['note']))" "$OUT/load-zero-copy.json" 2>&1); same tensors as staged: $(crcs "$OUT/load-zero-copy.json" "$OUT/load-n2-r1.json" 2>&1)"
for codec in lz4 zstd; do
    # A file given to `gpuio pack` becomes an entry named after it.
    "$GPUIO" pack "$FILE" -o "$DIR/model-$codec.gpk" --codec "$codec" --chunk-size 1M >>"$LOG" 2>&1 || { log "pack $codec failed"; continue; }
    cache=$(drop_caches)
    "$GPUIO" load "$DIR/model-$codec.gpk:$(basename "$FILE")" --device cuda:0 --json >"$OUT/load-pack-$codec.json" 2>>"$LOG" || log "pack $codec load failed"
    log "pack $codec -> GPU ($cache, $(stat -c %s "$DIR/model-$codec.gpk") bytes on disk): $("$PY" -c "import json,sys; v=json.load(open(sys.argv[1])); print('%.3f s %.2f GB/s' % (v['seconds'], v['bytes_per_sec'] / 1e9))" "$OUT/load-pack-$codec.json" 2>&1); same tensors as staged: $(crcs "$OUT/load-pack-$codec.json" "$OUT/load-n2-r1.json" 2>&1)"
done

# 9. GDS vs staged, and store from device memory.
for r in $(seq 1 "$ROUNDS"); do
    for p in staged direct; do
        cache=$(drop_caches)
        if "$GPUIO" load "$FILE" --device cuda:0 --path "$p" --json >"$OUT/load-path-$p-r$r.json" 2>"$OUT/load-path-$p-r$r.err"; then
            log "round $r --path $p ($cache): $("$PY" -c "import json,sys; v=json.load(open(sys.argv[1])); print('%.3f s %.2f GB/s; %s' % (v['seconds'], v['bytes_per_sec'] / 1e9, v['note']))" "$OUT/load-path-$p-r$r.json")"
        else
            log "round $r --path $p: $(cat "$OUT/load-path-$p-r$r.err")"
        fi
    done
done
cache=$(drop_caches)
"$GPUIO" load "$FILE" --device cuda:0 --save-to "$DIR/saved.safetensors" --json >"$OUT/load-save.json" 2>>"$LOG" &&
    log "save from device ($cache): $("$PY" -c "import json,sys; v=json.load(open(sys.argv[1]))['saved']; print('%.3f s %.2f GB/s' % (v['seconds'], v['bytes_per_sec'] / 1e9))" "$OUT/load-save.json"); identical to the input: $(cmp -s "$FILE" "$DIR/saved.safetensors" && echo yes || echo NO)" ||
    log "load --save-to failed"
rm -f "$DIR/saved.safetensors"

# 8. The GPU test binaries, when carried.
if [ -n "${GPU_TESTS:-}" ] && [ -d "$GPU_TESTS" ]; then
    { "$GPU_TESTS/gpu" --nocapture --test-threads 1 && "$GPU_TESTS/store" on_a_gpu --nocapture; } >"$OUT/gpu-tests.log" 2>&1 &&
        log "GPU tests passed" || log "GPU tests FAILED (see gpu-tests.log)"
fi
log "results in $OUT"
