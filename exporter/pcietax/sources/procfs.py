"""Interrupt and softirq counts from /proc/interrupts and /proc/softirqs (summed over CPUs), and
the IRQ and softirq time columns of /proc/stat: the coarse staging-CPU figure used when eBPF is off
(it covers every IRQ and softirq on the node, not only the network's)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..fsread import read_text
from .base import Labels, Sample, Snapshot, SourceUnavailable, labels_of

HARDIRQ = "pcietax_hardirq_total"
SOFTIRQ = "pcietax_softirq_total"
STAGING = "pcietax_staging_cpu_seconds_total"


_NONZERO = "0".__ne__


# Label sets by (irq, text after the counts): kept across reads, dropped past this size.
_LABELS_MAX = 20_000


@dataclass(frozen=True)
class IrqLines:
    """What one read of /proc/interrupts leaves for the next: its samples keyed by their line's text
    under its CPU header, and the label set of each (irq, text after the counts)."""

    header: str = ""
    samples: dict[str, Sample] = field(default_factory=dict)
    labels: dict[tuple[str, str], Labels] = field(default_factory=dict)


def parse_interrupts(text: str, snap: Snapshot, where: str, last: IrqLines | None = None) -> IrqLines:
    """Per IRQ line: the count summed over CPUs, labelled with the line's action names.

    Pass the previous read's result as ``last`` and a line whose text did not change is not parsed
    again (most of a big node's MSI-X vectors are idle between two reads): a line's text under the
    same CPU header always parses the same way."""
    lines = text.splitlines()
    if not lines:
        snap.fault("empty file", where)
        return IrqLines()
    header = lines[0]
    ncpu = len(header.split())
    cache = last.samples if last is not None and last.header == header else {}
    labels = last.labels if last is not None and len(last.labels) < _LABELS_MAX else {}
    seen: dict[str, Sample] = {}
    out = snap.counters
    for n, line in enumerate(lines[1:], start=2):
        sample = cache.get(line)
        if sample is None:
            sample = _interrupt_line(line, ncpu, snap, where, n, labels)
            if sample is None:
                continue
        seen[line] = sample
        out.append(sample)
    return IrqLines(header, seen, labels)


def _interrupt_line(line: str, ncpu: int, snap: Snapshot, where: str, n: int,
                    labels: dict[tuple[str, str], Labels]) -> Sample | None:
    head, sep, rest = line.partition(":")
    irq = head.strip()
    if not sep or not irq:
        snap.fault("truncated line", f"{where}:{n}")
        return None
    # ERR and MIS carry one node-wide number; every other line one count per CPU, then text
    # (for numbered lines at least the irq chip).
    ncounts = 1 if irq in ("ERR", "MIS") else ncpu
    parts = rest.split(None, ncounts)
    text = parts.pop() if len(parts) > ncounts else ""
    if len(parts) < ncounts or (not text and irq.isdigit()):
        # Cut short: a partial sum would read as a reset now and a jump on the next full read.
        snap.fault("truncated line", f"{where}:{n}")
        return None
    try:
        # Most per-CPU columns are 0 on a big node (IRQ affinity): skip converting those.
        total = sum(map(int, filter(_NONZERO, parts)))
    except ValueError:
        snap.fault("not a number", f"{where}:{n}")
        return None
    lbl = labels.get((irq, text))
    if lbl is None:
        lbl = labels[(irq, text)] = labels_of(irq=irq, name=_irq_name(irq, text))
    return Sample(HARDIRQ, lbl, float(total))


def _irq_name(irq: str, text: str) -> str:
    words = text.split()
    if irq.isdigit():
        # chip, hwirq-trigger, then the action names (what node_exporter calls "devices").
        return " ".join(words[2:] if len(words) > 2 else words[1:])
    if irq in ("ERR", "MIS"):
        return irq
    return " ".join(words) or irq


def parse_softirqs(text: str, snap: Snapshot, where: str) -> None:
    lines = text.splitlines()
    if not lines:
        snap.fault("empty file", where)
        return
    ncpu = len(lines[0].split())
    for n, line in enumerate(lines[1:], start=2):
        head, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or len(parts) != ncpu:
            snap.fault("truncated line", f"{where}:{n}")
            continue
        try:
            snap.counter(SOFTIRQ, sum(map(int, parts)), vector=head.strip().lower())
        except ValueError:
            snap.fault("not a number", f"{where}:{n}")


def parse_stat(text: str, snap: Snapshot, where: str, user_hz: float) -> None:
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = line.split()
            try:
                snap.counter(STAGING, int(f[6]) / user_hz, kind="irq_coarse")
                snap.counter(STAGING, int(f[7]) / user_hz, kind="softirq_coarse")
            except (IndexError, ValueError):
                snap.fault("garbage cpu line", where)
            return
    snap.fault("no aggregate cpu line", where)


class ProcfsSource:
    name = "procfs"

    def __init__(self, procfs: str = "/proc", user_hz: float | None = None) -> None:
        self._root = Path(procfs)
        self._user_hz = user_hz or float(os.sysconf("SC_CLK_TCK"))
        self._irq_lines = IrqLines()

    def start(self) -> None:
        missing = [f for f in ("interrupts", "softirqs", "stat") if not (self._root / f).exists()]
        if len(missing) == 3:
            raise SourceUnavailable(f"no /proc/interrupts, softirqs or stat under {self._root}")

    def close(self) -> None:
        pass

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({HARDIRQ, SOFTIRQ, STAGING}))
        where = str(self._root / "interrupts")
        try:
            self._irq_lines = parse_interrupts(read_text(where), snap, where, self._irq_lines)
        except (OSError, UnicodeDecodeError) as e:
            self._irq_lines = IrqLines()
            snap.fault("unreadable", f"{where}: {e}")
        where = str(self._root / "softirqs")
        try:
            parse_softirqs(read_text(where), snap, where)
        except (OSError, UnicodeDecodeError) as e:
            snap.fault("unreadable", f"{where}: {e}")
        where = str(self._root / "stat")
        try:
            parse_stat(read_text(where), snap, where, self._user_hz)
        except (OSError, UnicodeDecodeError) as e:
            snap.fault("unreadable", f"{where}: {e}")
        return snap
