"""NetdevSource on fixture trees: which NICs count, how a RoCE / InfiniBand NIC is counted once,
and every bad-input path (the affected series skipped, a fault recorded, the rest flowing)."""

from __future__ import annotations

import shutil

import pytest

from conftest import needs_root
from helpers.asuser import run_as_nobody, world_traversable_dir
from helpers.fakenode import FakeNode
from pcietax.engine import Engine
from pcietax.model import TaxModel
from pcietax.sources.base import SourceAbsent, SourceUnavailable
from pcietax.sources.netdev import IPOIB_RX, IPOIB_TX, RX, TX, NetdevSource


def _values(snap) -> dict[tuple[str, str], float]:
    return {(s.family, dict(s.labels)["nic"]): s.value for s in snap.counters}


def _rx(snap) -> dict[str, float]:
    return {dict(s.labels)["nic"]: s.value for s in snap.counters if s.family == RX}


def _source(node: FakeNode, nics: list[str] | None = None) -> NetdevSource:
    src = NetdevSource(procfs=str(node.proc), sysfs=str(node.sys), nics=nics)
    src.start()
    return src


@pytest.fixture
def node(fake_node: FakeNode) -> FakeNode:
    """Two plain Ethernet NICs, a RoCE NIC, an InfiniBand HCA with IPoIB, and virtual devices."""
    rp = fake_node.add_pci("0000:00:01.0", 0x060400)
    e0 = fake_node.add_pci("0000:3b:00.0", 0x020000, rp)
    e1 = fake_node.add_pci("0000:3b:00.1", 0x020000, rp)
    roce = fake_node.add_pci("0000:5e:00.0", 0x020000, rp)
    ib = fake_node.add_pci("0000:86:00.0", 0x020700, rp)
    fake_node.add_netdev("eno1", e0, 1_000, 2_000)
    fake_node.add_netdev("eno2", e1, 3_000, 4_000)
    fake_node.add_netdev("ens5f0", roce, 10_000, 20_000)
    fake_node.add_rdma("mlx5_0", roce, {1: ("Ethernet", 1_000, 2_000)})
    fake_node.add_netdev("ib0", ib, 555, 666)  # IPoIB: its bytes are inside the port counters
    fake_node.add_rdma("mlx5_1", ib, {1: ("InfiniBand", 25_000, 50_000)})
    for virt in ("lo", "docker0", "veth1a2b", "br0", "tunl0"):
        fake_node.add_netdev(virt, None, 9_999, 9_999)
    return fake_node


def test_physical_nics_counted_once(node):
    snap = _source(node).read()
    assert snap.faults == []
    assert snap.provides == {RX, TX, IPOIB_RX, IPOIB_TX}
    assert _values(snap) == {
        (RX, "eno1"): 1_000, (TX, "eno1"): 2_000,
        (RX, "eno2"): 3_000, (TX, "eno2"): 4_000,
        # RoCE: netdev bytes + port bytes (RDMA traffic bypasses the netdev stack).
        (RX, "ens5f0"): 10_000 + 4 * 1_000, (TX, "ens5f0"): 20_000 + 4 * 2_000,
        # InfiniBand: port bytes only (the IPoIB netdev's 555/666 are inside them).
        (RX, "ib0"): 4 * 25_000, (TX, "ib0"): 4 * 50_000,
        # ...and reported apart, so the model can take them off the port bytes (useful once).
        (IPOIB_RX, "ib0"): 555, (IPOIB_TX, "ib0"): 666,
    }
    pci = {dict(s.labels)["nic"]: dict(s.labels)["pci_bus_id"] for s in snap.counters}
    assert pci == {"eno1": "0000:3b:00.0", "eno2": "0000:3b:00.1", "ens5f0": "0000:5e:00.0",
                   "ib0": "0000:86:00.0"}


def test_nic_flag_names_and_globs(node):
    assert set(_rx(_source(node, ["eno2"]).read())) == {"eno2"}
    assert set(_rx(_source(node, ["eno*"]).read())) == {"eno1", "eno2"}
    assert set(_rx(_source(node, ["ens5f?", "ib[0-9]"]).read())) == {"ens5f0", "ib0"}
    # An explicitly named virtual device is measured: the operator asked for it.
    got = _rx(_source(node, ["br0"]).read())
    assert got == {"br0": 9_999}
    # A name that matches nothing gives nothing, not an error.
    assert _rx(_source(node, ["nope*"]).read()) == {}


