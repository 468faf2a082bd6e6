// gpuio.cuh — the device side of gpu-io's request rings and device cache (docs/rings.md, protocol 1.0).
//
// DRAFT: compiles with NVRTC for compute_80/compute_90 and passes ptxas (tests/rings_nvrtc.rs); it
// has not run on a GPU yet. Its logic mirrors, step for step, the Rust code that the tests exercise:
//   submission / completion     crates/gpuio-cuda/src/rings/producer.rs
//   line state machine, clock   crates/gpuio-cuda/src/rings/line.rs (model-checked with loom)
// Keep the three in step: the constants below are pinned by src/rings/layout.rs's unit tests.
//
// No standard headers (NVRTC has none); sm_70 or newer (acquire/release PTX, __nanosleep,
// __match_any_sync).

#pragma once

namespace gpuio {

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// ---- layout constants (docs/rings.md section 1) ---------------------------------------------------
constexpr u32 MAGIC = 0x51525047u;         // "GPRQ"
constexpr u32 DEVICE_MAGIC = 0x44525047u;  // "GPRD"
constexpr u16 VERSION_MAJOR = 1;
constexpr u16 VERSION_MINOR = 1;

constexpr u32 SLOT_FREE = 0, SLOT_CLAIMED = 1, SLOT_SUBMITTED = 2;
constexpr u16 OP_READ = 1, OP_WRITE = 2, OP_FLUSH = 3, OP_FSYNC = 4;
constexpr u32 SERVER_INIT = 0, SERVER_SERVING = 1, SERVER_STOPPING = 2, SERVER_STOPPED = 3;

// Result codes (negative errno values; docs/rings.md section 4). Prefixed: errno.h defines macros.
constexpr int E_IO = -5, E_BADF = -9, E_AGAIN = -11, E_ACCES = -13, E_FAULT = -14, E_BUSY = -16,
              E_INVAL = -22, E_NOSPC = -28, E_RANGE = -34, E_NODATA = -61, E_OVERFLOW = -75,
              E_SHUTDOWN = -108, E_TIMEDOUT = -110, E_CANCELED = -125;

// Bounds: every loop below ends.
constexpr u32 CLAIM_ATTEMPTS = 64;       // tail CAS attempts per submission
constexpr u64 SUBMIT_NS = 10000000000ull;  // waiting for a free slot of a full ring before E_TIMEDOUT (10 s)
constexpr u64 WAIT_NS = 10000000000ull;  // completion wait before E_TIMEDOUT (10 s)
constexpr u32 BUSY_WAITS = 1u << 20;     // lookups of a BUSY line before E_TIMEDOUT
constexpr u64 CLAIM_WAIT_NS = 1000000000ull;  // a miss finding no line to evict, before E_BUSY (1 s)
constexpr u32 CAS_ATTEMPTS = 64;

struct RegionHeader {
  u32 magic;
  u16 version_major, version_minor;
  u32 header_bytes, ring_count, slots_per_ring, slot_bytes, line_bytes, completion_count;
  u64 rings_offset, slots_offset, host_bytes, device_bytes, tails_offset, completions_offset;
  u32 server_state, max_request_bytes;
  u64 reserved[5];
};
static_assert(sizeof(RegionHeader) == 128, "RegionHeader is 128 bytes");

struct RequestSlot {
  u64 state;  // lap << 32 | SLOT_*
  u16 opcode, flags;
  u32 file_id;
  u64 offset;
  u32 length, completion;
  u64 dev_addr;
  u32 tag, reserved0;
  u64 reserved[2];
};
static_assert(sizeof(RequestSlot) == 64, "RequestSlot is 64 bytes");

struct RingTail {
  u64 tail;
  u64 taken;  // a lower bound on the positions the host took (docs/rings.md 1.5), host-written
  u64 reserved[6];
};
static_assert(sizeof(RingTail) == 64, "RingTail is 64 bytes");

struct Request {
  u16 opcode;
  u32 file_id;
  u64 offset;
  u32 length, completion;
  u64 dev_addr;
  u32 tag;
};

// ---- memory-order helpers ---------------------------------------------------------------------------
__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_acquire_sys32(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_sys(u64* p, u64 v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ u64 ld_acquire_gpu(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ u32 ld_acquire_gpu32(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_gpu32(u32* p, u32 v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ u64 clock_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Bounded exponential backoff: 64 ns doubling to 8 µs.
struct Backoff {
  u32 ns = 64;
  __device__ void snooze() {
    __nanosleep(ns);
    ns = ns < 8192 ? ns * 2 : 8192;
  }
};

__device__ __forceinline__ u64 slot_word(u32 lap, u32 state) { return ((u64)lap << 32) | state; }
__device__ __forceinline__ u64 completion_word(u32 tag, int result) {
  return ((u64)tag << 32) | (u32)result;
}

// ---- rings (docs/rings.md sections 2-3) -----------------------------------------------------------

// What a kernel is given (built on the host from the region's layout).
struct Queue {
  RegionHeader* header;   // host region, mapped (RingRegion::host_mapped)
  RequestSlot* slots;     // host region + slots_offset
  RingTail* tails;        // device region + tails_offset
  u64* completions;       // device region + completions_offset
  u32 ring_count, slots_per_ring, completion_count;

  // Whether the server is serving (one PCIe read; do it once per kernel or per retry loop).
  __device__ bool serving() const { return ld_acquire_sys32(&header->server_state) == SERVER_SERVING; }

  // One submission attempt: 0, or E_AGAIN (full or contended), E_INVAL.
  __device__ int submit(u32 ring, const Request& r) const {
    if (ring >= ring_count || r.tag == 0) return E_INVAL;
    const u64 n = slots_per_ring;
    u64* tail = &tails[ring].tail;
    for (u32 attempt = 0; attempt < CLAIM_ATTEMPTS; ++attempt) {
      u64 pos = ld_acquire_gpu(tail);
      // Full by the host's hint (device memory): no PCIe read. Threads waiting for a slot of a full
      // ring poll here, not the slot's state word in host memory.
      if ((long long)(pos - ld_acquire_gpu(&tails[ring].taken)) >= (long long)n) return E_AGAIN;
      u32 lap = (u32)(pos / n);
      RequestSlot* s = &slots[(u64)ring * n + pos % n];
      u64 w = ld_acquire_sys(&s->state);  // host memory: one PCIe read
      u32 wl = (u32)(w >> 32), st = (u32)w;
      if (wl == lap && st == SLOT_FREE) {
        if (atomicCAS(tail, pos, pos + 1) != pos) continue;
        st_relaxed_sys(&s->state, slot_word(lap, SLOT_CLAIMED));
        s->opcode = r.opcode;
        s->flags = 0;
        s->file_id = r.file_id;
        s->offset = r.offset;
        s->length = r.length;
        s->completion = r.completion;
        s->dev_addr = r.dev_addr;
        s->tag = r.tag;
        s->reserved0 = 0;
        __threadfence_system();
        st_release_sys(&s->state, slot_word(lap, SLOT_SUBMITTED));
        return 0;
      }
      if ((int)(lap - wl) > 0) return E_AGAIN;  // last lap's request is still there: full
    }
    return E_AGAIN;
  }

  // Submits, retrying a full ring with backoff for at most `max_ns` (a deadline, as the host twin
  // `RingProducer::submit_until` has, not a count of tries: with many more threads than slots a
  // thread waits for a slot as long as the server takes to serve the requests ahead of it; on an
  // H200 16384 threads on 2048 slots ran out of 4096 tries): 0, E_TIMEDOUT, E_SHUTDOWN, E_INVAL.
  __device__ int submit_until(u32 ring, const Request& r, u64 max_ns = SUBMIT_NS) const {
    Backoff b;
    u64 start = clock_ns();
    for (u32 i = 0;; ++i) {
      int e = submit(ring, r);
      if (e != E_AGAIN) return e;
      if ((i & 255) == 255 && !serving()) return E_SHUTDOWN;
      if (clock_ns() - start > max_ns) return E_TIMEDOUT;
      b.snooze();
    }
  }

  // The result if the request with `tag` on completion word `i` has completed.
  __device__ bool poll(u32 i, u32 tag, int* result) const {
    u64 w = ld_acquire_gpu(&completions[i]);  // device memory: no PCIe
    if ((u32)(w >> 32) != tag) return false;
    *result = (int)(u32)w;
    return true;
  }

  // Waits (bounded) for the request's result; E_TIMEDOUT after `max_ns`.
  __device__ int wait(u32 i, u32 tag, u64 max_ns = WAIT_NS) const {
    Backoff b;
    u64 start = clock_ns();
    int r;
    while (!poll(i, tag, &r)) {
      if (clock_ns() - start > max_ns) return serving() ? E_TIMEDOUT : E_SHUTDOWN;
      b.snooze();
    }
    return r;
  }
};

// ---- device cache line state machine (docs/rings.md section 5; twin: src/rings/line.rs) -------------
constexpr u32 PIN_ONE = 1, PIN_MASK = 0xFFFFu, STATE_SHIFT = 16, STATE_MASK = 3u << 16,
              REF = 1u << 18;
constexpr u32 INVALID = 0, BUSY = 1, READY = 2, MODIFIED = 3;
constexpr u32 SLOT_EMPTY = 0, SLOT_RESERVED = 0xFFFFFFFFu;

__device__ __forceinline__ u32 line_state(u32 w) { return (w & STATE_MASK) >> STATE_SHIFT; }
__device__ __forceinline__ u32 line_pins(u32 w) { return w & PIN_MASK; }
__device__ __forceinline__ u32 line_word(u32 s) { return s << STATE_SHIFT; }
__device__ __forceinline__ u32 with_state(u32 w, u32 s) { return (w & ~STATE_MASK) | (s << STATE_SHIFT); }
__device__ __forceinline__ bool resident(u32 w) {
  u32 s = line_state(w);
  return s == READY || s == MODIFIED;
}

enum LookupKind { HIT, MISS, WAIT };

// What a kernel is given for one cached file.
struct CacheDesc {
  Queue q;
  u32* page;            // state word per line of the file
  u32* slot_of;         // line -> slot
  u32* owner;           // slot -> line + 1 | SLOT_EMPTY | SLOT_RESERVED
  u32* hand;            // clock hand
  u32* tags;            // per-slot request tag counters
  unsigned char* lines; // slot memory: slots × line_bytes
  u64 file_bytes;
  u32 pages, slots, line_bytes, file_id, completion_base;
};

// The request a slot's holder issues for line `p` (read into / write from slot `s`), waited for.
__device__ inline int line_io(const CacheDesc& c, u16 op, u32 p, u32 s) {
  u64 off = (u64)p * c.line_bytes;
  u64 left = c.file_bytes - off;
  Request r;
  r.opcode = op;
  r.file_id = c.file_id;
  r.offset = off;
  r.length = left < c.line_bytes ? (u32)left : c.line_bytes;
  r.completion = c.completion_base + s;
  r.dev_addr = (u64)(c.lines + (u64)s * c.line_bytes);
  u32 t = c.tags[s] + 1;  // the slot's holder owns its tag counter and completion word
  if (t == 0) t = 1;
  c.tags[s] = t;
  r.tag = t;
  int e = c.q.submit_until(blockIdx.x % c.q.ring_count, r);
  if (e) return e;
  int res = c.q.wait(r.completion, r.tag);
  return res < 0 ? res : 0;
}

__device__ inline int lookup(const CacheDesc& c, u32 p, LookupKind* kind, u32* slot) {
  u32 cur = ld_acquire_gpu32(&c.page[p]);
  for (u32 i = 0; i < CAS_ATTEMPTS; ++i) {
    u32 st = line_state(cur);
    if (st == READY || st == MODIFIED) {
      if (line_pins(cur) == PIN_MASK) return E_OVERFLOW;
      u32 seen = atomicCAS(&c.page[p], cur, (cur + PIN_ONE) | REF);
      if (seen == cur) {
        __threadfence();
        *slot = ld_acquire_gpu32(&c.slot_of[p]);
        *kind = HIT;
        return 0;
      }
      cur = seen;
    } else if (st == BUSY) {
      *kind = WAIT;
      return 0;
    } else {
      u32 seen = atomicCAS(&c.page[p], cur, line_word(BUSY));
      if (seen == cur) {
        *kind = MISS;
        return 0;
      }
      cur = seen;
    }
  }
  *kind = WAIT;
  return 0;
}

__device__ inline void release(const CacheDesc& c, u32 p) {
  __threadfence();
  atomicSub(&c.page[p], PIN_ONE);
}

__device__ inline void mark_modified(const CacheDesc& c, u32 p) {
  __threadfence();
  atomicOr(&c.page[p], 1u << STATE_SHIFT);
}

// Clock: an empty slot or an unpinned, unreferenced victim (written back if MODIFIED). E_BUSY after
// two turns: every line pinned (BaM issue #11: an error, never a hang).
__device__ inline int claim_slot(const CacheDesc& c, u32* out) {
  const u32 n = c.slots;
  for (u32 step = 0; step < 2 * n + 1; ++step) {
    u32 s = atomicAdd(c.hand, 1u) % n;
    u32 o = ld_acquire_gpu32(&c.owner[s]);
    if (o == SLOT_EMPTY) {
      if (atomicCAS(&c.owner[s], SLOT_EMPTY, SLOT_RESERVED) == SLOT_EMPTY) {
        *out = s;
        return 0;
      }
      continue;
    }
    if (o == SLOT_RESERVED) continue;
    u32 p = o - 1;
    u32 cur = ld_acquire_gpu32(&c.page[p]);
    if (line_pins(cur) != 0 || !resident(cur)) continue;
    if (cur & REF) {
      atomicAnd(&c.page[p], ~REF);
      continue;
    }
    if (atomicCAS(&c.page[p], cur, with_state(cur, BUSY)) != cur) continue;
    __threadfence();
    if (ld_acquire_gpu32(&c.slot_of[p]) != s) {  // the line moved meanwhile: put it back
      st_release_gpu32(&c.page[p], cur);
      continue;
    }
    if (line_state(cur) == MODIFIED && line_io(c, OP_WRITE, p, s) != 0) {
      st_release_gpu32(&c.page[p], cur);
      continue;
    }
    c.owner[s] = SLOT_RESERVED;
    c.slot_of[p] = SLOT_RESERVED;
    st_release_gpu32(&c.page[p], line_word(INVALID));
    *out = s;
    return 0;
  }
  return E_BUSY;
}

__device__ inline void fill_done(const CacheDesc& c, u32 p, u32 s) {
  c.owner[s] = p + 1;
  c.slot_of[p] = s;
  __threadfence();
  st_release_gpu32(&c.page[p], line_word(READY) | REF | PIN_ONE);
}

__device__ inline void fill_failed(const CacheDesc& c, u32 p, u32 s, bool had_slot) {
  if (had_slot) st_release_gpu32(&c.owner[s], SLOT_EMPTY);
  st_release_gpu32(&c.page[p], line_word(INVALID));
}

// Pins line `p` (filling it on a miss); its slot in *slot. 0 or an error code.
//
// A miss that finds no line to evict (every slot pinned, being filled, or just used: with thousands
// of warps missing at once that is a passing state, run 7 of docs/gpu-runs saw a BFS level fail on
// it) gives the line back, pauses, and looks again; E_BUSY only when that lasts CLAIM_WAIT_NS (BaM
// issue #11: an error, never a hang). The twin (src/rings/line.rs) makes one claim per call: the
// retry is this policy on top of the same transitions.
__device__ inline int acquire(const CacheDesc& c, u32 p, u32* slot) {
  Backoff b;
  u64 busy_since = 0;
  for (u32 i = 0; i <= BUSY_WAITS; ++i) {
    LookupKind k;
    int e = lookup(c, p, &k, slot);
    if (e) return e;
    if (k == HIT) return 0;
    if (k == WAIT) {
      b.snooze();
      continue;
    }
    u32 s;
    e = claim_slot(c, &s);
    if (e) {
      fill_failed(c, p, 0, false);
      const u64 now = clock_ns();
      if (busy_since == 0) {
        busy_since = now;
      } else if (now - busy_since > CLAIM_WAIT_NS) {
        return e;
      }
      b.snooze();
      continue;
    }
    e = line_io(c, OP_READ, p, s);
    if (e) {
      fill_failed(c, p, s, true);
      return e;
    }
    fill_done(c, p, s);
    *slot = s;
    return 0;
  }
  return busy_since ? E_BUSY : E_TIMEDOUT;
}

// Writes line `p` back if MODIFIED and unpinned: 1 written, 0 clean, E_BUSY (pinned/busy), or the
// write's error (the line stays MODIFIED).
__device__ inline int flush_line(const CacheDesc& c, u32 p) {
  u32 cur = ld_acquire_gpu32(&c.page[p]);
  if (line_state(cur) == BUSY) return E_BUSY;
  if (line_state(cur) != MODIFIED) return 0;
  if (line_pins(cur) != 0) return E_BUSY;
  if (atomicCAS(&c.page[p], cur, with_state(cur, BUSY)) != cur) return E_BUSY;
  __threadfence();
  u32 s = ld_acquire_gpu32(&c.slot_of[p]);
  int e = line_io(c, OP_WRITE, p, s);
  st_release_gpu32(&c.page[p], e ? cur : with_state(cur, READY));
  return e ? e : 1;
}

// ---- gpuio::array<T> ----------------------------------------------------------------------------------

// A pending element access (AGILE-style submit-and-continue): `prefetch` starts it, `wait` finishes it.
template <class T>
struct ticket {
  u32 line, slot, tag, offset;
  int err;
  bool owner_fill;  // this thread submitted the fill and must complete it in wait()
};

template <class T>
struct array {
  CacheDesc c;

  __device__ u32 line_of(u64 i) const { return (u32)((i * sizeof(T)) / c.line_bytes); }
  __device__ u32 offset_of(u64 i) const { return (u32)((i * sizeof(T)) % c.line_bytes); }
  __device__ T* at(u32 slot, u32 off) const {
    return (T*)(c.lines + (u64)slot * c.line_bytes + off);
  }

  // Starts loading element i's line; returns at once (hit: already pinned).
  __device__ ticket<T> prefetch(u64 i) const {
    ticket<T> t;
    t.line = line_of(i);
    t.offset = offset_of(i);
    t.err = 0;
    t.owner_fill = false;
    t.slot = 0;
    t.tag = 0;
    LookupKind k;
    t.err = lookup(c, t.line, &k, &t.slot);
    if (t.err || k != MISS) {
      if (!t.err && k == WAIT) t.slot = SLOT_RESERVED;  // look again in wait()
      return t;
    }
    u32 s;
    if (claim_slot(c, &s) != 0) {
      // No line to evict now: give the line back and let wait() acquire it (it retries).
      fill_failed(c, t.line, 0, false);
      t.slot = SLOT_RESERVED;
      return t;
    }
    Request r;
    u64 off = (u64)t.line * c.line_bytes;
    u64 left = c.file_bytes - off;
    r.opcode = OP_READ;
    r.file_id = c.file_id;
    r.offset = off;
    r.length = left < c.line_bytes ? (u32)left : c.line_bytes;
    r.completion = c.completion_base + s;
    r.dev_addr = (u64)(c.lines + (u64)s * c.line_bytes);
    u32 tg = c.tags[s] + 1;
    if (tg == 0) tg = 1;
    c.tags[s] = tg;
    r.tag = tg;
    t.err = c.q.submit_until(blockIdx.x % c.q.ring_count, r);
    if (t.err) {
      fill_failed(c, t.line, s, true);
      return t;
    }
    t.slot = s;
    t.tag = tg;
    t.owner_fill = true;
    return t;
  }

  // Finishes a prefetch: the element's address (its line pinned until release), or nullptr with
  // *err set.
  __device__ T* wait(ticket<T>& t, int* err) const {
    if (t.err) {
      *err = t.err;
      return nullptr;
    }
    if (t.owner_fill) {
      int res = c.q.wait(c.completion_base + t.slot, t.tag);
      t.owner_fill = false;
      if (res < 0) {
        fill_failed(c, t.line, t.slot, true);
        *err = t.err = res;
        return nullptr;
      }
      fill_done(c, t.line, t.slot);
    } else if (t.slot == SLOT_RESERVED) {
      int e = acquire(c, t.line, &t.slot);
      if (e) {
        *err = t.err = e;
        return nullptr;
      }
    }
    *err = 0;
    return at(t.slot, t.offset);
  }

  __device__ void release(const ticket<T>& t) const {
    if (!t.err) gpuio::release(c, t.line);
  }

  // a[i] for the calling thread alone: 0 or an error code in *err.
  __device__ T get(u64 i, int* err) const {
    ticket<T> t = prefetch(i);
    T* p = wait(t, err);
    T v{};
    if (p) {
      v = *p;
      release(t);
    }
    return v;
  }

  // Warp-coalesced read: lanes wanting the same line share one lookup (and one fill).
  __device__ T read(u64 i, int* err) const {
    const u32 line = line_of(i);
    const unsigned peers = __match_any_sync(__activemask(), line);
    const int leader = __ffs(peers) - 1;
    const int lane = threadIdx.x & 31;
    u32 slot = 0;
    int e = 0;
    if (lane == leader) e = acquire(c, line, &slot);
    slot = __shfl_sync(peers, slot, leader);
    e = __shfl_sync(peers, e, leader);
    T v{};
    if (!e) v = *at(slot, offset_of(i));
    __syncwarp(peers);
    if (lane == leader && !e) gpuio::release(c, line);
    *err = e;
    return v;
  }

  // Warp-coalesced write: the line becomes MODIFIED; flush() writes it back.
  __device__ int write(u64 i, const T& v) const {
    const u32 line = line_of(i);
    const unsigned peers = __match_any_sync(__activemask(), line);
    const int leader = __ffs(peers) - 1;
    const int lane = threadIdx.x & 31;
    u32 slot = 0;
    int e = 0;
    if (lane == leader) e = acquire(c, line, &slot);
    slot = __shfl_sync(peers, slot, leader);
    e = __shfl_sync(peers, e, leader);
    if (!e) *at(slot, offset_of(i)) = v;
    __syncwarp(peers);
    if (lane == leader && !e) {
      mark_modified(c, line);
      gpuio::release(c, line);
    }
    return e;
  }

  // Writes every dirty line back (grid-stride over lines); the first error, or E_BUSY if a dirty line
  // was pinned (flush again later). Call when the kernel's writes are done (after a grid sync or in a
  // separate kernel).
  __device__ int flush() const {
    int first = 0;
    u32 stride = gridDim.x * blockDim.x;
    for (u32 p = blockIdx.x * blockDim.x + threadIdx.x; p < c.pages; p += stride) {
      int e = flush_line(c, p);
      if (e < 0 && first == 0) first = e;
    }
    return first;
  }
};

}  // namespace gpuio
