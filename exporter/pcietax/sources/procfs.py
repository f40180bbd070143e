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
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import catalog
from ..fsread import PROCFS_MAX, counter_value, read_text
from .base import Fault, Labels, Sample, Snapshot, SourceAbsent, SourceUnavailable, labels_of

HARDIRQ = catalog.HARDIRQ
SOFTIRQ = catalog.SOFTIRQ
STAGING = catalog.STAGING_CPU_SECONDS


_NONZERO = "0".__ne__

# Label sets by (irq, text after the counts): kept across reads, dropped past this size.
_LABELS_MAX = 20_000

# Lines with one node-wide number instead of per-CPU counts: x86 ERR/MIS, arm64 Err.
_SINGLE = frozenset({"ERR", "MIS", "Err"})

# After the chip name of a numbered line: the hardware IRQ number, optionally with the flow
# handler glued on ("2-edge", "524288-edge", "27"), or the flow alone when the IRQ has no domain
# ("-edge"). Kernels before 4.x print no hwirq and glue the flow to the chip ("IR-IO-APIC-fasteoi").
_HWIRQ = re.compile(r"(?:\d+|0x[0-9a-fA-F]+)(?:-[\w.]+)?|-[\w.]+")
# CONFIG_GENERIC_IRQ_SHOW_LEVEL (arm64, Grace/GH200) prints the trigger type before the actions.
_TRIGGER = frozenset({"Level", "Edge"})
# Characters a driver may put in an action name that do not belong in a label value.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class IrqLines:
    """One parse of /proc/interrupts, and what the next parse reuses: samples keyed by their line's
    text under its CPU header, the label set of each (irq, text after the counts), each IRQ's last
    sample (held when its line is bad), the faults of this parse, and the IRQ names."""

    header: str = ""
    samples: dict[str, tuple[str, Sample]] = field(default_factory=dict)  # line -> (irq, sample)
    labels: dict[tuple[str, str], Labels] = field(default_factory=dict)
    by_irq: dict[str, Sample] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    _names: dict[str, str] | None = None
    _words: dict[str, frozenset[str]] | None = None

    @property
    def counters(self) -> list[Sample]:
        return list(self.by_irq.values())

    def names(self) -> dict[str, str]:
        """irq -> action names (the ``name`` label)."""
        if self._names is None:
            self._names = {irq: dict(s.labels)["name"] for irq, s in self.by_irq.items()}
        return self._names

    def irqs_tagged(self, tags: set[str] | frozenset[str]) -> set[str]:
        """IRQ lines whose action names carry one of ``tags`` as a word or a word's prefix before
        a '-' (``eth0`` matches ``eth0-TxRx-0``): a dictionary lookup per tag, built once per
        parse, instead of every tag against every word of every line each cycle."""
        if self._words is None:
            index: dict[str, set[str]] = {}
            for irq, name in self.names().items():
                for word in name.replace(",", " ").split():
                    index.setdefault(word, set()).add(irq)
                    for i, ch in enumerate(word):
                        if ch == "-" and i:
                            index.setdefault(word[:i], set()).add(irq)
            self._words = {k: frozenset(v) for k, v in index.items()}
        out: set[str] = set()
        for t in tags:
            out |= self._words.get(t, frozenset())
        return out


def parse_interrupts(text: str, snap: Snapshot, where: str, last: IrqLines | None = None) -> IrqLines:
    """Per IRQ line: the count summed over CPUs, labelled with the line's action names; appends the
    samples to ``snap.counters`` and its faults to ``snap.faults``.

    Pass the previous read's result as ``last`` and a line whose text did not change is not parsed
    again (most of a big node's MSI-X vectors are idle between two reads): a line's text under the
    same CPU header always parses the same way. A bad line holds its IRQ's sample from ``last``.
    Raises SourceUnavailable when the file is empty or has no CPU header."""
    lines = text.splitlines()
    header = lines[0] if lines else ""
    ncpu = len(header.split())
    if not ncpu or not all(w.startswith("CPU") for w in header.split()):
        raise SourceUnavailable(f"{where}: no CPU header (empty or cut file)")
    cache = last.samples if last is not None and last.header == header else {}
    labels = last.labels if last is not None and len(last.labels) < _LABELS_MAX else {}
    held = last.by_irq if last is not None else {}
    out = IrqLines(header, {}, labels, {}, [])
    faults = out.faults
    samples, by_irq = out.samples, out.by_irq
    for n, line in enumerate(lines[1:], start=2):
        hit = cache.get(line)
        if hit is None:
            if not line or line.isspace():
                continue  # carries nothing (copied trees have them): skipped, as node_exporter does
            sample = _interrupt_line(line, ncpu, faults, where, n, labels)
            irq = line.partition(":")[0].strip()
            if sample is None:
                if irq in held and irq not in by_irq:
                    by_irq[irq] = held[irq]  # a bad line holds its last count
                continue
            hit = (irq, sample)
        samples[line] = hit
        by_irq[hit[0]] = hit[1]
    snap.counters.extend(out.by_irq.values())
    snap.faults.extend(faults)
    return out


