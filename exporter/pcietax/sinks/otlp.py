"""OTLP/HTTP push of the same rows the Prometheus sink renders (sinks/samples.py), through the
OpenTelemetry SDK: counters become cumulative monotonic sums, gauges gauges.

Names (docs/otlp.md). Every catalog family goes out as ``pcietax.*`` with a UCUM unit chosen so that
Prometheus's OTLP translation (``prometheus_name``: unit suffix, ``_total`` for monotonic sums,
``_ratio`` for unit-``1`` gauges) gives back exactly the name of DESIGN.md section 2: the rules and
dashboards read the same series whether Prometheus scraped the exporter or received its pushes.
Where an OpenTelemetry semantic convention exists it is sent as well: ``hw.gpu.io`` (GPU PCIe bytes)
and ``hw.network.io`` (NIC bytes), integer byte counts with ``hw.id``, ``hw.name``, ``hw.vendor``,
``hw.type`` and ``network.io.direction``.

Every data point carries ``node`` (the label the rules and dashboards join on; on the scrape path
the ServiceMonitor adds it), from ``k8s.node.name`` or ``host.name`` of the resource.

A push that fails is logged once per outage (and once when pushes work again), not once per push;
``close(timeout)`` returns within ``timeout`` even when the endpoint never answers."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import __version__
from .. import catalog as c
from ..catalog import FAMILIES, Family
from ..engine import Frame
from .samples import Row, frame_rows

log = logging.getLogger("pcietax")

OTLP_METRICS_PATH = "/v1/metrics"
GPU_IO = {
    c.GPU_PCIE_RECEIVE_BYTES: "receive",
    c.GPU_PCIE_TRANSMIT_BYTES: "transmit",
}
NIC_IO = {
    c.NIC_RECEIVE_BYTES: "receive",
    c.NIC_TRANSMIT_BYTES: "transmit",
}
# Counters without a physical unit: UCUM annotations (curly braces add no Prometheus suffix).
_COUNT_UNITS = {
    c.PCIE_REPLAY: "{replay}",
    c.PCIE_CORRECTABLE_ERRORS: "{error}",
    c.CUDA_COPY_CALLS: "{call}",
    c.HARDIRQ: "{interrupt}",
    c.SOFTIRQ: "{softirq}",
    c.SOURCE_ERRORS: "{error}",
    c.SOURCE_RESETS: "{reset}",
    c.PROBE_HITS: "{hit}",
    c.PROBE_DROPS: "{drop}",
}
# The exporter's own loggers of the OpenTelemetry OTLP exporters (their names differ between SDK
# releases; all are below this one). They log every failed push, and retries: we log per outage.
_OTEL_EXPORTER_LOGGER = "opentelemetry.exporter.otlp"


class OtlpUnavailable(RuntimeError):
    pass


# --- names ------------------------------------------------------------------------------------


def _unit(f: Family) -> str:
    tokens = f.name.split("_")
    if f.name.endswith("_bytes_per_second"):
        return "By/s"
    if "bytes" in tokens:
        return "By"
    if "seconds" in tokens:
        return "s"
    if f.kind == "counter":
        return _COUNT_UNITS.get(f.name, "1")
    if tokens[-1] == "ratio":
        return "1"
    return ""  # info, state and other dimensionless gauges: no suffix, and no `_ratio` either


def _stem(f: Family, unit: str) -> list[str]:
    """The family's words without the prefix, `_total` and the unit words that the unit adds back."""
    words = f.name.removeprefix("pcietax_").split("_")
    if f.kind == "counter" and words[-1] == "total":
        words = words[:-1]
    tail = {"By/s": ["bytes", "per", "second"], "By": ["bytes"], "s": ["seconds"]}.get(unit, [])
    if tail and words[-len(tail):] == tail:
        words = words[: -len(tail)]
    return words


def _otel_names() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    stems = {name: _stem(f, _unit(f)) for name, f in FAMILIES.items()}
    counts: dict[tuple[str, ...], int] = {}
    for words in stems.values():
        counts[tuple(words)] = counts.get(tuple(words), 0) + 1
    for name, f in FAMILIES.items():
        unit = _unit(f)
        words = stems[name]
        if counts[tuple(words)] > 1 and unit:
            # Two families share the stem (pcietax_hardirq_total and pcietax_hardirq_seconds_total):
            # the one with a unit keeps its unit word, so the OTLP names stay distinct.
            words = _stem(f, "")
            if f.kind == "counter" and words[-1] == "total":
                words = words[:-1]
        out[name] = ("pcietax." + ".".join(words), unit)
    return out


