/* A mock of GPUDirect Storage's libcufile for tests/mock_driver.rs, beside mock_libcuda.c.
 *
 * It implements the entry points gpuio-cuda's cuFile reader calls (cuFileDriverOpen/Close,
 * cuFileHandleRegister/Deregister, cuFileRead), with the C ABI of cufile.h, and checks how they are
 * called: the driver open before any other call, file descriptors of type OPAQUE_FD opened O_DIRECT,
 * one registration per descriptor, reads through live handles into device memory of the mock
 * libcuda (through its mock_device_range_for_write, which also requires a context current on the
 * calling thread). It reads with pread on a buffered descriptor of the same file, as cuFile's
 * compatibility mode reads through host memory; it is not GPUDirect Storage.
 *
 * Injected failures, from the environment:
 *   MOCK_CUFILE_OPEN_ERROR=N      cuFileDriverOpen fails with cuFile error N
 *   MOCK_CUFILE_REGISTER_ERROR=N  cuFileHandleRegister fails with N (5027: a filesystem cuFile
 *                                 cannot serve, "unable to get volume attributes")
 *   MOCK_CUFILE_READ_ERRNO=E      cuFileRead returns -1 with errno E
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

typedef struct { int err; int cu_err; } CUfileError_t;
typedef struct {
    int type;
    union { int fd; void *handle; } handle;
    const void *fs_ops;
} CUfileDescr_t;

enum {
    OK = 0,
    DRIVER_NOT_INITIALIZED = 5001,
    CUDA_POINTER_INVALID = 5012,
    DIO_NOT_SET = 5020,
    INVALID_VALUE = 5022,
    HANDLE_ALREADY_REGISTERED = 5028,
};

#define MAX_HANDLES 256

struct handle { int live; int fd; int buffered_fd; };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int driver_open;
static struct handle handles[MAX_HANDLES];
static long n_reads, n_bad_calls, n_registers;
static char last_bad[512];

static CUfileError_t fail(int err, const char *fn, const char *why) {
    n_bad_calls++;
    snprintf(last_bad, sizeof last_bad, "%s: %s", fn, why);
    return (CUfileError_t){err, 0};
}

static int env_int(const char *name) {
    const char *s = getenv(name);
    return s ? atoi(s) : 0;
}

/* The mock libcuda's exports, looked up in the already-loaded library. */
static void *cuda_sym(const char *name) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!lib) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
    return lib ? dlsym(lib, name) : NULL;
}

CUfileError_t cuFileDriverOpen(void) {
    int (*initialized)(void) = (int (*)(void))cuda_sym("mock_cuda_initialized");
    pthread_mutex_lock(&lock);
    CUfileError_t r = {OK, 0};
    int injected = env_int("MOCK_CUFILE_OPEN_ERROR");
    if (!initialized || !initialized()) r = fail(DRIVER_NOT_INITIALIZED, __func__, "the CUDA driver is not initialized");
    else if (injected) r = (CUfileError_t){injected, 0};
    else driver_open++;
    pthread_mutex_unlock(&lock);
    return r;
}

CUfileError_t cuFileDriverClose_v2(void) {
    pthread_mutex_lock(&lock);
    CUfileError_t r = {OK, 0};
    if (driver_open <= 0) r = fail(DRIVER_NOT_INITIALIZED, __func__, "closed more often than opened");
    else driver_open--;
    pthread_mutex_unlock(&lock);
    return r;
}
CUfileError_t cuFileDriverClose(void) { return cuFileDriverClose_v2(); }

