"""The tax model's NVML-fed hops: host_to_gpu from GPU PCIe bytes when no CUDA probes run, and
nic_gpu_p2p = GPU PCIe bytes minus probed host<->GPU copies for GPUs in a GPUDirect-ready pair."""

from __future__ import annotations

from helpers.fakenvml import FakeGpu, FakeNvml
from pcietax.engine import Engine
from pcietax.model import CUDA, NIC, PATH_INFO, Inputs, TaxModel
from pcietax.sources.base import Snapshot, labels_of
from pcietax.sources.nvml import RX, TX, NvmlSource

GPU0 = "0000:3b:00.0"
GPU1 = "0000:5e:00.0"


def gpu_series(family: str, gpu: int, bus: str) -> tuple[str, tuple]:
    return (family, labels_of(gpu=bus, pci_bus_id=bus, uuid=f"GPU-{gpu}"))


def cuda_series(kind: str) -> tuple[str, tuple]:
    return (CUDA, labels_of(kind=kind, memory="pinned", process="infer"))


def nic_series(family: str) -> tuple[str, tuple]:
    return (family, labels_of(nic="eth0", pci_bus_id="0000:3a:00.0"))


def run(model: TaxModel, steps: list[dict], provides: frozenset[str], p2p: frozenset[str] = frozenset()):
    state = None
    for t, counters in enumerate(steps):
        state = model.update(Inputs(float(t), counters, provides, p2p))
    return state


def test_host_to_gpu_from_nvml_bytes_when_no_probes():
    provides = frozenset({RX, TX})
    steps = [
        {gpu_series(RX, 0, GPU0): 1000.0, gpu_series(TX, 0, GPU0): 50.0, gpu_series(RX, 1, GPU1): 0.0},
        {gpu_series(RX, 0, GPU0): 5000.0, gpu_series(TX, 0, GPU0): 250.0, gpu_series(RX, 1, GPU1): 3000.0},
    ]
    st = run(TaxModel(), steps, provides)
    assert st.measured["host_to_gpu"] and not st.measured["nic_gpu_p2p"]
    # every GPU's received bytes are host->GPU ingress, transmitted bytes are egress
    assert st.moved[("host_to_gpu", "ingress")] == 4000 + 3000
    assert st.moved[("host_to_gpu", "egress")] == 200
    assert ("nic_gpu_p2p", "ingress") not in st.moved  # absent, not zero


def test_nic_gpu_p2p_is_gpu_bytes_minus_probed_copies_for_ready_pairs():
    provides = frozenset({RX, TX, CUDA, PATH_INFO, *NIC})
    steps = [
        {gpu_series(RX, 0, GPU0): 0.0, gpu_series(RX, 1, GPU1): 0.0, cuda_series("h2d"): 0.0,
         nic_series(NIC[0]): 0.0},
        # GPU0 (ready pair) took 10000 B over PCIe; GPU1 (no ready pair) took 4000 B, all of them
        # host copies since it cannot do P2P; the probes saw 7000 B of cudaMemcpy H2D (no GPU
        # label), so 4000 are GPU1's and 3000 GPU0's: GPU0's P2P is 10000 - 3000. The NIC
        # received 12000 B.
        {gpu_series(RX, 0, GPU0): 10000.0, gpu_series(RX, 1, GPU1): 4000.0, cuda_series("h2d"): 7000.0,
         nic_series(NIC[0]): 12000.0},
    ]
    st = run(TaxModel(), steps, provides, frozenset({GPU0}))
    assert st.measured["nic_gpu_p2p"]
    assert st.moved[("nic_gpu_p2p", "ingress")] == 7000
    assert st.moved[("host_to_gpu", "ingress")] == 7000  # probes win over NVML for host<->GPU
    assert st.moved[("nic_dma", "ingress")] == 12000 - 7000  # P2P bytes did not land in host memory


def test_no_p2p_without_probes_even_with_a_ready_pair():
    provides = frozenset({RX, TX, PATH_INFO})
    steps = [{gpu_series(RX, 0, GPU0): 0.0}, {gpu_series(RX, 0, GPU0): 900.0}]
    st = run(TaxModel(), steps, provides, frozenset({GPU0}))
    assert not st.measured["nic_gpu_p2p"]  # without probes GPU bytes cannot be split
    assert st.moved[("host_to_gpu", "ingress")] == 900


class _Stub:
    """Another source as the engine sees it: the topology verdict and CUDA probe counters."""

    name = "stub"

    def __init__(self) -> None:
        self.h2d = 0.0

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def read(self) -> Snapshot:
        s = Snapshot(provides=frozenset({CUDA, PATH_INFO}))
        s.gauge(PATH_INFO, 1, gpu=GPU0, nic="eth0", path="PIX", gpudirect="ready", reason="")
        s.counter(CUDA, self.h2d, kind="h2d", memory="pinned", process="infer")
        return s


def test_engine_matches_nvml_bus_ids_to_topology_verdicts():
    """NVML spells bus ids 00000000:3B:00.0; the topology source uses sysfs form. The nvml source
    normalises, so the engine's P2P set finds the GPU."""
    fake = FakeNvml(gpus=[FakeGpu(pci_bus_id="00000000:3B:00.0", rx=(0, 8000)),
                          FakeGpu(pci_bus_id="00000000:5E:00.0", rx=(0, 5000))])
    stub = _Stub()
    engine = Engine([NvmlSource(fake, clock=fake.clock), stub], TaxModel(), clock=fake.clock)
    engine.start_sources()
    engine.collect()
    fake.advance()
    # 7000 B of copies: GPU 5e (no ready pair) took 5000 B, all copies; the other 2000 are 3b's.
    stub.h2d = 7000.0
    st = engine.collect().tax
    assert st is not None
    assert st.moved[("nic_gpu_p2p", "ingress")] == 8000 - 2000
    assert st.moved[("host_to_gpu", "ingress")] == 7000
    engine.close()
