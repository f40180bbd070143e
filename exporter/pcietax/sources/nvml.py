"""GPU side of the tax from NVML: PCIe bytes received and transmitted by every GPU, link state and
link health, through an ``NvmlBinding`` passed in (the real one wraps nvidia-ml-py).

Byte counters come from the first path a GPU supports (docs/nvml.md):
  ``field``              NVML_FI_DEV_PCIE_COUNT_RX/TX_BYTES, cumulative device counters (R555+);
  ``gpm``                GPM PCIe RX/TX MiB/s between two samples, integrated over the interval;
  ``throughput_sampled`` nvmlDeviceGetPcieThroughput, KB/s over a 20 ms window, extrapolated over the
                         whole interval: an estimate that misses bursts between samples;
  ``none``               no byte counter: links and health only.
``pcietax_gpu_info{counter_path}`` tells which one each GPU uses.

Each GPU is read in its own worker with a budget, so a GPU whose NVML call hangs is reported and
held while the others keep flowing; a lost GPU (GPU_IS_LOST) keeps its last counters, is retried by
UUID on every read, and the engine absorbs the reset of a GPU that comes back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import catalog
from ..pcie_config import read_max_payload_size
from ..pcie_math import RATE_GTS, ceiling
from . import nvml_binding as nv
from .base import Snapshot, SourceAbsent, SourceUnavailable
from .pciaddr import normalize
from .pcie import CEILING, CORRECTABLE, DEFAULT_MPS, REPLAY, SPEED, WIDTH

log = logging.getLogger("pcietax")

RX = catalog.GPU_PCIE_RECEIVE_BYTES
TX = catalog.GPU_PCIE_TRANSMIT_BYTES
INFO = catalog.GPU_INFO

PATH_FIELD = "field"
PATH_GPM = "gpm"
PATH_THROUGHPUT = "throughput_sampled"
PATH_NONE = "none"
BYTE_PATHS = (PATH_FIELD, PATH_GPM, PATH_THROUGHPUT)

MIB = 1 << 20
KIB = 1 << 10  # NVML's "KB/s" for nvmlDeviceGetPcieThroughput (see docs/nvml.md)
LOST_CODES = frozenset({nv.ERROR_GPU_IS_LOST, nv.ERROR_RESET_REQUIRED})
_HEALTH_FIELDS = {nv.FI_PCIE_REPLAY_COUNTER: REPLAY, nv.FI_PCIE_CORRECTABLE_ERRORS: CORRECTABLE}
_BYTE_FIELDS = {nv.FI_PCIE_RX_BYTES: RX, nv.FI_PCIE_TX_BYTES: TX}
# A field id older than the driver comes back INVALID_ARGUMENT rather than NOT_SUPPORTED.
_ABSENT = frozenset({nv.ERROR_NOT_SUPPORTED, nv.ERROR_INVALID_ARGUMENT})
_GPM_METRICS = [nv.GPM_METRIC_PCIE_TX_PER_SEC, nv.GPM_METRIC_PCIE_RX_PER_SEC]
# nvmlInit results that mean "no NVIDIA stack on this node" when the PCI bus agrees (it has no NVIDIA
# GPU): the library (or its binding) is missing, or no kernel driver is loaded. Every other init
# error (a driver/library version mismatch, no permission, ...) is a failure wherever it happens.
ABSENT_INIT_CODES = frozenset({nv.ERROR_LIBRARY_NOT_FOUND, nv.ERROR_DRIVER_NOT_LOADED})
NVIDIA_VENDOR = "0x10de"
DISPLAY_CLASS = 0x03  # PCI base class 03: display controllers (VGA 0x0300, 3D 0x0302: every NVIDIA GPU)
_MAX_SCANNED = 4096  # PCI functions looked at; a node has a few hundred


@dataclass
class _Gpu:
    index: int
    uuid: str
    pci_bus_id: str  # sysfs form
    name: str
    numa_node: str  # "" when NVML does not know
    handle: Any
    path: str
    mps: int
    lost: str = ""  # why the GPU cannot be read, while lost
    pending: Future[_Reading] | None = None
    held: dict[str, tuple[float, int | None]] = field(default_factory=dict)  # family -> last raw value
    # Integration state of the gpm/throughput paths; only the GPU's one in-flight worker touches it.
    rx_total: float = 0.0
    tx_total: float = 0.0
    last_t: float | None = None
    gpm_prev: Any = None

    def where(self) -> str:
        return f"GPU {self.index} ({self.pci_bus_id})"


@dataclass
class _Reading:
    counters: dict[str, tuple[float, int | None]] = field(default_factory=dict)
    link: dict[str, tuple[int, int]] = field(default_factory=dict)  # state -> (generation, width)
    faults: list[tuple[str, str]] = field(default_factory=list)
    lost: str = ""
    bytes_ok: bool = False


class NvmlSource:
    name = "nvml"

    def __init__(
        self,
        binding: nv.NvmlBinding,
        *,
        sysfs: str = "/sys",
        gpu_budget: float = 0.5,
        start_budget: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nv = binding
        self._pci_devices = Path(sysfs) / "bus/pci/devices"
        self._gpu_budget = gpu_budget
        self._start_budget = start_budget
        self._clock = clock
        self._gpus: list[_Gpu] = []
        self._start_faults: list[tuple[str, str]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._start_thread: threading.Thread | None = None
        self.driver_version = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Init NVML and enumerate GPUs in a helper thread with a budget: a driver stuck in init must
        not hold up the exporter's start or its collection loop."""
        prev = self._start_thread
        if prev is not None:
            if prev.is_alive():
                raise SourceUnavailable(f"NVML init still blocked after {self._start_budget:g}s")
            self._start_thread = None
            if self._pool is not None:
                return  # the earlier start finished after its budget ran out, and it worked
        result: list[BaseException | None] = []

        def run() -> None:
            try:
                self._start()
                result.append(None)
            except BaseException as e:  # handed to the caller's thread below
                result.append(e)

        t = threading.Thread(target=run, name="pcietax-nvml-start", daemon=True)
        t.start()
        t.join(self._start_budget)
        if t.is_alive():
            self._start_thread = t
            raise SourceUnavailable(f"NVML init did not return within {self._start_budget:g}s")
        if result and result[0] is not None:
            raise result[0]

    def _start(self) -> None:
        try:
            self._nv.init()
        except nv.NvmlError as e:
            if e.code in ABSENT_INIT_CODES:
                self._raise_absent_or_failed(f"NVML unavailable: {e}")
            raise SourceUnavailable(f"NVML unavailable: {e}") from None
        with contextlib.suppress(nv.NvmlError):  # only for the log line and gpu_check's report
            self.driver_version = self._nv.driver_version()
        try:
            count = self._nv.device_count()
        except nv.NvmlError as e:
            self._shutdown()
            raise SourceUnavailable(f"NVML cannot list GPUs: {e}") from None
        if count == 0:
            self._shutdown()
            self._raise_absent_or_failed("no NVIDIA GPU (NVML sees 0 devices)")
        gpus, faults = [], []
        for i in range(count):
            try:
                gpus.append(self._enumerate(i))
            except (nv.NvmlError, ValueError) as e:
                faults.append(("GPU not usable at start", f"GPU {i}: {e}"))
        if not gpus:
            self._shutdown()
            raise SourceUnavailable(f"no usable NVIDIA GPU: {faults[0][1]}")
        self._gpus, self._start_faults = gpus, faults
        self._pool = ThreadPoolExecutor(max_workers=len(gpus), thread_name_prefix="pcietax-nvml")
        log.info(
            "nvml: driver %s, %s", self.driver_version or "?",
            ", ".join(f"GPU {g.index} {g.pci_bus_id} {g.name}: {g.path}" for g in gpus),
        )

    def _raise_absent_or_failed(self, reason: str) -> None:
        """NVML has nothing to read: absent when the PCI bus has no NVIDIA GPU either (a CPU-only
        node), a failure when it has GPUs that NVML cannot reach (no driver or library for hardware
        that is there, e.g. a pod without ``runtimeClassName: nvidia``). docs/nvml.md."""
        try:
            gpus = nvidia_gpu_functions(self._pci_devices)
        except OSError as e:
            raise SourceUnavailable(f"{reason}; cannot tell whether this node has NVIDIA GPUs: "
                                    f"{self._pci_devices}: {e.strerror or e}") from None
        if gpus:
            shown = ", ".join(gpus[:4]) + (f" and {len(gpus) - 4} more" if len(gpus) > 4 else "")
            raise SourceUnavailable(f"{reason}, but the PCI bus has {len(gpus)} NVIDIA GPU(s): {shown}")
        raise SourceAbsent(f"{reason}; no NVIDIA GPU on the PCI bus ({self._pci_devices})")

    def _enumerate(self, index: int) -> _Gpu:
        h = self._nv.handle_by_index(index)
        bus = normalize(self._nv.pci_bus_id(h))
        try:
            numa = str(self._nv.numa_node(h))
        except nv.NvmlError:
            numa = ""  # older drivers, or no NUMA: the label stays empty
        return _Gpu(
            index=index, uuid=self._nv.uuid(h), pci_bus_id=bus, name=self._nv.name(h), numa_node=numa,
            handle=h, path=self._probe_path(h), mps=self._mps(bus),
        )

    def _probe_path(self, h: Any) -> str:
        """The best byte-counter path this GPU supports (each record carries its own return code)."""
        try:
            vals = self._nv.field_values(h, list(_BYTE_FIELDS))
            if vals and all(v.ret == nv.SUCCESS for v in vals):
                return PATH_FIELD
        except nv.NvmlError as e:
            if e.code in LOST_CODES:
                raise
        try:
            if self._nv.gpm_supported(h):
                return PATH_GPM
        except nv.NvmlError as e:
            if e.code in LOST_CODES:
                raise
        try:
            self._nv.pcie_throughput_kbps(h, nv.PCIE_UTIL_RX_BYTES)
            return PATH_THROUGHPUT
        except nv.NvmlError as e:
            if e.code in LOST_CODES:
                raise
        return PATH_NONE

    def _mps(self, bus: str) -> int:
        """Programmed max payload size from config space (sysfs), for the link ceiling."""
        return read_max_payload_size(self._pci_devices / bus) or DEFAULT_MPS

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.shutdown(wait=False, cancel_futures=True)
        for g in self._gpus:
            if g.gpm_prev is not None and g.pending is None:
                with contextlib.suppress(nv.NvmlError):
                    self._nv.gpm_free(g.gpm_prev)
                g.gpm_prev = None
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._nv.shutdown()
        except nv.NvmlError as e:
            log.debug("nvml: shutdown: %s", e)

    # -- one read ----------------------------------------------------------------------------

    def read(self) -> Snapshot:
        if self._pool is None:
            raise SourceUnavailable("not started")
        snap = Snapshot()
        for what, where in self._start_faults:
            snap.fault(what, where)
        self._start_faults = []
        futures: dict[int, Future[_Reading]] = {}
        for g in self._gpus:
            if g.pending is not None:
                if not g.pending.done():
                    continue  # still hung from an earlier read: one in flight per GPU, at most
                g.pending = None  # its late result is stale; a fresh read carries the true totals
            futures[g.index] = self._pool.submit(self._read_gpu, g)
        wait_futures(list(futures.values()), timeout=self._gpu_budget)
        provides: set[str] = set()
        for g in self._gpus:
            fut = futures.get(g.index)
            if fut is None or not fut.done():
                if fut is not None:
                    g.pending = fut
                snap.fault("NVML call hung", f"{g.where()}: no answer within {self._gpu_budget:g}s")
            else:
                try:
                    r = fut.result(timeout=0)
                except FutureTimeout:  # pragma: no cover - done() was true
                    continue
                except Exception as e:  # one GPU's unexpected failure must not take the others down
                    snap.fault("NVML read failed", f"{g.where()}: {type(e).__name__}: {e}")
                    r = None
                if r is not None:
                    self._apply(g, r, snap)
                    if r.bytes_ok:
                        provides |= {RX, TX}
                    if REPLAY in r.counters:
                        provides.add(REPLAY)
                    if CORRECTABLE in r.counters:
                        provides.add(CORRECTABLE)
            self._emit_held(g, snap)
            snap.gauge(INFO, 1, gpu=g.pci_bus_id, pci_bus_id=g.pci_bus_id, uuid=g.uuid, name=g.name,
                       numa_node=g.numa_node, counter_path=g.path)
        snap.provides = frozenset(provides)
        return snap

    def _apply(self, g: _Gpu, r: _Reading, snap: Snapshot) -> None:
        for what, where in r.faults:
            snap.fault(what, where)
        if r.lost:
            if not g.lost:
                log.warning("nvml: %s lost: %s (holding its counters, retrying)", g.where(), r.lost)
            g.lost = r.lost
            snap.fault("GPU lost", f"{g.where()}: {r.lost}")
            return
        if g.lost:
            log.info("nvml: %s is back", g.where())
            g.lost = ""
        g.held.update(r.counters)
        for state, (gen, width) in r.link.items():
            labels = {"pci_bus_id": g.pci_bus_id, "device_kind": "gpu", "state": state}
            if gen in RATE_GTS:
                snap.gauge(SPEED, RATE_GTS[gen], **labels)
            elif gen:
                snap.fault("unknown PCIe generation", f"{g.where()}: {state} generation {gen}")
            snap.gauge(WIDTH, width, **labels)
        if "current" in r.link:
            gen, width = r.link["current"]
            try:
                c = ceiling(gen, width, g.mps)
                snap.gauge(CEILING, c.usable_bytes_per_second, pci_bus_id=g.pci_bus_id, device_kind="gpu")
            except ValueError:
                pass  # link down (width 0) or a generation pcie_math does not know: no ceiling

    def _emit_held(self, g: _Gpu, snap: Snapshot) -> None:
        """Counters are re-emitted from the last good read while a GPU is lost or hung: they are still
        true totals, and a series that blinks out breaks rate() for everyone."""
        for fam, (value, bits) in g.held.items():
            if fam in (RX, TX):
                snap.counter(fam, value, bits, gpu=g.pci_bus_id, pci_bus_id=g.pci_bus_id, uuid=g.uuid)
            else:
                snap.counter(fam, value, bits, pci_bus_id=g.pci_bus_id, device_kind="gpu")

    # -- per-GPU worker (runs in the pool; one in flight per GPU) ---------------------------

    def _read_gpu(self, g: _Gpu) -> _Reading:
        r = _Reading()
        if g.lost:
            try:
                self._reacquire(g)
            except nv.NvmlError:
                r.lost = g.lost  # still gone (lost, or not enumerated again yet): keep the first reason
                return r
        try:
            self._read_fields(g, r)
            if g.path == PATH_GPM:
                self._read_gpm(g, r)
            elif g.path == PATH_THROUGHPUT:
                self._read_throughput(g, r)
            self._read_link(g, r)
        except nv.NvmlError as e:
            if e.code in LOST_CODES:
                r.lost = nv.error_name(e.code)
            else:
                r.faults.append(("NVML call failed", f"{g.where()}: {e}"))
            r.bytes_ok = False
        return r

    def _reacquire(self, g: _Gpu) -> None:
        """A lost GPU's old handle is dead; find it again by UUID (its index may have moved)."""
        h = self._nv.handle_by_uuid(g.uuid)
        self._nv.uuid(h)  # raises GPU_IS_LOST while it is still gone
        g.handle = h
        # Integrated paths restart from a fresh baseline: the interval spent lost is not extrapolated.
        if g.gpm_prev is not None:
            with contextlib.suppress(nv.NvmlError):
                self._nv.gpm_free(g.gpm_prev)
        g.gpm_prev, g.last_t = None, None

    def _read_fields(self, g: _Gpu, r: _Reading) -> None:
        wanted = dict(_HEALTH_FIELDS)
        if g.path == PATH_FIELD:
            wanted.update(_BYTE_FIELDS)
        got_bytes = 0
        for v in self._nv.field_values(g.handle, list(wanted)):
            fam = wanted.get(v.field_id)
            if fam is None:
                continue
            if v.ret == nv.SUCCESS:
                if not math.isfinite(v.value) or v.value < 0:
                    r.faults.append(("garbage NVML counter", f"{g.where()}: field {v.field_id} = {v.value}"))
                    continue
                r.counters[fam] = (v.value, v.bits)
                got_bytes += fam in (RX, TX)
            elif v.ret in LOST_CODES:
                raise nv.NvmlError(v.ret, nv.error_name(v.ret))
            elif v.ret in _ABSENT and fam not in (RX, TX):
                continue  # a health counter this GPU or driver does not have: absent, not a fault
            else:
                r.faults.append(("NVML field unreadable", f"{g.where()}: field {v.field_id}: "
                                 f"{nv.error_name(v.ret)}"))
        r.bytes_ok = g.path == PATH_FIELD and got_bytes == 2

    def _read_gpm(self, g: _Gpu, r: _Reading) -> None:
        sample = self._nv.gpm_sample(g.handle)
        t = self._clock()
        prev, t0 = g.gpm_prev, g.last_t
        g.gpm_prev, g.last_t = sample, t
        if prev is None or t0 is None:
            r.counters[RX] = (g.rx_total, None)  # first sample: the baseline, nothing to integrate yet
            r.counters[TX] = (g.tx_total, None)
            r.bytes_ok = True
            return
        try:
            vals = self._nv.gpm_metrics(prev, sample, _GPM_METRICS)
        finally:
            self._nv.gpm_free(prev)
        dt = max(0.0, t - t0)
        ok = 0
        for v in vals:
            if v.ret in LOST_CODES:
                raise nv.NvmlError(v.ret, nv.error_name(v.ret))
            if v.ret != nv.SUCCESS or not math.isfinite(v.value) or v.value < 0:
                r.faults.append(("GPM metric unreadable", f"{g.where()}: metric {v.metric_id}: "
                                 f"{nv.error_name(v.ret) if v.ret else v.value}"))
                continue
            if v.metric_id == nv.GPM_METRIC_PCIE_RX_PER_SEC:
                g.rx_total += v.value * MIB * dt
                ok += 1
            elif v.metric_id == nv.GPM_METRIC_PCIE_TX_PER_SEC:
                g.tx_total += v.value * MIB * dt
                ok += 1
        r.counters[RX] = (g.rx_total, None)
        r.counters[TX] = (g.tx_total, None)
        r.bytes_ok = ok == 2

    def _read_throughput(self, g: _Gpu, r: _Reading) -> None:
        rx = self._nv.pcie_throughput_kbps(g.handle, nv.PCIE_UTIL_RX_BYTES)
        tx = self._nv.pcie_throughput_kbps(g.handle, nv.PCIE_UTIL_TX_BYTES)
        t = self._clock()
        if g.last_t is not None:
            # A 20 ms sample stands for the whole interval: sampled, not counted (docs/nvml.md).
            dt = max(0.0, t - g.last_t)
            g.rx_total += rx * KIB * dt
            g.tx_total += tx * KIB * dt
        g.last_t = t
        r.counters[RX] = (g.rx_total, None)
        r.counters[TX] = (g.tx_total, None)
        r.bytes_ok = True

    def _read_link(self, g: _Gpu, r: _Reading) -> None:
        for state in ("current", "max"):
            try:
                gen = self._nv.link_generation(g.handle, state)
                r.link[state] = (gen, self._nv.link_width(g.handle, state))
            except nv.NvmlError as e:
                if e.code in LOST_CODES:
                    raise
                if e.code != nv.ERROR_NOT_SUPPORTED:
                    r.faults.append(("NVML link state unreadable", f"{g.where()}: {state}: {e}"))


