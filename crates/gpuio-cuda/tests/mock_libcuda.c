/* A mock of the CUDA driver library (libcuda) for tests/mock_driver.rs.
 *
 * It implements exactly the driver entry points gpuio-cuda calls, with host memory standing in for
 * the GPU, and checks how they are called: a current context on the calling thread, device
 * addresses inside live allocations, flags from the documented sets, kernel parameters and launch
 * geometry. It models asynchrony: work queued on a stream runs only when something waits for it
 * (an event query or synchronize, a stream synchronize or destroy), so a host buffer reused before
 * its copy was waited for shows up as wrong bytes. It is not a GPU: nothing runs in parallel, the
 * "kernel" is a memcpy, and timings mean nothing.
 *
 * Device addresses are not host addresses: an allocation's device address is its host address plus
 * DEV_BIAS, and mapped host memory's device address is the host address plus MAP_BIAS, so code that
 * passes a host pointer where a device one is due (or the reverse) is caught.
 *
 * Problems a real GPU would report asynchronously (a queued copy whose memory was freed before it
 * ran) become a sticky CUDA_ERROR_ILLEGAL_ADDRESS, as on a GPU, and are counted in mock_faults().
 *
 * Stream memory operations: cuStreamWriteValue64_v2 (and the v1 cuStreamWriteValue64) queue an
 * 8-byte write that runs in stream order after the copies queued before it, stored with release
 * ordering, so a CPU thread that polls the word in "device" memory (host memory here) and sees it
 * also sees the copied bytes -- the guarantee the default flags give on a GPU. Each is refused
 * (CUDA_ERROR_NOT_SUPPORTED) where its device attribute says 0 (122 for v2; 92 and 93 for v1).
 * MOCK_CUDA_COPY_DELAY_US=<n> makes every queued copy sleep n microseconds before it moves its
 * bytes, so a completion published before its data is seen by a polling thread.
 *
 * Page-locking: every cuMemHostRegister call and every successful cuMemHostUnregister is counted
 * (mock_register_calls, mock_unregister_calls; mock_registered is the ranges registered now), and
 * MOCK_CUDA_FAIL_REGISTER_NTH=<n> makes the n-th cuMemHostRegister call (from 1) fail with
 * CUDA_ERROR_OUT_OF_MEMORY, registering nothing, as the driver does when it cannot lock the pages.
 *
 * Lazy loading: a driver may load a kernel's code only at its first launch, and wait for the context
 * to go idle to do it (the CUDA C++ Programming Guide, "Lazy Loading"); a kernel that spins until
 * that launch has run then never lets it. The CPU threads playing a long-running kernel say so with
 * mock_kernel_started() / mock_kernel_stopped(); meanwhile loading a module, or a function's first
 * launch, is a refused call (CUDA_ERROR_NOT_READY here, a deadlock on a GPU).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    ILLEGAL_ADDRESS = 700,
    ALREADY_REGISTERED = 712,
    NOT_REGISTERED = 713,
    NOT_SUPPORTED = 801,
};

#define DEV_BIAS (1ULL << 60) /* device address = host address + DEV_BIAS */
#define MAP_BIAS (2ULL << 60) /* mapped host memory's device address = host + MAP_BIAS */
#define MAX_RANGES 4096
#define MAX_OPS 4096

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
/* A kernel that waits on other launches is running (the test's CPU threads play it). */
static int kernel_running;
static int ctx_refs;      /* primary context retain count */
static int ctx_gen = 1;   /* bumped when the primary context is reset (last release) */
static int primary_ctx_storage;
#define PRIMARY_CTX ((void *)&primary_ctx_storage)
static __thread void *current_ctx;
static int sticky_error;

/* Counters, read by the test through the exported mock_* functions. */
static long n_launches, n_dma, n_faults, n_bad_calls, n_live_events, n_live_streams, n_live_modules, n_deliveries, n_h2d;
static long n_stream_writes;
static long n_register_calls, n_unregister_calls;
static char last_bad[512];

struct range { uintptr_t host; size_t len; unsigned flags; int live; };
static struct range allocs[MAX_RANGES];
static struct range regs[MAX_RANGES];
static size_t alloc_bytes;

