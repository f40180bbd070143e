// pcietax: in-kernel aggregation of the host staging costs of a network -> GPU data path.
//
// Loaded by exporter/pcietax/sources/ebpf.py with BCC. Every program only adds to a map; user space
// reads the maps once per collection cycle (BCC tools style, no per-event perf buffer).
//
// Built from tracepoints and uprobes only: kprobes are not available on every kernel (CONFIG_KPROBES
// is off on this project's CI kernel), and tracepoint arguments come from the running kernel's
// format files, so nothing here depends on kernel struct layouts (headers may be from another
// kernel version).
//
// Optional parts are compiled in with -D flags from the loader:
//   PTX_CUDA     CUDA runtime / driver copy and pinned-memory uprobes
//   PTX_MEMCPY   the opt-in memcpy uprobe (copies into or out of pinned buffers)
//   PTX_CGROUP   target processes by cgroup v2 ancestry
//   PTX_MAX_PINNED  pinned ranges remembered per process
//   PTX_MAX_PROCS   processes tracked at once

#include <uapi/linux/ptrace.h>

#ifndef PTX_MAX_PINNED
#define PTX_MAX_PINNED 64
#endif
#ifndef PTX_MAX_PROCS
#define PTX_MAX_PROCS 10240  // processes tracked at once per map
#endif

// Probe ids: index of pcietax_probe_hits_total{probe}; keep in step with PROBES in ebpf.py.
enum {
    P_HARDIRQ = 0,
    P_SOFTIRQ = 1,
    P_SOCK_RECV = 2,
    P_SOCK_SEND = 3,
    P_CUDA_COPY = 4,
    P_CUDA_PINNED = 5,
    P_MEMCPY = 6,
    P_NPROBES = 7,
};

// Errors: index of the errors array; keep in step with ERRORS in ebpf.py.
enum {
    E_PROC_MAP_FULL = 0,
    E_PINNED_FULL = 1,
    E_CUDA_DEFAULT_UNRESOLVED = 2,
    E_NERRORS = 3,
};

enum { DIR_INGRESS = 0, DIR_EGRESS = 1 };

struct proc_dir_key {
    u32 tgid;
    u32 dir;  // DIR_INGRESS / DIR_EGRESS
};

struct cuda_key {
    u32 tgid;
    u8 kind;    // 0 = h2d, 1 = d2h
    u8 pinned;  // 1 = pinned, 0 = pageable
    u16 pad;
};

struct cuda_val {
    u64 bytes;
    u64 calls;
};

BPF_PERCPU_ARRAY(hits, u64, P_NPROBES);
BPF_ARRAY(errors, u64, E_NERRORS);

// Target scoping: config[0] = 1 when node-wide; targets = tgids chosen by user space
// (--target.pid, --target.comm); target_cgroup = cgroup id at config[1] = its level (--target.cgroup);
// config[2] = 1 when a driver library is probed too (runtime copies then mark their thread).
BPF_ARRAY(config, u64, 3);
BPF_HASH(targets, u32, u8, PTX_MAX_PROCS);
BPF_HASH(target_cgroup, u64, u8, 16);

// Hard and soft IRQ time (node-wide, not per process).
BPF_PERCPU_ARRAY(irq_start, u64, 1);
BPF_PERCPU_HASH(irq_ns, u32, u64, 4096);
BPF_PERCPU_ARRAY(softirq_start, u64, 1);
BPF_PERCPU_ARRAY(softirq_ns, u64, 16);

// Socket payload copied between kernel and user, per target process and direction.
BPF_PERCPU_HASH(sock_bytes, struct proc_dir_key, u64, PTX_MAX_PROCS);
// Comm of each counted process, for the process label when it has exited before user space reads.
struct comm_t { char comm[16]; };
BPF_HASH(comms, u32, struct comm_t, PTX_MAX_PROCS);

static __always_inline void remember_comm(u32 tgid) {
    struct comm_t c = {};
    bpf_get_current_comm(&c.comm, sizeof(c.comm));
    comms.update(&tgid, &c);
}

