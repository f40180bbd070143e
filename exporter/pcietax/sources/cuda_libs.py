"""Which CUDA libraries to probe, and which of their functions.

Libraries come from ``--cuda.lib`` and from the ``/proc/PID/maps`` of the processes being traced.
A library found in a process's maps is probed through ``/proc/PID/root`` so that a process in a
container gets the file it really maps, not whatever has the same path on the host.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import procmaps

RUNTIME_RE = re.compile(r"/libcudart\.so[.\d]*$")
DRIVER_RE = re.compile(r"/libcuda\.so[.\d]*$")
LIBC_RE = re.compile(r"/libc\.so\.6$|/libc-[\d.]+\.so$")


@dataclass(frozen=True)
class ProbeSet:
    """BPF program -> function symbols it attaches to (entry), and the ones that need a return probe."""

    entry: dict[str, tuple[str, ...]]
    ret: dict[str, tuple[str, ...]]


# Runtime API (libcudart): cudaMemcpy* take (dst, src, count, kind[, stream]). _ptds / _ptsz are the
# per-thread-default-stream builds of the same calls (nvcc --default-stream per-thread).
RUNTIME_COPY = ("cudaMemcpy", "cudaMemcpy_ptds", "cudaMemcpyAsync", "cudaMemcpyAsync_ptsz")
RUNTIME_ALLOC = ("cudaHostAlloc", "cudaMallocHost")
RUNTIME_REGISTER = ("cudaHostRegister",)
RUNTIME_FREE = ("cudaFreeHost", "cudaHostUnregister")

# Driver API (libcuda): the _v2 names are what cuda.h maps the plain names to since CUDA 3.2.
DRIVER_HTOD = ("cuMemcpyHtoD", "cuMemcpyHtoD_v2", "cuMemcpyHtoD_v2_ptds",
               "cuMemcpyHtoDAsync", "cuMemcpyHtoDAsync_v2", "cuMemcpyHtoDAsync_v2_ptsz")
DRIVER_DTOH = ("cuMemcpyDtoH", "cuMemcpyDtoH_v2", "cuMemcpyDtoH_v2_ptds",
               "cuMemcpyDtoHAsync", "cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync_v2_ptsz")
DRIVER_ALLOC = ("cuMemHostAlloc", "cuMemAllocHost", "cuMemAllocHost_v2")
DRIVER_REGISTER = ("cuMemHostRegister", "cuMemHostRegister_v2")
DRIVER_FREE = ("cuMemFreeHost", "cuMemHostUnregister")

# Entry programs come in one variant per probe-site kind (``<program>__push`` / ``__step``, see
# ebpf/pcietax.bpf.c); return programs are used as named. Copy probes are the hot, duty-cycled ones:
# one trap per copy (no return probe: a runtime copy that enters the driver is recognised there).
# Pinned-memory probes are rare and always attached.
RUNTIME_COPY_PROBES = ProbeSet(entry={"cuda_memcpy": RUNTIME_COPY}, ret={})
DRIVER_COPY_PROBES = ProbeSet(entry={"cu_htod": DRIVER_HTOD, "cu_dtoh": DRIVER_DTOH}, ret={})
RUNTIME_PINNED_PROBES = ProbeSet(
    entry={"host_pin_entry": RUNTIME_ALLOC + RUNTIME_REGISTER, "host_free": RUNTIME_FREE},
    ret={"ptx_host_alloc_ret": RUNTIME_ALLOC, "ptx_host_register_ret": RUNTIME_REGISTER},
)
DRIVER_PINNED_PROBES = ProbeSet(
    entry={"host_pin_entry": DRIVER_ALLOC + DRIVER_REGISTER, "host_free": DRIVER_FREE},
    ret={"ptx_host_alloc_ret": DRIVER_ALLOC, "ptx_host_register_ret": DRIVER_REGISTER},
)
ALL_SYMBOLS = frozenset(RUNTIME_COPY + RUNTIME_ALLOC + RUNTIME_REGISTER + RUNTIME_FREE + DRIVER_HTOD
                        + DRIVER_DTOH + DRIVER_ALLOC + DRIVER_REGISTER + DRIVER_FREE)


def lib_kind(path: str) -> str | None:
    """'runtime', 'driver' or None for a library path."""
    if RUNTIME_RE.search(path):
        return "runtime"
    if DRIVER_RE.search(path):
        return "driver"
    return None


def mapped_files(procfs: Path, pid: int) -> list[str]:
    """Distinct file paths mapped by a process (its own view; may be inside a container), or []
    when it is gone. Paths that are not UTF-8 (any user can map one) keep surrogateescape, so they
    still name the same file when used as a path again."""
    return procmaps.mapped_files(procmaps.process_maps(procfs, pid))


def discover(procfs: Path, pid: int, patterns: re.Pattern[str] | tuple[re.Pattern[str], ...],
             maps: list[str] | None = None) -> list[str]:
    """Paths (through /proc/PID/root) of the files matching any of ``patterns`` that ``pid`` maps;
    ``maps`` = its mapped_files() when the caller has read them already (one read per rescan)."""
    if isinstance(patterns, re.Pattern):
        patterns = (patterns,)
    root = procfs / str(pid) / "root"
    files = mapped_files(procfs, pid) if maps is None else maps
    return [str(root) + p for p in files if any(pat.search(p) for pat in patterns)]


def same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
