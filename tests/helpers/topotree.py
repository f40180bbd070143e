"""Fixture PCIe trees for the topology tests, in the real sysfs layout (written by FakeNode:
directories under devices/pciDDDD:BB, relative links in bus/pci/devices, class/net and
class/infiniband links, config-space bytes, iommu groups, resource files), plus the two things
FakeNode does not write: NUMA node directories and IOMMU group ``type`` files.

Config space is built here byte for byte as the PCIe base spec lays it out (a standard capability
list at 0x34 with the PCI Express capability, an extended list at 0x100 with AER and optionally
ACS); nothing here imports pcietax, so a parser bug cannot hide in a shared helper.

Every builder returns a ``Layout`` that says, in plain terms, where each GPU and NIC sits
(switch, host bridge, socket): tests derive the expected path class from it with the
``nvidia-smi topo`` rules, independently of the code under test.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from .fakenode import FakeNode, PciFunction

GIB, MIB = 1 << 30, 1 << 20

# ACS control bits (PCIe base spec 7.7.11.3)
SV, TB, RR, CR, UF, EC, DT = (1 << i for i in range(7))
ACS_ALL = SV | TB | RR | CR | UF | EC | DT
ACS_KERNEL = SV | RR | CR | UF  # what Linux enables on every port when an IOMMU translates

PORT_ROOT, PORT_UP, PORT_DOWN, PORT_ENDPOINT = 0x4, 0x5, 0x6, 0x0
LINK_GEN5_X16 = ("32.0 GT/s PCIe", 16, "32.0 GT/s PCIe", 16)


def config_space(
    vendor: int,
    device: int,
    pci_class: int,
    *,
    port_type: int = PORT_ENDPOINT,
    acs_ctrl: int | None = None,
    acs_cap: int = ACS_ALL,
    size: int = 4096,
) -> bytes:
    """A type-0/type-1 header with PM at 0x40 -> PCIe at 0x60, and AER at 0x100 -> ACS at 0x148
    (only when acs_ctrl is given). ``size`` truncates like the kernel does for readers without
    CAP_SYS_ADMIN (64 bytes)."""
    b = bytearray(4096)
    bridge = (pci_class >> 8) == 0x0604
    struct.pack_into("<HHHH", b, 0, vendor, device, 0x0006, 0x0010)  # status bit 4: capability list
    b[0x09], b[0x0A], b[0x0B] = pci_class & 0xFF, (pci_class >> 8) & 0xFF, pci_class >> 16
    b[0x0E] = 0x01 if bridge else 0x00
    b[0x34] = 0x40
    b[0x40], b[0x41] = 0x01, 0x60  # Power Management -> next 0x60
    b[0x60], b[0x61] = 0x10, 0x00  # PCI Express, end of list
    struct.pack_into("<H", b, 0x62, 0x0002 | (port_type << 4))
    struct.pack_into("<H", b, 0x68, 0x1 << 5)  # Device Control: MPS 256
    nxt = 0x148 if acs_ctrl is not None else 0
    struct.pack_into("<I", b, 0x100, 0x0001 | (2 << 16) | (nxt << 20))  # AER v2
    if acs_ctrl is not None:
        struct.pack_into("<I", b, 0x148, 0x000D | (1 << 16))  # ACS v1, end of list
        struct.pack_into("<HH", b, 0x14C, acs_cap, acs_ctrl)
    return bytes(b[:size])


def gpu_resources(bar1: int = 128 * GIB) -> list[tuple[int, int, int]]:
    """An NVIDIA GPU's resource file: BAR0 16 MiB registers, BAR1 (64-bit prefetchable, takes
    slots 1-2) the aperture peers map, BAR3 32 MiB, then the expansion ROM and empty lines."""
    mem32, mem64pf = 0x40200, 0x14220C
    return [
        (0xE000000000 + 0, 0xE000000000 + 16 * MIB - 1, mem32),
        (0x20000000000, 0x20000000000 + bar1 - 1, mem64pf),
        (0, 0, 0),
        (0x22000000000, 0x22000000000 + 32 * MIB - 1, mem64pf),
        (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0),
    ]


@dataclass
class Place:
    addr: str
    host_bridge: str
    socket: int
    switch: str | None  # switch name, None for a device right on a root port
    leaf: str | None = None  # second-level switch (cascades only)
    name: str = ""  # NIC label the exporter should use


@dataclass
class Layout:
    node: FakeNode
    gpus: list[Place] = field(default_factory=list)
    nics: list[Place] = field(default_factory=list)
    switch_ports: dict[str, list[str]] = field(default_factory=dict)  # switch -> downstream ports
    root_ports: dict[str, str] = field(default_factory=dict)  # host bridge -> root port

    @property
    def sysfs(self) -> Path:
        return self.node.sys


def expected_path(g: Place, n: Place) -> str:
    """nvidia-smi's legend applied to the known layout (no pcietax code involved)."""
    if g.host_bridge != n.host_bridge:
        return "NODE" if g.socket == n.socket else "SYS"
    if g.switch is None or n.switch is None or g.switch != n.switch:
        return "PHB"
    if g.leaf == n.leaf:
        return "PIX"
    return "PXB"


