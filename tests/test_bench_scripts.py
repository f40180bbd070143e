"""Every benchmark script still starts: its imports resolve against this tree and its argument
parser builds (the benchmarks themselves are run by hand, not in the suite)."""

import subprocess
import sys

import pytest

from conftest import REPO, pcietax_env

SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))


def test_there_are_benchmarks():
    assert {"scrape_bench.py", "ebpf_overhead.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_help(script):
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], capture_output=True,
                       text=True, env=pcietax_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


def test_ebpf_overhead_size_parsing():
    """The one helper the overhead benchmark takes from the package (it once pointed at a private name)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ebpf_overhead
    finally:
        sys.path.pop(0)
    assert ebpf_overhead._bytes("64MiB") == 64 << 20


def test_series_per_node_in_docs_is_what_the_fixture_node_scrapes():
    """docs/deploy.md quotes the series count of the 8-GPU fixture node; it must be the count a
    scrape gives today (rerun `python bench/series_per_node.py` and update the docs when it moves)."""
    import re

    r = subprocess.run([sys.executable, str(REPO / "bench" / "series_per_node.py"), "--json"],
                       capture_output=True, text=True, env=pcietax_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout)
    assert got["gpus"] == 8
    doc = (REPO / "docs" / "deploy.md").read_text()
    quoted = re.search(r"series_per_node\.py\s+# ([\d,]+) series scraped", doc)
    assert quoted, "docs/deploy.md no longer quotes the scrape count"
    assert int(quoted.group(1).replace(",", "")) == got["scraped"], got["scraped"]
    assert f"**≤ {got['scraped'] + got['ebpf_ceiling']:,}**" in doc  # the per-node ceiling
