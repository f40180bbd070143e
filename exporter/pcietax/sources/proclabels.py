"""Per-process counters with a bounded ``process`` label (DESIGN.md section 2).

The kernel counts per tgid; Prometheus gets per comm, for the first ``top_n`` comms that move
bytes, and everything else under ``process="other"``. Assignment is sticky: once a comm has its own
series it keeps it, and bytes are attributed by delta, so no exported series ever goes down when
processes exit, pids are reused, or a busy newcomer arrives after the slots are taken.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

OTHER = "other"

# (tgid, rest-of-key) -> raw cumulative value from the kernel map
RawKey = tuple[int, Hashable]


class DeltaTracker:
    """Raw cumulative per-key values in, per-key increases out. A key whose value went down was
    deleted and re-created (a reused pid after cleanup), so its whole value is new."""

    def __init__(self) -> None:
        self._last: dict[RawKey, float] = {}

    def deltas(self, raw: Mapping[RawKey, float]) -> dict[RawKey, float]:
        out: dict[RawKey, float] = {}
        for k, v in raw.items():
            prev = self._last.get(k, 0.0)
            d = v - prev if v >= prev else v
            self._last[k] = v
            if d > 0:
                out[k] = d
        return out

    def forget(self, tgids: set[int]) -> None:
        for k in [k for k in self._last if k[0] in tgids]:
            del self._last[k]


class ProcessFolder:
    """Accumulates per-key deltas into per-(process label, rest-of-key) totals."""

    def __init__(self, top_n: int = 20) -> None:
        if top_n < 0:
            raise ValueError("top_n must be >= 0")
        self.top_n = top_n
        self._own: set[str] = set()
        self._totals: dict[tuple[str, Hashable], float] = {}

    def label(self, comm: str) -> str:
        if comm in self._own:
            return comm
        if len(self._own) < self.top_n and comm != OTHER:
            self._own.add(comm)
            return comm
        return OTHER

    def add(self, deltas: Mapping[RawKey, float], comm_of: Mapping[int, str], scale: float = 1.0) -> None:
        # Largest movers first, so when slots run out within one cycle the busiest comms get them.
        by_comm: dict[str, float] = {}
        for (tgid, _), d in deltas.items():
            c = comm_of.get(tgid, OTHER)
            by_comm[c] = by_comm.get(c, 0.0) + d
        for c in sorted(by_comm, key=lambda c: -by_comm[c]):
            self.label(c)
        for (tgid, rest), d in deltas.items():
            key = (self.label(comm_of.get(tgid, OTHER)), rest)
            self._totals[key] = self._totals.get(key, 0.0) + d * scale

    def totals(self) -> dict[tuple[str, Hashable], float]:
        return dict(self._totals)
