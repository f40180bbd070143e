"""PCIe topology and GPUDirect readiness: read the tree from sysfs (``sysfs``), classify every
GPU–NIC pair and give its verdict (``paths``), render it for people and machines (``render``).
The ``topology`` source and ``pcietax topo`` both call ``discover``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .paths import Pair, best_per_gpu, nic_list, pairs
from .sysfs import PciDev, SysfsReader, TopologyUnavailable, Tree, read_tree

__all__ = ["Pair", "PciDev", "SysfsReader", "Topology", "TopologyUnavailable", "Tree", "discover"]


@dataclass(frozen=True)
class Topology:
    tree: Tree
    gpus: list[PciDev]  # PCI order (the order NVML numbers them in by default)
    nics: list[PciDev]
    pairs: list[Pair]
    best: dict[str, Pair]  # GPU address -> its best NIC pair

    def unknown_devices(self) -> list[PciDev]:
        """Functions we could not even identify (unresolvable link, garbage or unreadable class)."""
        return [d for d in self.tree.devices.values() if d.kind == "unknown"]


def discover(sysfs: str | os.PathLike[str] = "/sys", reader: SysfsReader | None = None) -> Topology:
    """Raises TopologyUnavailable only when there is no PCI bus at all; everything else is data."""
    tree = read_tree(sysfs, reader)
    all_pairs = pairs(tree)
    return Topology(
        tree=tree,
        gpus=sorted(tree.gpus(), key=lambda d: d.addr),
        nics=nic_list(tree),
        pairs=all_pairs,
        best=best_per_gpu(all_pairs),
    )
