"""A small ctypes binding of Linux ``perf_event_open(2)`` for counting (never sampling) events.

Only what pcietax needs: open one counting event on one CPU (uncore PMUs are system-wide, opened on
the CPU their ``cpumask`` names) or for one task, read it with ``TOTAL_TIME_ENABLED`` and
``TOTAL_TIME_RUNNING`` so multiplexed counts can be scaled, and close it. No ``perf`` subprocess on
the scrape path: one ``read(2)`` of 24 bytes per counter.

Errors come back as ``PerfOpenError`` with a reason an operator can act on (``perf_event_paranoid``,
a missing PMU, an encoding the PMU rejects), not a bare errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from typing import Protocol

# Syscall numbers per architecture (asm/unistd*.h). The generic table (arm64, riscv, loongarch)
# shares 241.
SYSCALL_NR = {
    "x86_64": 298,
    "amd64": 298,
    "i386": 336,
    "i686": 336,
    "aarch64": 241,
    "arm64": 241,
    "riscv64": 241,
    "loongarch64": 241,
    "armv7l": 364,
    "ppc64le": 319,
    "ppc64": 319,
    "s390x": 331,
}

# include/uapi/linux/perf_event.h
PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_COUNT_SW_TASK_CLOCK = 1
PERF_FORMAT_TOTAL_TIME_ENABLED = 1 << 0
PERF_FORMAT_TOTAL_TIME_RUNNING = 1 << 1
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_SIZE_VER8 = 136  # up to config3 (6.3); older kernels accept it when the tail is zero

_READ = struct.Struct("=QQQ")  # value, time_enabled, time_running


class _PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr as of PERF_ATTR_SIZE_VER8; unions flattened to the member we use."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    ]


assert ctypes.sizeof(_PerfEventAttr) == PERF_ATTR_SIZE_VER8


@dataclass(frozen=True)
class EventAttr:
    """What identifies a counting event: the PMU type and its config words."""

    type: int
    config: int = 0
    config1: int = 0
    config2: int = 0
    config3: int = 0

    def __str__(self) -> str:
        extra = "".join(
            f",{n}={v:#x}" for n, v in (("config1", self.config1), ("config2", self.config2),
                                         ("config3", self.config3)) if v
        )
        return f"type={self.type},config={self.config:#x}{extra}"


@dataclass(frozen=True)
class Reading:
    """One read of a counter: the count, and the nanoseconds the event was enabled and actually
    counting (they differ when the PMU multiplexes more events than it has counters)."""

    value: int
    enabled: int
    running: int


class Counter(Protocol):
    """An open counting event. ``bits`` is the width at which ``read().value`` wraps (64 for perf
    file descriptors: the kernel folds the hardware counter's own wraps into a 64-bit count)."""

    bits: int

    def read(self) -> Reading: ...

    def close(self) -> None: ...


class Opener(Protocol):
    """Opens one counting event on one CPU (``pid=-1``: every task on that CPU, how uncore PMUs are
    opened) or for one task (``cpu=-1``). Raises ``PerfOpenError``."""

    def __call__(self, attr: EventAttr, cpu: int, pid: int = -1) -> Counter: ...


_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "the PMU does not know this event (unknown PMU type or config)",
    errno.EINVAL: "the kernel rejected the event (an encoding the PMU does not accept, a CPU "
                  "outside the PMU's cpumask, or a per-task open of a system-wide PMU)",
    errno.ENODEV: "no such PMU on that CPU (the CPU is offline or the PMU went away)",
    errno.EOPNOTSUPP: "the PMU does not support this kind of event",
    errno.EBUSY: "the PMU's counters are held exclusively by another user",
    errno.EMFILE: "too many open files (raise the exporter's RLIMIT_NOFILE)",
    errno.ENOSYS: "perf_event_open is not available (kernel without CONFIG_PERF_EVENTS, or a "
                  "seccomp profile that blocks it)",
}


def paranoid_level(procfs: str = "/proc") -> int | None:
    try:
        with open(os.path.join(procfs, "sys/kernel/perf_event_paranoid"), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class PerfOpenError(OSError):
    """perf_event_open failed; ``str()`` is the operator-facing reason."""

    def __init__(self, err: int, attr: EventAttr, cpu: int, paranoid: int | None = None) -> None:
        reason = _REASONS.get(err, os.strerror(err))
        if err in (errno.EACCES, errno.EPERM):
            level = "unknown" if paranoid is None else str(paranoid)
            reason += (f": kernel.perf_event_paranoid={level}; system-wide (uncore) events need root, "
                       "CAP_PERFMON, or perf_event_paranoid <= 0")
        super().__init__(err, f"perf_event_open({attr}, cpu={cpu}): {reason}")
        self.reason = reason


class PerfCounter:
    """A perf file descriptor in counting mode."""

    bits = 64

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def read(self) -> Reading:
        if self._fd is None:
            raise OSError(errno.EBADF, "perf counter is closed")
        data = os.read(self._fd, _READ.size)
        if len(data) != _READ.size:
            raise OSError(errno.EIO, f"short read from perf fd: {len(data)} bytes")
        return Reading(*_READ.unpack(data))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # a leaked fd would keep an uncore counter busy
        with contextlib.suppress(OSError):
            self.close()


class SyscallOpener:
    """The real ``Opener``: calls perf_event_open(2) through libc's ``syscall``."""

    def __init__(self, procfs: str = "/proc", machine: str | None = None) -> None:
        arch = machine or platform.machine()
        nr = SYSCALL_NR.get(arch)
        if nr is None:
            raise OSError(errno.ENOSYS, f"no perf_event_open syscall number known for {arch}")
        self._nr = nr
        self._procfs = procfs
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long

    def __call__(self, attr: EventAttr, cpu: int, pid: int = -1) -> PerfCounter:
        a = _PerfEventAttr()
        a.type = attr.type
        a.size = ctypes.sizeof(_PerfEventAttr)
        a.config, a.config1, a.config2, a.config3 = attr.config, attr.config1, attr.config2, attr.config3
        a.read_format = PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING
        # Counting starts at open (disabled=0); no inherit, no exclusions: uncore PMUs reject them.
        fd = self._libc.syscall(
            ctypes.c_long(self._nr), ctypes.byref(a), ctypes.c_long(pid), ctypes.c_long(cpu),
            ctypes.c_long(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC),
        )
        if fd < 0:
            err = ctypes.get_errno()
            raise PerfOpenError(err, attr, cpu, paranoid_level(self._procfs))
        return PerfCounter(int(fd))
