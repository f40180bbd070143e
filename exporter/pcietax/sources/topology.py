"""GPU–NIC path verdicts as gauges: ``pcietax_gpu_nic_path_info`` for every pair and
``pcietax_gpu_best_nic_info`` for each GPU's best NIC (what the GPUDirectBlocked alert watches).

The PCIe tree changes on hotplug or reboot, so the collection cycles repeat the last walk's
result: every ``refresh`` seconds (default 60) one listing of the PCI functions says whether any
came or went, and only then is sysfs walked again; every ``rewalk`` seconds (default 600) it is
walked regardless, for what the listing cannot show (ACS bits written with setpci, a driver
rebound). The walk was 21-34 ms on a 43-function fixture: once a minute it was, on an idle
8-CPU node, more CPU than node_exporter's whole hour. Faults (unreadable devices) are counted
once per walk, not once per cycle."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .. import catalog
from ..topology import SysfsReader, TopologyUnavailable, discover
from ..topology.paths import Pair
from .base import Snapshot, SourceAbsent, SourceUnavailable

PATH_INFO = catalog.GPU_NIC_PATH_INFO
BEST_NIC = catalog.GPU_BEST_NIC_INFO
DEFAULT_REFRESH = 60.0
DEFAULT_REWALK = 600.0


def _labels(p: Pair) -> dict[str, str]:
    return {"gpu": p.gpu, "nic": p.nic, "path": p.path, "gpudirect": p.gpudirect, "reason": p.reason}


class TopologySource:
    name = "topology"
    shares_lane = True  # kernel files only: read in the engine's shared lane

    def __init__(
        self,
        sysfs: str = "/sys",
        refresh: float = DEFAULT_REFRESH,
        clock: Callable[[], float] = time.monotonic,
        reader: SysfsReader | None = None,
        rewalk: float = DEFAULT_REWALK,
    ) -> None:
        self._sysfs = Path(sysfs)
        self._refresh = refresh
        self._rewalk = rewalk
        self._functions: list[str] | None = None  # the PCI functions the last walk saw
        self._checked_at = 0.0
        self._clock = clock
        self._reader = reader
        self._last: Snapshot | None = None
        self._walked_at = 0.0
        self.walks = 0  # how many times sysfs was walked (tests and the bench read it)

    def start(self) -> None:
        bus = self._sysfs / "bus/pci/devices"
        if not bus.is_dir():
            raise SourceAbsent(f"no PCI bus ({bus} missing)")

    def close(self) -> None:
        self._last = None

    def read(self) -> Snapshot:
        now = self._clock()
        last = self._last
        if last is not None and now - self._checked_at < self._refresh:
            return self._repeat(last)
        functions = self._list_functions()
        if last is not None and now - self._walked_at < self._rewalk and functions == self._functions:
            self._checked_at = now
            return self._repeat(last)
        snap = self._walk()
        self._last, self._walked_at, self._checked_at, self._functions = snap, now, now, functions
        return snap

    @staticmethod
    def _repeat(last: Snapshot) -> Snapshot:
        # Same gauges, no faults: those were counted when the walk found them.
        return Snapshot(gauges=list(last.gauges), provides=last.provides)

    def _list_functions(self) -> list[str] | None:
        try:
            return sorted(os.listdir(self._sysfs / "bus/pci/devices"))
        except OSError:
            return None  # the walk says why

    def _walk(self) -> Snapshot:
        try:
            topo = discover(self._sysfs, self._reader)
        except TopologyUnavailable as e:
            raise SourceUnavailable(str(e)) from e
        self.walks += 1
        snap = Snapshot(provides=frozenset({PATH_INFO}))
        for p in topo.pairs:
            snap.gauge(PATH_INFO, 1, **_labels(p))
        for p in topo.best.values():
            snap.gauge(BEST_NIC, 1, **_labels(p))
        for d in topo.tree.devices.values():
            for problem in d.problems:
                snap.fault("unreadable PCI device", f"{d.addr}: {problem}")
        for where, why in topo.tree.problems:
            snap.fault("unreadable PCI entry", f"{where}: {why}")
        return snap
