"""Writes alerts/pcietax.rules.yml and its PrometheusRule twin deploy/kubernetes/prometheusrule.yaml
from alerts/rules.py: ``python -m alerts.generate`` (``--check`` exits 1 when a committed file
differs from what the generator writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .rules import RuleConfig, render, render_prometheusrule

OUT = Path(__file__).resolve().parent / "pcietax.rules.yml"
K8S_OUT = Path(__file__).resolve().parent.parent / "deploy/kubernetes/prometheusrule.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alerts.generate", description=__doc__)
    p.add_argument("--check", action="store_true", help="only compare with the committed file")
    p.add_argument("--node-label", default="node", help="label joining exporter and inference servers")
    p.add_argument("--keep-labels", default="cluster",
                   help="comma-separated labels kept beside the node label in every grouping "
                        "(default: cluster; '' for none)")
    p.add_argument("--out", type=Path, default=OUT, help="rules file (Prometheus rule_files format)")
    p.add_argument("--k8s-out", type=Path, default=K8S_OUT, help="PrometheusRule manifest")
    args = p.parse_args(argv)
    try:
        cfg = RuleConfig(node_label=args.node_label,
                         keep_labels=tuple(x.strip() for x in args.keep_labels.split(",") if x.strip()))
    except ValueError as e:
        p.error(str(e))
    files = {args.out: render(cfg), args.k8s_out: render_prometheusrule(cfg)}
    stale = 0
    for path, text in files.items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                print(f"{path} is stale: run python -m alerts.generate", file=sys.stderr)
                stale = 1
        else:
            path.write_text(text)
            print(f"wrote {path}")
    return stale


if __name__ == "__main__":
    sys.exit(main())
