"""PcieSource on fixture trees: link state of GPUs and NICs, the usable ceiling (pcie_math with the
MPS read from config space when readable), AER replay and correctable counters, bad input."""

from __future__ import annotations

import pytest

from helpers.fakenode import pcie_config_space
from pcietax.pcie_math import ceiling
from pcietax.sources.base import SourceAbsent, SourceUnavailable
from pcietax.sources.pcie import CEILING, CORRECTABLE, REPLAY, SPEED, WIDTH, PcieSource

GPU, NIC = "0000:1b:00.0", "0000:5e:00.0"


def _gauges(snap, family: str) -> dict[tuple, float]:
    return {tuple(v for _, v in s.labels): s.value for s in snap.gauges if s.family == family}


def _counters(snap, family: str) -> dict[str, float]:
    return {dict(s.labels)["pci_bus_id"]: s.value for s in snap.counters if s.family == family}


@pytest.fixture
def node(fake_node):
    sw = fake_node.add_pci("0000:00:01.0", 0x060400)  # a bridge: not a GPU or NIC, not reported
    fake_node.add_pci(GPU, 0x030200, sw, vendor=0x10DE, link=("16.0 GT/s PCIe", 8, "32.0 GT/s PCIe", 16),
                      config=pcie_config_space(512),
                      aer_correctable={"RxErr": 2, "Rollover": 3, "Timeout": 4})
    fake_node.add_pci(NIC, 0x020000, sw, link=("32.0 GT/s PCIe", 16, "32.0 GT/s PCIe", 16),
                      config=pcie_config_space(512, length=64))
    fake_node.add_pci("0000:00:1f.2", 0x010601)  # SATA controller: ignored
    return fake_node


def _source(node) -> PcieSource:
    src = PcieSource(sysfs=str(node.sys))
    src.start()
    return src


def test_link_state(node):
    snap = _source(node).read()
    assert snap.faults == []
    # labels sort as device_kind, pci_bus_id, state
    assert _gauges(snap, SPEED) == {
        ("gpu", GPU, "current"): 16.0, ("gpu", GPU, "max"): 32.0,
        ("nic", NIC, "current"): 32.0, ("nic", NIC, "max"): 32.0,
    }
    assert _gauges(snap, WIDTH) == {
        ("gpu", GPU, "current"): 8, ("gpu", GPU, "max"): 16,
        ("nic", NIC, "current"): 16, ("nic", NIC, "max"): 16,
    }


def test_ceiling_uses_mps_from_config_space_when_readable(node):
    got = _gauges(_source(node).read(), CEILING)
    # GPU: 256 readable bytes programme MPS 512 -> Gen4 x8 at 512 B.
    assert got[("gpu", GPU)] == pytest.approx(ceiling(4, 8, 512).usable_bytes_per_second)
    # NIC: only the 64-byte header is readable (unprivileged view) -> the default 256 B, not 512.
    assert got[("nic", NIC)] == pytest.approx(ceiling(5, 16, 256).usable_bytes_per_second)
    assert ceiling(5, 16, 512).usable_bytes_per_second != ceiling(5, 16, 256).usable_bytes_per_second
    # Cross-check one value from first principles: Gen4 x8, 512 B, 3DW: 8*16/8*128/130*512/538.
    first_principles = 8 * 16e9 / 8 * 128 / 130 * 512 / (512 + 4 + 2 + 12 + 4) * (55.8 / 58.1)
    assert got[("gpu", GPU)] == pytest.approx(first_principles, rel=1e-3)


def test_no_config_file_uses_default_mps(node):
    (node.sys / "bus/pci/devices" / GPU / "config").unlink()
    got = _gauges(_source(node).read(), CEILING)
    assert got[("gpu", GPU)] == pytest.approx(ceiling(4, 8, 256).usable_bytes_per_second)


