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
from typing import NamedTuple

from ..counters import CounterAbsorber
from ..fsread import read_int, read_optional_str, read_text
from .base import Snapshot, SourceUnavailable
from .pciaddr import pci_of_class_link

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
        self._totals = _NicTotals()

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
        for iface, netdev in sorted(stats.items()):
            pci = pci_of_class_link(os.path.join(self._sysfs, "class/net", iface))
            if not self._selected(iface, pci):
                continue
            if pci:
                counted.add(pci)
            self._emit(snap, iface, pci, netdev, rdma.get(pci, []) if pci else [], pci in broken)
        # An RDMA NIC with no netdev (an InfiniBand HCA without IPoIB) still moves bytes: count it
        # under its RDMA device name.
        for pci, ports in sorted(rdma.items()):
            name = ports[0].device
            if pci not in counted and self._selected(name, pci):
                self._emit(snap, name, pci, None, ports, pci in broken)
        return snap

    def _emit(self, snap: Snapshot, nic: str, pci: str, netdev: tuple[int, int] | None,
              ports: list[_Port], broken: bool) -> None:
        if broken and not self._totals.known(nic):
            # A port counter is unreadable before this NIC was ever counted: netdev bytes now and
            # port bytes later would not be one counter. Skip it until then (the fault is recorded).
            return
        before = self._totals.absorbed()
        rx, tx = self._totals.update(nic, netdev, ports)
        snap.resets += self._totals.absorbed() - before
        snap.counter(RX, rx, nic=nic, pci_bus_id=pci)
        snap.counter(TX, tx, nic=nic, pci_bus_id=pci)


class _Port(NamedTuple):
    link_layer: str
    rx: int  # bytes
    tx: int
    device: str
    port: str


class _NicTotals:
    """Each NIC's byte counters as the sum of its parts (its netdev statistics and each RDMA port),
    each part absorbed on its own. The sum is not a device counter: an RDMA device that vanishes
    (mlx5_ib unloaded, a sysfs link re-created, a port counter unreadable for a cycle) would
    otherwise take the NIC's counter down to its netdev bytes (a fake reset) and, when it returns,
    up by the port's whole history (a jump). So a missing part holds its last value, a part that
    restarts is absorbed like any counter, and a part first seen after the NIC (the RDMA driver
    loaded later) adds only its increase.

    RoCE: netdev bytes plus port bytes (RDMA traffic bypasses the netdev stack). InfiniBand: port
    bytes only (the IPoIB netdev's traffic is inside them); a NIC stays InfiniBand while its ports
    are gone."""

    def __init__(self) -> None:
        self._absorber = CounterAbsorber()
        self._parts: dict[str, set[str]] = {}
        self._base: dict[tuple[str, str, int], float] = {}
        self._infiniband: dict[str, bool] = {}

    def known(self, nic: str) -> bool:
        return nic in self._parts

    def absorbed(self) -> int:
        """Wraps and resets of parts absorbed so far (each direction counts)."""
        return self._absorber.wraps + self._absorber.resets

    def update(self, nic: str, netdev: tuple[int, int] | None, ports: list[_Port]) -> tuple[float, float]:
        first = nic not in self._parts
        parts = self._parts.setdefault(nic, set())
        if ports:
            self._infiniband[nic] = all(p.link_layer == "InfiniBand" for p in ports)
        ib = self._infiniband.get(nic, False)
        now = [(f"{p.device}/{p.port}", (p.rx, p.tx)) for p in ports]
        if netdev is not None:
            now.append(("netdev", netdev))
        for part, raw in now:
            for i in (0, 1):
                v = self._absorber.update((nic, part, i), raw[i])
                if part not in parts and not first:
                    self._base[(nic, part, i)] = v  # a late part counts from here
            parts.add(part)
        out = [0.0, 0.0]
        for part in parts:
            if ib and part == "netdev":
                continue
            for i in (0, 1):
                key = (nic, part, i)
                out[i] += (self._absorber.value((nic, part, i)) or 0.0) - self._base.get(key, 0.0)
        return out[0], out[1]


def _rdma_by_pci(sysfs: Path, snap: Snapshot) -> tuple[dict[str, list[_Port]], set[str]]:
    """PCI function -> its RDMA ports, and the PCI functions with a port whose counters could not
    be read."""
    out: dict[str, list[_Port]] = {}
    broken: set[str] = set()
    base = sysfs / "class/infiniband"
    try:
        devices = sorted(os.listdir(base))
    except OSError:
        return out, broken
    for dev in devices:
        pci = pci_of_class_link(base / dev)
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
            out.setdefault(pci, []).append(_Port(ll, rx, tx, dev, port))
    return out, broken


def _ports(dev: Path, snap: Snapshot) -> list[tuple[str, Path]]:
    try:
        ports = sorted(os.listdir(dev / "ports"), key=lambda p: (len(p), p))
    except OSError as e:
        snap.fault("cannot list RDMA ports", e)
        return []
    return [(p, dev / "ports" / p / "counters") for p in ports]
