"""The workload's vLLM-compatible metrics endpoint, in a child process of its own.

It serves ``vllm:time_to_first_token_seconds`` (same name, label and buckets as vLLM) and the
workload's running ground truth at ``/ground-truth``. The workload feeds it through a pipe, not a
socket, so scraping this endpoint adds no socket bytes to the workload process and its ground
truth stays exact under the exporter.

Run as: python -m pcietax.workload.ttft --listen HOST:PORT --model-name NAME  (stdin: one line per
event: ``t SECONDS`` for a request's time to first token, ``g JSON`` for the ground truth).
"""

from __future__ import annotations

import argparse
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vLLM's buckets for vllm:time_to_first_token_seconds (vllm/engine/metrics.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pcietax-workload-metrics")
    p.add_argument("--listen", required=True)
    p.add_argument("--model-name", default="pcietax-workload")
    a = p.parse_args(argv)
    from ..server import parse_listen_address

    host, port = parse_listen_address(a.listen)
    reg = CollectorRegistry(auto_describe=True)
    ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                     ["model_name"], registry=reg, buckets=TTFT_BUCKETS)
    child = ttft.labels(model_name=a.model_name)
    truth: dict[str, bytes] = {"json": b"{}"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, ctype = generate_latest(reg), CONTENT_TYPE_LATEST
            elif self.path.startswith("/ground-truth"):
                body, ctype = truth["json"], "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer((host or "0.0.0.0", port), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(f"listening {srv.server_address[0]}:{srv.server_address[1]}", flush=True)
    for line in sys.stdin:
        kind, _, rest = line.rstrip("\n").partition(" ")
        if kind == "t":
            try:
                child.observe(float(rest))
            except ValueError:
                continue
        elif kind == "g":
            truth["json"] = rest.encode()
    srv.shutdown()  # the workload closed the pipe: it is done
    return 0


if __name__ == "__main__":
    sys.exit(main())
