"""Uprobe bookkeeping: each CUDA library *file* is probed once, for every process that maps it
(pid -1: the kernel fires the probe in any process mapping that inode, containers included), from
the moment it is known (``--cuda.lib`` at start, a discovered library at its first sighting).

The file is held open and probed through ``/proc/self/fd/N``, so the probe names the same inode
for its whole life (the process it was found in may exit, its path may be a container's), and
detaching never needs the file again. Attaching goes through libbcc's public C API (a program fd,
a path, a file offset), with symbol offsets and probe-site kinds from our own ELF reader.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import cuda_libs
from . import elf

log = logging.getLogger("pcietax")

FileId = tuple[int, int]  # (st_dev, st_ino)


@dataclass
class Attached:
    program: str
    symbol: str
    site: str
    perf_fd: int
    event: bytes


@dataclass
class Library:
    path: str  # where it was found (for the log)
    fid: FileId
    kind: str  # "runtime" | "driver"
    fd: int
    functions: dict[str, elf.Function]
    pinned: list[Attached] = field(default_factory=list)
    copy: list[Attached] = field(default_factory=list)

    @property
    def probe_path(self) -> str:
        return f"/proc/self/fd/{self.fd}"


class UprobeAttacher:
    """Attach/detach programs at file offsets. ``load(program) -> fd`` loads a BPF program."""

    def __init__(self, load: Callable[[str], int], lib: object | None = None) -> None:
        self._load = load
        if lib is None:
            from bcc.libbcc import lib as bcc_lib

            lib = bcc_lib
        self._lib = lib
        self._seq = 0

    def attach(self, program: str, path: str, fn: elf.Function, ret: bool = False,
               pid: int = -1) -> Attached | None:
        name = program if ret else f"{program}__{fn.site}"
        try:
            prog_fd = self._load(name)
        except Exception as e:
            log.warning("ebpf: cannot load %s: %s", name, e)
            return None
        self._seq += 1
        ev = f"ptx_{os.getpid()}_{self._seq}".encode()
        perf_fd = self._lib.bpf_attach_uprobe(prog_fd, 1 if ret else 0, ev, path.encode(), fn.offset, pid)
        if perf_fd < 0:
            log.debug("ebpf: attach %s to %s:%s failed", name, path, fn.name)
            return None
        return Attached(name, fn.name, fn.site, perf_fd, ev)

    def detach(self, a: Attached) -> None:
        self._lib.bpf_close_perf_event_fd(a.perf_fd)
        self._lib.bpf_detach_uprobe(a.event)  # removes a legacy uprobe_events entry, if one was made


class CudaProbes:
    """Every CUDA library file known so far, its pinned-memory probes (always on) and its copy
    probes (attached while the governor's copy group is). ``add`` runs on the collection thread and
    ``set_copy`` on the governor's and the detach thread: a lock keeps the lists whole, and no
    detach (a grace period long) runs under it."""

    def __init__(self, attacher: UprobeAttacher) -> None:
        self._att = attacher
        self.libs: dict[FileId, Library] = {}
        self.copy_on = False
        self._mu = threading.Lock()

    def add(self, path: str, kind: str | None = None) -> Library | None:
        """Probe a library file from now on (once per file, whatever path it was found under)."""
        with self._mu:
            return self._add(path, kind)

    def _add(self, path: str, kind: str | None) -> Library | None:
        fid = cuda_libs.file_id(path)
        if fid is None or fid in self.libs:
            return None
        kind = kind or cuda_libs.lib_kind(os.path.realpath(path)) or cuda_libs.lib_kind(path) or "runtime"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("ebpf: cannot open CUDA library %s: %s", path, e.strerror)
            return None
        try:
            fns = elf.functions(f"/proc/self/fd/{fd}", set(cuda_libs.ALL_SYMBOLS))
        except (elf.ElfError, OSError) as e:
            os.close(fd)
            log.warning("ebpf: %s is not a library we can probe: %s", path, e)
            return None
        lib = Library(path, fid, kind, fd, fns)
        self.libs[fid] = lib
        pinned = cuda_libs.RUNTIME_PINNED_PROBES if kind == "runtime" else cuda_libs.DRIVER_PINNED_PROBES
        lib.pinned = self._attach_set(lib, pinned)
        if self.copy_on:
            lib.copy = self._attach_set(lib, self._copy_set(lib))
        sites = sorted({f"{a.symbol}={a.site}" for a in lib.pinned + lib.copy})
        log.info("ebpf: probing %s library %s for every process (%d probes; sites %s)", kind, path,
                 len(lib.pinned) + len(lib.copy), ", ".join(sites) or "none")
        return lib

    def _copy_set(self, lib: Library) -> cuda_libs.ProbeSet:
        return cuda_libs.RUNTIME_COPY_PROBES if lib.kind == "runtime" else cuda_libs.DRIVER_COPY_PROBES

    def _attach_set(self, lib: Library, probes: cuda_libs.ProbeSet) -> list[Attached]:
        out: list[Attached] = []
        for ret, table in ((False, probes.entry), (True, probes.ret)):
            for program, syms in table.items():
                for sym in syms:
                    fn = lib.functions.get(sym)
                    if fn is None:
                        continue
                    a = self._att.attach(program, lib.probe_path, fn, ret=ret)
                    if a is not None:
                        out.append(a)
        return out

    def set_copy(self, on: bool) -> None:
        gone: list[Attached] = []
        with self._mu:
            if on == self.copy_on:
                return
            self.copy_on = on
            for lib in self.libs.values():
                if on:
                    lib.copy = self._attach_set(lib, self._copy_set(lib))
                else:
                    gone += lib.copy
                    lib.copy = []
        for a in gone:
            self._att.detach(a)

    def copy_sites(self) -> dict[str, int]:
        """Attached copy probes per site kind (for the self-cost labels and the log)."""
        out: dict[str, int] = {}
        for lib in self.libs.values():
            for a in lib.copy:
                out[a.site] = out.get(a.site, 0) + 1
        return out

    def take_all(self) -> list[Callable[[], None]]:
        """Forget every library; their detaches, to run (in parallel) by the caller."""
        with self._mu:
            probes = [a for lib in self.libs.values() for a in lib.pinned + lib.copy]
            fds = [lib.fd for lib in self.libs.values()]
            self.libs.clear()
            self.copy_on = False
        att = self._att
        closers: list[Callable[[], None]] = [lambda a=a: att.detach(a) for a in probes]
        # A probe holds its inode itself: the files can close in any order with the detaches.
        return [*closers, lambda: _close_fds(fds)]

    def close(self) -> None:
        for c in self.take_all():
            c()



def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