def test_aer_counters(node):
    snap = _source(node).read()
    assert _counters(snap, CORRECTABLE) == {GPU: 9}
    # Replays: REPLAY_NUM rollovers plus replay timer timeouts.
    assert _counters(snap, REPLAY) == {GPU: 7}
    assert snap.provides == {REPLAY, CORRECTABLE}


def test_link_down_and_unknown_speed(node):
    d = node.sys / "bus/pci/devices" / NIC
    node.write_raw(str((d / "current_link_width").relative_to(node.root)), "0\n")
    node.write_raw(str((d / "current_link_speed").relative_to(node.root)), "Unknown\n")
    snap = _source(node).read()
    assert snap.faults == []
    assert ("nic", NIC, "current") not in _gauges(snap, SPEED)
    assert ("nic", NIC, "max") in _gauges(snap, SPEED)
    assert ("nic", NIC) not in _gauges(snap, CEILING) and ("gpu", GPU) in _gauges(snap, CEILING)


def test_width_zero_link_gives_no_ceiling(node):
    d = node.sys / "bus/pci/devices" / NIC
    node.write_raw(str((d / "current_link_width").relative_to(node.root)), "0\n")
    snap = _source(node).read()
    assert _gauges(snap, WIDTH)[("nic", NIC, "current")] == 0
    assert ("nic", NIC) not in _gauges(snap, CEILING)


def test_garbage_link_state_and_class(node):
    d = node.sys / "bus/pci/devices" / GPU
    node.write_raw(str((d / "max_link_speed").relative_to(node.root)), "fast\n")
    node.write_raw(str((node.sys / "bus/pci/devices" / NIC / "class").relative_to(node.root)), "0xZZ\n")
    snap = _source(node).read()
    assert sorted(f.what for f in snap.faults) == ["garbage PCI class", "garbage link state"]
    assert _gauges(snap, SPEED) == {("gpu", GPU, "current"): 16.0}
    assert _counters(snap, CORRECTABLE) == {GPU: 9}


def test_garbage_and_unreadable_aer(node):
    d = node.sys / "bus/pci/devices" / GPU
    node.write_raw(str((d / "aer_dev_correctable").relative_to(node.root)), "RxErr lots\nTOTAL_ERR_COR 9\n")
    snap = _source(node).read()
    assert _counters(snap, CORRECTABLE) == {} and _counters(snap, REPLAY) == {}
    assert [f.what for f in snap.faults] == ["unreadable AER counters"]
    assert _gauges(snap, CEILING)  # link state still flows
    node.make_directory_in_place(str((d / "aer_dev_correctable").relative_to(node.root)))
    snap = _source(node).read()
    assert [f.what for f in snap.faults] == ["unreadable AER counters"]


def test_truncated_aer_file_keeps_what_it_has(node):
    d = node.sys / "bus/pci/devices" / GPU
    node.write_raw(str((d / "aer_dev_correctable").relative_to(node.root)), "RxErr 2\nBadTLP 0\nRollo")
    snap = _source(node).read()
    # Cut before TOTAL_ERR_COR and Rollover: neither series, rather than a partial (lower) value.
    assert _counters(snap, CORRECTABLE) == {} and _counters(snap, REPLAY) == {}
    assert _gauges(snap, SPEED)


def test_device_without_link_files(node):
    """Integrated or virtual functions have no link: nothing to report, nothing wrong."""
    node.add_pci("0000:00:02.0", 0x030000, link=None)
    snap = _source(node).read()
    assert snap.faults == []
    assert not any(k[1] == "0000:00:02.0" for k in _gauges(snap, SPEED))


def test_device_vanishes_during_walk(node):
    (node.sys / "bus/pci/devices" / NIC / "class").unlink()
    snap = _source(node).read()
    assert snap.faults == [] and not any(k[1] == NIC for k in _gauges(snap, SPEED))


def test_no_pci_bus(tmp_path):
    with pytest.raises(SourceUnavailable, match="no PCI bus"):
        PcieSource(sysfs=str(tmp_path)).start()


