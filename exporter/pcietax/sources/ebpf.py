"""The eBPF staging tracer (BCC): the host copies a staged network -> GPU path costs.

- tracepoints (tens of ns per event): hard IRQ and softirq time, socket payload copied between
  kernel and user per target process (``skb:skb_copy_datagram_iovec`` for receive,
  ``sock:sock_send_length`` for send; see ebpf/pcietax.bpf.c and docs/ebpf.md for why those);
- uprobes (microseconds per hit): CUDA runtime/driver copies, classed pinned/pageable from the
  pinned ranges the allocation probes track; opt-in glibc memcpy into pinned buffers.

The kernel aggregates into per-CPU maps; ``read()`` only walks them (a few dozen keys). The program
text is ``ebpf/pcietax.bpf.c``, shipped in the wheel as ``pcietax/ebpf``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import cuda_libs
from .base import Snapshot, SourceUnavailable
from .ebpf_targets import TargetError, Targets
from .ifunc import IfuncError, resolved_memcpy
from .procfs import parse_interrupts
from .proclabels import DeltaTracker, ProcessFolder

log = logging.getLogger("pcietax")

FileId = tuple[int, int]  # (st_dev, st_ino): one library file, whatever path maps it

SOCKET = "pcietax_socket_copy_bytes_total"
CUDA_BYTES = "pcietax_cuda_copy_bytes_total"
CUDA_CALLS = "pcietax_cuda_copy_calls_total"
MEMCPY = "pcietax_memcpy_bytes_total"
HARDIRQ_S = "pcietax_hardirq_seconds_total"
SOFTIRQ_S = "pcietax_softirq_seconds_total"
STAGING = "pcietax_staging_cpu_seconds_total"
HITS = "pcietax_probe_hits_total"
OVERHEAD = "pcietax_probe_overhead_seconds_total"

# Index = probe id in the BPF program (enum P_*); value = the probe label.
PROBES = ("hardirq", "softirq", "socket_recv", "socket_send", "cuda_copy", "cuda_pinned", "memcpy")
ERRORS = ("process map full", "pinned range table full", "cudaMemcpyDefault with unknown pointers")
SOFTIRQ_VECTORS = ("hi", "timer", "net_tx", "net_rx", "block", "irq_poll", "tasklet", "sched",
                   "hrtimer", "rcu")
DIRECTIONS = ("ingress", "egress")
KINDS = ("h2d", "d2h")

REQUIRED_TRACEPOINTS = ("irq/irq_handler_entry", "irq/irq_handler_exit", "irq/softirq_entry",
                        "irq/softirq_exit", "skb/skb_copy_datagram_iovec")
SEND_TRACEPOINT = "sock/sock_send_length"  # Linux 6.3+
# BCC names TRACEPOINT_PROBE(cat, name) programs tracepoint__cat__name.
TRACEPOINT_PROGS = {
    "hardirq": ("tracepoint__irq__irq_handler_entry", "tracepoint__irq__irq_handler_exit"),
    "softirq": ("tracepoint__irq__softirq_entry", "tracepoint__irq__softirq_exit"),
    "socket_recv": ("tracepoint__skb__skb_copy_datagram_iovec",),
    "socket_send": ("tracepoint__sock__sock_send_length",),
}

# Per-hit cost of each tracepoint probe when kernel.bpf_stats_enabled is off: run_time_ns/run_cnt
# of these very programs measured with bpf_stats_enabled=1 on this project's CI VM (docs/ebpf.md);
# bare metal is lower. Entry and exit programs are one hit together.
TRACEPOINT_COST_S = {"hardirq": 1.4e-6, "softirq": 0.27e-6, "socket_recv": 0.16e-6, "socket_send": 0.22e-6}
UPROBE_COST_S = 4e-6  # until calibrated: the figure for the CI VM


def program_dir() -> Path:
    """ebpf/ inside the installed package, else the repository's ebpf/ (running from a checkout)."""
    try:
        from importlib.resources import files

        p = Path(str(files("pcietax") / "ebpf"))
        if (p / "pcietax.bpf.c").exists():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[3] / "ebpf"


