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
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .. import catalog
from ..counters import FORGET_AFTER_CYCLES, CounterAbsorber
from ..fsread import PROCFS_MAX, READ_CHUNK, counter_value, read_bytes, read_optional_str, read_str, read_text
from .base import Sample, Snapshot, SourceAbsent, SourceUnavailable, labels_of
from .pciaddr import pci_of_class_entry

RX = catalog.NIC_RECEIVE_BYTES
TX = catalog.NIC_TRANSMIT_BYTES
IPOIB_RX = catalog.NIC_IPOIB_RECEIVE_BYTES
IPOIB_TX = catalog.NIC_IPOIB_TRANSMIT_BYTES

# What an RDMA counter reads where the device has no Performance Management Agent (older kernels,
# iWARP devices): not a number, not a fault; node_exporter skips it the same way.
NO_PMA = "N/A (no PMA)"
# How long the sysfs layout (which netdev is which PCI function, which RDMA ports there are, their
# link layers) is kept while the class/net and class/infiniband listings stay the same.
LAYOUT_REFRESH = 60.0
# The rdma source reads the same port data counters as this source's RDMA NICs: a value this source
# read less than this long ago serves it too (one read per file per cycle, and RDMA and NIC bytes of
# one port from the same instant). Short, so that a value from an earlier cycle is never served.
PORT_SHARE_S = 0.05
_PORT_READS: dict[str, tuple[float, int | None]] = {}  # counter path -> (when, bytes)
_PORT_READS_MAX = 4096  # ports that come and go (SR-IOV VFs): cleared past this


def parse_net_dev(text: str, snap: Snapshot, where: str) -> dict[str, tuple[int, int]]:
    """``/proc/net/dev`` -> iface -> (rx_bytes, tx_bytes); a bad line is a fault, not a failure.
    A file without its two header lines, or with no interface at all (every namespace has ``lo``),
    is broken as a whole: SourceUnavailable, so the engine holds every NIC's last counters instead
    of exporting a node without NICs."""
    lines = text.splitlines()
    if len(lines) < 2 or "|" not in lines[0] or "|" not in lines[1]:
        raise SourceUnavailable(f"{where}: no header (empty or cut file)")
    out: dict[str, tuple[int, int]] = {}
    for n, line in enumerate(lines[2:], start=3):
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 16:
            snap.fault("truncated line", f"{where}:{n}")
            continue
        try:
            out[name.strip()] = (counter_value(fields[0]), counter_value(fields[8]))
        except ValueError:
            snap.fault("not a number", f"{where}:{n}")
    if not out:
        raise SourceUnavailable(f"{where}: no interface readable")
    return out


