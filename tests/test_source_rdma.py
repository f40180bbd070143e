"""RdmaSource on fixture trees: port data counters in 4-byte words, and the bad-input paths."""

from __future__ import annotations

import pytest

from pcietax.sources.base import SourceAbsent, SourceUnavailable
from pcietax.sources.rdma import RX, TX, RdmaSource


def _values(snap) -> dict[tuple[str, str, str], float]:
    return {(s.family, dict(s.labels)["device"], dict(s.labels)["port"]): s.value for s in snap.counters}


@pytest.fixture
def node(fake_node):
    a = fake_node.add_pci("0000:5e:00.0", 0x020000)
    b = fake_node.add_pci("0000:86:00.0", 0x020700)
    fake_node.add_rdma("mlx5_0", a, {1: ("Ethernet", 10, 20)})
    # Ports sort numerically (node_exporter and the kernel list 1, 2, ..., 10).
    fake_node.add_rdma("mlx5_1", b, {1: ("InfiniBand", 1, 2), 2: ("InfiniBand", 3, 4),
                                     10: ("InfiniBand", 5, 6)})
    return fake_node


def _source(node) -> RdmaSource:
    src = RdmaSource(sysfs=str(node.sys))
    src.start()
    return src


def test_ports_in_bytes(node):
    snap = _source(node).read()
    assert snap.faults == []
    assert snap.provides == {RX, TX}
    assert _values(snap) == {
        (RX, "mlx5_0", "1"): 40, (TX, "mlx5_0", "1"): 80,
        (RX, "mlx5_1", "1"): 4, (TX, "mlx5_1", "1"): 8,
        (RX, "mlx5_1", "2"): 12, (TX, "mlx5_1", "2"): 16,
        (RX, "mlx5_1", "10"): 20, (TX, "mlx5_1", "10"): 24,
    }


def test_64_bit_values_are_exact(node):
    big = 2**62 + 7  # extended counters pass 2**53 words on a busy 400G port within a year or two
    node.set_rdma_port("mlx5_0", 1, "Ethernet", big, 0)
    v = _values(_source(node).read())[(RX, "mlx5_0", "1")]
    assert v == float(big * 4)


def test_no_infiniband_class_is_absent(fake_node):
    """No /sys/class/infiniband (no RDMA stack) or an empty one (ib_core, no HCA): the hardware is
    not on this node, which is expected and never alerted on."""
    with pytest.raises(SourceAbsent, match="is empty"):
        RdmaSource(sysfs=str(fake_node.sys)).start()
    (fake_node.sys / "class/infiniband").rmdir()
    with pytest.raises(SourceAbsent, match="no RDMA devices"):
        RdmaSource(sysfs=str(fake_node.sys)).start()


def test_counters_without_pma_are_quietly_absent(node):
    """``N/A (no PMA)`` (older kernels, iWARP devices): that port has no data series, no fault,
    every other port flows (node_exporter skips such counters the same way)."""
    for f in ("port_rcv_data", "port_xmit_data"):
        node.write_raw(f"sys/class/infiniband/mlx5_1/ports/2/counters/{f}", "N/A (no PMA)\n")
    snap = _source(node).read()
    assert snap.faults == []
    assert {(d, p) for _, d, p in _values(snap)} == {("mlx5_0", "1"), ("mlx5_1", "1"), ("mlx5_1", "10")}


def test_a_400_digit_counter_skips_the_series_not_the_source(node):
    node.write_raw("sys/class/infiniband/mlx5_0/ports/1/counters/port_rcv_data", "9" * 400 + "\n")
    snap = _source(node).read()
    assert [f.what for f in snap.faults] == ["unreadable RDMA counter"]
    assert (RX, "mlx5_1", "1") in _values(snap)


def test_class_dir_vanishes_after_start(node):
    src = _source(node)
    for dev in ("mlx5_0", "mlx5_1"):
        node.remove_rdma(dev)
    (node.sys / "class/infiniband").rmdir()
    with pytest.raises(SourceUnavailable, match="cannot list"):
        src.read()


def test_garbage_counter_skips_that_series_only(node):
    node.write_raw("sys/class/infiniband/mlx5_1/ports/2/counters/port_rcv_data", "12abc\n")
    snap = _source(node).read()
    got = _values(snap)
    assert (RX, "mlx5_1", "2") not in got
    assert got[(TX, "mlx5_1", "2")] == 16 and got[(RX, "mlx5_0", "1")] == 40
    assert len(snap.faults) == 1
    assert snap.faults[0].what == "unreadable RDMA counter"
    assert "ports/2/counters/port_rcv_data" in snap.faults[0].where


