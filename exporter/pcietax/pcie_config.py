"""PCI configuration space: walk the standard and extended capability lists of a sysfs ``config``
file. Unprivileged readers get only the first 64 bytes: anything past that is *unknown*, never off."""

from __future__ import annotations

import os
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

    # -- Access Control Services (PCIe base spec 7.7.11) -----------------------------------------

    def port_type(self) -> int | None:
        """Device/Port Type from the PCI Express capability (4 root port, 5 switch upstream,
        6 switch downstream, 0 endpoint), or None when the capability is not readable."""
        cap = self.capability(CAP_PCIE)
        if cap is None:
            return None
        flags = self.u16(cap + 0x02)
        return None if flags is None else (flags >> 4) & 0xF

    def acs(self) -> Acs:
        """The ACS capability and control registers. Unknown (never "off") when the extended space
        could not be read: an unprivileged reader, a kernel without extended config access, or a
        device that answers all-ones because it is gone."""
        if len(self.data) <= STD_HEADER:
            return Acs("unknown", why=f"config space is {len(self.data)} bytes (reading past 64 needs root)")
        if self.u16(0x00) == 0xFFFF:
            return Acs("unknown", why="config space reads all-ones (device gone or in reset)")
        if len(self.data) < EXT_START + 8:
            return Acs("unknown", why=f"no extended config space readable ({len(self.data)} bytes)")
        off = EXT_START
        seen: set[int] = set()
        while True:
            hdr = self.u32(off)
            if hdr is None or hdr == 0xFFFFFFFF:
                return Acs("unknown", why=f"extended capability list unreadable at 0x{off:x}")
            if hdr == 0:
                return Acs("absent")  # no extended capabilities at all
            if hdr & 0xFFFF == EXT_CAP_ACS:
                cap, ctrl = self.u16(off + 0x04), self.u16(off + 0x06)
                if cap is None or ctrl is None:
                    return Acs("unknown", why=f"ACS capability at 0x{off:x} is truncated")
                return Acs("present", capability=cap, control=ctrl, offset=off)
            seen.add(off)
            off = (hdr >> 20) & 0xFFC
            if off == 0:
                return Acs("absent")
            if off < EXT_START or off in seen:
                return Acs("unknown", why=f"extended capability list is corrupt (next 0x{off:x})")


# ACS control bits, in register order (PCIe base spec: ACS Control Register).
ACS_BITS = ("SV", "TB", "RR", "CR", "UF", "EC", "DT")
# Request Redirect and Completion Redirect send peer-to-peer TLPs up to the root complex.
ACS_REDIRECT = ("RR", "CR")


@dataclass(frozen=True)
class Acs:
    state: str  # "present", "absent" (no ACS capability: nothing redirects), "unknown"
    capability: int | None = None
    control: int | None = None
    offset: int | None = None
    why: str = ""

    def _names(self, reg: int | None) -> tuple[str, ...] | None:
        if reg is None:
            return None
        return tuple(n for i, n in enumerate(ACS_BITS) if reg & (1 << i))

    @property
    def enabled(self) -> tuple[str, ...] | None:
        """Names of the enabled ACS controls; () when ACS is absent; None when unknown."""
        if self.state == "absent":
            return ()
        return self._names(self.control)

    @property
    def supported(self) -> tuple[str, ...] | None:
        if self.state == "absent":
            return ()
        return self._names(self.capability)

    @property
    def redirects(self) -> bool | None:
        """True when RR or CR is enabled (P2P goes through the root complex); None when unknown."""
        on = self.enabled
        return None if on is None else any(b in on for b in ACS_REDIRECT)


def read_max_payload_size(device_dir: str | os.PathLike[str]) -> int | None:
    """Programmed MPS of a sysfs PCI device directory, or None (not root, no PCIe capability)."""
    try:
        with open(os.path.join(device_dir, "config"), "rb") as f:
            return Config(f.read(256)).max_payload_size()
    except OSError:
        return None
