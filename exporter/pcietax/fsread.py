"""Small, strict readers for procfs/sysfs text. They raise ``ValueError``/``OSError`` with the path;
sources turn those into faults so one bad file never takes a source down."""

from __future__ import annotations

import os
from pathlib import Path


def read_text(path: str | os.PathLike[str]) -> str:
    with open(path, encoding="ascii", errors="strict") as f:
        return f.read()


def read_str(path: str | os.PathLike[str]) -> str:
    return read_text(path).strip()


def read_int(path: str | os.PathLike[str], base: int = 10) -> int:
    text = read_str(path)
    try:
        return int(text, base)
    except ValueError:
        raise ValueError(f"not an integer: {text[:40]!r} in {path}") from None


def read_optional_str(path: str | os.PathLike[str]) -> str | None:
    try:
        return read_str(path)
    except (OSError, UnicodeDecodeError):
        return None


def link_name(path: str | os.PathLike[str]) -> str | None:
    """Basename of a symlink's target (``driver``, ``iommu_group``), or None."""
    try:
        return Path(os.readlink(path)).name
    except OSError:
        return None
