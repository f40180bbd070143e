"""The tracer's own cost, from the kernel's accounting plus trap costs calibrated on this node.

- **BPF run time**: the kernel's ``bpf_stats`` (``run_time_ns`` in each program's fdinfo). The
  exporter turns the statistics on for its own lifetime with ``BPF_ENABLE_STATS`` (an fd: the kernel
  counts while any holder keeps it open and stops when the exporter exits), so it never leaves the
  ``kernel.bpf_stats_enabled`` sysctl changed; where that call is refused, it reads the sysctl.
- **Traps**: what the kernel spends getting to a program, which bpf_stats does not see. Calibrated
  at start, in the exporter's own process: a libc function whose first instruction is a push
  (``sched_getcpu``; the kernel emulates it) and one whose first instruction is single-stepped
  (``labs``), each timed with and without a no-op uprobe; a no-op program on
  ``sock:sock_send_length``, timed over AF_UNIX sends. A few thousand calls each, tens of ms.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ... import procmaps
from . import elf

log = logging.getLogger("pcietax")

_SYS_BPF = 321  # x86_64
_BPF_ENABLE_STATS = 32
# Until calibrated (or where calibration fails): this project's CI VM (docs/ebpf.md).
DEFAULT_TRAP_S = {"push": 0.9e-6, "step": 9.5e-6, "tracepoint": 0.05e-6}
DEFAULT_RUN_S = 0.15e-6  # per hit, when the kernel does not count run time


def enable_bpf_stats() -> int | None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = (ctypes.c_uint32 * 2)(0, 0)  # BPF_STATS_RUN_TIME
    fd = libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        log.info("ebpf: BPF_ENABLE_STATS refused (%s): run time counted only while "
                 "kernel.bpf_stats_enabled=1", os.strerror(ctypes.get_errno()))
        return None
    return int(fd)


def sysctl_stats_on(procfs: Path) -> bool:
    try:
        return (procfs / "sys/kernel/bpf_stats_enabled").read_bytes().strip() == b"1"
    except OSError:
        return False


def prog_stats(fd: int) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of a loaded program, from its fdinfo."""
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_bytes()
    except OSError:
        return None
    rt = cnt = None
    for line in text.splitlines():
        if line.startswith(b"run_time_ns:"):
            rt = int(line.split()[1])
        elif line.startswith(b"run_cnt:"):
            cnt = int(line.split()[1])
    return None if rt is None else (rt, cnt or 0)


@dataclass
class Calibration:
    trap_s: dict[str, float]
    measured: bool
    seconds: float  # how long calibrating took


def _timed(fn: Callable[[], None], n: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / n


def calibrate(attach_uprobe: Callable[[str, int], Callable[[], None] | None],
              attach_tracepoint: Callable[[], Callable[[], None] | None], n: int = 2000) -> Calibration:
    """``attach_uprobe(path, offset)`` attaches the no-op uprobe and returns its detach function;
    ``attach_tracepoint()`` the same for the no-op raw tracepoint program on sock_send_length."""
    t0 = time.monotonic()
    trap = dict(DEFAULT_TRAP_S)
    measured = True
    libc_path = _libc_path()
    libc = ctypes.CDLL("libc.so.6")
    labs, getcpu = libc.labs, libc.sched_getcpu
    labs.argtypes, labs.restype = [ctypes.c_long], ctypes.c_long
    try:
        fns = elf.functions(libc_path, {"labs", "sched_getcpu"})
    except (elf.ElfError, OSError) as e:
        log.warning("ebpf: cannot read %s for calibration (%s): default trap costs", libc_path, e)
        fns = {}
    for site, sym, call in (("push", "sched_getcpu", lambda: getcpu()), ("step", "labs", lambda: labs(-3))):
        fn = fns.get(sym)
        if fn is None or fn.site != site:
            log.warning("ebpf: libc %s does not open with a %s site here: default %s trap cost",
                        sym, site, site)
            measured = False
            continue
        # Many short batches, best of each: the calibration runs while other sources start in
        # this process, and a batch that lost the GIL or the CPU is slower, never faster.
        # A single-stepped hit costs ~30x: fewer suffice.
        k, rounds = n // 8, (12 if site == "push" else 4)
        base = _timed(call, k, rounds=rounds)
        detach = attach_uprobe(libc_path, fn.offset)
        if detach is None:
            measured = False
            continue
        try:
            probed = _timed(call, k, rounds=rounds)
        finally:
            detach()
        trap[site] = max(probed - base, 0.0)
    a, b = socket.socketpair()
    try:
        a.setblocking(False)

        def send() -> None:
            a.send(b"x")
            b.recv(1)

        # A syscall pair costs microseconds and a busy process or VM adds noise of that order,
        # while the program adds tens of nanoseconds. One estimate: interleaved rounds, the best
        # of each side (noise only ever adds time). Its difference still swings when one side
        # was luckier, or jumps when another thread held the GIL all along, so five estimates
        # are made and their median kept. A raw tracepoint attaches in microseconds.
        # (A uprobe site that could not be measured above says nothing about this one.)
        estimates: list[float] = []
        attached = True
        k = max(n // 2, 1)
        for _ in range(5):
            base = probed = float("inf")
            for _ in range(3):
                base = min(base, _timed(send, k, rounds=2))
                detach = attach_tracepoint()
                if detach is None:
                    attached = False
                    break
                try:
                    probed = min(probed, _timed(send, k, rounds=2))
                finally:
                    detach()
            if not attached:
                measured = False
                break
            estimates.append(probed - base)
        dispatch = statistics.median(estimates) if estimates else 0.0
        if attached and dispatch > 0:
            trap["tracepoint"] = dispatch
        elif attached:
            # Below this VM's noise: a dispatch is never free, so keep the default, and say so.
            log.info("ebpf: tracepoint dispatch below the timing noise here: default %.2f us",
                     trap["tracepoint"] * 1e6)
            measured = False
    finally:
        a.close()
        b.close()
    return Calibration(trap, measured, time.monotonic() - t0)


def _libc_path() -> str:
    for path in procmaps.mapped_files(procmaps.process_maps("/proc", "self")):
        if path.endswith("/libc.so.6"):
            return path
    return "/lib/x86_64-linux-gnu/libc.so.6"
