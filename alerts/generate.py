"""Writes alerts/pcietax.rules.yml from alerts/rules.py: ``python -m alerts.generate``
(``--check`` exits 1 when the committed file differs from what the generator writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .rules import RuleConfig, render

OUT = Path(__file__).resolve().parent / "pcietax.rules.yml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alerts.generate", description=__doc__)
    p.add_argument("--check", action="store_true", help="only compare with the committed file")
    p.add_argument("--node-label", default="node", help="label joining exporter and inference servers")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    text = render(RuleConfig(node_label=args.node_label))
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m alerts.generate", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
