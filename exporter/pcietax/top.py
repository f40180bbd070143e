"""``pcietax top``: a live terminal view of the local exporter (like ``nvidia-smi dmon`` meets
``htop``). Every second it scrapes the exporter's /metrics, turns counters into per-second rates
between the exporter's last two collections (see Frames), and draws the tax ratio per direction,
a bar per hop, staging CPU, and the busiest GPUs, NICs and processes. ``q`` quits. ``--once``
prints one frame as plain text (two collections) for scripts and logs.

Parsing, rates and layout are pure functions of scraped text, so they are tested without a
terminal; the curses loop only draws the lines.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from . import catalog as c
from .model import DIRECTIONS, HOPS

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)

# --once waits this long at most for the exporter's second collection (its rest interval is 15 s).
ONCE_WAIT = 17.0

# The scope rule (catalog.SCOPE_RULE) in one line, said wherever the ratio is shown.
SCOPE_NOTE = "scope: --target.* selects socket and CUDA copies; RDMA, NIC, GPU and UPI bytes are node-wide"


@dataclass(frozen=True)
class Scrape:
    t: float
    samples: dict[Key, float]

    def get(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(lab), v) for (n, lab), v in self.samples.items() if n == name]


class ScrapeError(Exception):
    pass


def parse(text: str, t: float) -> Scrape:
    samples: dict[Key, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except ValueError as e:
        raise ScrapeError(f"not Prometheus text format: {e}") from e
    return Scrape(t, samples)


def fetch(url: str, timeout: float = 2.0) -> Scrape:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        raise ScrapeError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ScrapeError(f"cannot reach {url}: {reason}") from e
    return parse(text, time.monotonic())


@dataclass
class View:
    """What one frame shows, computed from two collections' scrapes."""

    ratio: dict[str, float] = field(default_factory=dict)
    useful: dict[str, float] = field(default_factory=dict)  # direction -> bytes/s
    hops: dict[tuple[str, str], float] = field(default_factory=dict)  # (hop, direction) -> bytes/s
    measured: dict[str, bool] = field(default_factory=dict)
    staging: dict[str, float] = field(default_factory=dict)  # kind -> cores
    gpus: list[tuple[str, float, float]] = field(default_factory=list)  # label, rx, tx bytes/s
    nics: list[tuple[str, float, float]] = field(default_factory=list)
    processes: list[tuple[str, float]] = field(default_factory=list)  # process, bytes/s copied
    sources: dict[str, bool] = field(default_factory=dict)


def _rates(prev: Scrape, cur: Scrape, name: str) -> list[tuple[dict[str, str], float]]:
    dt = cur.t - prev.t
    if dt <= 0:
        return []
    out = []
    for (n, lab), v in cur.samples.items():
        if n != name:
            continue
        before = prev.samples.get((n, lab))
        if before is not None and v >= before:  # a restarted exporter shows as a drop: skip once
            out.append((dict(lab), (v - before) / dt))
    return out


class Frames:
    """Rates between the exporter's last two *collections*, not its last two scrapes. At rest the
    exporter collects every --collect.rest-interval (15 s) and a scrape each second renders the
    same collection: rates between two such scrapes read 0, then the next collection's 15 s of
    bytes over one second of scrape time. A scrape identical to the last one is the same
    collection, so it is not a new frame; rates are over the time between two distinct ones."""

    def __init__(self) -> None:
        self.base: Scrape | None = None
        self.last: Scrape | None = None

    def add(self, cur: Scrape) -> bool:
        """Take a scrape; True when it is a new collection (a new view can be computed)."""
        if self.last is not None and cur.samples == self.last.samples:
            return False
        self.base, self.last = self.last, cur
        return self.base is not None

    def view(self, top_n: int = 5) -> View:
        assert self.base is not None and self.last is not None
        return compute(self.base, self.last, top_n)


