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

// One level of a breadth-first search (BaM's BFS, top-down): the vertices whose depth is `level`
// are expanded, in vertex order, by warps that take groups of 32 consecutive vertices from a shared
// counter (`cursor`, zeroed by the host before each level). A lane looks at one vertex of the group;
// the warp then walks the group's frontier vertices one by one, its lanes reading 32 edges at a time
// and claiming each unvisited destination for level + 1 with a CAS on its depth. `found` counts the
// claims (the host stops when a level claims none); `scanned[0]` adds the edges scanned; errors[0]
// counts failed edge reads (errors[2] keeps the first code), errors[1] destinations out of range
// (errors[3] keeps the first such edge's low 32 bits).
//
// Why this order: the warps running at once hold neighbouring groups, so they read neighbouring
// edges, which share cache lines; the counter balances a hub's group against many light ones; and
// the frontier never leaves the device (an earlier version sorted a frontier list on the host
// between levels, a device-to-host and a host-to-device copy and a sort per level). Scanning every
// group's depths costs one coalesced 128-byte load per 32 vertices per level.
//
// `Edges` is how edge e is read: through the device cache (gpuio::array<u64>::read, warp-coalesced
// per line) or from device memory (MemEdges); both kernels below are this one function, so the
// in-memory reference differs from the cached search only in where the edges come from.
struct MemEdges {
  const u64* __restrict__ p;
  __device__ u64 read(u64 i, int* err) const {
    *err = 0;
    return p[i];
  }
};

template <class Edges>
__device__ void bfs_level(const Edges& edges, u64 edge_base, const u64* offsets, u64 n, u32* depth,
                          u32 level, u32* cursor, u32* found, int* errors, u64* scanned) {
  const unsigned ALL = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const u64 groups = (n + 31) / 32;
  u64 my_scanned = 0;
  for (;;) {
    u32 g = 0;
    if (lane == 0) g = atomicAdd(cursor, 1u);
    g = __shfl_sync(ALL, g, 0);
    if (g >= groups) break;
    const u64 v0 = (u64)g * 32;
    const u64 mine = v0 + lane;
    unsigned todo = __ballot_sync(ALL, mine < n && depth[mine] == level);
    while (todo) {
      const u64 v = v0 + (__ffs(todo) - 1);
      todo &= todo - 1;
      const u64 start = offsets[v], end = offsets[v + 1];
      my_scanned += end - start;
      for (u64 base = start; base < end; base += 32) {
        // The whole warp meets here (the loop is warp-uniform), so read()'s coalescing sees every
        // lane that wants a line, not those left apart by the last batch's branches.
        __syncwarp();
        const u64 e = base + lane;
        bool claimed = false;
        if (e < end) {
          int err = 0;
          const u64 u = edges.read(e + edge_base, &err);
          if (err) {
            atomicAdd(&errors[0], 1);
            atomicCAS(&errors[2], 0, err);
          } else if (u >= n) {
            if (atomicAdd(&errors[1], 1) == 0) errors[3] = (int)(e & 0x7fffffff);
          } else {
            claimed = atomicCAS(&depth[u], 0xffffffffu, level + 1) == 0xffffffffu;
          }
        }
        const unsigned c = __ballot_sync(ALL, claimed);
        if (lane == 0 && c) atomicAdd(found, (u32)__popc(c));
      }
    }
  }
  if (lane == 0 && my_scanned) atomicAdd(scanned, my_scanned);
}

// The level with the edges read through the device cache (edge e is element e + edge_base of
// `edges`: the .bel file's 16-byte header is two elements). Launch whole warps.
extern "C" __global__ void gpuio_bfs_level(gpuio::array<u64> edges, u64 edge_base, const u64* offsets,
                                           u64 n, u32* depth, u32 level, u32* cursor, u32* found,
                                           int* errors, u64* scanned) {
  bfs_level(edges, edge_base, offsets, n, depth, level, cursor, found, errors, scanned);
}

// The same level with every edge already in device memory (`edges`: the whole .bel.dst file, header
// included): the reference the device cache is measured against (issue 15: "BFS with all edges in
// GPU memory"), with as many warps as the search allows (the cache caps them at a quarter of its
// lines; this needs no cap).
extern "C" __global__ void gpuio_bfs_level_mem(const u64* __restrict__ edges, u64 edge_base,
                                               const u64* offsets, u64 n, u32* depth, u32 level,
                                               u32* cursor, u32* found, int* errors, u64* scanned) {
  bfs_level(MemEdges{edges}, edge_base, offsets, n, depth, level, cursor, found, errors, scanned);
}

// Layout probe for the host: the sizes and offsets of the argument structs, written to out[] so a
// test on a GPU can compare them with the Rust structs too (tests/rings_nvrtc.rs checks them at
// compile time with static_assert).
extern "C" __global__ void gpuio_layout_probe(u64* out) {
  out[0] = sizeof(gpuio::Queue);
  out[1] = sizeof(gpuio::CacheDesc);
  out[2] = sizeof(gpuio::array<u32>);
}