class NetdevSource:
    name = "netdev"
    shares_lane = True  # kernel files only: read in the engine's shared lane

    def __init__(self, procfs: str = "/proc", sysfs: str = "/sys", nics: list[str] | None = None,
                 layout_refresh: float = LAYOUT_REFRESH, clock: Callable[[], float] = time.monotonic) -> None:
        self._procfs = Path(procfs)
        self._sysfs = Path(sysfs)
        self._nics = list(nics or [])
        self._totals = _NicTotals()
        self._layout_refresh = layout_refresh
        self._clock = clock
        self._layout: _Layout | None = None
        self._sensed_b: frozenset[bytes] = frozenset()  # the netdevs the last read counted
        self._sense_fd: int | None = None
        # (family, nic, pci) -> last read's sample: a value that did not move gives the same object
        # (no labels to build, and the engine absorbs it for free); only this read's are kept.
        self._last: dict[tuple[str, str, str], Sample] = {}
        self._now: dict[tuple[str, str, str], Sample] = {}

    def start(self) -> None:
        path = self._procfs / "net/dev"
        if not os.access(path, os.R_OK):
            raise SourceUnavailable(f"cannot read {path}")
        physical = self._current_layout(Snapshot()).netdevs  # faults are the first read's to count
        if not self._nics and not any(physical.values()) and not self._rdma_nics():
            raise SourceAbsent(f"no physical NIC under {self._sysfs / 'class/net'} (only virtual netdevs)")

    def _rdma_nics(self) -> bool:
        base = os.path.join(self._sysfs, "class/infiniband")
        try:
            return any(pci_of_class_entry(os.path.join(base, d)) for d in os.listdir(base))
        except OSError:
            return False

    def close(self) -> None:
        fd, self._sense_fd = self._sense_fd, None
        if fd is not None:
            os.close(fd)

    def _current_layout(self, snap: Snapshot) -> _Layout:
        """Which netdev is which PCI function and where each RDMA port's counters are: built from
        sysfs again when a netdev or RDMA device comes or goes (the two class listings differ) or
        every ``layout_refresh`` seconds, else kept. Rebuilding every read was 14 link reads and 3
        files per port for a layout that changes on hotplug, a driver load or a rename."""
        key = (_listing(os.path.join(self._sysfs, "class/net")),
               _listing(os.path.join(self._sysfs, "class/infiniband")))
        now = self._clock()
        cached = self._layout
        if cached is not None and cached.key == key and now - cached.at < self._layout_refresh:
            return cached
        faults = len(snap.faults)
        base = os.path.join(self._sysfs, "class/net")
        netdevs = {n: pci_of_class_entry(os.path.join(base, n)) for n in key[0] or ()}  # "" = virtual
        layout = _Layout(key, now, netdevs, _rdma_ports(self._sysfs, key[1] or (), snap))
        # A layout built with faults (a port directory unlistable) is not kept: the next read
        # tries again and counts the fault again, as every read did before.
        self._layout = layout if len(snap.faults) == faults else None
        return layout

    def _selected(self, iface: str, pci: str) -> bool:
        if self._nics:
            # Shell-style globs, as interface names are written on the command line (eth*, ens5f?).
            return any(fnmatch.fnmatchcase(iface, n) for n in self._nics)
        return bool(pci)  # default: physical NICs only (no lo, bridges, veth, tunnels)

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({RX, TX, IPOIB_RX, IPOIB_TX}))
        self._now = {}  # (a read that failed half way leaves nothing behind)
        where = str(self._procfs / "net/dev")
        try:
            stats = parse_net_dev(read_text(where, PROCFS_MAX), snap, where)
        except (OSError, UnicodeDecodeError) as e:
            raise SourceUnavailable(f"cannot read {where}: {e}") from e
        layout = self._current_layout(snap)
        rdma, broken = _rdma_counters(layout.ports, snap, self._clock)
        sysfs_pci = layout.netdevs
        with_netdev = {pci for pci in sysfs_pci.values() if pci}
        for iface in sorted(set(stats) | {i for i, p in sysfs_pci.items() if p}):
            pci = sysfs_pci.get(iface, "")
            if not self._selected(iface, pci):
                continue
            netdev = stats.get(iface)
            if netdev is None and not self._totals.known(iface):
                continue  # in sysfs, not (yet) in /proc/net/dev: nothing to count from
            # A netdev whose /proc/net/dev line is bad this read keeps its last bytes (held).
            self._emit(snap, iface, pci, netdev, rdma.get(pci, []) if pci else [], pci in broken)
        # An RDMA NIC with no netdev at all (an InfiniBand HCA without IPoIB) still moves bytes:
        # count it under its RDMA device name. Only when sysfs has no netdev for it: a netdev
        # missing from a bad /proc/net/dev must not rename the NIC.
        for pci, ports in sorted(rdma.items()):
            name = ports[0].device
            if pci not in with_netdev and self._selected(name, pci):
                self._emit(snap, name, pci, None, ports, pci in broken)
        self._totals.end_read()
        self._last, self._now = self._now, {}
        self._sensed_b = frozenset(i.encode() for i in stats if self._totals.known(i))
        return snap

    def sense(self) -> float | None:
        """Bytes (rx + tx) the netdevs counted by the last read have moved, from ``/proc/net/dev``
        alone: the engine's at-rest check (engine.py). The kernel writes the file from its own
        counters, so it cannot block on hardware. None when no counted NIC has a netdev (an
        InfiniBand HCA without IPoIB: its port counters are read in full cycles only).

        It runs every 2 s on an idle node, where everything is cold: the file stays open
        (pread at 0 regenerates a seq_file) and only the counted lines are split, as bytes. Cold,
        that is 0.1 ms against 0.3 ms for a full parse of a freshly opened file."""
        names = self._sensed_b
        if not names:
            return None
        if self._sense_fd is None:
            self._sense_fd = os.open(self._procfs / "net/dev", os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(self._sense_fd, READ_CHUNK, 0)
        if len(data) == READ_CHUNK:  # a node with hundreds of netdevs: the whole file, as a read does
            data = read_bytes(self._procfs / "net/dev", PROCFS_MAX)
        total = found = 0
        for line in data.split(b"\n"):
            name, sep, rest = line.partition(b":")
            if sep and name.strip() in names:
                fields = rest.split()
                total += int(fields[0]) + int(fields[8])
                found += 1
        if found != len(names):
            # A counted netdev is gone or its line is cut: the next full read says which.
            missing = len(names) - found
            raise SourceUnavailable(f"{self._procfs / 'net/dev'}: {missing} counted netdevs unreadable")
        return float(total)

    def _emit(self, snap: Snapshot, nic: str, pci: str, netdev: tuple[int, int] | None,
              ports: list[_Port], broken: bool) -> None:
        if broken and not self._totals.known(nic):
            # A port counter is unreadable before this NIC was ever counted: netdev bytes now and
            # port bytes later would not be one counter. Skip it until then (the fault is recorded).
            return
        before = self._totals.absorbed()
        rx, tx = self._totals.update(nic, netdev, ports)
        snap.resets += self._totals.absorbed() - before
        self._counter(snap, RX, rx, nic, pci)
        self._counter(snap, TX, tx, nic, pci)
        ipoib = self._totals.ipoib(nic)
        if ipoib is not None:
            # The IPoIB netdev's bytes, already inside the port bytes above: the model takes them
            # off the RDMA port bytes so TCP over IPoIB is not useful payload twice.
            self._counter(snap, IPOIB_RX, ipoib[0], nic, pci)
            self._counter(snap, IPOIB_TX, ipoib[1], nic, pci)

    def _counter(self, snap: Snapshot, family: str, value: float, nic: str, pci: str) -> None:
        key = (family, nic, pci)
        sample = self._last.get(key)
        if sample is None:
            sample = Sample(family, labels_of(nic=nic, pci_bus_id=pci), float(value))
        elif sample.value != value:
            sample = Sample(family, sample.labels, float(value))
        self._now[key] = sample
        snap.counters.append(sample)


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

    def __init__(self, forget_after: int = FORGET_AFTER_CYCLES) -> None:
        self._absorber = CounterAbsorber(forget_after)
        self._parts: dict[str, set[str]] = {}
        self._base: dict[tuple[str, str, int], float] = {}
        self._infiniband: dict[str, bool] = {}
        self._seen: dict[str, int] = {}
        self._reads = 0
        self._forget_after = forget_after

    def known(self, nic: str) -> bool:
        return nic in self._parts

    def ipoib(self, nic: str) -> tuple[float, float] | None:
        """An InfiniBand NIC's IPoIB netdev bytes (monotonic), or None for any other NIC."""
        if not self._infiniband.get(nic) or "netdev" not in self._parts.get(nic, ()):
            return None
        vals = [self._absorber.value((nic, "netdev", i)) for i in (0, 1)]
        if vals[0] is None or vals[1] is None:
            return None
        return (vals[0] - self._base.get((nic, "netdev", 0), 0.0),
                vals[1] - self._base.get((nic, "netdev", 1), 0.0))

    def end_read(self) -> None:
        """Forget NICs not seen for a while (SR-IOV VFs per pod come and go): their parts, bases
        and absorber state. One that returns starts over, as a new series."""
        self._reads += 1
        self._absorber.end_cycle()
        if self._reads % max(1, self._forget_after // 4):
            return
        for nic in [n for n, r in self._seen.items() if r < self._reads - self._forget_after]:
            for part in self._parts.pop(nic, ()):
                for i in (0, 1):
                    self._absorber.forget((nic, part, i))
                    self._base.pop((nic, part, i), None)
            self._infiniband.pop(nic, None)
            del self._seen[nic]

    def absorbed(self) -> int:
        """Wraps and resets of parts absorbed so far (each direction counts)."""
        return self._absorber.wraps + self._absorber.resets

    def update(self, nic: str, netdev: tuple[int, int] | None, ports: list[_Port]) -> tuple[float, float]:
        first = nic not in self._parts
        self._seen[nic] = self._reads
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


class _PortPath(NamedTuple):
    pci: str
    device: str
    port: str
    counters: str  # the port's counters directory
    link_layer: str


class _Layout(NamedTuple):
    key: tuple[tuple[str, ...] | None, tuple[str, ...] | None]  # the class/net, class/infiniband listings
    at: float
    netdevs: dict[str, str]  # iface -> PCI function ("" for a virtual one)
    ports: list[_PortPath]


def _listing(path: str) -> tuple[str, ...] | None:
    try:
        return tuple(sorted(os.listdir(path)))
    except OSError:
        return None


def _rdma_ports(sysfs: str | os.PathLike[str], devices: tuple[str, ...], snap: Snapshot) -> list[_PortPath]:
    """Every port of every RDMA device on a PCI function, with its link layer."""
    out: list[_PortPath] = []
    base = os.path.join(sysfs, "class/infiniband")
    for dev in devices:
        # Plain string paths: pathlib's joins were most of a read with eight HCAs.
        entry = os.path.join(base, dev)
        pci = pci_of_class_entry(entry)
        if not pci:
            continue
        for port, counters in _ports(entry, snap):
            ll = read_optional_str(f"{entry}/ports/{port}/link_layer") or "InfiniBand"
            out.append(_PortPath(pci, dev, port, counters, ll))
    return out


def _rdma_counters(ports: list[_PortPath], snap: Snapshot, clock: Callable[[], float] = time.monotonic
                   ) -> tuple[dict[str, list[_Port]], set[str]]:
    """PCI function -> its RDMA ports' bytes, and the PCI functions with a port whose counters could
    not be read. A port without data counters (SR-IOV VF) or whose counters read ``N/A (no PMA)``
    is simply not a part of its NIC: quietly absent, and the NIC's netdev bytes still count."""
    out: dict[str, list[_Port]] = {}
    broken: set[str] = set()
    now = clock()
    for p in ports:
        paths = (p.counters + "/port_rcv_data", p.counters + "/port_xmit_data")
        try:
            rx, tx = port_bytes(paths[0]), port_bytes(paths[1])
        except (OSError, ValueError, UnicodeDecodeError) as e:
            for path in paths:
                _PORT_READS.pop(path, None)  # nothing to share: the rdma source reads it itself
            if isinstance(e, FileNotFoundError):
                continue  # a port without data counters (SR-IOV VF), as the rdma source treats it
            snap.fault("unreadable RDMA counter", e)
            broken.add(p.pci)
            continue
        if len(_PORT_READS) >= _PORT_READS_MAX - 1:
            _PORT_READS.clear()
        _PORT_READS[paths[0]], _PORT_READS[paths[1]] = (now, rx), (now, tx)
        if rx is None or tx is None:
            continue
        out.setdefault(p.pci, []).append(_Port(p.link_layer, rx, tx, p.device, p.port))
    return out, broken


def port_bytes(path: str | os.PathLike[str]) -> int | None:
    """An RDMA port data counter in bytes (the file counts 4-byte words); None where the device
    has no PMA to count with. Raises OSError/ValueError for anything else unreadable."""
    text = read_str(path)
    if text == NO_PMA:
        return None
    try:
        return counter_value(text) * 4
    except ValueError:
        raise ValueError(f"not a counter: {text[:40]!r} in {path}") from None


def shared_port_bytes(path: str, clock: Callable[[], float] = time.monotonic) -> int | None:
    """``port_bytes``, or the value the netdev source read from the same file under
    ``PORT_SHARE_S`` ago (same clock). Failures are never shared (``_rdma_counters`` withdraws a
    port's values when its read fails): a file that failed is read."""
    hit = _PORT_READS.get(path)
    if hit is not None and 0.0 <= clock() - hit[0] < PORT_SHARE_S:
        return hit[1]
    return port_bytes(path)


def _ports(dev: str | os.PathLike[str], snap: Snapshot) -> list[tuple[str, str]]:
    """(port, its counters directory) of an RDMA device, ports in numeric order."""
    ports_dir = os.path.join(dev, "ports")
    try:
        ports = sorted(os.listdir(ports_dir), key=lambda p: (len(p), p))
    except OSError as e:
        snap.fault("cannot list RDMA ports", e)
        return []
    return [(p, f"{ports_dir}/{p}/counters") for p in ports]
