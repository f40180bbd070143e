// pcietax: in-kernel aggregation of the host staging costs of a network -> GPU data path.
//
// Loaded by exporter/pcietax/sources/ebpf/ with BCC. Every program only adds to a map; user space
// reads the maps once per collection cycle (BCC tools style, no per-event perf buffer). The enums
// P_* (probes), S_* (probe-site kinds), E_* (drop reasons), DIR_*, K_* and PTX_NVECS are generated
// from exporter/pcietax/sources/ebpf/defs.py and prepended to this text by the loader.
//
// Built from tracepoints and uprobes only: kprobes are not available on every kernel, and
// tracepoint arguments come from the running kernel's format files. The one kernel layout read is
// struct sock_common's peer address (loopback exclusion), taken from the kernel headers.
//
// Each duty-cycled program tests its group's gate (gates[G_*], written by the budget governor)
// right after counting its hit: a window opens and closes with one map write, exactly when the
// governor says, while attaching and detaching (slow: a grace period) happen around it.
//
// Configuration is compile-time (-D from the loader), never a map read per event:
//   PTX_FILTER          1: count only targets decided in the kernel (targets map, cgroup ancestry);
//                       0: count every process (node-wide, or --target.comm applied at read time)
//   PTX_FOLLOW          keep the targets map in step with fork/exec/exit (children of targets)
//   PTX_CGROUP_ID / PTX_CGROUP_LEVEL   --target.cgroup, matched by ancestry
//   PTX_SOCK_LENGTH     sock:sock_recv_length / sock_send_length (Linux 6.3+) with the family filter
//   PTX_COUNT_LO        loopback peers count (lo is a selected NIC)
//   PTX_CUDA, PTX_MEMCPY, PTX_MAX_PROCS, PTX_MAX_PINNED, PTX_MAX_IRQ

#include <uapi/linux/ptrace.h>
#ifdef PTX_SOCK_LENGTH
#include <net/sock.h>
#endif

#ifndef PTX_MAX_PINNED
#define PTX_MAX_PINNED 64
#endif
#ifndef PTX_MAX_PROCS
#define PTX_MAX_PROCS 10240
#endif
#ifndef PTX_MAX_IRQ
#define PTX_MAX_IRQ 4096
#endif
#ifndef PTX_FILTER
#define PTX_FILTER 0
#endif

#define PTX_AF_INET 2
#define PTX_AF_INET6 10
#define PTX_MSG_PEEK 0x2
#define PTX_MSG_ZEROCOPY 0x4000000
#define PTX_MSG_SPLICE_PAGES 0x8000000

struct proc_dir_key {
    u32 tgid;
    u32 dir;
};

struct cuda_key {
    u32 tgid;
    u8 kind;
    u8 pinned;
    u16 pad;
};

struct cuda_val {
    u64 bytes;
    u64 calls;
};

// What user space needs to label a process that may have exited before it reads: the comm and
// cgroup at event time, and whether the kernel-side target test (cgroup ancestry) matched.
struct proc_info {
    char comm[16];
    u64 cgroup;
    u32 target;
    u32 pad;
    u64 exit_ns;  // sched_process_exit time (CLOCK_MONOTONIC); 0 while it lives
};

struct time_val {
    u64 ns;
    u64 count;
};

BPF_PERCPU_ARRAY(hits, u64, P_NPROBES * S_NSITES);
BPF_ARRAY(drops, u64, E_NDROPS);
BPF_ARRAY(gates, u32, G_NGROUPS);
BPF_TABLE("lru_hash", u32, struct proc_info, procs, PTX_MAX_PROCS);
// Target tgids: 1 = given (--target.pid), 2 = a descendant that forked from a target (dropped when
// it execs another program).
BPF_TABLE("lru_hash", u32, u8, targets, PTX_MAX_PROCS);