CUfileError_t cuFileHandleRegister(void **fh, CUfileDescr_t *d) {
    pthread_mutex_lock(&lock);
    CUfileError_t r = {OK, 0};
    int injected = env_int("MOCK_CUFILE_REGISTER_ERROR");
    int flags = d ? fcntl(d->handle.fd, F_GETFL) : -1;
    if (!driver_open) r = fail(DRIVER_NOT_INITIALIZED, __func__, "before cuFileDriverOpen");
    else if (!fh || !d || d->type != 1 || d->fs_ops) r = fail(INVALID_VALUE, __func__, "not an OPAQUE_FD descriptor");
    else if (flags < 0) r = fail(INVALID_VALUE, __func__, "not an open file descriptor");
    else if (!(flags & O_DIRECT)) r = fail(DIO_NOT_SET, __func__, "descriptor not opened O_DIRECT");
    else if (injected) r = (CUfileError_t){injected, 0};
    else {
        int free_slot = -1;
        for (int i = 0; i < MAX_HANDLES; i++) {
            if (handles[i].live && handles[i].fd == d->handle.fd) {
                r = fail(HANDLE_ALREADY_REGISTERED, __func__, "descriptor registered twice");
                break;
            }
            if (!handles[i].live && free_slot < 0) free_slot = i;
        }
        if (r.err == OK) {
            char path[64];
            snprintf(path, sizeof path, "/proc/self/fd/%d", d->handle.fd);
            int bfd = free_slot < 0 ? -1 : open(path, O_RDONLY | O_CLOEXEC);
            if (bfd < 0) r = fail(INVALID_VALUE, __func__, "no slot, or the file cannot be reopened");
            else {
                handles[free_slot] = (struct handle){1, d->handle.fd, bfd};
                *fh = &handles[free_slot];
                n_registers++;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return r;
}

void cuFileHandleDeregister(void *fh) {
    pthread_mutex_lock(&lock);
    struct handle *h = fh;
    if (!h || h < handles || h >= handles + MAX_HANDLES || !h->live) fail(INVALID_VALUE, __func__, "not a live handle");
    else { close(h->buffered_fd); h->live = 0; }
    pthread_mutex_unlock(&lock);
}

ssize_t cuFileRead(void *fh, void *base, size_t size, off_t file_offset, off_t dev_offset) {
    uintptr_t (*range)(unsigned long long, size_t) =
        (uintptr_t (*)(unsigned long long, size_t))cuda_sym("mock_device_range_for_write");
    pthread_mutex_lock(&lock);
    struct handle *h = fh;
    int live = driver_open && h && h >= handles && h < handles + MAX_HANDLES && h->live;
    int bfd = live ? h->buffered_fd : -1;
    if (!live) fail(INVALID_VALUE, __func__, "no driver or not a live handle");
    pthread_mutex_unlock(&lock);
    if (!live) return -INVALID_VALUE;
    if (file_offset < 0 || dev_offset < 0) return -INVALID_VALUE;
    uintptr_t dst = range ? range((unsigned long long)(uintptr_t)base + (unsigned long long)dev_offset, size) : 0;
    if (!dst) {
        pthread_mutex_lock(&lock);
        fail(CUDA_POINTER_INVALID, __func__, "destination is not device memory (or no context)");
        pthread_mutex_unlock(&lock);
        return -CUDA_POINTER_INVALID;
    }
    int injected = env_int("MOCK_CUFILE_READ_ERRNO");
    if (injected) { errno = injected; return -1; }
    size_t done = 0;
    while (done < size) {
        ssize_t n = pread(bfd, (char *)dst + done, size - done, file_offset + (off_t)done);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return done ? (ssize_t)done : -1;
        if (n == 0) break;
        done += (size_t)n;
    }
    pthread_mutex_lock(&lock);
    n_reads++;
    pthread_mutex_unlock(&lock);
    return (ssize_t)done;
}

/* ---- counters for the test ---- */

long mock_cufile_reads(void) { return n_reads; }
long mock_cufile_registers(void) { return n_registers; }
long mock_cufile_bad_calls(void) { return n_bad_calls; }
long mock_cufile_live_handles(void) {
    long k = 0;
    for (int i = 0; i < MAX_HANDLES; i++) k += handles[i].live;
    return k;
}
const char *mock_cufile_last_bad(void) { return last_bad; }
