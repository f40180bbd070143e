"""Rewrite the README's generated metrics reference from the catalog (run after adding a family)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "exporter"))

from pcietax.catalog import markdown_reference  # noqa: E402

BEGIN, END = "<!-- metrics:begin -->", "<!-- metrics:end -->"


def render(readme: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown_reference()}{END}{tail}"


if __name__ == "__main__":
    path = REPO / "README.md"
    path.write_text(render(path.read_text()))