/* Stream work: 0 = h2d, 1 = d2h, 2 = kernel copy (device addresses both sides), 3 = 64-bit value
 * write to dev_a, 4 = the deliveries kernel (`n` descriptors of kernels/copy.cu's struct Delivery at
 * device address dev_a, read when the op runs, as a GPU reads them when the launch runs). `pinned`: the host range was registered when the copy was queued, so it must
 * still be when the copy runs (the driver reads page-locked memory by DMA at that moment;
 * unregistered or freed memory is a fault). */
struct op { int kind; CUdeviceptr dev_a; CUdeviceptr dev_b; uintptr_t host; size_t n; int pinned; uint64_t value; };
/* Streams and events belong to the context generation they were made in: after a reset (the last
 * primary-context release) they are dead handles, as on a GPU. */
struct stream { int live; int gen; long seq_done; long seq_next; struct op ops[MAX_OPS]; long op_seq[MAX_OPS]; int nops; };
struct event { int live; int gen; struct stream *s; long seq; int queried; };
struct module { int gen; int unloaded; int has_deliver; };
/* kind 0: gpuio_copy_mapped(src, dst, n); 1: gpuio_deliver(descs, n) */
struct function { int gen; struct module *mod; int kind; int loaded; };
struct delivery { uint64_t src, dst, len, word_addr, word; };

static CUresult bad(CUresult r, const char *fmt, const char *what) {
    n_bad_calls++;
    snprintf(last_bad, sizeof last_bad, fmt, what);
    return r;
}
#define BAD(r, msg) bad(r, "%s: " msg, __func__)

/* Requires cuInit and the primary context current on this thread. Call with the lock held. */
static CUresult need_ctx(const char *fn) {
    if (!initialized) return bad(NOT_INITIALIZED, "%s: before cuInit", fn);
    if (current_ctx != PRIMARY_CTX || ctx_refs <= 0)
        return bad(INVALID_CONTEXT, "%s: no (live) context current on this thread", fn);
    return SUCCESS;
}

static struct range *find(struct range *t, uintptr_t a, size_t n) {
    for (int i = 0; i < MAX_RANGES; i++)
        if (t[i].live && a >= t[i].host && a + n <= t[i].host + t[i].len) return &t[i];
    return NULL;
}

/* A live range of `t` sharing any byte with [a, a+n). */
static struct range *overlapping(struct range *t, uintptr_t a, size_t n) {
    for (int i = 0; i < MAX_RANGES; i++)
        if (t[i].live && a < t[i].host + t[i].len && t[i].host < a + n) return &t[i];
    return NULL;
}

/* Host address behind a device range, or 0 when it is not inside an allocation or (`readable`) a
 * mapped registration. */
static uintptr_t dev_to_host(CUdeviceptr d, size_t n, int writable) {
    if (d >> 60 == 1 && find(allocs, (uintptr_t)(d - DEV_BIAS), n))
        return (uintptr_t)(d - DEV_BIAS);
    if (d >> 60 == 2) {
        struct range *r = find(regs, (uintptr_t)(d - MAP_BIAS), n);
        if (r && (r->flags & 2) && !(writable && (r->flags & 8))) return (uintptr_t)(d - MAP_BIAS);
    }
    return 0;
}

static long copy_delay_us(void) {
    const char *s = getenv("MOCK_CUDA_COPY_DELAY_US");
    return s ? atol(s) : 0;
}

