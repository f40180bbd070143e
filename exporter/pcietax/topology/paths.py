"""Path class and GPUDirect verdict of every GPU–NIC pair, from a ``Tree`` (pure: no I/O).

Path classes are those of ``nvidia-smi topo -m``; PIX and PXB follow NCCL's own model
(src/graph/xml.cc, paths.cc): NCCL collapses each PCIe switch into one node by stepping up two
levels of the sysfs path at a time (device -> its port -> the switch's upstream port), and
stops at the first ancestor that is not a PCI function, the root complex, which it files under
the CPU of the device's NUMA node. Then:

- PIX  both devices hang from the same switch node (one PCIe switch);
- PXB  they meet at a switch node further up (several switches, no host bridge);
- PHB  they meet only at the root complex (same PCIe host bridge, typically the CPU);
- NODE different host bridges in the same NUMA node (NCCL counts this as PHB too);
- SYS  different NUMA nodes: the socket interconnect (UPI/xGMI) is on the path.

NCCL enables GPUDirect RDMA up to PXB by default (NCCL_NET_GDR_LEVEL), so a pair is ``ready``
when its path is PIX or PXB and nothing on it blocks peer-to-peer: ACS Request/Completion
Redirect on a bridge between the two (P2P then detours through the root complex), or a GPU whose
BAR aperture is too small to map the buffers. Anything we could not read is a blocking
``unknown_*`` reason, never a silent "ready".
"""

from __future__ import annotations

from dataclasses import dataclass

from .sysfs import PciDev, Tree

PATH_ORDER = ("PIX", "PXB", "PHB", "NODE", "SYS", "unknown")
GDR_LEVELS = ("PIX", "PXB")
# Below this BAR aperture a GPU cannot map a useful amount of memory for peers: 256 MiB is what
# GPUs show without Resizable BAR / "large BAR1"; data-centre GPUs expose 16-128 GiB.
MIN_BAR_BYTES = 1 << 30

# Reasons, most fundamental first: one pair reports the first that applies.
REASONS = ("unknown_path", "path_phb", "path_node", "path_sys", "acs", "unknown_acs", "small_bar",
           "unknown_bar")


@dataclass(frozen=True)
class Pair:
    gpu: str  # PCI address
    nic: str  # netdev name, else RDMA name, else PCI address
    nic_addr: str
    path: str  # PIX PXB PHB NODE SYS unknown
    gpudirect: str  # ready or blocked
    reason: str  # "none" when ready, else one of REASONS
    detail: str  # one sentence: why
    via: tuple[str, ...] = ()  # bridges between the two (below the point where they meet)
    acs_redirect: tuple[str, ...] = ()  # bridges on `via` with RR or CR enabled
    acs_unknown: tuple[str, ...] = ()  # bridges on `via` whose ACS could not be read
    same_iommu_group: bool | None = None  # None: no IOMMU groups (IOMMU off) or unknown
    bottleneck: str | None = None  # slowest negotiated link on the path, e.g. "32 GT/s x16"

    @property
    def rank(self) -> tuple[int, int, int]:
        """Sort key, best first: ready before blocked, then the shorter path, then the reason."""
        return (
            0 if self.gpudirect == "ready" else 1,
            PATH_ORDER.index(self.path),
            REASONS.index(self.reason) if self.reason in REASONS else -1,
        )


def switch_nodes(dev: PciDev) -> tuple[str, ...]:
    """NCCL's PCI nodes above a device, nearest first: every second ancestor (a switch's upstream
    port), skipping the port in between; empty when the device hangs right off the root complex."""
    return tuple(dev.chain[i] for i in range(len(dev.chain) - 2, -1, -2))


def path_class(g: PciDev, n: PciDev, numa_nodes: int) -> tuple[str, str]:
    """(class, detail). Both devices must be placed."""
    if g.host_bridge != n.host_bridge:
        gn, nn = _numa(g, numa_nodes), _numa(n, numa_nodes)
        if gn is None or nn is None:
            who = g.addr if gn is None else n.addr
            return "unknown", (f"different host bridges and the NUMA node of {who} is unknown "
                               "(numa_node is -1 on a multi-socket machine)")
        if gn == nn:
            return "NODE", f"different host bridges ({g.host_bridge}, {n.host_bridge}) in NUMA node {gn}"
        return "SYS", f"different NUMA nodes ({gn} and {nn}): crosses the socket interconnect"
    sg, sn = switch_nodes(g), switch_nodes(n)
    common = next((s for s in sg if s in sn), None)
    if common is None:
        return "PHB", f"meet only at the host bridge {g.host_bridge}"
    if sg.index(common) == 0 and sn.index(common) == 0:
        return "PIX", f"same PCIe switch (upstream port {common})"
    return "PXB", f"several PCIe switches, meeting at {common}"


