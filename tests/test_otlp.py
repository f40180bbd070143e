"""The OTLP sink pushes the same rows as /metrics to a real OTLP/HTTP endpoint: a loopback HTTP
server in the test decodes the protobuf exactly as an OpenTelemetry collector or a Prometheus OTLP
receiver would, and ``prometheus_name`` applies Prometheus's OTLP translation to what arrived, so
the test sees the names a Prometheus receiving these pushes stores."""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from conftest import REPO
from pcietax.catalog import FAMILIES
from pcietax.engine import Engine
from pcietax.model import TaxModel
from pcietax.sinks.otlp import (
    OTEL_NAMES,
    OtlpSink,
    metrics_url,
    names_table,
    otel_name,
    prometheus_label,
    prometheus_name,
)
from pcietax.sources.base import Snapshot

GPU_RX = "pcietax_gpu_pcie_receive_bytes_total"
NIC_RX = "pcietax_nic_receive_bytes_total"


class _GpuSource:
    """Stands in for the NVML source: one GPU whose PCIe receive counter rises by 1 MiB per read."""

    name = "nvml"

    def __init__(self) -> None:
        self.n = 0

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def read(self) -> Snapshot:
        self.n += 1
        s = Snapshot(provides=frozenset({GPU_RX}))
        s.counter(GPU_RX, self.n * 2**20, gpu="0", pci_bus_id="0000:1b:00.0", uuid="GPU-abc")
        s.gauge("pcietax_gpu_info", 1, gpu="0", pci_bus_id="0000:1b:00.0", uuid="GPU-abc",
                name="NVIDIA H100 80GB HBM3", numa_node="0", counter_path="field")
        return s


class _NicSource:
    """Stands in for the netdev source: one physical NIC at 3 GiB received."""

    name = "netdev"

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def read(self) -> Snapshot:
        s = Snapshot(provides=frozenset({NIC_RX}))
        s.counter(NIC_RX, 3 * 2**30, nic="ens1f0np0", pci_bus_id="0000:17:00.0")
        return s


class _Receiver:
    def __init__(self) -> None:
        self.got: list[ExportMetricsServiceRequest] = []
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.status: list[int] = []  # answers to give, in order; then 200
        recv = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportMetricsServiceRequest()
                req.ParseFromString(body)
                recv.got.append(req)
                recv.paths.append(self.path)
                recv.headers.append(dict(self.headers))
                code = recv.status.pop(0) if recv.status else 200
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def receiver():
    r = _Receiver()
    yield r
    r.stop()


@pytest.fixture
def engine():
    e = Engine([_GpuSource(), _NicSource()], TaxModel(10.0))
    e.start_sources()
    e.collect()
    e.collect()  # the GPU counter now at 2 MiB
    yield e
    e.close()


