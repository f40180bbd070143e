"""The source registry: which sources exist, in priority order, and how each is built from the
command-line options. When two sources give the same series (a GPU's replay counter from NVML and
from AER), the one listed first wins."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Source


@dataclass
class SourceOptions:
    """Everything sources may need from the command line; roots first, as node_exporter does."""

    sysfs: str = "/sys"
    procfs: str = "/proc"
    nics: list[str] = field(default_factory=list)
    target_pids: list[int] = field(default_factory=list)
    target_comm: str | None = None
    target_cgroup: str | None = None
    cuda_libs: list[str] = field(default_factory=list)
    cuda_probes: str = "sampled"
    memcpy_probe: bool = False
    probe_budget: float | None = None  # eBPF CPU budget (CPU s/s); None = the source's default
    # --path.pods: names the namespace/pod/container of traced processes (sources/pods.PodResolver).
    pod_resolver: Any = None


@dataclass(frozen=True)
class SourceSpec:
    name: str
    help: str
    build: Callable[[SourceOptions], Source]


def _nvml(o: SourceOptions) -> Source:
    from .nvml import NvmlSource
    from .nvml_binding import PynvmlBinding

    return NvmlSource(PynvmlBinding(), sysfs=o.sysfs)


def _ebpf(o: SourceOptions) -> Source:
    from .ebpf import DEFAULT_BUDGET, EbpfSource

    # None (--path.pods '' or outside the CLI): no pod labels.
    resolver = o.pod_resolver
    return EbpfSource(procfs=o.procfs, sysfs=o.sysfs, nics=o.nics, target_pids=o.target_pids,
                      target_comm=o.target_comm, target_cgroup=o.target_cgroup,
                      cuda_libs_given=o.cuda_libs, cuda_probes=o.cuda_probes, memcpy=o.memcpy_probe,
                      probe_budget=o.probe_budget if o.probe_budget is not None else DEFAULT_BUDGET,
                      pod_resolver=resolver)


def _netdev(o: SourceOptions) -> Source:
    from .netdev import NetdevSource

    return NetdevSource(procfs=o.procfs, sysfs=o.sysfs, nics=o.nics)


def _rdma(o: SourceOptions) -> Source:
    from .rdma import RdmaSource

    return RdmaSource(sysfs=o.sysfs)


def _procfs(o: SourceOptions) -> Source:
    from .procfs import ProcfsSource

    return ProcfsSource(procfs=o.procfs)


def _pcie(o: SourceOptions) -> Source:
    from .pcie import PcieSource

    return PcieSource(sysfs=o.sysfs)


def _topology(o: SourceOptions) -> Source:
    from .topology import TopologySource

    return TopologySource(sysfs=o.sysfs)


def _upi(o: SourceOptions) -> Source:
    from .upi import UpiSource

    return UpiSource(sysfs=o.sysfs, procfs=o.procfs)


SOURCES: list[SourceSpec] = [
    SourceSpec("nvml", "GPU PCIe bytes, links and link health from NVML (nvidia-ml-py)", _nvml),
    SourceSpec("ebpf", "eBPF staging tracer: socket and CUDA copies, IRQ time (BCC, root)", _ebpf),
    SourceSpec("netdev", "NIC byte counters (/proc/net/dev, each physical NIC once)", _netdev),
    SourceSpec("rdma", "RDMA port data counters (/sys/class/infiniband)", _rdma),
    SourceSpec("procfs", "hard IRQs, softirqs and /proc/stat IRQ time", _procfs),
    SourceSpec("pcie", "PCIe link state, ceilings and AER counters (sysfs)", _pcie),
    SourceSpec("topology", "GPU-NIC PCIe path class and GPUDirect verdict (sysfs, re-walked on hotplug "
               "and every 10m)", _topology),
    SourceSpec("upi", "UPI socket-link and IIO root-port bytes (Intel uncore PMUs via perf)", _upi),
]


def by_name() -> dict[str, SourceSpec]:
    return {s.name: s for s in SOURCES}