static __always_inline void err(int i) {
    u64 *v = errors.lookup(&i);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void hit(int probe) {
    u64 *v = hits.lookup(&probe);
    if (v)
        (*v)++;
}

static __always_inline int is_target(u32 tgid) {
    int zero = 0;
    u64 *nodewide = config.lookup(&zero);
    if (nodewide && *nodewide)
        return 1;
    if (targets.lookup(&tgid))
        return 1;
#ifdef PTX_CGROUP
    int one = 1;
    u64 *level = config.lookup(&one);
    if (level && *level) {
        u64 id = bpf_get_current_ancestor_cgroup_id((int)*level);
        if (target_cgroup.lookup(&id))
            return 1;
    }
#endif
    return 0;
}

static __always_inline void add_sock(u32 tgid, u32 dir, int len) {
    if (len <= 0)
        return;
    struct proc_dir_key k = {.tgid = tgid, .dir = dir};
    u64 *v = sock_bytes.lookup(&k);
    if (v) {
        *v += len;  // per-CPU value: no atomics needed
        return;
    }
    u64 init = len;
    if (sock_bytes.update(&k, &init) != 0)
        err(E_PROC_MAP_FULL);
    remember_comm(tgid);
}

// --- hard IRQs -------------------------------------------------------------------------------

TRACEPOINT_PROBE(irq, irq_handler_entry) {
    hit(P_HARDIRQ);
    int zero = 0;
    u64 ts = bpf_ktime_get_ns();
    irq_start.update(&zero, &ts);
    return 0;
}

TRACEPOINT_PROBE(irq, irq_handler_exit) {
    int zero = 0;
    u64 *start = irq_start.lookup(&zero);
    if (!start || *start == 0)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *start;
    *start = 0;
    u32 irq = args->irq;
    u64 *v = irq_ns.lookup(&irq);
    if (v) {
        *v += delta;
    } else if (irq_ns.update(&irq, &delta) != 0) {
        err(E_PROC_MAP_FULL);
    }
    return 0;
}

// --- softirqs --------------------------------------------------------------------------------

TRACEPOINT_PROBE(irq, softirq_entry) {
    hit(P_SOFTIRQ);
    int zero = 0;
    u64 ts = bpf_ktime_get_ns();
    softirq_start.update(&zero, &ts);
    return 0;
}

TRACEPOINT_PROBE(irq, softirq_exit) {
    int zero = 0;
    u64 *start = softirq_start.lookup(&zero);
    if (!start || *start == 0)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *start;
    *start = 0;
    int vec = args->vec;
    u64 *v = softirq_ns.lookup(&vec);
    if (v)
        *v += delta;
    return 0;
}

// --- socket payload copies -------------------------------------------------------------------

// Receive: the kernel -> user copy itself (skb_copy_datagram_iter), in the receiving task's
// context; one event per skb copied, so a recv() spanning several skbs sums them.
TRACEPOINT_PROBE(skb, skb_copy_datagram_iovec) {
    hit(P_SOCK_RECV);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    add_sock(tgid, DIR_INGRESS, args->len);
    return 0;
}

#ifdef PTX_SEND
// Send: sock:sock_send_length (Linux 6.3+) fires in sock_sendmsg_nosec() for every sendmsg/send/
// sendto/write on a socket with the bytes accepted, which for TCP/UDP over a user buffer is what
// the kernel copied in. Skipped: splice/sendfile (MSG_SPLICE_PAGES, pages are referenced, not
// copied) and MSG_ZEROCOPY.
#define PTX_MSG_ZEROCOPY 0x4000000
#define PTX_MSG_SPLICE_PAGES 0x8000000
TRACEPOINT_PROBE(sock, sock_send_length) {
    hit(P_SOCK_SEND);
    if (args->flags & (PTX_MSG_ZEROCOPY | PTX_MSG_SPLICE_PAGES))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    add_sock(tgid, DIR_EGRESS, args->ret);
    return 0;
}
#endif

#ifdef PTX_CUDA  // pinned tracking: also needed by the memcpy probe, so PTX_MEMCPY implies PTX_CUDA
// Pinned host ranges per process, from cudaHostAlloc / cudaMallocHost / cudaHostRegister (and the
// driver equivalents), dropped on the matching free/unregister. A copy whose host pointer falls in
// one is a pinned copy; otherwise the driver stages it through its own pinned bounce buffer.
struct pinned_ranges {
    u64 start[PTX_MAX_PINNED];
    u64 end[PTX_MAX_PINNED];
};

BPF_HASH(pinned, u32, struct pinned_ranges, PTX_MAX_PROCS);
BPF_PERCPU_ARRAY(pinned_zero, struct pinned_ranges, 1);  // zeroed value for first insert

static __always_inline int is_pinned(struct pinned_ranges *r, u64 p) {
    if (!r)
        return 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < PTX_MAX_PINNED; i++) {
        if (p >= r->start[i] && p < r->end[i])
            return 1;
    }
    return 0;
}

