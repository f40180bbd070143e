"""The tax model: monotonic source counters in, useful bytes, moved bytes per hop and the live tax
ratio out. Pure arithmetic on snapshots (no I/O, no clock, no Prometheus), per DESIGN.md section 1.

Every update works on per-series deltas, so a series that vanishes (a NIC unplugged) and returns
later adds only what it moved in between, and every exported counter only rises. A series unseen
for ``forget_after`` seconds is forgotten (churning SR-IOV VFs and IRQ lines would otherwise grow
the state forever); if it returns, its first value is a new baseline.

Useful bytes are socket payload plus RDMA *verbs* payload: an InfiniBand port's counters carry its
IPoIB netdev's traffic too, which the socket payload already counts, so the IPoIB bytes come off
the port bytes. Scoping (``--target.*``) is the rule in ``catalog.SCOPE_RULE``: eBPF-attributed
bytes are the targets', every device counter (NIC, RDMA port, NVML, UPI) is node-wide.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import catalog as c
from .sources.base import Labels

HOPS = ("nic_dma", "kernel_copy", "user_copy", "host_to_gpu", "nic_gpu_p2p", "upi")
DIRECTIONS = c.DIRECTIONS

NIC = (c.NIC_RECEIVE_BYTES, c.NIC_TRANSMIT_BYTES)
IPOIB = (c.NIC_IPOIB_RECEIVE_BYTES, c.NIC_IPOIB_TRANSMIT_BYTES)
RDMA = (c.RDMA_PORT_RECEIVE_BYTES, c.RDMA_PORT_TRANSMIT_BYTES)
GPU = (c.GPU_PCIE_RECEIVE_BYTES, c.GPU_PCIE_TRANSMIT_BYTES)
SOCKET = c.SOCKET_COPY_BYTES
CUDA = c.CUDA_COPY_BYTES
MEMCPY = c.MEMCPY_BYTES
UPI = c.UPI_BYTES
PATH_INFO = c.GPU_NIC_PATH_INFO

SeriesKey = tuple[str, Labels]
HopKey = tuple[str, str]  # (hop, direction)


@dataclass(frozen=True)
class Inputs:
    """One collection cycle as the model sees it."""

    t: float
    counters: Mapping[SeriesKey, float]  # monotonic values (wraps/resets already absorbed)
    provides: frozenset[str]  # families actively measured by sources that are up
    # GPUs (PCI address) to treat as P2P-capable on top of those the gauges show (tests, replays).
    p2p_gpus: frozenset[str] = frozenset()
    gauges: Mapping[SeriesKey, float] = field(default_factory=dict)  # topology verdicts among them
    # The counters of the families in ROUTED, when the caller keeps them apart (the engine does):
    # the model then skips the scan of every counter (IRQ lines are most series on a big node).
    routed: Mapping[SeriesKey, float] | None = None


def p2p_capable_gpus(gauges: Mapping[SeriesKey, float]) -> frozenset[str]:
    """GPUs (PCI address) with at least one GPUDirect-ready NIC pair: only their PCIe bytes can be
    NIC<->GPU peer-to-peer traffic. A GPU with no such pair receives network data only through
    host copies, which is what lets the model attribute unlabelled copies (see _p2p)."""
    out = set()
    for fam, labels in gauges:
        if fam == PATH_INFO:
            lv = dict(labels)
            if lv.get("gpudirect") == "ready" and lv.get("gpu"):
                out.add(lv["gpu"])
    return frozenset(out)


@dataclass(frozen=True)
class TaxState:
    useful: Mapping[str, float]  # direction -> bytes; empty when useful bytes are not measured
    moved: Mapping[HopKey, float]  # only measured hops
    measured: Mapping[str, bool]  # hop -> measured
    ratio: Mapping[str, float]  # direction -> ratio; missing when undefined (no useful traffic)


def _per_direction() -> dict[str, float]:
    return dict.fromkeys(DIRECTIONS, 0.0)


@dataclass
class _Deltas:
    nic: dict[str, float] = field(default_factory=_per_direction)
    ipoib: dict[str, float] = field(default_factory=_per_direction)
    rdma: dict[str, float] = field(default_factory=_per_direction)
    socket: dict[str, float] = field(default_factory=_per_direction)
    cuda: dict[str, float] = field(default_factory=_per_direction)
    cuda_pageable: dict[str, float] = field(default_factory=_per_direction)
    memcpy: dict[str, float] = field(default_factory=_per_direction)
    gpu_all: dict[str, float] = field(default_factory=_per_direction)
    # Per GPU (PCI address): NVML bytes, and the CUDA copies whose series name their GPU.
    gpu: dict[tuple[str, str], float] = field(default_factory=dict)
    cuda_gpu: dict[tuple[str, str], float] = field(default_factory=dict)
    upi: float = 0.0

    def useful(self, x: str) -> float:
        """Socket payload plus verbs payload: an InfiniBand port's counters also carry its IPoIB
        netdev's traffic, which the socket payload already has (DESIGN.md section 1)."""
        return self.socket[x] + max(0.0, self.rdma[x] - self.ipoib[x])


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


def _add(d: dict, key, delta: float) -> None:
    d[key] = d.get(key, 0.0) + delta


