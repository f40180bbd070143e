"""End-to-end golden test, node_exporter style: the whole exporter (``pcietax serve`` as a process)
runs on a deterministic fixture node (tests/helpers/gpunode.py: 8 GPUs, 8 RDMA NICs, a management
NIC, virtual devices, /proc/interrupts, softirqs, stat) and its full /metrics output is compared with
the committed tests/golden/gpu_node.prom. Any change in any metric is a visible diff in review.

Volatile parts are normalised before comparing: the ``python`` label of pcietax_build_info and the
values of pcietax_collect_duration_seconds (and its deprecated alias).

To regenerate the expected file after an intended change, run

    PCIETAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and review the diff of tests/golden/gpu_node.prom before committing it.
"""

from __future__ import annotations

import gzip
import os
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from conftest import pcietax_cmd, pcietax_env
from helpers.exporters import free_port, running, scrape, serve_args
from helpers.gpunode import gpu_node

GOLDEN = Path(__file__).parent / "golden" / "gpu_node.prom"
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _samples(families) -> dict:
    out = {}
    for fam in families:
        for smp in fam.samples:
            if smp.name in ("pcietax_collect_duration_seconds", "pcietax_scrape_duration_seconds"):
                continue
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def normalise(text: str) -> str:
    text = re.sub(r'(pcietax_build_info\{[^}]*python=")[^"]*"', r'\1<python>"', text)
    durations = r"^(pcietax_(?:collect|scrape)_duration_seconds\{[^}]*\}) \S+$"
    return re.sub(durations, r"\1 <duration>", text, flags=re.M)


@pytest.mark.e2e
def test_full_output_matches_golden(tmp_path):
    node = gpu_node(tmp_path / "node", ncpu=4, irq_lines=60)
    port = free_port()
    argv = pcietax_cmd() + serve_args(node.sys, node.proc, port, ["--collect.interval=100ms"])
    with running(argv, env=pcietax_env(), port=port) as url:
        raw = scrape(url)
        got = normalise(raw)
        # The same cycle as Prometheus asks for it: OpenMetrics, gzipped.
        req = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as r:
            ctype, om = r.headers["Content-Type"], gzip.decompress(r.read()).decode()
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert om.endswith("# EOF\n")
    assert _samples(text_string_to_metric_families(raw)) == _samples(openmetrics_families(om))
    if os.environ.get("PCIETAX_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(got)
        pytest.skip(f"wrote {GOLDEN}")
    assert GOLDEN.exists(), f"{GOLDEN} missing: run with PCIETAX_UPDATE_GOLDEN=1 and review it"
    assert got == GOLDEN.read_text()


def test_normalise_only_touches_volatile_values():
    text = ('pcietax_build_info{python="3.11.2",sources="netdev",version="0.1.0"} 1.0\n'
            'pcietax_scrape_duration_seconds{source="netdev"} 0.0012\n'
            'pcietax_source_up{source="netdev"} 1.0\n')
    assert normalise(text) == ('pcietax_build_info{python="<python>",sources="netdev",version="0.1.0"} 1.0\n'
                               'pcietax_scrape_duration_seconds{source="netdev"} <duration>\n'
                               'pcietax_source_up{source="netdev"} 1.0\n')
