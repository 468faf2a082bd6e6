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

// One delivery of the rings server (crates/gpuio-cuda/src/rings/server.rs): `len` bytes from mapped
// pinned host memory `src` to device memory `dst`, then the 8-byte completion `word` at `word_addr`
// (0: none), ordered after the bytes. The layout is `DeliveryDesc` in src/device.rs, byte for byte.
struct Delivery {
    unsigned long long src, dst, len, word_addr, word;
};

// A polling round's deliveries in one launch: block b handles deliveries b, b + gridDim.x, ... Its
// threads copy the bytes (16-byte loads when aligned), fence them device-wide, and only then one
// thread stores the completion word with release semantics at GPU scope, so a kernel that acquires
// the word (gpuio.cuh's `Queue::poll`) sees the bytes. One launch replaces a DMA and a stream value
// write per request: CAM and GPUfs move small requests' data the same way, in batches.
extern "C" __global__ void gpuio_deliver(const Delivery* __restrict__ d, unsigned int n) {
    __shared__ Delivery e;
    for (unsigned int k = blockIdx.x; k < n; k += gridDim.x) {
        if (threadIdx.x == 0) e = d[k];  // mapped host memory: read once per block
        __syncthreads();
        const unsigned char* src = (const unsigned char*)e.src;
        unsigned char* dst = (unsigned char*)e.dst;
        if (((e.src | e.dst) & 15ull) == 0) {
            const uint4* s = (const uint4*)src;
            uint4* t = (uint4*)dst;
            unsigned long long n16 = e.len >> 4;
            for (unsigned long long i = threadIdx.x; i < n16; i += blockDim.x) t[i] = s[i];
            for (unsigned long long i = (n16 << 4) + threadIdx.x; i < e.len; i += blockDim.x) dst[i] = src[i];
        } else {
            for (unsigned long long i = threadIdx.x; i < e.len; i += blockDim.x) dst[i] = src[i];
        }
        __threadfence();  // this thread's bytes, device-wide, before the barrier
        __syncthreads();
        if (threadIdx.x == 0 && e.word_addr != 0) {
            asm volatile("st.release.gpu.u64 [%0], %1;" ::"l"(e.word_addr), "l"(e.word) : "memory");
        }
        __syncthreads();  // `e` is rewritten by the next iteration
    }
}