OTEL_NAMES = _otel_names()


def otel_name(f: Family) -> tuple[str, str]:
    """(OTLP metric name, UCUM unit) of a catalog family."""
    return OTEL_NAMES[f.name]


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^a-zA-Z0-9:]", name) if t]


_UNIT_WORDS = {"d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
               "us": "microseconds", "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes",
               "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tibibytes", "KBy": "kilobytes",
               "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes", "m": "meters", "V": "volts",
               "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius",
               "Hz": "hertz", "1": "", "%": "percent"}
_PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month",
                   "y": "year"}


def _clean_unit(u: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9:]", "_", u)).lstrip("_")


def prometheus_name(name: str, unit: str, kind: str) -> str:
    """The metric name a Prometheus server stores for an OTLP metric, by the rules of its OTLP
    receiver with the default translation strategy (``UnderscoreEscapingWithSuffixes``,
    prometheus/otlptranslator ``normalizeName``): split the name into tokens of ``[a-zA-Z0-9:]``;
    append the unit (``By`` -> ``bytes``, ``s`` -> ``seconds``, ``X/s`` -> ``..._per_second``; a
    unit in curly braces adds nothing) unless a token already is that word; append ``total`` to
    monotonic sums (``kind="counter"``) and ``ratio`` to gauges of unit ``1``, each moved to the end."""
    tokens = _tokens(name)
    main, _, per = unit.partition("/")
    main, per = main.strip(), per.strip()
    main_word = "" if not main or "{" in main or "}" in main else _UNIT_WORDS.get(main, main)
    per_word = ""
    if per and "{" not in per and "}" not in per:
        per_word = "per_" + _PER_UNIT_WORDS.get(per, per)
    main_word, per_word = _clean_unit(main_word), _clean_unit(per_word)
    if main_word in tokens:
        main_word = ""
    if per_word == "per_":
        per_word = ""
    else:
        per_word = per_word.removesuffix("_")
        if per_word in tokens:
            per_word = ""
    if per_word:
        main_word = main_word.removesuffix("_")
    tokens += [w for w in (main_word, per_word) if w]
    if kind == "counter":
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    out = "_".join(tokens)
    return "_" + out if out[:1].isdigit() else out


def prometheus_label(attribute: str) -> str:
    """The label name Prometheus's OTLP receiver stores for an attribute (``hw.id`` -> ``hw_id``)."""
    out = re.sub(r"_+", "_", re.sub(r"[^a-zA-Z0-9_]", "_", attribute))
    return "key_" + out if out[:1].isdigit() else out


SEMCONV = (  # (OTLP name, unit, attributes besides node) of the semantic-convention metrics
    ("hw.gpu.io", "By", ("gpu", "hw.id", "hw.name", "hw.type", "hw.vendor", "network.io.direction")),
    ("hw.network.io", "By", ("hw.id", "hw.name", "hw.type", "network.io.direction", "nic")),
)


def names_table() -> list[tuple[str, str, str, str]]:
    """(OTLP name, unit, what a Prometheus receiving OTLP stores, the scrape name) for docs/otlp.md."""
    rows = [(*OTEL_NAMES[f.name], prometheus_name(*OTEL_NAMES[f.name], f.kind), f.name)
            for f in FAMILIES.values()]
    rows += [(n, u, prometheus_name(n, u, "counter"), "") for n, u, _ in SEMCONV]
    return rows


