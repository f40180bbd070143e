"""Turn raw device counters into counters that never go backwards: the one "raw value -> monotonic
value" implementation (the engine, the netdev source's per-NIC parts and the tests all use it).

A raw value below the previous one is a *wrap* (a narrow counter passed 2**bits), a *reset*
(driver reload, device re-enumerated, a restarted eBPF program), or a *glitch*: one read of a
half-written file that comes back right on the next read. Wraps are plausible only near the top of
the range and are absorbed at once. A drop within float rounding (``ROUNDING``) is no drop. Any
other drop is held for one read and confirmed: if the next read is back at or above the value
before the drop, it was a glitch and nothing is absorbed (a glitch taken as a reset would add the
counter's whole history when the file is repaired); if it is still below, the reset is absorbed
then, with everything counted since. Each wrap and reset is
counted so the operator can see it (``pcietax_source_resets_total``). Pure arithmetic, no I/O.

Series not fed for ``forget_after`` cycles are forgotten (SR-IOV VFs and IRQ lines churn); one that
returns later starts again from its raw value, which Prometheus reads as a counter reset.

A caller that feeds thousands of series a cycle, most of them the same readings as the cycle before
(the IRQ lines of a big node), says so with ``carry()`` and feeds only the ones that changed: a
carried series counts as fed with its last raw value, which leaves its monotonic value as it was.
Series holding a drop (``held``) are the exception: their next read decides, so the caller feeds
them every cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

# A wrap is only plausible when the previous value was in the top part of the counter's range
# and the new one near the bottom; otherwise a drop is a reset (or a glitch).
_WRAP_WINDOW = 0.5
FORGET_AFTER_CYCLES = 600  # ten minutes at the default 1 s collection interval
# Drops smaller than this fraction of the counter are float rounding: a reset falls to near zero
# and a half-written file loses digits, both far larger (a 2**64 counter would have to drop 18 GB).
ROUNDING = 1e-9


@dataclass
class _State:
    last_raw: float
    offset: float
    seen: int  # cycle of the last update
    dropped: bool = False  # the last read was below last_raw and is waiting for confirmation


class CounterAbsorber:
    """Per-series state: key -> (last raw value, offset added to every later raw value)."""

    def __init__(self, forget_after: int = FORGET_AFTER_CYCLES) -> None:
        self._state: dict[Hashable, _State] = {}
        self.wraps = 0
        self.resets = 0
        self.glitches = 0
        self.forget_after = forget_after
        self._cycle = 0
        # Keys holding a drop for confirmation: fed every cycle, carried or not.
        self.held: set[Hashable] = set()
        # Carry streak: every cycle after ``_streak_from`` (up to the current one when
        # ``_carry_now``) carried the whole feed of the cycle before, so a key last stamped at or
        # after ``_streak_from`` has been fed in every cycle since.
        self._streak_from: int | None = None
        self._carry_now = False

    def update(self, key: Hashable, raw: float, bits: int | None = None,
               confirm: bool = True) -> float:
        """Feed one raw reading; return the monotonic value (first reading is taken as-is).

        A drop is absorbed at once, without waiting for a confirming read, when ``confirm`` is
        False (the source failed in between: the driver went away and came back) or when the
        series was missing from the previous cycle (the device was re-enumerated)."""
        st = self._state.get(key)
        if st is None:
            self._state[key] = _State(raw, 0.0, self._cycle)
            return raw
        if st.seen < self._cycle - 1 and (self._streak_from is None or st.seen < self._streak_from):
            confirm = False
        st.seen = self._cycle
        if raw >= st.last_raw - abs(st.last_raw) * ROUNDING:
            if raw < st.last_raw:
                # A float total that a source re-derives each cycle (seconds from nanoseconds, a
                # sum in another order) can come back an ulp lower: rounding, not a reset, which
                # would add the counter's whole history. Held at its last value.
                raw = st.last_raw
            if st.dropped:
                self.glitches += 1  # back where it was: the lower read was not a reset
                st.dropped = False
                self.held.discard(key)
            st.last_raw = raw
            return raw + st.offset
        if bits is not None and _is_wrap(st.last_raw, raw, bits):
            st.offset += float(2**bits)
            self.wraps += 1
            if st.dropped:
                st.dropped = False
                self.held.discard(key)
            st.last_raw = raw
            return raw + st.offset
        if confirm and not st.dropped:
            st.dropped = True  # hold the last value until the next read says which it was
            self.held.add(key)
            return st.last_raw + st.offset
        # Still below on the second read (or nothing to confirm against): a real reset. The
        # counter restarted at zero, so everything it now shows is new.
        if st.dropped:
            st.dropped = False
            self.held.discard(key)
        st.offset += st.last_raw
        st.last_raw = raw
        self.resets += 1
        return raw + st.offset

    def value(self, key: Hashable) -> float | None:
        st = self._state.get(key)
        return None if st is None else st.last_raw + st.offset

    def forget(self, key: Hashable) -> None:
        self._state.pop(key, None)
        self.held.discard(key)

    def carry(self) -> None:
        """Say, before this cycle's updates, that every series fed in the previous cycle is fed
        again in this one with the same raw value, except those updated explicitly (which must
        include every key in ``held``)."""
        if self._streak_from is None:
            self._streak_from = self._cycle - 1
        self._carry_now = True

    def end_cycle(self) -> int:
        """Close one collection cycle: forget series not updated for ``forget_after`` cycles.
        Returns how many were forgotten."""
        cycle = self._cycle
        streak = self._streak_from
        if streak is not None and not self._carry_now:
            # The streak ended last cycle: a key carried through it was last fed then.
            for st in self._state.values():
                if streak <= st.seen < cycle - 1:
                    st.seen = cycle - 1
            self._streak_from = streak = None
        carrying, self._carry_now = self._carry_now, False
        self._cycle += 1
        if self._cycle % max(1, self.forget_after // 4):
            return 0  # sweep a few times per forget period, not every cycle
        cutoff = self._cycle - self.forget_after
        fed_now = streak if carrying and streak is not None else cycle + 1
        old = [k for k, st in self._state.items() if st.seen < cutoff and st.seen < fed_now]
        for k in old:
            del self._state[k]
            self.held.discard(k)
        return len(old)

    def __len__(self) -> int:
        return len(self._state)

    # -- additions for callers that want increases, not totals (issue 11) ----------------------

    def increase(self, key: Hashable, raw: float, bits: int | None = None,
                 confirm: bool = True) -> float:
        """``update`` as a step: how much the monotonic value rose with this reading. A key seen
        for the first time (or again after ``forget``) gives its whole raw value; a held drop
        gives 0; a confirmed reset gives the restarted counter's whole value."""
        before = self.value(key)
        return self.update(key, raw, bits, confirm) - (0.0 if before is None else before)

    def forget_matching(self, pred: Callable[[Hashable], bool]) -> int:
        """Forget every key for which ``pred`` is true (a dead process's keys); returns how many."""
        gone = [k for k in self._state if pred(k)]
        for k in gone:
            del self._state[k]
            self.held.discard(k)
        return len(gone)


def _is_wrap(last: float, raw: float, bits: int) -> bool:
    span = float(2**bits)
    return last >= span * _WRAP_WINDOW and raw < span * (1 - _WRAP_WINDOW) and last < span
