"""PCIe link state and health of GPUs and NICs from sysfs: negotiated and maximum speed and width,
the usable ceiling of the negotiated link (pcie_math), and AER correctable-error counters.

What a function is (class, vendor), its maximum link and its programmed max payload size change
only on hotplug or re-enumeration, so they are read when a function first appears and again every
``refresh`` seconds (default 600: a function replaced at the same address in between is rare,
and the re-read was a third of this source's cost on an idle node); each cycle re-reads only
what can change under a running node: the current link (retrain, downgrade) and the AER
counters. On a 50-function node that is 3 opens per GPU/NIC per cycle instead of 9 per
function. A device whose three files read the same bytes as last cycle (nearly always) gives last
cycle's samples again, unparsed: the same objects, which the engine also absorbs for free."""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import catalog
from ..fsread import counter_value, read_bytes, read_optional_str
from ..pciclass import classify
from ..pcie_config import read_max_payload_size
from ..pcie_math import ceiling, gen_of_speed
from .base import Labels, Sample, Snapshot, SourceAbsent, SourceUnavailable, labels_of

SPEED = catalog.PCIE_LINK_SPEED_GTS
WIDTH = catalog.PCIE_LINK_WIDTH
CEILING = catalog.PCIE_LINK_CEILING_BYTES_PER_SECOND
REPLAY = catalog.PCIE_REPLAY
CORRECTABLE = catalog.PCIE_CORRECTABLE_ERRORS

_SPEED_RE = re.compile(r"^([0-9.]+)\s*GT/s")
# Assumed when config space past 64 bytes is unreadable (not root): the common default.
DEFAULT_MPS = 256
DEFAULT_REFRESH = 600.0


def device_kind(pci_class: int, vendor: int | None = None) -> str | None:
    """``gpu`` or ``nic`` by the one classifier (pciclass); None for everything else."""
    kind = classify(pci_class, vendor)
    return kind if kind in ("gpu", "nic") else None


