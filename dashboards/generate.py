"""Writes the dashboards' JSON beside this file: ``python -m dashboards.generate``
(``--check`` exits 1 when a committed file differs from what the generator writes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from .pcietax import DASHBOARDS

OUT = Path(__file__).resolve().parent


def render() -> dict[str, str]:
    enc = JSONEncoder(sort_keys=True, indent=2)
    return {name: enc.encode(build().build()) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__)
    p.add_argument("--check", action="store_true", help="only compare with the committed files")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale dashboards: {', '.join(stale)}; run python -m dashboards.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
