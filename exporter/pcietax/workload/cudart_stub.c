/*
 * A stand-in for the CUDA runtime (libcudart.so.12) on machines without a GPU.
 *
 * It exports the real symbols with the real signatures (cuda_runtime_api.h, CUDA 12), so the
 * exporter's uprobes attach to it exactly as to NVIDIA's library and read the same arguments from
 * the same registers. Only the device is stood in: "device memory" is host memory, and a copy is a
 * CPU copy. A pageable host->device copy goes through a bounce buffer as the real driver does
 * (which is the user_copy hop the exporter attributes to pageable copies).
 *
 * With -DPTX_WITH_DRIVER it is layered on cuda_driver_stub.c (libcuda.so.1) the way NVIDIA's runtime
 * is: copies and pinned allocations call the driver API (`pcietax workload --stub-driver`).
 *
 * Built by `pcietax workload` with: gcc -O2 -shared -fPIC -fno-builtin
 *     -fno-tree-loop-distribute-patterns -Wl,-soname,libcudart.so.12
 * The copy loops must not become calls to libc memcpy (see stub_host.h).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "stub_host.h"

typedef int cudaError_t;
typedef void *cudaStream_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
#define cudaSuccess 0
#define cudaErrorInvalidValue 1
#define cudaErrorMemoryAllocation 2

__attribute__((unused)) static cudaError_t copy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
    if (count == 0)
        return cudaSuccess;
    if (!dst || !src)
        return cudaErrorInvalidValue;
    const void *host = kind == cudaMemcpyHostToDevice ? src : kind == cudaMemcpyDeviceToHost ? dst : NULL;
    staged_copy(dst, src, count, host);
    return cudaSuccess;
}

#ifdef PTX_WITH_DRIVER
typedef unsigned long long CUdeviceptr;
int cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *stream);
int cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *stream);
int cuMemHostAlloc(void **pp, size_t size, unsigned int flags);
int cuMemFreeHost(void *p);
int cuMemHostRegister_v2(void *p, size_t size, unsigned int flags);
int cuMemHostUnregister(void *p);
#define copy(dst, src, count, kind) via_driver(dst, src, count, kind)
static cudaError_t via_driver(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
    if (kind == cudaMemcpyHostToDevice)
        return cuMemcpyHtoDAsync_v2((CUdeviceptr)(uintptr_t)dst, src, count, 0);
    if (kind == cudaMemcpyDeviceToHost)
        return cuMemcpyDtoHAsync_v2(dst, (CUdeviceptr)(uintptr_t)src, count, 0);
    dma(dst, src, count);
    return cudaSuccess;
}
#define track(p, size) ((void)0)
#define untrack(p) ((void)0)
#endif

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
    return copy(dst, src, count, kind);
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream) {
    (void)stream;
    return copy(dst, src, count, kind);
}

/* Per-thread default stream builds (nvcc --default-stream per-thread). */
cudaError_t cudaMemcpy_ptds(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind) {
    return copy(dst, src, count, kind);
}

cudaError_t cudaMemcpyAsync_ptsz(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                                 cudaStream_t stream) {
    (void)stream;
    return copy(dst, src, count, kind);
}

cudaError_t cudaMalloc(void **devPtr, size_t size) {
    if (!devPtr)
        return cudaErrorInvalidValue;
    *devPtr = aligned_alloc(256, (size + 255) & ~(size_t)255);
    return *devPtr ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFree(void *devPtr) {
    free(devPtr);
    return cudaSuccess;
}

cudaError_t cudaHostAlloc(void **pHost, size_t size, unsigned int flags) {
    (void)flags;
#ifdef PTX_WITH_DRIVER
    return cuMemHostAlloc(pHost, size, flags);
#endif
    if (!pHost)
        return cudaErrorInvalidValue;
    *pHost = aligned_alloc(4096, (size + 4095) & ~(size_t)4095);
    if (!*pHost)
        return cudaErrorMemoryAllocation;
    track(*pHost, size);
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **ptr, size_t size) { return cudaHostAlloc(ptr, size, 0); }

cudaError_t cudaFreeHost(void *ptr) {
#ifdef PTX_WITH_DRIVER
    return cuMemFreeHost(ptr);
#endif
    untrack(ptr);
    free(ptr);
    return cudaSuccess;
}

cudaError_t cudaHostRegister(void *ptr, size_t size, unsigned int flags) {
    (void)flags;
#ifdef PTX_WITH_DRIVER
    return cuMemHostRegister_v2(ptr, size, flags);
#endif
    if (!ptr || !size)
        return cudaErrorInvalidValue;
    track(ptr, size);
    return cudaSuccess;
}

cudaError_t cudaHostUnregister(void *ptr) {
#ifdef PTX_WITH_DRIVER
    return cuMemHostUnregister(ptr);
#endif
    untrack(ptr);
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *stream) {
    if (stream)
        *stream = (cudaStream_t)0x1;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    (void)stream;
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaGetDeviceCount(int *count) {
    if (count)
        *count = 1;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *v) {
    if (v)
        *v = 12040;
    return cudaSuccess;
}

const char *cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "stub error"; }
