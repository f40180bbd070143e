"""A replay of this machine's real exposition through the shipped rules (alerts/pcietax.rules.yml)
with promtool: `pcietax serve` runs here with its defaults (no GPU, no RDMA device, an AMD CPU
without Intel uncore PMUs: the sources of absent hardware are down by design), two scrapes give
every series its value and every counter its rate, and the series are replayed for 3 hours at a
1-minute scrape interval, the way Prometheus would have stored them. Nothing may fire. The same
replay with one source failing (up 0, absent 0) fires PcieTaxSourceDown for that source only."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, free_port, pcietax_cmd, pcietax_env

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/setup.sh --test)")
RULES = REPO / "alerts" / "pcietax.rules.yml"
STEPS = 180  # 3 h of 1-minute samples
NODE = {"node": "replay", "job": "pcietax", "instance": "replay:9817"}  # the ServiceMonitor's labels

Sample = tuple[str, tuple[tuple[str, str], ...]]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _parse(text: str) -> tuple[dict[Sample, float], set[str]]:
    """Samples, and the sample names that belong to counters (rate() is taken over them)."""
    values: dict[Sample, float] = {}
    counters: set[str] = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
            if fam.type == "counter" and s.name.endswith("_total"):
                counters.add(s.name)
    return values, counters


def _all_started(text: str, log: Path) -> bool:
    """Every source has finished starting (the log says `up` or `down` for each): a source still
    compiling (eBPF) reads as down without being absent, which is not what the node settles at."""
    values, _ = _parse(text)
    sources = {dict(labels)["source"] for (name, labels) in values if name == "pcietax_source_up"}
    said = log.read_text(errors="replace")
    return bool(sources) and all(f"source {s}: up" in said or f"source {s}: down" in said for s in sources)


@pytest.fixture(scope="module")
def exposition(tmp_path_factory) -> tuple[dict[Sample, float], dict[Sample, float], set[str], float]:
    """Two scrapes of the real `pcietax serve` of this machine, after its first complete collection."""
    port = free_port()
    log = tmp_path_factory.mktemp("replay") / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as logf:
        proc = subprocess.Popen([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}"],
                                env=pcietax_env(), stdout=logf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if _get(f"{base}/-/ready")[0] == 200 and _all_started(_get(f"{base}/metrics")[1], log):
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "never ready: " + log.read_text()
                time.sleep(0.2)
            t1 = time.monotonic()
            first, counters = _parse(_get(f"{base}/metrics")[1])
            time.sleep(3.0)
            dt = time.monotonic() - t1
            second, _ = _parse(_get(f"{base}/metrics")[1])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return first, second, counters, dt


def _selector(name: str, labels: dict[str, str]) -> str:
    # json.dumps escapes quotes, backslashes and control characters the way PromQL strings read them.
    return name + "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def input_series(first: dict[Sample, float], second: dict[Sample, float], counters: set[str], dt: float,
                 override: dict[Sample, float] | None = None) -> list[dict[str, str]]:
    """promtool input series: gauges hold their second-scrape value; counters start there and rise at
    the rate seen between the scrapes (never negative: a counter never goes back)."""
    out = [{"series": _selector("up", NODE), "values": f"1x{STEPS}"}]
    override = override or {}
    for key, v2 in second.items():
        name, labels = key
        sel = _selector(name, {**dict(labels), **NODE})
        if key in override:
            out.append({"series": sel, "values": f"{override[key]!r}x{STEPS}"})
        elif name in counters:
            per_min = max(0.0, v2 - first.get(key, v2)) / dt * 60
            out.append({"series": sel, "values": f"{v2!r}+{per_min!r}x{STEPS}"})
        else:
            out.append({"series": sel, "values": f"{v2!r}x{STEPS}"})
    return out


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def run_promtool(tmp_path: Path, series: list[dict[str, str]],
                 alerts: list[dict]) -> subprocess.CompletedProcess:
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "group_eval_order": ["pcietax.rules", "pcietax.alerts"],
        "tests": [{
            "name": "replay of this machine's exposition",
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": alerts,
            # ALERTS holds pending and firing alerts of every rule: none at any point of the 3 h.
            "promql_expr_test": [{"expr": "ALERTS", "eval_time": t, "exp_samples": []}
                                 for t in ("1m", "15m", "1h", "2h", "3h")] if not any(
                a["exp_alerts"] for a in alerts) else [],
        }],
    }
    path = tmp_path / "replay_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
    return subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=300)


def _status(second: dict[Sample, float], family: str) -> dict[str, float]:
    return {dict(labels)["source"]: v for (name, labels), v in second.items() if name == family}


def test_this_machine_replayed_for_three_hours_fires_nothing(exposition, tmp_path):
    first, second, counters, dt = exposition
    up, absent = _status(second, "pcietax_source_up"), _status(second, "pcietax_source_absent")
    # What this machine is: no NVIDIA library and no GPU, an AMD CPU. Those sources are down and
    # absent; any source that is down and not absent is a failure the rules must (and will) page on.
    assert (up["nvml"], absent["nvml"]) == (0, 1) and (up["upi"], absent["upi"]) == (0, 1)
    failing = sorted(s for s, v in up.items() if v == 0 and absent.get(s) != 1)
    assert not failing, f"sources down without being absent on this machine: {failing}"
    alerts = [{"alertname": a, "eval_time": t, "exp_alerts": []}
              for a in alert_names() for t in ("10m", "1h", "3h")]
    r = run_promtool(tmp_path, input_series(first, second, counters, dt), alerts)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "SUCCESS" in r.stdout


def test_a_failing_source_in_the_same_replay_fires(exposition, tmp_path):
    first, second, counters, dt = exposition
    up_keys = {dict(labels)["source"]: (name, labels) for (name, labels) in second
               if name == "pcietax_source_up"}
    absent_keys = {dict(labels)["source"]: (name, labels) for (name, labels) in second
                   if name == "pcietax_source_absent"}
    # procfs (up here) breaks: up 0; nvml on a node whose GPU is there but unreachable: absent 0.
    override = {up_keys["procfs"]: 0.0, absent_keys["nvml"]: 0.0}
    expected = [{
        "exp_labels": {**NODE, "severity": "warning", "source": s},
        "exp_annotations": {
            "summary": f"pcietax source {s} down on replay",
            "description": f"The {s} source of pcietax on replay has been down for 10m; the hops it "
                           "measures are missing from the tax ratio and the exporter logs the reason.",
            "runbook_url": "https://github.com/pcietax/pcietax/blob/main/docs/runbook.md#pcietaxsourcedown",
        },
    } for s in ("nvml", "procfs")]
    alerts = [{"alertname": "PcieTaxSourceDown", "eval_time": "9m", "exp_alerts": []}]
    for t in ("11m", "3h"):
        alerts.append({"alertname": "PcieTaxSourceDown", "eval_time": t, "exp_alerts": expected})
    r = run_promtool(tmp_path, input_series(first, second, counters, dt, override), alerts)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