def add_numa_nodes(node: FakeNode, count: int) -> None:
    for i in range(count):
        d = node.sys / "devices/system/node" / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpulist").write_text(f"{i * 56}-{i * 56 + 55}\n")


def set_iommu_type(node: FakeNode, group: int, kind: str) -> None:
    g = node.sys / "kernel/iommu_groups" / str(group)
    g.mkdir(parents=True, exist_ok=True)
    (g / "type").write_text(kind + "\n")


class _Builder:
    def __init__(self, node: FakeNode, *, config_size: int, acs: bool, iommu_type: str) -> None:
        self.node = node
        self.size = config_size
        self.acs = acs
        self.iommu_type = iommu_type
        self.group = 0
        self.layout = Layout(node)

    def _group(self, kind: str | None = None) -> int:
        self.group += 1
        set_iommu_type(self.node, self.group, kind or self.iommu_type)
        return self.group

    def bridge(self, addr: str, parent, port: int, numa: int, *, acs_ctrl: int = 0, vendor: int = 0x1000,
               device: int = 0xC030, iommu: str | None = None) -> PciFunction:
        cfg = config_space(vendor, device, 0x060400, port_type=port,
                           acs_ctrl=acs_ctrl if self.acs else None, size=self.size)
        return self.node.add_pci(addr, 0x060400, parent, vendor=vendor, device=device, numa_node=numa,
                                 link=LINK_GEN5_X16, config=cfg, iommu_group=self._group(iommu))

    def gpu(self, addr: str, parent, numa: int, place: Place, *, bar1: int = 128 * GIB,
            iommu: str | None = None) -> PciFunction:
        cfg = config_space(0x10DE, 0x2330, 0x030200, size=self.size)
        fn = self.node.add_pci(addr, 0x030200, parent, vendor=0x10DE, device=0x2330, numa_node=numa,
                               link=LINK_GEN5_X16, config=cfg, iommu_group=self._group(iommu),
                               resources=gpu_resources(bar1))
        self.layout.gpus.append(place)
        return fn

    def nic(self, addr: str, parent, numa: int, place: Place, *, rdma: str | None, netdev: str | None,
            iommu: str | None = None) -> PciFunction:
        cfg = config_space(0x15B3, 0x1021, 0x020700, size=self.size)
        fn = self.node.add_pci(addr, 0x020700, parent, vendor=0x15B3, device=0x1021, numa_node=numa,
                               link=LINK_GEN5_X16, config=cfg, iommu_group=self._group(iommu))
        if netdev:
            self.node.add_netdev(netdev, fn, rx_bytes=0, tx_bytes=0)
        if rdma:
            self.node.add_rdma(rdma, fn, {1: ("InfiniBand", 0, 0)})
        place.name = netdev or rdma or addr
        self.layout.nics.append(place)
        return fn