def _numa(d: PciDev, numa_nodes: int) -> int | None:
    if d.numa_node is None and numa_nodes <= 1:
        return 0  # one NUMA node (or none described): the kernel reports -1, there is only one
    return d.numa_node


def between(g: PciDev, n: PciDev) -> tuple[str, ...]:
    """Bridges a peer-to-peer TLP crosses: both chains below their deepest common ancestor."""
    k = 0
    while k < min(len(g.chain), len(n.chain)) and g.chain[k] == n.chain[k]:
        k += 1
    return g.chain[k:] + n.chain[k:]


def _bottleneck(devs: list[PciDev]) -> str | None:
    links = [d.link for d in devs if d.link is not None]
    if not links:
        return None
    worst = min(links, key=lambda lk: lk.speed_gts * lk.width)
    return str(worst)


def pair(tree: Tree, g: PciDev, n: PciDev) -> Pair:
    base = {"gpu": g.addr, "nic": n.name, "nic_addr": n.addr}
    for d in (g, n):
        if not d.placed:
            why = d.problems[0] if d.problems else "not placed in the PCI tree"
            return Pair(**base, path="unknown", gpudirect="blocked", reason="unknown_path",
                        detail=f"place of {d.addr} in the PCIe tree is unknown: {why}")
    path, detail = path_class(g, n, tree.numa_nodes)
    via = between(g, n)
    bridges = [tree.devices.get(b) for b in via]
    same_group = None
    if g.iommu_group is not None and n.iommu_group is not None:
        same_group = g.iommu_group == n.iommu_group
    bottleneck = _bottleneck([g, n, *(b for b in bridges if b is not None)])
    redirect = tuple(b for b, d in zip(via, bridges, strict=True)
                     if d is not None and d.acs is not None and d.acs.redirects)
    unknown = tuple(b for b, d in zip(via, bridges, strict=True)
                    if d is None or d.acs is None or d.acs.redirects is None)
    extra = {"via": via, "acs_redirect": redirect, "acs_unknown": unknown,
             "same_iommu_group": same_group, "bottleneck": bottleneck}

    def blocked(reason: str, why: str) -> Pair:
        return Pair(**base, path=path, gpudirect="blocked", reason=reason, detail=why, **extra)

    if path == "unknown":
        return blocked("unknown_path", detail)
    if path not in GDR_LEVELS:
        return blocked(f"path_{path.lower()}", f"{path}: {detail}; NCCL uses GPUDirect RDMA only up to PXB")
    if redirect:
        return blocked("acs", f"{path}: ACS redirect (RR/CR) on {', '.join(redirect)} sends P2P through "
                              "the root complex")
    if unknown:
        return blocked("unknown_acs", f"{path}: ACS state unknown on {', '.join(unknown)}")
    if g.bar_bytes is None:
        return blocked("unknown_bar", f"{path}: BAR size of GPU {g.addr} unknown")
    if g.bar_bytes < MIN_BAR_BYTES:
        return blocked("small_bar", f"{path}: GPU {g.addr} exposes only {human_size(g.bar_bytes)} of BAR "
                                    "for peers to map")
    return Pair(**base, path=path, gpudirect="ready", reason="none", detail=f"{path}: {detail}", **extra)


def pairs(tree: Tree) -> list[Pair]:
    gpus = sorted(tree.gpus(), key=lambda d: d.addr)
    nics = nic_list(tree)
    return [pair(tree, g, n) for g in gpus for n in nics]


def nic_list(tree: Tree) -> list[PciDev]:
    """Physical NIC functions in PCI order; SR-IOV virtual functions share their PF's place and
    would only repeat it."""
    return sorted((d for d in tree.nics() if not d.virtual_function), key=lambda d: d.addr)


def best_per_gpu(all_pairs: list[Pair]) -> dict[str, Pair]:
    """Each GPU's best NIC: ready first, then the shortest path class, then the fewest bridges;
    among equals the NIC nearest in bus number (boards put a GPU's rail NIC in the next slot)."""

    def key(p: Pair) -> tuple:
        return (p.rank, len(p.via), abs(_bus(p.gpu) - _bus(p.nic_addr)), p.nic_addr)

    best: dict[str, Pair] = {}
    for p in all_pairs:
        cur = best.get(p.gpu)
        if cur is None or key(p) < key(cur):
            best[p.gpu] = p
    return best


def _bus(addr: str) -> int:
    dom, bus, _ = addr.split(":")
    return (int(dom, 16) << 8) | int(bus, 16)


def human_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"
