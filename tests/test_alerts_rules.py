"""The alert and recording rules: the committed YAML is what the generator writes, the real
promtool accepts it, its unit tests (fire and no-fire of every alert) pass, and the rules only use
metrics from the catalog."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from alerts.rules import RuleConfig, alert_rules, render

from pcietax.catalog import FAMILIES

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "pcietax.rules.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool not installed (scripts/setup.sh --test)")

ALERTS = {"PcieTaxRatioHigh", "PcieTaxTTFTStagingSpike", "PcieTaxTTFTSpikeNotStaging", "PcieLinkDegraded",
          "PcieReplayErrors", "GPUDirectBlocked", "PcieTaxSourceDown"}


def test_committed_rules_match_the_generator():
    assert RULES.read_text() == render(RuleConfig()), "stale: run python -m alerts.generate"


def test_committed_prometheusrule_carries_the_same_groups():
    doc = yaml.safe_load((REPO / "deploy/kubernetes/prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule" and doc["metadata"]["namespace"] == "monitoring"
    assert doc["spec"] == yaml.safe_load(RULES.read_text())


def test_generate_check_detects_a_stale_file(tmp_path):
    from alerts.generate import main

    out, k8s = tmp_path / "rules.yml", tmp_path / "prometheusrule.yaml"
    args = ["--out", str(out), "--k8s-out", str(k8s)]
    assert main(args) == 0
    assert main(["--check", *args]) == 0
    for f in (out, k8s):
        good = f.read_text()
        f.write_text(good.replace("> 2.5", "> 3"))
        assert main(["--check", *args]) == 1
        f.write_text(good)


@needs_promtool
def test_promtool_check_rules_passes():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 18 rules found" in r.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    r = subprocess.run([PROMTOOL, "test", "rules", str(REPO / "alerts/tests/pcietax_test.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_unit_tests_fail_on_a_broken_rule(tmp_path):
    """The unit tests can fail: against rules with the ratio threshold raised to 5, they must."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "pcietax.rules.yml").write_text(render(RuleConfig(ratio_high=5.0)))
    shutil.copy(REPO / "alerts/tests/pcietax_test.yml", tmp_path / "tests")
    r = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests/pcietax_test.yml")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "PcieTaxRatioHigh" in r.stdout + r.stderr


@needs_promtool
def test_short_for_and_custom_node_label_are_valid_rules(tmp_path):
    cfg = RuleConfig(node_label="kubernetes_node", for_ratio="5s", for_ttft="5s", ttft_baseline="2m")
    text = render(cfg)
    assert "by (kubernetes_node, direction)" in text and "by (node," not in text
    assert "for: 5s" in text
    f = tmp_path / "r.yml"
    f.write_text(text)
    r = subprocess.run([PROMTOOL, "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_complete_and_has_a_runbook_section():
    rules = alert_rules(RuleConfig())
    assert {r["alert"] for r in rules} == ALERTS
    runbook = (REPO / "docs/runbook.md").read_text()
    headings = {h.lower() for h in re.findall(r"^## (\S+)$", runbook, re.M)}
    for r in rules:
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        ann = r["annotations"]
        assert ann["summary"] and ann["description"]
        anchor = ann["runbook_url"].rsplit("#", 1)[1]
        assert anchor in headings, f"{r['alert']}: no section '## {r['alert']}' in docs/runbook.md"


def test_rules_use_only_catalog_metrics():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    exprs = " ".join(r["expr"] for g in groups for r in g["rules"])
    # Raw series only: recorded series (level:pcietax_...:ops) sit between colons.
    used = set(re.findall(r"(?<![:\w])pcietax_[a-z_]+\b(?!:)", exprs))
    assert used, "no pcietax metric found in the rules"
    assert used <= set(FAMILIES), f"not in the catalog: {sorted(used - set(FAMILIES))}"


def test_ratio_is_sum_of_rates_never_an_average_of_the_gauge():
    text = RULES.read_text()
    assert "pcietax_tax_ratio{" not in text and "avg(pcietax_tax_ratio" not in text
    assert "rate(pcietax_moved_bytes_total[1m])" in text and "rate(pcietax_useful_bytes_total[1m])" in text


@pytest.mark.parametrize("kw, msg", [
    ({"node_label": "node-name"}, "not a Prometheus label name"),
    ({"node_label": "__name__"}, "not a Prometheus label name"),
    ({"for_ratio": "10 minutes"}, "for_ratio '10 minutes' is not a Prometheus duration"),
    ({"ttft_baseline": ""}, "not a Prometheus duration"),
    ({"ratio_high": 0}, "ratio_high must be positive"),
])
def test_bad_config_is_a_clear_error(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        RuleConfig(**kw)


@needs_promtool
def test_example_scrape_config_is_valid(tmp_path):
    cfg = yaml.safe_load((REPO / "alerts/scrape/prometheus.yml").read_text())
    cfg["rule_files"] = [str(RULES)]
    f = tmp_path / "prometheus.yml"
    f.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([PROMTOOL, "check", "config", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_exporter_and_inference_servers_get_the_same_node_label():
    cfg = yaml.safe_load((REPO / "alerts/scrape/prometheus.yml").read_text())
    relabels = {j["job_name"]: j["relabel_configs"] for j in cfg["scrape_configs"]}
    assert relabels["pcietax"] == relabels["vllm"] == relabels["triton"]
    rc = relabels["pcietax"][0]
    # Prometheus anchors relabel regexes; Python's fullmatch does the same. Go's $1 is \1 here.
    rx = re.compile(rc["regex"])
    for addr, node in (("gpu-node-1:9817", "gpu-node-1"), ("gpu-node-1:8000", "gpu-node-1"),
                       ("10.0.0.7:8002", "10.0.0.7"), ("[fe80::1]:9817", "fe80::1")):
        m = rx.fullmatch(addr)
        assert m and m.expand(rc["replacement"].replace("$1", r"\1")) == node
    docs = list(yaml.safe_load_all((REPO / "alerts/scrape/servicemonitor.yaml").read_text()))
    rels = [ep["relabelings"] for d in docs for ep in d["spec"]["endpoints"]]
    assert len(rels) == 2 and rels[0] == rels[1]
    assert rels[0][0]["targetLabel"] == "node"
