"""The small slice of NVML that the nvml source uses, as a Protocol, and its real implementation over
``pynvml`` from ``nvidia-ml-py``.

The source is written against ``NvmlBinding`` only, so tests hand it a scripted fake
(tests/helpers/fakenvml.py) through the constructor; nothing patches ``pynvml``. Every constant
below was checked against nvidia-ml-py 13.615 (``pynvml.py``) and nvml.h, and
tests/test_nvml_binding.py asserts that they still match the installed ``pynvml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

# nvmlReturn_t (nvml.h)
SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_DRIVER_NOT_LOADED = 9
ERROR_TIMEOUT = 10
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15
ERROR_RESET_REQUIRED = 16
ERROR_UNKNOWN = 999

# Field ids for nvmlDeviceGetFieldValues.
FI_PCIE_REPLAY_COUNTER = 94  # NVML_FI_DEV_PCIE_REPLAY_COUNTER
FI_PCIE_CORRECTABLE_ERRORS = 173  # NVML_FI_DEV_PCIE_COUNT_CORRECTABLE_ERRORS
FI_PCIE_TX_BYTES = 197  # NVML_FI_DEV_PCIE_COUNT_TX_BYTES: "PCIe transmit bytes. Value can be wrapped."
FI_PCIE_RX_BYTES = 198  # NVML_FI_DEV_PCIE_COUNT_RX_BYTES: "PCIe receive bytes. Value can be wrapped."

# nvmlValueType_t: how the union in a field value record is to be read.
VALUE_TYPE_DOUBLE = 0
VALUE_TYPE_UNSIGNED_INT = 1
VALUE_TYPE_UNSIGNED_LONG = 2
VALUE_TYPE_UNSIGNED_LONG_LONG = 3
VALUE_TYPE_SIGNED_LONG_LONG = 4
VALUE_TYPE_SIGNED_INT = 5
VALUE_TYPE_UNSIGNED_SHORT = 6
# Counter width by value type: a wrap can only be told from a reset when the width is known.
VALUE_TYPE_BITS = {
    VALUE_TYPE_UNSIGNED_INT: 32,
    VALUE_TYPE_UNSIGNED_LONG: 64,  # LP64 Linux
    VALUE_TYPE_UNSIGNED_LONG_LONG: 64,
    VALUE_TYPE_UNSIGNED_SHORT: 16,
}

# GPM metric ids (nvmlGpmMetricId_t): PCIe traffic from / to this GPU in MiB/s, averaged over the
# interval between two GPM samples.
GPM_METRIC_PCIE_TX_PER_SEC = 20
GPM_METRIC_PCIE_RX_PER_SEC = 21

# nvmlPcieUtilCounter_t for nvmlDeviceGetPcieThroughput (KB/s over a 20 ms sample).
PCIE_UTIL_TX_BYTES = 0
PCIE_UTIL_RX_BYTES = 1


class NvmlError(Exception):
    """An NVML call failed; ``code`` is the nvmlReturn_t value."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        super().__init__(message or f"NVML error {code}")


class FieldValue(NamedTuple):
    """One record of nvmlDeviceGetFieldValues: each has its own return code."""

    field_id: int
    ret: int
    value: float
    bits: int | None  # counter width from the record's value type; None for doubles/signed


class GpmValue(NamedTuple):
    metric_id: int
    ret: int
    value: float


class NvmlBinding(Protocol):
    """Every NVML call the source makes. Methods raise NvmlError; handles and GPM samples are
    opaque. The real NVML is thread-safe, so calls for different GPUs may run concurrently."""

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def device_count(self) -> int: ...
    def handle_by_index(self, index: int) -> Any: ...
    def handle_by_uuid(self, uuid: str) -> Any: ...
    def uuid(self, handle: Any) -> str: ...
    def name(self, handle: Any) -> str: ...
    def pci_bus_id(self, handle: Any) -> str: ...  # NVML spelling, e.g. 00000000:3B:00.0
    def numa_node(self, handle: Any) -> int: ...
    def link_generation(self, handle: Any, state: str) -> int: ...  # state: "current" | "max"
    def link_width(self, handle: Any, state: str) -> int: ...
    def field_values(self, handle: Any, field_ids: Sequence[int]) -> list[FieldValue]: ...
    def gpm_supported(self, handle: Any) -> bool: ...
    def gpm_sample(self, handle: Any) -> Any: ...
    def gpm_free(self, sample: Any) -> None: ...
    def gpm_metrics(self, sample1: Any, sample2: Any, metric_ids: Sequence[int]) -> list[GpmValue]: ...
    def pcie_throughput_kbps(self, handle: Any, counter: int) -> int: ...


