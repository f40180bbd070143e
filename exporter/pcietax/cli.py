"""Command line: ``pcietax serve | calc | metrics`` (DESIGN.md section 3). Bad flags fail at start
with a message that names the flag and the fix."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from . import __version__, top, topo_cli
from .argtypes import duration, size_or_zero
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
    p.add_argument("--ratio.window", dest="ratio_window", type=duration, default=10.0,
                   help="window of the live tax ratio (default 10s)")
    p.add_argument("--ratio.min-useful-bytes", dest="ratio_min_useful", type=size_or_zero, default=1 << 20,
                   help="useful bytes a direction must carry within the window for its ratio to be "
                        "exported (default 1MiB; below that the ratio is absent, not huge)")
    p.add_argument("--collect.interval", dest="collect_interval", type=duration, default=1.0,
                   help="how often sources are read (default 1s); scrapes render the latest read")
    p.add_argument("--otlp.endpoint", dest="otlp_endpoint", default=None, metavar="URL",
                   help="also push the same metrics over OTLP/HTTP, e.g. http://collector:4318/v1/metrics")
    p.add_argument("--otlp.interval", dest="otlp_interval", type=duration, default=15.0,
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

    return SourceOptions(
        sysfs=args.sysfs, procfs=args.procfs, nics=args.nic, target_pids=args.target_pid,
        target_comm=args.target_comm, target_cgroup=args.target_cgroup, cuda_libs=args.cuda_lib,
        cuda_probes=args.cuda_probes, memcpy_probe=args.memcpy_probe,
        probe_budget=args.probe_budget,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .model import TaxModel
    from .server import make_server
    from .sinks.prometheus import PcietaxRegistry
    from .sources import SOURCES
    from .webconfig import WebConfigError, WebConfigSource

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper().replace("WARN", "WARNING")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.target_comm:
        try:
            re.compile(args.target_comm)
        except re.error as e:
            print(f"pcietax serve: --target.comm {args.target_comm!r} is not a valid regex: {e}",
                  file=sys.stderr)
            return 2
    try:
        web = WebConfigSource(args.web_config) if args.web_config else None
    except WebConfigError as e:
        print(f"pcietax serve: {e}", file=sys.stderr)
        return 2
    opts = options_from_args(args)
    enabled = [s for s in SOURCES if getattr(args, f"source_{s.name}")]
    engine = Engine([s.build(opts) for s in enabled], TaxModel(args.ratio_window, args.ratio_min_useful))
    registry = PcietaxRegistry(engine.frame, [s.name for s in enabled])
    try:
        server = make_server(args.listen, registry, web)
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
    engine.start_sources()
    engine.run_in_background(args.collect_interval)
    log.info("listening on %s (%s)", args.listen, "TLS" if web and web.ssl_context else "plain HTTP")

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        if otlp is not None:
            otlp.close()  # a last push with the final counters
        engine.close()  # detaches every probe before we exit
        server.server_close()
    return 0


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
