"""The tax model: monotonic source counters in, useful bytes, moved bytes per hop and the live tax
ratio out. Pure arithmetic on snapshots (no I/O, no clock, no Prometheus), per DESIGN.md section 1.

Every update works on per-series deltas, so a series that vanishes (a NIC unplugged) and returns
later adds only what it moved in between, and every exported counter only rises.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from .sources.base import Labels

HOPS = ("nic_dma", "kernel_copy", "user_copy", "host_to_gpu", "nic_gpu_p2p", "upi")
DIRECTIONS = ("ingress", "egress")

NIC = ("pcietax_nic_receive_bytes_total", "pcietax_nic_transmit_bytes_total")
RDMA = ("pcietax_rdma_port_receive_bytes_total", "pcietax_rdma_port_transmit_bytes_total")
GPU = ("pcietax_gpu_pcie_receive_bytes_total", "pcietax_gpu_pcie_transmit_bytes_total")
SOCKET = "pcietax_socket_copy_bytes_total"
CUDA = "pcietax_cuda_copy_bytes_total"
MEMCPY = "pcietax_memcpy_bytes_total"
UPI = "pcietax_upi_bytes_total"
PATH_INFO = "pcietax_gpu_nic_path_info"

SeriesKey = tuple[str, Labels]
HopKey = tuple[str, str]  # (hop, direction)


@dataclass(frozen=True)
class Inputs:
    """One collection cycle as the model sees it."""

    t: float
    counters: Mapping[SeriesKey, float]  # monotonic values (wraps/resets already absorbed)
    provides: frozenset[str]  # families actively measured by sources that are up
    p2p_gpus: frozenset[str] = frozenset()  # pci_bus_id of GPUs with a GPUDirect-ready NIC pair


@dataclass(frozen=True)
class TaxState:
    useful: Mapping[str, float]  # direction -> bytes; empty when useful bytes are not measured
    moved: Mapping[HopKey, float]  # only measured hops
    measured: Mapping[str, bool]  # hop -> measured
    ratio: Mapping[str, float]  # direction -> ratio; missing when undefined (no useful traffic)


@dataclass
class _Deltas:
    nic: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    rdma: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    socket: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    cuda: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    cuda_pageable: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    memcpy: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    gpu_all: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    gpu_p2p_capable: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))
    upi: float = 0.0


_CUDA_DIRECTION = {"h2d": "ingress", "d2h": "egress"}


def measured_hops(provides: frozenset[str]) -> dict[str, bool]:
    """Which hops have a working source (DESIGN.md section 1, 'first that is available')."""
    gpu = any(f in provides for f in GPU)
    cuda = CUDA in provides
    return {
        "nic_dma": any(f in provides for f in NIC),
        "kernel_copy": SOCKET in provides,
        "user_copy": cuda or MEMCPY in provides,
        "host_to_gpu": cuda or gpu,
        # P2P bytes are GPU bytes that the probes did not see; without probes they cannot be told apart.
        "nic_gpu_p2p": gpu and cuda and PATH_INFO in provides,
        "upi": UPI in provides,
    }


def useful_measured(provides: frozenset[str]) -> bool:
    return SOCKET in provides or any(f in provides for f in RDMA)


class TaxModel:
    def __init__(self, window: float = 10.0, min_useful: float = 1 << 20) -> None:
        if window <= 0:
            raise ValueError("ratio window must be positive")
        if min_useful < 0:
            raise ValueError("minimum useful bytes must not be negative")
        self.window = window
        # A direction that carried almost no payload (the ACKs of a bulk transfer, say) has no
        # meaningful ratio: a few bytes of useful traffic against its NIC's headers reads as 10^6.
        self.min_useful = min_useful
        self._last: dict[SeriesKey, float] = {}
        self._useful = dict.fromkeys(DIRECTIONS, 0.0)
        self._moved: dict[HopKey, float] = {(h, d): 0.0 for h in HOPS for d in DIRECTIONS}
        self._history: deque[tuple[float, dict[str, float], dict[str, float]]] = deque()

    def update(self, inp: Inputs) -> TaxState:
        d = self._deltas(inp)
        measured = measured_hops(inp.provides)
        hop_delta = _hop_deltas(d, measured, CUDA in inp.provides)
        useful_delta = {x: d.socket[x] + d.rdma[x] for x in DIRECTIONS}
        for x in DIRECTIONS:
            self._useful[x] += useful_delta[x]
            for h in HOPS:
                self._moved[(h, x)] += hop_delta[(h, x)]
        return self._state(inp.t, measured, useful_measured(inp.provides))

    # -- internals ---------------------------------------------------------------------------

    def _deltas(self, inp: Inputs) -> _Deltas:
        d = _Deltas()
        for key, value in inp.counters.items():
            if key[0] not in _ROUTED:
                continue  # IRQ, softirq, PCIe health...: not bytes of a hop (most series on a big node)
            prev = self._last.get(key)
            self._last[key] = value
            if prev is None:
                continue  # first sight of a series is its baseline: pcietax counts from its own start
            delta = value - prev
            if delta <= 0:
                continue
            fam, labels = key
            _route(d, fam, dict(labels), delta, inp.p2p_gpus)
        return d

    def _state(self, t: float, measured: dict[str, bool], have_useful: bool) -> TaxState:
        moved_sum = {
            x: sum(self._moved[(h, x)] for h in HOPS if measured[h]) for x in DIRECTIONS
        }
        self._history.append((t, dict(self._useful), moved_sum))
        # Keep the newest point that is at least one window old as the baseline.
        while len(self._history) >= 2 and self._history[1][0] <= t - self.window:
            self._history.popleft()
        t0, useful0, moved0 = self._history[0]
        ratio: dict[str, float] = {}
        if have_useful and t0 < t:
            for x in DIRECTIONS:
                du = self._useful[x] - useful0[x]
                if du > 0 and du >= self.min_useful:
                    ratio[x] = (moved_sum[x] - moved0[x]) / du
        return TaxState(
            useful=dict(self._useful) if have_useful else {},
            moved={k: v for k, v in self._moved.items() if measured[k[0]]},
            measured=measured,
            ratio=ratio,
        )


_ROUTED = frozenset({*NIC, *RDMA, *GPU, SOCKET, CUDA, MEMCPY, UPI})


def _route(d: _Deltas, fam: str, labels: dict[str, str], delta: float, p2p_gpus: frozenset[str]) -> None:
    if fam in NIC:
        d.nic[DIRECTIONS[NIC.index(fam)]] += delta
    elif fam in RDMA:
        d.rdma[DIRECTIONS[RDMA.index(fam)]] += delta
    elif fam == SOCKET:
        x = labels.get("direction")
        if x in d.socket:
            d.socket[x] += delta
    elif fam == CUDA:
        x = _CUDA_DIRECTION.get(labels.get("kind", ""))
        if x is not None:
            d.cuda[x] += delta
            if labels.get("memory") == "pageable":
                d.cuda_pageable[x] += delta
    elif fam == MEMCPY:
        x = labels.get("direction")
        if x in d.memcpy:
            d.memcpy[x] += delta
    elif fam in GPU:
        x = DIRECTIONS[GPU.index(fam)]
        d.gpu_all[x] += delta
        if labels.get("pci_bus_id") in p2p_gpus:
            d.gpu_p2p_capable[x] += delta
    elif fam == UPI and labels.get("direction") == "rx":
        # Each crossing is tx on one socket and rx on the other: count it once.
        d.upi += delta


def _hop_deltas(d: _Deltas, measured: dict[str, bool], probed: bool) -> dict[HopKey, float]:
    out: dict[HopKey, float] = {}
    useful = {x: d.socket[x] + d.rdma[x] for x in DIRECTIONS}
    total_useful = sum(useful.values())
    for x in DIRECTIONS:
        p2p = max(0.0, d.gpu_p2p_capable[x] - d.cuda[x]) if measured["nic_gpu_p2p"] else 0.0
        # Probed copies when the CUDA probes run; otherwise every GPU PCIe byte (NVML).
        h2g = d.cuda[x] if probed else d.gpu_all[x]
        out[("nic_dma", x)] = max(0.0, d.nic[x] - p2p)
        out[("kernel_copy", x)] = d.socket[x]
        out[("user_copy", x)] = d.cuda_pageable[x] + d.memcpy[x]
        out[("host_to_gpu", x)] = h2g
        out[("nic_gpu_p2p", x)] = p2p
        # UPI links carry both directions at once; attribute their bytes by each direction's share of
        # useful traffic in the same interval (evenly when there was none).
        share = useful[x] / total_useful if total_useful > 0 else 0.5
        out[("upi", x)] = d.upi * share
    return out