static __always_inline void pin(u32 tgid, u64 start, u64 size) {
    if (start == 0 || size == 0)
        return;
    struct pinned_ranges *r = pinned.lookup(&tgid);
    if (!r) {
        int zero = 0;
        struct pinned_ranges *z = pinned_zero.lookup(&zero);
        if (!z)
            return;
        if (pinned.update(&tgid, z) != 0) {
            err(E_PROC_MAP_FULL);
            return;
        }
        r = pinned.lookup(&tgid);
        if (!r)
            return;
    }
#pragma clang loop unroll(disable)
    for (int i = 0; i < PTX_MAX_PINNED; i++) {
        if (r->start[i] == 0 || r->start[i] == start) {
            r->start[i] = start;
            r->end[i] = start + size;
            return;
        }
    }
    err(E_PINNED_FULL);
}

static __always_inline void unpin(u32 tgid, u64 start) {
    struct pinned_ranges *r = pinned.lookup(&tgid);
    if (!r || start == 0)
        return;
#pragma clang loop unroll(disable)
    for (int i = 0; i < PTX_MAX_PINNED; i++) {
        if (r->start[i] == start) {
            r->start[i] = 0;
            r->end[i] = 0;
        }
    }
}
#endif

#ifdef PTX_CUDA
BPF_PERCPU_HASH(cuda_copies, struct cuda_key, struct cuda_val, PTX_MAX_PROCS);
// Threads inside a runtime copy call: the runtime implements cudaMemcpy* with driver calls, which
// must not count the same bytes again. Set on runtime entry, cleared by its return probe.
BPF_HASH(in_runtime, u32, u8, PTX_MAX_PROCS);

struct alloc_arg {
    u64 pp;    // void ** where the allocator stores the pointer
    u64 size;
};
BPF_HASH(alloc_args, u64, struct alloc_arg, PTX_MAX_PROCS);

static __always_inline void count_copy(u32 tgid, int kind, u64 host, u64 bytes) {
    if (bytes == 0)
        return;
    struct cuda_key k = {.tgid = tgid, .kind = kind};
    k.pinned = is_pinned(pinned.lookup(&tgid), host);
    struct cuda_val *v = cuda_copies.lookup(&k);
    if (v) {
        v->bytes += bytes;
        v->calls += 1;
        return;
    }
    struct cuda_val init = {.bytes = bytes, .calls = 1};
    if (cuda_copies.update(&k, &init) != 0)
        err(E_PROC_MAP_FULL);
    remember_comm(tgid);
}

// cudaMemcpy(void *dst, const void *src, size_t count, cudaMemcpyKind kind) and
// cudaMemcpyAsync(..., cudaStream_t) (and _ptds/_ptsz): kind 1 = H2D, 2 = D2H, 4 = default.
int ptx_cuda_memcpy(struct pt_regs *ctx) {
    hit(P_CUDA_COPY);
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = id;
    if (!is_target(tgid))
        return 0;
    int two = 2;
    u64 *driver_probed = config.lookup(&two);
    if (driver_probed && *driver_probed) {
        u8 one = 1;
        in_runtime.update(&tid, &one);
    }
    u64 dst = PT_REGS_PARM1(ctx), src = PT_REGS_PARM2(ctx), n = PT_REGS_PARM3(ctx);
    int kind = PT_REGS_PARM4(ctx);
    if (kind == 1) {
        count_copy(tgid, 0, src, n);
    } else if (kind == 2) {
        count_copy(tgid, 1, dst, n);
    } else if (kind == 4) {
        // cudaMemcpyDefault: with unified addressing the direction follows from the pointers; a
        // known pinned host pointer says which side is the host.
        struct pinned_ranges *r = pinned.lookup(&tgid);
        if (is_pinned(r, src))
            count_copy(tgid, 0, src, n);
        else if (is_pinned(r, dst))
            count_copy(tgid, 1, dst, n);
        else
            err(E_CUDA_DEFAULT_UNRESOLVED);
    }
    return 0;
}

int ptx_cuda_memcpy_ret(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    in_runtime.delete(&tid);
    return 0;
}