def hgx_h100(
    root: Path,
    *,
    redirect_switch: int | None = None,
    acs: bool = True,
    config_size: int = 4096,
    bar1: int = 128 * GIB,
) -> Layout:
    """An HGX H100-like node: 2 sockets, 4 PCIe switches (2 per socket, each on its own host bridge),
    each switch with 2 H100 GPUs and 2 ConnectX-7 NICs on its downstream ports; one extra
    ConnectX-7 on a CPU root port of switch 0's host bridge; the BMC's ASPEED VGA on pci0000:00.

    redirect_switch: that switch's downstream ports get the ACS bits Linux sets when an IOMMU
    translates (SV RR CR UF), and their groups are DMA-FQ. acs=False: no bridge has an ACS
    capability. config_size=64: what an unprivileged reader gets."""
    node = FakeNode(root)
    b = _Builder(node, config_size=config_size, acs=acs, iommu_type="identity")
    add_numa_nodes(node, 2)
    nic_no = 0
    for sw, (bus, socket) in enumerate(((0x15, 0), (0x37, 0), (0x9A, 1), (0xBA, 1))):
        hb = f"pci0000:{bus:02x}"
        host = node.root_bus(f"0000:{bus:02x}")
        rp = b.bridge(f"0000:{bus:02x}:01.0", host, PORT_ROOT, socket, acs_ctrl=ACS_KERNEL,
                      vendor=0x8086, device=0x352A)
        b.layout.root_ports[hb] = rp.addr
        usp = b.bridge(f"0000:{bus + 1:02x}:00.0", rp, PORT_UP, socket)
        redirect = sw == redirect_switch
        ports = []
        for port in range(4):
            dsp = b.bridge(f"0000:{bus + 2:02x}:{port:02x}.0", usp, PORT_DOWN, socket,
                           acs_ctrl=ACS_KERNEL if redirect else 0, iommu="DMA-FQ" if redirect else None)
            ports.append(dsp.addr)
            ep = f"0000:{bus + 3 + port:02x}:00.0"
            place = Place(ep, hb, socket, f"switch{sw}")
            if port % 2 == 0:
                b.gpu(ep, dsp, socket, place, bar1=bar1, iommu="DMA-FQ" if redirect else None)
            else:
                b.nic(ep, dsp, socket, place, rdma=f"mlx5_{nic_no}", netdev=None,
                      iommu="DMA-FQ" if redirect else None)
                nic_no += 1
        b.layout.switch_ports[f"switch{sw}"] = ports
        if sw == 0:
            rp2 = b.bridge(f"0000:{bus:02x}:02.0", host, PORT_ROOT, socket, acs_ctrl=ACS_KERNEL,
                           vendor=0x8086, device=0x352B)
            extra = f"0000:{bus + 7:02x}:00.0"
            b.nic(extra, rp2, socket, Place(extra, hb, socket, None), rdma="mlx5_8", netdev="eth0")
    # The BMC console: a display-class function that is not a compute GPU.
    node.add_pci("0000:02:00.0", 0x030000, node.root_bus("0000:00"), vendor=0x1A03, device=0x2000,
                 numa_node=0, link=("5.0 GT/s PCIe", 1, "5.0 GT/s PCIe", 1))
    return b.layout


def cascade(root: Path, *, config_size: int = 4096) -> Layout:
    """Two levels of switches under one root port: a top switch whose two downstream ports each
    lead to a leaf switch with a GPU and a NIC (GPU and NIC of one leaf: PIX; across leaves: PXB)."""
    node = FakeNode(root)
    b = _Builder(node, config_size=config_size, acs=True, iommu_type="identity")
    host = node.root_bus("0000:40")
    rp = b.bridge("0000:40:01.0", host, PORT_ROOT, 0, acs_ctrl=ACS_KERNEL, vendor=0x8086, device=0x352A)
    top = b.bridge("0000:41:00.0", rp, PORT_UP, 0)
    bus = 0x43
    for leaf in range(2):
        tdsp = b.bridge(f"0000:42:{leaf:02x}.0", top, PORT_DOWN, 0)
        lusp = b.bridge(f"0000:{bus:02x}:00.0", tdsp, PORT_UP, 0)
        for port in range(2):
            ldsp = b.bridge(f"0000:{bus + 1:02x}:{port:02x}.0", lusp, PORT_DOWN, 0)
            ep = f"0000:{bus + 2 + port:02x}:00.0"
            place = Place(ep, "pci0000:40", 0, "top", leaf=f"leaf{leaf}")
            if port == 0:
                b.gpu(ep, ldsp, 0, place)
            else:
                b.nic(ep, ldsp, 0, place, rdma=None, netdev=f"ens{leaf}")
        bus += 4
    return b.layout


def no_gpu(root: Path) -> Layout:
    """A CPU-only node: two NICs on root ports, no GPU (like this test machine)."""
    node = FakeNode(root)
    b = _Builder(node, config_size=4096, acs=True, iommu_type="DMA")
    host = node.root_bus("0000:00")
    for i in range(2):
        rp = b.bridge(f"0000:00:0{i + 1}.0", host, PORT_ROOT, 0, acs_ctrl=ACS_KERNEL, vendor=0x8086)
        b.nic(f"0000:0{i + 1}:00.0", rp, 0, Place(f"0000:0{i + 1}:00.0", "pci0000:00", 0, None),
              rdma=None, netdev=f"eno{i + 1}")
    return b.layout
