// workloads.cu — the kernels gpu-io launches to measure and use GPU-issued I/O (issue 15), on top of
// gpuio.cuh. Compiled once to PTX by scripts/gen-ptx.sh (device/workloads.ptx, embedded by
// src/rings/kernels.rs; the driver JIT-compiles it for the GPU at hand). Every wait in here is
// bounded by gpuio.cuh's bounds; a kernel never spins forever on a server that went away.
//
// Host side: crates/gpuio-cuda/src/rings/kernels.rs builds the arguments (the Queue and CacheDesc
// structs byte for byte; tests/rings_nvrtc.rs checks their offsets against the Rust structs).
#include "gpuio.cuh"

typedef unsigned int u32;
typedef unsigned long long u64;

// Random reads straight through the rings (no device cache): thread t < stride (the threads launched,
// at most the completion words) issues reads i = t, t + stride, ... of `n`, each `len` bytes at offsets[i] into dst + t * len, waiting for each (so `threads`
// requests are in flight). Completion word t belongs to thread t; its tags count the thread's reads
// (from 1). errors[0] counts failed reads, errors[1] short ones; the first failure's code is kept in
// errors[2].
extern "C" __global__ void gpuio_rand_reads(gpuio::Queue q, u32 file_id, const u64* offsets, u64 n,
                                            u32 len, u64 dst, int* errors) {
  const u64 t = blockIdx.x * (u64)blockDim.x + threadIdx.x;
  const u64 launched = gridDim.x * (u64)blockDim.x;
  // Threads past the completion words issue nothing, and the ones that do cover every read.
  const u64 stride = launched < q.completion_count ? launched : q.completion_count;
  if (t >= stride) return;
  u32 tag = 0;
  for (u64 i = t; i < n; i += stride) {
    gpuio::Request r;
    r.opcode = gpuio::OP_READ;
    r.file_id = file_id;
    r.offset = offsets[i];
    r.length = len;
    r.completion = (u32)t;
    r.dev_addr = dst + t * len;
    tag = tag + 1 == 0 ? 1 : tag + 1;
    r.tag = tag;
    int e = q.submit_until(blockIdx.x % q.ring_count, r);
    int res = e ? e : q.wait((u32)t, tag);
    if (res < 0) {
      atomicAdd(&errors[0], 1);
      atomicCAS(&errors[2], 0, res);
      if (res == gpuio::E_SHUTDOWN || res == gpuio::E_TIMEDOUT) return;  // the server is gone
    } else if ((u32)res != len) {
      atomicAdd(&errors[1], 1);
    }
  }
}

// An embedding gather through the device cache: warp w copies rows w, w + warps, ... (each
// `row_words` 4-byte words, lying inside one cache line) from the file into out + k * row_words.
// Lane 0 pins the row's line (a fill if it is missing) and the warp copies it; with `prefetch` the
// next row's line is requested before the current one is waited for (AGILE's submit-and-continue).
// errors[0] counts rows that failed, errors[2] keeps the first code.
extern "C" __global__ void gpuio_gather_rows(gpuio::array<u32> a, const u64* rows, u64 n_rows,
                                             u32 row_words, u32* out, int prefetch, int* errors) {
  const int lane = threadIdx.x & 31;
  const u64 warp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
  const u64 warps = (gridDim.x * (u64)blockDim.x) >> 5;
  gpuio::ticket<u32> cur, next;
  if (lane == 0 && warp < n_rows) cur = a.prefetch(rows[warp] * row_words);
  for (u64 k = warp; k < n_rows; k += warps) {
    const bool more = k + warps < n_rows;
    u64 p = 0;
    int err = 0;
    if (lane == 0) {
      if (prefetch && more) next = a.prefetch(rows[k + warps] * row_words);
      u32* v = a.wait(cur, &err);
      p = (u64)v;
    }
    p = __shfl_sync(0xffffffffu, p, 0);
    err = __shfl_sync(0xffffffffu, err, 0);
    if (p) {
      const u32* src = (const u32*)p;
      for (u32 w = lane; w < row_words; w += 32) out[k * row_words + w] = src[w];
    } else if (lane == 0) {
      atomicAdd(&errors[0], 1);
      atomicCAS(&errors[2], 0, err);
    }
    __syncwarp();
    if (lane == 0) {
      if (p) a.release(cur);
      if (more) cur = prefetch ? next : a.prefetch(rows[k + warps] * row_words);
    }
  }
}