static void run_op(struct op *o) {
    if (sticky_error) return;
    if (o->kind != 3 && copy_delay_us() > 0) usleep((useconds_t)copy_delay_us());
    if (o->pinned && !find(regs, o->host, o->n)) {
        /* The page-locked source or destination was unregistered before the copy ran. */
        n_faults++;
        sticky_error = ILLEGAL_ADDRESS;
        return;
    }
    switch (o->kind) {
    case 0: {
        uintptr_t dst = dev_to_host(o->dev_a, o->n, 1);
        if (!dst) { n_faults++; sticky_error = ILLEGAL_ADDRESS; return; }
        memcpy((void *)dst, (void *)o->host, o->n);
        break;
    }
    case 1: {
        uintptr_t src = dev_to_host(o->dev_a, o->n, 0);
        if (!src) { n_faults++; sticky_error = ILLEGAL_ADDRESS; return; }
        memcpy((void *)o->host, (void *)src, o->n);
        break;
    }
    case 2: {
        uintptr_t src = dev_to_host(o->dev_a, o->n, 0), dst = dev_to_host(o->dev_b, o->n, 1);
        if (!src || !dst) { n_faults++; sticky_error = ILLEGAL_ADDRESS; return; }
        memmove((void *)dst, (void *)src, o->n);
        break;
    }
    case 3: {
        uintptr_t dst = dev_to_host(o->dev_a, 8, 1);
        if (!dst) { n_faults++; sticky_error = ILLEGAL_ADDRESS; return; }
        /* Release: the earlier ops' bytes are visible to whoever acquires this word. */
        __atomic_store_n((uint64_t *)dst, o->value, __ATOMIC_RELEASE);
        break;
    }
    case 4: {
        /* The descriptors must be mapped host memory still registered; each source mapped host or
         * device memory, each destination and word device memory. No descriptors: nothing read. */
        if (o->n == 0) break;
        uintptr_t ds = o->dev_a >> 60 == 2 ? dev_to_host(o->dev_a, o->n * sizeof(struct delivery), 0) : 0;
        if (!ds) { n_faults++; sticky_error = ILLEGAL_ADDRESS; return; }
        for (size_t k = 0; k < o->n; k++) {
            struct delivery d;
            memcpy(&d, (void *)(ds + k * sizeof d), sizeof d);
            if (d.len) {
                uintptr_t src = dev_to_host(d.src, d.len, 0), dst = dev_to_host(d.dst, d.len, 1);
                if (!src || !dst || d.dst >> 60 != 1) { n_faults++; sticky_error = ILLEGAL_ADDRESS; return; }
                memmove((void *)dst, (void *)src, d.len);
            }
            if (d.word_addr) {
                uintptr_t w = d.word_addr % 8 == 0 && d.word_addr >> 60 == 1 ? dev_to_host(d.word_addr, 8, 1) : 0;
                if (!w) { n_faults++; sticky_error = ILLEGAL_ADDRESS; return; }
                /* After this delivery's bytes (the kernel's fence, then a release store). */
                __atomic_store_n((uint64_t *)w, d.word, __ATOMIC_RELEASE);
            }
        }
        break;
    }
    }
}

/* Runs the stream's work up to sequence number `seq`. */
static void complete(struct stream *s, long seq) {
    int i = 0;
    while (i < s->nops && s->op_seq[i] <= seq) run_op(&s->ops[i++]);
    memmove(s->ops, s->ops + i, (s->nops - i) * sizeof s->ops[0]);
    memmove(s->op_seq, s->op_seq + i, (s->nops - i) * sizeof s->op_seq[0]);
    s->nops -= i;
    if (seq > s->seq_done) s->seq_done = seq;
}

static CUresult enqueue(struct stream *s, struct op o) {
    if (s->nops == MAX_OPS) complete(s, s->op_seq[0]); /* a full queue drains its oldest op */
    s->ops[s->nops] = o;
    s->op_seq[s->nops] = ++s->seq_next;
    s->nops++;
    return SUCCESS;
}

static int valid_stream(struct stream *s) { return s && s->live && s->gen == ctx_gen; }
static int valid_event(struct event *e) { return e && e->live && e->gen == ctx_gen; }

#define CTX() do { CUresult c_ = need_ctx(__func__); if (c_) { pthread_mutex_unlock(&lock); return c_; } if (sticky_error) { pthread_mutex_unlock(&lock); return sticky_error; } } while (0)

/* ---- initialization and device queries ---- */

