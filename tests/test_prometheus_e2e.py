"""The distribution's real Prometheus scrapes `pcietax serve` running on this machine's real /proc
and /sys: once over plain HTTP, once over TLS with a client certificate and basic auth configured
through Prometheus's own tls_config / basic_auth. `promtool check metrics` lints the exposition."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from conftest import free_port, pcietax_cmd, pcietax_env
from helpers.tlscerts import Pki, make_pki

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not shutil.which("prometheus") or not shutil.which("promtool"),
                       reason="needs Debian's prometheus package (scripts/setup.sh --test installs it)"),
]

PASSWORD = "scrape-me"


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.stderr.read() if proc.stderr else ""


def wait_until(what: str, check, procs: list[subprocess.Popen], timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited {p.returncode} while waiting for {what}"
        try:
            last = check()
            if last:
                return last
        except OSError as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def query(prom: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("prom-e2e")
    pki: Pki = make_pki(tmp / "pki")
    web = tmp / "web.yml"
    web.write_text(f"""tls_server_config:
  cert_file: {pki.server_cert}
  key_file: {pki.server_key}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki.ca}
basic_auth_users:
  prometheus: '{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()}'
""")
    (tmp / "password").write_text(PASSWORD)
    plain_port, tls_port, prom_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(args, env=pcietax_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
        procs.append(p)
        return p

    try:
        start([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{plain_port}",
               "--collect.interval=0.5s"])
        start([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{tls_port}",
               f"--web.config.file={web}"])
        cfg = tmp / "prometheus.yml"
        cfg.write_text(f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: pcietax
    static_configs: [{{targets: ['127.0.0.1:{plain_port}']}}]
  - job_name: pcietax-tls
    scheme: https
    tls_config:
      ca_file: {pki.ca}
      cert_file: {pki.client_cert}
      key_file: {pki.client_key}
    basic_auth:
      username: prometheus
      password_file: {tmp / "password"}
    static_configs: [{{targets: ['127.0.0.1:{tls_port}']}}]
""")
        subprocess.run(["promtool", "check", "config", str(cfg)], check=True, capture_output=True)
        start(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
               f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"])
        yield {"prom": prom_port, "plain": plain_port, "tls": tls_port, "pki": pki, "procs": procs}
    finally:
        logs = [stop(p) for p in reversed(procs)]
        for p in procs:
            assert p.returncode is not None
        # Both exporters shut down cleanly and never printed a traceback (rejected handshakes
        # included: Prometheus's client certificate and basic auth had to be right).
        for log in logs[1:]:
            assert "Traceback" not in log, log


def test_prometheus_scrapes_both_exporters(stack):
    prom, procs = stack["prom"], stack["procs"]

    def both_up():
        res = {r["metric"]["job"]: r["value"][1] for r in query(prom, "up")}
        return res if res == {"pcietax": "1", "pcietax-tls": "1"} else None

    wait_until("up == 1 for both jobs", both_up, procs)
    for job in ("pcietax", "pcietax-tls"):
        sel = f'{{job="{job}"}}'
        info = wait_until(f"pcietax_build_info in {job}",
                          lambda sel=sel: query(prom, f"pcietax_build_info{sel}"), procs)
        assert info[0]["value"][1] == "1"
        srcs = {r["metric"]["source"]: r["value"][1] for r in query(prom, f"pcietax_source_up{sel}")}
        # procfs is readable on every Linux machine, so it must be up on the real /proc.
        assert srcs.get("procfs") == "1", srcs
        hop = query(prom, f"pcietax_hop_measured{sel}")
        assert {r["metric"]["hop"] for r in hop} >= {"nic_dma", "kernel_copy", "host_to_gpu"}
        irqs = query(prom, f"count(pcietax_hardirq_total{sel})")
        assert irqs and float(irqs[0]["value"][1]) > 0
    # Prometheus saw no scrape errors on either target.
    with urllib.request.urlopen(f"http://127.0.0.1:{prom}/api/v1/targets", timeout=10) as r:
        targets = json.load(r)["data"]["activeTargets"]
    assert {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets} == {
        "pcietax": ("up", ""), "pcietax-tls": ("up", ""),
    }
    # A counter Prometheus can take a rate of: it rises over scrapes, never reset.
    wait_until("two samples of the irq counters", lambda: query(
        prom, 'count(rate(pcietax_hardirq_total{job="pcietax"}[10s]))'), procs)
    resets = query(prom, 'sum(resets(pcietax_hardirq_total{job="pcietax"}[1m]))')
    assert resets and float(resets[0]["value"][1]) == 0


def fetch(port: int, ctx: ssl.SSLContext | None = None, auth: str | None = None) -> bytes:
    scheme = "https" if ctx else "http"
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        return r.read()


def promtool_check(body: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=body.decode(), capture_output=True,
                          text=True, timeout=60)


def test_promtool_check_metrics_is_clean(stack):
    procs = stack["procs"]
    body = wait_until("a scrape", lambda: fetch(stack["plain"]), procs)
    assert b"pcietax_build_info" in body
    r = promtool_check(body)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    pki: Pki = stack["pki"]
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    r = promtool_check(fetch(stack["tls"], ctx, f"prometheus:{PASSWORD}"))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_promtool_would_catch_a_lint_problem():
    """The lint above can fail: promtool flags a counter without _total (what a CounterMetricFamily
    misuse in the sink would produce)."""
    r = promtool_check(b"# HELP pcietax_x_bytes bad\n# TYPE pcietax_x_bytes counter\npcietax_x_bytes 1\n")
    assert "counter metrics should have \"_total\" suffix" in r.stdout + r.stderr


def test_promtool_clean_when_every_source_is_down(tmp_path: Path):
    """promtool on the exporter run against an empty fixture root too (every source down): the
    exposition stays lint-clean when nothing works."""
    port = free_port()
    p = subprocess.Popen([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}",
                          f"--path.sysfs={tmp_path}", f"--path.procfs={tmp_path}"],
                         env=pcietax_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        body = wait_until("a scrape", lambda: fetch(port), [p])
        assert b'pcietax_source_up{source="procfs"} 0.0' in body
        r = promtool_check(body)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    finally:
        stop(p)
