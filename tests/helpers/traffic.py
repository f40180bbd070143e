"""A RoCE node on a fixture tree whose counters move while a test runs, and a real ``pcietax
serve`` reading it. Useful bytes come from the RDMA port counters and moved bytes from the NIC
(netdev + RDMA port, the exporter's RoCE rule), so extra netdev bytes per RDMA byte set the ratio:
ratio = (netdev + rdma) / rdma. The files are rewritten the way the kernel's counters rise:
monotonic, in the exact layout FakeNode writes."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port, pcietax_cmd, pcietax_env
from helpers.fakenode import FakeNode


def wait_until(pred: Callable[[], object], timeout: float, what: str, every: float = 0.2) -> object:
    """Poll until pred() is truthy; fail with `what` after `timeout` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def roce_node(root: Path) -> FakeNode:
    n = FakeNode(root)
    rp = n.add_pci("0000:00:01.0", 0x060400)
    nic = n.add_pci("0000:3b:00.0", 0x020000, rp)
    n.add_netdev("eth0", nic, rx_bytes=0, tx_bytes=0)
    n.add_rdma("mlx5_0", nic, {1: ("Ethernet", 0, 0)})
    n.write_interrupts([("0", [100] * n.ncpu, "IR-IO-APIC 2-edge timer"),
                        ("45", [10] * n.ncpu, "IR-PCI-MSI 524288-edge mlx5_comp0@pci:0000:3b:00.0")])
    n.write_softirqs({"NET_RX": [5] * n.ncpu})
    n.write_stat([1] * n.ncpu, [2] * n.ncpu)
    return n


class Traffic(threading.Thread):
    """Raises the node's counters every `tick` seconds: `useful` RDMA bytes/s (ingress) and
    `extra` non-RDMA netdev bytes/s, plus IRQ and softirq time so staging CPU moves too."""

    def __init__(self, node: FakeNode, useful: float, extra: float, tick: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.node, self.useful, self.extra, self.tick = node, useful, extra, tick
        self._stop_ev = threading.Event()
        self.rdma_bytes = 0
        self.netdev_bytes = 0
        self.irq_ticks = 0

    def run(self) -> None:
        n = self.node
        counters = Path(os.path.realpath(n.sys / "class/infiniband/mlx5_0")) / "ports/1/counters"
        while not self._stop_ev.wait(self.tick):
            self.rdma_bytes += int(self.useful * self.tick) // 4 * 4
            self.netdev_bytes += int(self.extra * self.tick)
            self.irq_ticks += 5  # 5 USER_HZ ticks per tick per CPU: visible staging CPU
            # Each file is replaced whole, as the kernel's counters change atomically: a reader
            # that caught a half-written file would see a counter drop (a reset to the exporter).
            _atomic(counters / "port_rcv_data", f"{self.rdma_bytes // 4}\n")
            n._netdev["eth0"] = (self.netdev_bytes, 0)
            self._staged(lambda: n.write_net_dev(), "net/dev")
            self._staged(lambda: n.write_stat([1] * n.ncpu, [2 + self.irq_ticks] * n.ncpu), "stat")

    def _staged(self, write: Callable[[], None], name: str) -> None:
        """Let FakeNode write a procfs file into a staging root, then move it into place."""
        n, real = self.node, self.node.proc
        staging = n.root / ".staging-proc"
        (staging / "net").mkdir(parents=True, exist_ok=True)
        n.proc = staging
        try:
            write()
        finally:
            n.proc = real
        os.replace(staging / name, real / name)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(5)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.read().decode()


@contextmanager
def serve(node: FakeNode, *extra: str, log: Path | None = None) -> Iterator[str]:
    """`pcietax serve` on the fixture tree on a free loopback port; yields its /metrics URL. The
    eBPF source is off: it traces the real kernel, not the fixture node."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*pcietax_cmd(), "serve", "--web.listen-address", f"127.0.0.1:{port}",
         "--path.sysfs", str(node.sys), "--path.procfs", str(node.proc), "--no-source.ebpf", *extra],
        env=pcietax_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"pcietax serve exited with {proc.returncode}")
            try:
                return "pcietax_source_up" in metrics_text(url)
            except OSError:
                return False

        wait_until(up, 30, "pcietax serve to answer")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()