def compute(prev: Scrape, cur: Scrape, top_n: int = 5) -> View:
    v = View()
    for lab, x in cur.get(c.TAX_RATIO):
        v.ratio[lab.get("direction", "")] = x
    for lab, x in cur.get(c.HOP_MEASURED):
        v.measured[lab.get("hop", "")] = x == 1.0
    for lab, x in cur.get(c.SOURCE_UP):
        v.sources[lab.get("source", "")] = x == 1.0
    for lab, r in _rates(prev, cur, c.USEFUL_BYTES):
        v.useful[lab.get("direction", "")] = r
    for lab, r in _rates(prev, cur, c.MOVED_BYTES):
        v.hops[(lab.get("hop", ""), lab.get("direction", ""))] = r
    for lab, r in _rates(prev, cur, c.STAGING_CPU_SECONDS):
        v.staging[lab.get("kind", "")] = r
    # `gpu` is the GPU's PCI address on every family (catalog.GPU_ID): one column says it.
    v.gpus = _pairs(prev, cur, c.GPU_PCIE_RECEIVE_BYTES, c.GPU_PCIE_TRANSMIT_BYTES,
                    lambda lab: lab.get("gpu") or lab.get("pci_bus_id") or "?", top_n)
    v.nics = _pairs(prev, cur, c.NIC_RECEIVE_BYTES, c.NIC_TRANSMIT_BYTES,
                    lambda lab: f"{lab.get('nic', '?')} {lab.get('pci_bus_id', '')}", top_n)
    per_proc: dict[str, float] = defaultdict(float)
    for name in (c.SOCKET_COPY_BYTES, c.CUDA_COPY_BYTES):
        for lab, r in _rates(prev, cur, name):
            per_proc[lab.get("process", "?")] += r
    v.processes = sorted(per_proc.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
    return v


def _pairs(prev: Scrape, cur: Scrape, rx_name: str, tx_name: str, label, top_n: int
           ) -> list[tuple[str, float, float]]:
    rx = {label(lab): r for lab, r in _rates(prev, cur, rx_name)}
    tx = {label(lab): r for lab, r in _rates(prev, cur, tx_name)}
    rows = [(k, rx.get(k, 0.0), tx.get(k, 0.0)) for k in sorted(set(rx) | set(tx))]
    return sorted(rows, key=lambda r: (-(r[1] + r[2]), r[0]))[:top_n]


def human_rate(bps: float) -> str:
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:6.2f} {unit}"
    return f"{bps:6.0f} B/s"


def _bar(value: float, full: float, width: int) -> str:
    if width <= 0:
        return ""
    if full <= 0:
        return "." * width
    n = min(width, round(width * value / full))
    return "#" * n + "." * (width - n)


def render(v: View, url: str, width: int = 100, error: str = "") -> list[str]:
    width = max(width, 60)
    # The second line is always there (blank without an error), so rows never shift between frames.
    lines = [f"pcietax top  {url}  {time.strftime('%H:%M:%S')}  (q quits)", f"!! {error}" if error else ""]
    measured = sum(1 for h in HOPS if v.measured.get(h, False))  # a hop not exported is not measured
    ratio = "   ".join(f"{d} {v.ratio[d]:.2f}x" if d in v.ratio else f"{d} -" for d in DIRECTIONS)
    partial = f"   (partial: {measured} of {len(HOPS)} hops measured)" if measured < len(HOPS) else ""
    lines += [f"TAX RATIO   {ratio}{partial}", f"  {SCOPE_NOTE}"]
    bar_w = max(10, width - 44)
    for d in DIRECTIONS:
        scale = max([v.useful.get(d, 0.0)] + [v.hops.get((h, d), 0.0) for h in HOPS])
        lines.append(f"HOPS {d:<8} {'':<{bar_w}} bytes/s")
        for h in HOPS:
            if not v.measured.get(h, False):
                lines.append(f"  {h:<12} {'not measured':<{bar_w}}")
                continue
            r = v.hops.get((h, d), 0.0)
            lines.append(f"  {h:<12} {_bar(r, scale, bar_w)} {human_rate(r)}")
        if d in v.useful:
            u = v.useful[d]
            lines.append(f"  {'useful':<12} {_bar(u, scale, bar_w)} {human_rate(u)}")
        else:
            lines.append(f"  {'useful':<12} {'not measured':<{bar_w}}")
    staging = "  ".join(f"{k} {x:.2f}" for k, x in sorted(v.staging.items())) or "-"
    lines += ["", f"STAGING CPU (cores)  {staging}"]
    lines += _table("GPUS (PCIe)", v.gpus)
    lines += _table("NICS", v.nics)
    lines.append("PROCESSES (socket + CUDA copies)")
    lines += [f"  {p:<30} {human_rate(r)}" for p, r in v.processes] or ["  -"]
    src = "  ".join(f"{s} {'up' if up else 'DOWN'}" for s, up in sorted(v.sources.items())) or "-"
    lines += ["", f"SOURCES  {src}"]
    return [ln[:width] for ln in lines]


def _table(title: str, rows: Iterable[tuple[str, float, float]]) -> list[str]:
    out = [f"{title:<32} {'rx':>13} {'tx':>13}"]
    out += [f"  {name:<30} {human_rate(rx):>13} {human_rate(tx):>13}" for name, rx, tx in rows] or ["  -"]
    return out


class LocalSources:
    """``--direct``: read the sources in this process instead of scraping an exporter, through the
    same engine and Prometheus rendering as ``pcietax serve``, parsed back like a scrape. The eBPF
    tracer is left to ``pcietax serve``: a viewer should not attach probes to the whole node."""

    def __init__(self, sysfs: str, procfs: str, collect_interval: float = 0.5) -> None:
        from prometheus_client import CollectorRegistry

        from .engine import Engine
        from .model import TaxModel
        from .sinks.prometheus import PcietaxCollector
        from .sources import SOURCES, SourceOptions

        opts = SourceOptions(sysfs=sysfs, procfs=procfs)
        enabled = [s for s in SOURCES if s.name != "ebpf"]
        self._engine = Engine([s.build(opts) for s in enabled], TaxModel(10.0))
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(PcietaxCollector(self._engine.frame, [s.name for s in enabled]))
        self._engine.start_sources()
        self._engine.run_in_background(collect_interval)

    def fetch(self) -> Scrape:
        from prometheus_client import generate_latest

        return parse(generate_latest(self._registry).decode(), time.monotonic())

    def close(self) -> None:
        self._engine.close()


