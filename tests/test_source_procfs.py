"""ProcfsSource on fixture trees: /proc/interrupts (numbered and named lines, ERR/MIS),
/proc/softirqs, the /proc/stat coarse IRQ time, and the bad-input paths."""

from __future__ import annotations

import shutil

import pytest

from conftest import needs_root
from helpers.asuser import run_as_nobody, world_traversable_dir
from helpers.fakenode import FakeNode
from pcietax.sources.base import SourceUnavailable
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
    snap = _source(node).read()
    assert _irq(snap) == {}
    assert [f.what for f in snap.faults] == ["empty file"]
    assert _soft(snap)["net_rx"] == 100  # the other files still flow


def test_softirqs_bad_lines(node):
    text = (node.proc / "softirqs").read_text().splitlines()
    text = [ln if "NET_TX" not in ln else ln.rsplit(" ", 2)[0] for ln in text]  # a CPU short
    text = [ln if "TIMER" not in ln else ln.replace("5", "x", 1) for ln in text]
    node.write_raw("proc/softirqs", "\n".join(text) + "\n")
    snap = _source(node).read()
    soft = _soft(snap)
    assert "net_tx" not in soft and "timer" not in soft and soft["net_rx"] == 100
    assert sorted(f.what for f in snap.faults) == ["not a number", "truncated line"]


def test_stat_garbage_and_missing_cpu_line(node):
    node.write_raw("proc/stat", "cpu  1 2 3 4 5 six 7 0 0 0\nintr 0\n")
    snap = _source(node).read()
    assert _staging(snap) == {}
    assert [f.what for f in snap.faults] == ["garbage cpu line"]
    node.write_raw("proc/stat", "cpu  1 2 3\n")
    assert [f.what for f in _source(node).read().faults] == ["garbage cpu line"]
    node.write_raw("proc/stat", "cpu0 1 2 3 4 5 6 7 0 0 0\nintr 0\n")
    snap = _source(node).read()
    assert [f.what for f in snap.faults] == ["no aggregate cpu line"]
    assert len(_irq(snap)) == 11


def test_each_file_missing_or_unreadable_alone(node):
    src = _source(node)
    (node.proc / "softirqs").unlink()
    node.make_directory_in_place("proc/stat")
    snap = src.read()
    assert len(_irq(snap)) == 11 and _soft(snap) == {} and _staging(snap) == {}
    assert [f.what for f in snap.faults] == ["unreadable", "unreadable"]
    assert any("softirqs" in f.where for f in snap.faults) and any("stat" in f.where for f in snap.faults)


def test_non_ascii_interrupts_is_a_fault(node):
    node.write_raw("proc/interrupts", b"CPU0\n  0: 1 \xff\xfe\n")
    snap = _source(node).read()
    assert [f.what for f in snap.faults] == ["unreadable"] and _soft(snap)


def test_nothing_there_fails_start(tmp_path):
    (tmp_path / "proc").mkdir()
    with pytest.raises(SourceUnavailable, match="no /proc/interrupts"):
        ProcfsSource(procfs=str(tmp_path / "proc")).start()


@needs_root  # drops to nobody: only root can
def test_permission_denied_counts_a_fault_and_the_rest_flows():
    root = world_traversable_dir()
    try:
        node = FakeNode(root)
        _write_all(node)
        (node.proc / "interrupts").chmod(0)
        src = ProcfsSource(procfs=str(node.proc), user_hz=100.0)
        snap = run_as_nobody(lambda: (src.start(), src.read())[1])
        assert _irq(snap) == {}
        assert _soft(snap)["net_rx"] == 100
        assert len(snap.faults) == 1 and "Permission denied" in snap.faults[0].where
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
    # Every line now has too few counts for 5 CPUs: text where a count should be.
    assert not any(irq == "LOC" for irq, _ in _irq(snap))
    assert {f.what for f in snap.faults} == {"not a number"}


def test_a_faulty_line_faults_on_every_read(node):
    src = _source(node)
    _edit_interrupts(node, lambda ls: [*ls, "", "garbage"])
    assert len(src.read().faults) == 2
    assert len(src.read().faults) == 2
