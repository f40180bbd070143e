/*
 * A stand-in for the CUDA driver library (libcuda.so.1), for the layered case: NVIDIA's runtime
 * implements cudaMemcpy* and cudaHostAlloc* with driver calls, so a process maps both libraries
 * and one copy passes through a probed function in each. The workload builds the runtime stand-in
 * on top of this one with `--stub-driver`; the exporter must count each copy once.
 *
 * Real signatures (cuda.h, CUDA 12): CUdeviceptr is an unsigned 64-bit integer.
 * Built with the same flags as cudart_stub.c (no builtins: copies never call libc memcpy).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *CUstream;
#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2

#define BOUNCE (2u << 20)
static unsigned char bounce[BOUNCE] __attribute__((aligned(64)));

__attribute__((noinline)) static void dma(void *dst, const void *src, size_t n) {
    uint64_t *d = dst;
    const uint64_t *s = src;
    size_t words = n / 8;
    for (size_t i = 0; i < words; i++) {
        __asm__ volatile("" ::: "memory");
        d[i] = s[i];
    }
    unsigned char *db = (unsigned char *)dst + words * 8;
    const unsigned char *sb = (const unsigned char *)src + words * 8;
    for (size_t i = 0; i < n % 8; i++)
        db[i] = sb[i];
}

#define MAX_PINNED 1024
static struct { uintptr_t start, end; } pinned[MAX_PINNED];

static int is_pinned(const void *p) {
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < MAX_PINNED; i++)
        if (a >= pinned[i].start && a < pinned[i].end)
            return 1;
    return 0;
}

static void track(void *p, size_t size) {
    for (int i = 0; i < MAX_PINNED; i++)
        if (pinned[i].start == 0) {
            pinned[i].start = (uintptr_t)p;
            pinned[i].end = (uintptr_t)p + size;
            return;
        }
}

static void untrack(void *p) {
    for (int i = 0; i < MAX_PINNED; i++)
        if (pinned[i].start == (uintptr_t)p)
            pinned[i].start = pinned[i].end = 0;
}

/* host is the host-side pointer; pageable host memory is staged through the bounce buffer. */
static CUresult copy(void *dst, const void *src, size_t n, const void *host) {
    if (!dst || !src)
        return CUDA_ERROR_INVALID_VALUE;
    if (is_pinned(host)) {
        dma(dst, src, n);
        return CUDA_SUCCESS;
    }
    for (size_t off = 0; off < n; off += BOUNCE) {
        size_t k = n - off < BOUNCE ? n - off : BOUNCE;
        dma(bounce, (const char *)src + off, k);
        dma((char *)dst + off, bounce, k);
    }
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    return copy((void *)(uintptr_t)dst, src, n, src);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
    (void)s;
    return copy((void *)(uintptr_t)dst, src, n, src);
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    return copy(dst, (const void *)(uintptr_t)src, n, dst);
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s) {
    (void)s;
    return copy(dst, (const void *)(uintptr_t)src, n, dst);
}

CUresult cuMemHostAlloc(void **pp, size_t size, unsigned int flags) {
    (void)flags;
    if (!pp)
        return CUDA_ERROR_INVALID_VALUE;
    *pp = aligned_alloc(4096, (size + 4095) & ~(size_t)4095);
    if (!*pp)
        return CUDA_ERROR_OUT_OF_MEMORY;
    track(*pp, size);
    return CUDA_SUCCESS;
}
CUresult cuMemAllocHost_v2(void **pp, size_t size) { return cuMemHostAlloc(pp, size, 0); }
CUresult cuMemFreeHost(void *p) {
    untrack(p);
    free(p);
    return CUDA_SUCCESS;
}
CUresult cuMemHostRegister_v2(void *p, size_t size, unsigned int flags) {
    (void)flags;
    if (!p || !size)
        return CUDA_ERROR_INVALID_VALUE;
    track(p, size);
    return CUDA_SUCCESS;
}
CUresult cuMemHostUnregister(void *p) {
    untrack(p);
    return CUDA_SUCCESS;
}