class TaxModel:
    def __init__(self, window: float = 10.0, min_useful: float = 1 << 20,
                 forget_after: float = 600.0) -> None:
        if window <= 0:
            raise ValueError("ratio window must be positive")
        if min_useful < 0:
            raise ValueError("minimum useful bytes must not be negative")
        self.window = window
        # A direction that carried almost no payload (the ACKs of a bulk transfer, say) has no
        # meaningful ratio: a few bytes of useful traffic against its NIC's headers reads as 10^6.
        self.min_useful = min_useful
        self.forget_after = forget_after
        self._last: dict[SeriesKey, float] = {}
        self._seen: dict[SeriesKey, float] = {}
        self._pruned_at = float("-inf")
        self._useful = dict.fromkeys(DIRECTIONS, 0.0)
        self._moved: dict[HopKey, float] = {(h, d): 0.0 for h in HOPS for d in DIRECTIONS}
        self._history: deque[tuple[float, dict[str, float], dict[str, float]]] = deque()

    def update(self, inp: Inputs) -> TaxState:
        d = self._deltas(inp)
        measured = measured_hops(inp.provides)
        capable = inp.p2p_gpus | p2p_capable_gpus(inp.gauges)
        hop_delta = _hop_deltas(d, measured, CUDA in inp.provides, capable)
        useful_delta = {x: d.useful(x) for x in DIRECTIONS}
        for x in DIRECTIONS:
            self._useful[x] += useful_delta[x]
            for h in HOPS:
                self._moved[(h, x)] += hop_delta[(h, x)]
        return self._state(inp.t, measured, useful_measured(inp.provides))

    # -- internals ---------------------------------------------------------------------------

    def _deltas(self, inp: Inputs) -> _Deltas:
        d = _Deltas()
        seen = self._seen
        routed = inp.routed
        if routed is None:
            routed = {k: v for k, v in inp.counters.items() if k[0] in ROUTED}
        for key, value in routed.items():
            prev = self._last.get(key)
            self._last[key] = value
            seen[key] = inp.t
            if prev is None:
                continue  # first sight of a series is its baseline: pcietax counts from its own start
            delta = value - prev
            if delta <= 0:
                continue
            fam, labels = key
            _route(d, fam, dict(labels), delta)
        if inp.t - self._pruned_at >= self.forget_after / 4:
            self._pruned_at = inp.t
            for key in [k for k, t in seen.items() if inp.t - t > self.forget_after]:
                del seen[key], self._last[key]
        return d

    def __len__(self) -> int:
        """Series the model holds state for (bounded under churn)."""
        return len(self._last)

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


# The families whose bytes the model routes to hops; IRQ, softirq, PCIe health... are not bytes of
# a hop.
ROUTED = frozenset({*NIC, *IPOIB, *RDMA, *GPU, SOCKET, CUDA, MEMCPY, UPI})


def _route(d: _Deltas, fam: str, labels: dict[str, str], delta: float) -> None:
    if fam in NIC:
        d.nic[DIRECTIONS[NIC.index(fam)]] += delta
    elif fam in IPOIB:
        d.ipoib[DIRECTIONS[IPOIB.index(fam)]] += delta
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
            gpu = labels.get("gpu")
            if gpu:
                _add(d.cuda_gpu, (x, gpu), delta)
            if labels.get("memory") == "pageable":
                d.cuda_pageable[x] += delta
    elif fam == MEMCPY:
        x = labels.get("direction")
        if x in d.memcpy:
            d.memcpy[x] += delta
    elif fam in GPU:
        x = DIRECTIONS[GPU.index(fam)]
        d.gpu_all[x] += delta
        _add(d.gpu, (x, labels.get("pci_bus_id") or labels.get("gpu", "")), delta)
    elif fam == UPI and labels.get("direction") == "rx":
        # Each crossing is tx on one socket and rx on the other: count it once.
        d.upi += delta


def _p2p(d: _Deltas, x: str, capable: frozenset[str]) -> float:
    """NIC<->GPU peer-to-peer bytes in direction ``x``, GPU by GPU: a capable GPU's NVML bytes minus
    its own host copies. Copies whose series name their GPU are its own; the rest are given first to
    the GPUs that cannot do P2P (all their PCIe traffic is host copies), and only what those cannot
    hold to the capable GPUs. So one GPUDirect GPU beside one host-staged GPU keeps its P2P bytes
    instead of having the staged GPU's copies subtracted from them."""
    headroom: dict[str, float] = {}
    for (dx, gpu), n in d.gpu.items():
        if dx == x:
            headroom[gpu] = max(0.0, n - d.cuda_gpu.get((x, gpu), 0.0))
    labelled = sum(v for (dx, gpu), v in d.cuda_gpu.items() if dx == x and gpu in headroom)
    unattributed = max(0.0, d.cuda[x] - labelled)
    staged = sum(v for g, v in headroom.items() if g not in capable)
    left = max(0.0, unattributed - staged)
    return max(0.0, sum(v for g, v in headroom.items() if g in capable) - left)


def _hop_deltas(d: _Deltas, measured: dict[str, bool], probed: bool,
                capable: frozenset[str]) -> dict[HopKey, float]:
    out: dict[HopKey, float] = {}
    useful = {x: d.useful(x) for x in DIRECTIONS}
    total_useful = sum(useful.values())
    for x in DIRECTIONS:
        p2p = _p2p(d, x, capable) if measured["nic_gpu_p2p"] else 0.0
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
