"""PMU discovery from sysfs: ``<sysfs>/bus/event_source/devices/<pmu>/{type,cpumask,format/*,events/*}``.

The kernel describes every PMU there: its dynamic ``type`` number, the CPUs to open it on
(``cpumask``: one CPU per socket or die for uncore PMUs), how event terms map onto the config words
(``format/umask`` = ``config:8-15,32-55``), named events (``events/bw_in_port0`` =
``event=0xff,umask=0x20``) and their ``.scale`` and ``.unit``. All of these have changed between
kernels (umask widened on Sapphire Rapids, IIO bandwidth scales corrected in 6.15), so they are read,
never hard-coded. Pure parsing plus small file reads; raises ``PmuError`` with the path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .fsread import read_str
from .perf import EventAttr

CONFIG_WORDS = ("config", "config1", "config2", "config3")
_FORMAT = re.compile(r"^(config[123]?):(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")
_TERM = re.compile(r"^[a-z_][a-z0-9_]*$")

# The units the kernel uses for byte-counting events, as multipliers to bytes.
BYTE_UNITS = {"B": 1, "Bytes": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
              "KB": 1000, "MB": 1000**2, "GB": 1000**3}


class PmuError(ValueError):
    """A PMU's sysfs description is missing or malformed."""


@dataclass(frozen=True)
class FormatField:
    """One ``format/<term>`` file: which config word, and which bit positions (lowest value bit first)."""

    term: str
    word: str
    bits: tuple[int, ...]

    def place(self, value: int) -> int:
        """Scatter ``value``'s bits over this field's positions (perf's pmu_format_value)."""
        if value < 0 or value >> len(self.bits):
            raise PmuError(f"{self.term}={value:#x} does not fit in {len(self.bits)} bits "
                           f"({self.word}:{_ranges(self.bits)})")
        out = 0
        for i, pos in enumerate(self.bits):
            if value >> i & 1:
                out |= 1 << pos
        return out


def parse_format(term: str, text: str) -> FormatField:
    """``config:0-7``, ``config:0-7,21``, ``config1:0-15``, ``config:8-15,32-55``."""
    m = _FORMAT.match(text.strip())
    if not m:
        raise PmuError(f"format/{term}: {text.strip()[:60]!r} is not <config word>:<bit ranges>")
    bits: set[int] = set()
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if a > b or b > 63:
            raise PmuError(f"format/{term}: bad bit range {part!r}")
        bits.update(range(a, b + 1))
    return FormatField(term, m.group(1), tuple(sorted(bits)))


def parse_terms(text: str) -> dict[str, int]:
    """``event=0x02,umask=0x0f`` -> {"event": 2, "umask": 15}; a bare term (``edge``) means 1."""
    out: dict[str, int] = {}
    for raw in text.strip().split(","):
        name, eq, value = raw.strip().partition("=")
        if not _TERM.match(name):
            raise PmuError(f"bad event term {raw!r} in {text.strip()[:80]!r}")
        try:
            out[name] = int(value, 0) if eq else 1
        except ValueError:
            raise PmuError(f"bad value in event term {raw!r}") from None
    return out


