"""ProcfsSource on fixture trees: /proc/interrupts (numbered and named lines, ERR/MIS),
/proc/softirqs, the /proc/stat coarse IRQ time, and the bad-input paths."""

from __future__ import annotations

import shutil

import pytest

from conftest import needs_root
from helpers.asuser import run_as_nobody, world_traversable_dir
from helpers.fakenode import FakeNode
from pcietax.engine import Engine
from pcietax.model import TaxModel
from pcietax.sources.base import SourceAbsent, SourceUnavailable
from pcietax.sources.procfs import HARDIRQ, SOFTIRQ, STAGING, ProcfsSource

# A realistic 4-CPU /proc/interrupts: IO-APIC lines, MSI-X lines of a NIC, a line with no action,
# per-CPU named lines, and the single-number ERR/MIS lines (format of kernel 6.x on x86).
INTERRUPTS = [
    ("0", [22, 0, 0, 0], "IO-APIC   2-edge      timer"),
    ("8", [0, 1, 0, 0], "IO-APIC   8-edge      rtc0"),
    ("9", [0, 0, 0, 0], "IO-APIC   9-fasteoi   acpi"),
    ("120", [100, 200, 300, 400], "PCI-MSIX-0000:5e:00.0   0-edge      mlx5_comp0@pci:0000:5e:00.0"),
    ("121", [1, 2, 3, 4], "PCI-MSIX-0000:5e:00.0   1-edge      mlx5_comp1@pci:0000:5e:00.0"),
    ("130", [7, 0, 0, 0], "IR-PCI-MSI-0000:00:17.0   0-edge      ahci[0000:00:17.0], nvme0q0"),
    ("NMI", [5, 6, 7, 8], "Non-maskable interrupts"),
    ("LOC", [1000, 2000, 3000, 4000], "Local timer interrupts"),
    ("TLB", [9, 9, 9, 9], "TLB shootdowns"),
]


def _irq(snap) -> dict[tuple[str, str], float]:
    return {(dict(s.labels)["irq"], dict(s.labels)["name"]): s.value for s in snap.counters
            if s.family == HARDIRQ}


def _soft(snap) -> dict[str, float]:
    return {dict(s.labels)["vector"]: s.value for s in snap.counters if s.family == SOFTIRQ}


def _staging(snap) -> dict[str, float]:
    return {dict(s.labels)["kind"]: s.value for s in snap.counters if s.family == STAGING}


def _write_all(node: FakeNode) -> None:
    node.write_interrupts(INTERRUPTS)
    with open(node.proc / "interrupts", "a") as f:
        f.write("ERR:          3\nMIS:          0\n")
    node.write_softirqs({"NET_RX": [10, 20, 30, 40], "NET_TX": [1, 1, 1, 1], "TIMER": [5, 5, 5, 5]})
    node.write_stat(irq_ticks=[100, 200, 300, 400], softirq_ticks=[50, 50, 50, 50])


@pytest.fixture
def node(fake_node):
    _write_all(fake_node)
    return fake_node


def _source(node, user_hz: float = 100.0) -> ProcfsSource:
    src = ProcfsSource(procfs=str(node.proc), user_hz=user_hz)
    src.start()
    return src


def test_interrupts_summed_with_names(node):
    snap = _source(node).read()
    assert snap.faults == []
    assert _irq(snap) == {
        ("0", "timer"): 22,
        ("8", "rtc0"): 1,
        ("9", "acpi"): 0,
        ("120", "mlx5_comp0@pci:0000:5e:00.0"): 1000,
        ("121", "mlx5_comp1@pci:0000:5e:00.0"): 10,
        ("130", "ahci[0000:00:17.0], nvme0q0"): 7,
        ("NMI", "Non-maskable interrupts"): 26,
        ("LOC", "Local timer interrupts"): 10_000,
        ("TLB", "TLB shootdowns"): 36,
        ("ERR", "ERR"): 3,
        ("MIS", "MIS"): 0,
    }


def test_softirqs_and_coarse_stat(node):
    snap = _source(node, user_hz=100.0).read()
    soft = _soft(snap)
    assert soft["net_rx"] == 100 and soft["net_tx"] == 4 and soft["timer"] == 20 and soft["rcu"] == 0
    assert len(soft) == 10
    # /proc/stat columns 6 and 7 of the aggregate cpu line, in USER_HZ ticks.
    assert _staging(snap) == {"irq_coarse": 10.0, "softirq_coarse": 2.0}
    assert snap.provides == {HARDIRQ, SOFTIRQ, STAGING}


