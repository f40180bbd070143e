"""The eBPF staging tracer (BCC): the host copies a staged network -> GPU path costs.

The kernel aggregates per tgid (with comm and cgroup id captured at event time) into bounded maps;
``read()`` folds them into labelled counters. Probes are grouped (socket payload, CUDA copies, IRQ
timing) and the budget governor duty-cycles the groups to stay within ``--probe.budget``. The
package's other modules each do one job: ``loader`` (environment and compile), ``attach`` (uprobes
once per library file), ``governor``, ``idents`` (labels, pods), ``selfcost``, ``defs`` (the one
definition shared with the C program).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from ... import catalog
from .. import cuda_libs
from ..base import Snapshot, SourceUnavailable
from ..ebpf_targets import TargetError, Targets, cgroup2_mount
from ..ifunc import IfuncError, resolved_memcpy
from ..procfs import read_interrupts
from ..proclabels import DeltaTracker, ProcessFolder
from . import defs, elf, loader, selfcost
from .attach import Attached, CudaProbes, UprobeAttacher
from .estimate import WindowEstimator, process_start
from .governor import Governor, GroupState
from .idents import OTHER_IDENT, Ident, Identities, PodResolverLike
from .switch import GroupSwitch, close_all

log = logging.getLogger("pcietax")

SOCKET = catalog.SOCKET_COPY_BYTES
CUDA_BYTES = catalog.CUDA_COPY_BYTES
CUDA_CALLS = catalog.CUDA_COPY_CALLS
MEMCPY = catalog.MEMCPY_BYTES
HARDIRQ_S = catalog.HARDIRQ_SECONDS
SOFTIRQ_S = catalog.SOFTIRQ_SECONDS
STAGING = catalog.STAGING_CPU_SECONDS
HITS = catalog.PROBE_HITS
OVERHEAD = catalog.PROBE_OVERHEAD_SECONDS
DROPS = catalog.PROBE_DROPS
REQUIRED_TRACEPOINTS = loader.REQUIRED_TRACEPOINTS

DEFAULT_BUDGET = 0.005  # CPU seconds per second, all probes together (docs/ebpf.md)
# Raw tracepoints (name -> program) wherever the arguments allow it: ~40 ns a dispatch instead of
# 100-190 ns, and a detach that does not wait for a grace period. sched_process_fork stays a
# perf-event tracepoint: its record gives the child's tgid without reading task_struct.
TRACEPOINTS = {
    "irq": (("irq_handler_entry", True), ("irq_handler_exit", True), ("softirq_entry", True),
            ("softirq_exit", True)),
    "socket": (("sock_recv_length", True), ("sock_send_length", True)),
    "socket_fallback": (("skb_copy_datagram_iovec", True),),
    "follow": (("sched:sched_process_fork", False), ("sched_process_exec", True)),
    "exit": (("sched_process_exit", True),),
}


def tp_program(tp: str, raw: bool) -> str:
    """BCC's name for the program of a TRACEPOINT_PROBE / RAW_TRACEPOINT_PROBE."""
    return f"raw_tracepoint__{tp}" if raw else "tracepoint__" + tp.replace(":", "__")


PROBE_PROGRAMS = {  # probe label -> programs whose kernel run time it is
    "hardirq": ("raw_tracepoint__irq_handler_entry", "raw_tracepoint__irq_handler_exit"),
    "softirq": ("raw_tracepoint__softirq_entry", "raw_tracepoint__softirq_exit"),
    "socket_recv": ("raw_tracepoint__sock_recv_length", "raw_tracepoint__skb_copy_datagram_iovec"),
    "socket_send": ("raw_tracepoint__sock_send_length",),
    "cuda_copy": tuple(f"{p}__{s}" for p in ("cuda_memcpy", "cu_htod", "cu_dtoh") for s in defs.SITES),
    "cuda_pinned": (*(f"{p}__{s}" for p in ("host_pin_entry", "host_free") for s in defs.SITES),
                    "ptx_host_alloc_ret", "ptx_host_register_ret"),
    "memcpy": tuple(f"memcpy_probe__{s}" for s in defs.SITES),
}
NAMES_REFRESH_S = 30.0
FOLD_MIN_S = 1.0  # an open window is folded once it has run this long (or when it closes)


