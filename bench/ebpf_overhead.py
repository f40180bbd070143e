"""The observer's tax: what `pcietax serve` with the eBPF source costs the workload it watches
(issue 10), on the 64 KiB-chunk staged workload (TCP into a pageable buffer, one cudaMemcpyAsync
per chunk, with the stand-in whose copy functions open with `push %rbp` like libcudart's).

Modes, alternated round by round so drift on a shared machine hits each alike: no exporter,
the exporter at its defaults (node-wide, --cuda.probes sampled under --probe.budget), and
--cuda.probes always. Each workload run lasts --seconds (>= 30 s: many duty-cycle periods).

Two figures per mode:
- **accounting** (the one that decides): the exporter's programs' kernel run time (bpf_stats, read
  from the exporter's own program fds in /proc/PID/fdinfo while this benchmark holds statistics on)
  + each program's run count x a trap cost this benchmark calibrates itself (uprobes per site kind,
  push or single-stepped; tracepoint dispatch) + the exporter's own CPU time; over the workload's
  CPU with no exporter. Compared with the exporter's self-reported
  pcietax_probe_overhead_seconds_total over the same interval (agreement within 20%).
- **A/B**: workload CPU per GiB and throughput, with / without (noisy: +-15% on shared VMs).

Also: steady RSS of the exporter after the first run, and the estimated CUDA and socket byte
counters against the workload's ground truth.

    sudo .venv/bin/python bench/ebpf_overhead.py --rounds 2 --seconds 30
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
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
COMM = "ptx-bench"


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


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _prog_name(prog_id: int) -> str:
    """BPF_PROG_GET_FD_BY_ID + BPF_OBJ_GET_INFO_BY_FD: the program's (15-character) name."""
    attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)
    fd = _libc.syscall(321, 13, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return ""
    try:
        info = (ctypes.c_uint8 * 256)()
        a = (ctypes.c_uint64 * 2)()
        ctypes.memmove(a, (ctypes.c_uint32 * 2)(fd, 256), 8)
        a[1] = ctypes.addressof(info)
        if _libc.syscall(321, 15, ctypes.byref(a), 16) < 0:
            return ""
        return bytes(info[64:80]).split(b"\0", 1)[0].decode()
    finally:
        os.close(fd)


def prog_stats(pid: int) -> dict[int, tuple[str, int, int, int]]:
    """prog id -> (name, type, run_time_ns, run_cnt) of every program the process holds."""
    out: dict[int, tuple[str, int, int, int]] = {}
    for f in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = f.read_text()
        except OSError:
            continue
        m = re.search(r"^prog_id:\s*(\d+)", text, re.M)
        if not m or re.search(r"^link_type:", text, re.M):
            # A link fd (a raw tracepoint's attachment) names its program's id but carries no
            # statistics: read as the program, it made the socket programs' run time vanish.
            continue
        pid_ = int(m.group(1))
        g = {k: int(v) for k, v in re.findall(r"^(prog_type|run_time_ns|run_cnt):\s*(\d+)", text, re.M)}
        if pid_ not in out:
            out[pid_] = (_prog_name(pid_), g.get("prog_type", 0), g.get("run_time_ns", 0),
                         g.get("run_cnt", 0))
    return out


def _bytes(text: str) -> int:
    from pcietax.argtypes import size

    return size(text)


def calibrate_here() -> dict[str, float]:
    """This benchmark's own trap costs (a separate measurement from the exporter's)."""
    from bcc import BPF
    from bcc.libbcc import lib

    from pcietax.sources.ebpf import selfcost

    b = BPF(text=b"int u(struct pt_regs *c) { return 0; } int t(void *c) { return 0; }")
    ufd = b.load_func(b"u", BPF.KPROBE).fd
    tfd = b.load_func(b"t", BPF.RAW_TRACEPOINT).fd

    def up(path: str, off: int):
        pfd = lib.bpf_attach_uprobe(ufd, 0, b"ptx_bench_cal", path.encode(), off, os.getpid())
        return None if pfd < 0 else (lambda: lib.bpf_close_perf_event_fd(pfd))

    def tp():
        lfd = lib.bpf_attach_raw_tracepoint(tfd, b"sock_send_length")
        return None if lfd < 0 else (lambda: os.close(lfd))

    # Three calibrations, the median of each cost: the benchmark's trap costs are its measuring
    # instrument, and one calibration's tracepoint dispatch swung 0.05-0.18 us between runs.
    cals = [selfcost.calibrate(up, tp, n=8000).trap_s for _ in range(3)]
    b.cleanup()
    return {k: statistics.median(c[k] for c in cals) for k in cals[0]}


def enable_stats() -> int:
    attr = (ctypes.c_uint32 * 2)(0, 0)
    fd = _libc.syscall(321, 32, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        raise SystemExit(f"BPF_ENABLE_STATS failed: {os.strerror(ctypes.get_errno())}")
    return int(fd)


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(m: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in m.items()
               if n == name and all(dict(lab).get(k) == x for k, x in labels.items()))


class Exporter:
    def __init__(self, mode: str, stub: str) -> None:
        self.port = _free_port()
        args = ["serve", f"--web.listen-address=127.0.0.1:{self.port}", "--cuda.lib", stub, "--nic", "lo",
                "--no-source.rdma", "--no-source.pcie", "--no-source.nvml"]
        if mode == "always":
            args += ["--cuda.probes", "always"]
        self.proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"exporter exited with {self.proc.returncode}")
            try:
                if _sum(_metrics(self.port), "pcietax_source_up", source="ebpf") == 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("exporter never came up")
            time.sleep(0.2)

    def snapshot(self) -> dict:
        return {"cpu": _cpu_s(self.proc.pid), "progs": prog_stats(self.proc.pid), "m": _metrics(self.port)}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def run_workload(peer: str, peer_pid: int, seconds: float, chunk: str) -> dict:
    c0, p0 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_s(peer_pid)
    r = subprocess.run(_cmd("workload", "--scenario", "pageable", "--bytes", "256MiB", "--chunk", chunk,
                            "--duration", str(seconds), "--peer", peer, "--comm", COMM),
                       env=_env(), capture_output=True, text=True, check=True)
    c1, p1 = resource.getrusage(resource.RUSAGE_CHILDREN), _cpu_s(peer_pid)
    truth = json.loads(r.stdout)
    truth["cpu_s"] = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime) + (p1 - p0)
    truth["gib"] = sum(truth["payload_bytes"].values()) / 2**30
    return truth


