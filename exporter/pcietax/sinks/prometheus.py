"""Prometheus exposition: a custom collector that builds fresh metric families from one Frame per
scrape (client_python's custom-collector pattern), so concurrent scrapes each see one consistent
collection cycle and nothing is shared or mutated behind them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..catalog import FAMILIES, Family, family
from ..engine import Frame
from .samples import frame_rows


def _new(f: Family) -> Any:
    cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
    # CounterMetricFamily wants the name without _total; it appends it back on exposition.
    name = f.name[: -len("_total")] if f.kind == "counter" and f.name.endswith("_total") else f.name
    return cls(name, f.help, labels=list(f.labels))


class PcietaxCollector(Collector):
    def __init__(self, frame: Callable[[], Frame], source_names: Sequence[str]) -> None:
        self._frame = frame
        self._sources = list(source_names)

    def collect(self) -> Iterator[Metric]:
        by_name: dict[str, Any] = {}
        for name, labels, value in frame_rows(self._frame(), self._sources):
            f = family(name)
            m = by_name.get(name)
            if m is None:
                m = by_name[name] = _new(f)
            m.add_metric([labels.get(k, "") for k in f.labels], value)
        for name in FAMILIES:  # catalog order, so the exposition reads like the reference
            if name in by_name:
                yield by_name[name]
