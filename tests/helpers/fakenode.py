"""Writes fixture sysfs/procfs trees in the exact kernel layout (real symlinks, real file formats),
so sources, node_exporter and tests all read the same bytes. Nothing here imports pcietax: the
fixtures describe the kernel, not our code's idea of it.

Layout reproduced (as on a real host):
  sys/devices/pci0000:BB/<root port>/.../<function>/           device directories
  sys/bus/pci/devices/<function> -> ../../../devices/...       relative links
  sys/class/net/<iface> -> ../../devices/.../<function>/net/<iface>
  sys/class/net/<iface>/device -> ../../../<function>
  sys/class/infiniband/<dev> -> ../../devices/.../<function>/infiniband/<dev>
  proc/net/dev, proc/interrupts, proc/softirqs, proc/stat
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

SOFTIRQ_VECTORS = (
    "HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU",
)


@dataclass
class PciFunction:
    addr: str
    path: Path  # the real directory under sys/devices


@dataclass
class FakeNode:
    root: Path
    ncpu: int = 4
    _netdev: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sys = self.root / "sys"
        self.proc = self.root / "proc"
        for d in ("devices", "bus/pci/devices", "class/net", "class/infiniband"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        (self.proc / "net").mkdir(parents=True, exist_ok=True)

    # -- PCI ----------------------------------------------------------------------------------

    def root_bus(self, domain_bus: str = "0000:00") -> Path:
        p = self.sys / "devices" / f"pci{domain_bus}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def add_pci(
        self,
        addr: str,
        pci_class: int,
        parent: Path | PciFunction | None = None,
        *,
        vendor: int = 0x15B3,
        device: int = 0x1021,
        link: tuple[str, int, str, int] | None = ("32.0 GT/s PCIe", 16, "32.0 GT/s PCIe", 16),
        numa_node: int = 0,
        config: bytes | None = None,
        aer_correctable: dict[str, int] | None = None,
        iommu_group: int | None = None,
        resources: list[tuple[int, int, int]] | None = None,
    ) -> PciFunction:
        if parent is None:
            parent_path = self.root_bus("0000:00")
        elif isinstance(parent, PciFunction):
            parent_path = parent.path
        else:
            parent_path = parent
        path = parent_path / addr
        path.mkdir(parents=True, exist_ok=True)
        w = _writer(path)
        w("class", f"0x{pci_class:06x}")
        w("vendor", f"0x{vendor:04x}")
        w("device", f"0x{device:04x}")
        w("numa_node", str(numa_node))
        if link is not None:
            cs, cw, ms, mw = link
            w("current_link_speed", cs)
            w("current_link_width", str(cw))
            w("max_link_speed", ms)
            w("max_link_width", str(mw))
        if config is not None:
            (path / "config").write_bytes(config)
        if aer_correctable is not None:
            keys = (
                "RxErr", "BadTLP", "BadDLLP", "Rollover", "Timeout", "NonFatalErr", "CorrIntErr", "HeaderOF",
            )
            lines = [f"{k} {aer_correctable.get(k, 0)}" for k in keys]
            lines.append(f"TOTAL_ERR_COR {sum(aer_correctable.get(k, 0) for k in keys)}")
            w("aer_dev_correctable", "\n".join(lines))
        if iommu_group is not None:
            g = self.sys / "kernel/iommu_groups" / str(iommu_group)
            (g / "devices").mkdir(parents=True, exist_ok=True)
            _symlink(path, g / "devices" / addr)
            _symlink(g, path / "iommu_group")
        if resources is not None:
            w("resource", "\n".join(f"0x{s:016x} 0x{e:016x} 0x{f:016x}" for s, e, f in resources))
        _symlink(path, self.sys / "bus/pci/devices" / addr)
        return PciFunction(addr, path)

    # -- NICs ---------------------------------------------------------------------------------

    def add_netdev(self, name: str, fn: PciFunction | None, rx_bytes: int, tx_bytes: int) -> None:
        """A netdev; fn=None makes a virtual one (lo, bridge, veth) with no device link."""
        if fn is None:
            real = self.sys / "devices/virtual/net" / name
        else:
            real = fn.path / "net" / name
            real.mkdir(parents=True, exist_ok=True)
        real.mkdir(parents=True, exist_ok=True)
        if fn is not None:
            _symlink(fn.path, real / "device")
        (real / "statistics").mkdir(exist_ok=True)
        _writer(real / "statistics")("rx_bytes", str(rx_bytes))
        _writer(real / "statistics")("tx_bytes", str(tx_bytes))
        _symlink(real, self.sys / "class/net" / name)
        self._netdev[name] = (rx_bytes, tx_bytes)
        self.write_net_dev()

    def set_netdev_bytes(self, name: str, rx_bytes: int, tx_bytes: int) -> None:
        self._netdev[name] = (rx_bytes, tx_bytes)
        real = Path(os.path.realpath(self.sys / "class/net" / name))
        _writer(real / "statistics")("rx_bytes", str(rx_bytes))
        _writer(real / "statistics")("tx_bytes", str(tx_bytes))
        self.write_net_dev()

    def remove_netdev(self, name: str) -> None:
        self._netdev.pop(name, None)
        (self.sys / "class/net" / name).unlink()
        self.write_net_dev()

    def write_net_dev(self) -> None:
        lines = [
            "Inter-|   Receive                                                |  Transmit",
            " face |bytes    packets errs drop fifo frame compressed multicast|"
            "bytes    packets errs drop fifo colls carrier compressed",
        ]
        for name, (rx, tx) in self._netdev.items():
            rx_p, tx_p = rx // 1500, tx // 1500
            lines.append(f"{name:>6}: {rx:>8} {rx_p:>7} 0 0 0 0 0 0 {tx:>8} {tx_p:>7} 0 0 0 0 0 0")
        (self.proc / "net/dev").write_text("\n".join(lines) + "\n")

    def add_rdma(
        self, dev: str, fn: PciFunction, ports: dict[int, tuple[str, int, int]], netdevs: list[str] = ()
    ) -> None:
        """An RDMA device; ports: port -> (link_layer, port_rcv_data words, port_xmit_data words)."""
        real = fn.path / "infiniband" / dev
        real.mkdir(parents=True, exist_ok=True)
        _symlink(fn.path, real / "device")
        w = _writer(real)
        w("board_id", "MT_0000000838")
        w("fw_ver", "28.39.1002")
        w("hca_type", "MT4129")
        w("node_type", "1: CA")
        for port, (ll, rcv, xmit) in ports.items():
            self.set_rdma_port(dev, port, ll, rcv, xmit, real=real)
        _symlink(real, self.sys / "class/infiniband" / dev)

    def set_rdma_port(self, dev: str, port: int, link_layer: str, rcv_words: int, xmit_words: int,
                      real: Path | None = None) -> None:
        real = real or Path(os.path.realpath(self.sys / "class/infiniband" / dev))
        p = real / "ports" / str(port)
        (p / "counters").mkdir(parents=True, exist_ok=True)
        w = _writer(p)
        w("link_layer", link_layer)
        w("state", "4: ACTIVE")
        w("phys_state", "5: LinkUp")
        w("rate", "400 Gb/sec (4X NDR)")
        c = _writer(p / "counters")
        c("port_rcv_data", str(rcv_words))
        c("port_xmit_data", str(xmit_words))
        c("port_rcv_packets", str(rcv_words // 1024))
        c("port_xmit_packets", str(xmit_words // 1024))

    # -- procfs -------------------------------------------------------------------------------

    def write_interrupts(self, lines: list[tuple[str, list[int], str]]) -> None:
        """lines: (irq, per-CPU counts, tail) where tail is e.g. 'PCI-MSI 524288-edge mlx5_comp0@pci:...'
        for numbered IRQs or 'Local timer interrupts' for named ones."""
        head = " " * 11 + "".join(f"CPU{i:<8}" for i in range(self.ncpu))
        out = [head.rstrip()]
        for irq, counts, tail in lines:
            out.append(f"{irq + ':':>4} " + " ".join(f"{c:>10}" for c in counts) + f"   {tail}")
        (self.proc / "interrupts").write_text("\n".join(out) + "\n")

    def write_softirqs(self, counts: dict[str, list[int]]) -> None:
        head = " " * 20 + "".join(f"CPU{i:<8}" for i in range(self.ncpu))
        out = [head.rstrip()]
        for vec in SOFTIRQ_VECTORS:
            vals = counts.get(vec, [0] * self.ncpu)
            out.append(f"{vec + ':':>12}" + "".join(f" {v:>10}" for v in vals))
        (self.proc / "softirqs").write_text("\n".join(out) + "\n")

    def write_stat(self, irq_ticks: list[int], softirq_ticks: list[int]) -> None:
        """/proc/stat with per-CPU irq and softirq columns (USER_HZ ticks); the aggregate line sums them."""
        def row(name: str, irq: int, sirq: int) -> str:
            return f"{name} 1000 0 500 90000 10 {irq} {sirq} 0 0 0"

        out = [row("cpu ", sum(irq_ticks), sum(softirq_ticks)).replace("cpu  ", "cpu  ")]
        out += [row(f"cpu{i}", irq_ticks[i], softirq_ticks[i]) for i in range(self.ncpu)]
        out += ["intr 0", "ctxt 12345", "btime 1700000000", "processes 100", "procs_running 1",
                "procs_blocked 0", "softirq 0"]
        (self.proc / "stat").write_text("\n".join(out) + "\n")

    # -- bad input and edits (added for the source tests) ------------------------------------

    def write_raw(self, relpath: str, content: str | bytes) -> Path:
        """Any file under the fixture root, byte for byte (garbage, truncation, odd formats)."""
        p = self.root / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p

    def make_directory_in_place(self, relpath: str) -> Path:
        """Replace a file with a directory: open() fails with EISDIR even for root, the way an
        unreadable file fails for a reader without permission."""
        p = self.root / relpath
        if p.is_symlink() or p.is_file():
            p.unlink()
        p.mkdir(parents=True, exist_ok=True)
        return p

    def remove_rdma(self, dev: str) -> None:
        (self.sys / "class/infiniband" / dev).unlink()

    def netdev_dir(self, name: str) -> Path:
        return Path(os.path.realpath(self.sys / "class/net" / name))


def _writer(d: Path):
    d.mkdir(parents=True, exist_ok=True)

    def w(name: str, text: str) -> None:
        (d / name).write_text(text + "\n")

    return w


def _symlink(target: Path, link: Path) -> None:
    """A relative symlink, as sysfs has them, so the tree can be moved or bind-mounted."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


def pcie_config_space(mps: int, length: int = 256) -> bytes:
    """A type-0 config space with a PCI Express capability at 0x40 whose Device Control programs
    ``mps`` (bits 7:5); cut to ``length`` bytes, as an unprivileged reader sees only the first 64."""
    data = bytearray(4096)
    data[0x00:0x02] = (0x15B3).to_bytes(2, "little")
    data[0x06:0x08] = (0x0010).to_bytes(2, "little")  # status: capability list present
    data[0x34] = 0x40
    data[0x40], data[0x41] = 0x10, 0x00  # PCI Express capability, end of list
    data[0x42:0x44] = (0x0002).to_bytes(2, "little")  # capability version 2, endpoint
    code = {128: 0, 256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}[mps]
    data[0x48:0x4A] = (code << 5).to_bytes(2, "little")  # Device Control
    return bytes(data[:length])
