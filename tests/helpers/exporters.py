"""Run exporters as real processes on loopback for end-to-end tests and the benchmark: this tree's
``pcietax serve`` and Debian's ``prometheus-node-exporter``, both on the same fixture roots."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pcietax_cmd() -> list[str]:
    """The CLI of *this* tree (not whatever pcietax is installed), for subprocess tests."""
    return [sys.executable, "-m", "pcietax"]


def pcietax_env(**extra: str) -> dict[str, str]:
    """Environment that runs *this* tree's package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "exporter"), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def serve_args(sysfs: Path, procfs: Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    """Arguments after ``python -m pcietax`` (tests prepend conftest.pcietax_cmd())."""
    # NVML and eBPF read the machine's real driver and kernel, not the fixture roots: off, so a
    # fixture run gives the same output on a GPU host, or as root, as here.
    return ["serve", f"--web.listen-address=127.0.0.1:{port}", f"--path.sysfs={sysfs}",
            f"--path.procfs={procfs}", "--no-source.nvml", "--no-source.ebpf", *extra]


def pcietax_argv(sysfs: Path, procfs: Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    return [*pcietax_cmd(), *serve_args(sysfs, procfs, port, extra)]


def node_exporter_argv(sysfs: Path, procfs: Path, port: int, collectors: Sequence[str]) -> list[str]:
    if NODE_EXPORTER is None:
        raise RuntimeError("prometheus-node-exporter is not installed (scripts/setup.sh --test installs it)")
    # --no-collector.netdev.netlink: node_exporter 1.5 reads rtnetlink by default, which ignores
    # --path.procfs; with it off, netdev reads <procfs>/net/dev like pcietax.
    return [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", f"--path.sysfs={sysfs}",
            f"--path.procfs={procfs}", "--collector.disable-defaults", "--no-collector.netdev.netlink",
            *(f"--collector.{c}" for c in collectors)]


def scrape(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """Poll until the endpoint answers; fail early (with its stderr) if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {err}")
        try:
            return scrape(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def running(argv: list[str], env: dict[str, str] | None = None, port: int | None = None):
    """Start a process, wait until its /metrics answers, yield its URL, stop it."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def parse(text: str) -> Series:
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def select(series: Series, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in series.items() if n == name}


def serve_until(log: Path, *extra: str, until: str, timeout: float = 60.0) -> tuple[str, int]:
    """Run this tree's ``pcietax serve`` on a free loopback port with ``extra`` flags, scrape until
    ``until`` appears in /metrics (or the process exits, or ``timeout``), then stop it with SIGTERM.
    Its output goes to ``log``. Returns the last body scraped and the exit code."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with open(log, "w") as logf:
        proc = subprocess.Popen([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}", *extra],
                                env=pcietax_env(), stdout=logf, stderr=subprocess.STDOUT)
        body = ""
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    body = scrape(url, timeout=5)
                    if until in body:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return body, proc.returncode
