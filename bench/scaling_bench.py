#!/usr/bin/env python3
"""The scaling table (issue 13 items 14 and 15): what the 1 Hz background cycle of the host sources
(netdev, rdma, procfs, pcie, topology) costs by node size, against a C floor and node_exporter.

For each size (CPUs x /proc/interrupts lines, fixture node of tests/helpers/gpunode.py), in one
child process of this tree, alternating in chunks so all three see the same machine state:
  static     Engine.collect() on a node where nothing changes between cycles
  changing   the same with ~5% of /proc/interrupts lines changed before every cycle (the CPU0
             count of every 20th line, and of LOC and RES: what an idle node's timers and a few
             busy queues do); the file is rewritten outside the timed part
  C floor    bench/readfiles.c (cc -O2 at run time): the same open/read/close, opendir/readdir and
             readlink calls the cycle makes, recorded in-process, and nothing else
Per cycle: median CPU ms (process CPU, the sources' threads included) and wall ms; the ratio to
the C floor's CPU; idle CPU at a 1 s cycle in CPU seconds per hour. With node_exporter installed
it also runs `prometheus-node-exporter --collector.disable-defaults --collector.infiniband
--collector.interrupts --collector.netdev` on the same root and measures its CPU per scrape
(process utime+stime over back-to-back scrapes), to set against pcietax's CPU per 15 s (fifteen
cycles; Prometheus' common scrape interval).

    PYTHONPATH=exporter .venv/bin/python bench/scaling_bench.py \\
        [--sizes 8x100,64x1000,256x5000] [--rounds 40] [--no-node-exporter] \\
        [--out bench/scaling-ci-vm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "exporter"), str(REPO / "tests")]

from cycle_bench import host_engine, watching_files  # noqa: E402
from helpers.exporters import NODE_EXPORTER, free_port, node_exporter_argv  # noqa: E402
from helpers.gpunode import gpu_node  # noqa: E402
from scrape_bench import cpu_seconds, http_scrape, start, stop  # noqa: E402

SCRAPE_INTERVAL = 15
CHANGE_EVERY = 20  # one line in 20 changes per cycle: 5%


def _changer(path: Path):
    """A function that rewrites ``path`` with ~5% of its lines' CPU0 count raised (same width)."""
    lines = path.read_bytes().splitlines(keepends=True)
    per_cpu = [i for i, ln in enumerate(lines[1:], 1) if not ln.startswith((b"ERR:", b"MIS:"))]
    timers = [i for i in per_cpu if lines[i].lstrip().startswith((b"LOC:", b"RES:"))]  # change every second
    hot = sorted(set(per_cpu[::CHANGE_EVERY]) | set(timers))
    step = [0]

    def change() -> None:
        step[0] += 1
        for i in hot:
            head, _, rest = lines[i].partition(b":")
            count = rest[1:11]  # " " then the 10-wide CPU0 column
            lines[i] = head + b": " + b"%10d" % (int(count) + step[0]) + rest[11:]
        path.write_bytes(b"".join(lines))

    return change, len(hot) / max(1, len(lines) - 1)


def _floor(readfiles: Path, calls: Path, rounds: int) -> list[tuple[float, float]]:
    out = subprocess.run([str(readfiles), str(calls), str(rounds)], check=True, capture_output=True,
                         text=True).stdout
    return [(int(w) / 1e6, int(c) / 1e6) for w, c in (ln.split() for ln in out.splitlines())]


def _child(root: str, rounds: int, chunks: int, readfiles: str, calls_path: str) -> None:
    eng = host_engine(root)
    for _ in range(5):
        eng.collect()
    calls: list[tuple[str, str]] = []
    with watching_files(lambda kind, path: calls.append((kind, os.fsdecode(path)))):
        eng.collect()
    Path(calls_path).write_text("".join(f"{k} {p}\n" for k, p in calls))
    change, changed_share = _changer(Path(root) / "proc/interrupts")
    got: dict[str, list[tuple[float, float]]] = {"static": [], "changing": [], "floor": []}
    per = max(1, rounds // chunks)
    for _ in range(chunks):
        for _ in range(per):
            c0, w0 = time.process_time(), time.perf_counter()
            eng.collect()
            got["static"].append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))
        for _ in range(per):
            change()
            c0, w0 = time.process_time(), time.perf_counter()
            eng.collect()
            got["changing"].append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))
        eng.collect()  # back to a static file for the next chunk (one cycle to take it in)
        got["floor"] += _floor(Path(readfiles), Path(calls_path), per)
    frame = eng.collect()
    eng.close()
    kinds = {k: sum(1 for c in calls if c[0] == k) for k in "fdl"}
    print(json.dumps({"samples": got, "calls": kinds, "changed_share": changed_share,
                      "up": sorted(n for n, st in frame.status.items() if st.up),
                      "series": len(frame.counters) + len(frame.gauges)}))


