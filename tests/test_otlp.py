"""The OTLP sink pushes the same rows as /metrics to a real OTLP/HTTP endpoint: a loopback HTTP
server in the test decodes the protobuf exactly as an OpenTelemetry collector would."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from pcietax.engine import Engine
from pcietax.model import TaxModel
from pcietax.sinks.otlp import OtlpSink
from pcietax.sources.base import Snapshot


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
        s = Snapshot(provides=frozenset({"pcietax_gpu_pcie_receive_bytes_total"}))
        s.counter("pcietax_gpu_pcie_receive_bytes_total", self.n * 2**20, gpu="0",
                  pci_bus_id="0000:1b:00.0", uuid="GPU-abc")
        return s


@pytest.fixture
def receiver():
    got: list[ExportMetricsServiceRequest] = []
    headers: list[dict[str, str]] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            req = ExportMetricsServiceRequest()
            req.ParseFromString(body)
            got.append(req)
            headers.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1/metrics", got, headers
    srv.shutdown()
    srv.server_close()


def _metrics(req: ExportMetricsServiceRequest) -> dict[str, object]:
    return {m.name: m for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def test_otlp_push_carries_the_frame(receiver):
    url, got, headers = receiver
    src = _GpuSource()
    engine = Engine([src], TaxModel(10.0))
    engine.start_sources()
    engine.collect()
    engine.collect()  # counter now at 2 MiB
    sink = OtlpSink(engine.frame, ["nvml"], url, interval=3600, headers={"x-token": "t0k"})
    try:
        assert sink.flush()
    finally:
        sink.close()
    assert got, "no OTLP request arrived"
    assert headers[0].get("x-token") == "t0k"
    m = _metrics(got[0])
    gpu = m["pcietax_gpu_pcie_receive_bytes"]
    assert gpu.unit == "By"
    assert gpu.sum.is_monotonic
    (dp,) = gpu.sum.data_points
    assert dp.as_double == 2 * 2**20
    assert {a.key: a.value.string_value for a in dp.attributes} == {
        "gpu": "0", "pci_bus_id": "0000:1b:00.0", "uuid": "GPU-abc",
    }
    up = m["pcietax_source_up"]
    ups = [(p.as_double, p.attributes[0].value.string_value) for p in up.gauge.data_points]
    assert ups == [(1.0, "nvml")]
    hw = m["hw.gpu.io"]
    hws = [(p.as_double, {a.key: a.value.string_value for a in p.attributes}) for p in hw.sum.data_points]
    assert hws == [(2 * 2**20, {"hw.id": "GPU-abc", "network.io.direction": "receive"})]
    # host_to_gpu is fed by NVML when no CUDA probes run: 1 MiB moved between the two cycles.
    moved = {
        tuple(sorted((a.key, a.value.string_value) for a in p.attributes)): p.as_double
        for p in m["pcietax_moved_bytes"].sum.data_points
    }
    assert moved[(("direction", "ingress"), ("hop", "host_to_gpu"))] == 2**20
    engine.close()


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
