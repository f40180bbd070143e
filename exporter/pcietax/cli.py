"""Command line: ``pcietax serve | calc | metrics`` (DESIGN.md section 3). Bad flags fail at start
with a message that names the flag and the fix."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__, top, topo_cli
from .argtypes import duration_between, off_or, size_or_zero
from .sources import SourceOptions

log = logging.getLogger("pcietax")


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of CPU seconds per second: {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive, finite CPU seconds per second: {text!r}")
    return v


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .sources import SOURCES

    p = sub.add_parser("serve", help="run the exporter")
    p.add_argument("--web.listen-address", dest="listen", default=":9817",
                   help="address to listen on (default :9817)")
    p.add_argument("--web.config.file", dest="web_config", default=None,
                   help="exporter-toolkit web config (TLS, basic auth)")
    p.add_argument("--path.sysfs", dest="sysfs", default="/sys", help="sysfs mount point")
    p.add_argument("--path.procfs", dest="procfs", default="/proc", help="procfs mount point")
    p.add_argument("--path.pods", dest="pods", default="/var/log/pods", metavar="DIR",
                   help="the kubelet's pod log directory, read to name the namespace, pod and container "
                        "of traced processes (default /var/log/pods; empty disables; absent: no pod labels)")
    for spec in SOURCES:
        p.add_argument(f"--source.{spec.name}", dest=f"source_{spec.name}",
                       action=argparse.BooleanOptionalAction, default=True, help=spec.help)
    p.add_argument("--nic", action="append", default=[], metavar="IFACE",
                   help="NIC to measure (repeatable; glob patterns allowed); default: every physical NIC")
    p.add_argument("--target.pid", dest="target_pid", action="append", type=int, default=[],
                   help="process to trace (repeatable); default: node-wide")
    p.add_argument("--target.comm", dest="target_comm", default=None, metavar="REGEX",
                   help="trace processes whose comm matches")
    p.add_argument("--target.cgroup", dest="target_cgroup", default=None, metavar="PATH",
                   help="trace processes in this cgroup (v2 path)")
    p.add_argument("--cuda.lib", dest="cuda_lib", action="append", default=[], metavar="PATH",
                   help="CUDA library to probe (repeatable; also found in targets' /proc/PID/maps)")
    p.add_argument("--cuda.probes", dest="cuda_probes", choices=("off", "sampled", "always"),
                   default="sampled", help="CUDA copy uprobes: off, sampled duty cycle, or always")
    p.add_argument("--memcpy.probe", dest="memcpy_probe", action="store_true",
                   help="opt-in: uprobe glibc memcpy of target processes to count copies into pinned "
                        "buffers (costs a uprobe hit per memcpy call; see docs/ebpf.md)")
    p.add_argument("--probe.budget", dest="probe_budget", type=_budget, default=None, metavar="CPU_S_PER_S",
                   help="CPU seconds per second all eBPF probes together may cost; each probe group's "
                        "duty cycle follows from its measured cost (default 0.005; docs/ebpf.md)")
    p.add_argument("--ratio.window", dest="ratio_window", type=duration_between(0.01, 86400), default=10.0,
                   help="window of the live tax ratio (default 10s)")
    p.add_argument("--ratio.min-useful-bytes", dest="ratio_min_useful", type=size_or_zero, default=1 << 20,
                   help="useful bytes a direction must carry within the window for its ratio to be "
                        "exported (default 1MiB; below that the ratio is absent, not huge)")
    p.add_argument("--collect.interval", dest="collect_interval", type=duration_between(0.01, 3600),
                   default=1.0, help="how often sources are read (default 1s, 10ms to 1h); scrapes "
                                     "render the latest read")
    p.add_argument("--collect.rest-interval", dest="collect_rest_interval",
                   type=off_or(duration_between(0.01, 3600)), default=15.0, metavar="DURATION|0",
                   help="at rest (payload below --ratio.min-useful-bytes per --ratio.window), read "
                        "sources this often instead, waking at once when /proc/net/dev shows traffic "
                        "(default 15s; 0 reads every --collect.interval always)")
    p.add_argument("--otlp.endpoint", dest="otlp_endpoint", default=None, metavar="URL",
                   help="also push the same metrics over OTLP/HTTP, e.g. http://collector:4318/v1/metrics")
    p.add_argument("--otlp.interval", dest="otlp_interval", type=duration_between(0.1, 86400), default=15.0,
                   help="OTLP push interval (default 15s)")
    p.add_argument("--otlp.header", dest="otlp_header", action="append", default=[], metavar="KEY=VALUE",
                   help="HTTP header for OTLP pushes (repeatable), e.g. an auth token")
    p.add_argument("--log.level", dest="log_level", default="info",
                   choices=("debug", "info", "warn", "error"))


def _add_calc(sub: argparse._SubParsersAction) -> None:
    from .pcie_math import DEFAULT_FLOW_CONTROL

    p = sub.add_parser("calc", help="PCIe ceiling calculator")
    p.add_argument("--gen", type=int, required=True, help="PCIe generation 1-6")
    p.add_argument("--width", type=int, required=True, help="lanes: 1, 2, 4, 8, 12, 16, 32")
    p.add_argument("--mps", type=int, default=256, help="max payload size in bytes (128-4096)")
    p.add_argument("--header", type=int, default=12, help="TLP header bytes: 12 (3DW) or 16 (4DW)")
    p.add_argument("--ecrc", action="store_true", help="add the 4-byte end-to-end CRC")
    p.add_argument("--flow-control", type=float, default=DEFAULT_FLOW_CONTROL,
                   help=f"share of link time left after DLLPs (default {DEFAULT_FLOW_CONTROL})")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_metrics(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("metrics", help="print the metrics reference")
    m.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcietax", description="PCIe tax observability for GPU nodes")
    parser.add_argument("--version", action="version", version=f"pcietax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _run in _commands().values():
        add(sub)
    return parser


def cmd_calc(args: argparse.Namespace) -> int:
    from .pcie_math import ceiling, quoted_differences, render_table

    try:
        c = ceiling(args.gen, args.width, args.mps, args.header, args.ecrc, args.flow_control)
    except ValueError as e:
        print(f"pcietax calc: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**c.as_dict(), "quoted_table_differences": quoted_differences(c)}, indent=2))
    else:
        sys.stdout.write(render_table(c))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from .catalog import FAMILIES, markdown_reference

    if args.markdown:
        sys.stdout.write(markdown_reference())
    else:
        for f in FAMILIES.values():
            print(f"{f.name} ({f.kind}) {{{', '.join(f.labels)}}}: {f.help}")
    return 0


def options_from_args(args: argparse.Namespace) -> SourceOptions:
    opts = SourceOptions(
        sysfs=args.sysfs, procfs=args.procfs, nics=args.nic, target_pids=args.target_pid,
        target_comm=args.target_comm, target_cgroup=args.target_cgroup, cuda_libs=args.cuda_lib,
        cuda_probes=args.cuda_probes, memcpy_probe=args.memcpy_probe,
        probe_budget=args.probe_budget,
    )
    if getattr(args, "pods", ""):
        from pathlib import Path

        from .sources.pods import PodResolver

        # Cheap to build (no I/O until a lookup); outside Kubernetes every lookup is None.
        opts.pod_resolver = PodResolver(Path(args.pods))
    return opts


# SIGTERM to exit: whatever a source's close or a sink's last push is doing, the process is gone
# within 2 s (systemd and the kubelet escalate to SIGKILL after their own grace period anyway).
SHUTDOWN_BUDGET = 1.4  # leaves ~0.5 s for the kernel to detach probes as the process exits


def _check_roots(args: argparse.Namespace) -> str | None:
    for flag, path, what in (("--path.sysfs", args.sysfs, "sysfs (/sys, or /host/sys in a container)"),
                             ("--path.procfs", args.procfs, "procfs (/proc, or /host/proc in a container)")):
        if not os.path.isdir(path):
            return f"{flag} {path}: no such directory; give the mount point of {what}"
        if not os.access(path, os.R_OK | os.X_OK):
            return f"{flag} {path}: not readable by this user"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .model import TaxModel
    from .server import make_server, raise_nofile_limit
    from .sinks.prometheus import PcietaxRegistry
    from .sources import SOURCES
    from .webconfig import WebConfigError, WebConfigSource

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper().replace("WARN", "WARNING")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Signals first: a SIGHUP while sources start must not kill the process (its default action).
    # The handlers only record; the main thread waits on the wakeup fd, to which the interpreter
    # writes each signal's number. (Setting a threading.Event from a handler can deadlock: the
    # handler runs in the main thread, which may hold the Event's lock while it waits on it.)
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    got: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: got.add(signum))
    if args.target_comm:
        try:
            re.compile(args.target_comm)
        except re.error as e:
            print(f"pcietax serve: --target.comm {args.target_comm!r} is not a valid regex: {e}",
                  file=sys.stderr)
            return 2
    if 0 < args.collect_rest_interval < args.collect_interval:
        print(f"pcietax serve: --collect.rest-interval ({args.collect_rest_interval:g}s) is shorter than "
              f"--collect.interval ({args.collect_interval:g}s): give 0 (never rest) or a longer one",
              file=sys.stderr)
        return 2
    bad_root = _check_roots(args)
    if bad_root:
        print(f"pcietax serve: {bad_root}", file=sys.stderr)
        return 2
    try:
        web = WebConfigSource(args.web_config) if args.web_config else None
    except WebConfigError as e:
        print(f"pcietax serve: {e}", file=sys.stderr)
        return 2
    raise_nofile_limit()
    opts = options_from_args(args)
    enabled = [s for s in SOURCES if getattr(args, f"source_{s.name}")]
    engine = Engine([s.build(opts) for s in enabled], TaxModel(args.ratio_window, args.ratio_min_useful),
                    rest_interval=args.collect_rest_interval)
    registry = PcietaxRegistry(engine.frame, [s.name for s in enabled])
    try:
        server = make_server(args.listen, registry, web, ready=engine.ready)
    except ValueError as e:
        print(f"pcietax serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pcietax serve: cannot listen on {args.listen}: {e.strerror}; "
              "pick another --web.listen-address", file=sys.stderr)
        return 2
    otlp = None
    if args.otlp_endpoint:
        from .sinks.otlp import OtlpSink, OtlpUnavailable

        headers = dict(h.split("=", 1) for h in args.otlp_header if "=" in h)
        bad = [h for h in args.otlp_header if "=" not in h]
        if bad or not re.match(r"^https?://", args.otlp_endpoint):
            print(f"pcietax serve: --otlp.endpoint must be an http(s) URL and --otlp.header KEY=VALUE; "
                  f"got {args.otlp_endpoint!r} {bad or ''}", file=sys.stderr)
            server.server_close()
            return 2
        try:
            otlp = OtlpSink(engine.frame, [s.name for s in enabled], args.otlp_endpoint,
                            args.otlp_interval, headers)
        except OtlpUnavailable as e:
            print(f"pcietax serve: {e}", file=sys.stderr)
            server.server_close()
            return 2
    # Serve at once: /-/healthy answers while sources start (an eBPF compile takes seconds), and
    # /-/ready and /metrics say 503 until the first complete collection cycle.
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                               name="pcietax-http-accept", daemon=True)
    serving.start()
    log.info("listening on %s (%s)", args.listen, "TLS" if web and web.ssl_context else "plain HTTP")
    t_start = time.monotonic()
    failed: list[bool] = []

    def startup() -> None:
        try:
            engine.start_sources()
            if not got & {signal.SIGTERM, signal.SIGINT}:
                engine.run_in_background(args.collect_interval)
                log.info("first collection cycle complete after %.2fs: ready", time.monotonic() - t_start)
        except Exception:
            log.exception("start failed")
            failed.append(True)
            wake_w.send(bytes([signal.SIGTERM]))

    threading.Thread(target=startup, name="pcietax-start", daemon=True).start()
    stopping: set[int] = set()
    while not stopping:
        for signum in wake_r.recv(64):  # the numbers of the signals that arrived, in order
            if signum == signal.SIGHUP:
                _reload(web)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                stopping.add(signum)
    log.info("signal %s: shutting down", "/".join(signal.Signals(s).name for s in sorted(stopping)))
    rc = _shutdown(server, engine, otlp)
    return 1 if failed else rc


def _reload(web: Any) -> None:
    if web is None:
        log.info("SIGHUP: no --web.config.file to re-read; nothing else is reloaded")
        return
    web.reload()


def _shutdown(server: Any, engine: Any, otlp: Any) -> int:
    deadline = time.monotonic() + SHUTDOWN_BUDGET
    left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
    late: list[str] = []
    steps = [threading.Thread(target=server.shutdown, name="http", daemon=True),
             threading.Thread(target=lambda: late.extend(engine.close(SHUTDOWN_BUDGET - 0.2, exiting=True)
                                                         or []), name="sources", daemon=True)]
    # The last OTLP push (final counters) runs beside closing the sources.
    if otlp is not None:
        steps.append(threading.Thread(target=_close_sink, args=(otlp, SHUTDOWN_BUDGET - 0.2), name="otlp",
                                      daemon=True))
    for t in steps:
        t.start()
    for t in steps:
        t.join(left())
    server.server_close()
    others = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    for t in others:  # the engine's pool threads leave once their read returns
        t.join(left())
    stuck = late + [t.name for t in steps + others if t.is_alive()]
    if stuck or getattr(engine, "abandoned", None):
        # A hung source read, close or sink push: the interpreter's exit would wait for it (pool
        # threads are joined at exit) or race it (BCC's own atexit cleanup, which would detach an
        # abandoned source's probes one by one). Leave now; the kernel detaches every probe with
        # the process.
        if stuck:
            log.warning("shutdown: %s still running after %.1fs; exiting without them", ", ".join(stuck),
                        SHUTDOWN_BUDGET)
        log.debug("shutdown: leaving %.2fs after the signal; the kernel releases the rest",
                  SHUTDOWN_BUDGET - left())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _close_sink(sink: Any, timeout: float) -> None:
    close = sink.close
    try:
        if "timeout" in inspect.signature(close).parameters:
            close(timeout=timeout)
        else:
            close()
    except Exception as e:  # a failed last push must not stop the shutdown
        log.warning("OTLP: close failed: %s", e)


AddParser = Callable[[argparse._SubParsersAction], None]
Run = Callable[[argparse.Namespace], int]


def _commands() -> dict[str, tuple[AddParser, Run]]:
    """Subcommands: each is (add its parser, run it). A subcommand that lives in its own module
    exposes ``add_parser(sub)`` and ``run(args)`` and is listed here with one line."""
    return {
        "serve": (_add_serve, cmd_serve),
        "calc": (_add_calc, cmd_calc),
        "metrics": (_add_metrics, cmd_metrics),
        "top": (top.add_parser, top.run),
        "topo": (topo_cli.add_parser, topo_cli.run),
        "workload": _workload(),
    }


def _workload() -> tuple[AddParser, Run]:
    from . import workload

    return workload.add_parser, workload.run


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _commands()[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
