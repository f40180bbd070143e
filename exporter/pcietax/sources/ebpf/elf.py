"""The few ELF facts the uprobes need, read without BCC's private helpers: a shared library's
function symbols, their file offsets (what a uprobe attaches at), and the first instruction bytes
there (which decide whether the kernel emulates the probed instruction or single-steps it)."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass


class ElfError(ValueError):
    pass


@dataclass(frozen=True)
class Function:
    name: str
    offset: int  # file offset of the first instruction
    site: str  # "push" (emulated by the kernel) or "step" (single-stepped)


def site_kind(code: bytes) -> str:
    """x86-64 uprobes emulate a push of a general register (0x50-0x57, or REX.B 0x41 + that);
    every other first instruction (mov, endbr64, sub ...) is single-stepped out of line."""
    if code[:1] and 0x50 <= code[0] <= 0x57:
        return "push"
    if len(code) >= 2 and code[0] == 0x41 and 0x50 <= code[1] <= 0x57:
        return "push"
    return "step"


def functions(path: str, wanted: set[str] | None = None) -> dict[str, Function]:
    """Defined function symbols (dynamic and static tables) of a 64-bit little-endian ELF file."""
    # Mapped, not read: libcuda is tens of MB, and its pages must not stay in our heap.
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # an empty file
            raise ElfError(f"{path}: not an ELF file ({e})") from e
    with data:
        if data[:6] != b"\x7fELF\x02\x01" or len(data) < 64:
            raise ElfError(f"{path}: not a 64-bit little-endian ELF file")
        try:
            out = _functions(data, wanted)
        except (struct.error, IndexError, ValueError, OverflowError) as e:
            raise ElfError(f"{path}: truncated or malformed ELF ({e})") from e
        if out is None:
            raise ElfError(f"{path}: no symbol table")
        return out


def _functions(data: mmap.mmap, wanted: set[str] | None) -> dict[str, Function] | None:
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    loads = []
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data,
                                                                              e_phoff + i * e_phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_filesz, p_offset))
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    out: dict[str, Function] = {}
    tables = 0
    for sh in sections:
        if sh[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        tables += 1
        strtab = sections[sh[6]]
        str_off, str_size = strtab[4], strtab[5]
        off, size, entsize = sh[4], sh[5], sh[9] or 24
        for j in range(size // entsize):
            st_name, st_info, _other, st_shndx, st_value, _size = struct.unpack_from(
                "<IBBHQQ", data, off + j * entsize)
            if st_info & 0xF != 2 or st_shndx == 0 or st_value == 0:  # STT_FUNC, defined
                continue
            end = data.find(b"\0", str_off + st_name, str_off + str_size)
            name = data[str_off + st_name:end].decode("ascii", errors="replace")
            if (wanted is not None and name not in wanted) or name in out:
                continue
            for vaddr, filesz, foff in loads:
                if vaddr <= st_value < vaddr + filesz:
                    fo = st_value - vaddr + foff
                    out[name] = Function(name, fo, site_kind(data[fo:fo + 4]))
                    break
    return out if tables else None
