"""The tax model on synthetic counter deltas: each canonical scenario of DESIGN.md section 1 gives
its ratio; the ratio window; absent vs zero hops; sum of rates; vanishing series.

Counters are built as a real node's sources would report them: a NIC series (netdev, RoCE port bytes
included), RDMA port series, socket copies (eBPF), CUDA copies (uprobes), GPU PCIe bytes (NVML)."""

from __future__ import annotations

import pytest

from pcietax.model import (
    CUDA,
    GPU,
    MEMCPY,
    NIC,
    PATH_INFO,
    RDMA,
    SOCKET,
    Inputs,
    TaxModel,
    measured_hops,
)
from pcietax.sources.base import labels_of

U = 1_000_000.0  # useful bytes per step
NIC_RX = (NIC[0], labels_of(nic="ens5f0", pci_bus_id="0000:5e:00.0"))
RDMA_RX = (RDMA[0], labels_of(device="mlx5_0", port="1"))
SOCK_IN = (SOCKET, labels_of(direction="ingress", process="vllm"))
CUDA_PAGEABLE = (CUDA, labels_of(kind="h2d", memory="pageable", process="vllm"))
CUDA_PINNED = (CUDA, labels_of(kind="h2d", memory="pinned", process="vllm"))
MEMCPY_IN = (MEMCPY, labels_of(direction="ingress", process="vllm"))
GPU0 = "0000:1b:00.0"
GPU_RX = (GPU[0], labels_of(gpu="0", pci_bus_id=GPU0, uuid="GPU-0"))

TCP_PROVIDES = frozenset({*NIC, SOCKET, CUDA})

# scenario -> (provides, per-step increase of each series, expected ratio, hops that move bytes)
SCENARIOS = {
    "tcp_pageable_cudamemcpy": (
        TCP_PROVIDES, {NIC_RX: U, SOCK_IN: U, CUDA_PAGEABLE: U}, 4.0,
        {"nic_dma", "kernel_copy", "user_copy", "host_to_gpu"}),
    "tcp_memcpy_into_pinned": (
        TCP_PROVIDES | {MEMCPY}, {NIC_RX: U, SOCK_IN: U, MEMCPY_IN: U, CUDA_PINNED: U}, 4.0,
        {"nic_dma", "kernel_copy", "user_copy", "host_to_gpu"}),
    "tcp_into_pinned": (
        TCP_PROVIDES, {NIC_RX: U, SOCK_IN: U, CUDA_PINNED: U}, 3.0,
        {"nic_dma", "kernel_copy", "host_to_gpu"}),
    # RoCE: the NIC series includes the RDMA port bytes (netdev source counts the NIC once).
    "rdma_into_pinned": (
        frozenset({*NIC, *RDMA, CUDA}), {NIC_RX: U, RDMA_RX: U, CUDA_PINNED: U}, 2.0,
        {"nic_dma", "host_to_gpu"}),
    # GPUDirect: the NIC DMAs straight into the GPU; NVML sees the bytes, the CUDA probes see none.
    "gpudirect_rdma": (
        frozenset({*NIC, *RDMA, CUDA, *GPU, PATH_INFO}), {NIC_RX: U, RDMA_RX: U, GPU_RX: U}, 1.0,
        {"nic_gpu_p2p"}),
}


def _run(model: TaxModel, provides, per_step, steps: int, t0: float = 0.0, start=None, p2p=frozenset()):
    """Feed ``steps`` one-second cycles; returns the last state and the counters reached."""
    values = dict(start or dict.fromkeys(per_step, 0.0))
    state = None
    for i in range(steps):
        state = model.update(Inputs(t0 + i, dict(values), provides, p2p))
        for k, inc in per_step.items():
            values[k] = values.get(k, 0.0) + inc
    return state, values


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_canonical_scenario_ratio(name):
    provides, per_step, ratio, moving = SCENARIOS[name]
    model = TaxModel(window=10.0)
    state, _ = _run(model, provides, per_step, steps=12, p2p=frozenset({GPU0}))
    assert state.ratio["ingress"] == pytest.approx(ratio)
    assert "egress" not in state.ratio  # no useful egress traffic: undefined, not 0 or inf
    # 11 steps of traffic after the baseline.
    assert state.useful["ingress"] == pytest.approx(11 * U)
    moved = {h for (h, x), v in state.moved.items() if x == "ingress" and v > 0}
    assert moved == moving
    for h in moving:
        assert state.moved[(h, "ingress")] == pytest.approx(11 * U)