static __always_inline void drop(int i) {
    u64 *v = drops.lookup(&i);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline void hit(int probe, int site) {
    int i = probe * S_NSITES + site;
    u64 *v = hits.lookup(&i);
    if (v)
        (*v)++;
}

static __always_inline int gate_open(int g) {
    u32 *v = gates.lookup(&g);
    return v && *v;
}

static __always_inline void note_proc(u32 tgid) {
    struct proc_info p = {};
    bpf_get_current_comm(&p.comm, sizeof(p.comm));
    p.cgroup = bpf_get_current_cgroup_id();
#ifdef PTX_CGROUP_ID
    p.target = bpf_get_current_ancestor_cgroup_id(PTX_CGROUP_LEVEL) == PTX_CGROUP_ID;
#endif
    procs.update(&tgid, &p);
}

static __always_inline int is_target(u32 tgid) {
#if PTX_FILTER
    if (targets.lookup(&tgid))
        return 1;
#ifdef PTX_CGROUP_ID
    if (bpf_get_current_ancestor_cgroup_id(PTX_CGROUP_LEVEL) == PTX_CGROUP_ID)
        return 1;
#endif
    return 0;
#else
    return 1;
#endif
}

// --- following forks -------------------------------------------------------------------------
#ifdef PTX_FOLLOW
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!targets.lookup(&parent))
        return 0;
    // child_pid is the new task: a process (its tgid) or a thread of the parent (harmless: it is
    // deleted when the thread exits).
    u32 child = args->child_pid;
    u8 v = 2;
    targets.update(&child, &v);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u8 *v = targets.lookup(&tgid);
    if (v && *v == 2)
        targets.delete(&tgid);
    return 0;
}

#endif

// A process's exit time, for the estimate of what it did between its last window and its exit.
// Rare (once per thread exit), so always on.
#ifdef PTX_EXIT_TIME
RAW_TRACEPOINT_PROBE(sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id, tgid = id >> 32;
#ifdef PTX_FOLLOW
    targets.delete(&tid);
#endif
    if (tid != tgid)
        return 0;
    struct proc_info *p = procs.lookup(&tgid);
    if (p)
        p->exit_ns = bpf_ktime_get_ns();
    return 0;
}
#endif

// --- hard IRQs and softirqs: time per line / vector (the totals come from /proc) --------------
BPF_PERCPU_ARRAY(irq_start, u64, 1);
BPF_PERCPU_ARRAY(irq_time, struct time_val, PTX_MAX_IRQ);
BPF_PERCPU_ARRAY(softirq_start, u64, 1);
BPF_PERCPU_ARRAY(softirq_time, struct time_val, PTX_NVECS);

RAW_TRACEPOINT_PROBE(irq_handler_entry) {
    hit(P_HARDIRQ, 0);
    if (!gate_open(G_IRQ))
        return 0;
    int zero = 0;
    u64 ts = bpf_ktime_get_ns();
    irq_start.update(&zero, &ts);
    return 0;
}

// irq_handler_exit(int irq, struct irqaction *action, int ret)
RAW_TRACEPOINT_PROBE(irq_handler_exit) {
    int zero = 0;
    u64 *start = irq_start.lookup(&zero);
    if (!start || *start == 0)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *start;
    *start = 0;
    int irq = (int)ctx->args[0];
    struct time_val *v = irq_time.lookup(&irq);
    if (!v) {
        drop(E_IRQ_OUT_OF_RANGE);
        return 0;
    }
    v->ns += delta;
    v->count += 1;
    return 0;
}

RAW_TRACEPOINT_PROBE(softirq_entry) {
    hit(P_SOFTIRQ, 0);
    if (!gate_open(G_IRQ))
        return 0;
    int zero = 0;
    u64 ts = bpf_ktime_get_ns();
    softirq_start.update(&zero, &ts);
    return 0;
}

// softirq_exit(unsigned int vec_nr)
RAW_TRACEPOINT_PROBE(softirq_exit) {
    int zero = 0;
    u64 *start = softirq_start.lookup(&zero);
    if (!start || *start == 0)
        return 0;
    u64 delta = bpf_ktime_get_ns() - *start;
    *start = 0;
    int vec = (int)ctx->args[0];
    struct time_val *v = softirq_time.lookup(&vec);
    if (v) {
        v->ns += delta;
        v->count += 1;
    }
    return 0;
}

