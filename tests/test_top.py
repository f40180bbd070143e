"""`pcietax top`: rates and layout from two scrapes (pure), its bad-input paths, and the real thing
in a real terminal (tmux) against a real `pcietax serve` on a fixture tree whose counters move."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import pcietax_cmd, pcietax_env
from helpers.traffic import Traffic, roce_node, serve, wait_until
from pcietax.top import ScrapeError, compute, parse, render

PREV = """\
# TYPE pcietax_useful_bytes_total counter
pcietax_useful_bytes_total{direction="ingress"} 1000
# TYPE pcietax_moved_bytes_total counter
pcietax_moved_bytes_total{hop="nic_dma",direction="ingress"} 1000
pcietax_moved_bytes_total{hop="kernel_copy",direction="ingress"} 1000
# TYPE pcietax_hop_measured gauge
pcietax_hop_measured{hop="nic_dma"} 1
pcietax_hop_measured{hop="kernel_copy"} 1
pcietax_hop_measured{hop="upi"} 0
# TYPE pcietax_nic_receive_bytes_total counter
pcietax_nic_receive_bytes_total{nic="eth0",pci_bus_id="0000:3b:00.0"} 0
pcietax_nic_receive_bytes_total{nic="eth1",pci_bus_id="0000:5e:00.0"} 0
# TYPE pcietax_socket_copy_bytes_total counter
pcietax_socket_copy_bytes_total{direction="ingress",process="vllm"} 0
pcietax_socket_copy_bytes_total{direction="ingress",process="other"} 0
# TYPE pcietax_staging_cpu_seconds_total counter
pcietax_staging_cpu_seconds_total{kind="softirq_net_rx"} 10
# TYPE pcietax_source_up gauge
pcietax_source_up{source="ebpf"} 1
pcietax_source_up{source="nvml"} 0
"""


def _cur(scale: int) -> str:
    # two seconds later: useful +2e6, each hop +2e6 -> 1 MB/s each; eth0 +4e6 (2 MB/s), eth1 +2e3
    return (PREV
            .replace('{direction="ingress"} 1000', f'{{direction="ingress"}} {1000 + 2 * scale}')
            .replace('"ingress"} 1000', f'"ingress"}} {1000 + 2 * scale}')
            .replace('pci_bus_id="0000:3b:00.0"} 0', f'pci_bus_id="0000:3b:00.0"}} {4 * scale}')
            .replace('pci_bus_id="0000:5e:00.0"} 0', 'pci_bus_id="0000:5e:00.0"} 2000')
            .replace('process="vllm"} 0', f'process="vllm"}} {6 * scale}')
            .replace('process="other"} 0', 'process="other"} 10')
            .replace('{kind="softirq_net_rx"} 10', '{kind="softirq_net_rx"} 11')
            + '# TYPE pcietax_tax_ratio gauge\npcietax_tax_ratio{direction="ingress"} 2.0\n')


def test_rates_between_two_scrapes():
    v = compute(parse(PREV, 100.0), parse(_cur(10**6), 102.0))
    assert v.useful == {"ingress": 1e6}
    assert v.hops == {("nic_dma", "ingress"): 1e6, ("kernel_copy", "ingress"): 1e6}
    assert v.ratio == {"ingress": 2.0}
    assert v.measured == {"nic_dma": True, "kernel_copy": True, "upi": False}
    assert v.staging == {"softirq_net_rx": 0.5}
    assert v.nics == [("eth0 0000:3b:00.0", 2e6, 0.0), ("eth1 0000:5e:00.0", 1000.0, 0.0)]  # busiest first
    assert v.processes == [("vllm", 3e6), ("other", 5.0)]
    assert v.sources == {"ebpf": True, "nvml": False}


def test_rates_are_between_two_collections_not_two_scrapes():
    """At rest the exporter collects every 15 s and each scrape in between renders the same
    collection: a repeat is not a new frame, and the rate is over the time between collections
    (1 MB/s of useful bytes over 2 s, seen 1 s and 15 s after the first scrape)."""
    from pcietax.top import Frames

    f = Frames()
    assert not f.add(parse(PREV, 100.0))
    assert not f.add(parse(PREV, 101.0))  # the same collection again
    assert f.add(parse(_cur(10**6 * 15 // 2), 115.0))  # the next one, 15 s of bytes
    v = f.view()
    assert v.useful == {"ingress": 1e6}  # 15e6 over 15 s: not 15e6 over the 1 s since the last scrape
    assert not f.add(parse(_cur(10**6 * 15 // 2), 116.0))
    assert f.view().useful == {"ingress": 1e6}  # the view holds until the next collection


def _gpu_scrape(rx: int, tx: int) -> str:
    lab = '{gpu="0000:3b:00.0",pci_bus_id="0000:3b:00.0",uuid="GPU-1"}'
    return (f"# TYPE pcietax_gpu_pcie_receive_bytes_total counter\n"
            f"pcietax_gpu_pcie_receive_bytes_total{lab} {rx}\n"
            f"# TYPE pcietax_gpu_pcie_transmit_bytes_total counter\n"
            f"pcietax_gpu_pcie_transmit_bytes_total{lab} {tx}\n")


def test_gpus_are_named_by_their_pci_address_once():
    v = compute(parse(_gpu_scrape(0, 0), 10.0), parse(_gpu_scrape(4000, 1000), 12.0))
    assert v.gpus == [("0000:3b:00.0", 2000.0, 500.0)]


def test_a_counter_that_drops_is_skipped_not_negative():
    v = compute(parse(_cur(10**6), 100.0), parse(PREV, 101.0))  # exporter restarted in between
    assert v.useful == {} and v.hops == {}


def test_render_shows_ratio_bars_and_missing_hops():
    lines = render(compute(parse(PREV, 100.0), parse(_cur(10**6), 102.0)), "http://x/metrics", width=100)
    text = "\n".join(lines)
    assert "ingress 2.00x" in text and "egress -" in text
    assert "(partial: 2 of 6 hops measured)" in text
    assert "RDMA, NIC, GPU and UPI bytes are node-wide" in text  # the scope rule, beside the ratio
    nic_dma = next(ln for ln in lines if ln.startswith("  nic_dma"))
    assert "#" in nic_dma and nic_dma.endswith("1.00 MB/s")
    assert re.search(r"upi\s+not measured", text)
    assert "vllm" in text and "3.00 MB/s" in text
    assert "nvml DOWN" in text
    assert all(len(ln) <= 100 for ln in lines)


def test_garbage_is_a_clear_error():
    with pytest.raises(ScrapeError, match="not Prometheus text format"):
        parse("pcietax_useful_bytes_total{direction=ingress 12\n", 0.0)


def _top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*pcietax_cmd(), "top", *args], env=pcietax_env(), capture_output=True,
                          text=True, timeout=30)


def test_bad_flags_and_unreachable_exporter():
    r = _top("--url", "127.0.0.1:9817/metrics")
    assert r.returncode == 2 and "must start with http://" in r.stderr
    r = _top("--interval", "0")
    assert r.returncode == 2 and "--interval" in r.stderr
    r = _top("--once", "--url", "http://127.0.0.1:1/metrics")
    assert r.returncode == 1 and "cannot reach http://127.0.0.1:1/metrics" in r.stderr


def test_once_against_a_real_exporter(tmp_path):
    node = roce_node(tmp_path)
    traffic = Traffic(node, useful=1e6, extra=2e6)
    traffic.start()
    try:
        with serve(node) as url:
            r = _top("--once", "--url", url, "--interval", "2")
            assert r.returncode == 0, r.stderr
            assert re.search(r"eth0 0000:3b:00\.0\s+\d+\.\d+ MB/s", r.stdout), r.stdout
            assert re.search(r"SOURCES .*netdev up .*procfs up .*rdma up", r.stdout), r.stdout
            r404 = _top("--once", "--url", url.replace("/metrics", "/nothing"))
            assert r404.returncode == 1 and "HTTP 404" in r404.stderr
    finally:
        traffic.stop()


class Tmux:
    """A private tmux server (own socket), so the test never touches a user's sessions."""

    def __init__(self) -> None:
        self.sock = f"pcietax-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=10)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top").stdout

    def alive(self) -> bool:
        return self("has-session", "-t", "top").returncode == 0

    def kill(self) -> None:
        self("kill-server")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (scripts/setup.sh --test)")