class EbpfSource:
    name = "ebpf"

    def __init__(
        self,
        procfs: str = "/proc",
        sysfs: str = "/sys",
        tracefs: str = "/sys/kernel/tracing",
        modules: str = "/lib/modules",
        program: str | None = None,
        nics: list[str] | None = None,
        target_pids: list[int] | None = None,
        target_comm: str | None = None,
        target_cgroup: str | None = None,
        cgroup_root: str | None = None,
        cuda_libs_given: list[str] | None = None,
        cuda_probes: str = "sampled",
        memcpy: bool = False,
        top_n: int = 20,
        sample_on: float = 1.0,
        sample_period: float = 10.0,
        calibrate: bool = True,
        max_procs: int = 10240,
        bpf_module: Callable[[], Any] | None = None,
    ) -> None:
        if cuda_probes not in ("off", "sampled", "always"):
            raise ValueError(f"cuda_probes must be off, sampled or always, not {cuda_probes!r}")
        if not 0 < sample_on <= sample_period:
            raise ValueError("need 0 < sample_on <= sample_period")
        self._procfs = Path(procfs)
        self._sysfs = Path(sysfs)
        self._tracefs = Path(tracefs)
        self._modules = Path(modules)
        self._program = Path(program) if program else program_dir() / "pcietax.bpf.c"
        self._nics = list(nics or [])
        self._target_args = (list(target_pids or []), target_comm, target_cgroup, cgroup_root)
        self._cuda_given = list(cuda_libs_given or [])
        self._mode = cuda_probes
        self._memcpy = memcpy
        self._top_n = top_n
        self._sample_on = sample_on
        self._sample_period = sample_period
        self._calibrate = calibrate
        self._max_procs = max_procs
        self._bpf_module = bpf_module
        self._lock = threading.RLock()
        self._bpf_cls: Any = None
        self._reset_state()

    def _reset_state(self) -> None:
        self._b: Any = None
        self._targets: Targets | None = None
        self._target_pids: set[int] = set()
        self._send = False
        self._cuda = False
        # (program, library file id, symbol, pid) -> BCC's perf event name of the attached probe
        self._attached: dict[tuple[str, FileId, str, int], bytes] = {}
        self._copy_attached: list[tuple[str, FileId, str, int]] = []
        self._libs: dict[tuple[FileId, int], tuple[str, str]] = {}  # (file id, pid) -> (path, kind)
        self._libc_probed: set[tuple[str, int]] = set()
        self._comm: dict[int, str] = {}
        self._sock = (DeltaTracker(), ProcessFolder(self._top_n))
        self._memcpy_acc = (DeltaTracker(), ProcessFolder(self._top_n))
        self._cuda_bytes = (DeltaTracker(), ProcessFolder(self._top_n))
        self._cuda_calls = (DeltaTracker(), ProcessFolder(self._top_n))
        self._per_hit = {p: TRACEPOINT_COST_S.get(p, UPROBE_COST_S) for p in PROBES}
        self._overhead = dict.fromkeys(PROBES, 0.0)
        self._last_hits: dict[str, float] = {}
        self._last_rt: dict[str, float] = {}
        self._errors_seen = [0] * len(ERRORS)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._next_rescan = 0.0
        self._cuda_found = False
        self._seen_series: set[tuple[str, tuple]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # Configuration errors first, then what this machine lacks, in the order an operator fixes them.
        try:
            pids, comm, cgroup, cgroup_root = self._target_args
            self._targets = Targets(str(self._procfs), pids, comm, cgroup, cgroup_root)
        except TargetError as e:
            raise SourceUnavailable(str(e)) from e
        bpf_cls = self._bpf_cls = self._load_bcc()
        if os.geteuid() != 0:
            raise SourceUnavailable("not root: loading eBPF programs needs root (CAP_BPF, CAP_PERFMON)")
        self._check_headers()
        events = self._tracefs / "events"
        if not events.is_dir():
            raise SourceUnavailable(f"tracefs not mounted at {self._tracefs} "
                                    f"(mount -t tracefs nodev {self._tracefs}; scripts/setup.sh does)")
        missing = [tp for tp in REQUIRED_TRACEPOINTS if not (events / tp / "format").exists()]
        if missing:
            raise SourceUnavailable(
                f"tracepoint {missing[0].replace('/', ':')} missing in {self._tracefs}/events "
                "(this kernel was built without it)")
        self._send = (self._tracefs / "events" / SEND_TRACEPOINT / "format").exists()
        if not self._send:
            log.warning("ebpf: tracepoint sock:sock_send_length missing (Linux < 6.3): "
                        "egress socket copies are not measured")
        if self._memcpy and self._targets.node_wide:
            log.warning("ebpf: memcpy probe needs --target.pid/--target.comm/--target.cgroup "
                        "(node-wide it would trap every memcpy on the node); memcpy probe off")
            self._memcpy = False
        self._cuda = self._mode != "off" or self._memcpy
        try:
            text = self._program.read_bytes()  # BCC wants bytes (a str is deprecated there)
        except OSError as e:
            raise SourceUnavailable(f"cannot read BPF program {self._program}: {e.strerror}") from e
        cflags = ["-Wno-macro-redefined", "-Wno-unknown-warning-option", f"-DPTX_MAX_PROCS={self._max_procs}"]
        if self._send:
            cflags.append("-DPTX_SEND")
        if self._cuda:
            cflags.append("-DPTX_CUDA")
        if self._memcpy:
            cflags.append("-DPTX_MEMCPY")
        if self._targets.cgroup is not None:
            cflags.append("-DPTX_CGROUP")
        with _captured_stderr() as err:
            try:
                self._b = bpf_cls(text=text, cflags=cflags)
            except Exception as e:
                detail = _first_error(err.read()) or str(e).splitlines()[0]
                raise SourceUnavailable(f"BPF compile/load failed: {detail}") from e
        try:
            self._configure()
            if self._calibrate:
                self._calibrate_costs()
            self._refresh_targets(force=True)
            if self._mode == "sampled":
                self._sampler = threading.Thread(target=self._sample_loop, name="pcietax-ebpf-sampler",
                                                 daemon=True)
                self._sampler.start()
        except SourceUnavailable:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise SourceUnavailable(f"eBPF setup failed: {e}") from e

    def close(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
        with self._lock:
            b = self._b
            if b is not None:
                try:
                    b.cleanup()  # detaches every uprobe and tracepoint, closes every program fd
                except Exception as e:
                    log.warning("ebpf: cleanup: %s", e)
            self._reset_state()

    def _load_bcc(self) -> Any:
        if self._bpf_module is not None:
            return self._bpf_module()
        try:
            from bcc import BPF
        except ImportError as e:
            raise SourceUnavailable(
                "bcc not installed: install the distribution package python3-bpfcc "
                "(the PyPI package named 'bcc' is unrelated)") from e
        return BPF

    def _check_headers(self) -> None:
        build = self._modules / os.uname().release / "build"
        if not build.exists():
            raise SourceUnavailable(
                f"no kernel headers at {build}: install linux-headers for this kernel, or link it to "
                "another version's headers as scripts/setup.sh does (docs/ebpf.md)")

    def _configure(self) -> None:
        b = self._b
        assert self._targets is not None
        cfg = b[b"config"]
        cfg[ctypes.c_int(0)] = ctypes.c_uint64(1 if self._targets.node_wide else 0)
        cg = self._targets.cgroup
        if cg is not None:
            cfg[ctypes.c_int(1)] = ctypes.c_uint64(cg.level)
            b[b"target_cgroup"][ctypes.c_uint64(cg.id)] = ctypes.c_uint8(1)

    # -- targets and uprobes -----------------------------------------------------------------

    def _refresh_targets(self, force: bool = False) -> None:
        """Keep the kernel's target set and the per-process uprobes in step with live processes."""
        now = time.monotonic()
        if not force and now < self._next_rescan:
            return
        assert self._targets is not None
        # Target processes are few: follow them closely (new pids, libraries dlopen'ed later).
        # Node-wide discovery reads every process's maps, so it runs less often.
        self._next_rescan = now + (10.0 if self._targets.node_wide else 2.0)
        with self._lock:
            pids = self._targets.resolve()
            tmap = self._b[b"targets"]
            for pid in pids - self._target_pids:
                tmap[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
            for pid in self._target_pids - pids:
                with contextlib.suppress(KeyError):
                    del tmap[ctypes.c_uint32(pid)]
            self._target_pids = pids
            if self._cuda:
                self._attach_cuda(pids)
                self._drop_dead_pinned()
            if self._memcpy:
                self._attach_memcpy(pids)

    def _drop_dead_pinned(self) -> None:
        """Pinned-range tables of exited processes (those that never copied are not in _comm)."""
        table = self._b[b"pinned"]
        for k in list(table.keys()):
            if not (self._procfs / str(k.value)).exists():
                with contextlib.suppress(KeyError):
                    del table[k]

    def _cuda_libraries(self, pids: set[int]) -> dict[tuple[FileId, int], tuple[str, str]]:
        """(library file identity, pid to attach for; -1 = every process) -> (a live path to it,
        'runtime' | 'driver'). One entry per file, whatever paths processes map it under."""
        assert self._targets is not None
        out: dict[tuple[FileId, int], tuple[str, str]] = {}
        node_wide = self._targets.node_wide
        attach_pids = [-1] if node_wide else sorted(pids)
        for path in self._cuda_given:
            fid = cuda_libs.file_id(path)
            if fid is None:
                continue
            kind = cuda_libs.lib_kind(os.path.realpath(path)) or cuda_libs.lib_kind(path) or "runtime"
            for pid in attach_pids:
                out[(fid, pid)] = (path, kind)
        if node_wide:
            scan = [int(e.name) for e in os.scandir(self._procfs) if e.name.isdigit()]
        else:
            scan = sorted(pids)
        for pid in scan:
            for pat in (cuda_libs.RUNTIME_RE, cuda_libs.DRIVER_RE):
                for path in cuda_libs.discover(self._procfs, pid, pat):
                    fid = cuda_libs.file_id(path)
                    if fid is not None:
                        kind = cuda_libs.lib_kind(path) or "runtime"
                        out.setdefault((fid, -1 if node_wide else pid), (path, kind))
        return out

    def _attach_cuda(self, pids: set[int]) -> None:
        libs = self._cuda_libraries(pids)
        # Target processes that exited: release their probes (perf event fds) now.
        for key in [k for k in self._libs if k[1] >= 0 and k[1] not in pids]:
            self._detach_where(lambda a, key=key: (a[1], a[3]) == key)
            del self._libs[key]
        # The runtime's copies call the driver's: once any driver library is probed, runtime copies
        # must mark their thread (config[2]) and clear the mark on return, before anything attaches.
        drivers = any(k == "driver" for _, k in (*self._libs.values(), *libs.values()))
        self._b[b"config"][ctypes.c_int(2)] = ctypes.c_uint64(1 if drivers else 0)
        for key, (path, kind) in sorted(libs.items(), key=lambda kv: kv[1][1] != "driver"):
            if key in self._libs:
                self._libs[key] = (path, kind)  # keep a live path (the process we found it in may exit)
                continue
            self._libs[key] = (path, kind)
            self._cuda_found = True
            fid, pid = key
            pinned = cuda_libs.RUNTIME_PINNED_PROBES if kind == "runtime" else cuda_libs.DRIVER_PINNED_PROBES
            n = self._attach_set(path, fid, pid, pinned, copy=False)
            if self._mode == "always":
                n += self._attach_copy_probes(path, fid, pid, kind)
            log.info("ebpf: probing %s library %s%s (%d probes)", kind, path,
                     "" if pid < 0 else f" for pid {pid}", n)
        if drivers and self._mode == "always":  # runtime libraries probed before a driver appeared
            for (fid, pid), (path, kind) in self._libs.items():
                if kind == "runtime":
                    self._attach_set(path, fid, pid, cuda_libs.RUNTIME_COPY_RET, copy=True)

    def _attach_copy_probes(self, path: str, fid: FileId, pid: int, kind: str) -> int:
        if kind == "runtime":
            n = self._attach_set(path, fid, pid, cuda_libs.RUNTIME_COPY_PROBES, copy=True)
            if any(k == "driver" for _, k in self._libs.values()):
                n += self._attach_set(path, fid, pid, cuda_libs.RUNTIME_COPY_RET, copy=True)
            return n
        return self._attach_set(path, fid, pid, cuda_libs.DRIVER_COPY_PROBES, copy=True)

    def _attach_set(self, path: str, fid: FileId, pid: int, probes: cuda_libs.ProbeSet, copy: bool) -> int:
        present = _symbols(path)
        n = 0
        for is_ret, table in ((False, probes.entry), (True, probes.ret)):
            for fn, syms in table.items():
                for sym in syms:
                    if sym not in present:
                        continue
                    key = (fn, fid, sym, pid)
                    if key in self._attached:
                        continue
                    try:
                        # BCC names the perf event from the resolved path and offset; keep that name,
                        # so detaching never needs the file again (its process may be gone).
                        rpath, addr = self._bpf_cls._check_path_symbol(
                            path.encode(), sym.encode(), None, pid)
                        ev = self._b._get_uprobe_evname(b"r" if is_ret else b"p", rpath, addr, pid)
                        attach = self._b.attach_uretprobe if is_ret else self._b.attach_uprobe
                        attach(name=path.encode(), sym=sym.encode(), fn_name=fn.encode(), pid=pid)
                    except Exception as e:  # a process that just exited, an unreadable file
                        log.debug("ebpf: attach %s to %s:%s pid %d failed: %s", fn, path, sym, pid, e)
                        continue
                    self._attached[key] = ev
                    if copy:
                        self._copy_attached.append(key)
                    n += 1
        return n

    def _detach_where(self, match: Callable[[tuple], bool]) -> None:
        for key in [k for k in self._attached if match(k)]:
            ev = self._attached.pop(key)
            try:
                self._b.detach_uprobe_event(ev)
            except Exception as e:
                log.debug("ebpf: detach %s: %s", ev, e)
        self._copy_attached = [k for k in self._copy_attached if k in self._attached]

    def _detach_copy_probes(self) -> None:
        copy = set(self._copy_attached)
        self._detach_where(lambda k: k in copy)

    def _attach_memcpy(self, pids: set[int]) -> None:
        try:
            our_libc, vaddr = resolved_memcpy()
        except (IfuncError, OSError) as e:
            log.warning("ebpf: memcpy probe off: cannot resolve memcpy's IFUNC: %s", e)
            self._memcpy = False
            return
        for pid in pids:
            for path in cuda_libs.discover(self._procfs, pid, cuda_libs.LIBC_RE):
                if (path, pid) in self._libc_probed:
                    continue
                self._libc_probed.add((path, pid))
                if not cuda_libs.same_file(path, our_libc):
                    log.warning("ebpf: memcpy probe skips pid %d: its libc %s is not %s, whose IFUNC "
                                "choice we resolved", pid, path, our_libc)
                    continue
                try:
                    self._b.attach_uprobe(name=path.encode(), addr=vaddr, fn_name=b"ptx_memcpy", pid=pid)
                except Exception as e:
                    log.warning("ebpf: memcpy probe on pid %d failed: %s", pid, e)

    # -- sampled CUDA copy probes ------------------------------------------------------------

    def _sample_loop(self) -> None:
        """Attach the copy probes for ``sample_on`` seconds in every ``sample_period``; at the end
        of each window, scale what it counted by (time since the last window ended) / (time the
        probes were attached). Both are measured, not assumed: attaching and detaching take time
        (symbol lookups, one perf event per probe), which would otherwise bias the estimate."""
        last_end = time.monotonic()
        while not self._stop.wait(self._sample_period - self._sample_on):
            with self._lock:
                if self._b is None:
                    return
                a0 = time.monotonic()
                for (fid, pid), (path, kind) in list(self._libs.items()):
                    self._attach_copy_probes(path, fid, pid, kind)
                a1 = time.monotonic()
            if self._stop.wait(self._sample_on):
                return
            with self._lock:
                if self._b is None:
                    return
                d0 = time.monotonic()
                self._detach_copy_probes()
                d1 = time.monotonic()
                on = max((d0 + d1) / 2 - (a0 + a1) / 2, 1e-3)  # each probe is live from mid-attach
                self._fold_cuda(scale=(d1 - last_end) / on)
                # Dead processes' entries go only now that their last window is folded.
                self._fold_per_process()
                self._cleanup_dead()
                log.debug("ebpf: sample window on %.3fs of %.3fs (attach %.3fs, detach %.3fs)",
                          on, d1 - last_end, a1 - a0, d1 - d0)
                last_end = d1

    def _fold_cuda(self, scale: float) -> None:
        raw_b: dict[tuple[int, Any], float] = {}
        raw_c: dict[tuple[int, Any], float] = {}
        for k, vals in self._b[b"cuda_copies"].items():
            memory = "pinned" if k.pinned else "pageable"
            key = (int(k.tgid), (KINDS[k.kind] if k.kind < 2 else "h2d", memory))
            raw_b[key] = float(sum(v.bytes for v in vals))
            raw_c[key] = float(sum(v.calls for v in vals))
        self._learn_comms({t for t, _ in raw_b})
        for raw, (tracker, folder) in ((raw_b, self._cuda_bytes), (raw_c, self._cuda_calls)):
            folder.add(tracker.deltas(raw), self._comm, scale)

    # -- reading -----------------------------------------------------------------------------

    def read(self) -> Snapshot:
        with self._lock:
            if self._b is None:
                raise SourceUnavailable("not started")
            provides = {SOCKET, HARDIRQ_S, SOFTIRQ_S, STAGING, HITS, OVERHEAD}
            # Measured from the first CUDA library found on: a target exiting (its probes released)
            # must not flip the host_to_gpu hop to another source while its last bytes arrive.
            if self._cuda and self._mode != "off" and self._cuda_found:
                provides |= {CUDA_BYTES, CUDA_CALLS}
            if self._memcpy:
                provides.add(MEMCPY)
            snap = Snapshot(provides=frozenset(provides))
            self._check_errors(snap)
            self._refresh_targets()
            self._fold_per_process()
            if self._cuda and self._mode == "always":
                self._fold_cuda(scale=1.0)
            self._emit_per_process(snap)
            self._read_irqs(snap)
            self._read_hits(snap)
            if self._mode != "sampled":
                self._cleanup_dead()  # sampled: after each window's fold (_sample_loop)
            return snap

    def _check_errors(self, snap: Snapshot) -> None:
        errs = self._b[b"errors"]
        for i, what in enumerate(ERRORS):
            n = int(errs[ctypes.c_int(i)].value)
            if n > self._errors_seen[i]:
                self._errors_seen[i] = n
                if i == 0:
                    # Down for as long as updates are being lost: the counts are short meanwhile.
                    raise SourceUnavailable(f"BPF map full: {n} updates lost (more than "
                                            f"{self._max_procs} traced processes at once)")
                snap.fault(what, f"ebpf ({n} so far)")

    def _learn_comms(self, tgids: set[int]) -> None:
        unknown = tgids - self._comm.keys()
        if not unknown:
            return
        kernel = self._b[b"comms"]
        for tgid in unknown:
            try:
                comm = (self._procfs / str(tgid) / "comm").read_text().strip()
            except OSError:
                try:
                    comm = kernel[ctypes.c_uint32(tgid)].comm.decode(errors="replace")
                except KeyError:
                    comm = "other"
            self._comm[tgid] = comm or "other"

    def _emit(self, snap: Snapshot, family: str, value: float, **labels: str) -> None:
        """A per-process series that appears after the source started carries bytes counted since
        then; the engine takes any series' first value as its baseline, so a new series is shown at
        0 for one cycle first and its bytes arrive, not vanish, in the next."""
        key = (family, tuple(sorted(labels.items())))
        if key not in self._seen_series:
            self._seen_series.add(key)
            value = 0.0
        snap.counter(family, value, **labels)

    def _fold_per_process(self) -> None:
        """Socket and memcpy bytes per (tgid, direction) -> per (process label, direction)."""
        tables = [(b"sock_bytes", self._sock)]
        if self._memcpy:
            tables.append((b"memcpy_bytes", self._memcpy_acc))
        for name, (tracker, folder) in tables:
            raw: dict[tuple[int, Any], float] = {}
            for k, vals in self._b[name].items():
                raw[(int(k.tgid), DIRECTIONS[k.dir])] = float(sum(vals))
            self._learn_comms({t for t, _ in raw})
            folder.add(tracker.deltas(raw), self._comm)

    def _emit_per_process(self, snap: Snapshot) -> None:
        """Every series of every process label at once, zeros included: a process's second kind of
        traffic (its first pinned copy after pageable ones) then lands on a series the engine
        already knows, instead of waiting a cycle as a new one."""
        sock, mc = self._sock[1].totals(), self._memcpy_acc[1].totals()
        cb, cc = self._cuda_bytes[1].totals(), self._cuda_calls[1].totals()
        procs = sorted({p for p, _ in (*sock, *mc, *cb, *cc)})
        for proc in procs:
            for d in DIRECTIONS:
                self._emit(snap, SOCKET, sock.get((proc, d), 0.0), direction=d, process=proc)
                if self._memcpy:
                    self._emit(snap, MEMCPY, mc.get((proc, d), 0.0), direction=d, process=proc)
            if self._cuda:
                for kind in KINDS:
                    for mem in ("pinned", "pageable"):
                        k = (proc, (kind, mem))
                        self._emit(snap, CUDA_BYTES, cb.get(k, 0.0), kind=kind, memory=mem, process=proc)
                        self._emit(snap, CUDA_CALLS, cc.get(k, 0.0), kind=kind, memory=mem, process=proc)

    def _read_irqs(self, snap: Snapshot) -> None:
        names = self._irq_names(snap)
        nic_irqs = self._nic_irqs(names)
        staging_hard = 0.0
        for k, vals in self._b[b"irq_ns"].items():
            irq = str(k.value)
            secs = sum(vals) / 1e9
            snap.counter(HARDIRQ_S, secs, irq=irq, name=names.get(irq, ""))
            if irq in nic_irqs:
                staging_hard += secs
        soft = self._b[b"softirq_ns"]
        for i, vec in enumerate(SOFTIRQ_VECTORS):
            secs = sum(soft[ctypes.c_int(i)]) / 1e9
            snap.counter(SOFTIRQ_S, secs, vector=vec)
            if vec == "net_rx":
                snap.counter(STAGING, secs, kind="softirq_net_rx")
            elif vec == "net_tx":
                snap.counter(STAGING, secs, kind="softirq_net_tx")
        snap.counter(STAGING, staging_hard, kind="hardirq")

    def _irq_names(self, snap: Snapshot) -> dict[str, str]:
        where = str(self._procfs / "interrupts")
        tmp = Snapshot()
        try:
            parse_interrupts(Path(where).read_text(), tmp, where)
        except OSError as e:
            snap.fault(f"cannot read ({e.strerror})", where)
            return {}
        return {dict(s.labels)["irq"]: dict(s.labels)["name"] for s in tmp.counters}

    def _nic_irqs(self, names: dict[str, str]) -> set[str]:
        """IRQ lines of the measured NICs: the MSI vectors of their PCI functions (sysfs), plus any
        line whose action name carries the interface name (e.g. ``eth0-TxRx-0``)."""
        out: set[str] = set()
        net = self._sysfs / "class/net"
        try:
            ifaces = self._nics or [e.name for e in os.scandir(net) if (net / e.name / "device").exists()]
        except OSError:
            return out
        for iface in ifaces:
            dev = net / iface / "device"
            for d in (dev, dev / ".."):
                with contextlib.suppress(OSError):
                    out.update(e.name for e in os.scandir(d / "msi_irqs"))
            # Action names carry the interface (eth0-TxRx-0) or the bus device (virtio2-input.0).
            tags = {iface}
            with contextlib.suppress(OSError):
                tags.add(dev.resolve(strict=True).name)
            out.update(irq for irq, name in names.items()
                       if any(part == t or part.startswith(t + "-") for part in name.split() for t in tags))
        return out

    def _read_hits(self, snap: Snapshot) -> None:
        """Hits from the programs' own counter; cost from the kernel's run time of the tracepoint
        programs while kernel.bpf_stats_enabled is 1, otherwise hits x a per-hit cost (uprobes:
        calibrated at start, since their trap costs far more than the program the kernel times).
        Accumulated by delta, so toggling bpf_stats_enabled never makes the counter go back."""
        hits = self._b[b"hits"]
        stats = _bpf_stats_enabled(self._procfs)
        for i, probe in enumerate(PROBES):
            n = float(sum(hits[ctypes.c_int(i)]))
            dn = max(0.0, n - self._last_hits.get(probe, 0.0))
            self._last_hits[probe] = n
            rt = self._run_time(probe) if stats and probe in TRACEPOINT_PROGS else None
            last_rt = self._last_rt.pop(probe, None)
            if rt is not None and last_rt is not None:
                self._overhead[probe] += max(0.0, rt - last_rt)
            else:
                self._overhead[probe] += dn * self._per_hit[probe]
            if rt is not None:
                self._last_rt[probe] = rt
            snap.counter(HITS, n, probe=probe)
            snap.counter(OVERHEAD, self._overhead[probe], probe=probe)

    def _run_time(self, probe: str) -> float | None:
        """Seconds the kernel says this probe's programs ran (bpf_stats), from their fdinfo."""
        total = 0.0
        for fn in TRACEPOINT_PROGS[probe]:
            f = self._b.funcs.get(fn.encode())
            if f is None:
                continue
            try:
                text = Path(f"/proc/self/fdinfo/{f.fd}").read_text()
            except OSError:
                return None
            for line in text.splitlines():
                if line.startswith("run_time_ns:"):
                    total += int(line.split()[1]) / 1e9
        return total

    def _cleanup_dead(self) -> None:
        """Drop map entries of processes that exited (their bytes are already folded)."""
        tgids = {t for t in self._comm if not (self._procfs / str(t)).exists()}
        if not tgids:
            return
        names = ["sock_bytes", "comms"]
        if self._cuda:
            names += ["cuda_copies", "pinned"]
        if self._memcpy:
            names.append("memcpy_bytes")
        for name in names:
            table = self._b[name.encode()]
            for k in list(table.keys()):
                t = int(getattr(k, "tgid", getattr(k, "value", -1)))
                if t in tgids:
                    with contextlib.suppress(KeyError):
                        del table[k]
        for tracker in (self._sock[0], self._memcpy_acc[0], self._cuda_bytes[0], self._cuda_calls[0]):
            tracker.forget(tgids)
        for t in tgids:
            del self._comm[t]

    # -- the exporter's own tax --------------------------------------------------------------

    def _calibrate_costs(self) -> None:
        """Measure one uprobe hit here: time a libc call with and without a probe of a copy
        probe's size on it (the trap dominates; ~0.3-1.7 us on bare metal, ~4 us on VMs)."""
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        libc = ctypes.CDLL(libc_name)
        fn = libc.labs
        fn.restype = ctypes.c_long
        fn.argtypes = [ctypes.c_long]
        path = _libc_path()
        n = 20000

        def timed() -> float:
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for i in range(n):
                    fn(i)
                best = min(best, time.perf_counter() - t)
            return best

        base = timed()
        try:
            self._b.attach_uprobe(name=path.encode(), sym=b"labs", fn_name=b"ptx_calibrate",
                                  pid=os.getpid())
        except Exception as e:
            log.warning("ebpf: uprobe calibration failed (%s); assuming %.1f us per uprobe hit",
                        e, UPROBE_COST_S * 1e6)
            per = UPROBE_COST_S
        else:
            try:
                probed = timed()
            finally:
                self._b.detach_uprobe(name=path.encode(), sym=b"labs", pid=os.getpid())
            per = max((probed - base) / n, 0.0)
        for p in ("cuda_copy", "cuda_pinned", "memcpy"):
            self._per_hit[p] = per
        log.info("ebpf: calibrated uprobe cost %.2f us per hit", per * 1e6)


def _bpf_stats_enabled(procfs: Path) -> bool:
    try:
        return (procfs / "sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
    except OSError:
        return False


def _libc_path() -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and cuda_libs.LIBC_RE.search(parts[5].strip()):
                return parts[5].strip()
    return "c"


_SYMBOL_CACHE: dict[tuple[int, int], set[str]] = {}


def _symbols(path: str) -> set[str]:
    """Dynamic function symbols of a library (cached by file identity)."""
    fid = cuda_libs.file_id(path)
    if fid is None:
        return set()
    if fid not in _SYMBOL_CACHE:
        from bcc import BPF

        try:
            syms = {s.decode() for s, _ in BPF.get_user_functions_and_addresses(path, r".*")}
        except Exception:
            syms = set()
        _SYMBOL_CACHE[fid] = syms
    return _SYMBOL_CACHE[fid]


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Any]:
    """BCC's compiler writes diagnostics straight to fd 2; capture them for the reason line."""
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield _Reader(tmp)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _Reader:
    def __init__(self, f: Any) -> None:
        self._f = f

    def read(self) -> str:
        self._f.flush()
        self._f.seek(0)
        return self._f.read().decode(errors="replace")


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error:" in line:
            return line.strip()
    return ""
