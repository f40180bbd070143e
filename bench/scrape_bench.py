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

--footprint measures the exporter's own cost at rest instead (issue 13 item 15), side by side in
one run, each exporter a real process:
  scrape latency    p50/p99 of --scrapes sequential GET /metrics (Prometheus headers, gzip)
  CPU per scrape    process CPU (utime+stime) over those scrapes, minus its idle rate over the
                    same wall time, divided by the number of scrapes
  idle CPU          process CPU over --idle-seconds with one scrape every 15 s (Prometheus' common
                    interval), scaled to one hour
  RSS               VmRSS at the end and VmHWM (peak)
  start to ready    from exec to the first complete /metrics answer
pcietax (twice: as it ships, and with --collect.rest-interval 0, the 1 Hz cycle without the
at-rest cadence) and node_exporter run on the fixture roots; with --ebpf (root, BCC) pcietax also runs on
this machine's own /sys and /proc with and without the eBPF source, at the same time.

    sudo .venv/bin/python bench/scrape_bench.py --footprint [--idle-seconds 300] [--ebpf] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
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
    pcietax_cmd,
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


# --- --footprint: the exporter's own cost at rest (kept apart from the scrape comparison above) ---

SCRAPE_INTERVAL = 15.0
NO_REST = "pcietax, no rest"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def first_complete(argv: list[str], port: int, env: dict[str, str] | None = None,
                   timeout: float = 180) -> tuple[subprocess.Popen, float]:
    """Start the exporter; seconds from exec to the first 200 from /metrics (pcietax answers 503
    until its first complete collection cycle)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
        try:
            http_scrape(port)
            return proc, time.monotonic() - t0
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"{argv} never answered /metrics")


def sources_up(port: int) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sorted(m.group(1) for m in re.finditer(r'^pcietax_source_up\{source="([a-z]+)"\} 1(?:\.0)?$',
                                                  text, re.M))


def footprint(cpus: int, irq_lines: int, scrapes: int, idle_seconds: float, ebpf: bool) -> dict:
    if NODE_EXPORTER is None:
        raise SystemExit("prometheus-node-exporter is not installed (scripts/setup.sh --test)")
    tmp = Path(tempfile.mkdtemp(prefix="pcietax-footprint-"))
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    out: dict = {"fixture": {"gpus": 8, "rdma_ports": 8, "irq_lines": irq_lines, "cpus": cpus},
                 "scrapes": scrapes, "idle_seconds": idle_seconds, "scrape_interval_s": SCRAPE_INTERVAL,
                 "exporters": {}}
    try:
        node = gpu_node(tmp / "node", ncpu=cpus, irq_lines=irq_lines, scale=1)
        argvs: dict[str, tuple[list[str], dict[str, str] | None]] = {}
        ports = {}
        host = ("pcietax host, eBPF off", "pcietax host, eBPF on") if ebpf else ()
        for name in ("pcietax", NO_REST, "node_exporter", *host):
            ports[name] = free_port()
        argvs["pcietax"] = (pcietax_argv(node.sys, node.proc, ports["pcietax"]), pcietax_env())
        # The same without the at-rest cadence: what the rest mode saves, in the same run.
        argvs[NO_REST] = (pcietax_argv(node.sys, node.proc, ports[NO_REST], ["--collect.rest-interval", "0"]),
                          pcietax_env())
        argvs["node_exporter"] = (node_exporter_argv(node.sys, node.proc, ports["node_exporter"],
                                                     ["infiniband", "interrupts", "netdev"]), None)
        if ebpf:
            # This machine's own roots: NVML absent here (no GPU); only the eBPF source differs.
            base = [*pcietax_cmd(), "serve", "--path.sysfs=/sys", "--path.procfs=/proc"]
            for name, flag in (("pcietax host, eBPF off", "--no-source.ebpf"),
                               ("pcietax host, eBPF on", "--source.ebpf")):
                argvs[name] = ([*base, f"--web.listen-address=127.0.0.1:{ports[name]}", flag], pcietax_env())
        for name, (argv, env) in argvs.items():
            proc, ready = first_complete(argv, ports[name], env)
            procs[name] = (proc, ports[name])
            out["exporters"][name] = {"start_to_first_complete_scrape_s": ready}
        time.sleep(5)  # past start-up work (eBPF calibration, first topology walk)

        # Idle: all exporters side by side, one scrape each every 15 s.
        cpu0 = {n: cpu_seconds(p.pid) for n, (p, _) in procs.items()}
        t0 = time.monotonic()
        while True:
            for _, port in procs.values():
                http_scrape(port)
            left = t0 + idle_seconds - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(SCRAPE_INTERVAL, left))
        wall = time.monotonic() - t0
        for n, (p, _) in procs.items():
            used = cpu_seconds(p.pid) - cpu0[n]
            out["exporters"][n].update({
                "idle_cpu_s_per_hour": used / wall * 3600,
                "idle_cpu_percent_of_a_core": used / wall * 100,
            })

        # Scrape latency and CPU per scrape: each exporter alone in turn, sequential scrapes.
        for n, (p, port) in procs.items():
            lat = []
            c0, w0 = cpu_seconds(p.pid), time.monotonic()
            for _ in range(scrapes):
                lat.append(timed(lambda port=port: http_scrape(port)))
            used, w = cpu_seconds(p.pid) - c0, time.monotonic() - w0
            idle_rate = out["exporters"][n]["idle_cpu_s_per_hour"] / 3600
            lat.sort()
            out["exporters"][n].update({
                "scrape_p50_ms": statistics.median(lat) * 1e3,
                "scrape_p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
                "cpu_ms_per_scrape": max(0.0, used - idle_rate * w) / scrapes * 1e3,
                "gzip_body_bytes": http_scrape(port),
                **{k.lower() + "_mib": v / 1024 for k, v in rss_kib(p.pid).items()},
            })
            if n.startswith("pcietax"):
                out["exporters"][n]["sources_up"] = sources_up(port)
        pt, ne = out["exporters"]["pcietax"], out["exporters"]["node_exporter"]
        # What each costs per hour at rest when Prometheus scrapes every 15 s (idle already includes
        # the 240 scrapes an hour).
        out["ratio_pcietax_over_node_exporter_idle_cpu"] = (
            pt["idle_cpu_s_per_hour"] / ne["idle_cpu_s_per_hour"] if ne["idle_cpu_s_per_hour"] else None)
        return out
    finally:
        for p, _ in procs.values():
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


def footprint_table(r: dict) -> str:
    f = r["fixture"]
    cols = [("start_to_first_complete_scrape_s", "start→ready s", ".2f"), ("scrape_p50_ms", "p50 ms", ".1f"),
            ("scrape_p99_ms", "p99 ms", ".1f"), ("cpu_ms_per_scrape", "CPU ms/scrape", ".1f"),
            ("idle_cpu_s_per_hour", "idle CPU s/h", ".1f"), ("vmrss_mib", "RSS MiB", ".1f"),
            ("vmhwm_mib", "peak RSS MiB", ".1f")]
    rows = [f"fixture: {f['gpus']} GPUs, {f['rdma_ports']} RDMA ports, {f['irq_lines']} IRQ lines, "
            f"{f['cpus']} CPUs; {r['scrapes']} scrapes each; idle: {r['idle_seconds']:g} s with a "
            f"scrape every {r['scrape_interval_s']:g} s", "",
            f"{'exporter':<26}" + "".join(f"{h:>15}" for _, h, _ in cols)]
    for n, v in r["exporters"].items():
        rows.append(f"{n:<26}" + "".join(f"{v.get(k, float('nan')):>15{fmt}}" for k, _, fmt in cols))
    for n, v in r["exporters"].items():
        if "sources_up" in v:
            rows.append(f"{n}: sources up: {', '.join(v['sources_up'])}")
    ratio = r.get("ratio_pcietax_over_node_exporter_idle_cpu")
    if ratio is not None:
        rows += ["", f"idle CPU at a 15 s scrape interval, pcietax / node_exporter: {ratio:.2f}"]
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", type=int, default=64)
    p.add_argument("--irq-lines", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--static", action="store_true", help="counters do not change between rounds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--footprint", action="store_true",
                   help="measure the cost at rest instead: latency, CPU per scrape, idle CPU, RSS, start")
    p.add_argument("--scrapes", type=int, default=200, help="--footprint: sequential scrapes per exporter")
    p.add_argument("--idle-seconds", type=float, default=300.0, help="--footprint: idle window")
    p.add_argument("--ebpf", action="store_true",
                   help="--footprint: also pcietax on this host's roots with and without eBPF (root, BCC)")
    a = p.parse_args()
    if a.footprint:
        r = footprint(a.cpus, a.irq_lines, a.scrapes, a.idle_seconds, a.ebpf)
        sys.stdout.write(json.dumps(r, indent=2) + "\n" if a.json else footprint_table(r))
        return 0
    r = run(a.cpus, a.irq_lines, a.rounds, a.warmup, a.static)
    sys.stdout.write(json.dumps(r, indent=2) + "\n" if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
