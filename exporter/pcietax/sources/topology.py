"""GPU–NIC path verdicts as gauges: ``pcietax_gpu_nic_path_info`` for every pair and
``pcietax_gpu_best_nic_info`` for each GPU's best NIC (what the GPUDirectBlocked alert watches).

The PCIe tree changes only on hotplug or reboot, so the sysfs walk runs at most once per
``refresh`` seconds (default 60) and the collection cycles in between repeat the last result;
faults (unreadable devices) are counted once per walk, not once per cycle."""

from __future__ import annotations

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
    ) -> None:
        self._sysfs = Path(sysfs)
        self._refresh = refresh
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
        if self._last is not None and now - self._walked_at < self._refresh:
            # Same gauges, no faults: those were counted when the walk found them.
            return Snapshot(gauges=list(self._last.gauges), provides=self._last.provides)
        snap = self._walk()
        self._last, self._walked_at = snap, now
        return snap

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
