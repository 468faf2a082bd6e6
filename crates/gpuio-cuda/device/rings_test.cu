// Kernels that instantiate everything in gpuio.cuh, so NVRTC and ptxas check all of it
// (tests/rings_nvrtc.rs). Also the shape of the planned workloads: a random-read kernel (issue 15's
// 4 KiB random-read measurement) and an embedding gather with prefetch.
#include "gpuio.cuh"

// Each thread reads one u64 per line of `idx` through the cache; sums into out[thread].
extern "C" __global__ void gpuio_rings_gather(gpuio::array<unsigned long long> a, const unsigned long long* idx,
                                              unsigned long long n, unsigned long long* out, int* errors) {
  unsigned long long t = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  if (t >= n) return;
  int err = 0;
  unsigned long long v = a.read(idx[t], &err);
  if (err) atomicAdd(errors, 1);
  out[t] = v;
}

// AGILE-style: start the next element's load, work on the current one, then wait.
extern "C" __global__ void gpuio_rings_prefetch(gpuio::array<float> a, const unsigned long long* idx,
                                                unsigned long long n, float* out, int* errors) {
  unsigned long long t = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  unsigned long long stride = gridDim.x * (unsigned long long)blockDim.x;
  if (t >= n) return;
  gpuio::ticket<float> cur = a.prefetch(idx[t]);
  float acc = 0.f;
  for (unsigned long long i = t; i < n; i += stride) {
    gpuio::ticket<float> next;
    bool more = i + stride < n;
    if (more) next = a.prefetch(idx[i + stride]);
    int err = 0;
    float* p = a.wait(cur, &err);
    if (p) {
      acc += *p;
      a.release(cur);
    } else {
      atomicAdd(errors, 1);
    }
    if (more) cur = next;
  }
  out[t] = acc;
}

extern "C" __global__ void gpuio_rings_scale(gpuio::array<float> a, unsigned long long n, float k, int* errors) {
  unsigned long long t = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  if (t >= n) return;
  int err = 0;
  float v = a.read(t, &err);
  if (!err) err = a.write(t, v * k);
  if (err) atomicAdd(errors, 1);
}

extern "C" __global__ void gpuio_rings_flush(gpuio::array<float> a, int* errors) {
  int e = a.flush();
  if (e) atomicAdd(errors, 1);
}

// Raw ring use: one READ per thread into dst + thread * len, waited for.
extern "C" __global__ void gpuio_rings_raw_reads(gpuio::Queue q, unsigned int file_id, unsigned int len,
                                                 unsigned long long dst, unsigned int n, int* results) {
  unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n || t >= q.completion_count) return;
  gpuio::Request r;
  r.opcode = gpuio::OP_READ;
  r.file_id = file_id;
  r.offset = (unsigned long long)t * len;
  r.length = len;
  r.completion = t;
  r.dev_addr = dst + (unsigned long long)t * len;
  r.tag = t + 1;
  int e = q.submit_until(blockIdx.x % q.ring_count, r);
  results[t] = e ? e : q.wait(t, r.tag);
}