def test_gpudirect_needs_a_ready_pair():
    """The same GPU bytes on a GPU with no GPUDirect-ready NIC are host_to_gpu (NVML) or nothing."""
    provides, per_step, _, _ = SCENARIOS["gpudirect_rdma"]
    state, _ = _run(TaxModel(), provides, per_step, steps=3, p2p=frozenset())
    assert state.moved[("nic_gpu_p2p", "ingress")] == 0
    assert state.moved[("nic_dma", "ingress")] == pytest.approx(2 * U)


def test_header_overhead_reads_slightly_above_the_hop_count():
    """Protocol overhead is real tax: 3% of NIC headers on a pinned TCP path reads 3.03, not 3."""
    provides, per_step, _, _ = SCENARIOS["tcp_into_pinned"]
    per_step = {**per_step, NIC_RX: 1.03 * U}
    state, _ = _run(TaxModel(), provides, per_step, steps=5)
    assert state.ratio["ingress"] == pytest.approx(3.03)


def test_ratio_window_covers_only_the_last_window():
    model = TaxModel(window=10.0)
    provides, staged, _, _ = SCENARIOS["tcp_pageable_cudamemcpy"]
    _, values = _run(model, provides, staged, steps=11)  # t = 0..10, ratio 4
    pinned = {NIC_RX: U, SOCK_IN: U, CUDA_PINNED: U}  # then the app switches to pinned: ratio 3
    state, _ = _run(model, provides, pinned, steps=5, t0=11, start=values)  # t = 11..15
    # Over (5, 15]: 5 s of the old path (4 U each) and 5 s of the new (3 U each) per 10 U useful.
    assert state.ratio["ingress"] == pytest.approx((5 * 4 + 5 * 3) / 10)
    state, _ = _run(model, provides, pinned, steps=25, t0=11, start=values)
    assert state.ratio["ingress"] == pytest.approx(3.0)


def test_ratio_window_with_sparse_cycles():
    """With cycles further apart than the window, the ratio is over the last interval."""
    model = TaxModel(window=2.0, min_useful=0)
    provides, per_step, _, _ = SCENARIOS["tcp_into_pinned"]
    values = dict.fromkeys(per_step, 0.0)
    model.update(Inputs(0.0, dict(values), provides))
    values = {k: v + U for k, v in values.items()}
    state = model.update(Inputs(30.0, dict(values), provides))
    assert state.ratio["ingress"] == pytest.approx(3.0)


def test_invalid_window():
    with pytest.raises(ValueError, match="window"):
        TaxModel(window=0)


def test_absent_vs_zero_hops():
    """A hop with a source that saw nothing is measured (0 bytes); a hop with no source is absent."""
    provides = frozenset({*NIC, SOCKET})
    state, _ = _run(TaxModel(), provides, {NIC_RX: U, SOCK_IN: U}, steps=3)
    assert state.measured == {"nic_dma": True, "kernel_copy": True, "user_copy": False,
                              "host_to_gpu": False, "nic_gpu_p2p": False, "upi": False}
    assert {h for h, _ in state.moved} == {"nic_dma", "kernel_copy"}
    assert state.ratio["ingress"] == pytest.approx(2.0)  # partial: the CUDA hops are absent
    # Now the CUDA probes run but see no copies: host_to_gpu and user_copy are measured zeros.
    state, _ = _run(TaxModel(), provides | {CUDA}, {NIC_RX: U, SOCK_IN: U}, steps=3)
    assert state.measured["host_to_gpu"] and state.measured["user_copy"]
    assert state.moved[("host_to_gpu", "ingress")] == 0 and state.moved[("user_copy", "ingress")] == 0


def test_no_useful_source_means_no_useful_counter_and_no_ratio():
    state, _ = _run(TaxModel(), frozenset(NIC), {NIC_RX: U}, steps=3)
    assert state.useful == {} and state.ratio == {}
    assert state.moved[("nic_dma", "ingress")] == pytest.approx(2 * U)


def test_measured_hops_fallbacks():
    assert measured_hops(frozenset(GPU))["host_to_gpu"]  # NVML when the CUDA probes are off
    assert not measured_hops(frozenset(GPU))["nic_gpu_p2p"]  # cannot split P2P without probes
    assert measured_hops(frozenset({MEMCPY}))["user_copy"]