// One level of a breadth-first search with the edge array on storage (BaM's BFS): warp w takes
// frontier vertices w, w + warps, ...; its lanes read the vertex's edges through the device cache
// (edge e is element e + edge_base of `edges`: the .bel file's 16-byte header is two elements),
// coalesced per line, and claim each unvisited destination for the next level with a CAS on its
// depth. next_len counts the next frontier; errors[0] counts failed reads (errors[2] keeps the first
// code), errors[1] destinations out of range (errors[3] keeps the first such edge's low 32 bits);
// scanned[0] adds the edges scanned.
extern "C" __global__ void gpuio_bfs_level(gpuio::array<u64> edges, u64 edge_base, const u64* offsets,
                                           u64 n, const u32* frontier, u32 frontier_len, u32* next,
                                           u32* next_len, u32* depth, u32 level, int* errors,
                                           u64* scanned) {
  const int lane = threadIdx.x & 31;
  const u64 warp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
  const u64 warps = (gridDim.x * (u64)blockDim.x) >> 5;
  for (u64 k = warp; k < frontier_len; k += warps) {
    const u32 v = frontier[k];
    const u64 start = offsets[v], end = offsets[v + 1];
    if (lane == 0) atomicAdd(scanned, end - start);
    for (u64 base = start; base < end; base += 32) {
      // The whole warp (the loop is warp-uniform) meets here, so read()'s coalescing sees every
      // lane that wants a line, not those left apart by the last batch's branches.
      __syncwarp();
      const u64 e = base + lane;
      if (e < end) {
        int err = 0;
        const u64 u = edges.read(e + edge_base, &err);
        if (err) {
          atomicAdd(&errors[0], 1);
          atomicCAS(&errors[2], 0, err);
        } else if (u >= n) {
          if (atomicAdd(&errors[1], 1) == 0) errors[3] = (int)(e & 0x7fffffff);
        } else if (atomicCAS(&depth[u], 0xffffffffu, level + 1) == 0xffffffffu) {
          next[atomicAdd(next_len, 1u)] = (u32)u;
        }
      }
    }
  }
}

// The same level with every edge already in device memory (`edges`: the whole .bel.dst file, header
// included, so edge e is element e + edge_base as above): the reference the device cache is measured
// against (issue 15: "BFS with all edges in GPU memory"): the same frontier order and claims, with as
// many warps as the search allows (the cache caps them at a quarter of its lines; this needs no cap).
extern "C" __global__ void gpuio_bfs_level_mem(const u64* __restrict__ edges, u64 edge_base,
                                               const u64* offsets, u64 n, const u32* frontier,
                                               u32 frontier_len, u32* next, u32* next_len, u32* depth,
                                               u32 level, int* errors, u64* scanned) {
  const int lane = threadIdx.x & 31;
  const u64 warp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
  const u64 warps = (gridDim.x * (u64)blockDim.x) >> 5;
  for (u64 k = warp; k < frontier_len; k += warps) {
    const u32 v = frontier[k];
    const u64 start = offsets[v], end = offsets[v + 1];
    if (lane == 0) atomicAdd(scanned, end - start);
    for (u64 e = start + lane; e < end; e += 32) {
      const u64 u = edges[e + edge_base];
      if (u >= n) {
        if (atomicAdd(&errors[1], 1) == 0) errors[3] = (int)(e & 0x7fffffff);
      } else if (atomicCAS(&depth[u], 0xffffffffu, level + 1) == 0xffffffffu) {
        next[atomicAdd(next_len, 1u)] = (u32)u;
      }
    }
  }
}

// Layout probe for the host: the sizes and offsets of the argument structs, written to out[] so a
// test on a GPU can compare them with the Rust structs too (tests/rings_nvrtc.rs checks them at
// compile time with static_assert).
extern "C" __global__ void gpuio_layout_probe(u64* out) {
  out[0] = sizeof(gpuio::Queue);
  out[1] = sizeof(gpuio::CacheDesc);
  out[2] = sizeof(gpuio::array<u32>);
}