// --- socket payload: AF_INET / AF_INET6 only ----------------------------------------------------
BPF_PERCPU_HASH(sock_bytes, struct proc_dir_key, u64, PTX_MAX_PROCS);

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
    if (sock_bytes.update(&k, &init) != 0) {
        drop(E_PROCESS_MAP_FULL);
        return;
    }
    note_proc(tgid);
}

#ifdef PTX_SOCK_LENGTH
static __always_inline u16 ptx_sk_family(void *skp) {
    struct sock_common *sk = skp;
    u16 family = 0;
    bpf_probe_read_kernel(&family, sizeof(family), &sk->skc_family);
    return family;
}

#ifndef PTX_COUNT_LO
// A peer on 127.0.0.0/8 or ::1 (or ::ffff:127.x), or a connection to one of our own addresses:
// traffic that never leaves the host is not network payload unless lo is a selected NIC.
static __always_inline int local_peer(void *skp, u16 family) {
    struct sock_common *sk = skp;
    if (family == PTX_AF_INET) {
        u32 d = 0, s = 0;
        bpf_probe_read_kernel(&d, sizeof(d), &sk->skc_daddr);
        bpf_probe_read_kernel(&s, sizeof(s), &sk->skc_rcv_saddr);
        return (d & 0xff) == 127 || (d != 0 && d == s);  // network byte order: first octet lowest
    }
    u32 a[4] = {};
    bpf_probe_read_kernel(&a, sizeof(a), &sk->skc_v6_daddr);
    if (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == __builtin_bswap32(1))
        return 1;
    return a[0] == 0 && a[1] == 0 && a[2] == __builtin_bswap32(0xffff) && (a[3] & 0xff) == 127;
}
#define PTX_LOCAL(sk, family) local_peer(sk, family)
#else
#define PTX_LOCAL(sk, family) 0
#endif

// sock_recvmsg() after the protocol returned: one event per recv call (not per skb), with the
// socket's family, so Unix sockets, netlink and other IPC are dropped by the first test.
// Raw tracepoint: sock_recv_length(struct sock *sk, int ret, int flags); the family is the
// socket's own (what the tracepoint's record copies from it).
RAW_TRACEPOINT_PROBE(sock_recv_length) {
    hit(P_SOCKET_RECV, 0);
    if (!gate_open(G_SOCKET))
        return 0;
    void *sk = (void *)ctx->args[0];
    int ret = (int)ctx->args[1], flags = (int)ctx->args[2];
    if (ret <= 0 || (flags & PTX_MSG_PEEK))
        return 0;
    u16 family = ptx_sk_family(sk);
    if (family != PTX_AF_INET && family != PTX_AF_INET6)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid) || PTX_LOCAL(sk, family))
        return 0;
    add_sock(tgid, DIR_INGRESS, ret);
    return 0;
}

// sock_sendmsg_nosec(): bytes the protocol accepted from a send/sendto/sendmsg/write; splice/
// sendfile (MSG_SPLICE_PAGES, pages referenced, not copied) and MSG_ZEROCOPY are skipped.
RAW_TRACEPOINT_PROBE(sock_send_length) {
    hit(P_SOCKET_SEND, 0);
    if (!gate_open(G_SOCKET))
        return 0;
    void *sk = (void *)ctx->args[0];
    int ret = (int)ctx->args[1], flags = (int)ctx->args[2];
    if (ret <= 0 || (flags & (PTX_MSG_ZEROCOPY | PTX_MSG_SPLICE_PAGES)))
        return 0;
    u16 family = ptx_sk_family(sk);
    if (family != PTX_AF_INET && family != PTX_AF_INET6)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid) || PTX_LOCAL(sk, family))
        return 0;
    add_sock(tgid, DIR_EGRESS, ret);
    return 0;
}
#else
// Linux < 6.3 fallback: the copy itself, once per skb. The tracepoint carries no socket, so it
// cannot tell TCP from a Unix socket or a loopback peer (docs/ebpf.md); egress is not measured.
// skb_copy_datagram_iovec(const struct sk_buff *skb, int len)
RAW_TRACEPOINT_PROBE(skb_copy_datagram_iovec) {
    hit(P_SOCKET_RECV, 0);
    if (!gate_open(G_SOCKET))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    add_sock(tgid, DIR_INGRESS, (int)ctx->args[1]);
    return 0;
}
#endif

