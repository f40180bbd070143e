#!/usr/bin/env python3
"""Scrape latency of pcietax vs prometheus-node-exporter on the same fixture node (issue 2's
benchmark): 8 GPUs' PCIe devices behind 8 switches, 8 RDMA ports (6 InfiniBand, 2 RoCE), a
management NIC, and 1,000 /proc/interrupts lines on 64 CPUs by default (a 2-socket inference
server; --cpus 128 or more for bigger hosts), built by tests/helpers/gpunode.py.

Measured in one run, alternating (the order rotates every round so neither side always goes
first on a warm cache):
  pcietax cycle    one full collection cycle in-process (read the 4 host sources, absorb, model)
                   plus rendering the exposition: the work a scrape of pcietax costs in total
  pcietax scrape   GET /metrics of a running `pcietax serve` (renders its latest cycle)
  node_exporter    GET /metrics of `prometheus-node-exporter --collector.disable-defaults
                   --collector.infiniband --collector.interrupts` (it reads the files per scrape)
Both HTTP scrapes send Prometheus' Accept and Accept-Encoding: gzip headers, on a new connection.

By default every counter changes between rounds (the exporters read through a symlink flipped
between two trees whose counters differ), so no line of /proc/interrupts is the same as in the
previous read: the worst case for pcietax's unchanged-line cache. --static keeps one tree.

    .venv/bin/python bench/scrape_bench.py [--cpus 64] [--irq-lines 1000] [--rounds 40] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "exporter"), str(REPO / "tests")]

from helpers.exporters import (  # noqa: E402
    NODE_EXPORTER,
    free_port,
    node_exporter_argv,
    pcietax_argv,
    pcietax_env,
    wait_ready,
)
from helpers.gpunode import gpu_node  # noqa: E402
from pcietax.engine import Engine  # noqa: E402
from pcietax.model import TaxModel  # noqa: E402
from pcietax.sinks.prometheus import PcietaxRegistry, exposition  # noqa: E402
from pcietax.sources import SourceOptions, by_name  # noqa: E402

PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
              "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
}
SOURCES = ("netdev", "rdma", "procfs", "pcie")


def http_scrape(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/metrics", headers=PROMETHEUS_HEADERS)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"port {port}: HTTP {resp.status}")
        return len(body)
    finally:
        conn.close()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def start(argv: list[str], port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_ready(f"http://127.0.0.1:{port}/metrics", proc, timeout=60)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(cpus: int, irq_lines: int, rounds: int, warmup: int, static: bool) -> dict:
    if NODE_EXPORTER is None:
        raise SystemExit("prometheus-node-exporter is not installed (scripts/setup.sh --test)")
    tmp = Path(tempfile.mkdtemp(prefix="pcietax-bench-"))
    procs: list[subprocess.Popen] = []
    engine = None
    try:
        gpu_node(tmp / "a", ncpu=cpus, irq_lines=irq_lines, scale=1)
        if not static:
            gpu_node(tmp / "b", ncpu=cpus, irq_lines=irq_lines, scale=2)
        root = tmp / "node"
        root.symlink_to("a")
        sysfs, procfs = root / "sys", root / "proc"

        def flip(i: int) -> None:
            if static:
                return
            nxt = tmp / "next"
            nxt.symlink_to("b" if i % 2 else "a")
            nxt.rename(root)

        opts = SourceOptions(sysfs=str(sysfs), procfs=str(procfs))
        engine = Engine([by_name()[n].build(opts) for n in SOURCES], TaxModel())
        engine.start_sources()
        registry = PcietaxRegistry(engine.frame, list(SOURCES))

        def cycle() -> None:
            engine.collect()
            exposition(registry, PROMETHEUS_HEADERS["Accept"])

        pt_port, ne_port = free_port(), free_port()
        procs.append(start(pcietax_argv(sysfs, procfs, pt_port), pt_port, env=pcietax_env()))
        procs.append(start(node_exporter_argv(sysfs, procfs, ne_port, ["infiniband", "interrupts"]), ne_port))
        sizes = {"pcietax": http_scrape(pt_port), "node_exporter": http_scrape(ne_port)}

        measures: dict[str, Callable[[], object]] = {
            "pcietax cycle (collect + render)": cycle,
            "pcietax HTTP scrape": lambda: http_scrape(pt_port),
            "node_exporter HTTP scrape": lambda: http_scrape(ne_port),
        }
        names = list(measures)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for i in range(warmup + rounds):
            flip(i)
            order = names[i % 3:] + names[: i % 3]
            for n in order:
                t = timed(measures[n])
                if i >= warmup:
                    samples[n].append(t)
        out = {
            "fixture": {"gpus": 8, "rdma_ports": 8, "irq_lines": irq_lines, "cpus": cpus,
                        "counters_change_every_round": not static},
            "rounds": rounds,
            "gzip_body_bytes": sizes,
            "results_ms": {
                n: {"median": statistics.median(v) * 1e3,
                    "p90": sorted(v)[int(0.9 * (len(v) - 1))] * 1e3,
                    "min": min(v) * 1e3}
                for n, v in samples.items()
            },
        }
        med = {n: r["median"] for n, r in out["results_ms"].items()}
        ne = med["node_exporter HTTP scrape"]
        out["ratio_node_exporter_over_pcietax"] = {
            "HTTP scrape": ne / med["pcietax HTTP scrape"],
            "full cycle": ne / med["pcietax cycle (collect + render)"],
        }
        return out
    finally:
        for p in procs:
            stop(p)
        if engine is not None:
            engine.close()
        shutil.rmtree(tmp, ignore_errors=True)


def table(r: dict) -> str:
    f = r["fixture"]
    rows = [
        f"fixture: {f['gpus']} GPUs, {f['rdma_ports']} RDMA ports, {f['irq_lines']} IRQ lines, "
        f"{f['cpus']} CPUs; counters change every round: {f['counters_change_every_round']}; "
        f"{r['rounds']} rounds",
        "",
        f"{'measurement':<36}{'median ms':>11}{'p90 ms':>10}{'min ms':>10}",
    ]
    for n, v in r["results_ms"].items():
        rows.append(f"{n:<36}{v['median']:>11.2f}{v['p90']:>10.2f}{v['min']:>10.2f}")
    ratio = r["ratio_node_exporter_over_pcietax"]
    rows += ["",
             f"node_exporter median / pcietax median: {ratio['HTTP scrape']:.1f}x (HTTP scrape), "
             f"{ratio['full cycle']:.1f}x (pcietax full cycle)",
             f"gzipped body: pcietax {r['gzip_body_bytes']['pcietax']} B, "
             f"node_exporter {r['gzip_body_bytes']['node_exporter']} B"]
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", type=int, default=64)
    p.add_argument("--irq-lines", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--static", action="store_true", help="counters do not change between rounds")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    r = run(a.cpus, a.irq_lines, a.rounds, a.warmup, a.static)
    sys.stdout.write(json.dumps(r, indent=2) + "\n" if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
