"""``pcietax topo``: the PCIe tree, GPU–NIC path classes, ACS, IOMMU, BAR sizes and the GPUDirect
verdict of each pair, as a matrix like ``nvidia-smi topo -m`` or as JSON."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topo", help="GPU-NIC PCIe paths, ACS, IOMMU and GPUDirect verdicts")
    p.add_argument("--path.sysfs", dest="sysfs", default="/sys", help="sysfs mount point")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")


def run(args: argparse.Namespace) -> int:
    from .topology import TopologyUnavailable, discover
    from .topology.render import render_text, to_json

    try:
        topo = discover(args.sysfs)
    except TopologyUnavailable as e:
        print(f"pcietax topo: {e}; point --path.sysfs at a sysfs mount", file=sys.stderr)
        return 2
    if args.format == "json":
        json.dump(to_json(topo), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(topo))
    return 0