def parse_aer(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = counter_value(parts[1])
    return out


@functools.lru_cache(maxsize=256)
def usable_bytes_per_second(gts: float, width: int, mps: int) -> float | None:
    """The ceiling of a negotiated link, None where pcie_math has none (link down, unknown rate).
    Pure arithmetic over a node's handful of link states: computed once each, not per cycle."""
    try:
        return ceiling(gen_of_speed(gts), width, mps).usable_bytes_per_second
    except ValueError:
        return None


@dataclass(frozen=True)
class _Fixed:
    """What does not change while a function exists: None kind = not a GPU or NIC."""

    kind: str | None
    max_link: tuple[float, int] | None
    mps: int


class PcieSource:
    name = "pcie"
    shares_lane = True  # kernel files only: read in the engine's shared lane

    def __init__(self, sysfs: str = "/sys", refresh: float = DEFAULT_REFRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._devices = os.path.join(sysfs, "bus/pci/devices")
        self._refresh = refresh
        self._clock = clock
        self._fixed: dict[str, _Fixed] = {}
        self._fixed_at = float("-inf")
        self._labels: dict[tuple[str, str, str], Labels] = {}  # dropped with _fixed, on refresh
        # addr -> (the bytes of its per-cycle files, its _Fixed, the gauges and counters they gave)
        self._seen: dict[str, tuple[tuple, _Fixed, list[Sample], list[Sample]]] = {}

    def start(self) -> None:
        if not os.path.isdir(self._devices):
            raise SourceAbsent(f"no PCI bus ({self._devices} missing)")

    def close(self) -> None:
        self._fixed.clear()
        self._seen.clear()

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({REPLAY, CORRECTABLE}))
        try:
            names = sorted(os.listdir(self._devices))
        except OSError as e:
            raise SourceUnavailable(f"cannot list {self._devices}: {e}") from e
        now = self._clock()
        if now - self._fixed_at >= self._refresh:
            self._fixed, self._fixed_at, self._labels, self._seen = {}, now, {}, {}
        fixed = self._fixed
        for gone in set(fixed) - set(names):
            del fixed[gone]  # unplugged: read afresh if it comes back
            self._seen.pop(gone, None)
        for addr in names:
            # Plain string paths: pathlib's joins were a third of a read on a 50-function node.
            dev = os.path.join(self._devices, addr)
            f = fixed.get(addr)
            if f is None:
                f = self._identify(snap, dev)
                if f is None:
                    continue  # vanished during the walk, or garbage (a fault): try again next read
                fixed[addr] = f
            if f.kind is not None:
                self._read_device(snap, dev, addr, f)
        return snap

    def _identify(self, snap: Snapshot, dev: str) -> _Fixed | None:
        cls = read_optional_str(dev + "/class")
        if cls is None:
            return None
        try:
            pci_class = int(cls, 16)
        except ValueError:
            snap.fault("garbage PCI class", f"{dev}/class: {cls[:20]!r}")
            return None
        vendor_s = read_optional_str(dev + "/vendor")
        try:
            vendor = int(vendor_s, 16) if vendor_s else None
        except ValueError:
            vendor = None
        kind = device_kind(pci_class, vendor)
        if kind is None:
            return _Fixed(None, None, DEFAULT_MPS)
        return _Fixed(kind, self._link(snap, dev, "max"), read_max_payload_size(dev) or DEFAULT_MPS)

    @staticmethod
    def _link(snap: Snapshot, dev: str, state: str) -> tuple[float, int] | None:
        return PcieSource._parse_link(snap, dev, state, read_optional_str(f"{dev}/{state}_link_speed"),
                                      read_optional_str(f"{dev}/{state}_link_width"))

    @staticmethod
    def _parse_link(snap: Snapshot, dev: str, state: str, speed_s: str | None, width_s: str | None
                    ) -> tuple[float, int] | None:
        if speed_s is None or width_s is None:
            return None  # not a PCIe function with a link (e.g. integrated or virtual)
        m = _SPEED_RE.match(speed_s)
        if not m or not width_s.isdigit() or len(width_s) > 3:
            if not speed_s.lower().startswith("unknown"):
                snap.fault("garbage link state", f"{dev}/{state}_link_*: {speed_s!r} x {width_s!r}")
            return None
        try:
            return float(m.group(1)), int(width_s)
        except (ValueError, OverflowError):
            snap.fault("garbage link state", f"{dev}/{state}_link_*: {speed_s!r} x {width_s!r}")
            return None

    def _label(self, addr: str, kind: str, state: str) -> Labels:
        # Label sets are the same every cycle: built (and sorted) once per device and state.
        lbl = self._labels.get((addr, kind, state))
        if lbl is None:
            kv = {"pci_bus_id": addr, "device_kind": kind, **({"state": state} if state else {})}
            lbl = self._labels[(addr, kind, state)] = labels_of(**kv)
        return lbl

    def _read_device(self, snap: Snapshot, dev: str, addr: str, f: _Fixed) -> None:
        speed_s = read_optional_str(f"{dev}/current_link_speed")
        width_s = read_optional_str(f"{dev}/current_link_width")
        aer_path = dev + "/aer_dev_correctable"
        try:
            aer_b: bytes | OSError | None = read_bytes(aer_path)
        except FileNotFoundError:
            aer_b = None  # no AER on this device or kernel
        except OSError as e:
            aer_b = e
        key = (speed_s, width_s, aer_b)
        hit = self._seen.get(addr)
        if hit is not None and hit[1] is f and hit[0] == key:
            snap.gauges.extend(hit[2])
            snap.counters.extend(hit[3])
            return
        faults, gauges0, counters0 = len(snap.faults), len(snap.gauges), len(snap.counters)
        self._parse_device(snap, dev, addr, f, speed_s, width_s, aer_path, aer_b)
        if len(snap.faults) == faults:  # a read with faults is parsed again next time, faults and all
            self._seen[addr] = (key, f, snap.gauges[gauges0:], snap.counters[counters0:])
        else:
            self._seen.pop(addr, None)

    def _parse_device(self, snap: Snapshot, dev: str, addr: str, f: _Fixed, speed_s: str | None,
                      width_s: str | None, aer_path: str, aer_b: bytes | OSError | None) -> None:
        kind = f.kind
        assert kind is not None
        current = self._parse_link(snap, dev, "current", speed_s, width_s)
        gauges = snap.gauges
        for state, link in (("current", current), ("max", f.max_link)):
            if link is not None:
                lbl = self._label(addr, kind, state)
                gauges.append(Sample(SPEED, lbl, float(link[0])))
                gauges.append(Sample(WIDTH, lbl, float(link[1])))
        if current is not None:
            usable = usable_bytes_per_second(current[0], current[1], f.mps)
            if usable is not None:  # None: link down (width 0) or a rate pcie_math does not know
                gauges.append(Sample(CEILING, self._label(addr, kind, ""), float(usable)))
        if aer_b is None:
            return
        if isinstance(aer_b, OSError):
            snap.fault("unreadable AER counters", f"{aer_path}: {aer_b}")
            return
        try:
            aer = parse_aer(aer_b.decode("ascii"))
        except (ValueError, UnicodeDecodeError) as e:
            snap.fault("unreadable AER counters", f"{aer_path}: {e}")
            return
        lbl = self._label(addr, kind, "")
        if "TOTAL_ERR_COR" in aer:
            snap.counters.append(Sample(CORRECTABLE, lbl, float(aer["TOTAL_ERR_COR"])))
        if "Rollover" in aer and "Timeout" in aer:
            # Both or nothing: a file cut before one of them would export a partial sum (a fake reset).
            snap.counters.append(Sample(REPLAY, lbl, float(aer["Rollover"] + aer["Timeout"])))