// cuMemcpyHtoD*(CUdeviceptr dst, const void *src, size_t bytes[, CUstream])
int ptx_cu_htod(struct pt_regs *ctx) {
    hit(P_CUDA_COPY);
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = id;
    if (!is_target(tgid) || in_runtime.lookup(&tid))
        return 0;
    count_copy(tgid, 0, PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
    return 0;
}

// cuMemcpyDtoH*(void *dst, CUdeviceptr src, size_t bytes[, CUstream])
int ptx_cu_dtoh(struct pt_regs *ctx) {
    hit(P_CUDA_COPY);
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = id;
    if (!is_target(tgid) || in_runtime.lookup(&tid))
        return 0;
    count_copy(tgid, 1, PT_REGS_PARM1(ctx), PT_REGS_PARM3(ctx));
    return 0;
}

// Entry of every pinning call: its first two arguments (a pointer and a size) are needed on return,
// when the call has succeeded. Allocation and registration differ only in what the pointer is.
static __always_inline int remember_pin_args(struct pt_regs *ctx) {
    hit(P_CUDA_PINNED);
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    struct alloc_arg a = {.pp = PT_REGS_PARM1(ctx), .size = PT_REGS_PARM2(ctx)};
    alloc_args.update(&id, &a);
    return 0;
}

// cudaHostAlloc(void **p, size_t size, unsigned flags), cudaMallocHost(void **p, size_t size),
// cuMemHostAlloc(void **pp, size_t bytesize, unsigned flags), cuMemAllocHost_v2(void **pp, size_t):
// the pointer is known only on return, so remember where it will be written.
int ptx_host_alloc(struct pt_regs *ctx) { return remember_pin_args(ctx); }

int ptx_host_alloc_ret(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct alloc_arg *a = alloc_args.lookup(&id);
    if (!a)
        return 0;
    u64 p = 0;
    // cudaSuccess / CUDA_SUCCESS are 0; on failure the pointer is garbage.
    if (PT_REGS_RC(ctx) == 0 && bpf_probe_read_user(&p, sizeof(p), (void *)a->pp) == 0)
        pin(id >> 32, p, a->size);
    alloc_args.delete(&id);
    return 0;
}

// cudaHostRegister(void *p, size_t size, unsigned flags), cuMemHostRegister_v2(void *p, size_t, unsigned)
int ptx_host_register(struct pt_regs *ctx) { return remember_pin_args(ctx); }

int ptx_host_register_ret(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct alloc_arg *a = alloc_args.lookup(&id);
    if (!a)
        return 0;
    if (PT_REGS_RC(ctx) == 0)
        pin(id >> 32, a->pp, a->size);
    alloc_args.delete(&id);
    return 0;
}

// cudaFreeHost(void *p), cudaHostUnregister(void *p), cuMemFreeHost(void *p), cuMemHostUnregister(void *p)
int ptx_host_free(struct pt_regs *ctx) {
    hit(P_CUDA_PINNED);
    u64 id = bpf_get_current_pid_tgid();
    unpin(id >> 32, PT_REGS_PARM1(ctx));
    return 0;
}
#endif

// Calibration: attached by the loader to a libc function in its own process for a moment at start,
// to measure what one uprobe hit costs on this machine (trap + a program of a copy probe's size).
int ptx_calibrate(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (is_target(tgid + 1))
        return 0;
    struct proc_dir_key k = {.tgid = tgid};
    sock_bytes.lookup(&k);
    return 0;
}

#ifdef PTX_MEMCPY
// memcpy(void *dst, const void *src, size_t n), attached to the implementation glibc's IFUNC
// resolver picked (see docs/ebpf.md): a copy into a pinned buffer is a user-space staging copy
// towards the GPU (ingress), one out of a pinned buffer is the egress mirror.
BPF_PERCPU_HASH(memcpy_bytes, struct proc_dir_key, u64, PTX_MAX_PROCS);

int ptx_memcpy(struct pt_regs *ctx) {
    hit(P_MEMCPY);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct pinned_ranges *r = pinned.lookup(&tgid);
    if (!r || !is_target(tgid))
        return 0;
    u64 dst = PT_REGS_PARM1(ctx), src = PT_REGS_PARM2(ctx), n = PT_REGS_PARM3(ctx);
    struct proc_dir_key k = {.tgid = tgid};
    if (is_pinned(r, dst))
        k.dir = DIR_INGRESS;
    else if (is_pinned(r, src))
        k.dir = DIR_EGRESS;
    else
        return 0;
    u64 *v = memcpy_bytes.lookup(&k);
    if (v) {
        *v += n;
    } else if (memcpy_bytes.update(&k, &n) != 0) {
        err(E_PROC_MAP_FULL);
    } else {
        remember_comm(tgid);
    }
    return 0;
}
#endif