def test_glob_is_not_a_regex(node):
    """'eno.' as a regex would match eno1; as an interface glob it names a literal dot."""
    assert _rx(_source(node, ["eno."]).read()) == {}


def test_nic_disappears_and_returns(node):
    src = _source(node)
    assert "eno2" in _rx(src.read())
    node.remove_netdev("eno2")
    snap = src.read()
    assert "eno2" not in _rx(snap) and _rx(snap)["eno1"] == 1_000
    node.add_netdev("eno2", node.add_pci("0000:3b:00.1", 0x020000), 3_500, 4_500)
    assert _rx(src.read())["eno2"] == 3_500


def test_netdev_listed_but_sysfs_gone(node):
    """Between reading /proc/net/dev and sysfs the device link vanished: not physical any more, skipped."""
    (node.sys / "class/net/eno1").unlink()
    snap = _source(node).read()
    assert "eno1" not in _rx(snap) and "eno2" in _rx(snap)


def test_missing_proc_net_dev_fails_start(node):
    (node.proc / "net/dev").unlink()
    with pytest.raises(SourceUnavailable, match="net/dev"):
        NetdevSource(procfs=str(node.proc), sysfs=str(node.sys)).start()


def test_proc_net_dev_vanishes_after_start(node):
    src = _source(node)
    (node.proc / "net/dev").unlink()
    with pytest.raises(SourceUnavailable, match="net/dev"):
        src.read()


def test_proc_net_dev_is_a_directory(node):
    src = _source(node)
    node.make_directory_in_place("proc/net/dev")
    with pytest.raises(SourceUnavailable, match="net/dev"):
        src.read()


