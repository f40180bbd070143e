"""NIC byte counters: /proc/net/dev for the counters (the file node_exporter reads), sysfs for what
each interface is. Each physical NIC is counted once (DESIGN.md section 2):

- a plain Ethernet NIC: its netdev bytes;
- a RoCE NIC (RDMA port with link layer Ethernet): netdev bytes plus RDMA port bytes, because
  RDMA traffic is offloaded around the netdev stack and does not appear in its statistics;
- an InfiniBand HCA (link layer InfiniBand): RDMA port bytes only; its IPoIB netdev's traffic is
  already inside the port counters.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from ..fsread import read_int, read_optional_str, read_text
from .base import Snapshot, SourceUnavailable
from .pciaddr import pci_of_device_link

RX = "pcietax_nic_receive_bytes_total"
TX = "pcietax_nic_transmit_bytes_total"


def parse_net_dev(text: str, snap: Snapshot, where: str) -> dict[str, tuple[int, int]]:
    """``/proc/net/dev`` -> iface -> (rx_bytes, tx_bytes); a bad line is a fault, not a failure."""
    out: dict[str, tuple[int, int]] = {}
    for n, line in enumerate(text.splitlines()[2:], start=3):
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 16:
            snap.fault("truncated line", f"{where}:{n}")
            continue
        try:
            out[name.strip()] = (int(fields[0]), int(fields[8]))
        except ValueError:
            snap.fault("not a number", f"{where}:{n}")
    return out


class NetdevSource:
    name = "netdev"

    def __init__(self, procfs: str = "/proc", sysfs: str = "/sys", nics: list[str] | None = None) -> None:
        self._procfs = Path(procfs)
        self._sysfs = Path(sysfs)
        self._nics = list(nics or [])

    def start(self) -> None:
        path = self._procfs / "net/dev"
        if not os.access(path, os.R_OK):
            raise SourceUnavailable(f"cannot read {path}")

    def close(self) -> None:
        pass

    def _selected(self, iface: str, pci: str) -> bool:
        if self._nics:
            # Shell-style globs, as interface names are written on the command line (eth*, ens5f?).
            return any(fnmatch.fnmatchcase(iface, n) for n in self._nics)
        return bool(pci)  # default: physical NICs only (no lo, bridges, veth, tunnels)

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({RX, TX}))
        where = str(self._procfs / "net/dev")
        try:
            stats = parse_net_dev(read_text(where), snap, where)
        except (OSError, UnicodeDecodeError) as e:
            raise SourceUnavailable(f"cannot read {where}: {e}") from e
        rdma, broken = _rdma_by_pci(self._sysfs, snap)
        counted: set[str] = set()
        for iface, (rx, tx) in sorted(stats.items()):
            pci = pci_of_device_link(self._sysfs / "class/net" / iface / "device")
            if not self._selected(iface, pci):
                continue
            if pci in broken:
                # A port counter of this NIC is unreadable: netdev bytes alone would look like a reset
                # now and a jump later. Skip the NIC this cycle (the fault is already recorded).
                continue
            ports = rdma.get(pci) if pci else None
            if ports is not None:
                counted.add(pci)
                rx, tx = _with_ports(rx, tx, ports)
            snap.counter(RX, rx, nic=iface, pci_bus_id=pci)
            snap.counter(TX, tx, nic=iface, pci_bus_id=pci)
        # An RDMA NIC with no netdev (an InfiniBand HCA without IPoIB) still moves bytes: count it
        # under its RDMA device name.
        for pci, ports in sorted(rdma.items()):
            name = ports[0][3]
            if pci in counted or pci in broken or not self._selected(name, pci):
                continue
            rx, tx = _with_ports(0, 0, ports)
            snap.counter(RX, rx, nic=name, pci_bus_id=pci)
            snap.counter(TX, tx, nic=name, pci_bus_id=pci)
        return snap


def _with_ports(rx: int, tx: int, ports: list[tuple[str, int, int, str]]) -> tuple[int, int]:
    """Netdev bytes plus port bytes for RoCE; port bytes only for InfiniBand (IPoIB is inside them)."""
    prx = sum(r for _, r, _, _ in ports)
    ptx = sum(t for _, _, t, _ in ports)
    if {ll for ll, _, _, _ in ports} == {"InfiniBand"}:
        return prx, ptx
    return rx + prx, tx + ptx


def _rdma_by_pci(
    sysfs: Path, snap: Snapshot
) -> tuple[dict[str, list[tuple[str, int, int, str]]], set[str]]:
    """PCI function -> [(link_layer, rx_bytes, tx_bytes, rdma_device) per RDMA port], and the PCI
    functions with a port whose counters could not be read."""
    out: dict[str, list[tuple[str, int, int, str]]] = {}
    broken: set[str] = set()
    base = sysfs / "class/infiniband"
    try:
        devices = sorted(os.listdir(base))
    except OSError:
        return out, broken
    for dev in devices:
        pci = pci_of_device_link(base / dev / "device")
        if not pci:
            continue
        for port, counters in _ports(base / dev, snap):
            ll = read_optional_str(base / dev / "ports" / port / "link_layer") or "InfiniBand"
            try:
                rx = read_int(counters / "port_rcv_data") * 4
                tx = read_int(counters / "port_xmit_data") * 4
            except FileNotFoundError:
                continue  # a port without data counters (SR-IOV VF), as the rdma source treats it
            except (OSError, ValueError, UnicodeDecodeError) as e:
                snap.fault("unreadable RDMA counter", e)
                broken.add(pci)
                continue
            out.setdefault(pci, []).append((ll, rx, tx, dev))
    return out, broken


def _ports(dev: Path, snap: Snapshot) -> list[tuple[str, Path]]:
    try:
        ports = sorted(os.listdir(dev / "ports"), key=lambda p: (len(p), p))
    except OSError as e:
        snap.fault("cannot list RDMA ports", e)
        return []
    return [(p, dev / "ports" / p / "counters") for p in ports]
