"""argparse types shared by the subcommands: Prometheus-style durations and byte sizes. Each raises
ArgumentTypeError with an example, so a bad flag fails at start naming the fix."""

from __future__ import annotations

import argparse
import re

_SIZE_UNITS = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30,
               "t": 1 << 40, "ti": 1 << 40}


def duration(text: str) -> float:
    """10s, 500ms, 1m, 1h, or plain seconds; must be positive."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10s, 500ms, 1m)")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def size_or_zero(text: str) -> int:
    """4096, 512KiB, 64MiB, 1M, 2GiB (binary units; a trailing B is optional)."""
    t = text.strip().lower().removesuffix("b")
    num = t.rstrip("kmgti")
    try:
        value = int(float(num) * _SIZE_UNITS[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64MiB, 1M, 4096)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def size(text: str) -> int:
    """A byte size that must be positive."""
    value = size_or_zero(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value
