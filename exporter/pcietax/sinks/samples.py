"""One Frame as a flat list of (family, labels, value): the single place that decides what a
collection cycle exports, shared by every sink so Prometheus and OTLP can never disagree."""

from __future__ import annotations

import platform
from collections.abc import Iterator, Sequence

from .. import __version__
from .. import catalog as c
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
                yield c.USEFUL_BYTES, {"direction": x}, tax.useful[x]
        for (hop, x), v in tax.moved.items():
            yield c.MOVED_BYTES, {"hop": hop, "direction": x}, v
        for x, r in tax.ratio.items():
            yield c.TAX_RATIO, {"direction": x}, r
        for hop in HOPS:
            yield c.HOP_MEASURED, {"hop": hop}, 1.0 if tax.measured.get(hop) else 0.0
    for (name, labels), v in fr.counters.items():
        yield name, labels, v
    for (name, labels), v in fr.gauges.items():
        yield name, labels, v
    for st in fr.status.values():
        src = {"source": st.name}
        yield c.SOURCE_UP, src, 1.0 if st.up else 0.0
        yield c.SOURCE_ABSENT, src, 1.0 if st.absent else 0.0
        yield c.SOURCE_ERRORS, src, float(st.errors)
        yield c.SOURCE_RESETS, src, float(st.resets)
        yield c.COLLECT_DURATION_SECONDS, src, st.duration
        # Deprecated alias (0.1.0 name; it never measured a scrape): removed in 0.3.0.
        yield c.SCRAPE_DURATION_SECONDS, src, st.duration
    yield c.COLLECT_RESTING, {}, 1.0 if fr.resting else 0.0
    yield (
        c.BUILD_INFO,
        {"version": __version__, "python": platform.python_version(), "sources": ",".join(source_names)},
        1.0,
    )
