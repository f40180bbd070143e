"""Read the PCI tree from sysfs: every function under ``bus/pci/devices``, resolved to its real
place under ``devices/pciDDDD:BB/...``, with what the path verdict needs (class, NUMA node, link,
IOMMU group, ACS of bridges, BAR sizes of GPUs, the NIC's netdev and RDMA names).

Bad input never raises: a dangling or looping link, a garbage or unreadable file, a device that
vanishes while we walk, each leaves the affected device with ``problems`` (its facts unknown) and
the walk goes on. All reads go through ``SysfsReader`` so a test can make a device vanish at an
exact moment of the walk (on a real fixture tree) instead of patching the filesystem."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..pciclass import classify
from ..pcie_config import Acs, Config
from ..sources.pciaddr import PCI_ADDR, pci_of_class_entry

HOST_BRIDGE = re.compile(r"^pci[0-9a-f]{4,8}:[0-9a-f]{2}$")
CONFIG_MAX = 4096

# IORESOURCE flags in sysfs ``resource`` (include/linux/ioport.h).
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000


class SysfsReader:
    """Every filesystem access of the walk; raises OSError/UnicodeDecodeError like the real calls."""

    def listdir(self, path: Path) -> list[str]:
        return os.listdir(path)

    def realpath(self, path: Path) -> Path:
        return Path(os.path.realpath(path, strict=True))

    def read_str(self, path: Path) -> str:
        with open(path, encoding="ascii", errors="strict") as f:
            return f.read().strip()

    def read_bytes(self, path: Path, size: int) -> bytes:
        with open(path, "rb") as f:
            return f.read(size)

    def link_name(self, path: Path) -> str | None:
        try:
            return Path(os.readlink(path)).name
        except OSError:
            return None

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)


@dataclass(frozen=True)
class Link:
    speed_gts: float
    width: int
    max_speed_gts: float | None = None
    max_width: int | None = None

    @property
    def degraded(self) -> bool:
        return (self.max_speed_gts is not None and self.speed_gts < self.max_speed_gts) or (
            self.max_width is not None and self.width < self.max_width
        )

    def __str__(self) -> str:
        return f"{self.speed_gts:g} GT/s x{self.width}"


@dataclass
class PciDev:
    addr: str
    host_bridge: str | None = None  # "pci0000:16": the root complex (PCIe host bridge) above it
    chain: tuple[str, ...] = ()  # bridges from the root port down to the parent, in order
    kind: str = "unknown"  # gpu, nic, bridge, other, unknown
    pci_class: int | None = None
    vendor: int | None = None
    device: int | None = None
    numa_node: int | None = None  # None: the kernel gave -1 or it could not be read
    link: Link | None = None
    iommu_group: str | None = None
    iommu_type: str | None = None
    acs: Acs | None = None  # bridges only
    port_type: int | None = None  # bridges, when config space was readable
    bar_bytes: int | None = None  # GPUs: the largest prefetchable memory BAR (BAR1 on NVIDIA)
    bars: tuple[tuple[int, int], ...] = ()  # (index, size) of memory BARs
    netdevs: tuple[str, ...] = ()
    rdma: tuple[str, ...] = ()
    virtual_function: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def placed(self) -> bool:
        """True when we know where in the tree the device sits."""
        return self.host_bridge is not None

    @property
    def name(self) -> str:
        """NIC label: netdev name, else RDMA device name, else the PCI address (DESIGN.md)."""
        if self.netdevs:
            return self.netdevs[0]
        if self.rdma:
            return self.rdma[0]
        return self.addr


@dataclass
class Tree:
    sysfs: str
    devices: dict[str, PciDev]
    numa_nodes: int  # NUMA nodes the kernel reports (0 when sysfs has no node directory)
    problems: list[tuple[str, str]]  # (device or path, reason) for entries we could not read at all

    def gpus(self) -> list[PciDev]:
        return [d for d in self.devices.values() if d.kind == "gpu"]

    def nics(self) -> list[PciDev]:
        return [d for d in self.devices.values() if d.kind == "nic"]


class TopologyUnavailable(Exception):
    """The sysfs root has no PCI bus at all (wrong --path.sysfs, or a container without /sys)."""


def read_tree(sysfs: str | os.PathLike[str], reader: SysfsReader | None = None) -> Tree:
    r = reader or SysfsReader()
    root = Path(sysfs)
    bus = root / "bus/pci/devices"
    try:
        names = sorted(r.listdir(bus))
    except OSError as e:
        raise TopologyUnavailable(f"no PCI bus under {root} ({bus}: {e.strerror or e})") from e
    tree = Tree(str(root), {}, _numa_nodes(root, r), [])
    for name in names:
        if not PCI_ADDR.match(name):
            tree.problems.append((str(bus / name), "not a PCI address; skipped"))
            continue
        dev = _read_device(r, root, bus / name, name)
        tree.devices[name] = dev
    _attach_names(r, root, tree)
    return tree


def _numa_nodes(root: Path, r: SysfsReader) -> int:
    try:
        return sum(1 for n in r.listdir(root / "devices/system/node") if re.fullmatch(r"node\d+", n))
    except OSError:
        return 0


def _why(e: BaseException) -> str:
    if isinstance(e, OSError):
        if e.errno == errno.ELOOP:
            return "symlink loop"
        if e.errno == errno.ENOENT:
            return "gone (dangling link or vanished during the walk)"
        if e.errno == errno.EISDIR:
            return "is a directory, not a file"
        return e.strerror or type(e).__name__
    if isinstance(e, UnicodeDecodeError):
        return "not ASCII text"
    return str(e)


def _read_device(r: SysfsReader, root: Path, link: Path, addr: str) -> PciDev:
    dev = PciDev(addr)
    try:
        real = r.realpath(link)
    except OSError as e:
        dev.problems.append(f"cannot resolve {link}: {_why(e)}")
        return dev
    parts = real.parts
    hb = max((i for i, p in enumerate(parts) if HOST_BRIDGE.match(p)), default=None)
    if hb is None:
        dev.problems.append(f"{real} is not below a PCI host bridge (pciDDDD:BB)")
    elif parts[-1] != addr:
        dev.problems.append(f"{link} points at {real}, not at {addr}")
    else:
        chain = parts[hb + 1 : -1]
        bad = [p for p in chain if not PCI_ADDR.match(p)]
        if bad:
            dev.problems.append(f"unexpected component {bad[0]!r} in {real}")
        else:
            dev.host_bridge, dev.chain = parts[hb], tuple(chain)

    try:
        cls_text = r.read_str(real / "class")
    except (OSError, UnicodeDecodeError) as e:
        dev.problems.append(f"class unreadable: {_why(e)}")
        return dev
    try:
        dev.pci_class = int(cls_text, 16)
    except ValueError:
        dev.problems.append(f"garbage class {cls_text[:20]!r}")
        return dev
    dev.vendor = _hex(r, real / "vendor", dev)
    dev.device = _hex(r, real / "device", dev)
    dev.kind = classify(dev.pci_class, dev.vendor)
    if dev.kind not in ("gpu", "nic", "bridge"):
        return dev  # the rest of the node only needs to be placed, not described

    dev.numa_node = _numa(r, real / "numa_node", dev)
    dev.link = _link(r, real, dev)
    group = r.link_name(real / "iommu_group")
    if group is not None:
        dev.iommu_group = group
        try:
            dev.iommu_type = r.read_str(root / "kernel/iommu_groups" / group / "type")
        except (OSError, UnicodeDecodeError):
            dev.iommu_type = None  # kernels before 5.11 have no type file
    dev.virtual_function = r.exists(real / "physfn")
    if dev.kind == "bridge":
        _read_bridge(r, real, dev)
    elif dev.kind == "gpu":
        _read_bars(r, real, dev)
    return dev


def _hex(r: SysfsReader, path: Path, dev: PciDev) -> int | None:
    try:
        return int(r.read_str(path), 16)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        dev.problems.append(f"{path.name} unreadable: {_why(e)}")
        return None


def _numa(r: SysfsReader, path: Path, dev: PciDev) -> int | None:
    try:
        n = int(r.read_str(path))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        dev.problems.append(f"numa_node unreadable: {_why(e)}")
        return None
    return n if n >= 0 else None


_SPEED = re.compile(r"^([0-9.]+)\s*GT/s")


def _link(r: SysfsReader, real: Path, dev: PciDev) -> Link | None:
    vals: dict[str, tuple[float, int]] = {}
    for state in ("current", "max"):
        try:
            s = r.read_str(real / f"{state}_link_speed")
            w = r.read_str(real / f"{state}_link_width")
        except (OSError, UnicodeDecodeError):
            continue  # no PCIe link attributes (integrated or virtual function)
        m = _SPEED.match(s)
        if m and w.isdigit():
            vals[state] = (float(m.group(1)), int(w))
    if "current" not in vals:
        return None
    mx = vals.get("max")
    return Link(*vals["current"], *(mx if mx else (None, None)))


def _read_bridge(r: SysfsReader, real: Path, dev: PciDev) -> None:
    try:
        data = r.read_bytes(real / "config", CONFIG_MAX)
    except OSError as e:
        dev.acs = Acs("unknown", why=f"config unreadable: {_why(e)}")
        return
    cfg = Config(data)
    dev.acs = cfg.acs()
    dev.port_type = cfg.port_type()


def _read_bars(r: SysfsReader, real: Path, dev: PciDev) -> None:
    try:
        text = r.read_str(real / "resource")
    except (OSError, UnicodeDecodeError) as e:
        dev.problems.append(f"resource unreadable: {_why(e)}")
        return
    bars: list[tuple[int, int]] = []
    best = 0
    # Lines 0-5 are the six BAR slots (a 64-bit BAR fills one line and leaves the next empty).
    for i, line in enumerate(text.splitlines()[:6]):
        try:
            start, end, flags = (int(x, 16) for x in line.split())
        except ValueError:
            dev.problems.append(f"garbage resource line {i}: {line[:60]!r}")
            return
        if end <= start or not flags & IORESOURCE_MEM:
            continue
        size = end - start + 1
        bars.append((i, size))
        if flags & IORESOURCE_PREFETCH:
            best = max(best, size)
    dev.bars = tuple(bars)
    dev.bar_bytes = best or None
    if not best:
        dev.problems.append("no prefetchable memory BAR in resource")


def _attach_names(r: SysfsReader, root: Path, tree: Tree) -> None:
    """netdev and RDMA names of each NIC function, from /sys/class (they may sit below a child
    device such as virtio; the entry may be the kernel's link or a directory with a ``device``
    link): the same helper as the netdev source, so both name the same NICs."""
    for cls, attr in (("net", "netdevs"), ("infiniband", "rdma")):
        try:
            names = sorted(r.listdir(root / "class" / cls))
        except OSError:
            continue
        found: dict[str, list[str]] = {}
        for n in names:
            pci = pci_of_class_entry(root / "class" / cls / n)
            if pci in tree.devices:
                found.setdefault(pci, []).append(n)
        for pci, ns in found.items():
            setattr(tree.devices[pci], attr, tuple(ns))
