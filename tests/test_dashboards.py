"""The committed dashboard JSON is what the generator writes, and every panel follows the rules of
the issue: a unit, the datasource variable, every selector scoped to $cluster and $node,
$__rate_interval in rates, ratios as sum of rates over sum of rates, only metrics from the catalog
and the rules; the JSON is the classic schema Grafana 10.4 and 11 import, and every query parses in
the real promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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
    # cluster: for data sources that hold many clusters; ".*" also matches series with no cluster label
    cluster = variables["cluster"]
    assert cluster["type"] == "query" and cluster["query"] == "label_values(pcietax_build_info, cluster)"
    assert cluster["includeAll"] and cluster["multi"] and cluster["allValue"] == ".*"
    assert 'cluster=~"$cluster"' in variables["node"]["query"], "node values must follow the cluster"
    order = [v["name"] for v in d["templating"]["list"]]
    assert order.index("cluster") < order.index("node"), "Grafana resolves variables in list order"
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
        # every selector, raw or recorded, names a metric and is scoped to both variables
        for sel in re.findall(r"\{[^{}]*\}", expr.replace("{{", "").replace("}}", "")):
            assert 'node=~"$node"' in sel, f"{title}: selector {sel} is not scoped to $node"
            assert 'cluster=~"$cluster"' in sel, f"{title}: selector {sel} is not scoped to $cluster"
        metric = r"(?:\w+:)?pcietax_\w+(?::\w+)?|node_cpu_seconds_total|ALERTS"
        bare = re.findall(rf"(?<![\w:])({metric})(?![\w{{:])", expr)
        assert not bare, f"{title}: unscoped metric {bare}"
        # aggregations keep `cluster` wherever they keep `node`: same-named nodes of two clusters
        for by in re.findall(r"\bby \(([^)]*)\)", expr):
            labels = [x.strip() for x in by.split(",")]
            assert "node" not in labels or "cluster" in labels, f"{title}: by ({by}) drops cluster"
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
    assert "sum by (cluster, node, direction) (rate(pcietax_moved_bytes_total" in p["targets"][0]["expr"]


RATIO_PANELS = {("pcietax-overview.json", "Tax ratio"), ("pcietax-overview.json", "Nodes ranked by tax"),
                ("pcietax-ttft.json", "Tax ratio"), ("pcietax-ttft.json", "Correlation over the window")}
SCOPE_RULE = "RDMA (verbs) payload is counted node-wide; socket payload is scoped to the target processes"


@pytest.mark.parametrize("name, title", sorted(RATIO_PANELS))
def test_ratio_panels_say_when_the_ratio_is_partial_and_what_useful_bytes_cover(name, title):
    p = next(p for p in panels(load(name)) if p["title"] == title)
    assert "partial" in p["description"], f"{title}: does not say when the ratio is partial"
    assert SCOPE_RULE in p["description"], f"{title}: does not say how useful bytes are scoped"


def test_every_panel_that_shows_the_ratio_is_listed_above():
    for name in NAMES:
        for p in panels(load(name)):
            if any("pcietax_tax_ratio" in t["expr"] or ("pcietax_moved_bytes_total{" in t["expr"]
                   and "/" in t["expr"]) for t in p["targets"]):
                assert (name, p["title"]) in RATIO_PANELS, f"{name}: {p['title']} shows the ratio"


@pytest.mark.parametrize("name, title", [("pcietax-overview.json", "Tax ratio"),
                                         ("pcietax-ttft.json", "Tax ratio")])
def test_ratio_panels_show_the_count_of_missing_hops_beside_the_ratio(name, title):
    p = next(p for p in panels(load(name)) if p["title"] == title)
    b = next(t for t in p["targets"] if t["refId"] == "B")
    assert "pcietax_hop_measured" in b["expr"] and "== 0" in b["expr"]
    # zero, not nothing, where every hop is measured: the panel then says "0 hops missing"
    assert "or\n0 * count by (cluster, node)" in b["expr"]
    (ov,) = [o for o in p["fieldConfig"]["overrides"] if o["matcher"]["options"] == "B"]
    props = {x["id"]: x["value"] for x in ov["properties"]}
    assert props["unit"] == "none" and props["thresholds"]["steps"][1] == {"value": 1, "color": "red"}


def test_ttft_panels_show_every_engine_separately():
    d = load("pcietax-ttft.json")
    p = next(p for p in panels(d) if p["title"] == "TTFT p50 / p99")
    assert all("{{engine}}" in t["legendFormat"] for t in p["targets"])
    from alerts.engines import ENGINES

    for e in ENGINES:
        assert e.title in p["description"], e.name
    corr = next(p for p in panels(d) if p["title"] == "Correlation over the window")
    # TTFT has a series per engine, staging one per node: the join must be many-to-one
    assert all("on (cluster, node) group_left" in t["expr"] for t in corr["targets"])


# --- Grafana 10.4 LTS and 11 -------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_classic_schema_that_grafana_10_4_and_11_import(name):
    from dashboards.compat import NEWER_OPTIONS, NEWER_VARIABLE_KEYS, PANEL_TYPES

    d = load(name)
    assert d["schemaVersion"] == 39
    assert isinstance(d["refresh"], str)  # schema 40 would make it one
    assert "time_options" not in d.get("timepicker", {})  # schema 41 would drop it
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES
        for opt in NEWER_OPTIONS.get(p["type"], {}):
            assert opt not in p.get("options", {}), f"{p['title']}: {opt} is newer than Grafana 10.4"
        for ov in p.get("fieldConfig", {}).get("overrides", []):  # schema 42 rewrites hideFrom
            assert all(x["id"] != "custom.hideFrom" for x in ov["properties"])
    for v in d["templating"]["list"]:
        assert not set(v) & set(NEWER_VARIABLE_KEYS), v["name"]


def test_compat_refuses_a_panel_type_it_does_not_know_for_10_4():
    from dashboards.compat import for_grafana_10_4

    with pytest.raises(ValueError, match=r"type 'xychart' not known to load in Grafana 10\.4"):
        for_grafana_10_4({"panels": [{"type": "xychart", "title": "x"}]})
    with pytest.raises(ValueError, match="allowCustomValue=False cannot be kept"):
        for_grafana_10_4({"panels": [], "templating": {"list": [{"name": "v", "allowCustomValue": False}]}})


def _substituted(expr: str) -> str:
    values = {"cluster": ".*", "node": ".*", "__rate_interval": "1m", "__range": "1h", "nic_irq": ".*"}
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_query_parses_in_promtool(tmp_path):
    """Each panel and annotation query, with Grafana's variables substituted, as a recording rule:
    `promtool check rules` runs the real PromQL parser over every expression."""
    import yaml

    exprs = [(f"{n}: {t}", _substituted(e)) for n in NAMES for t, e in _exprs(load(n))]
    rules = [{"record": f"dashboard:query_{i}:check", "expr": e} for i, (_, e) in enumerate(exprs)]
    f = tmp_path / "queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout
    # and the check can fail: one broken query is reported
    rules[0]["expr"] = exprs[0][1] + ")"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True).returncode != 0


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


def test_compose_runs_a_grafana_these_dashboards_load_in():
    """The compose stack's Grafana is an 11.x release (the docs name 10.4 LTS and 11), pinned to an
    exact version, and docs/dashboards.md names the same image."""
    import yaml

    compose = yaml.safe_load((REPO / "deploy/compose/compose.yaml").read_text())
    image = compose["services"]["grafana"]["image"]
    m = re.fullmatch(r"grafana/grafana:(\d+)\.(\d+)\.(\d+)", image)
    assert m, f"{image}: not pinned to an exact grafana/grafana release"
    assert m.group(1) == "11", f"{image}: the dashboards target Grafana 10.4 LTS and 11"
    assert f"`{image}`" in (REPO / "docs/dashboards.md").read_text()