// Uprobe programs come in one variant per probe-site kind (the loader attaches the variant that
// matches the probed function's first instruction), so hits, and what they cost, are counted per
// kind: an emulated push costs a fraction of a single-stepped instruction.
#define PTX_SITE_VARIANTS(body)                                                   \
    int body##__push(struct pt_regs *ctx) { return body(ctx, S_PUSH); }           \
    int body##__step(struct pt_regs *ctx) { return body(ctx, S_STEP); }

#ifdef PTX_CUDA
// Pinned host ranges per process, from cudaHostAlloc / cudaMallocHost / cudaHostRegister (and the
// driver equivalents), dropped on the matching free/unregister.
struct pinned_ranges {
    u64 start[PTX_MAX_PINNED];
    u64 end[PTX_MAX_PINNED];
};

BPF_HASH(pinned, u32, struct pinned_ranges, PTX_MAX_PROCS);
BPF_PERCPU_ARRAY(pinned_zero, struct pinned_ranges, 1);

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
            drop(E_PROCESS_MAP_FULL);
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
    drop(E_PINNED_TABLE_FULL);
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

BPF_PERCPU_HASH(cuda_copies, struct cuda_key, struct cuda_val, PTX_MAX_PROCS);

// The last runtime copy of each thread: NVIDIA's runtime may implement a copy with a public
// driver call, which must not count the same bytes again. The driver probe drops a copy that
// repeats its thread's last runtime copy (same host pointer and size, moments later) instead of
// a return probe on the runtime: one trap per copy, two only where the runtime enters the driver.
struct rt_copy {
    u64 host;
    u64 bytes;
    u64 ts;
};
BPF_TABLE("lru_hash", u32, struct rt_copy, rt_last, 4096);
#define PTX_DEDUP_NS 50000000ull

struct alloc_arg {
    u64 pp;
    u64 size;
};
BPF_HASH(alloc_args, u64, struct alloc_arg, PTX_MAX_PROCS);

static __always_inline void count_copy(u32 tgid, int kind, struct pinned_ranges *r, u64 host, u64 bytes) {
    if (bytes == 0)
        return;
    struct cuda_key k = {.tgid = tgid, .kind = kind};
    k.pinned = is_pinned(r, host);
    struct cuda_val *v = cuda_copies.lookup(&k);
    if (v) {
        v->bytes += bytes;
        v->calls += 1;
        return;
    }
    struct cuda_val init = {.bytes = bytes, .calls = 1};
    if (cuda_copies.update(&k, &init) != 0) {
        drop(E_PROCESS_MAP_FULL);
        return;
    }
    note_proc(tgid);
}

// cudaMemcpy(void *dst, const void *src, size_t count, cudaMemcpyKind kind) and
// cudaMemcpyAsync(..., cudaStream_t) (and _ptds/_ptsz): kind 1 = H2D, 2 = D2H, 4 = default.
static __always_inline int cuda_memcpy(struct pt_regs *ctx, int site) {
    hit(P_CUDA_COPY, site);
    if (!gate_open(G_CUDA_COPY))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = id;
    if (!is_target(tgid))
        return 0;
    u64 dst = PT_REGS_PARM1(ctx), src = PT_REGS_PARM2(ctx), n = PT_REGS_PARM3(ctx);
    int kind = PT_REGS_PARM4(ctx);
    struct pinned_ranges *r = pinned.lookup(&tgid);  // one pinned-range lookup per copy
    u64 host;
    if (kind == 1) {
        host = src;
        count_copy(tgid, K_H2D, r, src, n);
    } else if (kind == 2) {
        host = dst;
        count_copy(tgid, K_D2H, r, dst, n);
    } else if (kind == 4) {
        // cudaMemcpyDefault: a known pinned host pointer says which side is the host.
        if (is_pinned(r, src)) {
            host = src;
            count_copy(tgid, K_H2D, r, src, n);
        } else if (is_pinned(r, dst)) {
            host = dst;
            count_copy(tgid, K_D2H, r, dst, n);
        } else {
            drop(E_CUDA_DEFAULT_UNRESOLVED);
            return 0;
        }
    } else {
        return 0;
    }
    struct rt_copy last = {.host = host, .bytes = n, .ts = bpf_ktime_get_ns()};
    rt_last.update(&tid, &last);
    return 0;
}
PTX_SITE_VARIANTS(cuda_memcpy)