def test_user_hz_is_respected(node):
    assert _staging(_source(node, user_hz=250.0).read()) == {"irq_coarse": 4.0, "softirq_coarse": 0.8}


def _edit_interrupts(node, fn) -> None:
    lines = (node.proc / "interrupts").read_text().splitlines()
    node.write_raw("proc/interrupts", "\n".join(fn(lines)) + "\n")


def test_truncated_numbered_line_is_skipped(node):
    # The file was cut in the middle of IRQ 121's per-CPU counts.
    _edit_interrupts(node, lambda ls: [ln if not ln.lstrip().startswith("121:") else ln[:30] for ln in ls])
    snap = _source(node).read()
    got = _irq(snap)
    assert not any(irq == "121" for irq, _ in got)
    assert got[("120", "mlx5_comp0@pci:0000:5e:00.0")] == 1000 and len(got) == 10
    assert [f.what for f in snap.faults] == ["truncated line"]
    assert snap.faults[0].where.endswith("interrupts:6")


def test_truncated_named_line_is_skipped_not_undercounted(node):
    """A named line cut after two of four CPUs must not be reported as the sum of two CPUs: the next
    full read would look like a jump, the one before like a reset."""
    _edit_interrupts(node, lambda ls: [ln if not ln.lstrip().startswith("LOC:") else ln[:27] for ln in ls])
    snap = _source(node).read()
    got = _irq(snap)
    assert not any(irq == "LOC" for irq, _ in got)
    assert len(got) == 10
    assert [f.what for f in snap.faults] == ["truncated line"]


def test_garbage_count_is_a_fault(node):
    _edit_interrupts(node, lambda ls: [ln.replace(" 300 ", " 3x0 ") if "mlx5_comp0" in ln else ln
                                       for ln in ls])
    snap = _source(node).read()
    assert not any(irq == "120" for irq, _ in _irq(snap))
    assert [f.what for f in snap.faults] == ["not a number"]


def test_line_without_colon_and_empty_file(node):
    _edit_interrupts(node, lambda ls: [*ls, "this is not an interrupt line"])
    snap = _source(node).read()
    assert len(_irq(snap)) == 11
    assert [f.what for f in snap.faults] == ["truncated line"]
    node.write_raw("proc/interrupts", "")
    with pytest.raises(SourceUnavailable, match="no CPU header"):
        _source(node).read()


@pytest.mark.parametrize("broken", [
    ("interrupts", ""), ("interrupts", "garbage\n"), ("softirqs", ""), ("stat", "intr 0\n"),
    ("stat", "cpu  1 2 3\n"), ("interrupts", None), ("softirqs", None), ("stat", None)])
def test_a_broken_file_holds_every_series_and_marks_the_source_down(node, broken):
    """Issue 13 item 6: a broken /proc/interrupts, softirqs or stat (empty, cut before its header,
    a directory where the file was) must not drop 1,002 hardirq series while procfs reads up:
    the read fails, the engine holds the last counters and reports procfs down."""
    name, content = broken
    eng = Engine([_source(node)], TaxModel())
    try:
        before = eng.collect()
        assert before.status["procfs"].up
        if content is None:
            node.make_directory_in_place(f"proc/{name}")
        else:
            node.write_raw(f"proc/{name}", content)
        f = eng.collect()
        assert not f.status["procfs"].up and name in f.status["procfs"].reason
        assert f.counters == before.counters
    finally:
        eng.close()


def test_softirqs_bad_lines(node):
    text = (node.proc / "softirqs").read_text().splitlines()
    text = [ln if "NET_TX" not in ln else ln.rsplit(" ", 2)[0] for ln in text]  # a CPU short
    text = [ln if "TIMER" not in ln else ln.replace("5", "x", 1) for ln in text]
    node.write_raw("proc/softirqs", "\n".join(text) + "\n")
    snap = _source(node).read()
    soft = _soft(snap)
    assert "net_tx" not in soft and "timer" not in soft and soft["net_rx"] == 100
    assert sorted(f.what for f in snap.faults) == ["not a number", "truncated line"]


def test_non_ascii_action_name_is_kept_not_a_fault(node):
    """A driver's action name with bytes that are not ASCII: the line still counts, the name
    carries replacement characters, nothing else is lost (it used to fail the whole file)."""
    node.write_raw("proc/interrupts",
                   b"           CPU0\n  5:          1   IO-APIC   5-edge   dr\xff\xfeiver\n")
    snap = _source(node).read()
    assert snap.faults == []
    assert _irq(snap) == {("5", "dr\ufffd\ufffdiver"): 1}