OVERHEAD = "pcietax_probe_overhead_seconds_total"


# The accounting's three totals (trap_s: every trap term below, summed).
ACCOUNTED = ("bpf_run_time_s", "trap_s", "exporter_cpu_s")


def accounting(before: dict, after: dict, trap: dict[str, float]) -> dict[str, float]:
    """Probe cost from the kernel (run time, run counts) x this benchmark's trap costs: the totals
    (ACCOUNTED) and the traps split as the exporter's ``cost`` label splits them."""
    run_ns = 0
    parts = {"trap_push": 0.0, "trap_step": 0.0, "tracepoint_dispatch": 0.0}
    for pid_, (name, ptype, rt, cnt) in after["progs"].items():
        b = before["progs"].get(pid_, (name, ptype, 0, 0))
        d_rt, d_cnt = rt - b[2], cnt - b[3]
        run_ns += d_rt
        if ptype == 2:  # BPF_PROG_TYPE_KPROBE: uprobes
            site = "step" if name.endswith(("__st", "__s", "_st")) or "__st" in name else "push"
            parts[f"trap_{site}"] += d_cnt * trap[site]
        elif ptype in (5, 17):  # BPF_PROG_TYPE_TRACEPOINT, BPF_PROG_TYPE_RAW_TRACEPOINT
            parts["tracepoint_dispatch"] += d_cnt * trap["tracepoint"]
    return {"bpf_run_time_s": run_ns / 1e9, "trap_s": sum(parts.values()),
            "exporter_cpu_s": after["cpu"] - before["cpu"], **parts}


