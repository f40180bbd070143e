"""Small, strict readers for procfs/sysfs text. They raise ``ValueError``/``OSError`` with the path;
sources turn those into faults so one bad file never takes a source down.

Every read is capped: a kernel file that is bigger than any real one (a bind-mounted fixture, a
hostile FUSE mount, a runaway driver) raises ``FileTooLarge`` after reading at most the cap, so
the exporter's memory stays bounded (the systemd unit has MemoryMax=512M)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# A sysfs attribute is at most one page (PAGE_SIZE, 4 KiB on x86, 64 KiB on some arm64 kernels).
SYSFS_MAX = 64 << 10
# /proc/interrupts on 256 CPUs x 5,000 IRQ lines is about 14 MiB; /proc/net/dev with 100,000
# interfaces about 15 MiB. Nothing real comes near this.
PROCFS_MAX = 64 << 20
READ_CHUNK = 64 << 10


class FileTooLarge(OSError):
    """A kernel file over its read cap (an OSError, so every source's handler counts it)."""

    def __init__(self, path: str | os.PathLike[str], limit: int) -> None:
        super().__init__(errno.EFBIG, f"larger than {limit} bytes (no real kernel file is)", str(path))


def read_bytes(path: str | os.PathLike[str], limit: int = SYSFS_MAX) -> bytes:
    # os.open/os.read, not open(): a buffered file object costs five more syscalls per file
    # (fstat, ioctl, lseek, and an mmap/munmap of the whole cap for a procfs read), and each
    # syscall hands the GIL to the other sources' threads: a context switch on a busy cycle.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    chunks: list[bytes] = []
    n = 0
    try:
        while n <= limit:
            # 64 KiB first, then doubling: os.read allocates the whole size it is asked for, and
            # asking for the 64 MiB procfs cap mapped and unmapped 64 MiB per read (0.1 ms).
            more = _read_fd(fd, path, min(limit + 1 - n, max(READ_CHUNK, n)))
            if not more:
                break
            chunks.append(more)
            n += len(more)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > limit:
        raise FileTooLarge(path, limit)
    return data


def read_into(path: str | os.PathLike[str], buf: bytearray, limit: int = PROCFS_MAX) -> int:
    """Read the whole file into ``buf`` from its start, growing it as needed (up to ``limit`` + 1
    bytes, then FileTooLarge); returns the file's length. The buffer is kept by the caller across
    cycles, so a big file (/proc/interrupts: 14 MiB on 256 CPUs) is not a fresh allocation, page
    faults and all, every second."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        n = 0
        while True:
            if n == len(buf):
                if n > limit:
                    raise FileTooLarge(path, limit)
                buf.extend(bytes(min(max(len(buf), 64 << 10), limit + 1 - n)))
            with memoryview(buf) as view:
                try:
                    got = os.readv(fd, [view[n:]])
                except OSError as e:
                    raise OSError(e.errno, e.strerror, os.fspath(path)) from None
            if not got:
                return n
            n += got
    finally:
        os.close(fd)


def _read_fd(fd: int, path: str | os.PathLike[str], size: int) -> bytes:
    try:
        return os.read(fd, size)
    except OSError as e:  # os.read's error carries no file name; open()'s did
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None


def read_text(path: str | os.PathLike[str], limit: int = SYSFS_MAX, errors: str = "strict") -> str:
    """The file as text: strict ASCII by default (numbers, names); ``errors="replace"`` for files
    whose free text a driver writes (IRQ action names), so one odd byte does not lose the file."""
    return read_bytes(path, limit).decode("ascii", errors)


def read_str(path: str | os.PathLike[str]) -> str:
    return read_text(path).strip()


def read_int(path: str | os.PathLike[str], base: int = 10) -> int:
    text = read_str(path)
    try:
        return int(text, base)
    except ValueError:
        raise ValueError(f"not an integer: {text[:40]!r} in {path}") from None


# Kernel counters are at most 64 bits; anything longer is garbage (and past 308 digits a float
# conversion would raise OverflowError instead of skipping the line).
COUNTER_MAX = 2**64


def counter_value(text: str | bytes) -> int:
    """A non-negative kernel counter from decimal text; ValueError for anything else (signs,
    spaces inside, more than 64 bits)."""
    t = text.strip()
    if not t.isdigit() or len(t) > 20:
        raise ValueError(f"not a counter: {t[:40]!r}")
    v = int(t)
    if v >= COUNTER_MAX:
        raise ValueError(f"not a 64-bit counter: {t[:40]!r}")
    return v


def sum_counters(fields: list[str]) -> int:
    """``sum(map(counter_value, fields))`` for fields split on whitespace: when all are plain
    ASCII digits under 20 long (always below 2**64) ``int`` sums them at once; anything else goes
    through counter_value, which raises ValueError for the bad one."""
    digits = "".join(fields)
    if not digits or (digits.isascii() and digits.isdigit() and max(map(len, fields)) < 20):
        return sum(map(int, fields))
    return sum(map(counter_value, fields))


def read_counter(path: str | os.PathLike[str]) -> int:
    text = read_str(path)
    try:
        return counter_value(text)
    except ValueError:
        raise ValueError(f"not a counter: {text[:40]!r} in {path}") from None


def read_optional_str(path: str | os.PathLike[str]) -> str | None:
    try:
        return read_str(path)
    except (OSError, UnicodeDecodeError):
        return None


def link_name(path: str | os.PathLike[str]) -> str | None:
    """Basename of a symlink's target (``driver``, ``iommu_group``), or None."""
    try:
        return Path(os.readlink(path)).name
    except OSError:
        return None