CUresult cuInit(unsigned flags) {
    if (flags != 0) return BAD(INVALID_VALUE, "flags must be 0");
    initialized = 1;
    return SUCCESS;
}
CUresult cuDriverGetVersion(int *v) { if (!v) return BAD(INVALID_VALUE, "null"); *v = 13000; return SUCCESS; }
CUresult cuDeviceGetCount(int *n) {
    if (!initialized) return BAD(NOT_INITIALIZED, "before cuInit");
    *n = 1;
    return SUCCESS;
}
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (!initialized) return BAD(NOT_INITIALIZED, "before cuInit");
    if (ordinal != 0) return BAD(INVALID_DEVICE, "ordinal out of range");
    *d = 0;
    return SUCCESS;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    if (!initialized) return BAD(NOT_INITIALIZED, "before cuInit");
    if (d != 0) return BAD(INVALID_DEVICE, "bad device");
    if (!name || len <= 0) return BAD(INVALID_VALUE, "bad buffer");
    snprintf(name, (size_t)len, "%s", "Mock GPU");
    return SUCCESS;
}
/* The attributes of an H100-like device that gpuio-cuda may ask about (numbers from cuda.h's
 * CUdevice_attribute). Any other attribute is a refused call, so a new query is noticed and added
 * here with a real value; MOCK_CUDA_ATTR_<number>=<value> overrides one (to test fallbacks). */
static const int attrs[][2] = {
    {1, 1024},  /* MAX_THREADS_PER_BLOCK */
    {16, 132},  /* MULTIPROCESSOR_COUNT */
    {18, 0},    /* INTEGRATED */
    {19, 1},    /* CAN_MAP_HOST_MEMORY */
    {40, 3},    /* ASYNC_ENGINE_COUNT */
    {41, 1},    /* UNIFIED_ADDRESSING */
    {75, 9},    /* COMPUTE_CAPABILITY_MAJOR */
    {76, 0},    /* COMPUTE_CAPABILITY_MINOR */
    {88, 0},    /* PAGEABLE_MEMORY_ACCESS */
    {91, 1},    /* CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM */
    {99, 1},    /* HOST_REGISTER_SUPPORTED */
    {113, 1},   /* READ_ONLY_HOST_REGISTER_SUPPORTED */
    {116, 1},   /* GPU_DIRECT_RDMA_SUPPORTED */
    /* Stream memory operations as a CUDA 12/13 driver installed with default module parameters
     * reports them: the v1 API (92 CAN_USE_STREAM_MEM_OPS_V1, 93 CAN_USE_64_BIT_STREAM_MEM_OPS_V1)
     * off without NVreg_EnableStreamMemOPs=1, the v2 64-bit operations (122
     * CAN_USE_64_BIT_STREAM_MEM_OPS, named _V2 in CUDA 11.7/11.8) on. */
    {92, 0},
    {93, 0},
    {122, 1},
};
static int attribute(int attr);
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    if (!initialized) return BAD(NOT_INITIALIZED, "before cuInit");
    if (d != 0) return BAD(INVALID_DEVICE, "bad device");
    if (!v) return BAD(INVALID_VALUE, "null");
    for (size_t i = 0; i < sizeof attrs / sizeof attrs[0]; i++) {
        if (attrs[i][0] != attr) continue;
        char name[32];
        snprintf(name, sizeof name, "MOCK_CUDA_ATTR_%d", attr);
        const char *o = getenv(name);
        *v = o ? atoi(o) : attrs[i][1];
        return SUCCESS;
    }
    n_bad_calls++;
    snprintf(last_bad, sizeof last_bad, "cuDeviceGetAttribute: attribute %d is not modelled", attr);
    return INVALID_VALUE;
}
/* The value of a modelled attribute (overrides included); 0 for one that is not modelled. */
static int attribute(int attr) {
    int v = 0;
    for (size_t i = 0; i < sizeof attrs / sizeof attrs[0]; i++)
        if (attrs[i][0] == attr) {
            char name[32];
            snprintf(name, sizeof name, "MOCK_CUDA_ATTR_%d", attr);
            const char *o = getenv(name);
            v = o ? atoi(o) : attrs[i][1];
        }
    return v;
}
CUresult cuGetErrorString(CUresult e, const char **s) {
    *s = e == SUCCESS ? "no error" : e == OUT_OF_MEMORY ? "out of memory (mock)" : "mock error";
    return SUCCESS;
}

