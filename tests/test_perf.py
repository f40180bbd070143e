"""The perf_event_open binding against the live kernel, on PMUs every Linux box has: the software
PMU (opened per CPU with pid=-1, the way uncore PMUs are opened), the tracepoint PMU (exact counts),
and a sysfs-described PMU opened by name through its format/ and events/ files."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from conftest import needs_root
from pcietax.perf import (
    PERF_COUNT_SW_CPU_CLOCK,
    PERF_COUNT_SW_TASK_CLOCK,
    PERF_TYPE_SOFTWARE,
    PERF_TYPE_TRACEPOINT,
    EventAttr,
    PerfOpenError,
    SyscallOpener,
    paranoid_level,
)
from pcietax.pmu import read_pmu

TRACEFS = next((p for p in (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
                if (p / "events").is_dir()), None)


@pytest.fixture
def opener():
    return SyscallOpener()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_task_clock_counts_this_thread(opener):
    c = opener(EventAttr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK), cpu=-1, pid=0)
    try:
        t0 = time.thread_time_ns()
        a = c.read()
        while time.thread_time_ns() - t0 < 50_000_000:  # 50 ms of this thread's CPU time
            pass
        b = c.read()
        cpu_ns = time.thread_time_ns() - t0
    finally:
        c.close()
    # task-clock is this thread's CPU time: the same thing CLOCK_THREAD_CPUTIME_ID measures.
    assert 0.9 * cpu_ns - 2e6 < b.value - a.value <= cpu_ns + 2e6
    assert b.enabled >= b.running > 0


@needs_root
def test_cpu_wide_open_like_an_uncore_pmu(opener):
    """pid=-1 on one CPU: every task on that CPU, what the upi source does on a cpumask CPU."""
    c = opener(EventAttr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK), cpu=0)
    try:
        a = c.read()
        time.sleep(0.05)
        b = c.read()
    finally:
        c.close()
    assert b.value > a.value
    assert b.enabled > a.enabled
    assert b.running == b.enabled  # software events never multiplex


@needs_root
@pytest.mark.skipif(TRACEFS is None or not (TRACEFS / "events/syscalls/sys_enter_getppid/id").exists(),
                    reason="no syscalls tracepoints in tracefs")
def test_tracepoint_counts_exactly(opener):
    assert TRACEFS is not None
    tp = int((TRACEFS / "events/syscalls/sys_enter_getppid/id").read_text())
    c = opener(EventAttr(PERF_TYPE_TRACEPOINT, tp), cpu=-1, pid=0)
    try:
        before = c.read().value
        for _ in range(1000):
            os.getppid()
        after = c.read().value
    finally:
        c.close()
    assert after - before == 1000


@needs_root
@pytest.mark.skipif(not Path("/sys/bus/event_source/devices/msr/events/tsc").exists(),
                    reason="no msr PMU with a tsc event here")
def test_open_a_sysfs_pmu_event_by_name(opener):
    """The same path as uncore: type from sysfs, event terms from events/, bits from format/."""
    pmu = read_pmu("/sys", "msr")
    attr = pmu.event_attr("tsc")
    assert attr.type == int(Path("/sys/bus/event_source/devices/msr/type").read_text())
    c = opener(attr, cpu=0)
    try:
        a = c.read()
        time.sleep(0.02)
        b = c.read()
    finally:
        c.close()
    assert b.value > a.value  # the TSC ticks at GHz rates


def test_close_releases_the_fd(opener):
    n = _open_fds()
    c = opener(EventAttr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK), cpu=-1, pid=0)
    assert _open_fds() == n + 1
    c.close()
    c.close()  # idempotent
    assert _open_fds() == n
    with pytest.raises(OSError, match="closed"):
        c.read()


def test_unknown_pmu_type_is_enoent(opener):
    with pytest.raises(PerfOpenError, match="unknown PMU type") as e:
        opener(EventAttr(0x7FFFFFF0, 0), cpu=-1, pid=0)
    assert e.value.errno == errno.ENOENT


def test_unknown_software_event_is_enoent(opener):
    with pytest.raises(PerfOpenError) as e:
        opener(EventAttr(PERF_TYPE_SOFTWARE, 0xFFFF), cpu=-1, pid=0)
    assert e.value.errno == errno.ENOENT


def test_offline_or_missing_cpu(opener):
    with pytest.raises(PerfOpenError) as e:
        opener(EventAttr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK), cpu=4095)
    assert e.value.errno in (errno.EINVAL, errno.ENODEV)


def test_unknown_architecture_is_refused():
    with pytest.raises(OSError, match="no perf_event_open syscall number known for vax"):
        SyscallOpener(machine="vax")


@needs_root
@pytest.mark.skipif((paranoid_level() or 0) < 1, reason="perf_event_paranoid < 1 lets anyone count CPU-wide")
def test_unprivileged_cpu_wide_open_is_eacces_with_the_paranoid_reason():
    """A real EACCES: the same open as uncore, from a forked child that dropped root (uid nobody).
    Forked rather than spawned so the child needs no read access to this checkout."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop every privilege, try, report, exit without running pytest's teardown
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                SyscallOpener()(EventAttr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK), cpu=0).close()
                os.write(w, b"0 opened")
            except PerfOpenError as e:
                os.write(w, f"{e.errno} {e.reason}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    err, reason = out.split(" ", 1)
    assert int(err) in (errno.EACCES, errno.EPERM), out
    assert f"kernel.perf_event_paranoid={paranoid_level()}" in reason
