"""Kubernetes pod attribution of a process: its ``/proc/PID/cgroup`` -> (namespace, pod, container).

Two steps, both from files the node already has (no API server, no gRPC):

1. The cgroup path names the pod UID and the container ID. Every layout the kubelet and the CRI
   runtimes make is recognised by its path components, wherever they sit in the path (the exporter's
   own cgroup namespace shows other pods' paths as ``/../../kubepods-...``):

   - systemd driver (cgroup v1 or v2): ``kubepods.slice/kubepods-<qos>.slice/
     kubepods-<qos>-pod<uid, '-' written '_'>.slice/<runtime>-<64 hex>.scope`` with runtime
     ``cri-containerd``, ``crio`` or ``docker`` (cri-dockerd); Guaranteed pods have no QoS level.
   - cgroupfs driver: ``kubepods/<qos>/pod<uid>/<64 hex>`` (``crio-<64 hex>`` with CRI-O).
   - kind and other nested nodes: any prefix, e.g. ``/kubelet.slice/kubelet-kubepods.slice/...``.

   Static pods' UIDs are 32 hex digits (the kubelet's config hash), others RFC 4122 UUIDs.
   A process in the pod's sandbox (``pause``) or in CRI-O's ``crio-conmon-<id>`` has a pod but no
   container: the container is ``""``.

2. Names come from the kubelet's log directory, mounted read-only: ``/var/log/pods/
   <namespace>_<pod>_<uid>/<container>/<restart>.log``. The container *name* is the directory;
   which directory holds which container *ID* is read from the names of the kubelet's symlinks in
   the sibling ``/var/log/containers/<pod>_<namespace>_<container>-<container id>.log`` (only the
   names: the links are never followed). Without that directory, a pod with one container
   directory names it; otherwise the container is ``""``. Namespaces, pod and container names are
   DNS labels/subdomains (no ``_``), so ``_`` splits the names unambiguously. The kubelet's
   pod-resources gRPC socket would give the same answer but needs gRPC; it is not used.

Everything read is hostile: cgroup bytes and directory names may be any bytes (invalid UTF-8,
huge), so inputs are capped, names that are not valid Kubernetes names are ignored, and every cache
is bounded. Outside Kubernetes every lookup is None and costs one regex search.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pcietax")

MAX_CGROUP_BYTES = 64 << 10  # a real /proc/PID/cgroup is a few hundred bytes (v1: ~15 lines)
MAX_LINES = 64
MAX_DIR_ENTRIES = 20000  # a node runs at most a few hundred pods (kubelet maxPods: 110 by default)
CACHE_SIZE = 4096  # distinct cgroup files remembered
RESCAN_INTERVAL = 2.0  # at most one directory listing per this many seconds, on a miss

_HEX64 = rb"[0-9a-f]{64}"
_UID = rb"(?:[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|[0-9a-f]{32})"
# A pod component: systemd "[prefix-]kubepods[-qos]-pod<uid>.slice" (kind prefixes "kubelet-") or
# cgroupfs "pod<uid>".
_POD = re.compile(rb"(?:^|/)(?:(?:[a-z0-9]+-)*kubepods(?:-[a-z]+)?-pod(" + _UID + rb")\.slice|pod("
                  + _UID + rb"))(?=/|$)")
# The container component right after the pod component. (CRI-O's "crio-conmon-<id>.scope" is
# the container monitor, not a container: it does not match.)
_CONTAINER = re.compile(
    rb"^/(?:(?:cri-containerd|crio|docker)-(" + _HEX64 + rb")\.scope|(" + _HEX64 + rb")|crio-("
    + _HEX64 + rb"))(?=/|$)"
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_UID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
_LINK = re.compile(r"(?P<pod>[^_]+)_(?P<ns>[^_]+)_(?P<container>[^_]+)-(?P<id>[0-9a-f]{64})\.log")


@dataclass(frozen=True)
class PodRef:
    namespace: str
    pod: str
    container: str


def parse_cgroup(data: bytes) -> tuple[str, str] | None:
    """(pod UID with dashes, container ID or "") from raw /proc/PID/cgroup bytes; None when no
    line names a Kubernetes pod. The v2 line (``0::``) is preferred; v1 lines follow in order."""
    if len(data) > MAX_CGROUP_BYTES:
        data = data[:MAX_CGROUP_BYTES]
    lines = data.split(b"\n", MAX_LINES)[:MAX_LINES]
    paths = []
    for line in lines:
        parts = line.split(b":", 2)
        if len(parts) == 3:
            paths.append((parts[0] != b"0", parts[2].strip()))
    best: tuple[str, str] | None = None
    for _, path in sorted(paths, key=lambda p: p[0]):  # stable: v2 first, then v1 in file order
        m = _POD.search(path)
        if m is None:
            continue
        uid = (m.group(1) or m.group(2)).replace(b"_", b"-").decode("ascii")
        rest = path[m.end():]
        c = _CONTAINER.match(rest)
        cid = next((g for g in c.groups() if g), b"").decode("ascii") if c else ""
        if cid:
            return uid, cid
        # The pod's own cgroup (sandbox, conmon), or a v1 line that stops at the pod: keep looking
        # for a line that names the container.
        best = best or (uid, "")
    return best


class PodResolver:
    """Thread-safe; every cache bounded. ``pods_dir`` None (``--path.pods=""``): always None."""

    def __init__(self, pods_dir: Path | None = Path("/var/log/pods"), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pods = pods_dir
        self._links = pods_dir.parent / "containers" if pods_dir is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, PodRef | None] = OrderedDict()
        self._by_uid: dict[str, tuple[str, str, str]] = {}  # uid -> (namespace, pod, directory name)
        self._by_cid: dict[str, str] = {}  # container id -> container name
        self._scanned: dict[str, tuple[float, int]] = {}  # which dir -> (when listed, its mtime)
        self._warned = False
        self._links_readable = False

    def lookup(self, proc_cgroup: bytes) -> PodRef | None:
        if self._pods is None:
            return None
        key = bytes(proc_cgroup[:MAX_CGROUP_BYTES])
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            ids = parse_cgroup(key)
            if ids is None:
                return self._remember(key, None)
            ref, complete = self._resolve(*ids)
            # A pod or container whose log directory or link is not there yet (just created) is
            # looked up again next time (each listing is rate-limited and skipped when unchanged).
            return self._remember(key, ref) if complete else ref

    def _remember(self, key: bytes, ref: PodRef | None) -> PodRef | None:
        self._cache[key] = ref
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return ref

    def _resolve(self, uid: str, cid: str) -> tuple[PodRef | None, bool]:
        """(the answer, whether it is final)."""
        if uid not in self._by_uid:
            self._scan_pods()
        hit = self._by_uid.get(uid)
        if hit is None:
            return None, False
        ns, pod, dirname = hit
        if not cid:
            return PodRef(ns, pod, ""), True
        name = self._by_cid.get(cid)
        if name is None:
            self._scan_links()
            name = self._by_cid.get(cid)
        if name is not None:
            return PodRef(ns, pod, name), True
        if self._links_readable:
            # Not linked (yet): a container just created, or the pod's sandbox (pause), which logs
            # nothing. The only-directory guess below would name the sandbox after the app.
            return PodRef(ns, pod, ""), False
        only = self._containers_of(dirname)
        return PodRef(ns, pod, only[0] if len(only) == 1 else ""), False

    def _due(self, d: Path) -> bool:
        """List a directory again only when it changed (mtime) and not more than once per interval."""
        try:
            mtime = os.stat(d).st_mtime_ns
        except OSError as e:
            if not self._warned and d == self._pods:
                self._warned = True
                log.info("pod labels: cannot read %s (%s): not on Kubernetes, or the kubelet's log "
                         "directory is not mounted; per-process series carry no pod", d, e.strerror)
            return False
        last = self._scanned.get(str(d))
        now = self._clock()
        if last is not None and (last[1] == mtime or now - last[0] < RESCAN_INTERVAL):
            return False
        self._scanned[str(d)] = (now, mtime)
        return True

    def _scan_pods(self) -> None:
        assert self._pods is not None
        if not self._due(self._pods):
            return
        found: dict[str, tuple[str, str, str]] = {}
        for name in _listdir(self._pods):
            parts = name.split("_")
            if len(parts) != 3:
                continue
            ns, pod, uid = parts
            if _DNS_LABEL.fullmatch(ns) and _DNS_SUBDOMAIN.fullmatch(pod) and _UID_TEXT.fullmatch(uid):
                found[uid] = (ns, pod, name)
        self._by_uid = found

    def _scan_links(self) -> None:
        assert self._links is not None
        self._links_readable = os.access(self._links, os.R_OK | os.X_OK)
        if not self._due(self._links):
            return
        found: dict[str, str] = {}
        for name in _listdir(self._links):
            m = _LINK.fullmatch(name)
            if m and _DNS_LABEL.fullmatch(m["container"]):
                found[m["id"]] = m["container"]
        self._by_cid = found

    def _containers_of(self, dirname: str) -> list[str]:
        assert self._pods is not None
        return [n for n in _listdir(self._pods / dirname) if _DNS_LABEL.fullmatch(n)][:2]


def _listdir(d: Path) -> list[str]:
    """Names of ``d`` that are ASCII text, at most MAX_DIR_ENTRIES; [] when it cannot be read."""
    out: list[str] = []
    try:
        with os.scandir(os.fsencode(d)) as it:
            for entry in it:
                try:
                    out.append(entry.name.decode("ascii"))
                except UnicodeDecodeError:
                    continue  # no Kubernetes name has such bytes
                if len(out) >= MAX_DIR_ENTRIES:
                    break
    except OSError:
        return []
    return out