def _node_exporter_cpu(root: Path, min_cpu_s: float = 1.0, max_scrapes: int = 30) -> dict:
    port = free_port()
    argv = node_exporter_argv(root / "sys", root / "proc", port, ["infiniband", "interrupts", "netdev"])
    proc = start(argv, port)
    try:
        size = http_scrape(port)  # the first scrape warms its caches
        c0, n = cpu_seconds(proc.pid), 0
        while n < 3 or (cpu_seconds(proc.pid) - c0 < min_cpu_s and n < max_scrapes):
            http_scrape(port)
            n += 1
        return {"cpu_ms_per_scrape": (cpu_seconds(proc.pid) - c0) / n * 1e3, "scrapes": n,
                "gzip_body_bytes": size}
    finally:
        stop(proc)


def _med(xs: list[tuple[float, float]], i: int) -> float:
    return statistics.median(x[i] for x in xs)


def measure(cpus: int, irq_lines: int, rounds: int, chunks: int, tmp: Path, readfiles: Path,
            node_exporter: bool) -> dict:
    root = tmp / f"node-{cpus}x{irq_lines}"
    gpu_node(root, ncpu=cpus, irq_lines=irq_lines)
    size = (root / "proc/interrupts").stat().st_size
    out = subprocess.run([sys.executable, __file__, "--rounds", str(rounds), "--chunks", str(chunks),
                          "--child", str(root), str(readfiles), str(tmp / "calls.txt")],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""}).stdout
    r = json.loads(out)
    s = r["samples"]
    res: dict = {"cpus": cpus, "irq_lines": irq_lines, "interrupts_bytes": size,
                 "calls_per_cycle": r["calls"], "series": r["series"], "up": r["up"],
                 "changing_share_of_lines": round(r["changed_share"], 4),
                 "c_floor": {"wall_ms_p50": _med(s["floor"], 0), "cpu_ms_p50": _med(s["floor"], 1)}}
    for v in ("static", "changing"):
        cpu = _med(s[v], 1)
        res[v] = {"wall_ms_p50": _med(s[v], 0), "cpu_ms_p50": cpu,
                  "ratio_cpu_to_c_floor": cpu / res["c_floor"]["cpu_ms_p50"],
                  "idle_cpu_s_per_hour": cpu * 3600 / 1e3, "cpu_ms_per_15s": cpu * SCRAPE_INTERVAL}
    if node_exporter and NODE_EXPORTER is not None:
        res["node_exporter"] = _node_exporter_cpu(root)
        ne = res["node_exporter"]["cpu_ms_per_scrape"]
        for v in ("static", "changing"):
            res[v]["ratio_15s_to_node_exporter_scrape"] = res[v]["cpu_ms_per_15s"] / ne if ne else None
    shutil.rmtree(root, ignore_errors=True)
    return res


def table(results: list[dict]) -> str:
    ne = any("node_exporter" in r for r in results)
    head = ["node (CPUs × IRQ lines)", "/proc/interrupts", "cycle CPU ms static", "changing (5%)",
            "C floor ms", "× floor static", "× floor changing", "idle CPU s/h (1 s cycle)"]
    if ne:
        head += ["pcietax CPU ms / 15 s", "node_exporter CPU ms / scrape"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        st, ch = r["static"], r["changing"]
        cells = [f"{r['cpus']} × {r['irq_lines']:,}", f"{r['interrupts_bytes'] / 2**20:.1f} MiB",
                 f"{st['cpu_ms_p50']:.2f}", f"{ch['cpu_ms_p50']:.2f}", f"{r['c_floor']['cpu_ms_p50']:.2f}",
                 f"{st['ratio_cpu_to_c_floor']:.1f}×", f"{ch['ratio_cpu_to_c_floor']:.1f}×",
                 f"{st['idle_cpu_s_per_hour']:.1f} – {ch['idle_cpu_s_per_hour']:.1f}"]
        if ne:
            n = r.get("node_exporter", {}).get("cpu_ms_per_scrape")
            cells += [f"{st['cpu_ms_per_15s']:.0f} – {ch['cpu_ms_per_15s']:.0f}",
                      "–" if n is None else f"{n:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8x100,64x1000,256x5000", help="CPUSxLINES,... (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=40, help="cycles per variant (default: %(default)s)")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--no-node-exporter", action="store_true", help="skip the node_exporter column")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "READFILES", "CALLS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.rounds, args.chunks, args.child[1], args.child[2])
        return 0
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="pcietax-scaling-"))
    try:
        readfiles = tmp / "readfiles"
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-O2", "-o", str(readfiles), str(REPO / "bench/readfiles.c")], check=True)
        results = [measure(c, n, args.rounds, args.chunks, tmp, readfiles, not args.no_node_exporter)
                   for c, n in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    doc = {"command": " ".join(["bench/scaling_bench.py", *sys.argv[1:]]), "git": rev,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "kernel": platform.release()},
           "rounds": args.rounds, "sizes": results}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
