"""The tax model on synthetic counter deltas: each canonical scenario of DESIGN.md section 1 gives
its ratio; the ratio window; absent vs zero hops; sum of rates; vanishing series.

Counters are built as a real node's sources would report them: a NIC series (netdev, RoCE port bytes
included), RDMA port series, socket copies (eBPF), CUDA copies (uprobes), GPU PCIe bytes (NVML)."""

from __future__ import annotations

import pytest

from pcietax.model import (
    CUDA,
    GPU,
    IPOIB,
    MEMCPY,
    NIC,
    PATH_INFO,
    RDMA,
    SOCKET,
    Inputs,
    TaxModel,
    measured_hops,
    p2p_capable_gpus,
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


# -- node shapes beyond the canonical scenarios (issue 11) ---------------------------------------

IB_NIC_RX = (NIC[0], labels_of(nic="ibp19s0", pci_bus_id="0000:13:00.0"))
IPOIB_RX = (IPOIB[0], labels_of(nic="ibp19s0", pci_bus_id="0000:13:00.0"))
IB_PORT_RX = (RDMA[0], labels_of(device="mlx5_0", port="1"))


def test_tcp_over_ipoib_is_not_useful_twice():
    """Pageable TCP over IPoIB on an InfiniBand HCA, U payload bytes per second.

    The HCA's port counters carry the IPoIB traffic (port = U), the netdev source counts the NIC
    once as its port bytes (nic = U) and reports the IPoIB netdev's own bytes (ipoib = U).
    useful = socket U + verbs (port U - ipoib U = 0) = U
    moved  = nic_dma U + kernel_copy U + user_copy U + host_to_gpu U = 4 U
    ratio  = 4 U / U = 4.0 (counting the port bytes as useful too read 4 U / 2 U = 2.0)."""
    provides = frozenset({*NIC, *IPOIB, *RDMA, SOCKET, CUDA})
    per_step = {IB_NIC_RX: U, IPOIB_RX: U, IB_PORT_RX: U, SOCK_IN: U, CUDA_PAGEABLE: U}
    state, _ = _run(TaxModel(), provides, per_step, steps=12)
    assert state.ratio["ingress"] == pytest.approx(4.0)
    assert state.useful["ingress"] == pytest.approx(11 * U)


def test_verbs_beside_ipoib_on_one_hca_counts_the_verbs_payload_once():
    """One HCA carries U of TCP over IPoIB into pinned memory and 2U of verbs RDMA into pinned
    memory, both copied to the GPU.

    port = U (IPoIB) + 2U (verbs) = 3U; ipoib = U; nic = 3U; socket = U; cuda pinned = 3U
    useful = U + (3U - U) = 3U
    moved  = nic_dma 3U + kernel_copy U + host_to_gpu 3U = 7U
    ratio  = 7/3 (TCP path 3 per byte, verbs path 2 per byte: (3*1 + 2*2)/3)."""
    provides = frozenset({*NIC, *IPOIB, *RDMA, SOCKET, CUDA})
    per_step = {IB_NIC_RX: 3 * U, IPOIB_RX: U, IB_PORT_RX: 3 * U, SOCK_IN: U, CUDA_PINNED: 3 * U}
    state, _ = _run(TaxModel(), provides, per_step, steps=12)
    assert state.ratio["ingress"] == pytest.approx(7 / 3)


def test_mixed_node_gpudirect_gpu_keeps_its_p2p_bytes():
    """GPU A has a ready pair and receives U by GPUDirect RDMA; GPU B has none and receives U by
    RDMA into pinned host memory then cudaMemcpy (the probes see U of H2D copies, no GPU label).
    The NIC (RoCE, netdev + port) moves 2U, the RDMA ports count 2U of payload.

    NVML: A = U, B = U. B cannot do P2P, so its U are host copies: the U of copies are B's, and A
    keeps p2p = U - 0 = U (subtracting every GPU's copies read p2p = 0, nic_dma = 2U).
    useful = 2U
    moved  = nic_dma (2U - U) + host_to_gpu U + nic_gpu_p2p U = 3U
    ratio  = 3U / 2U = 1.5 (the GPUDirect byte crosses once, the staged byte twice)."""
    gpu_a, gpu_b = "0000:1b:00.0", "0000:9b:00.0"
    a_rx = (GPU[0], labels_of(gpu=gpu_a, pci_bus_id=gpu_a, uuid="GPU-a"))
    b_rx = (GPU[0], labels_of(gpu=gpu_b, pci_bus_id=gpu_b, uuid="GPU-b"))
    ready = (PATH_INFO, labels_of(gpu=gpu_a, nic="ens5f0", path="PIX", gpudirect="ready", reason="none"))
    blocked = (PATH_INFO, labels_of(gpu=gpu_b, nic="ens5f0", path="SYS", gpudirect="blocked",
                                    reason="path_sys"))
    provides = frozenset({*NIC, *RDMA, CUDA, *GPU, PATH_INFO})
    per_step = {NIC_RX: 2 * U, RDMA_RX: 2 * U, a_rx: U, b_rx: U, CUDA_PINNED: U}
    model = TaxModel()
    values = dict.fromkeys(per_step, 0.0)
    for t in range(12):
        state = model.update(Inputs(t, dict(values), provides, gauges={ready: 1.0, blocked: 1.0}))
        values = {k: v + per_step[k] for k, v in values.items()}
    assert state.moved[("nic_gpu_p2p", "ingress")] == pytest.approx(11 * U)
    assert state.moved[("nic_dma", "ingress")] == pytest.approx(11 * U)
    assert state.moved[("host_to_gpu", "ingress")] == pytest.approx(11 * U)
    assert state.ratio["ingress"] == pytest.approx(1.5)


def test_copies_labelled_with_their_gpu_are_that_gpus_own():
    """When a CUDA copy series names its GPU, the copies come off that GPU only: A (ready) takes
    U of P2P plus U/2 of copies; B (blocked) takes U of copies. p2p = (1.5U - 0.5U) = U."""
    gpu_a, gpu_b = "0000:1b:00.0", "0000:9b:00.0"
    a_rx = (GPU[0], labels_of(gpu=gpu_a, pci_bus_id=gpu_a, uuid="GPU-a"))
    b_rx = (GPU[0], labels_of(gpu=gpu_b, pci_bus_id=gpu_b, uuid="GPU-b"))
    a_cp = (CUDA, (("gpu", gpu_a), *labels_of(kind="h2d", memory="pinned", process="x")))
    b_cp = (CUDA, (("gpu", gpu_b), *labels_of(kind="h2d", memory="pinned", process="x")))
    provides = frozenset({*NIC, CUDA, *GPU, PATH_INFO})
    per_step = {NIC_RX: 2.5 * U, a_rx: 1.5 * U, b_rx: U, a_cp: 0.5 * U, b_cp: U}
    state, _ = _run(TaxModel(), provides, per_step, steps=3, p2p=frozenset({gpu_a}))
    assert state.moved[("nic_gpu_p2p", "ingress")] == pytest.approx(2 * U)


def test_p2p_capable_gpus_come_from_ready_path_verdicts():
    """The model, not the engine, reads the topology gauges: a GPU is P2P-capable when any of its
    NIC pairs is ready; a blocked-only GPU is not."""
    g = {(PATH_INFO, labels_of(gpu="0000:1b:00.0", nic="a", path="PIX", gpudirect="ready",
                               reason="none")): 1.0,
         (PATH_INFO, labels_of(gpu="0000:1b:00.0", nic="b", path="SYS", gpudirect="blocked",
                               reason="path_sys")): 1.0,
         (PATH_INFO, labels_of(gpu="0000:9b:00.0", nic="a", path="PHB", gpudirect="blocked",
                               reason="path_phb")): 1.0,
         ("pcietax_gpu_best_nic_info", labels_of(gpu="0000:9b:00.0", nic="a", path="PIX", gpudirect="ready",
                                                 reason="none")): 1.0}
    assert p2p_capable_gpus(g) == {"0000:1b:00.0"}


def test_scoped_socket_path_with_node_wide_verbs():
    """The scope rule (catalog.SCOPE_RULE): --target.* scopes the socket payload; RDMA verbs payload
    is node-wide in useful bytes, as the NIC bytes that carry it are node-wide in nic_dma.

    A target receives U over TCP (RoCE NIC, pinned, cudaMemcpy); another process on the node
    receives 2U by verbs RDMA into pinned memory, copies not traced (it is not a target).
    nic = U (netdev) + 2U (port) = 3U; useful = socket U + verbs 2U = 3U
    moved = nic_dma 3U + kernel_copy U + host_to_gpu U (the target's probed copies) = 5U
    ratio = 5/3: the verbs bytes add 2U to both sides instead of inflating the ratio to 5."""
    provides = frozenset({*NIC, *RDMA, SOCKET, CUDA})
    per_step = {NIC_RX: 3 * U, RDMA_RX: 2 * U, SOCK_IN: U, CUDA_PINNED: U}
    state, _ = _run(TaxModel(), provides, per_step, steps=12)
    assert state.useful["ingress"] == pytest.approx(11 * 3 * U)
    assert state.ratio["ingress"] == pytest.approx(5 / 3)


def test_loopback_when_lo_is_a_selected_nic():
    """Tests run over loopback with --nic lo: a transfer of U appears as lo's rx U and tx U.
    Receiver: socket ingress U into pinned, cudaMemcpy U. Sender: socket egress U.
    ingress: useful U; moved nic_dma U + kernel_copy U + host_to_gpu U = 3U -> 3.0
    egress:  useful U; moved nic_dma U + kernel_copy U = 2U -> 2.0 (no D2H copy)."""
    lo_rx = (NIC[0], labels_of(nic="lo", pci_bus_id=""))
    lo_tx = (NIC[1], labels_of(nic="lo", pci_bus_id=""))
    sock_out = (SOCKET, labels_of(direction="egress", process="sender"))
    provides = frozenset({*NIC, SOCKET, CUDA})
    per_step = {lo_rx: U, lo_tx: U, SOCK_IN: U, sock_out: U, CUDA_PINNED: U}
    state, _ = _run(TaxModel(), provides, per_step, steps=12)
    assert state.ratio == pytest.approx({"ingress": 3.0, "egress": 2.0})


def test_churning_series_are_forgotten_and_return_as_a_new_baseline():
    """SR-IOV VFs come and go: a series unseen for forget_after seconds leaves the model's state,
    and when it comes back its first value is a baseline (nothing is counted for the gap)."""
    provides = frozenset(NIC)
    m = TaxModel(forget_after=10.0)
    for t in range(100):
        vf = (NIC[0], labels_of(nic=f"vf{t}", pci_bus_id=f"0000:3b:{t:02x}.1"))
        m.update(Inputs(t, {NIC_RX: 100.0 * t, vf: 5.0}, provides))
    assert len(m) <= 1 + 10 + 10 // 4 + 2
    vf0 = (NIC[0], labels_of(nic="vf0", pci_bus_id="0000:3b:00.1"))
    before = m.update(Inputs(100, {NIC_RX: 10_000.0}, provides)).moved[("nic_dma", "ingress")]
    st = m.update(Inputs(101, {NIC_RX: 10_000.0, vf0: 10**9}, provides))
    assert st.moved[("nic_dma", "ingress")] == before
