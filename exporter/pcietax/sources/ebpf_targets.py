"""Which processes the eBPF source traces: ``--target.pid``, ``--target.comm REGEX``,
``--target.cgroup PATH``, or node-wide when none is given.

Pids and comms are resolved in user space (a regex cannot run in BPF) and written to a BPF hash;
a cgroup is matched in the kernel by ancestry (``bpf_get_current_ancestor_cgroup_id``), so every
process that ever enters it is traced from its first event.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


class TargetError(ValueError):
    """A target option that cannot work (the message names the option and the fix)."""


@dataclass(frozen=True)
class CgroupTarget:
    path: str
    id: int  # cgroup v2 id = inode number of its directory
    level: int  # depth below the cgroup2 root (the root is level 0)


class Targets:
    def __init__(
        self,
        procfs: str = "/proc",
        pids: list[int] | None = None,
        comm: str | None = None,
        cgroup: str | None = None,
        cgroup_root: str | None = None,
    ) -> None:
        self._procfs = Path(procfs)
        self.pids = sorted(set(pids or []))
        try:
            self._comm = re.compile(comm) if comm else None
        except re.error as e:
            raise TargetError(f"--target.comm {comm!r} is not a valid regex: {e}") from e
        root = cgroup_root or cgroup2_mount(self._procfs)
        self.cgroup = _cgroup_target(cgroup, root) if cgroup else None

    @property
    def node_wide(self) -> bool:
        return not self.pids and self._comm is None and self.cgroup is None

    @property
    def dynamic(self) -> bool:
        """True when the set of target pids changes as processes come and go."""
        return self._comm is not None or self.cgroup is not None

    def resolve(self) -> set[int]:
        """Live target pids (tgids) now: the given pids that still exist, plus comm and cgroup matches.
        Node-wide returns an empty set (the kernel side counts everyone)."""
        out = {p for p in self.pids if (self._procfs / str(p)).exists()}
        if self._comm is None and self.cgroup is None:
            return out
        for entry in os.scandir(self._procfs):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if self._comm is not None:
                comm = _read(self._procfs / entry.name / "comm")
                if comm is not None and self._comm.search(comm):
                    out.add(pid)
                    continue
            if self.cgroup is not None and _in_cgroup(self._procfs / entry.name / "cgroup", self.cgroup.path):
                out.add(pid)
        return out


def cgroup2_mount(procfs: Path) -> str:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on unified systems,
    /sys/fs/cgroup/unified on hybrid ones (cgroup v1 controllers beside it)."""
    text = _read(procfs / "self/mounts") or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return parts[1]
    return "/sys/fs/cgroup"


MAX_PROC_TEXT = 1 << 20  # /proc/PID/comm is 16 bytes, cgroup and mounts a few KB


def _read(path: Path) -> str | None:
    """Text from /proc, which any user can fill with bytes that are not UTF-8 (a comm set with
    prctl(PR_SET_NAME), a mount point): decoded with errors="replace", never raising."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_PROC_TEXT).decode("utf-8", errors="replace").rstrip("\n")
    except OSError:
        return None


def _in_cgroup(cgroup_file: Path, rel: str) -> bool:
    text = _read(cgroup_file)
    if not text:
        return False
    for line in text.splitlines():
        if line.startswith("0::"):
            p = line[3:]
            return p == rel or p.startswith(rel.rstrip("/") + "/")
    return False


def _cgroup_target(path: str, root: str) -> CgroupTarget:
    """Accept the cgroup as a full path (/sys/fs/cgroup/system.slice/x.service) or relative to the
    cgroup2 root (/system.slice/x.service, as /proc/PID/cgroup prints it)."""
    rootp = Path(root)
    full = Path(path)
    if not str(full).startswith(str(rootp)):
        full = rootp / str(path).lstrip("/")
    try:
        st = os.stat(full)
    except OSError as e:
        raise TargetError(
            f"--target.cgroup {path!r}: {full} is not a cgroup v2 directory ({e.strerror})") from e
    if not (full / "cgroup.procs").exists():
        raise TargetError(f"--target.cgroup {path!r}: {full} has no cgroup.procs (not cgroup v2)")
    rel = "/" + str(full.relative_to(rootp)).strip("/")
    level = 0 if rel == "/" else rel.count("/")
    return CgroupTarget(path=rel if rel != "/." else "/", id=st.st_ino, level=level)
