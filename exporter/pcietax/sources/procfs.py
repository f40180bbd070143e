"""Interrupt and softirq counts from /proc/interrupts and /proc/softirqs (summed over CPUs), and
the IRQ and softirq time columns of /proc/stat: the coarse staging-CPU figure used when eBPF is off
(it covers every IRQ and softirq on the node, not only the network's).

Faults: a line that cannot be parsed is a fault and its series keeps its last value (held, so
``rate()`` does not break); a file that cannot be read at all, is empty or has no header fails the
read (SourceUnavailable): the engine then holds every counter of the source and marks it down,
instead of exporting a node whose IRQ series vanished.

/proc/interrupts is parsed once per collection cycle for every source that needs it
(``read_interrupts``): the eBPF source takes IRQ names and NIC IRQ lines from the same parse.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import catalog
from ..fsread import PROCFS_MAX, FileTooLarge, counter_value, read_into, read_text, sum_counters
from .base import Sample, Snapshot, SourceAbsent, SourceUnavailable, labels_of
from .interrupts import HARDIRQ, IrqLines, irq_name, parse_buffer, parse_interrupts

__all__ = ["HARDIRQ", "SOFTIRQ", "STAGING", "IrqLines", "ProcfsSource", "irq_name", "parse_interrupts",
           "parse_softirqs", "parse_stat", "read_interrupts"]

SOFTIRQ = catalog.SOFTIRQ
STAGING = catalog.STAGING_CPU_SECONDS


def parse_softirqs(text: str, snap: Snapshot, where: str, last: dict[str, Sample] | None = None,
                   seen: dict[tuple[int, str], Sample] | None = None) -> dict[str, Sample]:
    """Per vector, summed over CPUs; a bad line holds the vector's sample from ``last``. Pass the
    same ``seen`` every read and a good line that reads as it did last time (under as many CPUs)
    gives last time's sample, not parsed again (at 256 CPUs a line is 256 columns to sum)."""
    lines = text.splitlines()
    ncpu = len(lines[0].split()) if lines else 0
    if not ncpu or not all(w.startswith("CPU") for w in lines[0].split()):
        raise SourceUnavailable(f"{where}: no CPU header (empty or cut file)")
    held = last or {}
    before = seen if seen is not None else {}
    now: dict[tuple[int, str], Sample] = {}
    out: dict[str, Sample] = {}
    for n, line in enumerate(lines[1:], start=2):
        head, sep, rest = line.partition(":")
        vector = head.strip().lower()
        sample = before.get((ncpu, line))
        if sample is not None and sep:
            out[vector] = now[(ncpu, line)] = sample
            continue
        parts = rest.split()
        try:
            if not sep or len(parts) != ncpu:
                snap.fault("truncated line", f"{where}:{n}")
            else:
                out[vector] = now[(ncpu, line)] = Sample(SOFTIRQ, labels_of(vector=vector),
                                                        float(sum_counters(parts)))
                continue
        except ValueError:
            snap.fault("not a number", f"{where}:{n}")
        if vector in held:
            out[vector] = held[vector]
    if seen is not None:
        seen.clear()
        seen.update(now)
    snap.counters.extend(out.values())
    return out


def parse_stat(text: str, snap: Snapshot, where: str, user_hz: float) -> None:
    """The aggregate cpu line's irq and softirq columns; a file without a good one is broken
    (SourceUnavailable: two series, both from that one line)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = line.split()
            try:
                irq, softirq = counter_value(f[6]), counter_value(f[7])
            except (IndexError, ValueError):
                raise SourceUnavailable(f"{where}: garbage cpu line") from None
            snap.counter(STAGING, irq / user_hz, kind="irq_coarse")
            snap.counter(STAGING, softirq / user_hz, kind="softirq_coarse")
            return
    raise SourceUnavailable(f"{where}: no aggregate cpu line")


# -- one parse of /proc/interrupts per cycle, for every source ---------------------------------

_CACHE_LOCK = threading.Lock()


@dataclass
class _Shared:
    at: float
    lines: IrqLines
    buf: bytearray  # the file's bytes, read into the same memory every cycle


_CACHE: dict[str, _Shared] = {}
# How old a shared parse may be for a reader that only needs names (the eBPF source): the procfs
# source re-parses every cycle, so with it on, any parse is at most one interval old.
CYCLE_SHARE_S = 5.0


def read_interrupts(procfs: str | os.PathLike[str], max_age: float = CYCLE_SHARE_S,
                    clock=time.monotonic) -> IrqLines:
    """/proc/interrupts under ``procfs``, parsed incrementally against the previous parse, and
    shared: a caller within ``max_age`` of the last parse gets that parse. Raises OSError (capped
    read) or SourceUnavailable (no header)."""
    where = os.path.join(procfs, "interrupts")
    with _CACHE_LOCK:
        hit = _CACHE.get(where)
        now = clock()
        if hit is not None and now - hit.at < max_age:
            return hit.lines
        buf = hit.buf if hit is not None else bytearray()
        try:
            n = read_into(where, buf, PROCFS_MAX)
        except FileTooLarge:
            buf.clear()  # do not keep a hostile file's 64 MiB for the next read
            raise
        lines = parse_buffer(buf, n, where, hit.lines if hit is not None else None)
        _CACHE[where] = _Shared(now, lines, buf)
        return lines


class ProcfsSource:
    name = "procfs"
    shares_lane = True  # kernel files only: read in the engine's shared lane

    def __init__(self, procfs: str = "/proc", user_hz: float | None = None) -> None:
        self._root = Path(procfs)
        self._user_hz = user_hz or float(os.sysconf("SC_CLK_TCK"))
        self._soft: dict[str, Sample] = {}
        self._soft_lines: dict[tuple[int, str], Sample] = {}  # parse_softirqs' line reuse

    def start(self) -> None:
        missing = [f for f in ("interrupts", "softirqs", "stat") if not (self._root / f).exists()]
        if len(missing) == 3:
            # Not a Linux procfs at all (or the wrong --path.procfs): nothing of this source here.
            raise SourceAbsent(f"no /proc/interrupts, softirqs or stat under {self._root}")

    def close(self) -> None:
        pass

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({HARDIRQ, SOFTIRQ, STAGING}))
        where = str(self._root / "interrupts")
        try:
            # Always this cycle's file; the parse is left for other sources of the same cycle.
            irqs = read_interrupts(self._root, max_age=0.0)
        except OSError as e:
            raise SourceUnavailable(f"cannot read {where}: {e.strerror or e}") from e
        snap.counters.extend(irqs.by_irq.values())
        snap.faults.extend(irqs.faults)
        where = str(self._root / "softirqs")
        try:
            text = read_text(where, PROCFS_MAX, errors="replace")
        except OSError as e:
            raise SourceUnavailable(f"cannot read {where}: {e.strerror or e}") from e
        self._soft = parse_softirqs(text, snap, where, self._soft, self._soft_lines)
        where = str(self._root / "stat")
        try:
            text = read_text(where, PROCFS_MAX, errors="replace")
        except OSError as e:
            raise SourceUnavailable(f"cannot read {where}: {e.strerror or e}") from e
        parse_stat(text, snap, where, self._user_hz)
        return snap