def encode(formats: Mapping[str, FormatField], terms: Mapping[str, int], pmu: str = "pmu") -> dict[str, int]:
    """Event terms -> config words, through the PMU's own format/ description."""
    words = dict.fromkeys(CONFIG_WORDS, 0)
    for name, value in terms.items():
        f = formats.get(name)
        if f is None:
            raise PmuError(f"{pmu}: term {name!r} is not in its format/ ({', '.join(sorted(formats))})")
        words[f.word] |= f.place(value)
    return words


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``0,56`` or ``0-3,8`` (the list form the kernel prints for cpumask attributes)."""
    out: list[int] = []
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise PmuError(f"bad cpu list {text[:60]!r}") from None
        out.extend(range(a, b + 1))
    return tuple(out)


@dataclass
class Pmu:
    name: str
    path: Path
    type: int
    cpus: tuple[int, ...]
    formats: dict[str, FormatField]
    events: dict[str, str] = field(default_factory=dict)  # alias -> "event=..,umask=.."
    scales: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    @property
    def index(self) -> int | None:
        """The box number in ``uncore_upi_3`` / ``uncore_iio_free_running_5``."""
        m = re.search(r"_(\d+)$", self.name)
        return int(m.group(1)) if m else None

    def attr(self, terms: str | Mapping[str, int]) -> EventAttr:
        t = parse_terms(terms) if isinstance(terms, str) else terms
        w = encode(self.formats, t, self.name)
        return EventAttr(self.type, w["config"], w["config1"], w["config2"], w["config3"])

    def event_attr(self, alias: str) -> EventAttr:
        try:
            return self.attr(self.events[alias])
        except KeyError:
            raise PmuError(f"{self.name}: no event {alias!r} in events/") from None

    def bytes_per_count(self, alias: str) -> float | None:
        """``.scale`` x ``.unit`` in bytes; None when the kernel gives no scale or a non-byte unit."""
        scale = self.scales.get(alias)
        mult = BYTE_UNITS.get(self.units.get(alias, "B"))
        if scale is None or mult is None:
            return None
        return scale * mult


def devices_dir(sysfs: str | os.PathLike[str]) -> Path:
    return Path(sysfs) / "bus/event_source/devices"


def list_pmus(sysfs: str | os.PathLike[str], prefix: str) -> list[str]:
    """PMU names that start with ``prefix``, in box order (``_2`` before ``_10``). No
    ``event_source/devices`` directory (a kernel without perf events) lists none; any other error
    raises ``PmuError``: an unreadable directory does not prove the PMUs absent."""
    try:
        names = [n for n in os.listdir(devices_dir(sysfs)) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise PmuError(f"{devices_dir(sysfs)}: {e.strerror or e}") from None

    def key(n: str) -> tuple[str, int]:
        m = re.search(r"(\d+)$", n)
        return (n[: m.start()] if m else n, int(m.group(1)) if m else -1)

    return sorted(names, key=key)


def read_pmu(sysfs: str | os.PathLike[str], name: str) -> Pmu:
    path = devices_dir(sysfs) / name
    try:
        pmu_type = int(read_str(path / "type"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PmuError(f"{path}/type: {e}") from None
    try:
        cpus = parse_cpulist(read_str(path / "cpumask"))
    except FileNotFoundError:
        cpus = ()  # core/software PMUs have no cpumask: any CPU
    except (OSError, UnicodeDecodeError) as e:
        raise PmuError(f"{path}/cpumask: {e}") from None
    formats: dict[str, FormatField] = {}
    for term, text in _read_dir(path / "format").items():
        formats[term] = parse_format(term, text)
    pmu = Pmu(name, path, pmu_type, cpus, formats)
    for fname, text in _read_dir(path / "events").items():
        alias, _, suffix = fname.partition(".")
        if suffix == "scale":
            try:
                pmu.scales[alias] = float(text)
            except ValueError:
                raise PmuError(f"{path}/events/{fname}: {text[:40]!r} is not a number") from None
        elif suffix == "unit":
            pmu.units[alias] = text.strip()
        elif not suffix:
            pmu.events[alias] = text.strip()
        # .per-pkg, .snapshot: not needed for counting bytes
    return pmu


def _read_dir(d: Path) -> dict[str, str]:
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise PmuError(f"{d}: {e}") from None
    out: dict[str, str] = {}
    for n in names:
        try:
            out[n] = read_str(d / n)
        except (OSError, UnicodeDecodeError) as e:
            raise PmuError(f"{d / n}: {e}") from None
    return out


def _ranges(bits: tuple[int, ...]) -> str:
    parts: list[str] = []
    start = prev = bits[0] if bits else 0
    for b in bits[1:]:
        if b != prev + 1:
            parts.append(f"{start}-{prev}" if start != prev else str(start))
            start = b
        prev = b
    if bits:
        parts.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(parts)
