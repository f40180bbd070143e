"""Loading: what this node must have for the tracer (BCC, root, tracefs, kernel headers), fixed where
root can fix it, and the compile itself.

- tracefs unmounted (fresh VMs, minimal images): mounted at its usual place, and logged.
- no ``/lib/modules/$(uname -r)/build`` (COS, Bottlerocket, Talos, many managed GPU images): BCC
  can compile against the kernel's own headers from ``CONFIG_IKHEADERS``
  (``/sys/kernel/kheaders.tar.xz``, after ``modprobe kheaders`` where it is a module).
- the compile never touches the process's file descriptor 2 (other sources log through it while we
  start); when it fails, a child process repeats it to capture the compiler's first error.
- what the compile leaves on the heap (clang's AST, LLVM's buffers) goes back to the OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ...procmaps import parse_maps, read_maps
from ..base import SourceAbsent, SourceUnavailable
from . import defs

log = logging.getLogger("pcietax")

# Tracepoints the program needs on every kernel; the socket pair depends on the kernel version.
REQUIRED_TRACEPOINTS = ("irq/irq_handler_entry", "irq/irq_handler_exit", "irq/softirq_entry",
                        "irq/softirq_exit")
SOCK_LENGTH = ("sock/sock_recv_length", "sock/sock_send_length")  # Linux 6.3+
SOCK_FALLBACK = ("skb/skb_copy_datagram_iovec",)
FOLLOW = ("sched/sched_process_fork", "sched/sched_process_exec", "sched/sched_process_exit")
CFLAGS_BASE = ("-Wno-macro-redefined", "-Wno-unknown-warning-option")


def program_path() -> Path:
    from ...bpfsrc import bpf_dir

    return bpf_dir() / "pcietax.bpf.c"


def load_bcc(factory: Any = None) -> Any:
    """BCC's BPF class. Missing BCC is a broken install (a failure, not an absent source): the
    container image and the distribution packages ship it."""
    if factory is not None:
        return factory()
    try:
        from bcc import BPF
    except ImportError as e:
        raise SourceUnavailable(
            "bcc not installed: install the distribution package python3-bpfcc "
            "(the PyPI package named 'bcc' is unrelated)") from e
    return BPF


def check_bpf_syscall() -> None:
    """A kernel built without CONFIG_BPF_SYSCALL has no eBPF at all: the one truly absent case."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    attr = (ctypes.c_uint32 * 8)()
    r = libc.syscall(321, 0xFFFF, ctypes.byref(attr), ctypes.sizeof(attr))  # an unknown command
    if r < 0 and ctypes.get_errno() == 38:  # ENOSYS
        raise SourceAbsent("this kernel has no eBPF (built without CONFIG_BPF_SYSCALL)")


def ensure_tracefs(tracefs: Path) -> None:
    """Mount tracefs where it is expected if nothing is mounted there (root only)."""
    if (tracefs / "events").is_dir():
        return
    how = f"mount -t tracefs nodev {tracefs}"
    libc = ctypes.CDLL(None, use_errno=True)
    if not tracefs.exists():
        tracefs.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"nodev", str(tracefs).encode(), b"tracefs", 0, None) != 0:
        err = os.strerror(ctypes.get_errno())
        raise SourceUnavailable(f"tracefs not mounted at {tracefs} and mounting it failed ({err}): "
                                f"run `{how}`, or give the container /sys/kernel/tracing")
    if not (tracefs / "events").is_dir():
        raise SourceAbsent(f"tracefs mounted at {tracefs} has no events/: this kernel has no "
                           "tracepoints (CONFIG_TRACEPOINTS off)")
    log.info("ebpf: tracefs was not mounted: mounted it at %s (%s)", tracefs, how)


def check_headers(modules: Path, sysfs: Path, release: str | None = None) -> str:
    """Which kernel headers BCC will use: 'build' or 'kheaders'; loads the kheaders module when
    there is no build tree. The reason names what to install."""
    release = release or os.uname().release
    build = modules / release / "build"
    if build.exists():
        return "build"
    kheaders = sysfs / "kernel/kheaders.tar.xz"
    if not kheaders.exists() and sysfs == Path("/sys"):
        try:
            r = subprocess.run(["modprobe", "kheaders"], capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                log.info("ebpf: modprobe kheaders: %s", (r.stderr or r.stdout).strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            log.info("ebpf: modprobe kheaders: %s", e)
    if kheaders.exists():
        log.info("ebpf: no kernel headers at %s: compiling against the kernel's own (%s)", build, kheaders)
        return "kheaders"
    raise SourceUnavailable(
        f"no kernel headers at {build} and no {kheaders} (CONFIG_IKHEADERS): install the headers "
        f"of this kernel (Debian/Ubuntu: linux-headers-{release}; RHEL/Fedora: kernel-devel-{release}), "
        "or use a kernel with CONFIG_IKHEADERS (docs/ebpf.md)")


def missing_tracepoints(tracefs: Path, names: tuple[str, ...]) -> list[str]:
    return [tp for tp in names if not (tracefs / "events" / tp / "format").exists()]


def program_text(path: Path) -> bytes:
    try:
        body = path.read_bytes()
    except OSError as e:
        raise SourceUnavailable(f"cannot read BPF program {path}: {e.strerror}") from e
    return defs.c_header().encode() + body  # BCC wants bytes (a str is deprecated there)


def compile_program(bpf_cls: Any, text: bytes, cflags: list[str]) -> Any:
    try:
        b = bpf_cls(text=text, cflags=list(CFLAGS_BASE) + cflags)
    except Exception as e:
        detail = _child_compile_error(text, cflags) or str(e).splitlines()[0]
        raise SourceUnavailable(f"BPF compile/load failed: {detail}") from e
    release_heap()
    return b


_COMPILER_LIBS = re.compile(rb"/lib(bcc|LLVM|clang)[^/]*\.so")
_MADV_PAGEOUT = 21  # Linux 5.4+


def release_heap(maps: str = "/proc/self/maps") -> None:
    """After the compile: the heap clang and LLVM freed goes back to the OS (glibc keeps it
    otherwise, ~80 MB), and the pages of libbcc/libLLVM/libclang the compile touched are paged out
    (MADV_PAGEOUT: clean file pages, dropped from our RSS and read back only if run again, ~80 MB;
    reading maps later touches a few pages of libbcc)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim(0)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for m in parse_maps(read_maps(maps)):
            if _COMPILER_LIBS.search(m.path):
                libc.madvise(m.start, m.end - m.start, _MADV_PAGEOUT)  # refused on old kernels: harmless


_CHILD = """
import sys
from bcc import BPF
text = sys.stdin.buffer.read()
BPF(text=text, cflags=sys.argv[1:])
"""


def _child_compile_error(text: bytes, cflags: list[str]) -> str:
    """Repeat a failed compile in a child to read the compiler's diagnostics from its stderr."""
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, *CFLAGS_BASE, *cflags], input=text,
                           capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in r.stderr.decode(errors="replace").splitlines():
        if "error:" in line:
            return line.strip()
    return ""