class Remote:
    def __init__(self, url: str) -> None:
        self.url = url

    def fetch(self) -> Scrape:
        return fetch(self.url)

    def close(self) -> None:
        pass


# -- command line -------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="live terminal view of the tax, hops, GPUs, NICs and processes")
    p.add_argument("--url", default="http://127.0.0.1:9817/metrics",
                   help="the exporter's metrics URL (default http://127.0.0.1:9817/metrics)")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds (default 1)")
    p.add_argument("--top", type=int, default=5, help="rows per GPU/NIC/process table (default 5)")
    p.add_argument("--once", action="store_true", help="print one frame as plain text and exit")
    p.add_argument("--direct", action="store_true",
                   help="read the host sources in this process instead of scraping an exporter "
                        "(no eBPF: that tracer runs in pcietax serve)")
    p.add_argument("--path.sysfs", dest="sysfs", default="/sys", help="sysfs mount point (--direct)")
    p.add_argument("--path.procfs", dest="procfs", default="/proc", help="procfs mount point (--direct)")


def run(args: argparse.Namespace) -> int:
    if not args.direct and not args.url.startswith(("http://", "https://")):
        print(f"pcietax top: --url {args.url!r} must start with http:// or https://", file=sys.stderr)
        return 2
    if not 0.1 <= args.interval <= 3600:
        print("pcietax top: --interval must be between 0.1 and 3600 seconds", file=sys.stderr)
        return 2
    if args.top < 1:
        print("pcietax top: --top must be at least 1", file=sys.stderr)
        return 2
    src: LocalSources | Remote = (LocalSources(args.sysfs, args.procfs) if args.direct
                                  else Remote(args.url))
    where = f"sources under {args.sysfs} and {args.procfs}" if args.direct else args.url
    try:
        if args.once:
            frames = Frames()
            # Two distinct collections: at rest the exporter's next one is up to its
            # --collect.rest-interval away (15 s), so wait up to a little more than that.
            deadline = time.monotonic() + max(ONCE_WAIT, 2 * args.interval)
            try:
                frames.add(src.fetch())
                while True:
                    time.sleep(args.interval)
                    if frames.add(src.fetch()) or time.monotonic() >= deadline:
                        break
            except ScrapeError as e:
                print(f"pcietax top: {e}", file=sys.stderr)
                return 1
            if frames.base is not None:
                view = frames.view(args.top)
            else:  # nothing changed at all: rates are zero over the wait
                assert frames.last is not None
                view = compute(frames.last, Scrape(time.monotonic(), frames.last.samples), args.top)
            print("\n".join(render(view, where)))
            return 0
        import contextlib
        import curses

        # Size from the terminal itself, never from LINES/COLUMNS a shell exported once: a stale
        # value would cut the view short and ignore resizes.
        curses.use_env(False)
        with contextlib.suppress(KeyboardInterrupt):
            curses.wrapper(_loop, args, src, where)
        return 0
    finally:
        src.close()


def _fit(scr) -> tuple[int, int]:  # pragma: no cover - exercised through tmux
    """Follow the terminal's real size (ioctl): a resize that came before curses installed its
    SIGWINCH handler, or one it missed, would otherwise leave the view cut to the old size."""
    import curses
    import os

    h, w = scr.getmaxyx()
    try:
        size = os.get_terminal_size(sys.__stdout__.fileno())
    except (OSError, AttributeError, ValueError):
        return h, w
    if (size.lines, size.columns) != (h, w):
        curses.resizeterm(size.lines, size.columns)
        scr.clear()  # repaint everything: what curses remembers of the old size is stale
        h, w = scr.getmaxyx()
    return h, w


def _loop(scr, args: argparse.Namespace, src: LocalSources | Remote,
          where: str) -> None:  # pragma: no cover - exercised through tmux
    import curses

    curses.curs_set(0)
    scr.timeout(100)
    frames = Frames()
    view, error = View(), "waiting for the first two collections"
    next_at = 0.0
    while True:
        now = time.monotonic()
        if now >= next_at:
            next_at = now + args.interval
            try:
                if frames.add(src.fetch()):
                    view, error = frames.view(args.top), ""
            except ScrapeError as e:
                error = str(e)
            h, w = _fit(scr)
            scr.erase()
            for y, line in enumerate(render(view, where, w - 1, error)[: h]):
                scr.addnstr(y, 0, line, w - 1)
            scr.refresh()
        if scr.getch() in (ord("q"), ord("Q")):
            return
