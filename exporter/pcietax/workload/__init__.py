"""``pcietax workload``: the reference data-path workload (DESIGN.md section 1) with its own
ground truth, and a vLLM-compatible time-to-first-token histogram. See docs/ebpf.md."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..argtypes import size, size_or_zero
from .scenarios import SCENARIOS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("workload", help="reference data-path workload with ground truth",
                       description="Move a known payload through the staged data paths of DESIGN.md "
                                   "section 1 and print the ground truth (bytes per hop) as JSON.")
    p.add_argument("--scenario", action="append", choices=(*SCENARIOS, "all"), default=[],
                   help="data path to run (repeatable; default: all, in order)")
    p.add_argument("--bytes", dest="nbytes", type=size, default=64 << 20,
                   help="payload per scenario (default 64MiB)")
    p.add_argument("--chunk", type=size, default=1 << 20, help="bytes per request (default 1MiB)")
    p.add_argument("--peer", default=None, metavar="HOST:PORT",
                   help="network peer (a `pcietax workload --serve-peer` elsewhere); default: start "
                        "one on loopback as a child process")
    p.add_argument("--serve-peer", default=None, metavar="HOST:PORT",
                   help="run as the network peer on this address instead (port 0 = any; prints it)")
    p.add_argument("--cudart", default=None, metavar="PATH",
                   help="CUDA runtime to use; default: NVIDIA's on a GPU machine, else the stand-in "
                        "built from cudart_stub.c into $PCIETAX_CACHE (~/.cache/pcietax)")
    p.add_argument("--api", choices=("runtime", "driver"), default="runtime",
                   help="make the copies and pinned allocations through the runtime API (cudaMemcpyAsync, "
                        "cudaHostAlloc) or the driver API (cuMemcpyHtoDAsync_v2, cuMemHostAlloc)")
    p.add_argument("--pin", choices=("alloc", "register"), default="alloc",
                   help="how the pinned buffer is made: cudaHostAlloc (alloc) or cudaHostRegister on "
                        "memory the program already has (register, as PyTorch's pin_memory does)")
    p.add_argument("--stub-driver", action="store_true",
                   help="stand-in runtime layered on a stand-in driver library, as NVIDIA's is (each "
                        "runtime copy then passes through a driver copy function too)")
    p.add_argument("--build-stub", action="store_true",
                   help="only build the CUDA runtime stand-in and print its path")
    p.add_argument("--metrics-address", default=None, metavar="HOST:PORT",
                   help="serve vllm:time_to_first_token_seconds and /ground-truth here")
    p.add_argument("--model-name", default="pcietax-workload", help="model_name label of the histogram")
    p.add_argument("--duration", type=float, default=0.0,
                   help="repeat the scenarios for this many seconds (default: run each once)")
    p.add_argument("--rate", type=size_or_zero, default=0, help="cap throughput to this many bytes/s")
    p.add_argument("--request-delay", type=float, default=0.0,
                   help="extra seconds per request (to provoke TTFT alerts)")
    p.add_argument("--wait-signal", action="store_true",
                   help="after setup, print 'ready' to stderr and wait for SIGUSR1 before moving data")
    p.add_argument("--comm", default="ptx-workload", help="process name (comm) to run under")


def run(args: argparse.Namespace) -> int:
    from .cudart import CudaError, build_stub, load
    from .peer import serve, set_comm
    from .scenarios import Runner

    if args.serve_peer:
        try:
            return serve(args.serve_peer)
        except (OSError, ValueError) as e:
            print(f"pcietax workload: --serve-peer {args.serve_peer}: {e}", file=sys.stderr)
            return 2
    if args.build_stub:
        try:
            print(build_stub(driver=args.stub_driver))
        except CudaError as e:
            print(f"pcietax workload: {e}", file=sys.stderr)
            return 1
        return 0
    if args.chunk > args.nbytes:
        args.chunk = args.nbytes
    scenarios = [s for s in args.scenario if s != "all"] or list(SCENARIOS)
    if "all" in args.scenario:
        scenarios = list(SCENARIOS)
    set_comm(args.comm)
    # SIGTERM ends the run like Ctrl-C does, so the peer and metrics children are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children: list[subprocess.Popen] = []
    try:
        try:
            cuda = load(args.cudart, api=args.api, stub_driver=args.stub_driver)
        except (CudaError, OSError) as e:
            print(f"pcietax workload: cannot load the CUDA runtime: {e}", file=sys.stderr)
            return 1
        peer = _peer(args.peer, children)
        metrics = _metrics(args, children) if args.metrics_address else None

        def on_request(seconds: float) -> None:
            if metrics is not None and metrics.stdin is not None:
                metrics.stdin.write(f"t {seconds:.6f}\n")

        runner = Runner(cuda, peer, args.chunk, on_request, args.request_delay, float(args.rate), args.pin)
        if args.wait_signal:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            print(f"ready pid={os.getpid()} cudart={cuda.path}", file=sys.stderr, flush=True)
            signal.sigwait({signal.SIGUSR1})
        runner.setup()
        deadline = time.monotonic() + args.duration
        try:
            while True:
                for s in scenarios:
                    runner.run(s, args.nbytes)
                    if metrics is not None and metrics.stdin is not None:
                        metrics.stdin.write("g " + json.dumps(runner.truth.as_dict()) + "\n")
                        metrics.stdin.flush()
                if time.monotonic() >= deadline:
                    break
        finally:
            runner.close()
        out = {"pid": os.getpid(), "cudart": cuda.path, "chunk": args.chunk, **runner.truth.as_dict()}
        print(json.dumps(out, indent=2))
        return 0
    except (OSError, CudaError) as e:
        print(f"pcietax workload: {e}", file=sys.stderr)
        return 1
    finally:
        for c in children:
            if c.stdin is not None:
                c.stdin.close()
            c.terminate()
            c.wait(timeout=10)


def _child(argv: list[str], children: list[subprocess.Popen], stdin: bool = False) -> str:
    """Start a helper process of ours and return the address it prints on its first line."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
    c = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True, env=env,
                         stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
    children.append(c)
    assert c.stdout is not None
    line = c.stdout.readline().strip()
    if not line.startswith("listening "):
        raise OSError(f"helper {argv} failed to start")
    return line.split(" ", 1)[1]


def _peer(addr: str | None, children: list[subprocess.Popen]) -> tuple[str, int]:
    if addr is None:
        addr = _child(["-m", "pcietax", "workload", "--serve-peer", "127.0.0.1:0"], children)
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _metrics(args: argparse.Namespace, children: list[subprocess.Popen]) -> subprocess.Popen:
    _child(["-m", "pcietax.workload.ttft", "--listen", args.metrics_address,
            "--model-name", args.model_name], children, stdin=True)
    return children[-1]