/* ---- contexts ---- */

CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) {
    pthread_mutex_lock(&lock);
    CUresult r = SUCCESS;
    if (!initialized) r = BAD(NOT_INITIALIZED, "before cuInit");
    else if (d != 0) r = BAD(INVALID_DEVICE, "bad device");
    else { ctx_refs++; *ctx = PRIMARY_CTX; }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    pthread_mutex_lock(&lock);
    CUresult r = SUCCESS;
    if (d != 0) r = BAD(INVALID_DEVICE, "bad device");
    else if (ctx_refs <= 0) r = BAD(INVALID_CONTEXT, "released more often than retained");
    else if (--ctx_refs == 0) {
        /* The last release resets the context: its memory, registrations, modules are gone. */
        ctx_gen++;
        memset(allocs, 0, sizeof allocs);
        memset(regs, 0, sizeof regs);
        alloc_bytes = 0;
        n_live_modules = 0;
        sticky_error = 0;
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuCtxSetCurrent(void *ctx) {
    if (ctx != NULL && ctx != PRIMARY_CTX) return BAD(INVALID_CONTEXT, "unknown context");
    current_ctx = ctx;
    return SUCCESS;
}

/* ---- memory ---- */

static size_t mem_limit(void) {
    const char *s = getenv("MOCK_CUDA_MEM_LIMIT");
    return s ? (size_t)strtoull(s, NULL, 10) : (size_t)16 << 30;
}

CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total) {
    pthread_mutex_lock(&lock);
    CTX();
    *total = mem_limit();
    *free_b = *total > alloc_bytes ? *total - alloc_bytes : 0;
    pthread_mutex_unlock(&lock);
    return SUCCESS;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (n == 0) r = BAD(INVALID_VALUE, "zero bytes");
    else if (alloc_bytes + n > mem_limit()) r = OUT_OF_MEMORY;
    else {
        int i = 0;
        while (i < MAX_RANGES && allocs[i].live) i++;
        void *h = i < MAX_RANGES ? malloc(n) : NULL;
        if (!h) r = OUT_OF_MEMORY;
        else {
            allocs[i] = (struct range){(uintptr_t)h, n, 0, 1};
            alloc_bytes += n;
            *p = (CUdeviceptr)(uintptr_t)h + DEV_BIAS;
        }
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    pthread_mutex_lock(&lock);
    CTX();
    int i = 0;
    while (i < MAX_RANGES && !(allocs[i].live && allocs[i].host + DEV_BIAS == p)) i++;
    CUresult r = SUCCESS;
    if (i == MAX_RANGES) r = BAD(INVALID_VALUE, "not the start of a live allocation");
    else {
        free((void *)allocs[i].host);
        allocs[i].live = 0;
        alloc_bytes -= allocs[i].len;
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    const char *fail = getenv("MOCK_CUDA_FAIL_REGISTER_NTH");
    n_register_calls++;
    if (fail && atol(fail) == n_register_calls) r = OUT_OF_MEMORY; /* injected: nothing registered */
    else if (!p || n == 0) r = BAD(INVALID_VALUE, "null or empty range");
    else if (flags & ~(1u | 2u | 4u | 8u)) r = BAD(INVALID_VALUE, "unknown flags");
    else if (overlapping(regs, (uintptr_t)p, n))
        r = BAD(ALREADY_REGISTERED, "overlaps a registered range");
    else if ((flags & 8) && !attribute(113))
        r = NOT_SUPPORTED; /* READ_ONLY on a device without READ_ONLY_HOST_REGISTER_SUPPORTED */
    else {
        int i = 0;
        while (i < MAX_RANGES && regs[i].live) i++;
        if (i == MAX_RANGES) r = OUT_OF_MEMORY;
        else regs[i] = (struct range){(uintptr_t)p, n, flags, 1};
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *d, void *p, unsigned flags) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    struct range *g = find(regs, (uintptr_t)p, 1);
    if (flags != 0) r = BAD(INVALID_VALUE, "flags must be 0");
    else if (!g) r = BAD(INVALID_VALUE, "not registered");
    else if (!(g->flags & 2)) r = BAD(INVALID_VALUE, "registered without DEVICEMAP");
    else *d = (CUdeviceptr)(uintptr_t)p + MAP_BIAS;
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuMemHostUnregister(void *p) {
    pthread_mutex_lock(&lock);
    CTX();
    int i = 0;
    while (i < MAX_RANGES && !(regs[i].live && regs[i].host == (uintptr_t)p)) i++;
    CUresult r = SUCCESS;
    if (i == MAX_RANGES) r = BAD(NOT_REGISTERED, "not the start of a registered range");
    else { regs[i].live = 0; n_unregister_calls++; }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    /* Synchronous, but (like the real call) not ordered after work on non-blocking streams. */
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    uintptr_t h = dev_to_host(src, n, 0);
    if (!h) r = BAD(INVALID_VALUE, "source is not device memory");
    else { memcpy(dst, (void *)h, n); n_dma++; }
    pthread_mutex_unlock(&lock);
    return r;
}

/* ---- streams and events ---- */

CUresult cuStreamCreate(void **s, unsigned flags) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (flags & ~1u) r = BAD(INVALID_VALUE, "unknown flags");
    else {
        struct stream *st = calloc(1, sizeof *st);
        st->live = 1;
        st->gen = ctx_gen;
        n_live_streams++;
        *s = st;
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuStreamSynchronize(void *s) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (!valid_stream(s)) r = BAD(INVALID_HANDLE, "not a live stream (the legacy stream is not used)");
    else { complete(s, ((struct stream *)s)->seq_next); r = sticky_error; }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuStreamDestroy_v2(void *s) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (!valid_stream(s)) r = BAD(INVALID_HANDLE, "not a live stream");
    else {
        struct stream *st = s;
        complete(st, st->seq_next);
        st->live = 0; /* leaked on purpose, so a use after destroy is detected */
        n_live_streams--;
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuEventCreate(void **e, unsigned flags) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (flags & ~(1u | 2u | 4u)) r = BAD(INVALID_VALUE, "unknown flags");
    else {
        struct event *ev = calloc(1, sizeof *ev);
        ev->live = 1;
        ev->gen = ctx_gen;
        n_live_events++;
        *e = ev;
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuEventRecord(void *e, void *s) {
    pthread_mutex_lock(&lock);
    CTX();
    struct event *ev = e;
    CUresult r = SUCCESS;
    if (!valid_event(ev)) r = BAD(INVALID_HANDLE, "not a live event of this context");
    else if (!valid_stream(s)) r = BAD(INVALID_HANDLE, "not a live stream");
    else { ev->s = s; ev->seq = ((struct stream *)s)->seq_next; ev->queried = 0; }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuEventQuery(void *e) {
    pthread_mutex_lock(&lock);
    CTX();
    struct event *ev = e;
    CUresult r = SUCCESS;
    if (!valid_event(ev)) r = BAD(INVALID_HANDLE, "not a live event of this context");
    else if (ev->s && ev->s->seq_done < ev->seq) {
        /* The first query after a record finds the work still running; the next finds it done. */
        if (!ev->queried) { ev->queried = 1; r = NOT_READY; }
        else { complete(ev->s, ev->seq); r = sticky_error; }
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuEventSynchronize(void *e) {
    pthread_mutex_lock(&lock);
    CTX();
    struct event *ev = e;
    CUresult r = SUCCESS;
    if (!valid_event(ev)) r = BAD(INVALID_HANDLE, "not a live event of this context");
    else if (ev->s) { complete(ev->s, ev->seq); r = sticky_error; }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuEventDestroy_v2(void *e) {
    pthread_mutex_lock(&lock);
    CTX();
    struct event *ev = e;
    CUresult r = SUCCESS;
    if (!valid_event(ev)) r = BAD(INVALID_HANDLE, "not a live event of this context (destroyed twice?)");
    else { ev->live = 0; n_live_events--; }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *s) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (!valid_stream(s)) r = BAD(INVALID_HANDLE, "not a live stream");
    else if (!dev_to_host(dst, n, 1)) r = BAD(INVALID_VALUE, "destination is not device memory");
    else if (!src) r = BAD(INVALID_VALUE, "null source");
    else { n_dma++; n_h2d++; r = enqueue(s, (struct op){0, dst, 0, (uintptr_t)src, n, find(regs, (uintptr_t)src, n) != NULL}); }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *s) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (!valid_stream(s)) r = BAD(INVALID_HANDLE, "not a live stream");
    else if (!dev_to_host(src, n, 0)) r = BAD(INVALID_VALUE, "source is not device memory");
    else if (!dst) r = BAD(INVALID_VALUE, "null destination");
    else { n_dma++; r = enqueue(s, (struct op){1, src, 0, (uintptr_t)dst, n, find(regs, (uintptr_t)dst, n) != NULL}); }
    pthread_mutex_unlock(&lock);
    return r;
}

/* ---- stream memory operations ---- */

static CUresult write_value64(void *s, CUdeviceptr addr, uint64_t value, unsigned flags, int supported) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (!supported) r = NOT_SUPPORTED; /* as a driver whose device attribute says 0 */
    else if (!valid_stream(s)) r = BAD(INVALID_HANDLE, "not a live stream");
    else if (flags & ~1u) r = BAD(INVALID_VALUE, "flags must be CU_STREAM_WRITE_VALUE_DEFAULT or _NO_MEMORY_BARRIER");
    else if (addr % 8) r = BAD(INVALID_VALUE, "address not 8-aligned");
    else if (!dev_to_host(addr, 8, 1)) r = BAD(INVALID_VALUE, "address is not device memory");
    else { n_stream_writes++; r = enqueue(s, (struct op){3, addr, 0, 0, 8, 0, value}); }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuStreamWriteValue64_v2(void *s, CUdeviceptr addr, uint64_t value, unsigned flags) {
    return write_value64(s, addr, value, flags, attribute(122));
}
CUresult cuStreamWriteValue64(void *s, CUdeviceptr addr, uint64_t value, unsigned flags) {
    return write_value64(s, addr, value, flags, attribute(92) && attribute(93));
}

/* ---- the copy kernel ---- */

CUresult cuModuleLoadData(void **m, const void *image) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    if (kernel_running) r = BAD(NOT_READY, "loading code while a kernel runs (a driver may wait for the context to go idle: deadlock)");
    else if (!image) r = BAD(INVALID_VALUE, "null image");
    else if (!strstr((const char *)image, ".entry gpuio_copy_mapped")) r = BAD(INVALID_IMAGE, "no gpuio_copy_mapped entry");
    else {
        struct module *mod = malloc(sizeof *mod);
        mod->gen = ctx_gen; mod->unloaded = 0;
        mod->has_deliver = strstr((const char *)image, ".entry gpuio_deliver(") != NULL;
        *m = mod; n_live_modules++;
    }
    pthread_mutex_unlock(&lock);
    return r;
}
CUresult cuModuleGetFunction(void **f, void *m, const char *name) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    struct module *mod = m;
    if (!mod || mod->gen != ctx_gen || mod->unloaded) r = BAD(INVALID_HANDLE, "module of a reset context, or unloaded");
    else if (!name || (strcmp(name, "gpuio_copy_mapped") != 0 && !(mod->has_deliver && strcmp(name, "gpuio_deliver") == 0)))
        r = BAD(NOT_FOUND, "unknown function");
    else {
        struct function *fn = malloc(sizeof *fn);
        fn->gen = mod->gen; fn->mod = mod; fn->kind = strcmp(name, "gpuio_deliver") == 0; fn->loaded = 0;
        *f = fn;
    }
    pthread_mutex_unlock(&lock);
    return r;
}
/* Unloading twice, or a module of a reset context, is refused; its functions die with it. */
CUresult cuModuleUnload(void *m) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    struct module *mod = m;
    if (!mod || mod->gen != ctx_gen || mod->unloaded) r = BAD(INVALID_HANDLE, "unloading a dead module");
    else { mod->unloaded = 1; n_live_modules--; }
    pthread_mutex_unlock(&lock);
    return r;
}
long mock_live_modules(void) { return n_live_modules; }
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void *s, void **params, void **extra) {
    pthread_mutex_lock(&lock);
    CTX();
    CUresult r = SUCCESS;
    struct function *fn = f;
    if (!fn || fn->gen != ctx_gen || fn->mod->unloaded) r = BAD(INVALID_HANDLE, "function of a reset context or unloaded module");
    else if (!gx || !gy || !gz || !bx || !by || !bz || gx > 0x7fffffffu || gy > 65535 || gz > 65535)
        r = BAD(INVALID_VALUE, "bad grid or block dimensions");
    else if ((unsigned long long)bx * by * bz > 1024 || bz > 64) r = BAD(INVALID_VALUE, "too many threads per block");
    else if (shared > 48 * 1024) r = BAD(INVALID_VALUE, "too much shared memory");
    else if (!valid_stream(s)) r = BAD(INVALID_HANDLE, "not a live stream");
    else if (!params || extra) r = BAD(INVALID_VALUE, "kernelParams must be given, extra null");
    else if (!fn->loaded && kernel_running)
        r = BAD(NOT_READY, "a function's first launch (its code loaded lazily) while a kernel runs: a driver may wait for the context to go idle, which the running kernel never lets happen (deadlock)");
    else {
        fn->loaded = 1;
        /* The parameters are read now, as the driver does: the caller's locals may die after. */
        n_launches++;
        if (fn->kind == 1) {
            uint64_t descs = *(uint64_t *)params[0];
            unsigned n = *(unsigned *)params[1];
            n_deliveries += n;
            r = enqueue(s, (struct op){4, descs, 0, 0, (size_t)n, 0});
        } else {
            uint64_t src = *(uint64_t *)params[0], dst = *(uint64_t *)params[1], n = *(uint64_t *)params[2];
            r = enqueue(s, (struct op){2, src, dst, 0, (size_t)n, 0});
        }
    }
    pthread_mutex_unlock(&lock);
    return r;
}

/* ---- counters for the test ---- */

long mock_kernel_launches(void) { return n_launches; }
long mock_kernel_started(void) { pthread_mutex_lock(&lock); kernel_running = 1; pthread_mutex_unlock(&lock); return 1; }
long mock_kernel_stopped(void) { pthread_mutex_lock(&lock); kernel_running = 0; pthread_mutex_unlock(&lock); return 0; }
long mock_deliveries(void) { return n_deliveries; }
long mock_h2d_copies(void) { return n_h2d; }
long mock_dma_copies(void) { return n_dma; }
long mock_stream_writes(void) { return n_stream_writes; }
/* Device address - host address of device memory (for CPU threads playing a kernel). */
long mock_device_bias(void) { return (long)DEV_BIAS; }
long mock_faults(void) { return n_faults; }
long mock_bad_calls(void) { return n_bad_calls; }
long mock_live_events(void) { return n_live_events; }
long mock_live_streams(void) { return n_live_streams; }
long mock_ctx_refs(void) { return ctx_refs; }
long mock_registered(void) {
    long k = 0;
    for (int i = 0; i < MAX_RANGES; i++) k += regs[i].live;
    return k;
}
long mock_allocated_bytes(void) { return (long)alloc_bytes; }
long mock_register_calls(void) { return n_register_calls; }
long mock_unregister_calls(void) { return n_unregister_calls; }
const char *mock_last_bad(void) { return last_bad; }

/* For the mock cuFile (mock_libcufile.c): the host address behind device memory [d, d+n) written by
 * a read, or 0 when the calling thread has no live context or the range is not inside an
 * allocation. A refusal counts as a bad call. */
uintptr_t mock_device_range_for_write(CUdeviceptr d, size_t n) {
    pthread_mutex_lock(&lock);
    uintptr_t h = 0;
    if (need_ctx("cuFileRead") == SUCCESS) {
        h = dev_to_host(d, n, 1);
        if (!h || d >> 60 != 1) { h = 0; bad(0, "%s: destination is not device memory", "cuFileRead"); }
    }
    pthread_mutex_unlock(&lock);
    return h;
}
int mock_cuda_initialized(void) { return initialized; }