def program_dir() -> Path:
    return loader.program_path().parent


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
        probe_budget: float = DEFAULT_BUDGET,
        budget_period: float = 10.0,
        min_duty: float = 0.02,
        calibrate: bool = True,
        max_procs: int = 10240,
        bpf_module: Any = None,
        pod_resolver: PodResolverLike | None = None,
        force_fallback: bool = False,
    ) -> None:
        if cuda_probes not in ("off", "sampled", "always"):
            raise ValueError(f"cuda_probes must be off, sampled or always, not {cuda_probes!r}")
        if not probe_budget > 0 or probe_budget != probe_budget or probe_budget == float("inf"):
            raise ValueError("probe_budget must be a positive number of CPU seconds per second")
        if not budget_period > 0:
            raise ValueError("budget_period must be > 0")
        self._procfs = Path(procfs)
        self._sysfs = Path(sysfs)
        self._tracefs = Path(tracefs)
        self._modules = Path(modules)
        self._program = Path(program) if program else loader.program_path()
        self._nics = list(nics or [])
        self._target_args = (list(target_pids or []), target_comm, target_cgroup, cgroup_root)
        self._comm_re = None
        self._cuda_given = list(cuda_libs_given or [])
        self._mode = cuda_probes
        self._memcpy_wanted = memcpy
        self._top_n = top_n
        self._budget = probe_budget
        self._period = budget_period
        self._min_duty = min_duty
        self._calibrate = calibrate
        self._max_procs = max_procs
        self._bpf_module = bpf_module
        self._resolver = pod_resolver
        self._force_fallback = force_fallback
        self._lock = threading.RLock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._b: Any = None
        self._targets: Targets | None = None
        self._sock_length = True
        self._cuda = False
        self._memcpy = self._memcpy_wanted
        self._readtime = False
        self._follow = False
        self._cuda_probes: CudaProbes | None = None
        self._attacher: UprobeAttacher | None = None
        self._memcpy_probes: dict[tuple[str, int], Attached] = {}
        self._given_seeded: set[int] = set()
        self._tp_on: dict[str, bool] = {}
        self._governor: Governor | None = None
        self._switch: GroupSwitch | None = None
        self._exit_time = False
        self._idents: Identities | None = None
        self._acc = {n: (DeltaTracker(), ProcessFolder(self._top_n, OTHER_IDENT))
                     for n in ("sock", "memcpy", "cuda_bytes", "cuda_calls")}
        self._est = {n: WindowEstimator() for n in self._acc}
        self._starts: dict[int, float] = {}
        self._irq_last: dict[tuple[str, str], float] = {}
        self._irq_tot: dict[tuple[str, str], float] = {}
        self._names: dict[str, str] = {}
        self._irq_lines: Any = None
        self._nic_cache: tuple[float, set[str]] | None = None
        self._names_at = -1e9
        self._calib = selfcost.Calibration(dict(selfcost.DEFAULT_TRAP_S), False, 0.0)
        self._stats_fd: int | None = None
        self._overhead: dict[tuple[str, str], float] = {}
        self._last_hits: dict[tuple[str, str], float] = {}
        self._last_rt: dict[str, float] = {}
        self._group_cost_seen: dict[str, tuple[float, float]] = {}
        self._drops_seen = [0] * len(defs.DROPS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_error: str | None = None
        self._next_rescan = 0.0
        self._seen_series: set[tuple[str, tuple]] = set()
        self._known_tgids: set[int] = set()
        self._nontargets: set[int] = set()
        self._cuda_found = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        # Configuration errors first, then what this machine lacks, in the order an operator fixes them.
        pids, comm, cgroup, cgroup_root = self._target_args
        try:
            self._targets = Targets(str(self._procfs), pids, comm, cgroup, cgroup_root)
            self._comm_re = re.compile(comm) if comm else None
        except (TargetError, re.error) as e:
            raise SourceUnavailable(str(e)) from e
        bpf_cls = loader.load_bcc(self._bpf_module)
        if os.geteuid() != 0:
            raise SourceUnavailable("not root: loading eBPF programs needs root (CAP_BPF, CAP_PERFMON)")
        loader.check_bpf_syscall()
        loader.check_headers(self._modules, self._sysfs)
        loader.ensure_tracefs(self._tracefs)
        missing = loader.missing_tracepoints(self._tracefs, REQUIRED_TRACEPOINTS)
        if missing:
            raise SourceUnavailable(f"tracepoint {missing[0].replace('/', ':')} missing in "
                                    f"{self._tracefs}/events (this kernel was built without it)")
        self._sock_length = not self._force_fallback and not loader.missing_tracepoints(
            self._tracefs, loader.SOCK_LENGTH)
        if not self._sock_length:
            if loader.missing_tracepoints(self._tracefs, loader.SOCK_FALLBACK):
                raise SourceUnavailable("tracepoint sock:sock_recv_length (Linux 6.3+) and "
                                        "skb:skb_copy_datagram_iovec both missing: no socket copies")
            log.warning("ebpf: sock:sock_recv_length/sock_send_length missing (Linux < 6.3): socket "
                        "receive measured from skb:skb_copy_datagram_iovec, which cannot exclude Unix "
                        "sockets or loopback; egress socket copies are not measured")
        t = self._targets
        if self._memcpy and t.node_wide:
            log.warning("ebpf: memcpy probe needs --target.pid/--target.comm/--target.cgroup "
                        "(node-wide it would trap every memcpy on the node); memcpy probe off")
            self._memcpy = False
        self._cuda = self._mode != "off" or self._memcpy
        # --target.comm is a regex: the kernel counts everyone and the comm captured at event time
        # decides at read time. Pids and cgroups are decided in the kernel, from the first event.
        self._readtime = self._comm_re is not None
        self._follow = bool(t.pids) and not loader.missing_tracepoints(self._tracefs, loader.FOLLOW)
        self._exit_time = not loader.missing_tracepoints(self._tracefs, ("sched/sched_process_exit",))
        cflags = self._cflags()
        text = loader.program_text(self._program)
        self._b = loader.compile_program(bpf_cls, text, cflags)
        try:
            self._setup()
        except SourceUnavailable:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise SourceUnavailable(f"eBPF setup failed: {e}") from e

    def _cflags(self) -> list[str]:
        assert self._targets is not None
        t = self._targets
        kernel_filter = not self._readtime and not t.node_wide
        cflags = [f"-DPTX_MAX_PROCS={self._max_procs}", f"-DPTX_FILTER={1 if kernel_filter else 0}",
                  f"-DPTX_MAX_IRQ={self._max_irq()}"]
        if self._sock_length:
            cflags.append("-DPTX_SOCK_LENGTH")
        if any(n == "lo" for n in self._nics):
            cflags.append("-DPTX_COUNT_LO")
        if self._follow:
            cflags.append("-DPTX_FOLLOW")
        if self._exit_time:
            cflags.append("-DPTX_EXIT_TIME")
        if t.cgroup is not None:
            cflags += [f"-DPTX_CGROUP_ID={t.cgroup.id}ULL", f"-DPTX_CGROUP_LEVEL={t.cgroup.level}"]
        if self._cuda:
            cflags.append("-DPTX_CUDA")
        if self._memcpy:
            cflags.append("-DPTX_MEMCPY")
        return cflags

    def _max_irq(self) -> int:
        self._refresh_names(force=True)
        top = max((int(i) for i in self._names if i.isdigit()), default=0)
        return max(1024, 1 << (top + 256).bit_length())

    def _setup(self) -> None:
        b = self._b
        assert self._targets is not None
        # BCC attached every (RAW_)TRACEPOINT_PROBE while loading (its autoload): record them as on.
        attached = set(getattr(b, "tracepoint_fds", {})) | set(getattr(b, "raw_tracepoint_fds", {}))
        for group, tps in TRACEPOINTS.items():
            if tps and all(tp.encode() in attached for tp, _ in tps):
                self._tp_on[group] = True
        self._stats_fd = selfcost.enable_bpf_stats()
        self._attacher = UprobeAttacher(lambda name: b.load_func(name.encode(), b.KPROBE).fd)
        if self._calibrate:
            self._run_calibration()
        self._idents = Identities(self._procfs, self._cgroup_root(), self._resolver)
        for pid in self._targets.pids:
            self._seed(pid)
        if self._follow:
            self._set_tracepoints("follow", True)
        if self._exit_time:
            self._set_tracepoints("exit", True)
        pinned = {"cuda_copy"} if self._mode == "always" else set()
        groups = ("socket", "cuda_copy", "irq") if self._cuda and self._mode != "off" else ("socket", "irq")
        self._set_tracepoints("socket" if self._sock_length else "socket_fallback", True)
        self._set_tracepoints("irq", True)
        if self._cuda:
            self._cuda_probes = CudaProbes(self._attacher)
            self._cuda_probes.copy_on = self._mode != "off"
            for path in self._cuda_given:
                if cuda_libs.file_id(path) is None:
                    log.warning("ebpf: --cuda.lib %s: no such file", path)
                    continue
                self._cuda_probes.add(path)
        self._switch = GroupSwitch(defs.GROUPS, self._write_gate, lambda g: self._attach_group(g, True),
                                   lambda g: self._attach_group(g, False), attached=groups)
        # Every group starts open, so its first window measures what it costs.
        for g in groups:
            self._switch.open(g)
        self._governor = Governor(self._budget, self._period, groups, min_duty=self._min_duty)
        now = time.monotonic()
        self._governor.start(now, pinned)
        # Costs are measured from here: the calibration's tens of thousands of AF_UNIX sends ran
        # the socket programs too (to their family test), a start-up cost that, counted as the
        # group's first second, planned it at a fraction of its duty.
        costs = self._group_costs()
        self._group_cost_seen = {g: (costs.get(g, 0.0), st.total_on(now))
                                 for g, st in self._governor.groups.items()}
        self._rescan(force=True)
        loader.release_heap()  # again: calibration and attaching ran more of libbcc
        self._thread = threading.Thread(target=self._governor_loop, name="pcietax-ebpf-governor", daemon=True)
        self._thread.start()

    def _cgroup_root(self) -> str | None:
        try:
            return cgroup2_mount(self._procfs)
        except OSError:
            return None

    def abandon(self) -> None:
        """The process exits next: stop counting now (every gate shut, threads stopped) and leave
        the probes and programs to the exit, where the kernel releases them with the process's
        file descriptors (~0.6 s for all of them; detaching them here takes ~1.7 s)."""
        self._stop.set()
        with self._lock:
            if self._b is not None and self._switch is not None:
                for g in defs.GROUPS:
                    with contextlib.suppress(Exception):
                        self._switch.close(g, detach=False)

    def close(self, timeout: float = 15.0) -> None:
        """Detach everything, in parallel (serially it took 3.8-4.4 s on a busy VM; in parallel
        1.7 s for 23 probes: the kernel serialises most of it), then free programs and maps."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        if self._switch is not None:
            self._switch.stop(timeout=0.5)
        with self._lock:
            closers: list[Any] = []
            if self._cuda_probes is not None:
                closers += self._cuda_probes.take_all()
            if self._attacher is not None:
                att = self._attacher
                closers += [lambda a=a: att.detach(a) for a in self._memcpy_probes.values()]
            b = self._b
            if b is not None:
                closers += [lambda tp=tp: b.detach_tracepoint(tp=tp)
                            for tp in list(getattr(b, "tracepoint_fds", {}))]
                closers += [lambda tp=tp: b.detach_raw_tracepoint(tp=tp)
                            for tp in list(getattr(b, "raw_tracepoint_fds", {}))]
            late = close_all(closers, timeout)
            if late:
                log.warning("ebpf: %d probes still detaching after %.0f s", late, timeout)
            if b is not None and not late:
                try:
                    b.cleanup()  # closes every program and map fd (the probes are gone already)
                except Exception as e:
                    log.warning("ebpf: cleanup: %s", e)
            if self._stats_fd is not None:
                os.close(self._stats_fd)
            self._reset_state()

    # -- probe groups ------------------------------------------------------------------------

    def _set_tracepoints(self, group: str, on: bool) -> None:
        if self._tp_on.get(group, False) == on:
            return
        for tp, raw in TRACEPOINTS[group]:
            fn = tp_program(tp, raw).encode()
            if on and raw:
                self._b.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn)
            elif on:
                self._b.attach_tracepoint(tp=tp.encode(), fn_name=fn)
            else:
                with contextlib.suppress(Exception):
                    if raw:
                        self._b.detach_raw_tracepoint(tp=tp.encode())
                    else:
                        self._b.detach_tracepoint(tp=tp.encode())
        self._tp_on[group] = on

    def _write_gate(self, index: int, is_open: bool) -> None:
        self._b[b"gates"][ctypes.c_int(index)] = ctypes.c_uint32(1 if is_open else 0)

    def _attach_group(self, group: str, on: bool) -> None:
        """Attach or detach a group's programs (a detach runs on the switch's thread)."""
        if group == "cuda_copy":
            if self._cuda_probes is not None:
                self._cuda_probes.set_copy(on)
        elif group == "socket":
            self._set_tracepoints("socket" if self._sock_length else "socket_fallback", on)
        else:
            self._set_tracepoints(group, on)

    def _governor_loop(self) -> None:
        """Switches groups on and off at the governor's times, and measures what they cost once a
        second (a cut comes within a second of a workload starting). Survives any exception: it is
        logged, the next read() reports the source down with it, and governing goes on."""
        next_cost = time.monotonic() + 1.0
        wake = next_cost
        # Sleeps until the next switch or cost check (a few wake-ups a second, not a poll).
        while not self._stop.wait(max(0.005, wake - time.monotonic())):
            try:
                with self._lock:
                    gov, sw = self._governor, self._switch
                    if self._b is None or gov is None or sw is None:
                        return
                    now = time.monotonic()
                    if now >= next_cost or now - gov.period_start >= gov.period:
                        next_cost = now + 1.0
                        self._observe_costs(now)
                        if gov.check(now):
                            log.debug("ebpf: over budget: re-planned %s", self._plan_text())
                    if now - gov.period_start >= gov.period:
                        log.debug("ebpf: new period: %s", self._plan_text())
                    for g, on in gov.wanted(now).items():
                        if on != gov.groups[g].on:
                            t = sw.open(g) if on else sw.close(g)
                            gov.switched(g, on, t)
                            log.debug("ebpf: %s window %s", g, "opens" if on else "closes")
                    wake = min(next_cost, gov.next_change(time.monotonic()))
            except Exception as e:  # keep governing; say so
                log.exception("ebpf: governor: %s", e)
                self._thread_error = f"{type(e).__name__}: {e}"
                wake = time.monotonic() + 0.5

    def _plan_text(self) -> str:
        assert self._governor is not None
        return ", ".join(f"{g} duty {s.duty:.3f} at {s.cost_rate * 1e3:.2f} ms/s"
                         for g, s in self._governor.groups.items())

    # -- targets and libraries ---------------------------------------------------------------

    def _seed(self, pid: int) -> None:
        if pid in self._given_seeded:
            return
        self._b[b"targets"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        self._given_seeded.add(pid)

    def _rescan(self, force: bool = False) -> None:
        """Libraries mapped by target processes (node-wide: every process), each /proc/PID/maps read
        once per rescan. Only discovery and the memcpy probe wait for this: counting does not."""
        now = time.monotonic()
        if not force and now < self._next_rescan:
            return
        assert self._targets is not None
        node_wide = self._targets.node_wide
        self._next_rescan = now + (10.0 if node_wide else 2.0)
        pids = self._targets.resolve()
        for pid in self._targets.pids:
            if pid in pids:
                self._seed(pid)
        if node_wide:
            scan = [int(e.name) for e in os.scandir(self._procfs) if e.name.isdigit()]
        else:
            scan = sorted(pids)
        patterns = (cuda_libs.RUNTIME_RE, cuda_libs.DRIVER_RE)
        if self._memcpy:
            patterns += (cuda_libs.LIBC_RE,)
        for pid in scan:
            if not (self._cuda or self._memcpy):
                break
            maps = cuda_libs.mapped_files(self._procfs, pid)
            for path in cuda_libs.discover(self._procfs, pid, patterns, maps):
                kind = cuda_libs.lib_kind(path)
                if kind is not None and self._cuda_probes is not None:
                    self._cuda_probes.add(path, kind)
                elif self._memcpy and cuda_libs.LIBC_RE.search(path):
                    self._attach_memcpy(path, pid)
        if self._cuda:
            self._drop_dead_pinned()

    def _attach_memcpy(self, path: str, pid: int) -> None:
        if (path, pid) in self._memcpy_probes or self._attacher is None:
            return
        try:
            our_libc, vaddr = resolved_memcpy()
        except (IfuncError, OSError) as e:
            log.warning("ebpf: memcpy probe off: cannot resolve memcpy's IFUNC: %s", e)
            self._memcpy = False
            return
        if not cuda_libs.same_file(path, our_libc):
            log.warning("ebpf: memcpy probe skips pid %d: its libc %s is not %s, whose IFUNC "
                        "choice we resolved", pid, path, our_libc)
            return
        fn = _function_at(our_libc, vaddr)
        if fn is None:
            return
        a = self._attacher.attach("memcpy_probe", path, fn, pid=pid)
        if a is not None:
            self._memcpy_probes[(path, pid)] = a
            log.info("ebpf: memcpy probe on pid %d (%s site)", pid, fn.site)

    def _drop_dead_pinned(self) -> None:
        table = self._b[b"pinned"]
        for k in list(table.keys()):
            if not (self._procfs / str(k.value)).exists():
                with contextlib.suppress(KeyError):
                    del table[k]

    # -- reading -----------------------------------------------------------------------------

    def read(self) -> Snapshot:
        with self._lock:
            if self._b is None:
                raise SourceUnavailable("not started")
            if self._thread_error is not None:
                err, self._thread_error = self._thread_error, None
                raise SourceUnavailable(f"eBPF governor thread failed: {err}")
            if self._thread is None or not self._thread.is_alive():
                raise SourceUnavailable("eBPF governor thread is not running")
            if self._switch is not None and self._switch.error is not None:
                err, self._switch.error = self._switch.error, None
                raise SourceUnavailable(f"eBPF probe switch failed: {err}")
            provides = {SOCKET, HARDIRQ_S, SOFTIRQ_S, STAGING, HITS, OVERHEAD, DROPS}
            # CUDA copies are measured from the first library probed on (sticky: a target exiting
            # must not flip host_to_gpu to another source while its last bytes arrive); with no
            # CUDA library on the node the hop stays NVML's, or absent.
            if self._cuda_probes is not None and self._cuda_probes.libs:
                self._cuda_found = True
            if self._cuda and self._mode != "off" and self._cuda_found:
                provides |= {CUDA_BYTES, CUDA_CALLS}
            if self._memcpy:
                provides.add(MEMCPY)
            snap = Snapshot(provides=frozenset(provides))
            now = time.monotonic()
            try:
                self._rescan()
            except OSError as e:
                snap.fault(f"rescan failed ({e.strerror})", self._procfs)
            self._read_drops(snap)
            gov = self._governor
            assert gov is not None
            folded: set[str] = set()
            for g, st in gov.groups.items():
                scale = st.scale(now)
                if scale is None:
                    self._fold_exits(g, st, now)
                    continue
                if st.on and not st.pinned_on and st.duty < 1.0 and now - st.window_start < FOLD_MIN_S:
                    continue  # a window just opened: fold it whole when it closes, not its first ms
                if g == "socket":
                    self._fold_table(b"sock_bytes", "sock", st, now)
                elif g == "cuda_copy":
                    self._fold_cuda(st, now)
                elif g == "irq":
                    self._fold_irqs(scale)
                gov.folded(g, now)
                folded.add(g)
            if self._memcpy:
                self._fold_table(b"memcpy_bytes", "memcpy", None, now)
            self._emit_per_process(snap)
            self._emit_irqs(snap)
            self._read_hits(snap)
            self._cleanup_dead(folded)
            return snap

    def _read_drops(self, snap: Snapshot) -> None:
        table = self._b[b"drops"]
        for i, reason in enumerate(defs.DROPS):
            n = int(table[ctypes.c_int(i)].value)
            if n > self._drops_seen[i]:
                log.warning("ebpf: %d kernel updates dropped (%s) since the last read",
                            n - self._drops_seen[i], reason)
                self._drops_seen[i] = n
            snap.counter(DROPS, n, reason=reason)

    def _target_ident(self, tgid: int, procs: Any) -> Ident | None:
        """The labels of a tgid, or None when it is not a target (read-time --target.comm)."""
        assert self._idents is not None
        info = procs.get(tgid)
        comm = bytes(info.comm).split(b"\0", 1)[0] if info is not None else None
        cg = int(info.cgroup) if info is not None else 0
        if tgid not in self._known_tgids:
            self._known_tgids.add(tgid)
            self._idents.note_alive(tgid, cg)
        ident = self._idents.ident(tgid, comm, cg)
        if not self._readtime:
            return ident
        if self._comm_re is not None and self._comm_re.search(ident[0]):
            return ident
        if info is not None and info.target:
            return ident
        if self._follow and tgid in self._targets_map_keys():
            return ident
        return None

    def _targets_map_keys(self) -> set[int]:
        return {int(k.value) for k in self._b[b"targets"].keys()}  # noqa: SIM118 (BCC table)

    def _procs(self) -> dict[int, Any]:
        return {int(k.value): v for k, v in self._b[b"procs"].items()}

    def _fold_table(self, name: bytes, acc: str, st: GroupState | None, now: float) -> None:
        raw: dict[tuple[int, Any], float] = {}
        for k, vals in self._b[name].items():
            raw[(int(k.tgid), defs.DIRECTIONS[k.dir])] = float(sum(vals))
        self._fold(raw, acc, st, now)

    def _lifetime(self, tgid: int, procs: dict[int, Any]) -> tuple[float, float]:
        """(start, exit) on the monotonic clock: the start from /proc/PID/stat (read once), the
        exit from sched_process_exit; -inf / +inf where unknown or alive."""
        start = self._starts.get(tgid)
        if start is None:
            start = process_start(self._procfs, tgid)
            self._starts[tgid] = start
        info = procs.get(tgid)
        ns = int(getattr(info, "exit_ns", 0) or 0) if info is not None else 0
        return start, (ns / 1e9 if ns else float("inf"))

    def _fold(self, raw: dict[tuple[int, Any], float], acc: str, st: GroupState | None,
              now: float) -> None:
        deltas = self._acc[acc][0].deltas(raw)
        procs = self._procs()
        if st is not None:  # a duty-cycled group: scale its windows to the interval
            deltas = self._est[acc].fold(deltas, st.last_end, now, st.windows(now),
                                         lambda t: self._lifetime(t, procs))
        if deltas:
            self._add_folded(acc, deltas, procs)

    def _add_folded(self, acc: str, deltas: dict[tuple[int, Any], float], procs: dict[int, Any]) -> None:
        idents: dict[int, Ident] = {}
        for tgid in {t for t, _ in deltas}:
            ident = self._target_ident(tgid, procs)
            if ident is None:
                self._nontargets.add(tgid)
                deltas = {k: v for k, v in deltas.items() if k[0] != tgid}
            else:
                idents[tgid] = ident
        self._acc[acc][1].add(deltas, idents)

    def _fold_exits(self, group: str, st: GroupState, now: float) -> None:
        """Between a group's windows: what processes that exited since did after its last window."""
        accs = [a for a in {"socket": ("sock",), "cuda_copy": ("cuda_bytes", "cuda_calls")}.get(group, ())
                if self._est[a]]
        if not accs:
            return
        procs = self._procs()
        for acc in accs:
            deltas = self._est[acc].exited(st.last_end, now, st.windows(now),
                                           lambda t: self._lifetime(t, procs))
            if deltas:
                self._add_folded(acc, deltas, procs)

    def _fold_cuda(self, st: GroupState, now: float) -> None:
        raw_b: dict[tuple[int, Any], float] = {}
        raw_c: dict[tuple[int, Any], float] = {}
        for k, vals in self._b[b"cuda_copies"].items():
            mem = "pinned" if k.pinned else "pageable"
            key = (int(k.tgid), (defs.KINDS[k.kind] if k.kind < 2 else "h2d", mem))
            raw_b[key] = float(sum(v.bytes for v in vals))
            raw_c[key] = float(sum(v.calls for v in vals))
        self._fold(raw_b, "cuda_bytes", st, now)
        self._fold(raw_c, "cuda_calls", st, now)

    def _emit(self, snap: Snapshot, family: str, value: float, **labels: str) -> None:
        """A series that appears after the source started is shown at 0 for one cycle first (the
        engine's baseline), so its bytes arrive, not vanish, in the next."""
        key = (family, tuple(sorted(labels.items())))
        if key not in self._seen_series:
            self._seen_series.add(key)
            value = 0.0
        snap.counter(family, value, **labels)

    def _emit_per_process(self, snap: Snapshot) -> None:
        sock, mc = self._acc["sock"][1].totals(), self._acc["memcpy"][1].totals()
        cb, cc = self._acc["cuda_bytes"][1].totals(), self._acc["cuda_calls"][1].totals()
        procs = sorted({p for p, _ in (*sock, *mc, *cb, *cc)})
        for ident in procs:
            pl = dict(zip(("process", "namespace", "pod", "container"), ident, strict=True))
            for d in defs.DIRECTIONS:
                self._emit(snap, SOCKET, sock.get((ident, d), 0.0), direction=d, **pl)
                if self._memcpy:
                    self._emit(snap, MEMCPY, mc.get((ident, d), 0.0), direction=d, **pl)
            if self._cuda and self._mode != "off" and self._cuda_found:
                for kind in defs.KINDS:
                    for mem in ("pinned", "pageable"):
                        k = (ident, (kind, mem))
                        self._emit(snap, CUDA_BYTES, cb.get(k, 0.0), kind=kind, memory=mem, **pl)
                        self._emit(snap, CUDA_CALLS, cc.get(k, 0.0), kind=kind, memory=mem, **pl)

    # -- IRQ time ------------------------------------------------------------------------------

    def _refresh_names(self, force: bool = False) -> None:
        """IRQ names from the cycle's shared parse of /proc/interrupts (procfs.read_interrupts: the
        procfs source parses it every cycle; without it, a parse at most NAMES_REFRESH_S old),
        looked at every 30 s: names change only when a driver binds."""
        now = time.monotonic()
        if not force and now - self._names_at < NAMES_REFRESH_S:
            return
        self._names_at = now
        try:
            lines = read_interrupts(self._procfs, max_age=NAMES_REFRESH_S)
        except (OSError, SourceUnavailable) as e:
            log.debug("ebpf: IRQ names: %s", e)
            return
        except Exception as e:  # a parser bug must not take the tracer down; names stay as they were
            log.warning("ebpf: cannot parse %s: %s", self._procfs / "interrupts", e)
            return
        self._irq_lines = lines
        self._names = dict(lines.names())

    def _fold_irqs(self, scale: float) -> None:
        self._refresh_names()
        table = self._b[b"irq_time"]
        size = len(table) if hasattr(table, "__len__") else 0
        for irq in self._names:
            if not irq.isdigit() or int(irq) >= size:
                continue
            self._acc_time(("irq", irq), sum(v.ns for v in table[ctypes.c_int(int(irq))]), scale)
        soft = self._b[b"softirq_time"]
        for i, vec in enumerate(defs.SOFTIRQ_VECTORS):
            self._acc_time(("soft", vec), sum(v.ns for v in soft[ctypes.c_int(i)]), scale)

    def _acc_time(self, key: tuple[str, str], ns: float, scale: float) -> None:
        last = self._irq_last.get(key, 0.0)
        self._irq_last[key] = ns
        if ns > last:
            self._irq_tot[key] = self._irq_tot.get(key, 0.0) + (ns - last) * scale / 1e9

    def _emit_irqs(self, snap: Snapshot) -> None:
        nic_irqs = self._nic_irqs()
        hard = 0.0
        for (kind, key), secs in self._irq_tot.items():
            if kind != "irq":
                continue
            snap.counter(HARDIRQ_S, secs, irq=key, name=self._names.get(key, ""))
            if key in nic_irqs:
                hard += secs
        for vec in defs.SOFTIRQ_VECTORS:
            secs = self._irq_tot.get(("soft", vec), 0.0)
            snap.counter(SOFTIRQ_S, secs, vector=vec)
            if vec in ("net_rx", "net_tx"):
                snap.counter(STAGING, secs, kind=f"softirq_{vec}")
        snap.counter(STAGING, hard, kind="hardirq")

    def _nic_irqs(self) -> set[str]:
        """IRQ lines of the measured NICs (cached with the names): MSI vectors of their PCI
        functions, plus lines whose action name carries the interface or bus device name."""
        cached = self._nic_cache
        if cached is not None and cached[0] == self._names_at:
            return cached[1]
        out: set[str] = set()
        net = self._sysfs / "class/net"
        try:
            ifaces = self._nics or [e.name for e in os.scandir(net) if (net / e.name / "device").exists()]
        except OSError:
            ifaces = []
        tags: set[str] = set()
        for iface in ifaces:
            dev = net / iface / "device"
            for d in (dev, dev / ".."):
                with contextlib.suppress(OSError):
                    out.update(e.name for e in os.scandir(d / "msi_irqs"))
            tags.add(iface)
            with contextlib.suppress(OSError):
                tags.add(dev.resolve(strict=True).name)
        if self._irq_lines is not None:
            out |= self._irq_lines.irqs_tagged(tags)
        self._nic_cache = (self._names_at, out)
        return out

    # -- the exporter's own tax --------------------------------------------------------------

    def _run_calibration(self) -> None:
        b = self._b
        att = self._attacher
        assert att is not None

        def up(path: str, offset: int):
            fd = b.load_func(b"ptx_calibrate_u", b.KPROBE).fd
            ev = f"ptx_{os.getpid()}_calib".encode()
            pfd = att._lib.bpf_attach_uprobe(fd, 0, ev, path.encode(), offset, os.getpid())
            if pfd < 0:
                return None
            return lambda: (att._lib.bpf_close_perf_event_fd(pfd), att._lib.bpf_detach_uprobe(ev))

        def tp():
            # libbcc directly: BCC keeps one fd per tracepoint name, and ours is attached there.
            fd = b.load_func(b"ptx_calibrate_tp", b.RAW_TRACEPOINT).fd
            lfd = att._lib.bpf_attach_raw_tracepoint(fd, b"sock_send_length")
            if lfd < 0:
                return None
            return lambda: os.close(lfd)

        if not self._sock_length:
            tp = lambda: None  # noqa: E731
        self._calib = selfcost.calibrate(up, tp)
        log.info("ebpf: calibrated in %.0f ms: uprobe trap %.2f us (push site), %.2f us "
                 "(single-stepped site); tracepoint %.3f us", self._calib.seconds * 1e3,
                 self._calib.trap_s["push"] * 1e6, self._calib.trap_s["step"] * 1e6,
                 self._calib.trap_s["tracepoint"] * 1e6)

    def _run_time_s(self, probe: str) -> float | None:
        if self._stats_fd is None and not selfcost.sysctl_stats_on(self._procfs):
            return None
        total = 0
        for fn in PROBE_PROGRAMS[probe]:
            f = self._b.funcs.get(fn.encode())
            if f is None:
                continue
            st = selfcost.prog_stats(f.fd)
            if st is None:
                return None
            total += st[0]
        return total / 1e9

    def _read_hits(self, snap: Snapshot) -> None:
        """Hits per probe and site kind; cost = the kernel's run time (bpf_stats) + hits x the
        calibrated trap of the site kind, each under its own ``cost`` label. Accumulated by delta,
        so nothing ever goes back."""
        hits = self._b[b"hits"]
        for probe in defs.PROBES:
            sites = defs.SITES if probe in defs.UPROBES else ("push",)
            rt = self._run_time_s(probe)
            n_total = 0.0
            for site in sites:
                n = float(sum(hits[ctypes.c_int(defs.hit_index(probe, site))]))
                n_total += n
                dn = max(0.0, n - self._last_hits.get((probe, site), 0.0))
                self._last_hits[(probe, site)] = n
                trap_kind = site if probe in defs.UPROBES else "tracepoint"
                cost_label = f"trap_{site}" if probe in defs.UPROBES else "tracepoint_dispatch"
                c = dn * self._calib.trap_s[trap_kind]
                self._overhead[(probe, cost_label)] = self._overhead.get((probe, cost_label), 0.0) + c
                if dn and rt is None:
                    est = dn * selfcost.DEFAULT_RUN_S
                    self._overhead[(probe, "run_time_estimate")] = (
                        self._overhead.get((probe, "run_time_estimate"), 0.0) + est)
            if rt is not None:
                # From 0, as the hits are: run time counts from when stats were enabled, before
                # the calibration and the first read.
                last = self._last_rt.get(probe, 0.0)
                if rt >= last:
                    # total + (rt - last), never (total + rt) - last: with rt == last the latter
                    # can round an ulp below the total, and a counter that reads lower is a reset.
                    self._overhead[(probe, "bpf_run_time")] = (
                        self._overhead.get((probe, "bpf_run_time"), 0.0) + (rt - last))
                self._last_rt[probe] = rt
            snap.counter(HITS, n_total, probe=probe)
        for (probe, cost), v in sorted(self._overhead.items()):
            snap.counter(OVERHEAD, v, probe=probe, cost=cost)

    def _group_costs(self) -> dict[str, float]:
        """Cumulative cost per probe group: kernel run time + hits x calibrated trap per site."""
        hits = self._b[b"hits"]
        out: dict[str, float] = {}
        for g, probes in defs.GROUP_PROBES.items():
            total = 0.0
            for probe in probes:
                rt = self._run_time_s(probe)
                for site in (defs.SITES if probe in defs.UPROBES else ("push",)):
                    n = float(sum(hits[ctypes.c_int(defs.hit_index(probe, site))]))
                    trap = self._calib.trap_s[site if probe in defs.UPROBES else "tracepoint"]
                    total += n * (trap + (selfcost.DEFAULT_RUN_S if rt is None else 0.0))
                total += rt or 0.0
            out[g] = total
        return out

    def _observe_costs(self, now: float) -> None:
        gov = self._governor
        assert gov is not None
        costs = self._group_costs()
        for g, st in gov.groups.items():
            on = st.total_on(now)
            last_c, last_on = self._group_cost_seen.get(g, (0.0, 0.0))
            self._group_cost_seen[g] = (costs.get(g, 0.0), on)
            gov.observe(g, costs.get(g, 0.0) - last_c, on - last_on)

    def _cleanup_dead(self, folded: set[str]) -> None:
        """Drop map entries of exited processes once their last counts are folded."""
        assert self._idents is not None
        tables = []
        if "socket" in folded:
            tables.append(b"sock_bytes")
        if "cuda_copy" in folded:
            tables.append(b"cuda_copies")
        if self._memcpy:
            tables.append(b"memcpy_bytes")
        dead: set[int] = set()
        for name in tables:
            table = self._b[name]
            for k in list(table.keys()):
                t = int(k.tgid)
                if t in dead or not (self._procfs / str(t)).exists():
                    dead.add(t)
                    with contextlib.suppress(KeyError):
                        del table[k]
                elif t in self._nontargets:
                    with contextlib.suppress(KeyError):
                        del table[k]  # read-time filter: its counts were dropped already
        if dead:
            for tracker, _ in self._acc.values():
                tracker.forget(dead)
            for est in self._est.values():
                est.forget(dead)
            for t in dead:
                self._starts.pop(t, None)
            self._idents.forget(dead)
            self._known_tgids -= dead
            procs = self._b[b"procs"]
            for t in dead:
                with contextlib.suppress(KeyError):
                    del procs[ctypes.c_uint32(t)]
        self._nontargets.clear()


def _function_at(path: str, vaddr: int) -> elf.Function | None:
    """The memcpy implementation glibc's resolver picked, as a probe site (file offset + kind)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        import struct

        e_phoff = struct.unpack_from("<Q", head, 0x20)[0]
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
        for i in range(e_phnum):
            p_type, _fl, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from("<IIQQQQ", head,
                                                                                e_phoff + i * e_phentsize)
            if p_type == 1 and p_vaddr <= vaddr < p_vaddr + p_filesz:
                off = vaddr - p_vaddr + p_offset
                with open(path, "rb") as f:
                    f.seek(off)
                    code = f.read(4)
                return elf.Function("memcpy", off, elf.site_kind(code))
    except (OSError, struct.error, OverflowError, IndexError) as e:
        log.warning("ebpf: cannot place the memcpy probe in %s: %s", path, e)
    return None
