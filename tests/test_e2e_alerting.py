"""End to end on real servers: `pcietax serve` -> the distribution's Prometheus (1 s scrapes, the
project's rules from the generator with short `for:`) -> prometheus-alertmanager -> a webhook
receiver run by this test. A host-staged burst must page PcieTaxRatioHigh with the node and the
ratio in the payload; the same staged path on an idle node must not.

The exporter reads a fixture tree whose RoCE NIC counters a thread raises (useful = RDMA port
bytes; moved = NIC bytes = RDMA + non-RDMA netdev bytes), so the ratio is set by the test and runs
anywhere without root. test_e2e_ebpf.py drives the same chain from the eBPF source and the
reference workload where the kernel allows it."""

from __future__ import annotations

import pytest
from alerts.rules import RuleConfig, render

from conftest import REPO
from helpers.promstack import (
    ALERTMANAGER,
    PROMETHEUS,
    Webhook,
    alertmanager,
    prometheus,
    scrape_job,
    shipped_relabeling,
)
from helpers.traffic import Traffic, roce_node, serve, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (PROMETHEUS and ALERTMANAGER),
                       reason="prometheus, prometheus-alertmanager missing (scripts/setup.sh --test)"),
]

# The real rules with only the waits shortened (the same generator writes alerts/pcietax.rules.yml).
SHORT = RuleConfig(for_ratio="5s", for_ttft="5s", for_link="5s", for_gpudirect="5s",
                   for_source_down="5s", ttft_baseline="2m")


def test_staged_burst_pages_ratio_high_through_alertmanager(tmp_path):
    node = roce_node(tmp_path / "node")
    # Idle but staged: 10 kB/s useful at ratio 3 -> no page (useful traffic is not significant).
    traffic = Traffic(node, useful=10e3, extra=20e3)
    traffic.start()
    hook = Webhook()
    try:
        with serve(node, log=tmp_path / "pcietax.log") as url, \
                alertmanager(tmp_path, hook.url) as am:
            target = url.removeprefix("http://").removesuffix("/metrics").replace("127.0.0.1", "localhost")
            jobs = [scrape_job("pcietax", [target], shipped_relabeling(REPO))]
            with prometheus(tmp_path, jobs, render(SHORT), am) as prom:
                # The shipped relabeling gives the exporter's series the node label.
                wait_until(lambda: prom.query('node_direction:pcietax_tax_ratio:rate1m{node="localhost"}'),
                           60, "the recorded ratio for node=localhost")
                # Let the ratio sit above 2.5 for longer than `for:` while the node is idle.
                wait_until(lambda: _ratio(prom) > 2.5, 30, "an idle ratio above 2.5")
                wait_until(lambda: _seconds_ratio_high(prom) >= 8, 30, "8 s of idle ratio above 2.5")
                assert prom.alerts("PcieTaxRatioHigh", "pending") == []
                assert prom.alerts("PcieTaxRatioHigh", "firing") == []

                # The burst: 4 MB/s of useful payload, each byte moved 3 times.
                traffic.useful, traffic.extra = 4e6, 8e6
                wait_until(lambda: prom.alerts("PcieTaxRatioHigh", "firing"), 90,
                           "Prometheus to fire PcieTaxRatioHigh")
                got = wait_until(lambda: hook.alerts("PcieTaxRatioHigh"), 60,
                                 "Alertmanager to deliver PcieTaxRatioHigh to the webhook")
    finally:
        traffic.stop()
        hook.close()
    alert = got[0]
    assert alert["status"] == "firing"
    assert alert["labels"]["node"] == "localhost"
    assert alert["labels"]["direction"] == "ingress"
    assert alert["labels"]["severity"] == "warning"
    ratio = float(alert["annotations"]["ratio"])
    print(f"webhook got PcieTaxRatioHigh node={alert['labels']['node']} ratio={ratio}")  # shown with -s
    assert 2.5 < ratio < 3.6, alert  # (2 + 1) / 1 plus the idle phase still in the 1m window
    assert f"{alert['annotations']['ratio']} bytes" in alert["annotations"]["description"]
    assert alert["annotations"]["runbook_url"].endswith("#pcietaxratiohigh")


def _ratio(prom) -> float:
    r = prom.query('node_direction:pcietax_tax_ratio:rate1m{node="localhost", direction="ingress"}')
    return float(r[0]["value"][1]) if r else 0.0


def _seconds_ratio_high(prom) -> float:
    """Seconds (of the last minute) the recorded idle ratio has been above 2.5."""
    ratio = 'node_direction:pcietax_tax_ratio:rate1m{node="localhost"}'
    r = prom.query(f"count_over_time(({ratio} > 2.5)[1m:1s])")
    return float(r[0]["value"][1]) if r else 0.0
