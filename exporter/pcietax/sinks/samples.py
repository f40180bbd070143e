"""One Frame as a flat list of (family, labels, value): the single place that decides what a
collection cycle exports, shared by every sink so Prometheus and OTLP can never disagree."""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence

from .. import __version__
from ..engine import Frame
from ..model import DIRECTIONS, HOPS
from ..sources.base import Labels

# Labels stay as the source gave them (a sorted tuple) or as the model built them (a dict): the
# Prometheus sink caches rendered lines by them, and converting a thousand IRQ label sets per
# scrape is wasted work.
Row = tuple[str, Labels | dict[str, str], float]


def frame_rows(fr: Frame, source_names: Sequence[str]) -> Iterator[Row]:
    tax = fr.tax
    if tax is not None:
        for x in DIRECTIONS:
            if x in tax.useful:
                yield "pcietax_useful_bytes_total", {"direction": x}, tax.useful[x]
        for (hop, x), v in tax.moved.items():
            yield "pcietax_moved_bytes_total", {"hop": hop, "direction": x}, v
        for x, r in tax.ratio.items():
            yield "pcietax_tax_ratio", {"direction": x}, r
        for hop in HOPS:
            yield "pcietax_hop_measured", {"hop": hop}, 1.0 if tax.measured.get(hop) else 0.0
    for (name, labels), v in fr.counters.items():
        yield name, labels, v
    for (name, labels), v in fr.gauges.items():
        yield name, labels, v
    for st in fr.status.values():
        src = {"source": st.name}
        yield "pcietax_source_up", src, 1.0 if st.up else 0.0
        yield "pcietax_source_absent", src, 1.0 if st.absent else 0.0
        yield "pcietax_source_errors_total", src, float(st.errors)
        yield "pcietax_source_resets_total", src, float(st.resets)
        yield "pcietax_collect_duration_seconds", src, st.duration
        # Deprecated alias (0.1.0 name; it never measured a scrape): removed in 0.3.0.
        yield "pcietax_scrape_duration_seconds", src, st.duration
    yield (
        "pcietax_build_info",
        {"version": __version__, "python": platform.python_version(), "sources": ",".join(source_names)},
        1.0,
    )
