"""OTLP/HTTP push of the same rows the Prometheus sink renders (sinks/samples.py), through the
OpenTelemetry SDK: counters become cumulative monotonic sums, gauges gauges. Names are the
Prometheus names without ``_total`` and with a unit, so a Prometheus OTLP receiver maps them back
to exactly the names of DESIGN.md section 2. GPU PCIe bytes are also given as the hardware
semantic convention ``hw.gpu.io``."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import __version__
from ..catalog import FAMILIES, Family
from ..engine import Frame
from .samples import Row, frame_rows

GPU_IO = {
    "pcietax_gpu_pcie_receive_bytes_total": "receive",
    "pcietax_gpu_pcie_transmit_bytes_total": "transmit",
}


class OtlpUnavailable(RuntimeError):
    pass


def otel_name(f: Family) -> tuple[str, str]:
    """(instrument name, UCUM unit) for a catalog family."""
    name = f.name[: -len("_total")] if f.name.endswith("_total") else f.name
    unit = "By" if "_bytes" in name else "s" if name.endswith("_seconds") else "1"
    return name, unit


class _RowCache:
    """Group one Frame's rows by family once, however many instrument callbacks ask."""

    def __init__(self, frame: Callable[[], Frame], sources: Sequence[str]) -> None:
        self._frame = frame
        self._sources = list(sources)
        self._key: object = None
        self._rows: dict[str, list[Row]] = {}

    def rows(self, family: str) -> list[Row]:
        fr = self._frame()
        if fr is not self._key:
            grouped: dict[str, list[Row]] = {}
            for row in frame_rows(fr, self._sources):
                grouped.setdefault(row[0], []).append(row)
            self._key, self._rows = fr, grouped
        return self._rows.get(family, [])


class OtlpSink:
    def __init__(
        self,
        frame: Callable[[], Frame],
        source_names: Sequence[str],
        endpoint: str,
        interval: float = 15.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.metrics import CallbackOptions, Observation
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
        except ImportError as e:
            raise OtlpUnavailable(
                f"--otlp.endpoint needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http "
                f"(pip install 'pcietax[otlp]'): {e}"
            ) from e
        cache = _RowCache(frame, source_names)
        exporter = OTLPMetricExporter(endpoint=endpoint, headers=headers or {}, timeout=10)
        self._reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval * 1000)
        resource = Resource.create(
            {"service.name": "pcietax", "service.version": __version__, "host.name": socket.gethostname()}
        )
        self._provider = MeterProvider(resource=resource, metric_readers=[self._reader])
        meter = self._provider.get_meter("pcietax", __version__)

        def observe(family: str) -> Callable[[CallbackOptions], Iterable[Any]]:
            def cb(_opts: CallbackOptions) -> Iterable[Any]:
                return [Observation(v, dict(labels)) for _, labels, v in cache.rows(family)]

            return cb

        def observe_gpu_io(_opts: CallbackOptions) -> Iterable[Any]:
            out = []
            for fam, direction in GPU_IO.items():
                for _, raw, v in cache.rows(fam):
                    labels = dict(raw)
                    attrs = {"hw.id": labels.get("uuid") or labels.get("pci_bus_id", ""),
                             "network.io.direction": direction}
                    out.append(Observation(v, attrs))
            return out

        for f in FAMILIES.values():
            name, unit = otel_name(f)
            make = meter.create_observable_counter if f.kind == "counter" else meter.create_observable_gauge
            make(name, callbacks=[observe(f.name)], unit=unit, description=f.help)
        meter.create_observable_counter(
            "hw.gpu.io", callbacks=[observe_gpu_io], unit="By",
            description="Received and transmitted bytes by the GPU over PCIe (NVML).",
        )

    def flush(self, timeout_ms: int = 10_000) -> bool:
        return self._provider.force_flush(timeout_ms)

    def close(self) -> None:
        self._provider.shutdown()
