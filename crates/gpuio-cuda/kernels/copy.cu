// gpu-io's programmed-I/O copy: device threads read host memory that is pinned and mapped into the
// device's address space, and store it into device memory (no copy engine, no DMA descriptor).
// Compiled to PTX by scripts/gen-ptx.sh (NVRTC, compute_75) into src/copy_kernel.ptx, which the
// driver JIT-compiles for the GPU at hand.
extern "C" __global__ void gpuio_copy_mapped(const unsigned char* __restrict__ src,
                                             unsigned char* __restrict__ dst,
                                             unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    if ((((unsigned long long)src | (unsigned long long)dst) & 15ull) == 0) {
        // Both 16-byte aligned: 16-byte loads, so each warp asks PCIe for 512 contiguous bytes.
        const uint4* s = (const uint4*)src;
        uint4* d = (uint4*)dst;
        unsigned long long n16 = n >> 4;
        for (unsigned long long k = i; k < n16; k += stride) d[k] = s[k];
        for (unsigned long long k = (n16 << 4) + i; k < n; k += stride) dst[k] = src[k];
    } else {
        for (unsigned long long k = i; k < n; k += stride) dst[k] = src[k];
    }
}
