"""Who a traced tgid is, for the per-process labels: ``(process, namespace, pod, container)``.

The kernel records each counted process's comm and cgroup id at event time (the ``procs`` map), so
a process that exited before user space read its bytes is still named and attributed. The cgroup
id is turned into the bytes of a ``/proc/PID/cgroup`` file (read while a process in that cgroup is
alive, cached by id; else synthesised from the cgroup v2 directory whose inode is the id) and
handed to the Kubernetes pod resolver (``sources/pods.py``; None outside Kubernetes: empty pod
labels, which Prometheus treats as absent).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ..proclabels import OTHER, sanitize

Ident = tuple[str, str, str, str]  # process, namespace, pod, container
OTHER_IDENT: Ident = (OTHER, "", "", "")
MAX_CGROUP_BYTES = 64 << 10
MAX_CACHE = 8192
MAX_WALK = 20000  # cgroup directories visited when indexing ids to paths


class PodRefLike(Protocol):
    namespace: str
    pod: str
    container: str


class PodResolverLike(Protocol):
    def lookup(self, proc_cgroup: bytes) -> PodRefLike | None: ...


def read_small(path: Path, limit: int = MAX_CGROUP_BYTES) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


class Identities:
    def __init__(self, procfs: Path, cgroup_root: str | None, resolver: PodResolverLike | None) -> None:
        self._procfs = procfs
        self._cgroup_root = cgroup_root
        self._resolver = resolver
        self._cgroup_bytes: dict[int, bytes] = {}
        self._pod: dict[int, tuple[str, str, str]] = {}
        self._by_tgid: dict[int, Ident] = {}
        self._id_paths: dict[int, str] | None = None

    def ident(self, tgid: int, comm: bytes | None, cgroup_id: int) -> Ident:
        known = self._by_tgid.get(tgid)
        if known is not None:
            return known
        if comm is None:
            comm = (read_small(self._procfs / str(tgid) / "comm", 64) or b"")
        name = sanitize(comm) or OTHER
        ns, pod, container = self._pod_of(tgid, cgroup_id)
        ident = (name, ns, pod, container)
        if len(self._by_tgid) > MAX_CACHE:
            self._by_tgid.clear()
        self._by_tgid[tgid] = ident
        return ident

    def note_alive(self, tgid: int, cgroup_id: int) -> None:
        """Capture the cgroup file of a live process (first sighting), keyed by its cgroup id."""
        if self._resolver is None or not cgroup_id or cgroup_id in self._cgroup_bytes:
            return
        raw = read_small(self._procfs / str(tgid) / "cgroup")
        if raw:
            if len(self._cgroup_bytes) > MAX_CACHE:
                self._cgroup_bytes.clear()
            self._cgroup_bytes[cgroup_id] = raw

    def forget(self, tgids: set[int]) -> None:
        for t in tgids:
            self._by_tgid.pop(t, None)

    def _pod_of(self, tgid: int, cgroup_id: int) -> tuple[str, str, str]:
        if self._resolver is None:
            return "", "", ""
        if cgroup_id in self._pod:
            return self._pod[cgroup_id]
        self.note_alive(tgid, cgroup_id)
        raw = self._cgroup_bytes.get(cgroup_id) or self._synthesise(cgroup_id)
        ref = self._resolver.lookup(raw) if raw else None
        out = (sanitize(ref.namespace, 253), sanitize(ref.pod, 253), sanitize(ref.container, 253)) \
            if ref is not None else ("", "", "")
        if len(self._pod) > MAX_CACHE:
            self._pod.clear()
        self._pod[cgroup_id] = out
        return out

    def _synthesise(self, cgroup_id: int) -> bytes | None:
        """``0::/path`` for a cgroup v2 id (= the inode of its directory), found by walking the
        hierarchy once and re-walking on a miss (cgroups of new pods)."""
        if not self._cgroup_root or not cgroup_id:
            return None
        if self._id_paths is None or cgroup_id not in self._id_paths:
            self._id_paths = _index(self._cgroup_root)
        rel = self._id_paths.get(cgroup_id)
        return None if rel is None else b"0::" + os.fsencode(rel) + b"\n"


def _index(root: str) -> dict[int, str]:
    out: dict[int, str] = {}
    stack = [root]
    n = 0
    while stack and n < MAX_WALK:
        d = stack.pop()
        n += 1
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
            ino = os.stat(d).st_ino
        except OSError:
            continue
        rel = "/" + os.path.relpath(d, root).lstrip(".").lstrip("/")
        out[ino] = rel
    return out
