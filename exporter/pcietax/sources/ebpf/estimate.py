"""Per-process estimates from duty-cycled windows.

A group's counts since its last fold were taken in its windows (exact bounds: the gates); they
stand for the whole interval since that fold. A process is only extrapolated over the part of the
interval it was alive: a process that started after the last fold is not credited with the time
before it existed, and one that exited before the next window is credited with its last window's
rate up to its exit (``sched_process_exit``'s time), instead of losing everything it did since.
Without those two edges a 10 s duty-cycle period misreads a 60 s job by up to a sixth either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

Window = tuple[float, float]
Key = tuple[int, Hashable]  # (tgid, rest of the key)
INF = float("inf")


def overlap(windows: list[Window], start: float, end: float) -> float:
    return sum(max(0.0, min(e, end) - max(s, start)) for s, e in windows)


class WindowEstimator:
    """One per accumulated table (socket bytes, CUDA bytes, CUDA calls). ``lifetime(tgid)`` gives
    (start, exit) in the governor's clock, -inf / +inf where unknown or still alive."""

    def __init__(self) -> None:
        self._rate: dict[Key, float] = {}  # per on-second, from each key's last window

    def __len__(self) -> int:
        return len(self._rate)

    def fold(self, deltas: Mapping[Key, float], since: float, now: float, windows: list[Window],
             lifetime: Callable[[int], tuple[float, float]]) -> dict[Key, float]:
        """Scaled increases for the interval (since, now]: counted keys by their windows, and keys
        of processes that exited in the interval without being seen by their last-window rate."""
        out: dict[Key, float] = {}
        life: dict[int, tuple[float, float]] = {}
        for key, d in deltas.items():
            tgid = key[0]
            if tgid not in life:
                life[tgid] = lifetime(tgid)
            start, end = life[tgid]
            lo, hi = max(since, start), min(now, end)
            on = overlap(windows, lo, hi)
            if on <= 0:  # counted outside what we think its life was (clock edges): take it whole
                lo, hi, on = since, now, overlap(windows, since, now)
            if on <= 0:
                out[key] = d
                continue
            self._rate[key] = d / on
            out[key] = d * max(hi - lo, on) / on
        out.update(self.exited(since, now, windows, lifetime, skip=deltas, life=life))
        return out

    def exited(self, since: float, now: float, windows: list[Window],
               lifetime: Callable[[int], tuple[float, float]], skip: Mapping[Key, float] = {},
               life: dict[int, tuple[float, float]] | None = None) -> dict[Key, float]:
        """Processes that exited in (since, now] with no window seeing them alive since: their
        last window's rate up to the exit. Each is estimated once (then forgotten), so this may run
        every cycle, window or not."""
        life = {} if life is None else life
        out: dict[Key, float] = {}
        done: set[int] = set()
        for key, rate in self._rate.items():
            if key in skip:
                continue
            if key[0] not in life:
                life[key[0]] = lifetime(key[0])
            start, end = life[key[0]]
            lo = max(since, start)
            if since < end <= now and overlap(windows, lo, end) <= 0:
                out[key] = rate * (end - lo)
                done.add(key[0])
        self.forget(done)
        return out

    def forget(self, tgids: set[int]) -> None:
        if tgids:
            self._rate = {k: v for k, v in self._rate.items() if k[0] not in tgids}


def process_start(procfs: Path, tgid: int) -> float:
    """When a process started, on the monotonic clock (``/proc/PID/stat`` field 22 counts clock
    ticks of the boot-time clock); -inf when it cannot be read (gone, or a hostile file)."""
    try:
        raw = (procfs / str(tgid) / "stat").read_bytes()
        ticks = int(raw.rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -INF
    boot_minus_mono = time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()
    return ticks / os.sysconf("SC_CLK_TCK") - boot_minus_mono