def test_no_pci_bus_is_absent(tmp_path):
    """No bus/pci at all (an arm SoC without PCIe, a container without /sys): absent, not failed."""
    with pytest.raises(SourceAbsent):
        PcieSource(sysfs=str(tmp_path)).start()


def test_bmc_vga_is_not_a_gpu_here_or_in_topology(node):
    """One classifier: an ASPEED BMC's VGA (class 0x030000, vendor 0x1a03) is "other" for the pcie
    source exactly as for the topology walk, so it gets no GPU link series."""
    from pcietax.topology import discover

    node.add_pci("0000:02:00.0", 0x030000, vendor=0x1A03, device=0x2000,
                 link=("5.0 GT/s PCIe", 1, "5.0 GT/s PCIe", 1))
    snap = _source(node).read()
    assert not any(k[1] == "0000:02:00.0" for k in _gauges(snap, SPEED))
    assert discover(node.sys).tree.devices["0000:02:00.0"].kind == "other"


def test_fixed_facts_are_cached_current_link_and_aer_reread(node):
    """Class, max link and MPS are read once per refresh; the current link (a retrain) and AER
    counters every cycle; a function that appears is read at once."""
    t = [0.0]
    src = PcieSource(sysfs=str(node.sys), refresh=60.0, clock=lambda: t[0])
    src.start()
    src.read()
    dev = node.sys / "bus/pci/devices" / GPU
    (dev / "current_link_speed").write_text("8.0 GT/s PCIe\n")  # retrained down to Gen3
    (dev / "max_link_speed").write_text("2.5 GT/s PCIe\n")  # (cannot change live: ignored)
    (dev / "aer_dev_correctable").write_text("RxErr 9\nRollover 3\nTimeout 4\nTOTAL_ERR_COR 9\n")
    node.add_pci("0000:9b:00.0", 0x030200, vendor=0x10DE)
    t[0] = 1.0
    snap = src.read()
    speed = _gauges(snap, SPEED)
    assert speed[("gpu", GPU, "current")] == 8.0 and speed[("gpu", GPU, "max")] == 32.0
    assert _counters(snap, CORRECTABLE)[GPU] == 9
    assert ("gpu", "0000:9b:00.0", "current") in speed
    t[0] = 61.0  # the refresh re-reads everything
    assert _gauges(src.read(), SPEED)[("gpu", GPU, "max")] == 2.5


def test_unchanged_files_give_last_reads_samples_and_faults_repeat(node):
    """A device whose link and AER files read the same bytes gives the same Sample objects (not
    parsed again); one byte changed is parsed; a bad file is a fault on every read, never cached."""
    src = _source(node)
    first = src.read()
    second = src.read()
    assert [id(s) for s in second.counters] == [id(s) for s in first.counters]
    assert [id(s) for s in second.gauges] == [id(s) for s in first.gauges]
    dev = node.sys / "bus/pci/devices" / GPU
    (dev / "aer_dev_correctable").write_text("RxErr 2\nRollover 3\nTimeout 5\nTOTAL_ERR_COR 10\n")
    third = src.read()
    assert _counters(third, REPLAY)[GPU] == 8 and _counters(third, CORRECTABLE)[GPU] == 10
    nic = {id(s) for s in first.gauges if dict(s.labels)["pci_bus_id"] == NIC}
    assert nic and nic <= {id(s) for s in third.gauges}  # the NIC's files did not change
    (dev / "current_link_width").write_text("x8\n")  # garbage: a fault, on every read
    for _ in range(3):
        snap = src.read()
        assert [f.what for f in snap.faults] == ["garbage link state"]
        assert ("gpu", GPU, "current") not in _gauges(snap, SPEED)
        assert _counters(snap, CORRECTABLE)[GPU] == 10  # the AER counters still flow
    (dev / "current_link_width").write_text("16\n")
    snap = src.read()
    assert snap.faults == [] and _gauges(snap, WIDTH)[("gpu", GPU, "current")] == 16
