"""Cost of one upi collection cycle, side by side with the alternative the issue rules out.

Runs the real UpiSource over a 2-socket Sapphire Rapids fixture tree (16 UPI + 96 IIO counters)
with an opener that opens a real perf software event (cpu-clock, pid=-1, one CPU) for every
planned uncore counter, so every read is a real read(2) of a perf fd. The alternative is one
``perf stat`` subprocess per cycle counting the same number of events on one CPU (as many fds):
what a scrape path that shells out to perf would pay. Prints both medians and their ratio.

    .venv/bin/python bench/bench_upi.py [--cycles 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "exporter"), str(ROOT / "tests")]

from helpers.fakeuncore import FakeUncore  # noqa: E402
from pcietax.perf import PERF_COUNT_SW_CPU_CLOCK, PERF_TYPE_SOFTWARE, EventAttr, SyscallOpener  # noqa: E402
from pcietax.sources.upi import UpiSource  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=200)
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    real = SyscallOpener()

    def opener(attr: EventAttr, cpu: int, pid: int = -1):
        return real(EventAttr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK), cpu % ncpu, pid)

    with tempfile.TemporaryDirectory() as tmp:
        node = FakeUncore(Path(tmp))
        node.spr()
        src = UpiSource(sysfs=str(node.sys), procfs=str(node.proc), opener=opener)
        src.start()
        n = len(src.read().counters)
        ours = []
        for _ in range(args.cycles):
            t0 = time.perf_counter()
            src.read()
            ours.append(time.perf_counter() - t0)
        src.close()

    perf = shutil.which("perf")
    theirs = []
    if perf:
        events = ",".join(["cpu-clock"] * n)
        for _ in range(max(5, args.cycles // 20)):
            t0 = time.perf_counter()
            subprocess.run([perf, "stat", "-x,", "-C", "0", "-e", events, "--", "true"],
                           capture_output=True, check=True)
            theirs.append(time.perf_counter() - t0)

    o = statistics.median(ours)
    print(f"upi source read, {n} series from 112 perf fds: median {o * 1e3:.3f} ms over {len(ours)} cycles")
    if theirs:
        t = statistics.median(theirs)
        print(f"perf stat subprocess, {n} events:            median {t * 1e3:.3f} ms over {len(theirs)} runs")
        print(f"ratio (perf stat / upi source read): {t / o:.0f}x")
    else:
        print("perf not installed: no side-by-side figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
