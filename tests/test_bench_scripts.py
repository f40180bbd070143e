"""Every benchmark script still starts: its imports resolve against this tree and its argument
parser builds (the benchmarks themselves are run by hand, not in the suite)."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, needs_root, pcietax_env

SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))


def test_there_are_benchmarks():
    assert {"scrape_bench.py", "ebpf_overhead.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_help(script):
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], capture_output=True,
                       text=True, env=pcietax_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


def _ebpf_overhead():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import ebpf_overhead
    finally:
        sys.path.pop(0)
    return ebpf_overhead


def test_ebpf_overhead_size_parsing():
    """The one helper the overhead benchmark takes from the package (it once pointed at a private name)."""
    assert _ebpf_overhead()._bytes("64MiB") == 64 << 20


@needs_root
def test_ebpf_overhead_reads_run_time_from_the_program_not_its_link():
    """The accounting reads each program's bpf_stats from the process's fdinfo. A raw tracepoint's
    link fd names the same prog_id with no statistics; with the link on the lower fd number (as
    fd reuse leaves it in the exporter) the program once read as never run."""
    bcc = pytest.importorskip("bcc")
    eo = _ebpf_overhead()
    stats = eo.enable_stats()
    placeholder = os.open("/dev/null", os.O_RDONLY)  # a low fd number for the link to take
    b = bcc.BPF(text=b"RAW_TRACEPOINT_PROBE(sock_send_length) { return 0; }")
    try:
        fn = b.load_func(b"raw_tracepoint__sock_send_length", bcc.BPF.RAW_TRACEPOINT)
        os.close(placeholder)
        link = bcc.libbcc.lib.bpf_attach_raw_tracepoint(fn.fd, b"sock_send_length")
        assert 0 <= link < fn.fd
        x, y = socket.socketpair()
        for _ in range(200):
            x.send(b"x")
            y.recv(1)
        x.close()
        y.close()
        progs = eo.prog_stats(os.getpid())
        ours = [v for v in progs.values() if v[0] == "sock_send_lengt"]
        assert len(ours) == 1
        _name, _type, run_ns, runs = ours[0]
        assert runs >= 200 and run_ns > 0
        os.close(link)
    finally:
        b.cleanup()
        os.close(stats)


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


def test_scaling_bench_runs_on_a_tiny_node(tmp_path):
    """A smoke run of the scaling table on a tiny node: every column is there and the C floor
    made the same calls the cycle made (the real run is by hand; see docs/testing-and-benchmark.md)."""
    import json
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler for bench/readfiles.c")

    out = tmp_path / "scaling.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "scaling_bench.py"), "--sizes", "2x40",
                        "--rounds", "4", "--no-node-exporter", "--out", str(out)],
                       capture_output=True, text=True, env=pcietax_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| 2 × 40 |" in r.stdout and "C floor ms" in r.stdout
    (size,) = json.loads(out.read_text())["sizes"]
    assert size["up"] == ["netdev", "pcie", "procfs", "rdma", "topology"]
    assert size["calls_per_cycle"]["f"] > 50  # every sysfs/procfs file the sources read, recorded
    assert 0.05 < size["changing_share_of_lines"] < 0.2
    for v in ("static", "changing"):
        assert size[v]["cpu_ms_p50"] > 0 and size[v]["ratio_cpu_to_c_floor"] > 0
    assert size["c_floor"]["cpu_ms_p50"] > 0