def test_nothing_there_fails_start(tmp_path):
    (tmp_path / "proc").mkdir()
    with pytest.raises(SourceAbsent, match="no /proc/interrupts"):
        ProcfsSource(procfs=str(tmp_path / "proc")).start()


@needs_root  # drops to nobody: only root can
def test_permission_denied_is_down_with_its_reason():
    root = world_traversable_dir()
    try:
        node = FakeNode(root)
        _write_all(node)
        (node.proc / "interrupts").chmod(0)
        src = ProcfsSource(procfs=str(node.proc), user_hz=100.0)

        def read_as_user() -> str:
            src.start()
            try:
                src.read()
            except SourceUnavailable as e:
                return str(e)
            return "read"

        assert "Permission denied" in run_as_nobody(read_as_user)
    finally:
        shutil.rmtree(root)


def test_unchanged_lines_reuse_their_sample_changed_lines_are_parsed(node):
    src = _source(node)
    first = {(dict(s.labels)["irq"]): s for s in src.read().counters if s.family == HARDIRQ}
    _edit_interrupts(node, lambda ls: [ln.replace(" 400   PCI", " 401   PCI") for ln in ls])
    second = {(dict(s.labels)["irq"]): s for s in src.read().counters if s.family == HARDIRQ}
    assert second["120"].value == 1001 and first["120"].value == 1000
    assert second["LOC"] is first["LOC"]  # the same object: not parsed again
    # A new CPU header (CPU hotplug) invalidates everything, even lines that read the same.
    text = (node.proc / "interrupts").read_text().splitlines()
    node.write_raw("proc/interrupts", "\n".join([text[0] + "       CPU4", *text[1:]]) + "\n")
    snap = src.read()
    # Every line now has too few counts for 5 CPUs: text where a count should be. Each is a fault
    # and its IRQ keeps its last count (held, not dropped).
    assert _irq(snap)[("LOC", "Local timer interrupts")] == first["LOC"].value
    assert {f.what for f in snap.faults} == {"not a number"}


def test_a_ticking_count_is_patched_and_matches_a_fresh_parse(monkeypatch):
    """Counts that change in place (same line length: the usual second on a big node) are patched
    from the old total; counts that change width, columns that merge, a count that overflows 64
    bits or a sign where a digit was go through the full parse. Each read is checked against a
    parse of the same bytes with nothing to reuse."""
    import dataclasses

    from pcietax.sources import interrupts
    from pcietax.sources.base import Snapshot

    header = b" " * 11 + b"".join(b"CPU%-8d" % c for c in range(4)) + b"\n"

    def line(irq: bytes, counts: list[bytes], text: bytes = b"  PCI-MSIX-0000:5e:00.0 0-edge q0") -> bytes:
        return b"%4s:" % irq + b"".join(b" %10s" % c for c in counts) + text + b"\n"

    # (counts, what the patch said for the two changed lines: True patched, False handed over)
    steps = [
        ([b"1", b"2", b"3", b"4"], []),
        ([b"9", b"2", b"3", b"4"], [True, True]),  # one column ticked
        ([b"9", b"2", b"3", b"12345"], [True, True]),  # the last column, up to the blank before the text
        ([b"10", b"2", b"3", b"12345"], [True, True]),  # a wider number in the same column width
        ([b"10", b"5", b"7", b"12345"], [True, True]),  # two columns at once
        ([b"10", b"2", b"3", b"12345"], [True, True]),
        ([b"10", b"2", b"3", b"18446744073709551615"], []),  # a wider line: parsed in full
        ([b"10", b"2", b"3", b"18446744073709551616"], [False, False]),  # 2**64: a fault, the IRQ holds
        ([b"10", b"-2", b"3", b"12"], []),  # a sign: a fault
        ([b"10", b"2", b"3", b"12"], []),  # after a fault: parsed in full
    ]
    said: list[bool] = []
    real_patch = interrupts._patch

    def spy(new, old, span):
        got = real_patch(new, old, span)
        said.append(got is not None)
        return got

    last = None
    monkeypatch.setattr(interrupts, "_patch", spy)
    for counts, want_said in steps:
        data = header + line(b"120", counts) + line(b"ERR", [b"0"], b"") + line(b"LOC", counts, b"  Local")
        # The oracle: the same bytes as text, nothing to reuse, the same held values.
        blank = None if last is None else dataclasses.replace(last, lines=[], rows=[], spans=[], simple=False)
        fresh = interrupts.parse_interrupts(data.decode(), Snapshot(), "x", blank)
        said.clear()
        got = interrupts.parse_interrupts(data, Snapshot(), "x", last)
        assert said == want_said, counts
        assert list(got.by_irq.items()) == list(fresh.by_irq.items()), counts
        assert got.faults == fresh.faults, counts
        last = got
    assert last is not None and last.by_irq["120"].value == 10 + 2 + 3 + 12
    # Two columns merged into one by a digit where the blank between them was (same length): the
    # text's first word is now a count, which the full parse calls a fault; the IRQ holds.
    parse = interrupts.parse_interrupts
    tight = parse(header + b" 120: 1 2 3 4  PCI-MSIX 0-edge q\n", Snapshot(), "x")
    said.clear()
    merged = parse(header + b" 120: 1 223 4  PCI-MSIX 0-edge q\n", Snapshot(), "x", tight)
    assert said == [False]
    assert [f.what for f in merged.faults] == ["not a number"] and merged.by_irq["120"].value == 10


