"""The fixture writer and the four host sources agree on a tiny node (fuller tests live beside)."""

from pcietax.sources.netdev import NetdevSource
from pcietax.sources.rdma import RdmaSource


def test_roce_nic_counted_once(fake_node):
    rp = fake_node.add_pci("0000:00:01.0", 0x060400)
    nic = fake_node.add_pci("0000:3b:00.0", 0x020000, rp)
    fake_node.add_netdev("eth0", nic, rx_bytes=1000, tx_bytes=2000)
    fake_node.add_rdma("mlx5_0", nic, {1: ("Ethernet", 250, 500)})
    fake_node.add_netdev("lo", None, rx_bytes=7, tx_bytes=7)
    src = NetdevSource(procfs=str(fake_node.proc), sysfs=str(fake_node.sys))
    src.start()
    snap = src.read()
    got = {(s.family, dict(s.labels)["nic"]): s.value for s in snap.counters}
    # RoCE: netdev bytes plus RDMA port bytes (4-byte words); lo is not a physical NIC.
    assert got == {
        ("pcietax_nic_receive_bytes_total", "eth0"): 1000 + 1000,
        ("pcietax_nic_transmit_bytes_total", "eth0"): 2000 + 2000,
    }
    rd = RdmaSource(sysfs=str(fake_node.sys))
    rd.start()
    assert {s.value for s in rd.read().counters} == {1000.0, 2000.0}