def test_empty_and_unreadable_counters(node):
    node.write_raw("sys/class/infiniband/mlx5_0/ports/1/counters/port_xmit_data", "")
    node.make_directory_in_place("sys/class/infiniband/mlx5_1/ports/1/counters/port_rcv_data")
    snap = _source(node).read()
    got = _values(snap)
    assert (TX, "mlx5_0", "1") not in got and (RX, "mlx5_1", "1") not in got
    assert len(got) == 6
    wheres = sorted(f.where for f in snap.faults)
    assert len(wheres) == 2
    assert any("mlx5_0/ports/1/counters/port_xmit_data" in w for w in wheres)
    assert any("mlx5_1/ports/1/counters/port_rcv_data" in w for w in wheres)


def test_missing_data_counters_are_skipped_silently(node):
    """SR-IOV VF ports have no port_*_data files: nothing to report, nothing wrong."""
    (node.sys / "class/infiniband/mlx5_0/ports/1/counters/port_rcv_data").unlink()
    snap = _source(node).read()
    assert snap.faults == []
    assert (RX, "mlx5_0", "1") not in _values(snap) and (TX, "mlx5_0", "1") in _values(snap)


def test_device_without_ports_is_a_fault(node):
    import shutil

    shutil.rmtree(node.sys / "class/infiniband/mlx5_0/ports")
    snap = _source(node).read()
    assert [f.what for f in snap.faults] == ["cannot list RDMA ports"]
    assert {k[1] for k in _values(snap)} == {"mlx5_1"}


def test_device_vanishes_and_returns(node):
    src = _source(node)
    node.remove_rdma("mlx5_0")
    assert {k[1] for k in _values(src.read())} == {"mlx5_1"}
    node.add_rdma("mlx5_0", node.add_pci("0000:5e:00.0", 0x020000), {1: ("Ethernet", 11, 21)})
    assert _values(src.read())[(RX, "mlx5_0", "1")] == 44


def test_ports_are_listed_on_device_change_or_refresh_and_unchanged_counters_reuse_samples(node):
    """Port directories are listed again when the device listing changes or the layout is older
    than the refresh; a counter that did not move gives the same Sample object (free for the
    engine to absorb), one that moved a new one."""
    t = [0.0]
    src = RdmaSource(sysfs=str(node.sys), layout_refresh=60.0, clock=lambda: t[0])
    src.start()
    first = src.read()
    node.set_rdma_port("mlx5_0", 2, "Ethernet", 7, 8)  # a port appears on a listed device
    node.set_rdma_port("mlx5_1", 1, "InfiniBand", 100, 2)  # traffic on one port
    t[0] = 30.0
    second = src.read()
    assert (RX, "mlx5_0", "2") not in _values(second)  # not listed again yet
    assert _values(second)[(RX, "mlx5_1", "1")] == 400
    moved = {id(s) for s in second.counters} ^ {id(s) for s in first.counters}
    assert len(moved) == 2  # only mlx5_1 port 1's RX: its old sample out, a new one in
    t[0] = 61.0
    assert _values(src.read())[(RX, "mlx5_0", "2")] == 28  # the refresh lists the ports again
    node.remove_rdma("mlx5_0")
    t[0] = 62.0
    assert {k[1] for k in _values(src.read())} == {"mlx5_1"}  # a device gone: listed at once


def test_a_port_counter_netdev_just_read_is_not_read_again(node):
    """The netdev source reads the same port data counters for RDMA NICs; within
    PORT_SHARE_S of its read (one cycle's shared lane) the rdma source takes those values instead
    of reading the files again. Later, or for a file that failed, it reads the file itself."""
    from pcietax.sources import netdev as netdev_mod
    from pcietax.sources.netdev import NetdevSource

    t = [100.0]
    clock = lambda: t[0]  # noqa: E731
    node.add_netdev("eno1", node.add_pci("0000:3b:00.0", 0x020000), 1, 2)
    nd = NetdevSource(procfs=str(node.proc), sysfs=str(node.sys), clock=clock)
    nd.start()
    rd = RdmaSource(sysfs=str(node.sys), clock=clock)
    rd.start()
    netdev_mod._PORT_READS.clear()
    nd.read()
    node.set_rdma_port("mlx5_1", 1, "InfiniBand", 100, 2)  # moved after netdev's read
    t[0] += 0.01
    assert _values(rd.read())[(RX, "mlx5_1", "1")] == 4  # netdev's value, from the same instant
    t[0] += netdev_mod.PORT_SHARE_S
    assert _values(rd.read())[(RX, "mlx5_1", "1")] == 400  # too old to share: read again
    nd.read()  # publishes port 2's value
    (node.sys / "class/infiniband/mlx5_1/ports/2/counters/port_rcv_data").write_text("garbage\n")
    assert [f.what for f in nd.read().faults] == ["unreadable RDMA counter"]  # and withdraws it
    t[0] += 0.01
    snap = rd.read()
    assert [f.what for f in snap.faults] == ["unreadable RDMA counter"]  # read itself, not shared
    assert (RX, "mlx5_1", "2") not in _values(snap) and _values(snap)[(RX, "mlx5_1", "1")] == 400