def test_a_faulty_line_faults_on_every_read(node):
    src = _source(node)
    # (a blank line is not a fault: it carries nothing, see test_upstream_layouts.py)
    _edit_interrupts(node, lambda ls: [*ls, " 77:", "garbage"])
    assert len(src.read().faults) == 2
    assert len(src.read().faults) == 2


# -- other kernels' layouts, written here byte for byte as those kernels print them -------------

# x86, kernels before 4.x: no hwirq column, the flow handler glued to the chip name, and a line
# with two actions on one IRQ. node_exporter reads info="IR-IO-APIC-fasteoi",
# devices="ehci_hcd:usb1, mmc0"; the name is the devices.
# The kernel pads every CPU column, the last one too (trailing spaces are part of the format).
HEADER2 = " " * 11 + "CPU0       CPU1       \n"
OLD_X86 = HEADER2 + """\
  0:         41          0   IO-APIC-edge      timer
  1:          8          0   IO-APIC-edge      i8042
  9:          0          0   IO-APIC-fasteoi   acpi
 16:        539          7   IR-IO-APIC-fasteoi   ehci_hcd:usb1, mmc0
 40:          0          0   DMAR_MSI-edge      dmar0
 45:     123456          0   PCI-MSI-edge      eth0-TxRx-0
NMI:          0          0   Non-maskable interrupts
LOC:      12345      23456   Local timer interrupts
ERR:          0
MIS:          0
"""

# arm64 (Grace/GH200: GICv3 and ITS, CONFIG_GENERIC_IRQ_SHOW_LEVEL): chip, hwirq, then the trigger
# word Level/Edge before the actions, per-CPU IPI lines and a single-number Err line.
ARM64 = HEADER2 + """\
 11:      34567      34890     GICv3  27 Level     arch_timer
 14:          0          0     GICv3  37 Level     ttyAMA0
 50:        120          0   ITS-MSI 524288 Edge      nvme0q0
 51:       8000          1   ITS-MSI 1048576 Edge      mlx5_comp0@pci:0000:01:00.0
IPI0:      1234       5678       Rescheduling interrupts
IPI1:        90         80       Function call interrupts
Err:          0
"""


def test_old_x86_kernel_names_keep_every_action(node):
    node.write_raw("proc/interrupts", OLD_X86)
    snap = _source(node).read()
    assert snap.faults == []
    assert _irq(snap) == {
        ("0", "timer"): 41, ("1", "i8042"): 8, ("9", "acpi"): 0, ("16", "ehci_hcd:usb1, mmc0"): 546,
        ("40", "dmar0"): 0, ("45", "eth0-TxRx-0"): 123456, ("NMI", "Non-maskable interrupts"): 0,
        ("LOC", "Local timer interrupts"): 35801, ("ERR", "ERR"): 0, ("MIS", "MIS"): 0}


def test_arm64_names_drop_the_trigger_word_and_err_is_not_a_fault(node):
    node.write_raw("proc/interrupts", ARM64)
    snap = _source(node).read()
    assert snap.faults == []
    assert _irq(snap) == {
        ("11", "arch_timer"): 69457, ("14", "ttyAMA0"): 0, ("50", "nvme0q0"): 120,
        ("51", "mlx5_comp0@pci:0000:01:00.0"): 8001, ("IPI0", "Rescheduling interrupts"): 6912,
        ("IPI1", "Function call interrupts"): 170, ("Err", "Err"): 0}


