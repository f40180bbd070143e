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

#include "stub_host.h"

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef void *CUstream;
#define CUDA_SUCCESS 0
#define CUDA_ERROR_INVALID_VALUE 1
#define CUDA_ERROR_OUT_OF_MEMORY 2

static CUresult copy(void *dst, const void *src, size_t n, const void *host) {
    if (!dst || !src)
        return CUDA_ERROR_INVALID_VALUE;
    staged_copy(dst, src, n, host);
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