def test_garbage_and_truncated_lines_skip_only_that_nic(node):
    text = (node.proc / "net/dev").read_text().splitlines()
    out = []
    for line in text:
        if line.strip().startswith("eno1:"):
            out.append(line.replace(" 1000 ", " 1x00 ", 1))  # not a number
        elif line.strip().startswith("eno2:"):
            out.append(line[: len(line) // 2])  # cut mid-line
        else:
            out.append(line)
    out.append("garbage without a colon")
    node.write_raw("proc/net/dev", "\n".join(out) + "\n")
    snap = _source(node).read()
    assert set(_rx(snap)) == {"ens5f0", "ib0"}
    whats = sorted(f.what for f in snap.faults)
    assert whats == ["not a number", "truncated line", "truncated line"]
    assert all("net/dev:" in f.where for f in snap.faults)


def test_non_ascii_proc_net_dev_is_unavailable(node):
    src = _source(node)
    node.write_raw("proc/net/dev", b"\xff\xfe garbage\n")
    with pytest.raises(SourceUnavailable):
        src.read()


def test_unreadable_roce_port_holds_its_part(node):
    """A RoCE NIC whose port counter cannot be read for a cycle must not drop to its netdev bytes:
    that would look like a counter reset now and a jump by the port's whole history later. The
    port's part is held, the netdev part keeps flowing."""
    src = _source(node)
    assert _rx(src.read())["ens5f0"] == 14_000
    path = "sys/class/infiniband/mlx5_0/ports/1/counters/port_rcv_data"
    node.make_directory_in_place(path)
    node.set_netdev_bytes("ens5f0", 10_500, 20_000)
    snap = src.read()
    assert _rx(snap)["ens5f0"] == 14_500
    assert set(_rx(snap)) == {"eno1", "eno2", "ens5f0", "ib0"}
    assert [f.what for f in snap.faults] == ["unreadable RDMA counter"]
    assert "mlx5_0" in snap.faults[0].where
    (node.root / path).rmdir()
    node.set_rdma_port("mlx5_0", 1, "Ethernet", 1_100, 2_000)
    assert _rx(src.read())["ens5f0"] == 10_500 + 4_400


def test_rdma_device_vanishes_and_returns_without_a_jump(node):
    """mlx5_ib unloaded and reloaded under a live netdev: the NIC's counter neither drops to its
    netdev bytes nor jumps by the port's history; a port that restarts from zero is absorbed."""
    src = _source(node)
    assert _rx(src.read()) == {"eno1": 1_000, "eno2": 3_000, "ens5f0": 14_000, "ib0": 100_000}
    node.remove_rdma("mlx5_0")
    node.remove_rdma("mlx5_1")
    node.set_netdev_bytes("ens5f0", 10_100, 20_000)
    node.set_netdev_bytes("ib0", 999, 999)  # IPoIB bytes never replace an InfiniBand NIC's port bytes
    got = _rx(src.read())
    assert got["ens5f0"] == 14_100 and got["ib0"] == 100_000
    # Back, with counters restarted from zero by the reload.
    roce = node.add_pci("0000:5e:00.0", 0x020000)
    node.add_rdma("mlx5_0", roce, {1: ("Ethernet", 10, 0)})
    node.add_rdma("mlx5_1", node.add_pci("0000:86:00.0", 0x020700), {1: ("InfiniBand", 5, 0)})
    snap = src.read()
    got = _rx(snap)
    assert got["ens5f0"] == 14_100 + 40 and got["ib0"] == 100_020
    # Both ports restarted in both directions: reported for pcietax_source_resets_total.
    assert snap.resets == 4


def test_rdma_driver_loaded_after_start_adds_only_its_increase(fake_node):
    nic = fake_node.add_pci("0000:5e:00.0", 0x020000)
    fake_node.add_netdev("ens5f0", nic, 10_000, 20_000)
    src = _source(fake_node)
    assert _rx(src.read()) == {"ens5f0": 10_000}
    fake_node.add_rdma("mlx5_0", nic, {1: ("Ethernet", 10**9, 10**9)})  # a long port history
    assert _rx(src.read()) == {"ens5f0": 10_000}
    fake_node.set_rdma_port("mlx5_0", 1, "Ethernet", 10**9 + 25, 10**9)
    assert _rx(src.read()) == {"ens5f0": 10_100}


def test_garbage_port_counter_is_a_fault(node):
    node.write_raw("sys/class/infiniband/mlx5_1/ports/1/counters/port_xmit_data", "lots\n")
    snap = _source(node).read()
    assert "ib0" not in _rx(snap) and "eno1" in _rx(snap)
    assert len(snap.faults) == 1 and "port_xmit_data" in snap.faults[0].where


def test_infiniband_hca_without_ipoib_is_still_a_nic(fake_node):
    """An IB HCA with no IPoIB netdev moves bytes all the same: it is counted under its RDMA name."""
    ib = fake_node.add_pci("0000:86:00.0", 0x020700)
    fake_node.add_rdma("mlx5_1", ib, {1: ("InfiniBand", 100, 200), 2: ("InfiniBand", 1, 2)})
    fake_node.add_netdev("lo", None, 5, 5)
    snap = _source(fake_node).read()
    assert _values(snap) == {(RX, "mlx5_1"): 404, (TX, "mlx5_1"): 808}
    assert {dict(s.labels)["pci_bus_id"] for s in snap.counters} == {"0000:86:00.0"}
    assert set(_rx(_source(fake_node, ["mlx5_*"]).read())) == {"mlx5_1"}
    assert _rx(_source(fake_node, ["eth*"]).read()) == {}


@needs_root  # drops to nobody: only root can
def test_permission_denied_is_unavailable():
    """As an unprivileged reader (the exporter run as a user): /proc/net/dev mode 000."""
    root = world_traversable_dir()
    try:
        node = FakeNode(root)
        node.add_netdev("eno1", node.add_pci("0000:3b:00.0", 0x020000), 1, 2)
        (node.proc / "net/dev").chmod(0)
        src = NetdevSource(procfs=str(node.proc), sysfs=str(node.sys))

        def start_as_user() -> str:
            try:
                src.start()
            except SourceUnavailable as e:
                return str(e)
            return "started"

        assert "cannot read" in run_as_nobody(start_as_user)
    finally:
        shutil.rmtree(root)


def test_port_without_data_counters_is_not_a_fault(node):
    """SR-IOV VF ports have no port_*_data files: the RoCE NIC counts its netdev bytes, no fault."""
    (node.sys / "class/infiniband/mlx5_0/ports/1/counters/port_rcv_data").unlink()
    (node.sys / "class/infiniband/mlx5_0/ports/1/counters/port_xmit_data").unlink()
    snap = _source(node).read()
    assert snap.faults == []
    assert _rx(snap)["ens5f0"] == 10_000


# -- real layouts and broken files (issues 11 and 13) --------------------------------------------


def test_class_net_directory_with_a_device_link_is_a_physical_nic(fake_node):
    """The prometheus/procfs fixture layout (also sysfs copies, some container views):
    sys/class/net/eth0 is a directory, not a link, and holds ``device -> ../../../devices/...``.
    The NIC counts, and topology names it by the same helper (test_topology covers that side)."""
    fn = fake_node.add_pci("0000:3b:00.0", 0x020000)
    fake_node.add_netdev("lo", None, 1, 1)
    entry = fake_node.sys / "class/net/eth0"
    (entry / "statistics").mkdir(parents=True)
    (entry / "device").symlink_to("../../../devices/pci0000:00/0000:3b:00.0")
    (entry / "statistics/rx_bytes").write_text("7000\n")
    fake_node._netdev["eth0"] = (7_000, 8_000)
    fake_node.write_net_dev()
    assert fn.path.exists()
    snap = _source(fake_node).read()
    assert _values(snap) == {(RX, "eth0"): 7_000, (TX, "eth0"): 8_000}
    assert {dict(s.labels)["pci_bus_id"] for s in snap.counters} == {"0000:3b:00.0"}


def test_port_counters_without_pma_are_quietly_absent(node):
    """Older kernels and iWARP devices print ``N/A (no PMA)`` in port_rcv_data: not a fault, and
    the RoCE NIC sharing that PCI function still counts its netdev bytes."""
    for f in ("port_rcv_data", "port_xmit_data"):
        node.write_raw(f"sys/class/infiniband/mlx5_0/ports/1/counters/{f}", "N/A (no PMA)\n")
    snap = _source(node).read()
    assert snap.faults == []
    assert _rx(snap)["ens5f0"] == 10_000


@pytest.mark.parametrize("content", ["", "garbage\n", "Inter-|   Receive\n face |bytes\n"])
def test_empty_or_headless_net_dev_is_a_failure_and_nothing_is_renamed(node, content):
    """A broken /proc/net/dev fails the read (the engine holds every NIC's counters and marks the
    source down); it never exports the InfiniBand NICs under their RDMA names or drops Ethernet."""
    eng = Engine([_source(node)], TaxModel())
    try:
        before = {dict(k[1])["nic"]: v for k, v in eng.collect().counters.items() if k[0] == RX}
        node.write_raw("proc/net/dev", content)
        f = eng.collect()
        assert not f.status["netdev"].up and "net/dev" in f.status["netdev"].reason
        assert {dict(k[1])["nic"]: v for k, v in f.counters.items() if k[0] == RX} == before
    finally:
        eng.close()


def test_a_bad_line_holds_that_nic_under_its_own_name(node):
    """ib0's line is cut: ib0 keeps its name and last bytes (not renamed to mlx5_1), with a fault."""
    src = _source(node)
    first = _rx(src.read())
    text = (node.proc / "net/dev").read_text().replace("ib0:", "ib0")
    node.write_raw("proc/net/dev", text)
    snap = src.read()
    assert [f.what for f in snap.faults] == ["truncated line"]
    assert _rx(snap) == first


def test_only_virtual_netdevs_is_absent(fake_node):
    """No physical NIC at all (a VM with only lo and bridges): absent, not a failure."""
    fake_node.add_netdev("lo", None, 1, 1)
    fake_node.add_netdev("docker0", None, 1, 1)
    with pytest.raises(SourceAbsent, match="no physical NIC"):
        NetdevSource(procfs=str(fake_node.proc), sysfs=str(fake_node.sys)).start()
    # Naming an interface (tests use --nic lo) is a choice, not an absence.
    NetdevSource(procfs=str(fake_node.proc), sysfs=str(fake_node.sys), nics=["lo"]).start()


def test_huge_net_dev_is_refused_with_a_fault_not_read_whole(node):
    """A 100 MB /proc/net/dev (a hostile mount) is not read whole: the read fails at the cap."""
    with open(node.proc / "net/dev", "ab") as f:
        f.truncate(100 << 20)
    with pytest.raises(SourceUnavailable, match="larger than"):
        _source(node).read()


def test_churning_vfs_do_not_grow_the_state(fake_node):
    """A VF per pod: 2,000 reads, each with a new VF, keep the per-NIC state bounded."""
    from pcietax.sources import netdev

    src = NetdevSource(procfs=str(fake_node.proc), sysfs=str(fake_node.sys))
    src._totals = netdev._NicTotals(forget_after=40)
    pf = fake_node.add_pci("0000:3b:00.0", 0x020000)
    fake_node.add_netdev("eno1", pf, 1, 1)
    for i in range(300):
        vf = fake_node.add_pci(f"0000:3c:{i // 8:02x}.{i % 8}", 0x020000)
        fake_node.add_netdev(f"vf{i}", vf, i, i)
        src.read()
        fake_node.remove_netdev(f"vf{i}")
    assert len(src._totals._parts) <= 40 + 10 + 2
    assert len(src._totals._absorber) <= 2 * (40 + 10 + 2)


def test_sense_sums_the_counted_netdevs_from_proc_net_dev_alone(node):
    """The engine's at-rest check: the bytes of the netdevs the last read counted (no virtual ones,
    no --nic outsiders), from /proc/net/dev only: a change in sysfs alone is not seen."""
    src = _source(node)
    assert src.sense() is None  # nothing counted yet: no sensor
    src.read()
    counted = 1_000 + 2_000 + 3_000 + 4_000 + 10_000 + 20_000 + 555 + 666  # eno1, eno2, ens5f0, ib0
    assert src.sense() == counted
    node.set_netdev_bytes("eno2", 3_000 + 7, 4_000)
    node.set_netdev_bytes("lo", 1 << 40, 1 << 40)  # virtual: not a sensed NIC
    assert src.sense() == counted + 7
    only = _source(node, ["eno1"])
    only.read()
    assert only.sense() == 3_000


def test_sense_of_a_broken_file_raises_so_the_engine_reads_in_full(node):
    src = _source(node)
    src.read()
    (node.proc / "net/dev").write_text("")
    with pytest.raises(SourceUnavailable):
        src.sense()


def test_sense_is_none_for_an_infiniband_hca_without_a_netdev(fake_node):
    ib = fake_node.add_pci("0000:86:00.0", 0x020700)
    fake_node.add_rdma("mlx5_1", ib, {1: ("InfiniBand", 100, 200)})
    fake_node.add_netdev("lo", None, 5, 5)
    src = _source(fake_node)
    src.read()
    assert src.sense() is None


def test_sysfs_layout_is_kept_until_a_listing_changes_or_the_refresh(node):
    """Which PCI function a netdev is, and where the RDMA ports are, is rebuilt when a netdev or RDMA
    device comes or goes, or after layout_refresh; the counters are read every time."""
    t = [0.0]
    src = NetdevSource(procfs=str(node.proc), sysfs=str(node.sys), layout_refresh=60.0, clock=lambda: t[0])
    src.start()
    src.read()
    # The same name re-pointed at another function (a rename race at boot): no listing changes.
    other = node.add_pci("0000:3b:00.7", 0x020000)
    real = other.path / "net/eno2"
    real.mkdir(parents=True)
    (real / "device").symlink_to(other.path)
    link = node.sys / "class/net/eno2"
    link.unlink()
    link.symlink_to(real)
    node.set_netdev_bytes("eno1", 1_500, 2_000)
    t[0] = 59.0
    snap = src.read()
    pci = {dict(s.labels)["nic"]: dict(s.labels)["pci_bus_id"] for s in snap.counters}
    assert pci["eno2"] == "0000:3b:00.1" and _rx(snap)["eno1"] == 1_500  # kept; counters fresh
    t[0] = 61.0
    pci = {dict(s.labels)["nic"]: dict(s.labels)["pci_bus_id"] for s in src.read().counters}
    assert pci["eno2"] == "0000:3b:00.7"
    # A new netdev changes the listing: seen at once, before the refresh.
    node.add_netdev("eno3", node.add_pci("0000:3b:00.2", 0x020000), 10, 20)
    t[0] = 62.0
    assert "eno3" in _rx(src.read())


def test_sense_rereads_this_machines_real_proc_net_dev_through_its_kept_descriptor():
    """The kept descriptor re-reads the kernel's seq_file (pread at 0 regenerates it): bytes sent
    over loopback after the first sense show in the next, with no reopen."""
    import socket

    src = NetdevSource(procfs="/proc", sysfs="/sys", nics=["lo"])
    src.start()
    src.read()
    first = src.sense()
    assert first is not None
    fd = src._sense_fd
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(50):
            s.sendto(b"x" * 1000, ("127.0.0.1", 9))
    second = src.sense()
    assert src._sense_fd == fd
    assert second >= first + 2 * 50 * 1000  # rx and tx of lo, payload alone
    src.close()
    assert src._sense_fd is None


def test_a_counter_that_did_not_move_gives_the_same_sample(node):
    """What the engine's fast path relies on: an unmoved NIC counter is last read's very Sample
    object; a moved one is a new Sample with the same labels."""
    src = _source(node)
    first = {(s.family, s.labels): s for s in src.read().counters}
    node.set_netdev_bytes("eno1", 5_000, 7_000)
    second = {(s.family, s.labels): s for s in src.read().counters}
    assert first.keys() == second.keys()
    moved = [k for k in first if first[k] is not second[k]]
    assert sorted((fam, dict(lbl)["nic"]) for fam, lbl in moved) == sorted([(RX, "eno1"), (TX, "eno1")])
    assert all(first[k] == second[k] for k in first if k not in moved)
