"""The committed dashboard JSON is what the generator writes, and every panel follows the rules of
the issue: a unit, the datasource variable, raw selectors scoped to $node, $__rate_interval in
rates, ratios as sum of rates over sum of rates, only metrics from the catalog and the rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from alerts.rules import RuleConfig, recording_rules

from pcietax.catalog import FAMILIES

pytest.importorskip("grafana_foundation_sdk",
                    reason="pip install '.[dashboards]' (grafana-foundation-sdk~=0.0.21)")

REPO = Path(__file__).resolve().parent.parent
DASH = REPO / "dashboards"
NAMES = ("pcietax-overview.json", "pcietax-staging.json", "pcietax-ttft.json", "pcietax-topology.json")


def load(name: str) -> dict:
    return json.loads((DASH / name).read_text())


def panels(d: dict) -> list[dict]:
    return [p for p in d["panels"] if p["type"] != "row"]


def test_committed_json_matches_the_generator():
    from dashboards.generate import render

    got = render()
    assert sorted(got) == sorted(NAMES)
    for name, text in got.items():
        assert (DASH / name).read_text() == text, f"{name} is stale: run python -m dashboards.generate"


def test_generate_check_detects_a_stale_file(tmp_path):
    from dashboards.generate import main

    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    f = tmp_path / "pcietax-ttft.json"
    f.write_text(f.read_text().replace("TTFT p50 / p99", "TTFT"))
    assert main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", NAMES)
def test_variables_units_and_datasource(name):
    d = load(name)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["type"] == "query" and "node" in variables["node"]["query"]
    for p in panels(d):
        assert p["fieldConfig"]["defaults"].get("unit"), f"{name}: panel {p['title']!r} has no unit"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], f"{name}: panel {p['title']!r} has no query"


def _exprs(d: dict) -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in panels(d) for t in p["targets"]]
    out += [(a["name"], a["expr"]) for a in d.get("annotations", {}).get("list", []) if a.get("expr")]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_queries_follow_the_conventions(name):
    recorded = {r["record"] for r in recording_rules(RuleConfig())}
    for title, expr in _exprs(load(name)):
        # every range in a rate is $__rate_interval; every selector is scoped to the node variable
        for m in re.finditer(r"\b(rate|increase)\([^\[]*\[([^\]]+)\]", expr):
            assert m.group(2) == "$__rate_interval", f"{title}: {m.group(0)}"
        pattern = r"(?<![:\w])(?:pcietax_\w+|node_cpu_seconds_total|ALERTS)\{[^}]*\}|:\w+\{[^}]*\}"
        for sel in re.findall(pattern, expr):
            assert 'node=~"$node"' in sel, f"{title}: selector {sel} is not scoped to $node"
        assert not re.search(r"(avg|sum|max|min)\w*\s*(by \([^)]*\) )?\(\s*pcietax_tax_ratio", expr), title
        raw = set(re.findall(r"(?<![:\w])pcietax_[a-z_]+\b(?!:)", expr))
        assert raw <= set(FAMILIES) | {"pcietax_"}, f"{title}: not in the catalog: {raw - set(FAMILIES)}"
        for rec in re.findall(r"\b\w+:pcietax_\w+:\w+", expr):
            assert rec in recorded, f"{title}: {rec} is not a recording rule in alerts/rules.py"


def test_tax_ratio_stat_has_the_issue_thresholds():
    d = load("pcietax-overview.json")
    p = next(p for p in panels(d) if p["title"] == "Tax ratio")
    steps = [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 1.5, 2.5]
    assert "sum by (node, direction) (rate(pcietax_moved_bytes_total" in p["targets"][0]["expr"]


def test_grafana_sidecar_configmaps_carry_the_committed_dashboards():
    """deploy/kubernetes/grafana-dashboards.yaml is what kube-prometheus-stack's Grafana sidecar
    loads: one ConfigMap per dashboard, labelled grafana_dashboard=1, holding the JSON byte for byte."""
    import json

    import yaml

    repo = Path(__file__).resolve().parent.parent
    docs = list(yaml.safe_load_all((repo / "deploy/kubernetes/grafana-dashboards.yaml").read_text()))
    committed = {p.name: p.read_text() for p in (repo / "dashboards").glob("*.json")}
    got = {}
    for cm in docs:
        assert cm["kind"] == "ConfigMap"
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        got.update(cm["data"])
    assert got == committed
    for text in got.values():
        json.loads(text)
    kust = yaml.safe_load((repo / "deploy/kubernetes/kustomization.yaml").read_text())
    assert "grafana-dashboards.yaml" in kust["resources"]
