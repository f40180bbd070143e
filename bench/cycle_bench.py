#!/usr/bin/env python3
"""Cost of one background collection cycle of the host sources (netdev, rdma, procfs, pcie,
topology), before and after a change, measured side by side in one run on the same fixture node
(tests/helpers/gpunode.py: 8 GPUs behind 8 switches, 9 NICs, 1,000 /proc/interrupts lines on 64
CPUs by default). Issue 13 item 14.

"before" is the package as it is at a git ref (default: the merge base with main), exported with
``git archive``; "after" is this tree. Each runs in its own process; the two alternate in chunks
so both see the same machine state. Per cycle it reports:
  cycle_ms     Engine.collect() wall time (all host sources, absorption, model)
  opens        files opened per cycle (builtins/io.open and os.open, counted in-process)
  irq_ms       the eBPF source's per-cycle IRQ work as it stood at the ref: IRQ names from
               /proc/interrupts and the NIC IRQ lines of every NIC. "before": a second read and
               parse plus every NIC tag against every word of every name (sources/ebpf.py);
               "after": the same cycle's shared parse (procfs.read_interrupts) and a lookup
               (IrqLines.irqs_tagged). The eBPF source itself switches to these separately.

    .venv/bin/python bench/cycle_bench.py [--ref REF] [--cpus 64] [--irq-lines 1000] [--rounds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST_SOURCES = ("netdev", "rdma", "procfs", "pcie", "topology")


@contextmanager
def watching_files(seen: Callable[[str, object], None], kinds: str = "fdl") -> Iterator[None]:
    """Call ``seen(kind, path)`` for every file opened ("f": builtins/io.open, os.open), directory
    listed ("d": os.listdir, os.scandir) and symlink read ("l": os.readlink), in every thread;
    only the ``kinds`` asked for are wrapped."""
    import builtins
    import io

    real = {"open": builtins.open, "os_open": os.open, "listdir": os.listdir, "scandir": os.scandir,
            "readlink": os.readlink}

    def watch(kind: str, fn: Callable) -> Callable:
        def wrapped(path=".", *a, **k):
            seen(kind, path)
            return fn(path, *a, **k)
        return wrapped

    if "f" in kinds:
        builtins.open = io.open = watch("f", real["open"])
        os.open = watch("f", real["os_open"])
    if "d" in kinds:
        os.listdir, os.scandir = watch("d", real["listdir"]), watch("d", real["scandir"])
    if "l" in kinds:
        os.readlink = watch("l", real["readlink"])
    try:
        yield
    finally:
        builtins.open = io.open = real["open"]
        os.open, os.listdir, os.scandir, os.readlink = (real["os_open"], real["listdir"], real["scandir"],
                                                         real["readlink"])


def host_engine(root: str):
    """An Engine of the host sources on the fixture node at ``root``, started (the pcietax on
    sys.path: this tree, or the ref's export in a child)."""
    from pcietax.engine import Engine
    from pcietax.model import TaxModel
    from pcietax.sources import SourceOptions, by_name

    opts = SourceOptions(sysfs=f"{root}/sys", procfs=f"{root}/proc")
    eng = Engine([by_name()[n].build(opts) for n in HOST_SOURCES], TaxModel())
    eng.start_sources()
    return eng


def _child(pkg: str, root: str, rounds: int, warmup: int) -> None:
    """Runs in a fresh interpreter with ``pkg`` first on sys.path."""
    sys.path[:0] = [pkg]
    import pcietax
    from pcietax.sources import procfs as procfs_mod

    assert pcietax.__file__.startswith(pkg), pcietax.__file__
    opens = [0]

    def count(kind: str, path: object) -> None:
        opens[0] += 1

    watch = watching_files(count, kinds="f")
    watch.__enter__()  # for the whole child: both sides pay the same wrappers
    eng = host_engine(root)
    nic_tags = _nic_tags(f"{root}/sys")
    shared = hasattr(procfs_mod, "read_interrupts")

    def irq_work() -> int:
        where = f"{root}/proc/interrupts"
        if shared:
            lines = procfs_mod.read_interrupts(f"{root}/proc")
            return len(lines.irqs_tagged(nic_tags)) + len(lines.names())
        from pcietax.sources.base import Snapshot

        tmp = Snapshot()
        procfs_mod.parse_interrupts(Path(where).read_text(), tmp, where)
        names = {dict(s.labels)["irq"]: dict(s.labels)["name"] for s in tmp.counters}
        out = {irq for irq, name in names.items()
               if any(part == t or part.startswith(t + "-") for part in name.split() for t in nic_tags)}
        return len(out) + len(names)

    cycle, irq, nopen = [], [], []
    for i in range(warmup + rounds):
        opens[0] = 0
        t0 = time.perf_counter()
        frame = eng.collect()
        t1 = time.perf_counter()
        irq_work()
        t2 = time.perf_counter()
        if i >= warmup:
            cycle.append(t1 - t0)
            irq.append(t2 - t1)
            nopen.append(opens[0])
    up = sorted(n for n, st in frame.status.items() if st.up)
    eng.close()
    print(json.dumps({"cycle": cycle, "irq": irq, "opens": nopen, "up": up,
                      "series": len(frame.counters) + len(frame.gauges)}))


def _nic_tags(sysfs: str) -> set[str]:
    net = Path(sysfs) / "class/net"
    tags = set()
    for e in os.scandir(net):
        if (net / e.name / "device").exists():
            tags.add(e.name)
            tags.add((net / e.name / "device").resolve().name)
    return tags


def _export(ref: str, dest: Path) -> Path:
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "exporter"], check=True,
                          capture_output=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / "src.tar"
    tar.write_bytes(data)
    with tarfile.open(tar) as t:
        t.extractall(dest)  # our own repository's archive
    return dest / "exporter"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default=None, help="git ref of 'before' (default: merge base with main)")
    ap.add_argument("--cpus", type=int, default=64)
    ap.add_argument("--irq-lines", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("PKG", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.rounds, warmup=5)
        return 0
    ref = args.ref or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True,
                                     capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="pcietax-cycle-"))
    try:
        sys.path[:0] = [str(REPO / "tests")]
        from helpers.gpunode import gpu_node

        gpu_node(tmp / "node", ncpu=args.cpus, irq_lines=args.irq_lines)
        pkgs = {"before": str(_export(ref, tmp / "before")), "after": str(REPO / "exporter")}
        got: dict[str, dict[str, list]] = {k: {"cycle": [], "irq": [], "opens": []} for k in pkgs}
        up = {}
        per_chunk = max(1, args.rounds // args.chunks)
        for c in range(args.chunks):
            for name in (("before", "after") if c % 2 == 0 else ("after", "before")):
                out = subprocess.run(
                    [sys.executable, __file__, "--rounds", str(per_chunk), "--child", pkgs[name],
                     str(tmp / "node")], check=True, capture_output=True, text=True,
                    env={**os.environ, "PYTHONPATH": ""}).stdout
                r = json.loads(out)
                for k in ("cycle", "irq", "opens"):
                    got[name][k] += r[k]
                up[name] = r["up"]
        res = {"ref": ref, "cpus": args.cpus, "irq_lines": args.irq_lines, "up": up}
        for name, r in got.items():
            res[name] = {"cycle_ms_p50": statistics.median(r["cycle"]) * 1e3,
                         "irq_ms_p50": statistics.median(r["irq"]) * 1e3,
                         "opens_per_cycle": statistics.median(r["opens"])}
        b, a = res["before"], res["after"]
        res["ratio_cycle"] = a["cycle_ms_p50"] / b["cycle_ms_p50"]
        res["ratio_cycle_plus_irq"] = ((a["cycle_ms_p50"] + a["irq_ms_p50"])
                                       / (b["cycle_ms_p50"] + b["irq_ms_p50"]))
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"host-source cycle on {args.cpus} CPUs x {args.irq_lines} IRQ lines, before={ref[:10]}")
            for name in ("before", "after"):
                r = res[name]
                print(f"  {name:<7} cycle {r['cycle_ms_p50']:7.2f} ms   "
                      f"eBPF IRQ work {r['irq_ms_p50']:6.2f} ms"
                      f"   opens/cycle {r['opens_per_cycle']:5.0f}   up={','.join(up[name])}")
            print(f"  after/before: cycle {res['ratio_cycle']:.2f}, cycle + IRQ work "
                  f"{res['ratio_cycle_plus_irq']:.2f}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
