"""argparse types shared by the subcommands: Prometheus-style durations and byte sizes. Each raises
ArgumentTypeError with an example, so a bad flag fails at start (exit 2) naming the fix. Values
come from users and scripts: infinities, NaN and 400-digit numbers are refused, not passed on to a
``threading.Event.wait`` or an ``int()`` that raises far from the flag."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

_SIZE_UNITS = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30,
               "t": 1 << 40, "ti": 1 << 40}
# Below threading.TIMEOUT_MAX (~292 years on Linux) with room to spare: any wait on it works.
MAX_DURATION = 10 * 365 * 86400.0
MAX_SIZE = 1 << 60  # 1 EiB: no byte count a flag means is larger
_DURATION = re.compile(r"([0-9]{1,30}(?:\.[0-9]{1,30})?)(ms|s|m|h)?")


def _human(seconds: float) -> str:
    for unit, n in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds * 1000:g}ms"


def duration(text: str) -> float:
    """10s, 500ms, 1m, 1h, or plain seconds; must be positive and at most ten years."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10s, 500ms, 1m)")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    if not math.isfinite(value) or value > MAX_DURATION:
        raise argparse.ArgumentTypeError(f"{text!r} is too long (at most {_human(MAX_DURATION)})")
    return value


def duration_between(lo: float, hi: float) -> Callable[[str], float]:
    """A duration type bounded to [lo, hi] seconds, for flags where a value outside is a mistake
    (a collection interval of years serves the first cycle forever)."""

    def parse(text: str) -> float:
        value = duration(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"{text!r} is out of range: give {_human(lo)} to {_human(hi)}")
        return value

    parse.__name__ = "duration"  # argparse names the type in its messages
    return parse


def off_or(parse: Callable[[str], float]) -> Callable[[str], float]:
    """``parse``, or 0 for "0" / "off": a flag whose feature can be turned off."""

    def parse_or_off(text: str) -> float:
        return 0.0 if text.strip().lower() in ("0", "off") else parse(text)

    parse_or_off.__name__ = parse.__name__
    return parse_or_off


def size_or_zero(text: str) -> int:
    """4096, 512KiB, 64MiB, 1M, 2GiB (binary units; a trailing B is optional)."""
    t = text.strip().lower().removesuffix("b")
    num = t.rstrip("kmgti")
    unit = _SIZE_UNITS.get(t[len(num):])
    # Digits and one point only: float() alone would take "inf", "nan", "1e400" and "1_000".
    if unit is None or not re.fullmatch(r"[0-9]{1,30}(?:\.[0-9]{1,30})?", num):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64MiB, 1M, 4096)")
    value = float(num) * unit
    if not math.isfinite(value) or value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is too large (at most 1EiB)")
    return int(value)


def size(text: str) -> int:
    """A byte size that must be positive."""
    value = size_or_zero(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value
