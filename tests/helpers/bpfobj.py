"""What the kernel has loaded: BPF program ids (the bpf(2) syscall, as bpftool does) and uprobe
trace events, so tests can prove that stopping the exporter leaves nothing behind."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path

_SYS_BPF = 321  # x86_64
_BPF_PROG_GET_FD_BY_ID = 13
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def prog_exists(prog_id: int) -> bool:
    """True while a program with this id is loaded (BPF_PROG_GET_FD_BY_ID succeeds)."""
    attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)
    fd = _libc.syscall(_SYS_BPF, _BPF_PROG_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        return False
    raise OSError(err, f"BPF_PROG_GET_FD_BY_ID({prog_id}): {os.strerror(err)}")


def prog_ids_of(pid: int | str) -> set[int]:
    """Ids of the BPF programs a process holds open (from /proc/PID/fdinfo)."""
    out: set[int] = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for f in fdinfo.iterdir():
        try:
            m = re.search(r"^prog_id:\s*(\d+)", f.read_text(), re.M)
        except OSError:
            continue
        if m:
            out.add(int(m.group(1)))
    return out


def uprobe_events(tracefs: str = "/sys/kernel/tracing") -> list[str]:
    try:
        return [x for x in Path(tracefs, "uprobe_events").read_text().splitlines() if x.strip()]
    except OSError:
        return []