class PynvmlBinding:
    """NvmlBinding over nvidia-ml-py. ``pynvml`` is imported lazily so the exporter runs (with the
    nvml source down) where the package is not installed."""

    def __init__(self) -> None:
        self._nv: Any = None

    def _call(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self._nv, fn)(*args)
        except self._nv.NVMLError as e:
            raise NvmlError(int(e.value), str(e)) from None

    def init(self) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise NvmlError(ERROR_LIBRARY_NOT_FOUND, f"nvidia-ml-py is not installed ({e})") from None
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            msg = str(e)
            if int(e.value) == ERROR_LIBRARY_NOT_FOUND:
                msg += " (libnvidia-ml.so.1 not loadable: no NVIDIA driver on this host?)"
            raise NvmlError(int(e.value), msg) from None

    def shutdown(self) -> None:
        if self._nv is not None:
            self._call("nvmlShutdown")

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def handle_by_index(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def handle_by_uuid(self, uuid: str) -> Any:
        return self._call("nvmlDeviceGetHandleByUUID", uuid)

    def uuid(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetUUID", handle))

    def name(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetName", handle))

    def pci_bus_id(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetPciInfo", handle).busId)

    def numa_node(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetNumaNodeId", handle))

    def link_generation(self, handle: Any, state: str) -> int:
        cur = state == "current"
        return int(self._call(
            "nvmlDeviceGetCurrPcieLinkGeneration" if cur else "nvmlDeviceGetMaxPcieLinkGeneration", handle))

    def link_width(self, handle: Any, state: str) -> int:
        fn = "nvmlDeviceGetCurrPcieLinkWidth" if state == "current" else "nvmlDeviceGetMaxPcieLinkWidth"
        return int(self._call(fn, handle))

    def field_values(self, handle: Any, field_ids: Sequence[int]) -> list[FieldValue]:
        out = []
        for rec in self._call("nvmlDeviceGetFieldValues", handle, list(field_ids)):
            vt = int(rec.valueType)
            out.append(FieldValue(int(rec.fieldId), int(rec.nvmlReturn), _union_value(rec.value, vt),
                                  VALUE_TYPE_BITS.get(vt)))
        return out

    def gpm_supported(self, handle: Any) -> bool:
        return bool(self._call("nvmlGpmQueryDeviceSupport", handle).isSupportedDevice)

    def gpm_sample(self, handle: Any) -> Any:
        sample = self._call("nvmlGpmSampleAlloc")
        try:
            self._call("nvmlGpmSampleGet", handle, sample)
        except NvmlError:
            self._call("nvmlGpmSampleFree", sample)
            raise
        return sample

    def gpm_free(self, sample: Any) -> None:
        self._call("nvmlGpmSampleFree", sample)

    def gpm_metrics(self, sample1: Any, sample2: Any, metric_ids: Sequence[int]) -> list[GpmValue]:
        req = self._nv.c_nvmlGpmMetricsGet_t()
        req.version = self._nv.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(metric_ids)
        req.sample1, req.sample2 = sample1, sample2
        for i, mid in enumerate(metric_ids):
            req.metrics[i].metricId = mid
        res = self._call("nvmlGpmMetricsGet", req)
        return [
            GpmValue(int(m.metricId), int(m.nvmlReturn), float(m.value))
            for m in (res.metrics[i] for i in range(len(metric_ids)))
        ]

    def pcie_throughput_kbps(self, handle: Any, counter: int) -> int:
        return int(self._call("nvmlDeviceGetPcieThroughput", handle, counter))


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _union_value(u: Any, value_type: int) -> float:
    """Read c_nvmlValue_t by its declared type (reading ullVal of a 32-bit record would pick up
    whatever the driver left in the upper half)."""
    attr = {
        VALUE_TYPE_DOUBLE: "dVal",
        VALUE_TYPE_UNSIGNED_INT: "uiVal",
        VALUE_TYPE_UNSIGNED_LONG: "ulVal",
        VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
        VALUE_TYPE_SIGNED_LONG_LONG: "sllVal",
        VALUE_TYPE_SIGNED_INT: "siVal",
        VALUE_TYPE_UNSIGNED_SHORT: "usVal",
    }.get(value_type, "ullVal")
    return float(getattr(u, attr))


def error_name(code: int) -> str:
    return {
        ERROR_NOT_SUPPORTED: "not supported",
        ERROR_NO_PERMISSION: "no permission",
        ERROR_NOT_FOUND: "not found",
        ERROR_DRIVER_NOT_LOADED: "driver not loaded",
        ERROR_TIMEOUT: "timeout",
        ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so not found",
        ERROR_FUNCTION_NOT_FOUND: "function not in this driver",
        ERROR_GPU_IS_LOST: "GPU is lost",
        ERROR_RESET_REQUIRED: "GPU requires reset",
    }.get(code, f"NVML error {code}")