def test_nic_irq_lookup_by_interface_tag(node):
    """The shared parse answers "which IRQ lines carry eth0" by lookup (eth0-TxRx-0 matches eth0)."""
    from pcietax.sources.procfs import read_interrupts

    node.write_raw("proc/interrupts", OLD_X86)
    lines = read_interrupts(node.proc, max_age=0)
    assert lines.irqs_tagged({"eth0"}) == {"45"}
    assert lines.irqs_tagged({"mmc0", "ehci_hcd:usb1"}) == {"16"}
    assert lines.irqs_tagged({"eth1"}) == set()
    assert lines.names()["16"] == "ehci_hcd:usb1, mmc0"


def test_a_400_digit_count_skips_the_line_not_the_source(node):
    """Fuzzing found OverflowError escaping the parser on a 400-digit count: now that line is a
    fault (held at its last count) and every other line flows."""
    src = _source(node)
    src.read()
    _edit_interrupts(node, lambda ls: [ln.replace(" 400   PCI", " " + "9" * 400 + "   PCI") for ln in ls])
    snap = src.read()
    assert [f.what for f in snap.faults] == ["not a number"]
    assert _irq(snap)[("120", "mlx5_comp0@pci:0000:5e:00.0")] == 1000


# -- the line-by-line reuse of the previous parse (issue 13 item 14) ---------------------------


def _by_irq(node):
    from pcietax.sources.procfs import read_interrupts

    return read_interrupts(node.proc, max_age=0)


def test_an_unchanged_file_reuses_the_whole_parse(node):
    first = _by_irq(node)
    assert _by_irq(node) is first  # not one line decoded or parsed again


def test_a_changed_line_is_parsed_again_and_only_it(node):
    first = _by_irq(node)
    _edit_interrupts(node, lambda ls: [ln.replace(" 400   PCI", " 401   PCI") for ln in ls])
    second = _by_irq(node)
    assert second is not first
    assert second.by_irq["120"].value == 1001 and first.by_irq["120"].value == 1000
    assert second.by_irq["LOC"] is first.by_irq["LOC"]
    assert list(second.by_irq) == list(first.by_irq)  # every IRQ keeps its place


def test_a_line_that_changes_length_does_not_shift_the_lines_after_it(node):
    first = _by_irq(node)
    _edit_interrupts(node, lambda ls: [ln.replace(" 400   PCI", " 4000000000   PCI") for ln in ls])
    second = _by_irq(node)
    assert second.by_irq["120"].value == 1000 - 400 + 4_000_000_000
    for irq in ("121", "130", "NMI", "LOC", "TLB", "ERR", "MIS"):
        assert second.by_irq[irq] is first.by_irq[irq], irq  # found again at their new offsets
    assert second.faults == []


def test_a_file_that_grows_and_shrinks(node):
    first = _by_irq(node)
    _edit_interrupts(node, lambda ls: [*ls[:3], " 77:   5   6   7   8   IO-APIC 7-edge parport0", *ls[3:]])
    grown = _by_irq(node)
    assert grown.by_irq["77"].value == 26 and len(grown.by_irq) == len(first.by_irq) + 1
    assert grown.by_irq["LOC"].value == first.by_irq["LOC"].value
    _edit_interrupts(node, lambda ls: ls[:4])  # cut after IRQ 77: the rest is gone, not held
    shrunk = _by_irq(node)
    assert set(shrunk.by_irq) == {"0", "8", "77"} and shrunk.faults == []
    assert _by_irq(node) is shrunk


def test_a_line_gone_bad_holds_its_count_on_every_read(node):
    first = _by_irq(node)
    _edit_interrupts(node, lambda ls: [ln.replace(" 300 ", " 3x0 ") if "mlx5_comp0" in ln else ln
                                       for ln in ls])
    for _ in range(3):  # the file no longer changes: the bad line is still a fault, still held
        bad = _by_irq(node)
        assert [f.what for f in bad.faults] == ["not a number"]
        assert bad.by_irq["120"] is first.by_irq["120"]
        assert list(bad.by_irq) == list(first.by_irq)