def gpu_counter_paths(snap: Snapshot) -> dict[str, str]:
    """pci_bus_id -> counter path, from a snapshot's info gauges (for reports and gpu_check)."""
    out = {}
    for s in snap.gauges:
        if s.family == INFO:
            lv = dict(s.labels)
            out[lv["pci_bus_id"]] = lv["counter_path"]
    return out


def gpu_bytes(snap: Snapshot, gpu: str) -> tuple[float, float] | None:
    """(rx, tx) raw byte counters of GPU ``gpu`` (its PCI address, the ``gpu`` label) in a
    snapshot, or None when it has none."""
    vals: dict[str, float] = {}
    for s in snap.counters:
        if s.family in (RX, TX) and dict(s.labels).get("gpu") == gpu:
            vals[s.family] = s.value
    return (vals[RX], vals[TX]) if len(vals) == 2 else None


def nvidia_gpu_functions(pci_devices: Path) -> list[str]:
    """PCI addresses of NVIDIA display-class functions (GPUs) under ``/sys/bus/pci/devices``. A
    missing directory is a node without a PCI bus (no GPU); any other error is raised. Unreadable
    or malformed ``vendor``/``class`` files of one function are skipped (that function is not
    proven to be a GPU)."""
    try:
        names = sorted(os.listdir(pci_devices))[:_MAX_SCANNED]
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            vendor = _head(pci_devices / name / "vendor").lower()
            cls = int(_head(pci_devices / name / "class"), 16)
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if vendor == NVIDIA_VENDOR and cls >> 16 == DISPLAY_CLASS:
            out.append(name)
    return out


def _head(path: Path, limit: int = 64) -> str:
    """A short sysfs attribute, read boundedly (a hostile tree may put a huge file there)."""
    with open(path, "rb") as f:
        return f.read(limit).decode("ascii").strip()
