"""Layouts found by the recount against upstream test data (bench/upstream_recount.py: the fixture
trees of prometheus/node_exporter and prometheus/procfs), each written here by hand in the
kernel's column format, so the fix stays pinned without vendoring the upstream trees."""

from __future__ import annotations

from pathlib import Path

from pcietax.sources.procfs import HARDIRQ, ProcfsSource

SOFTIRQS = """\
                    CPU0       CPU1
          HI:          7          1
      NET_RX:      43066     104508
"""
STAT = "cpu  301854 612 111922 8979004 3552 2 3944 0 0 0\ncpu0 150927 306 55961 4489502 1776 1 1972 0 0 0\n"


def _tree(tmp_path: Path, interrupts: str) -> ProcfsSource:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "interrupts").write_text(interrupts)
    (proc / "softirqs").write_text(SOFTIRQS)
    (proc / "stat").write_text(STAT)
    src = ProcfsSource(str(proc), user_hz=100)
    src.start()
    return src


def _irqs(snap) -> dict[str, tuple[str, float]]:
    return {dict(s.labels)["irq"]: (dict(s.labels)["name"], s.value) for s in snap.counters
            if s.family == HARDIRQ}


# x86 (4.x+: chip, hwirq-flow, actions), as in prometheus/procfs's fixture: an empty line between
# the single-number MIS line and the posted-interrupt lines. node_exporter reads past it; it
# carries no count, so it must not be a fault on every read (source_errors_total would climb).
X86_WITH_BLANK_LINE = """\
           CPU0       CPU1       CPU2       CPU3
  0:         49          0          0          0   IO-APIC   2-edge      timer
  1:          0          0          0          9   IO-APIC   1-edge      i8042
NMI:          0          0          0          0   Non-maskable interrupts
ERR:          0
MIS:          0

PIN:          0          0          0          0   Posted-interrupt notification event
NPI:          0          0          0          0   Nested posted-interrupt event
PIW:          0          0          0          0   Posted-interrupt wakeup event
"""


def test_blank_line_in_interrupts_is_not_a_fault_and_lines_after_it_count(tmp_path):
    snap = _tree(tmp_path, X86_WITH_BLANK_LINE).read()
    assert snap.faults == []
    irqs = _irqs(snap)
    assert set(irqs) == {"0", "1", "NMI", "ERR", "MIS", "PIN", "NPI", "PIW"}
    assert irqs["0"] == ("timer", 49.0) and irqs["1"] == ("i8042", 9.0)
    assert irqs["PIN"] == ("Posted-interrupt notification event", 0.0)


# arm64 (GICv3/ITS), as in node_exporter's interrupts_aarch64 fixture: a 10-digit IPI count glued
# to the colon (node_exporter issue 2557: its 1.5 parser fails the whole file on it), the
# single-number Err line, and a last line of spaces only.
ARM64_GLUED_AND_TRAILING_SPACES = (
    "           CPU0       CPU1\n"
    " 10: 3287008667 3310445093     GICv3  27 Level     arch_timer\n"
    " 63:         50 1997799253   ITS-MSI 81926 Edge      eth0-Tx-Rx-5\n"
    "IPI0:2768808080 2844211768       Rescheduling interrupts\n"
    "IPI1: 357815098  213258177       Function call interrupts\n"
    "Err:          0\n"
    "                                                                              \n"
)


def test_arm64_glued_count_and_trailing_blank_line(tmp_path):
    snap = _tree(tmp_path, ARM64_GLUED_AND_TRAILING_SPACES).read()
    assert snap.faults == []
    irqs = _irqs(snap)
    assert irqs["IPI0"] == ("Rescheduling interrupts", 2768808080.0 + 2844211768.0)
    assert irqs["10"] == ("arch_timer", 3287008667.0 + 3310445093.0)
    assert irqs["63"] == ("eth0-Tx-Rx-5", 50.0 + 1997799253.0)
    assert irqs["Err"] == ("Err", 0.0)


def test_a_line_of_text_is_still_a_fault(tmp_path):
    """Only whitespace is skipped quietly: a cut or garbage line stays a fault."""
    snap = _tree(tmp_path, X86_WITH_BLANK_LINE + "  2:         \n").read()
    assert [f.what for f in snap.faults] == ["truncated line"]


# --- the recount's ttar extractor (bench/upstream_recount.py) ------------------------------------


def _recount():
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import upstream_recount

    return upstream_recount


def test_ttar_extract_reads_procfs_archive_format(tmp_path):
    """prometheus/procfs's ttar: directories, files of N lines, a last line without newline marked
    EOF, NUL bytes written NULLBYTE (escaped with a backslash when literal), symlinks, modes."""
    archive = (
        "# Archive created by ttar -c -f fixtures.ttar fixtures\n"
        "Directory: fixtures/sys/class/net/eth0\nMode: 755\n"
        "# ttar - - - -\n"
        "Path: fixtures/sys/class/net/eth0/mtu\nLines: 1\n1500\nMode: 644\n"
        "# ttar - - - -\n"
        "Path: fixtures/sys/class/net/eth0/ifalias\nLines: 1\nuplinkEOF\nMode: 644\n"
        "Path: fixtures/proc/26231/cmdline\nLines: 1\n"
        "vimNULLBYTEtest.goNULLBYTE\\NULLBYTE\\EOFEOF\nMode: 644\n"
        "Path: fixtures/sys/class/net/eth0/device\nSymlinkTo: ../../../devices/pci0000:00/0000:00:1f.6\n"
    )
    root = tmp_path / "t"
    assert _recount().ttar_extract(archive, root) == 5
    net = root / "fixtures/sys/class/net/eth0"
    assert (net / "mtu").read_text() == "1500\n"
    assert (net / "ifalias").read_text() == "uplink"
    assert (root / "fixtures/proc/26231/cmdline").read_bytes() == b"vim\x00test.go\x00NULLBYTEEOF"
    assert str((net / "device").readlink()) == "../../../devices/pci0000:00/0000:00:1f.6"


def test_ttar_extract_refuses_paths_outside_the_tree_and_unknown_keywords(tmp_path):
    import pytest

    rc = _recount()
    with pytest.raises(ValueError, match="outside"):
        rc.ttar_extract("Path: ../escape\nLines: 1\nx\n", tmp_path / "t")
    assert not (tmp_path / "escape").exists()
    with pytest.raises(ValueError, match="unknown keyword"):
        rc.ttar_extract("Garbage: here\n", tmp_path / "u")
