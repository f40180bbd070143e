"""The CUDA runtime the workload drives: NVIDIA's libcudart on a GPU machine, else the project's
stand-in (cudart_stub.c) built from source with the system C compiler into a cache directory."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

STUB_SOURCE = Path(__file__).with_name("cudart_stub.c")
DRIVER_STUB_SOURCE = Path(__file__).with_name("cuda_driver_stub.c")
STUB_HEADER = Path(__file__).with_name("stub_host.h")  # included by both
STUB_SONAME = "libcudart.so.12"
DRIVER_SONAME = "libcuda.so.1"
# Frame pointers and no CET landing pads: every exported function then opens with `push %rbp`, as
# NVIDIA's libcudart copy functions do, so the kernel emulates the probed instruction as it would there
# (an -O2 function opening with `mov` is single-stepped at ~10x the cost per hit: docs/ebpf.md).
CFLAGS = ["-O2", "-shared", "-fPIC", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
          "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer", "-fcf-protection=none",
          "-fno-optimize-sibling-calls", "-fno-shrink-wrap"]
H2D, D2H = 1, 2


class CudaError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("PCIETAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pcietax")
    return Path(base)


def build_stub(cache: Path | None = None, driver: bool = False) -> Path:
    """Compile the stand-in once per source version; safe when several workloads race to build.
    With ``driver``, also the driver stand-in (libcuda.so.1) beside it, and a runtime that calls it
    as NVIDIA's does; returns the runtime's path either way."""
    srcs = [STUB_HEADER, STUB_SOURCE] + ([DRIVER_STUB_SOURCE] if driver else [])
    tag = hashlib.sha256(b"".join(p.read_bytes() for p in srcs) + b" ".join(map(str.encode, CFLAGS)))
    out_dir = (cache or cache_dir()) / f"cudart-stub{'-driver' if driver else ''}-{tag.hexdigest()[:12]}"
    lib = out_dir / STUB_SONAME
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise CudaError("no C compiler (cc/gcc) to build the CUDA runtime stand-in; install gcc "
                        "or pass --cudart PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    if driver:
        _cc(cc, out_dir, DRIVER_SONAME, [str(DRIVER_STUB_SOURCE)])
        _cc(cc, out_dir, STUB_SONAME, ["-DPTX_WITH_DRIVER", str(STUB_SOURCE), f"-L{out_dir}",
                                       f"-l:{DRIVER_SONAME}", "-Wl,-rpath,$ORIGIN"])
    else:
        _cc(cc, out_dir, STUB_SONAME, [str(STUB_SOURCE)])
    return lib


def _cc(cc: str, out_dir: Path, soname: str, args: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build-", suffix=".so")
    os.close(fd)
    cmd = [cc, *CFLAGS, f"-Wl,-soname,{soname}", "-o", tmp, *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise CudaError(f"building the CUDA runtime stand-in failed: {' '.join(cmd)}\n{r.stderr}")
    os.replace(tmp, out_dir / soname)  # atomic: a concurrent build of the same source wins or loses whole


def find_real() -> str | None:
    """NVIDIA's runtime, only where a GPU is present (else the stand-in is what we can run)."""
    if not glob.glob("/dev/nvidia[0-9]*"):
        return None
    return ctypes.util.find_library("cudart")


class Cudart:
    """The few runtime calls the workload makes, through ctypes (a real call into the library, so
    uprobes on it fire exactly as for a CUDA application)."""

    def __init__(self, path: str, api: str = "runtime") -> None:
        self.path = path
        self.api = api
        self._lib = ctypes.CDLL(path)
        self._drv = ctypes.CDLL(DRIVER_SONAME if api == "driver" and find_real() else
                                str(Path(path).with_name(DRIVER_SONAME))) if api == "driver" else None
        if self._drv is not None:
            u64, vp, sz = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
            for name, args in (("cuMemcpyHtoDAsync_v2", [u64, vp, sz, vp]),
                               ("cuMemcpyDtoHAsync_v2", [vp, u64, sz, vp]),
                               ("cuMemHostAlloc", [ctypes.POINTER(vp), sz, ctypes.c_uint]),
                               ("cuMemFreeHost", [vp])):
                fn = getattr(self._drv, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
        vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self._sig("cudaMemcpyAsync", [vp, vp, sz, i, vp])
        self._sig("cudaMemcpy", [vp, vp, sz, i])
        self._sig("cudaHostAlloc", [ctypes.POINTER(vp), sz, ctypes.c_uint])
        self._sig("cudaFreeHost", [vp])
        self._sig("cudaHostRegister", [vp, sz, ctypes.c_uint])
        self._sig("cudaHostUnregister", [vp])
        self._sig("cudaMalloc", [ctypes.POINTER(vp), sz])
        self._sig("cudaFree", [vp])
        self._sig("cudaStreamSynchronize", [vp])

    def _sig(self, name: str, argtypes: list) -> None:
        fn = getattr(self._lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int

    def _ok(self, rc: int, what: str) -> None:
        if rc != 0:
            raise CudaError(f"{what} failed with cudaError {rc}")

    def host_alloc(self, size: int) -> int:
        p = ctypes.c_void_p()
        if self._drv is not None:
            self._ok(self._drv.cuMemHostAlloc(ctypes.byref(p), size, 0), "cuMemHostAlloc")
            return int(p.value or 0)
        self._ok(self._lib.cudaHostAlloc(ctypes.byref(p), size, 0), "cudaHostAlloc")
        return int(p.value or 0)

    def host_register(self, p: int, size: int) -> None:
        """Pin memory the program already has (how PyTorch's pin_memory and vLLM pin buffers)."""
        if self._drv is not None:
            raise CudaError("--pin register goes through the runtime API (use --api runtime)")
        self._ok(self._lib.cudaHostRegister(p, size, 0), "cudaHostRegister")

    def host_unregister(self, p: int) -> None:
        self._ok(self._lib.cudaHostUnregister(p), "cudaHostUnregister")

    def free_host(self, p: int) -> None:
        if self._drv is not None:
            self._ok(self._drv.cuMemFreeHost(p), "cuMemFreeHost")
            return
        self._ok(self._lib.cudaFreeHost(p), "cudaFreeHost")

    def malloc(self, size: int) -> int:
        p = ctypes.c_void_p()
        self._ok(self._lib.cudaMalloc(ctypes.byref(p), size), "cudaMalloc")
        return int(p.value or 0)

    def free(self, p: int) -> None:
        self._ok(self._lib.cudaFree(p), "cudaFree")

    def memcpy_async(self, dst: int, src: int, n: int, kind: int) -> None:
        if self._drv is not None and kind in (H2D, D2H):
            fn = self._drv.cuMemcpyHtoDAsync_v2 if kind == H2D else self._drv.cuMemcpyDtoHAsync_v2
            self._ok(fn(dst, src, n, None), fn.__name__)
            return
        self._ok(self._lib.cudaMemcpyAsync(dst, src, n, kind, None), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._ok(self._lib.cudaStreamSynchronize(None), "cudaStreamSynchronize")


def load(path: str | None, cache: Path | None = None, api: str = "runtime",
         stub_driver: bool = False) -> Cudart:
    """The runtime at ``path``, else NVIDIA's (GPU machines), else the stand-in; ``api`` says which
    API the copies go through (``driver``: cuMemcpy*/cuMemHostAlloc called directly)."""
    real = None if stub_driver else find_real()
    return Cudart(path or real or str(build_stub(cache, driver=stub_driver or api == "driver")), api)
