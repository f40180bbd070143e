"""How long the topology walk takes, and what the 60 s refresh saves per collection cycle.

Measured side by side on the same machine: a full sysfs walk + verdicts (what `pcietax topo` and
each refresh of the topology source do) against a cached read (what the other 59 of 60 one-second
collection cycles do), on the HGX H100-like fixture (8 GPUs, 9 NICs, 29 bridges) and on this
machine's /sys. Run: .venv/bin/python bench/topology_walk.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "exporter"), str(ROOT / "tests")]

from helpers.topotree import hgx_h100  # noqa: E402
from pcietax.sources.topology import TopologySource  # noqa: E402
from pcietax.topology import discover  # noqa: E402


def timed(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as d:
        lay = hgx_h100(Path(d), redirect_switch=2)
        for label, sysfs in (("HGX fixture", str(lay.sysfs)), ("this /sys", "/sys")):
            walk = timed(lambda s=sysfs: discover(s), 50)
            src = TopologySource(sysfs=sysfs)
            src.read()
            cached = timed(src.read, 2000)
            n = len(discover(sysfs).tree.devices)
            print(f"{label:12s} {n:4d} functions: walk {walk * 1e3:7.2f} ms, cached read "
                  f"{cached * 1e6:6.1f} us, walk/cached = {walk / cached:6.0f}x; "
                  f"per-minute cost at 1 s cycles: every cycle {60 * walk * 1e3:.1f} ms, "
                  f"refresh 60 s {(walk + 59 * cached) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
