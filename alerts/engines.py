"""The inference servers whose time to first token the rules normalise, as data: metric family,
unit, default buckets, where Prometheus text is served and what must be switched on for it, and
the upstream file each fact was read from (docs/engines.md prints this table).

The recording rules (alerts/rules.py), the example scrape configs (deploy/engines/) and the
promtool tests (alerts/tests/ttft_engines_test.yml) all take their names from here; a test checks
that each of them agrees with this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _dynamo_log_buckets(lo: float, hi: float, count: int) -> tuple[float, ...]:
    """Dynamo's generate_log_buckets: 0.0, then count-1 log-spaced values from lo to hi (the first
    one above lo), each rounded to 2 significant figures, consecutive duplicates removed."""

    def sig2(v: float) -> float:
        scale = 10 ** (1 - math.floor(math.log10(abs(v))))
        return math.floor(v * scale + 0.5) / scale  # Rust's f64::round: half away from zero

    out = [0.0]
    for i in range(1, count):
        v = sig2(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (count - 1)))
        if v != out[-1]:
            out.append(v)
    return tuple(out)


def _tgi_duration_buckets() -> tuple[float, ...]:
    """TGI router: 35 geometric buckets, 0.0001 * 1.5**k for k = 1..35 (every *_duration family)."""
    out, v = [], 0.0001
    for _ in range(35):
        v *= 1.5
        out.append(v)
    return tuple(out)


@dataclass(frozen=True)
class Engine:
    name: str  # the `engine` label value of the normalised TTFT series
    title: str
    family: str  # histogram family (without _bucket); for a proxy, the families that are added
    unit: str  # "seconds" or "milliseconds"
    buckets: tuple[float, ...]  # upstream default upper bounds, +Inf not included
    path: str  # HTTP path of the Prometheus text exposition
    port: int  # default port of that path
    enable: str  # what must be set for the family to exist
    labels: tuple[str, ...]  # the family's own labels (besides le)
    source: tuple[tuple[str, str], ...]  # (repository, path) where the above was verified
    proxy: tuple[str, ...] = ()  # TGI: summed families (quantile of each, added)

    @property
    def bucket_series(self) -> str:
        return f"{self.family}_bucket"


VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
TRITON_FIRST_RESPONSE_BUCKETS_MS = (100, 500, 2000, 5000)
DYNAMO_TTFT_BUCKETS = _dynamo_log_buckets(0.001, 480.0, 18)
TGI_DURATION_BUCKETS = _tgi_duration_buckets()

# Order matters only for reading; every engine gets its own series (label `engine`).
ENGINES: tuple[Engine, ...] = (
    Engine(
        "vllm", "vLLM", "vllm:time_to_first_token_seconds", "seconds", VLLM_TTFT_BUCKETS,
        "/metrics", 8000, "always on (vllm serve; the OpenAI API port)", ("model_name", "engine"),
        (("vllm-project/vllm", "vllm/v1/metrics/loggers.py"),
         ("vllm-project/vllm", "vllm/v1/metrics/buckets.py")),
    ),
    Engine(
        "sglang", "SGLang", "sglang:time_to_first_token_seconds", "seconds", SGLANG_TTFT_BUCKETS,
        "/metrics", 30000, "--enable-metrics (buckets: --bucket-time-to-first-token)",
        ("model_name", "is_streaming"),
        (("sgl-project/sglang", "python/sglang/srt/observability/metrics_collector.py"),),
    ),
    Engine(
        "trtllm", "TensorRT-LLM (trtllm-serve)", "trtllm_time_to_first_token_seconds", "seconds",
        VLLM_TTFT_BUCKETS, "/prometheus/metrics", 8000,
        "return_perf_metrics: true in the --config / --extra_llm_api_options YAML "
        "(/metrics is JSON iteration stats, not Prometheus text)",
        ("model_name", "engine_type"),
        (("NVIDIA/TensorRT-LLM", "tensorrt_llm/metrics/collector.py"),
         ("NVIDIA/TensorRT-LLM", "tensorrt_llm/serve/openai_server.py")),
    ),
    Engine(
        "triton", "Triton Inference Server", "nv_inference_first_response_histogram_ms",
        "milliseconds", TRITON_FIRST_RESPONSE_BUCKETS_MS, "/metrics", 8002,
        "--metrics-config histogram_latencies=true (decoupled models; buckets per model: "
        "model_metrics.metric_control.histogram_options)",
        ("model", "version"),
        (("triton-inference-server/core", "src/metrics.cc"),
         ("triton-inference-server/core", "src/metric_model_reporter.h"),
         ("triton-inference-server/core", "src/metric_model_reporter.cc"),
         ("triton-inference-server/core", "src/infer_response.cc")),
    ),
    Engine(
        "dynamo", "NVIDIA Dynamo (frontend)", "dynamo_frontend_time_to_first_token_seconds", "seconds",
        DYNAMO_TTFT_BUCKETS, "/metrics", 8000,
        "always on (python -m dynamo.frontend, its HTTP port; buckets: DYN_METRICS_TTFT_{MIN,MAX,COUNT}, "
        "prefix: DYN_METRICS_PREFIX)",
        ("model",),
        (("ai-dynamo/dynamo", "lib/llm/src/http/service/metrics.rs"),),
    ),
    Engine(
        "tgi_proxy", "Text Generation Inference (proxy)", "tgi_request_queue_duration", "seconds",
        TGI_DURATION_BUCKETS, "/metrics", 3000,
        "always on (the router's API port, 80 in the official image; also --prometheus-port 9000)",
        (),
        (("huggingface/text-generation-inference", "router/src/server.rs"),
         ("huggingface/text-generation-inference", "backends/v3/src/backend.rs"),
         ("huggingface/text-generation-inference", "launcher/src/main.rs")),
        proxy=("tgi_request_validation_duration", "tgi_request_queue_duration",
               "tgi_batch_inference_duration"),
    ),
)

BY_NAME = {e.name: e for e in ENGINES}
# TGI's prefill batches carry method="prefill" (decode batches method="decode").
TGI_PREFILL_SELECTOR = 'method="prefill"'
