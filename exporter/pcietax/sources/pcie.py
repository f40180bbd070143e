"""PCIe link state and health of GPUs and NICs from sysfs: negotiated and maximum speed and width,
the usable ceiling of the negotiated link (pcie_math), and AER correctable-error counters."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..fsread import read_optional_str, read_text
from ..pcie_config import read_max_payload_size
from ..pcie_math import ceiling, gen_of_speed
from .base import Snapshot, SourceUnavailable

SPEED = "pcietax_pcie_link_speed_gts"
WIDTH = "pcietax_pcie_link_width"
CEILING = "pcietax_pcie_link_ceiling_bytes_per_second"
REPLAY = "pcietax_pcie_replay_total"
CORRECTABLE = "pcietax_pcie_correctable_errors_total"

_SPEED_RE = re.compile(r"^([0-9.]+)\s*GT/s")
# Assumed when config space past 64 bytes is unreadable (not root): the common default.
DEFAULT_MPS = 256


def device_kind(pci_class: int) -> str | None:
    """GPU: display controllers (VGA, 3D, other); NIC: network controllers incl. InfiniBand."""
    base = pci_class >> 16
    if base == 0x03:
        return "gpu"
    if base == 0x02:
        return "nic"
    return None


def parse_aer(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = int(parts[1])
    return out


class PcieSource:
    name = "pcie"

    def __init__(self, sysfs: str = "/sys") -> None:
        self._devices = Path(sysfs) / "bus/pci/devices"

    def start(self) -> None:
        if not self._devices.is_dir():
            raise SourceUnavailable(f"no PCI bus ({self._devices} missing)")

    def close(self) -> None:
        pass

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({REPLAY, CORRECTABLE}))
        try:
            names = sorted(os.listdir(self._devices))
        except OSError as e:
            raise SourceUnavailable(f"cannot list {self._devices}: {e}") from e
        for addr in names:
            # Plain string paths: pathlib's joins were a third of a read on a 50-function node.
            dev = os.path.join(self._devices, addr)
            cls = read_optional_str(dev + "/class")
            if cls is None:
                continue  # vanished during the walk
            try:
                kind = device_kind(int(cls, 16))
            except ValueError:
                snap.fault("garbage PCI class", f"{dev}/class: {cls[:20]!r}")
                continue
            if kind is not None:
                self._read_device(snap, dev, addr, kind)
        return snap

    def _read_device(self, snap: Snapshot, dev: str, addr: str, kind: str) -> None:
        link: dict[str, tuple[float, int]] = {}
        for state in ("current", "max"):
            speed_s = read_optional_str(f"{dev}/{state}_link_speed")
            width_s = read_optional_str(f"{dev}/{state}_link_width")
            if speed_s is None or width_s is None:
                continue  # not a PCIe function with a link (e.g. integrated or virtual)
            m = _SPEED_RE.match(speed_s)
            if not m or not width_s.isdigit():
                if not speed_s.lower().startswith("unknown"):
                    snap.fault("garbage link state", f"{dev}/{state}_link_*: {speed_s!r} x {width_s!r}")
                continue
            gts, width = float(m.group(1)), int(width_s)
            link[state] = (gts, width)
            snap.gauge(SPEED, gts, pci_bus_id=addr, device_kind=kind, state=state)
            snap.gauge(WIDTH, width, pci_bus_id=addr, device_kind=kind, state=state)
        if "current" in link:
            gts, width = link["current"]
            try:
                c = ceiling(gen_of_speed(gts), width, self._mps(dev) or DEFAULT_MPS)
                snap.gauge(CEILING, c.usable_bytes_per_second, pci_bus_id=addr, device_kind=kind)
            except ValueError:
                pass  # link down (width 0) or a rate pcie_math does not know: no ceiling to give
        aer_path = dev + "/aer_dev_correctable"
        try:
            aer = parse_aer(read_text(aer_path))
        except FileNotFoundError:
            return  # no AER on this device or kernel
        except (OSError, ValueError, UnicodeDecodeError) as e:
            snap.fault("unreadable AER counters", f"{aer_path}: {e}")
            return
        if "TOTAL_ERR_COR" in aer:
            snap.counter(CORRECTABLE, aer["TOTAL_ERR_COR"], pci_bus_id=addr, device_kind=kind)
        if "Rollover" in aer and "Timeout" in aer:
            # Both or nothing: a file cut before one of them would export a partial sum (a fake reset).
            snap.counter(REPLAY, aer["Rollover"] + aer["Timeout"], pci_bus_id=addr, device_kind=kind)

    @staticmethod
    def _mps(dev: str) -> int | None:
        return read_max_payload_size(dev)