def test_sum_of_rates_not_average_of_ratios():
    """Two nodes: a busy staged one (ratio 4) and a quiet GPUDirect one (ratio 1). The fleet ratio is
    total moved over total useful from the exported counters, which weights by traffic."""
    busy, quiet = TaxModel(min_useful=0), TaxModel(min_useful=0)
    p, s, _, _ = SCENARIOS["tcp_pageable_cudamemcpy"]
    sb, _ = _run(busy, p, {k: 9 * v for k, v in s.items()}, steps=2)
    p, s, _, _ = SCENARIOS["gpudirect_rdma"]
    sq, _ = _run(quiet, p, s, steps=2, p2p=frozenset({GPU0}))
    moved = sum(v for st in (sb, sq) for (h, x), v in st.moved.items() if x == "ingress")
    useful = sb.useful["ingress"] + sq.useful["ingress"]
    assert moved / useful == pytest.approx((9 * 4 + 1) / 10)
    assert moved / useful != pytest.approx((sb.ratio["ingress"] + sq.ratio["ingress"]) / 2)


def test_vanishing_series_returns_with_only_its_increase():
    provides = frozenset(NIC)
    eth1 = (NIC[0], labels_of(nic="eth1", pci_bus_id="0000:3c:00.0"))
    m = TaxModel()
    m.update(Inputs(0, {NIC_RX: 100.0, eth1: 1000.0}, provides))
    m.update(Inputs(1, {NIC_RX: 200.0, eth1: 1100.0}, provides))
    st = m.update(Inputs(2, {NIC_RX: 300.0}, provides))  # eth1 unplugged
    assert st.moved[("nic_dma", "ingress")] == 300
    st = m.update(Inputs(3, {NIC_RX: 400.0, eth1: 1150.0}, provides))  # back, 50 more
    assert st.moved[("nic_dma", "ingress")] == 450
    # A series first seen late is a baseline, not traffic: pcietax counts from its own start.
    eth2 = (NIC[0], labels_of(nic="eth2", pci_bus_id="0000:3d:00.0"))
    st = m.update(Inputs(4, {NIC_RX: 400.0, eth1: 1150.0, eth2: 10**12}, provides))
    assert st.moved[("nic_dma", "ingress")] == 450


def test_exported_counters_never_go_backwards():
    provides = frozenset({*NIC, *RDMA, SOCKET})
    m = TaxModel()
    seq = [{NIC_RX: 100.0, RDMA_RX: 50.0, SOCK_IN: 10.0}, {NIC_RX: 90.0, RDMA_RX: 60.0},
           {NIC_RX: 200.0, RDMA_RX: 40.0, SOCK_IN: 5.0}, {}, {NIC_RX: 300.0, RDMA_RX: 80.0, SOCK_IN: 20.0}]
    prev_moved, prev_useful = 0.0, 0.0
    for t, counters in enumerate(seq):
        st = m.update(Inputs(t, counters, provides))
        moved, useful = sum(st.moved.values()), sum(st.useful.values())
        assert moved >= prev_moved and useful >= prev_useful
        prev_moved, prev_useful = moved, useful


def test_upi_split_by_useful_share():
    from pcietax.model import UPI

    upi = (UPI, labels_of(socket="0", link="0", direction="rx"))
    sock_out = (SOCKET, labels_of(direction="egress", process="vllm"))
    provides = frozenset({SOCKET, UPI})
    st, _ = _run(TaxModel(), provides, {SOCK_IN: 3 * U, sock_out: U, upi: 8 * U}, steps=2)
    assert st.moved[("upi", "ingress")] == pytest.approx(6 * U)
    assert st.moved[("upi", "egress")] == pytest.approx(2 * U)


def test_ratio_needs_a_minimum_of_useful_bytes():
    """A bulk ingress transfer sends ACKs back: a few useful egress bytes against the NIC's transmit
    headers would read as a ratio in the hundreds. Below --ratio.min-useful-bytes in the window
    the ratio is absent, not huge; the counters still carry every byte."""
    nic_tx = (NIC[1], labels_of(nic="ens5f0", pci_bus_id="0000:5e:00.0"))
    sock_out = (SOCKET, labels_of(direction="egress", process="vllm"))
    provides = frozenset({NIC[0], NIC[1], SOCKET})
    per_step = {NIC_RX: U, SOCK_IN: U, nic_tx: 40_000.0, sock_out: 100.0}
    state, _ = _run(TaxModel(window=10.0), provides, per_step, steps=12)
    assert state.ratio["ingress"] == pytest.approx(2.0)
    assert "egress" not in state.ratio
    assert state.useful["egress"] == pytest.approx(11 * 100.0)
    state, _ = _run(TaxModel(window=10.0, min_useful=0), provides, per_step, steps=12)
    assert state.ratio["egress"] == pytest.approx(401.0)


def test_negative_minimum_useful_is_refused():
    with pytest.raises(ValueError, match="minimum useful bytes"):
        TaxModel(min_useful=-1)
