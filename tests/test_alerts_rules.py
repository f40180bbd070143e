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
from alerts import rules as rules_mod
from alerts.engines import BY_NAME, ENGINES
from alerts.rules import RuleConfig, alert_rules, recording_rules, render

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
    assert "SUCCESS: 19 rules found" in r.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    r = subprocess.run([PROMTOOL, "test", "rules", str(REPO / "alerts/tests/pcietax_test.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
@pytest.mark.parametrize(("broken", "failing"), [
    (RuleConfig(ratio_high=5.0), "ratio high fires after 10m"),
    # grouped by node alone, a central ruler merges cluster a's n1 with cluster b's n1
    (RuleConfig(keep_labels=()), "two clusters with the same node name stay apart"),
])
def test_promtool_unit_tests_fail_on_a_broken_rule(broken, failing, tmp_path):
    """The unit tests can fail: against rules with the ratio threshold raised to 5, or without the
    cluster label in their groupings, the test that covers it must."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "pcietax.rules.yml").write_text(render(broken))
    shutil.copy(REPO / "alerts/tests/pcietax_test.yml", tmp_path / "tests")
    r = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests/pcietax_test.yml")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert failing in r.stdout + r.stderr and "PcieTaxRatioHigh" in r.stdout + r.stderr


@needs_promtool
def test_short_for_and_custom_node_label_are_valid_rules(tmp_path):
    cfg = RuleConfig(node_label="kubernetes_node", for_ratio="5s", for_ttft="5s", ttft_baseline="2m")
    text = render(cfg)
    assert "by (cluster, kubernetes_node, direction)" in text and "node," not in text.replace("_node,", "")
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
    ({"keep_labels": ("cluster", "cluster")}, "repeat a label or the node label"),
    ({"keep_labels": ("node",)}, "repeat a label or the node label"),
    ({"keep_labels": ("tenant-id",)}, "'tenant-id' is not a Prometheus label name"),
])
def test_bad_config_is_a_clear_error(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        RuleConfig(**kw)


@needs_promtool
@pytest.mark.parametrize("config", ["alerts/scrape/prometheus.yml", "deploy/engines/prometheus.yml"])
def test_shipped_scrape_configs_are_valid_with_the_rules(config, tmp_path):
    cfg = yaml.safe_load((REPO / config).read_text())
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


# --- TTFT on every engine ----------------------------------------------------------------------

ENGINE_TEST = REPO / "alerts/tests/ttft_engines_test.yml"
ENGINES_DIR = REPO / "deploy/engines"


def _promtool_test(rules_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "tests").mkdir()
    (tmp_path / "pcietax.rules.yml").write_text(rules_text)
    shutil.copy(ENGINE_TEST, tmp_path / "tests")
    return subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests" / ENGINE_TEST.name)],
                          capture_output=True, text=True)


@needs_promtool
def test_promtool_ttft_tests_of_every_engine_pass():
    r = subprocess.run([PROMTOOL, "test", "rules", str(ENGINE_TEST)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_ttft_tests_fail_when_tgi_decode_batches_leak_into_the_proxy(tmp_path, monkeypatch):
    """Without the method="prefill" selector, TGI's ~8 s decode batches enter the proxy: the
    engine tests must catch it (they can fail)."""
    monkeypatch.setattr(rules_mod, "TGI_PREFILL_SELECTOR", 'method=~".+"')
    r = _promtool_test(render(RuleConfig()), tmp_path)
    assert r.returncode != 0
    assert 'engine="tgi_proxy"' in r.stdout + r.stderr


def _series_les(doc: dict) -> dict[str, set[str]]:
    """family -> the `le` values its input series use in the promtool test file."""
    out: dict[str, set[str]] = {}
    for t in doc["tests"]:
        for s in t["input_series"]:
            m = re.fullmatch(r"([\w:]+)_bucket\{(.*)\}", s["series"])
            if m:
                le = re.search(r'le="([^"]+)"', m.group(2)).group(1)
                out.setdefault(m.group(1), set()).add(le)
    return out


def test_engine_tests_use_each_engines_real_family_and_default_buckets():
    les = _series_les(yaml.safe_load(ENGINE_TEST.read_text()))
    for e in ENGINES:
        for family in e.proxy or (e.family,):
            assert family in les, f"{e.name}: no {family}_bucket series in {ENGINE_TEST.name}"
            got = {float(v) for v in les[family]}
            assert got == {*map(float, e.buckets), float("inf")}, f"{e.name}: {family} buckets differ"


def test_every_engine_family_is_in_the_ttft_rules():
    exprs = "\n".join(r["expr"] for r in recording_rules(RuleConfig()) if "ttft" in r["record"])
    for e in ENGINES:
        for family in e.proxy or (e.family,):
            assert f"rate({family}_bucket" in exprs, f"{e.name}: {family} is not in the TTFT rules"
    # the unprefixed name was never a TensorRT-LLM family (collector.py prefixes trtllm_)
    assert not re.search(r"[( ]time_to_first_token_seconds_bucket", exprs)


def test_dynamo_bucket_generator_matches_upstream_rounding():
    # generate_log_buckets(0.001, 480, 18) in lib/llm/src/http/service/metrics.rs: 0, then 17 values
    # log-spaced after 0.001 up to 480, two significant figures (worked out by hand: 0.001*480000^(i/17)).
    assert BY_NAME["dynamo"].buckets == (0.0, 0.0022, 0.0047, 0.01, 0.022, 0.047, 0.1, 0.22, 0.47, 1.0,
                                         2.2, 4.7, 10.0, 22.0, 48.0, 100.0, 220.0, 480.0)
    tgi = BY_NAME["tgi_proxy"].buckets
    assert len(tgi) == 35 and tgi[0] == pytest.approx(0.00015) and tgi[-1] == pytest.approx(1e-4 * 1.5**35)


def test_engine_scrape_jobs_use_each_engines_path_port_and_node_label():
    jobs = {j["job_name"]: j for j in yaml.safe_load((ENGINES_DIR / "prometheus.yml").read_text())[
        "scrape_configs"]}
    node = jobs["pcietax"]["relabel_configs"]
    for e in ENGINES:
        job = jobs["tgi" if e.name == "tgi_proxy" else "dynamo-frontend" if e.name == "dynamo" else e.name]
        assert job.get("metrics_path", "/metrics") == e.path, e.name
        ports = {int(t.rsplit(":", 1)[1]) for sc in job["static_configs"] for t in sc["targets"]}
        assert ports == {e.port}, e.name
        assert job["relabel_configs"] == node, f"{e.name}: `node` is not set as for pcietax"
    assert jobs["trtllm"]["metrics_path"] == "/prometheus/metrics"  # its /metrics is JSON


def test_engine_podmonitors_scrape_each_engines_path_with_the_node_label():
    kust = yaml.safe_load((ENGINES_DIR / "kubernetes/kustomization.yaml").read_text())
    docs = {}
    for f in kust["resources"]:
        d = yaml.safe_load((ENGINES_DIR / "kubernetes" / f).read_text())
        assert d["apiVersion"] == "monitoring.coreos.com/v1" and d["kind"] == "PodMonitor", f
        docs[d["metadata"]["name"]] = d
    for e in ENGINES:
        d = docs["tgi" if e.name == "tgi_proxy" else "dynamo-frontend" if e.name == "dynamo" else e.name]
        (ep,) = d["spec"]["podMetricsEndpoints"]
        assert ep["path"] == e.path and ep["port"], e.name
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
                "action": "replace"} in ep["relabelings"], e.name
    # opt-in: the default bundle does not scrape engines it cannot know about
    assert "engines" not in (REPO / "deploy/kubernetes/kustomization.yaml").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_engine_podmonitors_build_with_kustomize():
    r = subprocess.run(["kubectl", "kustomize", str(ENGINES_DIR / "kubernetes")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("kind: PodMonitor") == 7


def test_engine_doc_names_every_engine_with_its_upstream_source():
    doc = (REPO / "docs/engines.md").read_text()
    for e in ENGINES:
        for family in e.proxy or (e.family,):
            assert f"`{family}`" in doc, f"docs/engines.md does not name {family}"
        for repo, path in e.source:
            assert f"{repo}" in doc and f"`{path}`" in doc, f"docs/engines.md does not cite {repo} {path}"
        assert f"`{e.path}`" in doc
