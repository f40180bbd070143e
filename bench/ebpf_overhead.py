"""The observer's tax: what running `pcietax serve` costs the workload it watches (issue 3).

Measured side by side in one run, alternating so that drift on a shared machine hits every mode
alike: the reference workload's throughput with no exporter, with the exporter at its defaults
(node-wide, --cuda.probes sampled), and with --cuda.probes always. Also: the exporter's RSS after
BPF compilation and its time from start to the first complete scrape (eBPF source up).

    sudo .venv/bin/python bench/ebpf_overhead.py --rounds 5

Prints a table and writes JSON (--json PATH). Needs root (it loads the real probes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "exporter"))
MODES = ("none", "defaults", "always")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "exporter"), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pcietax", *args]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Exporter:
    def __init__(self, mode: str, stub: str) -> None:
        self.port = _free_port()
        args = ["serve", f"--web.listen-address=127.0.0.1:{self.port}", "--cuda.lib", stub]
        if mode == "always":
            args += ["--cuda.probes", "always"]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{self.port}/metrics"
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"exporter exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if 'pcietax_source_up{source="ebpf"} 1.0' in r.read().decode():
                        break
            except OSError:
                pass
            time.sleep(0.05)
        self.first_scrape_s = time.monotonic() - t0
        self.rss_kib = _rss_kib(self.proc.pid)

    def overhead_s(self) -> float:
        """The exporter's own account of what its probes cost (pcietax_probe_overhead_seconds_total)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                       if line.startswith("pcietax_probe_overhead_seconds_total{"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def _bytes(text: str) -> int:
    from pcietax.argtypes import size

    return size(text)


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def run_workload(peer: str, peer_pid: int, nbytes: str, chunk: str) -> tuple[float, float]:
    """(throughput in bytes/s, CPU seconds per GiB of workload + peer: what the probes' traps and
    programs add shows here even when a busy machine blurs throughput)."""
    c0, p0 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_s(peer_pid)
    r = subprocess.run(_cmd("workload", "--scenario", "pageable", "--bytes", nbytes, "--chunk", chunk,
                            "--peer", peer), env=_env(), capture_output=True, text=True, check=True)
    c1, p1 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_s(peer_pid)
    truth = json.loads(r.stdout)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime) + (p1 - p0)
    gib = sum(truth["payload_bytes"].values()) / 2**30
    return float(truth["throughput_bytes_per_second"]), cpu / gib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the three modes")
    ap.add_argument("--runs", type=int, default=3, help="workload runs per mode per round")
    ap.add_argument("--bytes", default="256MiB", help="payload per workload run")
    ap.add_argument("--chunk", default="256KiB", help="bytes per request (one CUDA copy each)")
    ap.add_argument("--json", default=None, help="write the results here too")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/ebpf_overhead.py: needs root (it loads the real probes)", file=sys.stderr)
        return 2
    stub = subprocess.run(_cmd("workload", "--build-stub"), env=_env(), capture_output=True, text=True,
                          check=True).stdout.strip()
    peer_proc = subprocess.Popen(_cmd("workload", "--serve-peer", "127.0.0.1:0"), env=_env(),
                                 stdout=subprocess.PIPE, text=True)
    assert peer_proc.stdout is not None
    peer = peer_proc.stdout.readline().split(" ", 1)[1].strip()
    tput: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    own: dict[str, list[float]] = {m: [] for m in MODES if m != "none"}  # probe s per GiB
    rss: list[int] = []
    first: list[float] = []
    try:
        run_workload(peer, peer_proc.pid, a.bytes, a.chunk)  # warm caches (page cache, Python)
        for rnd in range(a.rounds):
            order = MODES if rnd % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                exp = Exporter(mode, stub) if mode != "none" else None
                if exp is not None and mode == "defaults":
                    rss.append(exp.rss_kib)
                    first.append(exp.first_scrape_s)
                try:
                    o0 = exp.overhead_s() if exp is not None else 0.0
                    for _ in range(a.runs):
                        t, c = run_workload(peer, peer_proc.pid, a.bytes, a.chunk)
                        tput[mode].append(t)
                        cpu[mode].append(c)
                    if exp is not None:
                        time.sleep(1.5)  # one collection cycle
                        own[mode].append((exp.overhead_s() - o0) / (a.runs * _bytes(a.bytes) / 2**30))
                finally:
                    if exp is not None:
                        exp.stop()
    finally:
        peer_proc.terminate()
        peer_proc.wait(timeout=10)
    base = statistics.median(tput["none"])
    out = {
        "workload": {"scenario": "pageable", "bytes": a.bytes, "chunk": a.chunk,
                     "rounds": a.rounds, "runs_per_round": a.runs},
        "throughput_median_bytes_per_second": {m: statistics.median(v) for m, v in tput.items()},
        "ratio_vs_no_exporter": {m: statistics.median(v) / base for m, v in tput.items() if m != "none"},
        "cpu_seconds_per_gib_median": {m: statistics.median(v) for m, v in cpu.items()},
        "cpu_ratio_vs_no_exporter": {m: statistics.median(cpu["none"]) / statistics.median(v)
                                     for m, v in cpu.items() if m != "none"},
        # What the exporter itself reports its probes cost per GiB moved, and the throughput ratio
        # that implies for a CPU-bound workload: none / (none + probes).
        "probe_seconds_per_gib_self_reported": {m: statistics.median(v) for m, v in own.items()},
        "ratio_implied_by_self_reported_cost": {
            m: statistics.median(cpu["none"]) / (statistics.median(cpu["none"]) + statistics.median(v))
            for m, v in own.items()},
        "exporter_rss_after_compile_mib": statistics.median(rss) / 1024,
        "start_to_first_complete_scrape_s": statistics.median(first),
    }
    print("mode      throughput (ratio)        CPU s/GiB (ratio: none / mode)")
    for m in MODES:
        med = out["throughput_median_bytes_per_second"][m] / 2**20
        c = out["cpu_seconds_per_gib_median"][m]
        r1 = "" if m == "none" else f"({out['ratio_vs_no_exporter'][m]:.3f})"
        r2 = "" if m == "none" else f"({out['cpu_ratio_vs_no_exporter'][m]:.3f})"
        print(f"{m:9s} {med:8.1f} MiB/s {r1:8s}    {c:6.3f} {r2}")
    for m, v in out["ratio_implied_by_self_reported_cost"].items():
        print(f"{m:9s} probes' self-reported cost {out['probe_seconds_per_gib_self_reported'][m]:.4f} s/GiB"
              f" -> implied ratio {v:.4f}")
    print(f"RSS after compile: {out['exporter_rss_after_compile_mib']:.1f} MiB; "
          f"start to first complete scrape: {out['start_to_first_complete_scrape_s']:.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
