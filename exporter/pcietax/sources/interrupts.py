"""One parse of /proc/interrupts, and the next parse's reuse of it line by line.

A big node's file is mostly idle MSI-X vectors (256 CPUs x 5,000 lines: 14 MiB, about 2.8 KiB a
line), and most lines read the same from one second to the next. The next parse compares each
line's bytes with the previous parse's line at the same position (a memcmp, no hashing, no
decoding) and decodes and parses only the lines that changed; a file where nothing changed gives
back the previous parse itself. A changed line of the same length whose changed bytes all lie in
whole count columns (a few CPUs' counts ticked: the usual change) is not split again: its total is
the old total minus the old columns plus the new ones (at 256 CPUs about 6 us instead of 32 us).
The result is exactly a fresh parse's: the same samples in the same order, the same faults (with
their line numbers), the same held values.

Bytes that ``str.splitlines`` takes as line breaks and ``bytes.find(b"\\n")`` does not (``\\r``,
``\\v``, ``\\f``, ``\\x1c``-``\\x1e``) never come from a kernel; a line that has one sends the whole
file down the text path, which splits it as the exporter always did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import catalog
from ..fsread import sum_counters
from .base import Fault, Labels, Sample, Snapshot, SourceUnavailable, labels_of

HARDIRQ = catalog.HARDIRQ

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

# One line's parse: (irq, sample, None) for a good line, (irq, None, fault) for a bad one; None for
# a blank line (it carries nothing).
Row = tuple[str, Sample | None, Fault | None]
# Where a good line's counts are, for patching it: (offset just after the colon, offset of the text
# after the counts or the line's length, the exact integer total).
Span = tuple[int, int, int]


@dataclass
class IrqLines:
    """One parse of /proc/interrupts: each IRQ's sample (``by_irq``, held from the previous parse
    when its line is bad), the faults of this parse, the IRQ names; and what the next parse reuses:
    every line after the header (``lines``: raw bytes with their newline, or text when ``raw`` is
    False) with its parse (``rows``), and the label set of each (irq, text after the counts)."""

    header: str = ""
    labels: dict[tuple[str, str], Labels] = field(default_factory=dict)
    by_irq: dict[str, Sample] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    lines: list = field(default_factory=list)
    rows: list[Row | None] = field(default_factory=list)
    raw: bool = False
    spans: list[Span | None] = field(default_factory=list)  # per line when raw, else empty
    # No bad line and no IRQ twice: the next parse may copy by_irq and patch the changed lines.
    simple: bool = False
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


def parse_interrupts(text: str | bytes, snap: Snapshot, where: str, last: IrqLines | None = None
                     ) -> IrqLines:
    """Per IRQ line: the count summed over CPUs, labelled with the line's action names; appends the
    samples to ``snap.counters`` and its faults to ``snap.faults``.

    ``text`` is the file as read (bytes, decoded per line as ASCII with replacement characters) or
    already decoded. Pass the previous read's result as ``last`` and a line that reads the same at
    the same position is not parsed again: a line's text under the same CPU header always parses
    the same way. A bad line holds its IRQ's sample from ``last``.
    Raises SourceUnavailable when the file is empty or has no CPU header."""
    if isinstance(text, str):
        out = _parse_text(text, where, last)
    else:
        out = parse_buffer(text, len(text), where, last)
    snap.counters.extend(out.by_irq.values())
    snap.faults.extend(out.faults)
    return out


def parse_buffer(buf: bytes | bytearray, n: int, where: str, last: IrqLines | None = None) -> IrqLines:
    """``parse_interrupts`` of ``buf[:n]`` (a buffer reused across reads), without the snapshot."""
    with memoryview(buf) as view:
        end = buf.find(b"\n", 0, n)
        stop = n if end < 0 else end
        head = view[:stop].tobytes()
        if not _odd(head):
            ncpu, header = _header(str(head, "ascii", "replace"), where)
            old = last if last is not None and last.raw and last.header == header else None
            scanned = _scan(buf, view, n, stop + 1, ncpu, where, old, _labels(last))
            if scanned is not None:
                lines, rows, spans, changed = scanned
                out = _finish(header, lines, rows, changed, last, _labels(last), raw=True)
                out.spans = spans
                return out
        text = str(view[:n], "ascii", "replace")
    return _parse_text(text, where, last)


def _parse_text(text: str, where: str, last: IrqLines | None) -> IrqLines:
    lines = text.splitlines()
    ncpu, header = _header(lines[0] if lines else "", where)
    del lines[0]
    labels = _labels(last)
    old = last.lines if last is not None and not last.raw and last.header == header else []
    old_rows = last.rows if last is not None else []
    rows: list[Row | None] = []
    changed = []
    for i, line in enumerate(lines):
        if i < len(old) and line == old[i]:
            rows.append(old_rows[i])
            continue
        rows.append(_row(line, ncpu, where, i + 2, labels))
        changed.append(i)
    return _finish(header, lines, rows, changed, last, labels, raw=False)


def _header(header: str, where: str) -> tuple[int, str]:
    words = header.split()
    if not words or not all(w.startswith("CPU") for w in words):
        raise SourceUnavailable(f"{where}: no CPU header (empty or cut file)")
    return len(words), header


def _labels(last: IrqLines | None) -> dict[tuple[str, str], Labels]:
    return last.labels if last is not None and len(last.labels) < _LABELS_MAX else {}


def _odd(raw: bytes) -> bool:
    """A line break to str.splitlines that a kernel never writes (see the module's docstring)."""
    return (b"\r" in raw or b"\x0b" in raw or b"\x0c" in raw or b"\x1c" in raw or b"\x1d" in raw
            or b"\x1e" in raw)


def _scan(buf: bytes | bytearray, view: memoryview, n: int, pos: int, ncpu: int, where: str,
          last: IrqLines | None, labels: dict[tuple[str, str], Labels]
          ) -> tuple[list[bytes], list[Row | None], list[Span | None], list[int]] | None:
    """Every line after the header: the previous parse's line and row where the bytes at the same
    position are the same, a patched or new parse where not. None when a changed line has an odd
    line break."""
    old: list[bytes] = last.lines if last is not None else []
    lines = list(old)
    rows = list(last.rows) if last is not None else []
    spans = list(last.spans) if last is not None and len(last.spans) == len(old) else [None] * len(old)
    changed: list[int] = []
    nold = len(old)
    startswith, find = buf.startswith, buf.find
    i = 0
    while pos < n:
        if i < nold:
            line = old[i]
            if startswith(line, pos, n):  # the same bytes, newline included
                pos += len(line)
                i += 1
                continue
        end = find(b"\n", pos, n)
        stop = n if end < 0 else end
        line = view[pos:stop + 1].tobytes() if end >= 0 else view[pos:n].tobytes() + b"\n"
        if i < nold:
            span = spans[i]
            patched = None
            if span is not None and len(line) == len(old[i]):
                patched = _patch(line, old[i], span)
            if patched is not None:
                total, span = patched
                sample = rows[i][1]  # type: ignore[index]  # a good row: it has a span
                rows[i] = (rows[i][0], Sample(HARDIRQ, sample.labels, float(total)), None)  # type: ignore[index, union-attr]
                lines[i], spans[i] = line, span
                changed.append(i)
                i += 1
                pos = stop + 1
                continue
        if _odd(line):
            return None
        row, span = _parse_line(str(view[pos:stop], "ascii", "replace"), ncpu, where, i + 2, labels)
        if i < nold:
            lines[i], rows[i], spans[i] = line, row, span
        else:
            lines.append(line)
            rows.append(row)
            spans.append(span)
        changed.append(i)
        i += 1
        pos = stop + 1
    del lines[i:], rows[i:], spans[i:]
    return lines, rows, spans, changed


_DIGITS_SPACE = b"0123456789 "


def _patch(new: bytes, old: bytes, span: Span) -> tuple[int, Span] | None:
    """The total of ``new``, a changed line of the same length as ``old`` (a good line), when every
    changed byte lies in count columns that stay whole digit runs between the same spaces; else None
    (the caller parses the line in full, which gives the same answer or the fault)."""
    counts_at, text_at, total = span
    x = int.from_bytes(new, "big") ^ int.from_bytes(old, "big")
    size = len(new)
    first = size - 1 - (x.bit_length() - 1) // 8  # the first and last byte that differ
    last = size - 1 - ((x & -x).bit_length() - 1) // 8
    has_text = text_at < size - 1  # (size - 1: the newline)
    if first < counts_at or last >= text_at - has_text:
        return None  # the IRQ, the text or the blank before the text changed
    start = new.rfind(b" ", counts_at, first) + 1 or counts_at
    end = new.find(b" ", last + 1, text_at)
    if end < 0:
        if has_text:
            return None  # the blank before the text is not a space
        end = text_at  # a line with no text: its counts end it
    was, now = old[start:end], new[start:end]
    if now.translate(None, _DIGITS_SPACE) or was.translate(None, _DIGITS_SPACE):
        return None  # a tab, a sign, a stray byte: the full parse decides
    was_cols, now_cols = was.split(), now.split()
    if len(was_cols) != len(now_cols) or any(len(c) >= 20 for c in now_cols):
        return None  # columns merged or split, or a count too long for the quick sum
    total += sum(map(int, now_cols)) - sum(map(int, was_cols))
    return total, (counts_at, text_at, total)


def _finish(header: str, lines: list, rows: list[Row | None], changed: list[int],
            last: IrqLines | None, labels: dict[tuple[str, str], Labels], raw: bool) -> IrqLines:
    """The parse's samples and faults, from its rows, as a fresh parse builds them."""
    same_lines = (last is not None and last.raw == raw and last.header == header
                  and len(last.rows) == len(rows))
    if same_lines and last.simple and not changed and last.labels is labels:  # type: ignore[union-attr]
        return last  # type: ignore[return-value]  # not one byte changed
    out = IrqLines(header, labels, {}, [], lines, rows, raw)
    if same_lines and last.simple and all(_same_key(last.rows[i], rows[i]) for i in changed):  # type: ignore[union-attr]
        # The same IRQs in the same order, none bad: patch a copy (dict order is insertion order,
        # and a changed count keeps its IRQ's place).
        by_irq = dict(last.by_irq)  # type: ignore[union-attr]
        for i in changed:
            row = rows[i]
            if row is not None:
                by_irq[row[0]] = row[1]  # type: ignore[assignment]
        out.by_irq, out.simple = by_irq, True
        return out
    held = last.by_irq if last is not None else {}
    by_irq, faults = out.by_irq, out.faults
    good = 0
    for row in rows:
        if row is None:
            continue
        irq, sample, fault = row
        if sample is not None:
            by_irq[irq] = sample
            good += 1
            continue
        faults.append(fault)  # type: ignore[arg-type]
        if irq in held and irq not in by_irq:
            by_irq[irq] = held[irq]  # a bad line holds its last count
    out.simple = not faults and good == len(by_irq)
    return out


def _same_key(a: Row | None, b: Row | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[1] is not None and b[1] is not None and a[0] == b[0]


def _row(line: str, ncpu: int, where: str, n: int, labels: dict[tuple[str, str], Labels]) -> Row | None:
    return _parse_line(line, ncpu, where, n, labels)[0]


def _parse_line(line: str, ncpu: int, where: str, n: int, labels: dict[tuple[str, str], Labels]
                ) -> tuple[Row | None, Span | None]:
    """A line's row and, for a good line, where its counts are (for ``_patch``)."""
    if not line or line.isspace():
        return None, None  # carries nothing (copied trees have them): skipped, as node_exporter does
    head, sep, rest = line.partition(":")
    irq = head.strip()
    if not sep or not irq or " " in irq:
        return (irq, None, Fault("truncated line", f"{where}:{n}")), None
    # ERR and MIS (and arm64's Err) carry one node-wide number; every other line one count per
    # CPU, then text (for numbered lines at least the irq chip).
    ncounts = 1 if irq in _SINGLE else ncpu
    parts = rest.split(None, ncounts)
    text = parts.pop() if len(parts) > ncounts else ""
    if len(parts) < ncounts or (not text and irq.isdigit()):
        # Cut short: a partial sum would read as a reset now and a jump on the next full read.
        return (irq, None, Fault("truncated line", f"{where}:{n}")), None
    # Most per-CPU columns are 0 on a big node (IRQ affinity): skip converting those.
    try:
        total = sum_counters([p for p in parts if p != "0"])  # (a comprehension: faster than filter)
    except ValueError:
        return (irq, None, Fault("not a number", f"{where}:{n}")), None
    lbl = labels.get((irq, text))
    if lbl is None:
        lbl = labels[(irq, text)] = labels_of(irq=irq, name=irq_name(irq, text))
    # The text keeps its trailing blanks (split leaves the rest as it was), so it ends the line.
    span = (len(head) + 1, len(line) - len(text), total)
    return (irq, Sample(HARDIRQ, lbl, float(total)), None), span


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
