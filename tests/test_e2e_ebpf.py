"""The whole chain from the real data path: the reference workload (`pcietax workload`, TCP into a
pageable buffer then cudaMemcpyAsync through the CUDA runtime stand-in) moves a host-staged burst;
`pcietax serve` with the eBPF source measures it; the distribution's Prometheus (1 s scrapes, the
generated rules with short `for:`) scrapes the exporter and the workload's vLLM TTFT histogram with
the shipped node relabeling; prometheus-alertmanager delivers PcieTaxRatioHigh to a webhook run by
this test, with the node and the ratio in the payload; and the TTFT and the tax of that node
meet on one `node` label in the recording rules."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
from alerts.rules import RuleConfig, render

from conftest import REPO, free_port, needs_root, pcietax_cmd, pcietax_env
from helpers.promstack import (
    ALERTMANAGER,
    PROMETHEUS,
    Webhook,
    alertmanager,
    prometheus,
    scrape_job,
    shipped_relabeling,
)
from helpers.traffic import metrics_text, wait_until

HAVE_EBPF = bool(importlib.util.find_spec("pcietax.sources.ebpf")) and bool(
    importlib.util.find_spec("pcietax.workload"))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.root,
    needs_root,
    pytest.mark.skipif(not (PROMETHEUS and ALERTMANAGER),
                       reason="prometheus, prometheus-alertmanager missing (scripts/setup.sh --test)"),
    pytest.mark.skipif(not HAVE_EBPF,
                       reason="the eBPF source and `pcietax workload` (issue 3) are not in this tree"),
]

SHORT = RuleConfig(for_ratio="5s", for_ttft="5s", for_link="5s", for_gpudirect="5s",
                   for_source_down="5s", ttft_baseline="2m")
COMM = "ptx-e2e"


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_workload_burst_pages_ratio_high_with_its_ttft_on_the_same_node(tmp_path):
    pytest.importorskip("bcc", reason="BCC (python3-bpfcc) not installed")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    serve_log = open(tmp_path / "pcietax.log", "wb")  # noqa: SIM115 - closed below
    exporter = subprocess.Popen(
        # --nic lo: the workload's peer is on loopback, which is network payload only when lo is a
        # selected NIC (DESIGN.md section 1).
        [*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}", "--target.comm", f"^{COMM}$",
         "--cuda.probes", "always", "--nic", "lo", "--no-source.rdma", "--no-source.pcie"],
        env=pcietax_env(), stdout=serve_log, stderr=subprocess.STDOUT)
    workload = None
    workload_log = open(tmp_path / "workload.log", "wb")  # noqa: SIM115 - closed below
    hook = Webhook()
    try:
        def ebpf_up() -> bool:
            if exporter.poll() is not None:
                raise AssertionError((tmp_path / "pcietax.log").read_text())
            try:
                return 'pcietax_source_up{source="ebpf"} 1.0' in metrics_text(url)
            except OSError:
                return False

        wait_until(ebpf_up, 180, "the eBPF source to compile and attach")  # BCC compiles at start
        mport = free_port()
        relabel = shipped_relabeling(REPO)
        jobs = [scrape_job("pcietax", [f"localhost:{port}"], relabel),
                scrape_job("vllm", [f"localhost:{mport}"], relabel)]
        with alertmanager(tmp_path, hook.url) as am, prometheus(tmp_path, jobs, render(SHORT), am) as prom:
            wait_until(lambda: prom.query('up{job="pcietax"} == 1'), 60, "Prometheus to scrape pcietax")
            assert prom.alerts("PcieTaxRatioHigh", "firing") == []  # nothing moves yet: no page
            # The host-staged burst: TCP into a pageable buffer, then cudaMemcpyAsync (ratio ~4 with
            # lo as the NIC: lo's bytes + kernel copy + the driver's bounce copy + the DMA).
            workload = subprocess.Popen(
                [*pcietax_cmd(), "workload", "--scenario", "pageable", "--bytes", "16MiB", "--rate", "16MiB",
                 "--duration", "300", "--comm", COMM, "--metrics-address", f"127.0.0.1:{mport}"],
                env=pcietax_env(), stdout=subprocess.DEVNULL, stderr=workload_log)
            wait_until(lambda: prom.alerts("PcieTaxRatioHigh", "firing"), 120,
                       "Prometheus to fire PcieTaxRatioHigh")
            got = wait_until(lambda: [a for a in hook.alerts("PcieTaxRatioHigh")
                                      if a["labels"]["direction"] == "ingress"], 60,
                             "Alertmanager to deliver PcieTaxRatioHigh (ingress) to the webhook")
            # TTFT from the workload's histogram and the tax from pcietax meet on node="localhost".
            wait_until(lambda: prom.query('node:pcietax_ttft_seconds:p99_rate1m{node="localhost"}'), 60,
                       "the workload's p99 TTFT on node=localhost")
            assert prom.query('node:pcietax_staging_cpu_seconds:rate1m{node="localhost"}')
    finally:
        if workload is not None:
            _stop(workload)
        _stop(exporter)
        serve_log.close()
        workload_log.close()
        hook.close()
    alert = got[0]
    assert alert["status"] == "firing"
    assert alert["labels"]["node"] == "localhost"
    ratio = float(alert["annotations"]["ratio"])
    print(f"webhook got PcieTaxRatioHigh node={alert['labels']['node']} ratio={ratio}")  # shown with -s
    assert 2.5 < ratio < 5.0, alert
    assert f"moves {alert['annotations']['ratio']} bytes" in alert["annotations"]["description"]
