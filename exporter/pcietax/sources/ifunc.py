"""Find the memcpy implementation that glibc's IFUNC resolver really picks on this machine.

glibc exports ``memcpy`` as an STT_GNU_IFUNC symbol: its address is a *resolver* that the dynamic
linker runs once per process to choose an implementation for this CPU (``__memmove_avx_unaligned_erms``,
``__memmove_evex_unaligned_erms``, ...). A uprobe on the symbol address would fire once per process
(in the resolver), never on a copy. ``dlsym`` runs the resolver and returns the chosen
implementation, so resolving ``memcpy`` in this process gives its address here; minus the load base
of libc, that is the implementation's offset in the libc file. Every process using the *same libc
file* on the same CPU picks the same implementation (the choice depends on CPU features and
GLIBC_TUNABLES only), so a probe at that offset in that file sees their memcpy calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path


class IfuncError(RuntimeError):
    pass


def resolved_memcpy(maps: str = "/proc/self/maps") -> tuple[str, int]:
    """(libc file path, ELF virtual address of the memcpy implementation) as resolved in this process."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(name)
    addr = ctypes.cast(libc.memcpy, ctypes.c_void_p).value
    if not addr:
        raise IfuncError("dlsym(memcpy) returned NULL")
    path, base = _module_of(addr, Path(maps).read_bytes().decode("utf-8", errors="surrogateescape"))
    return path, addr - base


def _module_of(addr: int, maps_text: str) -> tuple[str, int]:
    """The file mapping ``addr`` and its load base (start of its offset-0 mapping)."""
    rows = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        rows.append((lo, hi, int(parts[2], 16), parts[5]))
    for lo, hi, _off, path in rows:
        if lo <= addr < hi:
            bases = [r[0] for r in rows if r[3] == path and r[2] == 0]
            if not bases:
                raise IfuncError(f"no offset-0 mapping of {path}")
            return path, min(bases)
    raise IfuncError(f"address {addr:#x} is not in a mapped file")
