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

from ..procmaps import module_of, parse_maps, read_maps


class IfuncError(RuntimeError):
    pass


def resolved_memcpy(maps: str = "/proc/self/maps") -> tuple[str, int]:
    """(libc file path, ELF virtual address of the memcpy implementation) as resolved in this process."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(name)
    addr = ctypes.cast(libc.memcpy, ctypes.c_void_p).value
    if not addr:
        raise IfuncError("dlsym(memcpy) returned NULL")
    path, base = _module_of(addr, read_maps(maps))
    return path, addr - base


def _module_of(addr: int, maps_text: bytes) -> tuple[str, int]:
    """The file mapping ``addr`` and its load base (start of its offset-0 mapping)."""
    found = module_of(addr, parse_maps(maps_text))
    if found is None:
        raise IfuncError(f"address {addr:#x} is not in a mapped file with an offset-0 mapping")
    return found