def test_top_in_a_real_terminal(tmp_path):
    node = roce_node(tmp_path)
    traffic = Traffic(node, useful=1e6, extra=2e6)  # ratio (2e6 + 1e6) / 1e6 = 3
    traffic.start()
    tmux = Tmux()
    try:
        with serve(node) as url:
            env = " ".join(f"{k}={v}" for k, v in pcietax_env().items() if k in ("PYTHONPATH", "PATH"))
            cmd = f"env {env} {sys.executable} -m pcietax top --url {url}"
            r = tmux("new-session", "-d", "-s", "top", "-x", "110", "-y", "45", cmd)
            assert r.returncode == 0, r.stderr

            def ratio_on_screen() -> float | None:
                m = re.search(r"TAX RATIO\s+ingress (\d+\.\d+)x", tmux.screen())
                return float(m.group(1)) if m else None

            expected = [
                r"eth0 0000:3b:00\.0\s+\d+\.\d+ MB/s",
                r"nic_dma\s+#+\.*\s+\d+\.\d+ MB/s",
                r"useful\s+#+\.*\s+\d+\.\d+ [kM]B/s",
                r"kernel_copy  not measured",
                r"STAGING CPU \(cores\)  irq_coarse \d\.\d\d  softirq_coarse (0\.[1-9]|[1-9])",
                r"SOURCES .*netdev up .*procfs up .*rdma up",
            ]

            def full_frame() -> str | None:
                # curses redraws only what changed, so a capture can land mid-update: wait for a
                # capture in which the whole frame is consistent.
                s = tmux.screen()
                return s if all(re.search(x, s) for x in expected) else None

            # The exporter's ratio window (10s) fills first; then the screen settles near 3.
            wait_until(lambda: (r := ratio_on_screen()) is not None and 2.8 <= r <= 3.2, 40,
                       "top to show an ingress ratio near 3")
            screen = wait_until(full_frame, 20, f"a frame with all of {expected}")
            # It refreshes: the clock in the title line changes.
            first = screen.splitlines()[0]
            wait_until(lambda: tmux.screen().splitlines()[0] != first, 10, "the view to refresh")
        # Exporter gone: top stays up and says why.
        wait_until(lambda: "cannot reach" in tmux.screen(), 10, "top to report the exporter down")
        tmux("send-keys", "-t", "top", "q")
        wait_until(lambda: not tmux.alive(), 10, "q to quit top")
    finally:
        traffic.stop()
        tmux.kill()


def test_direct_reads_the_sources_without_an_exporter(tmp_path):
    node = roce_node(tmp_path)
    traffic = Traffic(node, useful=1e6, extra=2e6)  # ratio 3
    traffic.start()
    try:
        r = _top("--once", "--direct", "--path.sysfs", str(node.sys), "--path.procfs", str(node.proc),
                 "--interval", "3")
    finally:
        traffic.stop()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"pcietax top  sources under {node.sys}")
    assert re.search(r"eth0 0000:3b:00\.0\s+\d+\.\d+ MB/s", r.stdout), r.stdout
    m = re.search(r"TAX RATIO\s+ingress (\d+\.\d+)x", r.stdout)
    assert m and 2.7 <= float(m.group(1)) <= 3.3, r.stdout
    assert "ebpf" not in r.stdout.split("SOURCES", 1)[1]  # a viewer attaches no probes
