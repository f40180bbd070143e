"""A fake NVML that implements pcietax.sources.nvml_binding.NvmlBinding, driven by scripted
sequences: each GPU's values are lists indexed by the fake's current step, and the test moves the
step (and the fake clock) forward with ``advance()``.

Real NVML behaviour it reproduces:
- ``nvmlInit`` fails with NVML_ERROR_LIBRARY_NOT_FOUND where no driver is installed, and with
  NVML_ERROR_LIB_RM_VERSION_MISMATCH (18) when the library and the kernel module differ.
- ``nvmlDeviceGetFieldValues`` returns one record per requested field, each with its own nvmlReturn
  (NOT_SUPPORTED for a field the GPU lacks) and value type (a 32-bit record wraps at 2**32).
- A lost GPU answers every call with NVML_ERROR_GPU_IS_LOST, including lookups by UUID; when it comes
  back it has a new handle (the old one stays dead) and its counters restart where the script says.
- GPM metrics are MiB/s averaged between two samples; every allocated sample must be freed.
- ``nvmlDeviceGetPcieThroughput`` returns KB/s of a 20 ms window.
- A hung call blocks (the driver stuck in a call) until the test releases it.
- Bus ids come in NVML's spelling (``00000000:3B:00.0``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pcietax.sources import nvml_binding as nv


@dataclass
class FakeGpu:
    pci_bus_id: str  # NVML spelling
    path: str = "field"  # field | gpm | throughput | none: the best byte counter it supports
    rx: Sequence[float] = (0,)  # per step: raw counter (field), MiB/s (gpm) or KB/s (throughput)
    tx: Sequence[float] = (0,)
    value_type: int = nv.VALUE_TYPE_UNSIGNED_LONG_LONG
    replay: Sequence[int] | None = (0,)  # None: field not supported
    correctable: Sequence[int] | None = (0,)
    link: tuple[int, int, int, int] = (5, 16, 5, 16)  # current gen, width, max gen, width
    numa_node: int | None = 0
    lost_steps: frozenset[int] = frozenset()
    hang_steps: frozenset[int] = frozenset()
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""


@dataclass(frozen=True)
class FakeHandle:
    gpu: int
    generation: int


@dataclass(frozen=True)
class FakeSample:
    gpu: int
    step: int
    serial: int


def _at(seq: Sequence[float], step: int) -> float:
    return seq[min(step, len(seq) - 1)]


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=list)
    no_driver: bool = False
    init_error: int | None = None  # nvmlInit fails with this nvmlReturn_t (e.g. 18, version mismatch)
    init_hangs: bool = False
    driver: str = "570.124.06"
    step: int = 0
    now: float = 1000.0
    release: threading.Event = field(default_factory=threading.Event)
    live_samples: set[FakeSample] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    initialized: bool = False
    _serial: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for i, g in enumerate(self.gpus):
            if not g.uuid:
                g.uuid = f"GPU-{i:08d}-0000-0000-0000-000000000000"

    # -- test controls -----------------------------------------------------------------------

    def advance(self, dt: float = 1.0, steps: int = 1) -> None:
        self.step += steps
        self.now += dt

    def clock(self) -> float:
        return self.now

    # -- internals ---------------------------------------------------------------------------

    def _generation(self, i: int) -> int:
        lost = self.gpus[i].lost_steps
        return sum(1 for s in range(1, self.step + 1) if (s - 1) in lost and s not in lost)

    def _gpu(self, h: Any, what: str) -> FakeGpu:
        with self._lock:
            self.calls.append(what)
        if not self.initialized:
            raise nv.NvmlError(nv.ERROR_UNINITIALIZED, "Uninitialized")
        g = self.gpus[h.gpu]
        if self.step in g.hang_steps:
            self.release.wait()
        if self.step in g.lost_steps or h.generation != self._generation(h.gpu):
            raise nv.NvmlError(nv.ERROR_GPU_IS_LOST, "GPU is lost")
        return g

    # -- NvmlBinding ---------------------------------------------------------------------------

    def init(self) -> None:
        if self.no_driver:
            raise nv.NvmlError(nv.ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found")
        if self.init_error is not None:
            raise nv.NvmlError(self.init_error, f"NVML error {self.init_error}")
        if self.init_hangs:
            self.release.wait()
        self.initialized = True

    def shutdown(self) -> None:
        self.initialized = False

    def driver_version(self) -> str:
        return self.driver

    def device_count(self) -> int:
        return len(self.gpus)

    def handle_by_index(self, index: int) -> FakeHandle:
        if not 0 <= index < len(self.gpus):
            raise nv.NvmlError(nv.ERROR_INVALID_ARGUMENT, "Invalid Argument")
        h = FakeHandle(index, self._generation(index))
        self._gpu(h, "handle_by_index")
        return h

    def handle_by_uuid(self, uuid: str) -> FakeHandle:
        for i, g in enumerate(self.gpus):
            if g.uuid == uuid:
                h = FakeHandle(i, self._generation(i))
                self._gpu(h, "handle_by_uuid")
                return h
        raise nv.NvmlError(nv.ERROR_NOT_FOUND, "Not Found")

    def uuid(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "uuid").uuid

    def name(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "name").name

    def pci_bus_id(self, handle: FakeHandle) -> str:
        return self._gpu(handle, "pci_bus_id").pci_bus_id

    def numa_node(self, handle: FakeHandle) -> int:
        g = self._gpu(handle, "numa_node")
        if g.numa_node is None:
            raise nv.NvmlError(nv.ERROR_NOT_SUPPORTED, "Not Supported")
        return g.numa_node

    def link_generation(self, handle: FakeHandle, state: str) -> int:
        g = self._gpu(handle, "link_generation")
        return g.link[0] if state == "current" else g.link[2]

    def link_width(self, handle: FakeHandle, state: str) -> int:
        g = self._gpu(handle, "link_width")
        return g.link[1] if state == "current" else g.link[3]

    def field_values(self, handle: FakeHandle, field_ids: Sequence[int]) -> list[nv.FieldValue]:
        g = self._gpu(handle, "field_values")
        out = []
        for fid in field_ids:
            seq: Sequence[float] | None = None
            if fid in (nv.FI_PCIE_RX_BYTES, nv.FI_PCIE_TX_BYTES):
                seq = (g.rx if fid == nv.FI_PCIE_RX_BYTES else g.tx) if g.path == "field" else None
                vt = g.value_type
            elif fid == nv.FI_PCIE_REPLAY_COUNTER:
                seq, vt = g.replay, nv.VALUE_TYPE_UNSIGNED_INT
            elif fid == nv.FI_PCIE_CORRECTABLE_ERRORS:
                seq, vt = g.correctable, nv.VALUE_TYPE_UNSIGNED_LONG_LONG
            else:
                vt = nv.VALUE_TYPE_UNSIGNED_INT
            if seq is None:
                out.append(nv.FieldValue(fid, nv.ERROR_NOT_SUPPORTED, 0.0, None))
                continue
            value = _at(seq, self.step)
            if vt == nv.VALUE_TYPE_UNSIGNED_INT:
                value = int(value) % 2**32  # the device register is 32 bits wide
            out.append(nv.FieldValue(fid, nv.SUCCESS, float(value), nv.VALUE_TYPE_BITS.get(vt)))
        return out

    def gpm_supported(self, handle: FakeHandle) -> bool:
        return self._gpu(handle, "gpm_supported").path == "gpm"

    def gpm_sample(self, handle: FakeHandle) -> FakeSample:
        g = self._gpu(handle, "gpm_sample")
        if g.path != "gpm":
            raise nv.NvmlError(nv.ERROR_NOT_SUPPORTED, "Not Supported")
        with self._lock:
            self._serial += 1
            s = FakeSample(handle.gpu, self.step, self._serial)
            self.live_samples.add(s)
        return s

    def gpm_free(self, sample: FakeSample) -> None:
        with self._lock:
            if sample not in self.live_samples:
                raise AssertionError(f"double free of GPM sample {sample}")
            self.live_samples.discard(sample)

    def gpm_metrics(
        self, sample1: FakeSample, sample2: FakeSample, metric_ids: Sequence[int]
    ) -> list[nv.GpmValue]:
        g = self.gpus[sample2.gpu]
        assert sample1 in self.live_samples and sample2 in self.live_samples, "GPM sample used after free"
        out = []
        for mid in metric_ids:
            if mid == nv.GPM_METRIC_PCIE_RX_PER_SEC:
                out.append(nv.GpmValue(mid, nv.SUCCESS, float(_at(g.rx, sample2.step))))
            elif mid == nv.GPM_METRIC_PCIE_TX_PER_SEC:
                out.append(nv.GpmValue(mid, nv.SUCCESS, float(_at(g.tx, sample2.step))))
            else:
                out.append(nv.GpmValue(mid, nv.ERROR_NOT_SUPPORTED, 0.0))
        return out

    def pcie_throughput_kbps(self, handle: FakeHandle, counter: int) -> int:
        g = self._gpu(handle, "pcie_throughput")
        if g.path == "none":
            raise nv.NvmlError(nv.ERROR_NOT_SUPPORTED, "Not Supported")
        return int(_at(g.rx if counter == nv.PCIE_UTIL_RX_BYTES else g.tx, self.step))


def eight_gpus(**overrides: Any) -> list[FakeGpu]:
    """An HGX-like node: 8 GPUs on 8 buses, field counters, Gen5 x16, NUMA 0 for 0-3 and 1 for 4-7."""
    buses = ("18", "2A", "3A", "5D", "9A", "AB", "BA", "DB")
    return [
        FakeGpu(pci_bus_id=f"00000000:{b}:00.0", numa_node=i // 4, **overrides)
        for i, b in enumerate(buses)
    ]
