"""Hypothesis fuzzing of every parser of kernel text the host sources own (issue 13 item 10): no
input, however hostile (huge numbers, non-ASCII, cut lines), raises anything but the documented
SourceUnavailable for a broken file; bad lines become faults. Each test is bounded in time."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pcietax.fsread import counter_value, sum_counters
from pcietax.sources.base import Snapshot, SourceUnavailable
from pcietax.sources.netdev import parse_net_dev
from pcietax.sources.pcie import parse_aer
from pcietax.sources.procfs import irq_name, parse_interrupts, parse_softirqs, parse_stat

FUZZ = settings(max_examples=300, deadline=200, suppress_health_check=[HealthCheck.too_slow])

# Text that looks like the kernel's: digits (some of them 400 long), words, colons, newlines,
# odd bytes decoded the way the sources decode them.
_atoms = st.one_of(
    st.from_regex(r"[0-9]{1,3}", fullmatch=True), st.from_regex(r"[0-9]{19,400}", fullmatch=True),
    st.sampled_from(["CPU0", "CPU1", ":", " ", "   ", "\n", "ERR:", "Err:", "MIS:", "IO-APIC", "2-edge",
                     "Level", "cpu ", "cpu0", "|", "eth0:", "-", "N/A", "\ufffd", "\t", "-1", "1e308"]),
    st.text(max_size=8))
kernelish = st.lists(_atoms, max_size=80).map("".join)
HEADERED = st.tuples(st.sampled_from(["           CPU0       CPU1\n", "CPU0\n", ""]), kernelish).map(
    lambda t: t[0] + t[1])


def _ok_or_broken(fn) -> None:
    with contextlib.suppress(SourceUnavailable):  # the documented "broken file" outcome
        fn()


@FUZZ
@given(HEADERED)
def test_parse_interrupts_never_raises(text):
    snap = Snapshot()
    _ok_or_broken(lambda: parse_interrupts(text, snap, "interrupts"))
    for s in snap.counters:
        assert s.value >= 0 and s.value < 2**64 * 1e4


@FUZZ
@given(HEADERED)
def test_parse_interrupts_incremental_never_raises(text):
    snap = Snapshot()
    try:
        last = parse_interrupts("           CPU0       CPU1\n  1:  5  6  IO-APIC 1-edge i8042\n", snap, "x")
        parse_interrupts(text, Snapshot(), "x", last)
    except SourceUnavailable:
        pass


@FUZZ
@given(HEADERED)
def test_parse_softirqs_never_raises(text):
    _ok_or_broken(lambda: parse_softirqs(text, Snapshot(), "softirqs"))


@FUZZ
@given(kernelish)
def test_parse_stat_never_raises(text):
    _ok_or_broken(lambda: parse_stat(text, Snapshot(), "stat", 100.0))


@FUZZ
@given(st.tuples(st.just("Inter-|   Receive\n face |bytes\n"), kernelish).map("".join) | kernelish)
def test_parse_net_dev_never_raises(text):
    _ok_or_broken(lambda: parse_net_dev(text, Snapshot(), "net/dev"))


@FUZZ
@given(kernelish)
def test_parse_aer_raises_only_value_error(text):
    with contextlib.suppress(ValueError):  # the pcie source turns it into a fault
        parse_aer(text)


@FUZZ
@given(st.text(max_size=30), kernelish)
def test_irq_name_never_raises_and_has_no_control_characters(irq, text):
    name = irq_name(irq, text)
    assert not any(ord(c) < 0x20 for c in name)


@FUZZ
@given(st.text(max_size=450))
def test_counter_value_is_a_64_bit_counter_or_value_error(text):
    try:
        v = counter_value(text)
    except ValueError:
        return
    assert 0 <= v < 2**64


@pytest.mark.parametrize("digits", [21, 309, 400, 5000])
def test_counter_value_refuses_long_numbers(digits):
    with pytest.raises(ValueError):
        counter_value("9" * digits)


# -- the incremental parse of /proc/interrupts is a fresh parse --------------------------------

_IRQ_HEADER = b"           CPU0       CPU1\n"
_irq_line = st.one_of(
    st.tuples(st.sampled_from(["0", "8", "120", "121", "LOC", "ERR", "NMI", "x y", ""]),
              st.lists(st.sampled_from(["0", "7", "123", "9" * 20, "18446744073709551616", "3x",
                                        "-1", "\xff"]), min_size=0, max_size=3),
              st.sampled_from(["IO-APIC 2-edge timer", "PCI-MSIX 0-edge mlx5_comp0", "Local timer",
                               "", "dr\xff\xfeiver"]))
    .map(lambda t: f"{t[0]}: {' '.join(t[1])}   {t[2]}".encode("latin-1")),
    st.sampled_from([b"", b"   ", b"garbage", b"\x1f", b" 5:  1  2  IO\x0cAPIC x", b"9: 1\r2 IO y"]))
# Good lines (two CPUs' counts and a text) for the pokes below to tick.
_good_irq_line = st.tuples(st.sampled_from(["0", "8", "120", "LOC", "ERR"]),
                           st.lists(st.integers(0, 10**12), min_size=2, max_size=2),
                           st.sampled_from(["IO-APIC 2-edge timer", "Local timer", ""])).map(
    lambda t: (f"{t[0]:>4}:" + "".join(f" {c:10d}" for c in t[1][:1 if t[0] == "ERR" else 2])
               + (f"  {t[2]}" if t[2] else "")).encode())
# In-place byte edits keep a line's length: what a ticking count does, and what the patch of a
# changed line (interrupts._patch) must get right or hand to the full parse.
_POKE = st.tuples(st.integers(0, 60), st.lists(st.sampled_from(list(b"0123456789" * 4 + b" \t:\r-+x\xff\n")),
                                                min_size=1, max_size=5).map(bytes))
_edit = st.tuples(st.sampled_from(["set", "insert", "delete", "bump", "poke", "tick", "tick"]),
                  st.integers(0, 12), _irq_line, _POKE)


def _apply(lines: list[bytes], edit) -> list[bytes]:
    op, i, line, (at, poke) = edit
    lines = list(lines)
    if op == "poke":  # a few bytes overwritten, the line's length kept
        if lines and lines[i % len(lines)]:
            old = lines[i % len(lines)]
            at %= len(old)
            lines[i % len(lines)] = old[:at] + poke[:len(old) - at] + old[at + len(poke):]
    elif op == "tick":  # a few digits changed to other digits: a count ticking in its column
        if lines and lines[i % len(lines)]:
            old = bytearray(lines[i % len(lines)])
            digits = [k for k, b in enumerate(old) if 48 <= b <= 57]
            for k, p in zip(digits[at % max(1, len(digits)):], poke, strict=False):
                old[k] = 48 + p % 10
            lines[i % len(lines)] = bytes(old)
    elif op == "insert":
        lines.insert(min(i, len(lines)), line)
    elif lines and op == "delete":
        del lines[i % len(lines)]
    elif lines and op == "set":
        lines[i % len(lines)] = line
    elif lines:  # a count that rose by one digit: the line changes length
        lines[i % len(lines)] = lines[i % len(lines)].replace(b" 7 ", b" 17 ", 1)
    return lines


def _fresh(data: bytes, last):
    """The oracle: every line parsed again (nothing reused), the same held values."""
    import dataclasses

    blank = None if last is None else dataclasses.replace(last, lines=[], rows=[], spans=[], simple=False)
    return parse_interrupts(data.decode("ascii", "replace"), Snapshot(), "x", blank)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_good_irq_line | _irq_line, max_size=8),
       st.lists(st.lists(_edit, max_size=3), min_size=1, max_size=5), st.booleans())
def test_incremental_interrupts_parse_is_a_fresh_parse(base, rounds, newline_at_end):
    """Random edits between reads (lines set, inserted, deleted, grown by a digit, bytes or digits
    changed in place; bad counts, cut lines, odd line breaks, non-ASCII): parsing each read against
    the previous parse gives what parsing every line again gives, samples in order, faults and
    held values alike."""
    lines, last = base, None
    for edits in [[], *rounds]:
        for e in edits:
            lines = _apply(lines, e)
        data = _IRQ_HEADER + b"\n".join(lines) + (b"\n" if newline_at_end else b"")
        try:
            want = _fresh(data, last)
        except SourceUnavailable:
            with pytest.raises(SourceUnavailable):
                parse_interrupts(data, Snapshot(), "x", last)
            continue
        snap = Snapshot()
        got = parse_interrupts(data, snap, "x", last)
        assert list(got.by_irq.items()) == list(want.by_irq.items())
        assert got.faults == want.faults and snap.faults == want.faults
        assert snap.counters == list(want.by_irq.values())
        assert got.names() == want.names()
        last = got


@FUZZ
@example(["18446744073709551615", "1"])
@example(["18446744073709551616"])
@example(["9" * 19, "+1"])
@example(["１"])
@example(["1_0"])
@given(st.lists(_atoms.map(str.strip).filter(lambda s: s and not any(c.isspace() for c in s)), max_size=6))
def test_sum_counters_is_the_sum_of_counter_values(fields):
    try:
        want = sum(map(counter_value, fields))
    except ValueError:
        with pytest.raises(ValueError):
            sum_counters(fields)
        return
    assert sum_counters(fields) == want


# A kernel-format file of good lines (as the kernel pads them: "%*d:" then " %10u" per CPU) and
# same-length edits inside it: the case interrupts._patch takes, where a wrong sum would be a
# wrong counter rather than a fault.
_patch_file = st.integers(1, 6).flatmap(lambda ncpu: st.tuples(
    st.just(ncpu),
    st.lists(st.tuples(st.sampled_from(["0", "24", "130", "LOC", "ERR"]),
                       st.lists(st.integers(0, 10**12), min_size=ncpu, max_size=ncpu),
                       st.sampled_from(["  IO-APIC 2-edge timer", "  Local timer interrupts", "  q"])),
             min_size=1, max_size=5),
    # reads, each a few pokes (several columns of a line can change between two reads)
    st.lists(st.lists(st.tuples(st.integers(0, 10**4),
                                st.lists(st.sampled_from(list(b"0123456789" * 6 + b" \t-x\xff")),
                                         min_size=1, max_size=12).map(bytes)),
                      min_size=1, max_size=4),
             min_size=1, max_size=5)))


def _kernel_interrupts(ncpu: int, lines) -> bytes:
    head = b" " * 4 + b"".join(b"       CPU%d" % c for c in range(ncpu)) + b"\n"
    body = b""
    for irq, counts, text in lines:
        n = 1 if irq == "ERR" else ncpu
        body += b"%4s:" % irq.encode() + b"".join(b" %10d" % c for c in counts[:n])
        body += (b"" if irq == "ERR" else text.encode()) + b"\n"
    return head + body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_patch_file)
def test_same_length_edits_of_kernel_lines_parse_as_a_fresh_parse(case):
    """Bytes overwritten in place in a file the kernel's way (mostly digits over digits, some
    blanks, tabs, signs and stray bytes): the incremental parse (patching what it can) gives the
    fresh parse's samples, faults and held values, read after read."""
    import dataclasses

    ncpu, lines, reads = case
    data = bytearray(_kernel_interrupts(ncpu, lines))
    last = parse_interrupts(bytes(data), Snapshot(), "x")
    header_end = data.index(b"\n") + 1
    for pokes in reads:
        for at, poke in pokes:
            at = header_end + at % (len(data) - header_end)
            for k, b in enumerate(poke[: len(data) - at]):
                if data[at + k] != 10:  # keep the line breaks: a same-length edit of a line
                    data[at + k] = b
        blank = dataclasses.replace(last, lines=[], rows=[], spans=[], simple=False)
        want = parse_interrupts(bytes(data).decode("ascii", "replace"), Snapshot(), "x", blank)
        got = parse_interrupts(bytes(data), Snapshot(), "x", last)
        assert list(got.by_irq.items()) == list(want.by_irq.items())
        assert got.faults == want.faults
        last = got