def test_an_odd_line_break_in_a_changed_line_splits_as_the_text_did(node):
    """\\f is a line break to str.splitlines, not to a byte scan: the line numbers of later faults
    and the split lines must be what parsing the decoded text gives."""
    from pcietax.sources.base import Snapshot
    from pcietax.sources.procfs import parse_interrupts

    _by_irq(node)
    _edit_interrupts(node, lambda ls: [ln.replace("timer", "ti\x0cmer") for ln in ls] + ["junk"])
    got = _by_irq(node)
    want = parse_interrupts((node.proc / "interrupts").read_text(), Snapshot(), str(node.proc / "interrupts"))
    assert got.by_irq == want.by_irq and got.faults == want.faults
    # "mer" (IRQ 0), "mer interrupts" (LOC) and "junk": lines of their own, with their own numbers
    assert [f.what for f in got.faults] == ["truncated line"] * 3
    assert got.faults[-1].where.endswith(":15") and got.by_irq["LOC"].value == 10_000


def test_read_cap_is_exact_and_the_buffer_is_reused(tmp_path):
    from pcietax.fsread import FileTooLarge, read_bytes, read_into

    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    buf = bytearray()
    assert read_into(p, buf, limit=100) == 100 and bytes(buf[:100]) == b"x" * 100
    assert read_bytes(p, limit=100) == b"x" * 100
    p.write_bytes(b"y" * 10)  # a shorter file into the same buffer: only its length counts
    assert read_into(p, buf, limit=100) == 10 and bytes(buf[:10]) == b"y" * 10
    p.write_bytes(b"z" * 101)
    with pytest.raises(FileTooLarge):
        read_into(p, buf, limit=100)
    with pytest.raises(FileTooLarge):
        read_bytes(p, limit=100)
    with pytest.raises(IsADirectoryError) as e:  # named, as open() named it
        read_bytes(tmp_path)
    assert e.value.filename == str(tmp_path)


def test_a_huge_interrupts_file_is_refused_and_not_kept(node):
    from pcietax.fsread import PROCFS_MAX
    from pcietax.sources import procfs

    _by_irq(node)
    with open(node.proc / "interrupts", "ab") as f:
        f.truncate(PROCFS_MAX + 1)
    with pytest.raises(SourceUnavailable, match="larger than"):
        _source(node).read()
    assert len(procfs._CACHE[str(node.proc / "interrupts")].buf) == 0


def test_a_bad_line_after_a_good_one_of_the_same_irq_does_not_hold_over_it(node):
    """The held value is for an IRQ whose line is bad this read: one that also has a good line
    this read (a file with an IRQ twice) keeps this read's count."""
    from pcietax.sources.base import Snapshot
    from pcietax.sources.procfs import parse_interrupts

    head = b"           CPU0       CPU1\n"
    first = parse_interrupts(head + b"  5:  1  2  IO-APIC 5-edge x\n", Snapshot(), "x")
    for _ in range(2):  # a fresh parse of the lines, then their reuse
        first = parse_interrupts(head + b"  5:  3  4  IO-APIC 5-edge x\n  5:  3y  IO-APIC 5-edge x\n",
                                 Snapshot(), "x", first)
        assert first.by_irq["5"].value == 7 and [f.what for f in first.faults] == ["not a number"]


def test_softirq_lines_that_read_the_same_give_the_same_sample():
    """A line that reads as it did (under as many CPUs) gives last read's very Sample; a changed
    line is parsed; the same text under a new CPU header is parsed (and is now short: a fault)."""
    from pcietax.sources.base import Snapshot
    from pcietax.sources.procfs import parse_softirqs

    head2 = "                    CPU0       CPU1\n"
    text = head2 + "          HI:          1          2\n      NET_RX:         10         20\n"
    seen: dict = {}
    first = parse_softirqs(text, Snapshot(), "x", None, seen)
    second = parse_softirqs(text.replace("20\n", "21\n"), Snapshot(), "x", first, seen)
    assert second["hi"] is first["hi"] and second["net_rx"].value == 31
    fresh = parse_softirqs(text.replace("20\n", "21\n"), Snapshot(), "x")
    assert second == fresh
    head3 = head2.rstrip("\n") + "       CPU2\n"
    snap = Snapshot()
    third = parse_softirqs(head3 + text[len(head2):], snap, "x", second, seen)
    assert [f.what for f in snap.faults] == ["truncated line", "truncated line"]
    assert third["hi"] is second["hi"] and third["net_rx"].value == 31  # held, as a bad line is