def metrics_url(endpoint: str) -> str:
    """The URL to post to: an endpoint without a path (``http://collector:4318``) gets the OTLP/HTTP
    metrics path, as OTEL_EXPORTER_OTLP_ENDPOINT does; one with a path is used as given."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return urlunsplit((parts.scheme, parts.netloc, OTLP_METRICS_PATH, parts.query, parts.fragment))
    return endpoint


# --- the sink ---------------------------------------------------------------------------------


class _RowCache:
    """Group one Frame's rows by family once, however many instrument callbacks ask."""

    def __init__(self, frame: Callable[[], Frame], sources: Sequence[str]) -> None:
        self._frame = frame
        self._sources = list(sources)
        self._key: object = None
        self._rows: dict[str, list[Row]] = {}
        # (family, label names, direction) already checked against the catalog: a few dozen.
        self._checked: set[tuple[str, frozenset[str], str | None]] = set()

    def rows(self, family: str) -> list[Row]:
        """Raises LabelSetMismatch for a row whose label names (or direction) the catalog does not
        give its family, as the Prometheus sink does: drift fails loudly on both paths."""
        fr = self._frame()
        if fr is not self._key:
            grouped: dict[str, list[Row]] = {}
            checked = self._checked
            for row in frame_rows(fr, self._sources):
                lv = dict(row[1])
                sig = (row[0], frozenset(lv), lv.get("direction"))
                if sig not in checked:
                    c.check_labels(row[0], lv.items())
                    checked.add(sig)
                grouped.setdefault(row[0], []).append(row)
            self._key, self._rows = fr, grouped
        return self._rows.get(family, [])


