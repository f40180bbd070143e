"""The one parser of ``/proc/PID/maps``.

Four places need a process's mappings: CUDA library discovery (which files a target maps), the
memcpy ifunc resolution (which file and load base an address is in), the post-compile page-out of
the compiler's libraries, and the trap calibration (where this process's libc is). They share this
module so a hostile maps file (a path that is not UTF-8, a 400-digit field, a truncated line) is
handled once: read as bytes, capped, malformed lines skipped, paths kept with surrogateescape so
they still name the same file when used as a path again.

Line format (fs/proc/task_mmu.c, show_map_vma): ``start-end perms offset dev inode   path``; the
path column is absent for anonymous mappings and may contain spaces.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_MAPS_BYTES = 64 << 20  # a huge process's maps is a few MB; never read more
DELETED = b" (deleted)"


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    perms: bytes
    offset: int
    path: bytes  # b"" for an anonymous mapping; b"[heap]" and the like for special ones

    @property
    def is_file(self) -> bool:
        return self.path.startswith(b"/")

    @property
    def deleted(self) -> bool:
        return self.path.endswith(DELETED)

    @property
    def fspath(self) -> str:
        """The path as str, surrogateescape-decoded (round-trips to the same bytes)."""
        return os.fsdecode(self.path)


def read_maps(path: str | os.PathLike[str], limit: int = MAX_MAPS_BYTES) -> bytes:
    """The raw text of a maps file, at most ``limit`` bytes. Raises OSError (process gone, no
    permission) for the caller to decide."""
    with open(path, "rb") as f:
        return f.read(limit)


def parse_maps(text: bytes) -> Iterator[Mapping]:
    """Every well-formed line of a maps file; a malformed one is skipped, never raised."""
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, sep, hi = parts[0].partition(b"-")
        try:
            # int() of a hostile 400-digit field is fine in Python; bounded by the line length.
            start, end, offset = int(lo, 16), int(hi, 16), int(parts[2], 16)
        except ValueError:
            continue
        if not sep or end < start:
            continue
        yield Mapping(start, end, parts[1], offset, parts[5].rstrip(b"\n") if len(parts) == 6 else b"")


def process_maps(procfs: str | os.PathLike[str], pid: int | str) -> list[Mapping]:
    """The mappings of ``pid`` under ``procfs``; [] when the process is gone or unreadable."""
    try:
        return list(parse_maps(read_maps(Path(procfs) / str(pid) / "maps")))
    except OSError:
        return []


def mapped_files(mappings: Iterable[Mapping]) -> list[str]:
    """Distinct file paths, first-seen order, deleted files left out (they cannot be probed)."""
    seen: dict[str, None] = {}
    for m in mappings:
        if m.is_file and not m.deleted:
            seen[m.fspath] = None
    return list(seen)


def module_of(addr: int, mappings: Iterable[Mapping]) -> tuple[str, int] | None:
    """(file path, load base) of the file mapping ``addr``: the base is the start of that file's
    offset-0 mapping. None when ``addr`` is not in a mapped file or the file has no offset-0
    mapping."""
    rows = [m for m in mappings if m.is_file]
    for m in rows:
        if m.start <= addr < m.end:
            bases = [r.start for r in rows if r.path == m.path and r.offset == 0]
            return (m.fspath, min(bases)) if bases else None
    return None
