"""Opening and closing the probe groups' windows.

A window is bounded by a write to the group's gate (``gates[G_<GROUP>]``, tested by each of its
programs): one map update, so the governor knows to the microsecond when counting started and
stopped, and the scaled estimates are exact in their time base. Attaching is fast (0.5-12 ms here).
Detaching a perf-event probe (the uprobes, sched_process_fork) waits for an RCU grace period in the
kernel (measured 150-480 ms per group on a busy 2-vCPU VM; a raw tracepoint's detach does not), so
a closed group is detached by a background thread, and a group that must open again first waits
for its detach to finish. While a closed group is still attached, its programs run only to their
gate test: a dispatch and a map lookup per event, counted in the group's cost.

``close_all`` detaches everything at once, in parallel (grace periods overlap), for a shutdown
that fits SIGTERM's 2 s.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait

log = logging.getLogger("pcietax")

DETACH_WAIT_S = 5.0  # how long opening waits for the same group's detach


class GroupSwitch:
    """``write_gate(index, open)``, ``attach(group)`` and ``detach(group)`` are the source's; the
    groups' gate indexes are their positions in ``groups``. ``attached`` names groups attached
    already (BCC attaches tracepoint programs while loading)."""

    def __init__(self, groups: tuple[str, ...], write_gate: Callable[[int, bool], None],
                 attach: Callable[[str], None], detach: Callable[[str], None],
                 attached: Iterable[str] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self._index = {g: i for i, g in enumerate(groups)}
        self._write_gate = write_gate
        self._attach = attach
        self._detach = detach
        self._clock = clock
        on = set(attached)
        # attached | queued (a detach waits in the queue) | detaching | detached
        self._state = {g: "attached" if g in on else "detached" for g in groups}
        self._cv = threading.Condition()
        self.is_open = dict.fromkeys(groups, False)
        self.error: str | None = None  # the last detach failure, for the source's next read
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pcietax-ebpf-detach", daemon=True)
        self._thread.start()

    def open(self, group: str) -> float:
        """Attach (unless still attached: a queued detach is called off) and open the gate: the
        window's start, returned."""
        with self._cv:
            if self._state[group] == "queued":
                self._state[group] = "attached"
            if not self._cv.wait_for(lambda: self._state[group] != "detaching", DETACH_WAIT_S):
                raise RuntimeError(f"{group} probes still detaching after {DETACH_WAIT_S:.0f} s")
            if self._state[group] == "detached":
                self._attach(group)
                self._state[group] = "attached"
            self._write_gate(self._index[group], True)
            self.is_open[group] = True
            return self._clock()

    def close(self, group: str, detach: bool = True) -> float:
        """Close the gate (the window's end, returned) and detach in the background."""
        with self._cv:
            self._write_gate(self._index[group], False)
            t = self._clock()
            self.is_open[group] = False
            if detach and self._state[group] == "attached":
                self._state[group] = "queued"
                self._q.put(group)
            return t

    def state(self, group: str) -> str:
        return self._state[group]

    def _run(self) -> None:
        while True:
            group = self._q.get()
            if group is None:
                return
            with self._cv:
                if self._state[group] != "queued":  # opened again before its turn
                    continue
                self._state[group] = "detaching"
            try:
                self._detach(group)
                after = "detached"
            except Exception as e:  # the thread must survive; the source reports it
                log.warning("ebpf: detaching %s probes: %s", group, e)
                self.error = f"detaching {group}: {type(e).__name__}: {e}"
                after = "attached"
            with self._cv:
                self._state[group] = after
                self._cv.notify_all()

    def stop(self, timeout: float = 1.0) -> None:
        self._q.put(None)
        self._thread.join(timeout)


def close_all(closers: list[Callable[[], None]], timeout: float) -> int:
    """Run every detach at once (each waits for a grace period; in parallel they share them).
    Returns how many had not finished within ``timeout`` (left to the process exit)."""
    if not closers:
        return 0
    pool = ThreadPoolExecutor(max_workers=min(16, len(closers)), thread_name_prefix="pcietax-ebpf-close")
    try:
        futures = [pool.submit(c) for c in closers]
        done, late = wait(futures, timeout=timeout)
        for f in done:
            if f.exception() is not None:
                log.warning("ebpf: detach at close: %s", f.exception())
        return len(late)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