static __always_inline int driver_copy(struct pt_regs *ctx, int site, int kind, u64 host, u64 n) {
    hit(P_CUDA_COPY, site);
    if (!gate_open(G_CUDA_COPY))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = id;
    if (!is_target(tgid))
        return 0;
    struct rt_copy *last = rt_last.lookup(&tid);
    if (last && last->host == host && last->bytes == n && bpf_ktime_get_ns() - last->ts < PTX_DEDUP_NS) {
        rt_last.delete(&tid);  // this is the runtime's own driver call: counted already
        return 0;
    }
    count_copy(tgid, kind, pinned.lookup(&tgid), host, n);
    return 0;
}

// cuMemcpyHtoD*(CUdeviceptr dst, const void *src, size_t bytes[, CUstream])
static __always_inline int cu_htod(struct pt_regs *ctx, int site) {
    return driver_copy(ctx, site, K_H2D, PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx));
}
PTX_SITE_VARIANTS(cu_htod)

// cuMemcpyDtoH*(void *dst, CUdeviceptr src, size_t bytes[, CUstream])
static __always_inline int cu_dtoh(struct pt_regs *ctx, int site) {
    return driver_copy(ctx, site, K_D2H, PT_REGS_PARM1(ctx), PT_REGS_PARM3(ctx));
}
PTX_SITE_VARIANTS(cu_dtoh)

// Entry of every pinning call: its first two arguments (a pointer and a size) are needed on return,
// when the call has succeeded. Allocation and registration differ only in what the pointer is.
static __always_inline int host_pin_entry(struct pt_regs *ctx, int site) {
    hit(P_CUDA_PINNED, site);
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    struct alloc_arg a = {.pp = PT_REGS_PARM1(ctx), .size = PT_REGS_PARM2(ctx)};
    alloc_args.update(&id, &a);
    return 0;
}
PTX_SITE_VARIANTS(host_pin_entry)

// cudaHostAlloc(void **p, size_t size, unsigned flags), cudaMallocHost(void **p, size_t size),
// cuMemHostAlloc(void **pp, size_t bytesize, unsigned flags), cuMemAllocHost_v2(void **pp, size_t):
// the pointer is known only on return, so remember where it will be written.
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
static __always_inline int host_free(struct pt_regs *ctx, int site) {
    hit(P_CUDA_PINNED, site);
    u64 id = bpf_get_current_pid_tgid();
    unpin(id >> 32, PT_REGS_PARM1(ctx));
    return 0;
}
PTX_SITE_VARIANTS(host_free)
#endif

#ifdef PTX_MEMCPY
// memcpy(void *dst, const void *src, size_t n), attached to the implementation glibc's IFUNC
// resolver picked (docs/ebpf.md): into a pinned buffer = ingress staging, out of one = egress.
BPF_PERCPU_HASH(memcpy_bytes, struct proc_dir_key, u64, PTX_MAX_PROCS);

static __always_inline int memcpy_probe(struct pt_regs *ctx, int site) {
    hit(P_MEMCPY, site);
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
        drop(E_PROCESS_MAP_FULL);
    } else {
        note_proc(tgid);
    }
    return 0;
}
PTX_SITE_VARIANTS(memcpy_probe)
#endif

// Calibration: attached by the loader for a moment at start to a libc function of each site kind
// in its own process, and to sock:sock_send_length, to measure what one hit costs on this node.
int ptx_calibrate_u(struct pt_regs *ctx) {
    return 0;
}

int ptx_calibrate_tp(void *ctx) {
    return 0;
}
