"""End-to-end golden test, node_exporter style: the whole exporter (``pcietax serve`` as a process)
runs on a deterministic fixture node (tests/helpers/gpunode.py: 8 GPUs, 8 RDMA NICs, a management
NIC, virtual devices, /proc/interrupts, softirqs, stat, one GPUDirect-ready GPU-NIC pair), every
counter rises once, and the full /metrics output after the rise is compared with the committed
tests/golden/gpu_node.prom. Any change in any metric is a visible diff in review.

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
import time
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


def _value(text: str, name: str, **labels: str) -> float | None:
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                return smp.value
    return None


def expected_tax() -> dict[str, float]:
    """The model's values after the rise from scale 1 to scale 2, worked out from the fixture's
    own parameters (tests/helpers/gpunode.py), not from pcietax:

    per switch sw (0-7): RDMA port words (sw+1)*10**11 received, (sw+1)*10**11//3 sent, 4 B each;
    netdev bytes (sw+1)*123_456_789 / (sw+1)*98_765_432; sw 0-5 are InfiniBand (IPoIB netdevs),
    6-7 RoCE; eno1 5,000,000 / 7,000,000. Every counter doubles.
    useful  = port bytes - IPoIB bytes (no eBPF here, so no socket payload)
    nic_dma = IB NICs' port bytes + RoCE NICs' netdev + port bytes + eno1's netdev bytes
    ratio   = nic_dma / useful (the only measured hop: a partial ratio)."""
    def words(sw: int, scale: int, x: str) -> int:
        w = (sw + 1) * 10**11 * scale
        return w if x == "ingress" else w // 3

    def net(sw: int, x: str) -> int:  # the increase of a netdev counter from scale 1 to 2
        return (sw + 1) * (123_456_789 if x == "ingress" else 98_765_432)

    out = {}
    for x in ("ingress", "egress"):
        port = sum(4 * (words(sw, 2, x) - words(sw, 1, x)) for sw in range(8))
        ipoib = sum(net(sw, x) for sw in range(6))
        roce = sum(net(sw, x) for sw in (6, 7))
        eno1 = 5_000_000 if x == "ingress" else 7_000_000
        out[f"useful_{x}"] = port - ipoib
        out[f"nic_dma_{x}"] = port + roce + eno1
        out[f"ratio_{x}"] = out[f"nic_dma_{x}"] / out[f"useful_{x}"]
    return out


@pytest.mark.e2e
def test_full_output_matches_golden(tmp_path):
    """Two scrapes around a counter rise on a node with a GPUDirect-ready pair: the first pins the
    baseline (useful and moved bytes 0), the second, compared with the golden file, pins useful
    bytes, moved bytes per hop and the ratio, each also checked against expected_tax()."""
    # Served through a symlink, so the rise switches the whole tree at once.
    root = tmp_path / "node"
    (tmp_path / "a").mkdir()
    root.symlink_to("a")
    gpu_node(tmp_path / "a", ncpu=4, irq_lines=60)
    port = free_port()
    argv = pcietax_cmd() + serve_args(root / "sys", root / "proc", port,
                                      ["--collect.interval=100ms", "--ratio.window=1h"])
    with running(argv, env=pcietax_env(), port=port) as url:
        first = scrape(url)
        assert _value(first, "pcietax_useful_bytes_total", direction="ingress") == 0
        assert 'gpudirect="ready"' in first
        gpu_node(tmp_path / "b", ncpu=4, irq_lines=60, scale=2)
        (tmp_path / "next").symlink_to("b")
        (tmp_path / "next").rename(root)
        deadline = time.monotonic() + 30
        while not _value(raw := scrape(url), "pcietax_tax_ratio", direction="egress"):
            assert time.monotonic() < deadline, "the model never saw the rise"
            time.sleep(0.1)
        time.sleep(0.3)  # a few more cycles: nothing may change once the counters stand still
        raw = scrape(url)
        got = normalise(raw)
        # The same cycle as Prometheus asks for it: OpenMetrics, gzipped.
        req = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as r:
            ctype, om = r.headers["Content-Type"], gzip.decompress(r.read()).decode()
    want = expected_tax()
    for x in ("ingress", "egress"):
        assert _value(raw, "pcietax_useful_bytes_total", direction=x) == want[f"useful_{x}"]
        assert _value(raw, "pcietax_moved_bytes_total", hop="nic_dma", direction=x) == want[f"nic_dma_{x}"]
        assert _value(raw, "pcietax_tax_ratio", direction=x) == pytest.approx(want[f"ratio_{x}"], rel=1e-12)
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