def _interrupt_line(line: str, ncpu: int, faults: list[Fault], where: str, n: int,
                    labels: dict[tuple[str, str], Labels]) -> Sample | None:
    head, sep, rest = line.partition(":")
    irq = head.strip()
    if not sep or not irq or " " in irq:
        faults.append(Fault("truncated line", f"{where}:{n}"))
        return None
    # ERR and MIS (and arm64's Err) carry one node-wide number; every other line one count per
    # CPU, then text (for numbered lines at least the irq chip).
    ncounts = 1 if irq in _SINGLE else ncpu
    parts = rest.split(None, ncounts)
    text = parts.pop() if len(parts) > ncounts else ""
    if len(parts) < ncounts or (not text and irq.isdigit()):
        # Cut short: a partial sum would read as a reset now and a jump on the next full read.
        faults.append(Fault("truncated line", f"{where}:{n}"))
        return None
    try:
        # Most per-CPU columns are 0 on a big node (IRQ affinity): skip converting those.
        total = sum(map(counter_value, filter(_NONZERO, parts)))
    except ValueError:
        faults.append(Fault("not a number", f"{where}:{n}"))
        return None
    lbl = labels.get((irq, text))
    if lbl is None:
        lbl = labels[(irq, text)] = labels_of(irq=irq, name=irq_name(irq, text))
    return Sample(HARDIRQ, lbl, float(total))


def irq_name(irq: str, text: str) -> str:
    """The action names of a line (what node_exporter calls ``devices`` for numbered lines, minus
    the hwirq/flow and trigger words every kernel layout puts before them), or the description of
    a named line (node_exporter's ``info``)."""
    words = text.split()
    if irq.isdigit():
        i = 1  # the chip (with the flow glued on in old kernels: IR-IO-APIC-fasteoi)
        if i < len(words) and _HWIRQ.fullmatch(words[i]):
            i += 1
        if i < len(words) and words[i] in _TRIGGER:
            i += 1
        name = " ".join(words[i:])
    elif irq in _SINGLE:
        name = irq
    else:
        name = " ".join(words) or irq
    return _CONTROL.sub("?", name)


def parse_softirqs(text: str, snap: Snapshot, where: str, last: dict[str, Sample] | None = None
                   ) -> dict[str, Sample]:
    """Per vector, summed over CPUs; a bad line holds the vector's sample from ``last``."""
    lines = text.splitlines()
    ncpu = len(lines[0].split()) if lines else 0
    if not ncpu or not all(w.startswith("CPU") for w in lines[0].split()):
        raise SourceUnavailable(f"{where}: no CPU header (empty or cut file)")
    held = last or {}
    out: dict[str, Sample] = {}
    for n, line in enumerate(lines[1:], start=2):
        head, sep, rest = line.partition(":")
        vector = head.strip().lower()
        parts = rest.split()
        try:
            if not sep or len(parts) != ncpu:
                snap.fault("truncated line", f"{where}:{n}")
            else:
                out[vector] = Sample(SOFTIRQ, labels_of(vector=vector), float(sum(map(counter_value, parts))))
                continue
        except ValueError:
            snap.fault("not a number", f"{where}:{n}")
        if vector in held:
            out[vector] = held[vector]
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
_CACHE: dict[str, tuple[float, IrqLines]] = {}
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
        if hit is not None and now - hit[0] < max_age:
            return hit[1]
        text = read_text(where, PROCFS_MAX, errors="replace")
        lines = parse_interrupts(text, Snapshot(), where, hit[1] if hit else None)
        _CACHE[where] = (now, lines)
        return lines


class ProcfsSource:
    name = "procfs"

    def __init__(self, procfs: str = "/proc", user_hz: float | None = None) -> None:
        self._root = Path(procfs)
        self._user_hz = user_hz or float(os.sysconf("SC_CLK_TCK"))
        self._soft: dict[str, Sample] = {}

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
        self._soft = parse_softirqs(text, snap, where, self._soft)
        where = str(self._root / "stat")
        try:
            text = read_text(where, PROCFS_MAX, errors="replace")
        except OSError as e:
            raise SourceUnavailable(f"cannot read {where}: {e.strerror or e}") from e
        parse_stat(text, snap, where, self._user_hz)
        return snap
