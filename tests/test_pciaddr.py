"""PCI function of a sysfs class entry, from its link (as the kernel lays them out)."""

from __future__ import annotations

import os

from pcietax.sources.pciaddr import pci_of_class_link, pci_of_device_link


def _link(tmp_path, name: str, target: str):
    p = tmp_path / name
    os.symlink(target, p)
    return p


def test_class_links(tmp_path):
    nic = _link(tmp_path, "eth0", "../../devices/pci0000:00/0000:00:01.0/0000:3b:00.1/net/eth0")
    virtio = _link(tmp_path, "ens3", "../../devices/pci0000:00/0000:00:03.0/virtio0/net/ens3")
    ib = _link(tmp_path, "mlx5_0", "../../devices/pci0000:80/0000:80:01.0/0000:86:00.0/infiniband/mlx5_0")
    virt = _link(tmp_path, "br0", "../../devices/virtual/net/br0")
    assert pci_of_class_link(nic) == "0000:3b:00.1"  # the function, not its root port
    assert pci_of_class_link(virtio) == "0000:00:03.0"  # past the virtio child
    assert pci_of_class_link(ib) == "0000:86:00.0"
    assert pci_of_class_link(virt) == ""
    assert pci_of_class_link(tmp_path / "gone") == ""


def test_agrees_with_device_link_on_a_fixture(fake_node):
    fn = fake_node.add_pci("0000:3b:00.0", 0x020000, fake_node.add_pci("0000:00:01.0", 0x060400))
    fake_node.add_netdev("eth0", fn, 1, 2)
    fake_node.add_netdev("lo", None, 1, 2)
    for name in ("eth0", "lo"):
        entry = fake_node.sys / "class/net" / name
        assert pci_of_class_link(entry) == pci_of_device_link(entry / "device")
