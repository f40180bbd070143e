"""The one small interface every source implements, and the snapshot it returns.

Sources read hardware and kernel state and return raw counters; they know nothing of Prometheus,
of the tax model, or of each other. Everything they touch on disk comes from roots passed in, so a
test hands them a fixture tree instead of patching globals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Labels = tuple[tuple[str, str], ...]


def labels_of(**kv: object) -> Labels:
    """Canonical, hashable label set: sorted by name, values as strings."""
    return tuple(sorted((k, str(v)) for k, v in kv.items()))


@dataclass(frozen=True)
class Sample:
    """One reading. For counters, ``value`` is the raw device/kernel value (it may wrap or reset);
    ``bits`` is the counter's width when it is narrower than 64 bits, so wraps can be told from resets."""

    family: str
    labels: Labels
    value: float
    bits: int | None = None


@dataclass(frozen=True)
class Fault:
    """A problem absorbed while reading: the affected series is skipped, everything else flows."""

    what: str
    where: str

    def __str__(self) -> str:
        return f"{self.what}: {self.where}"


@dataclass
class Snapshot:
    """One consistent read of a source.

    ``provides`` names the counter families this source is actively measuring, even before the
    first event arrives (a measured zero is not an absent hop)."""

    counters: list[Sample] = field(default_factory=list)
    gauges: list[Sample] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    provides: frozenset[str] = frozenset()
    # Wraps and resets the source absorbed itself during this read (a sum of several device
    # counters, such as a NIC's netdev and RDMA port bytes, cannot be absorbed as one counter).
    resets: int = 0

    def counter(self, family: str, value: float, bits: int | None = None, **labels: object) -> None:
        self.counters.append(Sample(family, labels_of(**labels), float(value), bits))

    def gauge(self, family: str, value: float, **labels: object) -> None:
        self.gauges.append(Sample(family, labels_of(**labels), float(value)))

    def fault(self, what: str, where: object) -> None:
        self.faults.append(Fault(what, str(where)))


class SourceUnavailable(Exception):
    """Raised by ``start()`` (or ``read()``) when the source cannot work here; the message is the
    reason shown to the operator (``no GPU``, ``not root``, ``bcc not installed`` …).

    Raised as such it is a *failure*: the hardware or software is there and does not work (NVML
    init fails, a read errors, a PMU that was there is gone). Operators are paged for it."""


class SourceAbsent(SourceUnavailable):
    """The source's hardware or driver is not on this node at all (no NVIDIA library, no
    ``/sys/class/infiniband``, a CPU without the uncore PMU): expected, exported as
    ``pcietax_source_absent=1`` and never alerted on. Raise it only when nothing of the hardware
    is present; anything present but broken is a plain ``SourceUnavailable``."""


@runtime_checkable
class Source(Protocol):
    """start() may raise SourceUnavailable; read() returns a Snapshot or raises; close() is idempotent.

    A source whose read() only reads kernel files sets the class attribute ``shares_lane = True``:
    the engine reads it one after another with the others in one worker (engine.py); any other
    source (one that calls into a driver library) gets a worker of its own."""

    name: str

    def start(self) -> None: ...

    def read(self) -> Snapshot: ...

    def close(self) -> None: ...


def totals_by(samples: Iterable[Sample], family: str, key: str) -> Mapping[str, float]:
    """Sum the samples of one family by one label (for tests and small aggregations)."""
    out: dict[str, float] = {}
    for s in samples:
        if s.family == family:
            k = dict(s.labels).get(key, "")
            out[k] = out.get(k, 0.0) + s.value
    return out
