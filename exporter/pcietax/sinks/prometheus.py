"""Prometheus exposition: a custom collector that builds fresh metric families from one Frame per
scrape (client_python's custom-collector pattern), so concurrent scrapes each see one consistent
collection cycle and nothing is shared or mutated behind them."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..catalog import FAMILIES, Family, family
from ..engine import Frame
from ..model import DIRECTIONS, HOPS
from ..sources.base import Labels


def _new(f: Family) -> Any:
    cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
    # CounterMetricFamily wants the name without _total; it appends it back on exposition.
    name = f.name[: -len("_total")] if f.kind == "counter" and f.name.endswith("_total") else f.name
    return cls(name, f.help, labels=list(f.labels))


class _Families:
    """Family objects created on first use, in catalog order."""

    def __init__(self) -> None:
        self._by_name: dict[str, Any] = {}

    def add(self, name: str, labels: Labels | dict[str, str], value: float) -> None:
        f = family(name)
        m = self._by_name.get(name)
        if m is None:
            m = self._by_name[name] = _new(f)
        lv = dict(labels)
        m.add_metric([lv.get(k, "") for k in f.labels], value)

    def ordered(self) -> Iterator[Metric]:
        for name in FAMILIES:
            if name in self._by_name:
                yield self._by_name[name]


class PcietaxCollector(Collector):
    def __init__(self, frame: Callable[[], Frame], source_names: list[str]) -> None:
        self._frame = frame
        self._sources = ",".join(source_names)

    def collect(self) -> Iterator[Metric]:
        fr = self._frame()
        out = _Families()
        tax = fr.tax
        if tax is not None:
            for x in DIRECTIONS:
                if x in tax.useful:
                    out.add("pcietax_useful_bytes_total", {"direction": x}, tax.useful[x])
            for (hop, x), v in tax.moved.items():
                out.add("pcietax_moved_bytes_total", {"hop": hop, "direction": x}, v)
            for x, r in tax.ratio.items():
                out.add("pcietax_tax_ratio", {"direction": x}, r)
            for hop in HOPS:
                out.add("pcietax_hop_measured", {"hop": hop}, 1.0 if tax.measured.get(hop) else 0.0)
        for (name, labels), v in fr.counters.items():
            out.add(name, labels, v)
        for (name, labels), v in fr.gauges.items():
            out.add(name, labels, v)
        for st in fr.status.values():
            src = {"source": st.name}
            out.add("pcietax_source_up", src, 1.0 if st.up else 0.0)
            out.add("pcietax_source_errors_total", src, st.errors)
            out.add("pcietax_source_resets_total", src, st.resets)
            out.add("pcietax_scrape_duration_seconds", src, st.duration)
        out.add(
            "pcietax_build_info",
            {"version": __version__, "python": platform.python_version(), "sources": self._sources},
            1.0,
        )
        yield from out.ordered()