def _metrics(req: ExportMetricsServiceRequest) -> dict[str, object]:
    return {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def _attrs(dp) -> dict[str, str]:
    return {a.key: a.value.string_value for a in dp.attributes}


def _points(m):
    kind = m.WhichOneof("data")
    return kind, list(getattr(m, kind).data_points)


def test_otlp_push_carries_the_frame(receiver, engine):
    sink = OtlpSink(engine.frame, ["nvml", "netdev"], f"{receiver.base}/v1/metrics", interval=3600,
                    headers={"x-token": "t0k"}, node="gpu-node-7")
    try:
        assert sink.flush()
    finally:
        sink.close()
    assert receiver.got, "no OTLP request arrived"
    assert receiver.headers[0].get("x-token") == "t0k"
    (rm,) = receiver.got[0].resource_metrics
    res = {a.key: a.value.string_value for a in rm.resource.attributes}
    assert res["service.name"] == "pcietax" and res["service.instance.id"] == "gpu-node-7"
    m = _metrics(receiver.got[0])
    gpu = m["pcietax.gpu.pcie.receive"]
    assert gpu.unit == "By" and gpu.sum.is_monotonic
    (dp,) = gpu.sum.data_points
    assert dp.as_double == 2 * 2**20
    assert _attrs(dp) == {"gpu": "0", "pci_bus_id": "0000:1b:00.0", "uuid": "GPU-abc", "node": "gpu-node-7"}
    ups = sorted((p.as_double, _attrs(p)["source"], _attrs(p)["node"])
                 for p in m["pcietax.source.up"].gauge.data_points)
    assert ups == [(1.0, "netdev", "gpu-node-7"), (1.0, "nvml", "gpu-node-7")]
    # Semantic conventions: integer byte counts with the hardware attributes.
    (hw,) = m["hw.gpu.io"].sum.data_points
    assert hw.WhichOneof("value") == "as_int" and hw.as_int == 2 * 2**20
    assert _attrs(hw) == {"hw.id": "GPU-abc", "hw.name": "NVIDIA H100 80GB HBM3", "hw.vendor": "NVIDIA",
                          "hw.type": "gpu", "network.io.direction": "receive", "gpu": "0",
                          "node": "gpu-node-7"}
    (nic,) = m["hw.network.io"].sum.data_points
    assert nic.as_int == 3 * 2**30 and _attrs(nic) == {
        "hw.id": "0000:17:00.0", "hw.name": "ens1f0np0", "hw.type": "network",
        "network.io.direction": "receive", "nic": "ens1f0np0", "node": "gpu-node-7"}
    # host_to_gpu is fed by NVML when no CUDA probes run: 1 MiB moved between the two cycles.
    moved = {tuple(sorted((k, v) for k, v in _attrs(p).items() if k != "node")): p.as_double
             for p in m["pcietax.moved"].sum.data_points}
    assert moved[(("direction", "ingress"), ("hop", "host_to_gpu"))] == 2**20


def test_a_prometheus_receiving_the_push_stores_the_scrape_names_and_labels(receiver, engine):
    """What arrived, translated the way Prometheus's OTLP receiver does: every pcietax series has the
    catalog name and labels of the scrape path, plus `node`, and no name grew `_ratio`."""
    sink = OtlpSink(engine.frame, ["nvml", "netdev"], receiver.base, interval=3600, node="n1")
    try:
        assert sink.flush()
    finally:
        sink.close()
    seen: dict[str, set[frozenset[str]]] = {}
    for name, m in _metrics(receiver.got[0]).items():
        kind, points = _points(m)
        prom = prometheus_name(name, m.unit, "counter" if kind == "sum" and m.sum.is_monotonic else "gauge")
        for p in points:
            seen.setdefault(prom, set()).add(frozenset(prometheus_label(a.key) for a in p.attributes))
    assert {"hw_gpu_io_bytes_total", "hw_network_io_bytes_total"} <= seen.keys()
    assert seen["hw_gpu_io_bytes_total"] == {frozenset({"hw_id", "hw_name", "hw_vendor", "hw_type",
                                                        "network_io_direction", "gpu", "node"})}
    pcietax = {n: ls for n, ls in seen.items() if n.startswith("pcietax_")}
    assert GPU_RX in pcietax and "pcietax_source_up" in pcietax and "pcietax_build_info" in pcietax
    for name, label_sets in pcietax.items():
        assert name in FAMILIES, f"a Prometheus receiving OTLP would store {name}, which no rule knows"
        for labels in label_sets:
            assert labels == frozenset(FAMILIES[name].labels) | {"node"}, (name, labels)


def test_every_family_round_trips_through_prometheus_otlp_translation():
    for f in FAMILIES.values():
        name, unit = otel_name(f)
        assert name.startswith("pcietax.")
        assert prometheus_name(name, unit, f.kind) == f.name, (f.name, name, unit)
        if unit == "1":  # only true ratios carry unit 1 (Prometheus appends _ratio to those gauges)
            assert f.name.endswith("_ratio") or f.kind == "counter", f.name
    assert len({n for n, _ in OTEL_NAMES.values()}) == len(FAMILIES)  # one instrument per family


@pytest.mark.parametrize(("name", "unit", "kind", "expected"), [
    # Cases worked out from prometheus/otlptranslator normalizeName and its README examples.
    ("http.server.request.duration", "s", "gauge", "http_server_request_duration_seconds"),
    ("requests.count", "1", "counter", "requests_count_total"),
    ("memory.usage", "By", "gauge", "memory_usage_bytes"),
    ("system.cpu.utilization", "1", "gauge", "system_cpu_utilization_ratio"),
    ("pcietax.tax_ratio", "1", "gauge", "pcietax_tax_ratio"),  # ratio moved, not doubled
    ("pcietax.source.up", "1", "gauge", "pcietax_source_up_ratio"),  # the bug of issue 12, item 8
    ("hw.gpu.io", "By", "counter", "hw_gpu_io_bytes_total"),
    ("foo.total.bar", "", "counter", "foo_bar_total"),  # total moved to the end
    ("link.ceiling", "By/s", "gauge", "link_ceiling_bytes_per_second"),
    ("queue.length", "{item}", "gauge", "queue_length"),  # annotations add nothing
    ("io.rate", "{packet}/s", "gauge", "io_rate_per_second"),
    ("latency_seconds", "s", "gauge", "latency_seconds"),  # the unit word is already a token
    ("temp", "Cel", "gauge", "temp_celsius"),
    ("2xx.responses", "", "counter", "_2xx_responses_total"),
    ("weird__name..x", "", "gauge", "weird_name_x"),
])
def test_prometheus_name_follows_prometheus_otlp_translation(name, unit, kind, expected):
    assert prometheus_name(name, unit, kind) == expected


def test_prometheus_label_translation():
    assert prometheus_label("hw.id") == "hw_id"
    assert prometheus_label("network.io.direction") == "network_io_direction"
    assert prometheus_label("k8s..node") == "k8s_node"
    assert prometheus_label("0abc") == "key_0abc"
    assert prometheus_label("pci_bus_id") == "pci_bus_id"


def test_docs_list_the_names_prometheus_shows():
    doc = (REPO / "docs" / "otlp.md").read_text()
    for otel, unit, prom, scrape in names_table():
        row = f"| `{otel}` | {f'`{unit}`' if unit else '—'} | `{prom}` |"
        assert row in doc, f"docs/otlp.md lacks the row {row}"
        assert not scrape or prom == scrape


@pytest.mark.parametrize(("endpoint", "url"), [
    ("http://collector:4318", "http://collector:4318/v1/metrics"),
    ("http://collector:4318/", "http://collector:4318/v1/metrics"),
    ("https://mimir.example/otlp/v1/metrics", "https://mimir.example/otlp/v1/metrics"),
    ("http://prometheus:9090/api/v1/otlp/v1/metrics", "http://prometheus:9090/api/v1/otlp/v1/metrics"),
    ("http://collector:4318?x=1", "http://collector:4318/v1/metrics?x=1"),
])
def test_metrics_url(endpoint, url):
    assert metrics_url(endpoint) == url


def test_endpoint_without_a_path_posts_to_v1_metrics(receiver, engine):
    for endpoint, path in ((receiver.base, "/v1/metrics"), (receiver.base + "/", "/v1/metrics"),
                           (receiver.base + "/api/v1/otlp/v1/metrics", "/api/v1/otlp/v1/metrics")):
        sink = OtlpSink(engine.frame, ["nvml"], endpoint, interval=3600, node="n1")
        try:
            assert sink.flush()
        finally:
            sink.close()
        assert receiver.paths[-1] == path


def test_node_defaults_to_the_resource_node_name(receiver, engine, monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.node.name=gpu-17,k8s.cluster.name=prod")
    sink = OtlpSink(engine.frame, ["nvml"], receiver.base, interval=3600)
    try:
        assert sink.node == "gpu-17"
        assert sink.flush()
    finally:
        sink.close()
    (rm,) = receiver.got[-1].resource_metrics
    res = {a.key: a.value.string_value for a in rm.resource.attributes}
    assert res["k8s.cluster.name"] == "prod" and res["service.instance.id"] == "gpu-17"
    up = _metrics(receiver.got[-1])["pcietax.source.up"]
    assert {_attrs(p)["node"] for p in up.gauge.data_points} == {"gpu-17"}


def _outage_records(caplog) -> tuple[list[str], list[str]]:
    ours = [r for r in caplog.records if r.name == "pcietax" and r.getMessage().startswith("otlp:")]
    return ([r.getMessage() for r in ours if r.levelno == logging.WARNING],
            [r.getMessage() for r in ours if r.levelno == logging.INFO])


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def test_failed_pushes_log_once_per_outage(receiver, engine, caplog):
    caplog.set_level(logging.DEBUG)
    root_records: list[logging.LogRecord] = []
    keep = _Keep(root_records)
    logging.getLogger().addHandler(keep)
    receiver.status = [400, 400, 400]  # not retryable: each push fails at once
    sink = OtlpSink(engine.frame, ["nvml"], receiver.base, interval=3600, node="n1", push_timeout=2)
    try:
        results = [sink.flush() for _ in range(5)]
        receiver.status = [400, 400]  # a second outage
        results += [sink.flush() for _ in range(3)]
    finally:
        sink.close()
        logging.getLogger().removeHandler(keep)
    assert len(receiver.got) == 9  # and the last push of close()
    warnings, infos = _outage_records(caplog)
    assert len(warnings) == 2 and all("failed" in w and receiver.base in w for w in warnings), warnings
    assert "400" in warnings[0]  # the reason the OTLP exporter gave, not "unknown"
    assert len(infos) == 2 and "after 3 failed" in infos[0] and "after 2 failed" in infos[1], infos
    # The OpenTelemetry exporter's own per-push error lines do not reach the process's log handlers
    # (pytest's caplog hooks non-propagating loggers itself, so look at a handler on the root).
    assert not [r for r in root_records if r.name.startswith("opentelemetry.exporter")]
    assert results[3] and results[4]


def test_unreachable_endpoint_logs_once(engine, caplog):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = OtlpSink(engine.frame, ["nvml"], f"http://127.0.0.1:{port}", interval=3600, node="n1",
                    push_timeout=0.5)
    try:
        for _ in range(3):
            sink.flush()
        assert sink.outage.failed == 3
    finally:
        assert sink.close(timeout=2.0) is not None
    warnings, _ = _outage_records(caplog)
    assert len(warnings) == 1, warnings


@pytest.fixture
def silent_endpoint():
    """Accepts connections and reads, never answers: an endpoint behind a stuck proxy."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def run() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except (TimeoutError, OSError):
                continue

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


@pytest.mark.parametrize("timeout", [1.0, 0.3])
def test_close_never_blocks_longer_than_its_timeout(engine, silent_endpoint, timeout):
    # The exporter itself would wait 30 s for an answer, and retry.
    sink = OtlpSink(engine.frame, ["nvml"], silent_endpoint, interval=3600, node="n1", push_timeout=30)
    t0 = time.monotonic()
    sink.close(timeout=timeout)
    took = time.monotonic() - t0
    assert took < timeout + 0.5, f"close({timeout}) took {took:.2f}s"
    t0 = time.monotonic()
    assert sink.close(timeout=timeout) is True  # idempotent, immediate
    assert time.monotonic() - t0 < 0.1


def test_close_abandons_a_shutdown_that_hangs(engine, silent_endpoint, caplog, monkeypatch):
    """Older SDKs' shutdown waits for the last push: close() still returns on time, says so, and
    stops the exporter's retries."""
    caplog.set_level(logging.INFO)
    sink = OtlpSink(engine.frame, ["nvml"], silent_endpoint, interval=3600, node="n1", push_timeout=30)
    release = threading.Event()
    monkeypatch.setattr(sink._provider, "shutdown", lambda **_: release.wait(10))
    stopped = []
    monkeypatch.setattr(sink._inner, "shutdown", lambda *a, **k: stopped.append(True))
    t0 = time.monotonic()
    assert sink.close(timeout=0.5) is False
    assert time.monotonic() - t0 < 1.0
    assert stopped == [True]
    assert any("did not finish within 0.5s" in r.getMessage() for r in caplog.records)
    release.set()


def test_close_with_a_working_endpoint_pushes_the_last_counters(receiver, engine):
    sink = OtlpSink(engine.frame, ["nvml"], receiver.base, interval=3600, node="n1")
    assert sink.close(timeout=5.0) is True
    assert receiver.got and "pcietax.gpu.pcie.receive" in _metrics(receiver.got[-1])


def test_bad_otlp_flags_fail_at_start():
    import subprocess

    from conftest import free_port, pcietax_cmd, pcietax_env

    r = subprocess.run(
        [*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{free_port()}",
         "--otlp.endpoint=collector:4318", "--no-source.pcie"],
        capture_output=True, text=True, env=pcietax_env(), timeout=60,
    )
    assert r.returncode == 2
    assert "--otlp.endpoint must be an http(s) URL" in r.stderr



def _as_prometheus(req: ExportMetricsServiceRequest) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The series a Prometheus OTLP receiver stores for one push: translated names and labels,
    `job`/`instance` from service.name/service.instance.id."""
    out = {}
    for rm in req.resource_metrics:
        res = {a.key: a.value.string_value for a in rm.resource.attributes}
        target = {"job": res["service.name"], "instance": res["service.instance.id"]}
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind, points = _points(m)
                name = prometheus_name(m.name, m.unit, "counter" if kind == "sum" and m.sum.is_monotonic
                                       else "gauge")
                for p in points:
                    labels = {prometheus_label(a.key): a.value.string_value for a in p.attributes} | target
                    value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
                    out[(name, tuple(sorted(labels.items())))] = float(value)
    return out


@pytest.mark.skipif(not __import__("shutil").which("promtool"), reason="needs promtool")
def test_shipped_rules_evaluate_on_what_prometheus_stores_from_otlp(receiver, tmp_path):
    """Two pushes, translated the way Prometheus's OTLP receiver stores them and replayed 15 s apart
    through alerts/pcietax.rules.yml: the recording rules join on the pushed `node`, and a failing
    source fires PcieTaxSourceDown on that node."""
    import json
    import subprocess

    import yaml

    gpu = _GpuSource()
    engine = Engine([gpu, _NicSource()], TaxModel(10.0))
    engine.start_sources()
    engine.collect()
    engine.collect()
    sink = OtlpSink(engine.frame, ["nvml", "netdev"], receiver.base, interval=3600, node="gpu-3")
    try:
        sink.flush()
        engine.collect()  # 1 MiB more through host_to_gpu
        sink.flush()
    finally:
        sink.close()
        engine.close()
    first, second = _as_prometheus(receiver.got[0]), _as_prometheus(receiver.got[1])
    counters = {n for n, _ in second if n.endswith("_total")}
    series = []
    for (name, labels), v2 in second.items():
        if name == "pcietax_source_up" and dict(labels)["source"] == "netdev":
            v2 = 0.0  # the netdev source fails (it is not absent)
        sel = name + "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in labels) + "}"
        step = max(0.0, v2 - first.get((name, labels), v2)) if name in counters else 0.0
        series.append({"series": sel, "values": f"{v2!r}+{step!r}x80"})
    node = {"node": "gpu-3", "job": "pcietax", "instance": "gpu-3"}
    moved = ('node_hop_direction:pcietax_moved_bytes:rate1m'
             '{node="gpu-3",hop="host_to_gpu",direction="ingress"}')
    test = {
        "rule_files": [str(REPO / "alerts" / "pcietax.rules.yml")],
        "evaluation_interval": "15s",
        "group_eval_order": ["pcietax.rules", "pcietax.alerts"],
        "tests": [{
            "interval": "15s",
            "input_series": series,
            "promql_expr_test": [
                # 1 MiB per 15 s push interval.
                {"expr": f"abs({moved} - {2**20 / 15!r}) < bool 0.001", "eval_time": "5m",
                 "exp_samples": [{"labels": '{direction="ingress", hop="host_to_gpu", node="gpu-3"}',
                                  "value": 1}]},
            ],
            "alert_rule_test": [{
                "alertname": "PcieTaxSourceDown", "eval_time": "11m",
                "exp_alerts": [{
                    "exp_labels": {**node, "severity": "warning", "source": "netdev"},
                    "exp_annotations": {
                        "summary": "pcietax source netdev down on gpu-3",
                        "description": "The netdev source of pcietax on gpu-3 has been down for 10m; "
                                       "the hops it measures are missing from the tax ratio and the "
                                       "exporter logs the reason.",
                        "runbook_url": "https://github.com/pcietax/pcietax/blob/main/docs/runbook.md"
                                       "#pcietaxsourcedown",
                    },
                }],
            }],
        }],
    }
    path = tmp_path / "otlp_rules_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1000))
    r = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_label_set_the_catalog_does_not_give_fails_on_the_otlp_path_too():
    """The OTLP path passes labels as attributes (nothing is dropped), so drift from the catalog
    would go unseen there: its row cache checks each family's label names once, like /metrics."""
    from pcietax.catalog import NIC_RECEIVE_BYTES, UPI_BYTES, LabelSetMismatch
    from pcietax.engine import Frame
    from pcietax.sinks.otlp import _RowCache

    def frame(labels):
        return Frame(0.0, {(labels[0], labels[1]): 1.0}, {}, {}, None)

    good = frame((NIC_RECEIVE_BYTES, (("nic", "eth0"), ("pci_bus_id", "0000:3b:00.0"))))
    assert len(_RowCache(lambda: good, []).rows(NIC_RECEIVE_BYTES)) == 1
    for bad in [(NIC_RECEIVE_BYTES, (("nic", "eth0"), ("pci_bus_id", "0000:3b:00.0"), ("port", "1"))),
                (UPI_BYTES, (("direction", "ingress"), ("link", "0"), ("socket", "0")))]:
        with pytest.raises(LabelSetMismatch):
            _RowCache(lambda b=bad: frame(b), []).rows(bad[0])