def per_program(before: dict, after: dict) -> dict[str, tuple[int, float]]:
    """Program name -> (runs, run time s) over the interval: where the probe cost goes."""
    out: dict[str, tuple[int, float]] = {}
    for pid_, (name, ptype, rt, cnt) in after["progs"].items():
        b = before["progs"].get(pid_, (name, ptype, 0, 0))
        n0, t0 = out.get(name, (0, 0.0))
        out[name] = (n0 + cnt - b[3], t0 + (rt - b[2]) / 1e9)
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1][0]) if v[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the three modes")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each workload run (>= 30)")
    ap.add_argument("--chunk", default="64KiB", help="bytes per request (one CUDA copy each)")
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--verbose", action="store_true", help="per-program runs and run time of each run")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/ebpf_overhead.py: needs root (it loads the real probes)", file=sys.stderr)
        return 2
    stats_fd = enable_stats()  # run time is counted while this fd is open (and the exporter's)
    trap = calibrate_here()
    stub = subprocess.run(_cmd("workload", "--build-stub"), env=_env(), capture_output=True, text=True,
                          check=True).stdout.strip()
    peer_proc = subprocess.Popen(_cmd("workload", "--serve-peer", "127.0.0.1:0"), env=_env(),
                                 stdout=subprocess.PIPE, text=True)
    assert peer_proc.stdout is not None
    peer = peer_proc.stdout.readline().split(" ", 1)[1].strip()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    rss: list[dict[str, int]] = []
    try:
        for rnd in range(a.rounds):
            order = MODES if rnd % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                exp = Exporter(mode, stub) if mode != "none" else None
                try:
                    s0 = exp.snapshot() if exp else None
                    truth = run_workload(peer, peer_proc.pid, a.seconds, a.chunk)
                    rec: dict = {"truth": truth}
                    if exp is not None:
                        time.sleep(2.5)  # the last duty-cycle window folds, one more collection
                        s1 = exp.snapshot()
                        parts = accounting(s0, s1, trap)
                        rec["acct"] = {k: parts[k] for k in ACCOUNTED}
                        rec["programs"] = per_program(s0, s1)
                        rec["self_reported_s"] = _sum(s1["m"], OVERHEAD) - _sum(s0["m"], OVERHEAD)
                        # Term by term: which part of the self-report disagrees, if one does.
                        rec["terms"] = {
                            c: {"self_reported_s": (_sum(s1["m"], OVERHEAD, cost=c)
                                                    - _sum(s0["m"], OVERHEAD, cost=c)),
                                "accounted_s": (parts["bpf_run_time_s"] if c == "bpf_run_time"
                                                else parts.get(c, 0.0))}
                            for c in ("bpf_run_time", "trap_push", "trap_step", "tracepoint_dispatch",
                                      "run_time_estimate")}
                        for fam, want in (("pcietax_cuda_copy_bytes_total", truth["cuda_copies"]["h2d"]
                                           ["pageable"]["bytes"]),
                                          ("pcietax_socket_copy_bytes_total", truth["socket_copy_bytes"]
                                           ["ingress"])):
                            labels = {"process": COMM}
                            if fam.startswith("pcietax_socket"):
                                labels["direction"] = "ingress"
                            got = _sum(s1["m"], fam, **labels) - _sum(s0["m"], fam, **labels)
                            rec.setdefault("estimate_over_truth", {})[fam] = got / want if want else None
                        if mode == "defaults":
                            rss.append({"rss_kib": _status_kib(exp.proc.pid, "VmRSS"),
                                        "anon_kib": _status_kib(exp.proc.pid, "RssAnon"),
                                        "file_kib": _status_kib(exp.proc.pid, "RssFile")})
                    runs[mode].append(rec)
                    print(f"round {rnd} {mode}: {truth['gib']:.2f} GiB, workload CPU {truth['cpu_s']:.2f} s"
                          + (f", accounted {sum(rec['acct'].values()):.3f} s, self-reported probes "
                             f"{rec['self_reported_s']:.3f} s" if exp else ""), flush=True)
                    if exp is not None and a.verbose:
                        for c, t in rec["terms"].items():
                            print(f"    {c:20} self-reported {t['self_reported_s'] * 1e3:9.1f} ms, "
                                  f"accounted {t['accounted_s'] * 1e3:9.1f} ms", flush=True)
                        for name, (n, t) in rec["programs"].items():
                            print(f"    {name:16} {n:10d} runs {t * 1e3:9.1f} ms", flush=True)
                finally:
                    if exp is not None:
                        exp.stop()
    finally:
        peer_proc.terminate()
        peer_proc.wait(timeout=10)
        os.close(stats_fd)
    base_cpu = statistics.median(r["truth"]["cpu_s"] / r["truth"]["gib"] for r in runs["none"])
    base_tput = statistics.median(r["truth"]["throughput_bytes_per_second"] for r in runs["none"])
    out: dict = {"workload": {"scenario": "pageable", "chunk": a.chunk, "seconds_per_run": a.seconds,
                              "rounds": a.rounds},
                 "calibrated_trap_s": trap, "none_cpu_s_per_gib": base_cpu, "modes": {}}
    for mode in MODES[1:]:
        rs = runs[mode]
        per_gib = [{k: v / r["truth"]["gib"] for k, v in r["acct"].items()} for r in rs]
        probes = [p["bpf_run_time_s"] + p["trap_s"] for p in per_gib]
        total = [p["bpf_run_time_s"] + p["trap_s"] + p["exporter_cpu_s"] for p in per_gib]
        self_rep = [r["self_reported_s"] / r["truth"]["gib"] for r in rs]
        out["modes"][mode] = {
            "tax_accounting_pct": 100 * statistics.median(total) / base_cpu,
            "tax_probes_only_pct": 100 * statistics.median(probes) / base_cpu,
            "exporter_cpu_pct": 100 * statistics.median(p["exporter_cpu_s"] for p in per_gib) / base_cpu,
            "self_reported_over_accounted_probes": statistics.median(s / p for s, p in zip(self_rep, probes,
                                                                                          strict=True) if p),
            "ab_cpu_ratio": statistics.median(r["truth"]["cpu_s"] / r["truth"]["gib"] for r in rs) / base_cpu,
            "ab_throughput_ratio": statistics.median(r["truth"]["throughput_bytes_per_second"]
                                                     for r in rs) / base_tput,
            "estimate_over_truth": {f: statistics.median(r["estimate_over_truth"][f] for r in rs)
                                    for f in rs[0]["estimate_over_truth"]},
            "terms_ms_per_gib": {c: {k: 1e3 * statistics.median(r["terms"][c][k] / r["truth"]["gib"]
                                                                for r in rs)
                                     for k in ("self_reported_s", "accounted_s")}
                                 for c in rs[0]["terms"]},
        }
    if rss:
        out["exporter_steady_rss_mib"] = statistics.median(r["rss_kib"] for r in rss) / 1024
        out["exporter_rss_anon_mib"] = statistics.median(r["anon_kib"] for r in rss) / 1024
        out["exporter_rss_file_mib"] = statistics.median(r["file_kib"] for r in rss) / 1024
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