class _Capture(logging.Handler):
    """Keeps the last message of the OpenTelemetry exporter's loggers (the reason of a failed push)
    instead of letting each retry and failure reach the journal."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            try:
                self.last = record.getMessage()
            except Exception:  # a bad format string in someone else's log call
                self.last = str(record.msg)


_capture = _Capture()


def _quiet_otel_exporter_logs() -> _Capture:
    lg = logging.getLogger(_OTEL_EXPORTER_LOGGER)
    if _capture not in lg.handlers:
        lg.addHandler(_capture)
    lg.propagate = False
    return _capture


class _OutageLog:
    """One warning when pushes start failing, one info line when they work again."""

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._url = url
        self._clock = clock
        self._lock = threading.Lock()
        self.failed = 0  # consecutive failed pushes
        self._since = 0.0
        self.muted = False  # after close() returned: a push left behind ends silently

    def result(self, ok: bool, reason: str) -> None:
        with self._lock:
            if self.muted:
                log.debug("otlp: push after close: %s", "ok" if ok else reason)
                return
            if ok:
                if self.failed:
                    log.info("otlp: pushes to %s work again after %d failed (%.0fs)", self._url, self.failed,
                             self._clock() - self._since)
                self.failed = 0
                return
            if not self.failed:
                self._since = self._clock()
                log.warning("otlp: push to %s failed: %s (logged once until pushes work again)", self._url,
                            reason or "no reason given")
            self.failed += 1


def _outage_exporter(inner: Any, outage: _OutageLog, capture: _Capture) -> Any:
    """A MetricExporter that delegates to the OTLP exporter and reports each result to ``outage``."""
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    class OutageLoggingExporter(MetricExporter):
        def __init__(self) -> None:
            super().__init__(preferred_temporality=inner._preferred_temporality,
                             preferred_aggregation=inner._preferred_aggregation)

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
            capture.last = ""
            try:
                result = inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
            except Exception as e:  # the SDK would log it with a traceback on every push
                outage.result(False, f"{type(e).__name__}: {e}")
                return MetricExportResult.FAILURE
            outage.result(result == MetricExportResult.SUCCESS, capture.last)
            return result

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return inner.force_flush(timeout_millis)

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            inner.shutdown(timeout_millis=timeout_millis, **kwargs)

    return OutageLoggingExporter()


class OtlpSink:
    def __init__(
        self,
        frame: Callable[[], Frame],
        source_names: Sequence[str],
        endpoint: str,
        interval: float = 15.0,
        headers: dict[str, str] | None = None,
        *,
        node: str | None = None,
        push_timeout: float = 10.0,
    ) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.metrics import CallbackOptions, Observation
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        except ImportError as e:
            raise OtlpUnavailable(
                f"--otlp.endpoint needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http "
                f"(pip install 'pcietax[otlp]'): {e}"
            ) from e
        self.url = metrics_url(endpoint)
        env = dict(OTELResourceDetector().detect().attributes)  # OTEL_RESOURCE_ATTRIBUTES
        host = socket.gethostname()
        self.node = node or str(env.get("k8s.node.name") or env.get("host.name") or host)
        attrs: dict[str, Any] = {"service.name": "pcietax", "service.version": __version__,
                                 "host.name": host, "service.instance.id": self.node}
        attrs.update(env)  # the operator's attributes win (OTEL_SERVICE_NAME is applied by the SDK)
        if node:
            attrs["service.instance.id"] = node
        self.outage = _OutageLog(self.url)
        capture = _quiet_otel_exporter_logs()
        self._inner = OTLPMetricExporter(endpoint=self.url, headers=headers or {}, timeout=push_timeout)
        exporter = _outage_exporter(self._inner, self.outage, capture)
        self._reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval * 1000)
        self._provider = MeterProvider(resource=Resource.create(attrs), metric_readers=[self._reader])
        self._closed = False
        meter = self._provider.get_meter("pcietax", __version__)
        cache = _RowCache(frame, source_names)
        node_attr = {"node": self.node}

        def observe(family: str) -> Callable[[CallbackOptions], Iterable[Any]]:
            def cb(_opts: CallbackOptions) -> Iterable[Any]:
                return [Observation(v, {**dict(labels), **node_attr}) for _, labels, v in cache.rows(family)]

            return cb

        def gpu_names() -> dict[str, str]:
            return {dict(labels).get("gpu", ""): dict(labels).get("name", "")
                    for _, labels, _v in cache.rows(c.GPU_INFO)}

        def observe_gpu_io(_opts: CallbackOptions) -> Iterable[Any]:
            names = gpu_names()
            out = []
            for fam, direction in GPU_IO.items():
                for _, raw, v in cache.rows(fam):
                    labels = dict(raw)
                    gpu = labels.get("gpu", "")
                    attrs = {"hw.id": labels.get("uuid") or labels.get("pci_bus_id", ""),
                             "hw.name": names.get(gpu, "") or f"GPU {gpu}",
                             "hw.vendor": "NVIDIA", "hw.type": "gpu", "network.io.direction": direction,
                             "gpu": labels.get("gpu", ""), **node_attr}
                    out.append(Observation(int(v), attrs))
            return out

        def observe_nic_io(_opts: CallbackOptions) -> Iterable[Any]:
            out = []
            for fam, direction in NIC_IO.items():
                for _, raw, v in cache.rows(fam):
                    labels = dict(raw)
                    attrs = {"hw.id": labels.get("pci_bus_id") or labels.get("nic", ""),
                             "hw.name": labels.get("nic", ""), "hw.type": "network",
                             "network.io.direction": direction, "nic": labels.get("nic", ""), **node_attr}
                    out.append(Observation(int(v), attrs))
            return out

        for f in FAMILIES.values():
            name, unit = otel_name(f)
            make = meter.create_observable_counter if f.kind == "counter" else meter.create_observable_gauge
            make(name, callbacks=[observe(f.name)], unit=unit, description=f.help)
        meter.create_observable_counter(
            "hw.gpu.io", callbacks=[observe_gpu_io], unit="By",
            description="Received and transmitted bytes by the GPU over PCIe (NVML).",
        )
        meter.create_observable_counter(
            "hw.network.io", callbacks=[observe_nic_io], unit="By",
            description="Received and transmitted bytes by the physical NIC (netdev and RDMA counters).",
        )

    def flush(self, timeout_ms: int = 10_000) -> bool:
        return self._provider.force_flush(timeout_ms)

    def close(self, timeout: float = 2.0) -> bool:
        """A last push with the final counters, then shutdown; returns within ``timeout`` seconds
        whatever the endpoint does (True when the shutdown finished in time). Idempotent."""
        if self._closed:
            return True
        self._closed = True
        done = threading.Event()

        def run() -> None:
            try:
                self._provider.shutdown(timeout_millis=max(timeout, 0.0) * 1000)
            except Exception as e:  # shutdown must not take the exporter's exit down with it
                log.warning("otlp: shutdown failed: %s", e)
            finally:
                done.set()

        threading.Thread(target=run, name="pcietax-otlp-close", daemon=True).start()
        finished = done.wait(max(timeout, 0.0))
        self.outage.muted = True
        if finished:
            return True
        # The last push is stuck on the network: stop its retries and leave the daemon thread behind.
        with contextlib.suppress(Exception):  # already shutting down
            self._inner.shutdown()
        log.warning("otlp: the last push to %s did not finish within %.1fs; its data is dropped",
                    self.url, timeout)
        return False
