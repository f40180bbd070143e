"""``pcietax topo`` output: a matrix like ``nvidia-smi topo -m`` (GPUs x NICs), the best NIC of
each GPU with its verdict, and what to change; or the same as JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import Topology
from .paths import GDR_LEVELS, Pair, human_size
from .sysfs import PciDev

LEGEND = """\
Legend:
  PIX  = one PCIe switch between them          PXB  = several PCIe switches, no host bridge
  PHB  = through a PCIe host bridge (the CPU)   NODE = across host bridges within one NUMA node
  SYS  = across the socket interconnect (UPI/xGMI) between NUMA nodes
  *    = the class allows GPUDirect RDMA but something on the path blocks it (see below)
  NCCL uses GPUDirect RDMA up to PXB by default (NCCL_NET_GDR_LEVEL)."""

PORT_TYPES = {0x4: "root port", 0x5: "switch upstream port", 0x6: "switch downstream port",
              0x7: "PCIe-to-PCI bridge", 0x8: "PCI-to-PCIe bridge"}
TRANSLATING = ("DMA", "DMA-FQ")


def _hex4(v: int | None) -> str:
    return "????" if v is None else f"{v:04x}"


def _numa(d: PciDev) -> str:
    return "-" if d.numa_node is None else str(d.numa_node)


def _cell(p: Pair) -> str:
    if p.path == "unknown":
        return "?"
    return p.path + ("*" if p.path in GDR_LEVELS and p.gpudirect != "ready" else "")


def render_text(t: Topology) -> str:
    out: list[str] = []
    tree = t.tree
    out.append(f"PCIe topology from {tree.sysfs}: {len(t.gpus)} GPU(s), {len(t.nics)} NIC(s), "
               f"{tree.numa_nodes or 1} NUMA node(s)")
    out.append("")
    if not t.gpus:
        out.append("No GPUs found (display/3D controllers other than BMC consoles): "
                   "no GPU-NIC pairs to judge.")
    if not t.nics:
        out.append("No physical NICs found (network controllers): no GPU-NIC pairs to judge.")
    by_pair = {(p.gpu, p.nic_addr): p for p in t.pairs}
    if t.gpus and t.nics:
        heads = [f"NIC{i}" for i in range(len(t.nics))]
        w = max(6, *(len(h) + 2 for h in heads))
        out.append(" " * 8 + "".join(h.ljust(w) for h in heads) + "NUMA  BAR1       IOMMU")
        for i, g in enumerate(t.gpus):
            cells = "".join(_cell(by_pair[(g.addr, n.addr)]).ljust(w) for n in t.nics)
            bar = human_size(g.bar_bytes) if g.bar_bytes else "?"
            iommu = f"{g.iommu_group}:{g.iommu_type or '?'}" if g.iommu_group else "off"
            out.append(f"GPU{i}".ljust(8) + cells + _numa(g).ljust(6) + bar.ljust(11) + iommu)
        out.append("")
        out.append(LEGEND)
    if t.nics:
        out.append("")
        out.append("NICs:")
        for i, n in enumerate(t.nics):
            names = ", ".join((*n.netdevs, *n.rdma)) or "(no netdev or RDMA device)"
            out.append(f"  NIC{i:<3} {n.addr}  {_hex4(n.vendor)}:{_hex4(n.device)}  NUMA {_numa(n):<2} "
                       f"{n.link or 'link ?'}  {names}")
    if t.gpus:
        out.append("")
        out.append("GPUs (numbered in PCI order, as NVML does by default):")
        for i, g in enumerate(t.gpus):
            out.append(f"  GPU{i:<3} {g.addr}  {_hex4(g.vendor)}:{_hex4(g.device)}  NUMA {_numa(g):<2} "
                       f"{g.link or 'link ?'}  BAR1 {human_size(g.bar_bytes) if g.bar_bytes else '?'}")
    if t.best:
        out.append("")
        out.append("GPUDirect RDMA, best NIC per GPU:")
        nic_idx = {n.addr: i for i, n in enumerate(t.nics)}
        for i, g in enumerate(t.gpus):
            p = t.best.get(g.addr)
            if p is None:
                continue
            verdict = "ready" if p.gpudirect == "ready" else f"BLOCKED ({p.reason})"
            out.append(f"  GPU{i} -> NIC{nic_idx[p.nic_addr]} {p.nic}: {verdict}: {p.detail}")
    tips = advice(t)
    if tips:
        out.append("")
        out.append("What to change:")
        for tip in tips:
            out.append(f"  - {tip['text']}")
    bad = [d for d in t.tree.devices.values() if d.problems]
    if bad or t.tree.problems:
        out.append("")
        out.append("Could not read (reported unknown, never as fine):")
        for d in bad:
            out.append(f"  {d.addr} ({d.kind}): {'; '.join(d.problems)}")
        for where, why in t.tree.problems:
            out.append(f"  {where}: {why}")
    return "\n".join(out) + "\n"


def advice(t: Topology) -> list[dict[str, Any]]:
    """What to change, one entry per distinct fix, from each GPU's best pair (a GPU whose best
    NIC is fine needs nothing, even if far NICs are SYS)."""
    tips: dict[str, dict[str, Any]] = {}

    def add(reason: str, devices: list[str], text: str) -> None:
        tip = tips.setdefault(text, {"reason": reason, "devices": [], "text": text})
        tip["devices"] = sorted({*tip["devices"], *devices})

    devs = t.tree.devices
    unknown_acs: set[str] = set()
    for g in t.gpus:
        p = t.best.get(g.addr)
        if p is None or p.gpudirect == "ready":
            continue
        if p.reason.startswith("path_"):
            add(p.reason, [g.addr, p.nic_addr],
                f"GPU {g.addr} has no NIC behind its own PCIe switch (nearest: {p.nic}, {p.path}). Put a "
                "NIC in a slot under the same switch as the GPU; until then its network traffic is "
                "staged through host memory.")
        elif p.reason == "acs":
            _acs_tips(t, add)
        elif p.reason == "unknown_acs":
            unknown_acs.update(p.acs_unknown)
        elif p.reason == "small_bar":
            add("small_bar", [g.addr],
                f"GPU {g.addr} exposes only {human_size(g.bar_bytes or 0)} of BAR1: enable "
                "'Above 4G decoding' and 'Resizable BAR' in the BIOS (and the compute / large-BAR1 mode "
                "on GPUs that have a display mode switch).")
        elif p.reason == "unknown_bar":
            add("unknown_bar", [g.addr],
                f"BAR sizes of GPU {g.addr} could not be read ({'; '.join(g.problems) or 'resource'}).")
        else:
            add(p.reason, [g.addr, p.nic_addr], f"{p.detail}; check {t.tree.sysfs}/bus/pci/devices.")
    if unknown_acs:
        why = sorted({devs[b].acs.why for b in unknown_acs if b in devs and devs[b].acs})
        gone = sorted(b for b in unknown_acs if b not in devs)
        detail = "; ".join(why + ([f"not found: {', '.join(gone)}"] if gone else []))
        add("unknown_acs", sorted(unknown_acs),
            f"ACS of {', '.join(sorted(unknown_acs))} could not be read ({detail}): run pcietax as root "
            "(the kernel shows config space past 64 bytes only with CAP_SYS_ADMIN).")
    for d in (*t.gpus, *t.nics):
        if d.link is not None and d.link.degraded:
            add("link", [d.addr],
                f"{d.kind.upper()} {d.addr} link trained at {d.link} below its maximum "
                f"{d.link.max_speed_gts:g} GT/s x{d.link.max_width}: reseat it or check the slot/riser.")
    return list(tips.values())


def _acs_tips(t: Topology, add: Callable[[str, list[str], str], None]) -> None:
    """One fix for every port that redirects P2P on any GPU-NIC path (not only the best pairs:
    rail-aligned jobs use every GPU's own NIC)."""
    devs = t.tree.devices
    ports = sorted({b for p in t.pairs if p.reason == "acs" for b in p.acs_redirect})
    if not ports:
        return
    desc = []
    for b in ports:
        d = devs.get(b)
        kind = PORT_TYPES.get(d.port_type, "bridge") if d and d.port_type is not None else "bridge"
        on = ",".join(d.acs.enabled or ()) if d and d.acs else "?"
        desc.append(f"{b} ({kind}, ACSCtl {on})")
    add("acs", ports,
        f"ACS P2P redirect (RR/CR) is on at {', '.join(desc)}: turn ACS off for these ports in the BIOS, "
        f"or to test (as root, until reboot): for p in {' '.join(ports)}; do setpci -s $p "
        "ECAP_ACS+0x6.w=0000; done")
    iommu = sorted({d.addr for p in t.pairs if p.reason == "acs"
                    for d in (devs.get(p.gpu), devs.get(p.nic_addr), *(devs.get(b) for b in p.acs_redirect))
                    if d is not None and d.iommu_type in TRANSLATING})
    if iommu:
        add("acs", iommu,
            "The IOMMU translates DMA for these devices (group type DMA/DMA-FQ), and Linux turns ACS "
            "redirect on at boot whenever it does: boot with iommu=pt (passthrough) for GPUDirect RDMA.")


def to_json(t: Topology) -> dict[str, Any]:
    def dev(d: PciDev, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": i,
            "pci_bus_id": d.addr,
            "vendor": None if d.vendor is None else f"0x{d.vendor:04x}",
            "device": None if d.device is None else f"0x{d.device:04x}",
            "numa_node": d.numa_node,
            "host_bridge": d.host_bridge,
            "upstream": list(d.chain),
            "link": None if d.link is None else {
                "speed_gts": d.link.speed_gts, "width": d.link.width,
                "max_speed_gts": d.link.max_speed_gts, "max_width": d.link.max_width},
            "iommu_group": d.iommu_group,
            "iommu_type": d.iommu_type,
            "problems": list(d.problems),
        }
        if d.kind == "gpu":
            out["bar1_bytes"] = d.bar_bytes
            out["bars"] = [{"index": b, "bytes": s} for b, s in d.bars]
        else:
            out["name"] = d.name
            out["netdevs"] = list(d.netdevs)
            out["rdma"] = list(d.rdma)
        return out

    on_paths = sorted({b for p in t.pairs for b in p.via})
    bridges = []
    for b in on_paths:
        d = t.tree.devices.get(b)
        acs = d.acs if d else None
        bridges.append({
            "pci_bus_id": b,
            "port_type": PORT_TYPES.get(d.port_type) if d and d.port_type is not None else None,
            "acs": {
                "state": acs.state if acs else "unknown",
                "enabled": None if acs is None or acs.enabled is None else list(acs.enabled),
                "supported": None if acs is None or acs.supported is None else list(acs.supported),
                "redirects": None if acs is None else acs.redirects,
                "why": (acs.why if acs else "bridge not found in the walk"),
            },
            "iommu_group": d.iommu_group if d else None,
            "problems": list(d.problems) if d else ["not found in the walk"],
        })
    return {
        "sysfs": t.tree.sysfs,
        "numa_nodes": t.tree.numa_nodes,
        "gpus": [dev(g, i) for i, g in enumerate(t.gpus)],
        "nics": [dev(n, i) for i, n in enumerate(t.nics)],
        "bridges": bridges,
        "pairs": [_pair(p) for p in t.pairs],
        "best_nic": {g: _pair(p) for g, p in t.best.items()},
        "advice": advice(t),
        "unknown_devices": [{"pci_bus_id": d.addr, "problems": list(d.problems)}
                            for d in t.unknown_devices()],
        "problems": [{"where": w, "problem": why} for w, why in t.tree.problems],
    }


def _pair(p: Pair) -> dict[str, Any]:
    return {
        "gpu": p.gpu, "nic": p.nic, "nic_pci_bus_id": p.nic_addr, "path": p.path,
        "gpudirect": p.gpudirect, "reason": p.reason, "detail": p.detail, "via": list(p.via),
        "acs_redirect": list(p.acs_redirect), "acs_unknown": list(p.acs_unknown),
        "same_iommu_group": p.same_iommu_group, "bottleneck": p.bottleneck,
    }
