"""Per-process counters with a bounded ``process`` label (DESIGN.md section 2).

The kernel counts per tgid; Prometheus gets per comm, for the first ``top_n`` comms that move
bytes, and everything else under ``process="other"``. Assignment is sticky: once a comm has its own
series it keeps it, and bytes are attributed by delta, so no exported series ever goes down when
processes exit, pids are reused, or a busy newcomer arrives after the slots are taken.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from ..counters import CounterAbsorber

OTHER = "other"
LABEL_MAX = 64  # a comm is 15 bytes; a pod/container name is at most 253


def sanitize(raw: bytes | str, limit: int = LABEL_MAX) -> str:
    """A label value from hostile text (/proc/PID/comm, cgroup paths): bytes decoded with
    errors="replace", control and other unprintable characters replaced, length bounded.
    Any unprivileged user can name a process b"\\xff\\xfe" (prctl PR_SET_NAME)."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.strip("\x00\n\r\t ")
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in text)[:limit]

# (tgid, rest-of-key) -> raw cumulative value from the kernel map
RawKey = tuple[int, Hashable]


class DeltaTracker:
    """Raw cumulative per-key values in, per-key increases out. A key whose value went down was
    deleted and re-created (a reused pid after cleanup), so its whole value is new.

    The arithmetic is ``counters.CounterAbsorber``'s (the one raw -> increase implementation), with
    every drop taken at once as a reset: an eBPF map value is read whole, so a lower value is never
    a half-written read to confirm, and it never wraps (64-bit byte sums)."""

    def __init__(self) -> None:
        # No end_cycle: keys live until forget() says their process is gone.
        self._absorber = CounterAbsorber()

    def deltas(self, raw: Mapping[RawKey, float]) -> dict[RawKey, float]:
        out: dict[RawKey, float] = {}
        inc = self._absorber.increase
        for k, v in raw.items():
            d = inc(k, v, confirm=False)
            if d > 0:
                out[k] = d
        return out

    def forget(self, tgids: set[int]) -> None:
        if tgids:
            self._absorber.forget_matching(lambda k: k[0] in tgids)

    def __len__(self) -> int:
        return len(self._absorber)


class ProcessFolder:
    """Accumulates per-key deltas into per-(process label, rest-of-key) totals."""

    def __init__(self, top_n: int = 20, other: Hashable = OTHER) -> None:
        if top_n < 0:
            raise ValueError("top_n must be >= 0")
        self.top_n = top_n
        self.other = other
        self._own: set[Hashable] = set()
        self._totals: dict[tuple[Hashable, Hashable], float] = {}

    def label(self, ident: Hashable) -> Hashable:
        """A process identity (a comm, or a (comm, namespace, pod, container) tuple) keeps its own
        series if it has one or a slot is free; else the whole identity folds into ``other``."""
        if ident in self._own:
            return ident
        if len(self._own) < self.top_n and ident != self.other:
            self._own.add(ident)
            return ident
        return self.other

    def add(self, deltas: Mapping[RawKey, float], ident_of: Mapping[int, Hashable],
            scale: float = 1.0) -> None:
        # Largest movers first, so when slots run out within one cycle the busiest ones get them.
        by_ident: dict[Hashable, float] = {}
        for (tgid, _), d in deltas.items():
            c = ident_of.get(tgid, self.other)
            by_ident[c] = by_ident.get(c, 0.0) + d
        for c in sorted(by_ident, key=lambda c: -by_ident[c]):
            self.label(c)
        for (tgid, rest), d in deltas.items():
            key = (self.label(ident_of.get(tgid, self.other)), rest)
            self._totals[key] = self._totals.get(key, 0.0) + d * scale

    def totals(self) -> dict[tuple[Hashable, Hashable], float]:
        return dict(self._totals)
