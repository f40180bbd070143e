"""A dashboard whose queries return nothing is a bug: load every panel query of the committed JSON
into a real Prometheus that scraped `pcietax serve` on this machine's real /proc and /sys (and
node_exporter, which the per-CPU IRQ panel reads), and require data from each query, except those
listed in EXEMPT for hardware or sources this machine lacks. An exemption only applies while the
metrics it names are really absent: on a machine that has them, the query must return data.

Every query must also parse in that Prometheus, and the `cluster` variable must really filter: with
a cluster that does not exist, every query returns nothing. This Prometheus sees one cluster and no
`cluster` label, so All (".*") is what a single-cluster install gets."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess

import pytest
from alerts.engines import ENGINES
from alerts.rules import RuleConfig, render

from conftest import REPO, free_port, pcietax_cmd, pcietax_env
from helpers.promstack import (
    NODE_EXPORTER,
    PROMETHEUS,
    node_exporter,
    prometheus,
    scrape_job,
    shipped_relabeling,
)
from helpers.traffic import metrics_text, wait_until

HAVE_WORKLOAD = bool(importlib.util.find_spec("pcietax.sources.ebpf")) and bool(
    importlib.util.find_spec("pcietax.workload"))
COMM = "ptx-dash"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (PROMETHEUS and NODE_EXPORTER),
                       reason="prometheus, prometheus-node-exporter missing (scripts/setup.sh --test)"),
]

USEFUL = ("pcietax_useful_bytes_total",), "useful bytes need the eBPF source (socket payload) or an RDMA NIC"
TTFT = (tuple(f"{f}_bucket" for e in ENGINES for f in e.proxy or (e.family,)),
        "needs an inference server's (or the reference workload's) TTFT histogram")
LINK = "needs PCIe link attributes in sysfs (virtio devices of a VM have none)"
EBPF = "needs the eBPF source (root, BCC, kernel headers) and traffic of target processes"

# (dashboard uid, panel title, refId) -> (metrics whose absence justifies it, why this machine lacks them)
EXEMPT: dict[tuple[str, str, str], tuple[tuple[str, ...], str]] = {
    ("pcietax-overview", "Tax ratio", "A"): USEFUL,
    ("pcietax-overview", "Nodes ranked by tax", "A"): USEFUL,
    ("pcietax-overview", "Useful vs moved bytes per hop", "B"): USEFUL,
    ("pcietax-overview", "Ceiling vs achieved per link", "A"):
        (("pcietax_pcie_link_ceiling_bytes_per_second",), LINK),
    ("pcietax-staging", "Socket copies per process", "A"): (("pcietax_socket_copy_bytes_total",), EBPF),
    ("pcietax-staging", "CUDA copies per process (pinned vs pageable)", "A"):
        (("pcietax_cuda_copy_bytes_total",), EBPF + " using the CUDA runtime"),
    ("pcietax-staging", "UPI bytes per link", "A"):
        (("pcietax_upi_bytes_total",), "needs Intel uncore UPI PMUs (multi-socket hardware)"),
    ("pcietax-ttft", "TTFT p50 / p99", "A"): TTFT,
    ("pcietax-ttft", "TTFT p50 / p99", "B"): TTFT,
    ("pcietax-ttft", "Tax ratio", "A"): USEFUL,
    ("pcietax-ttft", "Correlation over the window", "A"): TTFT,
    ("pcietax-ttft", "Correlation over the window", "B"): (TTFT[0] + USEFUL[0], f"{TTFT[1]}; {USEFUL[1]}"),
    ("pcietax-topology", "GPU-NIC path matrix", "A"):
        (("pcietax_gpu_nic_path_info",), "needs a GPU and a NIC (topology source)"),
    ("pcietax-topology", "Link speed vs max", "A"): (("pcietax_pcie_link_speed_gts",), LINK),
    ("pcietax-topology", "Link width vs max", "A"): (("pcietax_pcie_link_width",), LINK),
    ("pcietax-topology", "Replay and correctable-error rate", "A"): (("pcietax_pcie_replay_total",), LINK),
    ("pcietax-topology", "Replay and correctable-error rate", "B"):
        (("pcietax_pcie_correctable_errors_total",), "needs AER counters in sysfs"),
    ("pcietax-topology", "Probe hits", "A"): (("pcietax_probe_hits_total",), EBPF),
    ("pcietax-topology", "Probe overhead", "A"): (("pcietax_probe_overhead_seconds_total",), EBPF),
}


def _values(d: dict, cluster: str) -> dict[str, str]:
    values = {"cluster": cluster, "node": "localhost", "__rate_interval": "10s", "__range": "1m"}
    for v in d["templating"]["list"]:
        if v["type"] == "textbox":
            values[v["name"]] = v["query"]
    return values


def _sub(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def _queries(cluster: str = ".*") -> list[tuple[str, str, str, str]]:
    """(uid, panel title, refId, expr with this test's variable values) for every panel query."""
    out = []
    for f in sorted((REPO / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        values = _values(d, cluster)
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((d["uid"], p["title"], t["refId"], _sub(t["expr"], values)))
    return out


def _other_queries(cluster: str = ".*") -> list[tuple[str, str, str]]:
    """(uid, what, expr) of the annotation queries and of the selectors inside the variables'
    label_values(): parsed and filtered like the panels, but with data only when alerts fire."""
    out = []
    for f in sorted((REPO / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        values = _values(d, cluster)
        for a in d.get("annotations", {}).get("list", []):
            if a.get("expr"):
                out.append((d["uid"], f"annotation {a['name']}", _sub(a["expr"], values)))
        for v in d["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]) if v["type"] == "query" else None
            if m:
                out.append((d["uid"], f"variable {v['name']}", _sub(m.group(1), values)))
    return out


def test_exemptions_name_real_panel_queries():
    keys = {(u, t, r) for u, t, r, _ in _queries()}
    assert set(EXEMPT) <= keys, f"stale exemptions: {set(EXEMPT) - keys}"


def test_every_panel_query_has_data_on_this_machine(tmp_path):
    port = free_port()
    log = open(tmp_path / "pcietax.log", "wb")  # noqa: SIM115 - closed below
    # As root with the eBPF source and the reference workload in the tree, the workload moves data
    # through every staged scenario and feeds its TTFT histogram, so those panels must show it too.
    workload = HAVE_WORKLOAD and os.geteuid() == 0 and importlib.util.find_spec("bcc") is not None
    # --nic lo: the workload's peer is on loopback, which is network payload only when lo is a
    # selected NIC (DESIGN.md section 1).
    extra = ["--target.comm", f"^{COMM}$", "--cuda.probes", "always", "--nic", "lo"] if workload else []
    exporter = subprocess.Popen(
        [*pcietax_cmd(), "serve", "--web.listen-address", f"127.0.0.1:{port}", *extra],
        env=pcietax_env(), stdout=log, stderr=subprocess.STDOUT)
    wl = None
    try:
        wait_until(lambda: _alive(exporter) and _answers(port, workload), 180,
                   "pcietax serve on the real /proc, /sys")
        relabel = shipped_relabeling(REPO)
        jobs = [scrape_job("pcietax", [f"localhost:{port}"], relabel)]
        if workload:
            mport = free_port()
            wl = subprocess.Popen(
                [*pcietax_cmd(), "workload", "--scenario", "all", "--bytes", "4MiB", "--rate", "8MiB",
                 "--duration", "600", "--comm", COMM, "--metrics-address", f"127.0.0.1:{mport}"],
                env=pcietax_env(), stdout=subprocess.DEVNULL, stderr=log)
            jobs.append(scrape_job("vllm", [f"localhost:{mport}"], relabel))
        with node_exporter(tmp_path) as ne:
            jobs.append(scrape_job("node", [ne], relabel))
            with prometheus(tmp_path, jobs, render(RuleConfig()), None) as prom:
                queries = _queries()
                for uid, title, ref, expr in queries:
                    err = prom.query_error(expr)
                    assert err is None, f"{uid} / {title} / {ref}: Prometheus rejects the query: {err}"
                for uid, what, expr in _other_queries():
                    err = prom.query_error(expr)
                    assert err is None, f"{uid} / {what}: Prometheus rejects the query: {err}"
                # What this machine exports is known once both targets have been scraped.
                wait_until(lambda: len(prom.query("up == 1")) == len(jobs)
                           and prom.query("pcietax_build_info"), 60, "Prometheus to scrape every target")
                if workload:  # what the workload feeds shows up once it has run for a moment
                    wait_until(lambda: prom.query("pcietax_useful_bytes_total")
                               and prom.query("vllm:time_to_first_token_seconds_bucket"), 60, "workload data")
                present = _names(prom)
                required = []
                for uid, title, ref, expr in queries:
                    ex = EXEMPT.get((uid, title, ref))
                    if ex and not present & set(ex[0]):
                        continue  # this machine lacks what the query shows (reason in EXEMPT)
                    required.append((uid, title, ref, expr))

                def missing() -> list[str]:
                    return [f"{u} / {t} / {r}: {e}" for u, t, r, e in required if not prom.query(e)]

                # Rates need two scrapes and recording rules one evaluation after that: poll.
                left = missing()
                if left:
                    try:
                        wait_until(lambda: not missing(), 45, "every required panel query to return data")
                    except AssertionError:
                        pytest.fail("queries without data:\n" + "\n".join(missing()))
                # The cluster variable filters every query: a cluster nobody has shows nothing.
                node_var = next(e for _, w, e in _other_queries() if w == "variable node")
                assert prom.query(node_var), f"the node variable finds no node: {node_var}"
                leaks = [f"{u} / {t} / {r}" for u, t, r, e in _queries("no-such-cluster") if prom.query(e)]
                leaks += [f"{u} / {w}" for u, w, e in _other_queries("no-such-cluster")
                          if w != "variable cluster" and prom.query(e)]  # it lists the clusters
                assert not leaks, "queries that ignore $cluster:\n" + "\n".join(leaks)
    finally:
        for p in (wl, exporter):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)
        log.close()


def _alive(p) -> bool:
    if p.poll() is not None:
        raise AssertionError(f"pcietax serve exited with {p.returncode}")
    return True


def _answers(port: int, ebpf: bool) -> bool:
    try:
        text = metrics_text(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return False
    return 'pcietax_source_up{source="ebpf"} 1.0' in text if ebpf else "pcietax_source_up" in text


def _names(prom) -> set[str]:
    return {r["metric"]["__name__"] for r in prom.query('count by (__name__) ({__name__=~".+"})')
            if "__name__" in r["metric"]}
