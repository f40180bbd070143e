"""Real Prometheus, Alertmanager and node_exporter from the distribution, on free loopback ports,
plus a webhook receiver the test runs itself. Every process logs to a file under the test's tmp
dir (shown when a wait fails) and is stopped on exit."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from conftest import free_port
from helpers.traffic import wait_until

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _ok(url: str) -> bool:
    try:
        _get(url, 2)
        return True
    except OSError:
        return False


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.log = name, log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.p.poll() is not None:
            tail = self.log.read_text()[-3000:]
            raise AssertionError(f"{self.name} exited with {self.p.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._out.close()


class Prometheus:
    def __init__(self, url: str, proc: Proc) -> None:
        self.url, self.proc = url, proc

    def query(self, expr: str) -> list[dict[str, Any]]:
        self.proc.check()
        q = urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(_get(f"{self.url}/api/v1/query?{q}"))
        except urllib.error.HTTPError as e:
            raise AssertionError(f"query failed: {expr}: HTTP {e.code}: {e.read().decode()}") from e
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}: {body}")
        return body["data"]["result"]

    def query_error(self, expr: str) -> str | None:
        """None when Prometheus accepts the query, else its error message."""
        q = urllib.parse.urlencode({"query": expr})
        try:
            _get(f"{self.url}/api/v1/query?{q}")
            return None
        except urllib.error.HTTPError as e:
            return e.read().decode()

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        body = json.loads(_get(f"{self.url}/api/v1/alerts"))
        return [a for a in body["data"]["alerts"]
                if a["labels"].get("alertname") == name and a["state"] == state]


class Webhook:
    """An Alertmanager webhook receiver: keeps every notification body it gets."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for body in list(self.received) for a in body.get("alerts", [])
                if a["labels"].get("alertname") == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scrape_job(name: str, targets: list[str], relabel: list[dict[str, Any]]) -> dict[str, Any]:
    return {"job_name": name, "static_configs": [{"targets": targets}], "relabel_configs": relabel}


def shipped_relabeling(repo: Path) -> list[dict[str, Any]]:
    """The node relabeling of alerts/scrape/prometheus.yml, as shipped."""
    cfg = yaml.safe_load((repo / "alerts/scrape/prometheus.yml").read_text())
    return next(j for j in cfg["scrape_configs"] if j["job_name"] == "pcietax")["relabel_configs"]


@contextmanager
def node_exporter(tmp: Path) -> Iterator[str]:
    port = free_port()
    proc = Proc("node_exporter", [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}",
                                  "--collector.disable-defaults", "--collector.cpu"],
                tmp / "node_exporter.log")
    try:
        wait_until(lambda: proc.check() or _ok(f"http://127.0.0.1:{port}/metrics"), 30, "node_exporter")
        yield f"localhost:{port}"
    finally:
        proc.stop()


@contextmanager
def alertmanager(tmp: Path, webhook_url: str) -> Iterator[str]:
    port = free_port()
    cfg = {
        "route": {"receiver": "test", "group_by": ["alertname", "node"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "test", "webhook_configs": [{"url": webhook_url, "send_resolved": False}]}],
    }
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(cfg))
    (tmp / "am-data").mkdir()
    proc = Proc("alertmanager", [
        ALERTMANAGER, f"--config.file={tmp / 'alertmanager.yml'}", f"--storage.path={tmp / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
    ], tmp / "alertmanager.log")
    try:
        wait_until(lambda: proc.check() or _ok(f"http://127.0.0.1:{port}/-/ready"), 30, "alertmanager ready")
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


@contextmanager
def prometheus(tmp: Path, jobs: list[dict[str, Any]], rules: str, alertmanager_addr: str | None = None
               ) -> Iterator[Prometheus]:
    port = free_port()
    (tmp / "rules.yml").write_text(rules)
    cfg: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": jobs,
    }
    if alertmanager_addr:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_addr]}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    (tmp / "prom-data").mkdir()
    proc = Proc("prometheus", [
        PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ], tmp / "prometheus.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.check() or _ok(f"{url}/-/ready"), 60, "prometheus ready")
        yield Prometheus(url, proc)
    finally:
        proc.stop()
