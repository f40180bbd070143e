"""Prometheus exposition: a custom collector that builds fresh metric families from one Frame per
scrape (client_python's custom-collector pattern), so concurrent scrapes each see one consistent
collection cycle and nothing is shared or mutated behind them.

The two formats Prometheus asks for (text 0.0.4 and OpenMetrics 1.0.0) are also written directly
from the Frame, byte for byte what client_python would write (tests compare the two): on a GPU node
with a thousand IRQ lines, client_python's per-sample formatting dominated the scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, CONTENT_TYPE_PLAIN_1_0_0, choose_encoder
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_1_0_0
from prometheus_client.registry import Collector

from ..catalog import FAMILIES, Family, check_labels, family
from ..engine import Frame
from ..sources.base import Labels
from .samples import frame_rows

Rows = dict[str, list[tuple[Labels | dict[str, str], float]]]

# Rendered lines are cached per series; a label set that churns (processes come and go) must not
# grow the cache without bound.
_LINE_CACHE_MAX = 100_000


def _new(f: Family) -> Any:
    cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
    # CounterMetricFamily wants the name without _total; it appends it back on exposition.
    return cls(_base_name(f), f.help, labels=list(f.labels))


def _base_name(f: Family) -> str:
    return f.name[: -len("_total")] if f.kind == "counter" and f.name.endswith("_total") else f.name


def _rows(fr: Frame, sources: str) -> Rows:
    """Every sample of one frame, grouped by family, in the order they are exposed."""
    rows: Rows = {}
    for name, labels, value in frame_rows(fr, sources.split(",") if sources else []):
        family(name)  # unknown families fail loudly: the catalog is the contract
        rows.setdefault(name, []).append((labels, value))
    return rows


def _go_float(value: float) -> str:
    """client_python's floatToGoString with the common case (a finite positive float) first."""
    d = float(value)
    s = repr(d)
    if d > 0:
        dot = s.find(".")
        if dot > 6:  # Go switches to exponents sooner than Python
            mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
            return f"{mantissa}e+{dot - 1:02d}"
        return "+Inf" if s == "inf" else s
    if d != d:
        return "NaN"
    return "-Inf" if s == "-inf" else s


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class PcietaxCollector(Collector):
    def __init__(self, frame: Callable[[], Frame], source_names: list[str]) -> None:
        self._frame = frame
        self._sources = ",".join(source_names)
        # series -> (rendered "name{labels} ", value, rendered line)
        self._lines: dict[tuple[str, Labels], tuple[str, float, str]] = {}

    def collect(self) -> Iterator[Metric]:
        rows = _rows(self._frame(), self._sources)
        for name, f in FAMILIES.items():
            samples = rows.get(name)
            if not samples:
                continue
            m = _new(f)
            for labels, value in samples:
                lv = dict(labels)
                check_labels(name, lv.items())
                m.add_metric([lv.get(k, "") for k in f.labels], value)
            yield m

    def render(self, openmetrics: bool) -> bytes:
        """The exposition of the current frame: Prometheus text 0.0.4, or OpenMetrics 1.0.0."""
        rows = _rows(self._frame(), self._sources)
        cache = self._lines
        if len(cache) > _LINE_CACHE_MAX:
            cache.clear()
        out: list[str] = []
        for name, f in FAMILIES.items():
            samples = rows.get(name)
            if not samples:
                continue
            base = _base_name(f)
            sample_name = base + "_total" if f.kind == "counter" else base
            head = base if openmetrics else sample_name
            doc = f.help.replace("\\", r"\\").replace("\n", r"\n")
            if openmetrics:
                doc = doc.replace('"', r"\"")
            out.append(f"# HELP {head} {doc}\n# TYPE {head} {f.kind}\n")
            for labels, value in samples:
                key = (name, labels if isinstance(labels, tuple) else tuple(sorted(labels.items())))
                hit = cache.get(key)
                if hit is not None and hit[1] == value:
                    out.append(hit[2])  # unchanged since the last render (link state, idle IRQs)
                    continue
                if hit is None:
                    lv = dict(labels)
                    # A label the catalog does not list must fail, not vanish from the line: dropped
                    # labels turn distinct series into duplicates. Checked once per new series.
                    check_labels(name, lv.items())
                    inner = ",".join(f'{k}="{_escape_value(lv.get(k, ""))}"' for k in sorted(f.labels))
                    prefix = f"{sample_name}{{{inner}}} " if inner else f"{sample_name} "
                else:
                    prefix = hit[0]
                line = prefix + _go_float(value) + "\n"
                cache[key] = (prefix, value, line)
                out.append(line)
        if openmetrics:
            out.append("# EOF\n")
        return "".join(out).encode("utf-8")


class PcietaxRegistry(CollectorRegistry):
    """The registry ``pcietax serve`` exposes: the pcietax collector alone, rendered directly for
    the formats Prometheus negotiates, through client_python for anything else."""

    def __init__(self, frame: Callable[[], Frame], source_names: list[str]) -> None:
        super().__init__(auto_describe=False)
        self.collector = PcietaxCollector(frame, source_names)
        self.register(self.collector)

    def render(self, content_type: str) -> bytes | None:
        """Our own rendering for the content types Prometheus negotiates; None for the rest. Every
        pcietax metric and label name is a legacy Prometheus name, which the "underscores" and
        "allow-utf-8" escaping schemes leave as it is."""
        fmt = _FAST_FORMATS.get(content_type)
        return None if fmt is None else self.collector.render(openmetrics=fmt == "openmetrics")


_FAST_FORMATS = {
    CONTENT_TYPE_PLAIN_0_0_4: "text",
    **{f"{CONTENT_TYPE_PLAIN_1_0_0}; escaping={e}": "text" for e in ("underscores", "allow-utf-8")},
    OPENMETRICS_1_0_0: "openmetrics",
    **{f"{OPENMETRICS_1_0_0}; escaping={e}": "openmetrics" for e in ("underscores", "allow-utf-8")},
}


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """Body and content type for a scrape with this Accept header (client_python's negotiation),
    as server.py serves it."""
    encoder, content_type = choose_encoder(accept)
    if isinstance(registry, PcietaxRegistry):
        body = registry.render(content_type)
        if body is not None:
            return body, content_type
    return encoder(registry), content_type
