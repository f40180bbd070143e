"""PCI configuration space: walk the standard and extended capability lists of a sysfs ``config``
file. Unprivileged readers get only the first 64 bytes: anything past that is *unknown*, never off."""

from __future__ import annotations

from dataclasses import dataclass

CAP_PCIE = 0x10
EXT_CAP_ACS = 0x0D
STD_HEADER = 64
EXT_START = 0x100


@dataclass(frozen=True)
class Config:
    data: bytes

    @property
    def complete(self) -> bool:
        return len(self.data) >= 256

    def u8(self, off: int) -> int | None:
        return self.data[off] if off < len(self.data) else None

    def u16(self, off: int) -> int | None:
        return int.from_bytes(self.data[off : off + 2], "little") if off + 2 <= len(self.data) else None

    def u32(self, off: int) -> int | None:
        return int.from_bytes(self.data[off : off + 4], "little") if off + 4 <= len(self.data) else None

    def capability(self, cap_id: int) -> int | None:
        """Offset of a standard capability, or None (absent, or the list is past what we could read)."""
        status = self.u16(0x06)
        if status is None or not status & 0x10:
            return None
        ptr = self.u8(0x34)
        seen: set[int] = set()
        while ptr and ptr >= STD_HEADER and ptr not in seen:
            seen.add(ptr)
            cid, nxt = self.u8(ptr), self.u8(ptr + 1)
            if cid is None or nxt is None:
                return None
            if cid == cap_id:
                return ptr
            ptr = nxt & 0xFC
        return None

    def ext_capability(self, cap_id: int) -> int | None:
        off = EXT_START
        seen: set[int] = set()
        while off >= EXT_START and off not in seen:
            seen.add(off)
            hdr = self.u32(off)
            if hdr is None or hdr in (0, 0xFFFFFFFF):
                return None
            if hdr & 0xFFFF == cap_id:
                return off
            off = (hdr >> 20) & 0xFFC
        return None

    def max_payload_size(self) -> int | None:
        """Programmed MPS (Device Control bits 7:5), or None when not readable."""
        cap = self.capability(CAP_PCIE)
        if cap is None:
            return None
        devctl = self.u16(cap + 0x08)
        return None if devctl is None else 128 << ((devctl >> 5) & 0x7)
