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

# Copy probes are the hot, sampled ones; pinned-memory probes are rare and always attached.
RUNTIME_COPY_PROBES = ProbeSet(entry={"ptx_cuda_memcpy": RUNTIME_COPY}, ret={})
RUNTIME_COPY_RET = ProbeSet(entry={}, ret={"ptx_cuda_memcpy_ret": RUNTIME_COPY})
DRIVER_COPY_PROBES = ProbeSet(entry={"ptx_cu_htod": DRIVER_HTOD, "ptx_cu_dtoh": DRIVER_DTOH}, ret={})
RUNTIME_PINNED_PROBES = ProbeSet(
    entry={"ptx_host_alloc": RUNTIME_ALLOC, "ptx_host_register": RUNTIME_REGISTER,
           "ptx_host_free": RUNTIME_FREE},
    ret={"ptx_host_alloc_ret": RUNTIME_ALLOC, "ptx_host_register_ret": RUNTIME_REGISTER},
)
DRIVER_PINNED_PROBES = ProbeSet(
    entry={"ptx_host_alloc": DRIVER_ALLOC, "ptx_host_register": DRIVER_REGISTER,
           "ptx_host_free": DRIVER_FREE},
    ret={"ptx_host_alloc_ret": DRIVER_ALLOC, "ptx_host_register_ret": DRIVER_REGISTER},
)


def lib_kind(path: str) -> str | None:
    """'runtime', 'driver' or None for a library path."""
    if RUNTIME_RE.search(path):
        return "runtime"
    if DRIVER_RE.search(path):
        return "driver"
    return None


def mapped_files(procfs: Path, pid: int) -> list[str]:
    """Distinct file paths mapped by a process (its own view; may be inside a container)."""
    try:
        text = (procfs / str(pid) / "maps").read_text()
    except OSError:
        return []
    seen: dict[str, None] = {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            path = parts[5]
            if path.endswith(" (deleted)"):
                continue
            seen[path] = None
    return list(seen)


def discover(procfs: Path, pid: int, pattern: re.Pattern[str]) -> list[str]:
    """Paths (through /proc/PID/root) of the files matching ``pattern`` that ``pid`` maps."""
    root = procfs / str(pid) / "root"
    return [str(root) + p for p in mapped_files(procfs, pid) if pattern.search(p)]


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
