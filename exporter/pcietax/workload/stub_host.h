/*
 * What the CUDA runtime and driver stand-ins share: the "DMA" copy, the pinned-range table, and
 * the staged copy a driver does for pageable host memory. Both stand-ins include this header, so
 * a copy behaves the same whichever library the workload calls.
 *
 * The copy loops must not become calls to libc memcpy (the stand-ins are built with -fno-builtin
 * -fno-tree-loop-distribute-patterns): the opt-in memcpy probe would then see the stand-in's DMA
 * as a user-space copy.
 */
#ifndef PTX_STUB_HOST_H
#define PTX_STUB_HOST_H

#include <stddef.h>
#include <stdint.h>

#define BOUNCE (2u << 20) /* the driver stages pageable copies through pinned chunks */

static unsigned char bounce[BOUNCE] __attribute__((aligned(64)));

/* A plain word copy, kept out of libc. */
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

/* Host ranges made pinned through this library (host alloc / host register). */
#define MAX_PINNED 1024
static struct { uintptr_t start, end; } pinned[MAX_PINNED];

__attribute__((unused)) static int is_pinned(const void *p) {
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < MAX_PINNED; i++)
        if (a >= pinned[i].start && a < pinned[i].end)
            return 1;
    return 0;
}

__attribute__((unused)) static void track(void *p, size_t size) {
    for (int i = 0; i < MAX_PINNED; i++) {
        if (pinned[i].start == 0) {
            pinned[i].start = (uintptr_t)p;
            pinned[i].end = (uintptr_t)p + size;
            return;
        }
    }
}

__attribute__((unused)) static void untrack(void *p) {
    for (int i = 0; i < MAX_PINNED; i++)
        if (pinned[i].start == (uintptr_t)p)
            pinned[i].start = pinned[i].end = 0;
}

/* host is the host-side pointer (NULL for device-to-device): pageable host memory is staged
 * through the bounce buffer, as the real driver does; pinned memory is copied directly. */
__attribute__((unused)) static void staged_copy(void *dst, const void *src, size_t n, const void *host) {
    if (host && !is_pinned(host)) {
        for (size_t off = 0; off < n; off += BOUNCE) {
            size_t k = n - off < BOUNCE ? n - off : BOUNCE;
            dma(bounce, (const char *)src + off, k);
            dma((char *)dst + off, bounce, k);
        }
        return;
    }
    dma(dst, src, n);
}

#endif
