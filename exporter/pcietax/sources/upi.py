"""Socket interconnect (UPI) and PCIe root-port (IIO) traffic from Intel uncore PMUs via perf.

UPI: on every ``uncore_upi_<link>`` PMU, on the one CPU per socket its ``cpumask`` names, count
data flits received and transmitted (``UNC_UPI_RxL_FLITS.ALL_DATA`` event 0x03 umask 0x0f,
``UNC_UPI_TxL_FLITS.ALL_DATA`` event 0x02 umask 0x0f; Skylake-SP through Emerald Rapids). Bytes =
flits x 64/9: nine flit slots carry one 64-byte line, the rule Intel's uncore guide, PCM and the
kernel's ``upi_data_{receive,transmit}_bw`` metrics use. The terms are encoded through the PMU's own
``format/`` files, so a kernel that widens ``umask`` (Sapphire Rapids: ``config:8-15,32-55``) still
gets the right bits.

IIO: the free-running ``bw_in_port<N>`` / ``bw_out_port<N>`` counters of each
``uncore_iio_free_running_<stack>`` PMU, in bytes from the kernel's own ``.scale`` and ``.unit``
(they were wrong on Sapphire Rapids until 6.15 and bw_out was dropped there: whatever the running
kernel lists is what is counted). The stack's root bus comes from ``uncore_iio_<stack>/die<N>``.

``direction`` is ``rx``/``tx`` as seen by the socket: UPI rx = flits this socket received on the
link; IIO rx = bytes the root port received from its device. A byte crossing UPI once appears as tx
on one socket and rx on the other; the tax model counts rx only.

Multiplexed counts are scaled per interval by time_enabled/time_running, and a counter narrower
than 64 bits is extended by modular deltas; the exported value is this source's own running sum, so
it never goes backwards even when the kernel reschedules or the source reopens its counters.
"""

from __future__ import annotations

import contextlib
import errno
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import catalog
from ..fsread import read_str, read_text
from ..perf import Counter, EventAttr, Opener, PerfOpenError, Reading, SyscallOpener
from ..pmu import Pmu, PmuError, devices_dir, list_pmus, read_pmu
from .base import Snapshot, SourceAbsent, SourceUnavailable

UPI = catalog.UPI_BYTES
IIO = catalog.IIO_BYTES

UPI_PREFIX = "uncore_upi_"
IIO_FREE_PREFIX = "uncore_iio_free_running_"
IIO_PREFIX = "uncore_iio_"
UPI_EVENTS = {"rx": "event=0x03,umask=0x0f", "tx": "event=0x02,umask=0x0f"}
UPI_BYTES_PER_FLIT = 64 / 9
_IIO_EVENT = re.compile(r"^bw_(in|out)_port(\d+)$")
_IIO_DIRECTION = {"in": "rx", "out": "tx"}
# PMUs whose presence says "this is AMD": UPI/IIO do not exist there, and xGMI/DF counters are not
# byte-for-byte equivalents, so the source refuses rather than guesses.
_OTHER_VENDOR_PMUS = ("amd_df", "amd_l3", "amd_umc")


@dataclass(frozen=True)
class Plan:
    """One counter to open: where, what, and how its counts become bytes."""

    family: str
    labels: tuple[tuple[str, str], ...]
    pmu: str
    attr: EventAttr
    cpu: int
    bytes_per_count: float


@dataclass
class _Live:
    plan: Plan
    counter: Counter
    last: Reading | None = None


def cpu_vendor(procfs: str | Path) -> str | None:
    """``vendor_id`` from /proc/cpuinfo (x86), ``CPU implementer`` elsewhere; None if unreadable."""
    try:
        text = read_text(Path(procfs) / "cpuinfo")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "CPU implementer":
            return f"CPU implementer {value.strip()}"
    return None


def scaled_delta(prev: Reading | None, cur: Reading, bits: int = 64) -> float:
    """Counts in the interval since ``prev`` (since open when None), extended across a wrap of a
    ``bits``-wide counter and scaled up when the kernel multiplexed the event (running < enabled)."""
    if prev is None:
        dv, de, dr = cur.value, cur.enabled, cur.running
    else:
        dv = (cur.value - prev.value) % (1 << bits)
        de, dr = cur.enabled - prev.enabled, cur.running - prev.running
    if dr > 0 and de > dr:
        return dv * de / dr
    return float(dv)


class UpiSource:
    name = "upi"

    def __init__(self, sysfs: str = "/sys", procfs: str = "/proc", opener: Opener | None = None) -> None:
        self._sysfs = Path(sysfs)
        self._procfs = Path(procfs)
        self._opener = opener
        self._lock = threading.Lock()
        self._live: list[_Live] = []
        self._totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # bytes per series
        self._pending_faults: list[tuple[str, str]] = []
        self._provides: frozenset[str] = frozenset()
        self._was_open = False  # PMUs that were here and left are a failure, never an absence

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Absent (``SourceAbsent``) on a CPU that has no such PMUs: not Intel, or Intel with no
        ``uncore_upi_*``/``uncore_iio_free_running_*`` PMU at all (a VM, a client CPU). Uncore PMUs
        that are there and cannot be described, opened or read are a failure."""
        self._check_vendor()
        try:
            present = [n for prefix in (UPI_PREFIX, IIO_FREE_PREFIX) for n in list_pmus(self._sysfs, prefix)]
        except PmuError as e:
            raise SourceUnavailable(f"cannot list uncore PMUs: {e}") from None
        if not present and not self._was_open:
            raise SourceAbsent(
                f"no uncore UPI or IIO PMUs under {devices_dir(self._sysfs)} (a VM, a CPU without "
                "UPI, or the intel_uncore driver not loaded)")
        if self._opener is None:
            try:
                self._opener = SyscallOpener(procfs=str(self._procfs))
            except OSError as e:
                raise SourceUnavailable(f"perf_event_open unavailable: {e.strerror or e}") from None
        with self._lock:
            self._open()

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def read(self) -> Snapshot:
        with self._lock:
            if not self._live:
                self._open()  # the PMUs went away earlier: try again (raises while they are gone)
            snap = Snapshot(provides=self._provides)
            for what, where in self._pending_faults:
                snap.fault(what, where)
            self._pending_faults = []
            failed: list[str] = []
            read: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for live in self._live:
                p = live.plan
                try:
                    cur = live.counter.read()
                except OSError as e:
                    failed.append(f"{p.pmu} cpu{p.cpu}: {e.strerror or e}")
                    snap.fault("read failed", failed[-1])
                    continue
                key = (p.family, p.labels)
                counts = scaled_delta(live.last, cur, getattr(live.counter, "bits", 64))
                self._totals[key] = self._totals.get(key, 0.0) + counts * p.bytes_per_count
                read[key] = self._totals[key]
                live.last = cur
            # One sample per series, even when two counters feed it (two dies of one package).
            for (family, labels), total in read.items():
                snap.counter(family, total, **dict(labels))
            if failed and len(failed) == len(self._live):
                self._close_all()
                raise SourceUnavailable(f"every uncore counter failed to read (PMU gone?): {failed[0]}")
            return snap

    # -- discovery ---------------------------------------------------------------------------

    def _check_vendor(self) -> None:
        vendor = cpu_vendor(self._procfs)
        try:
            others = [p for prefix in _OTHER_VENDOR_PMUS for p in list_pmus(self._sysfs, prefix)]
        except PmuError:
            others = []  # start() reports the unreadable directory
        if (vendor is not None and vendor != "GenuineIntel") or (vendor is None and others):
            what = vendor or f"PMUs {', '.join(others[:3])}"
            raise SourceAbsent(
                f"unsupported_cpu: {what}: UPI and IIO counters are Intel uncore PMUs; this CPU's "
                "socket-interconnect counters are not mapped")

    def plan(self) -> tuple[list[Plan], list[tuple[str, str]]]:
        """Every counter to open on this node, and the faults found while describing them."""
        plans: list[Plan] = []
        faults: list[tuple[str, str]] = []
        for name in list_pmus(self._sysfs, UPI_PREFIX):
            try:
                pmu = read_pmu(self._sysfs, name)
                attrs = {d: pmu.attr(t) for d, t in UPI_EVENTS.items()}
            except PmuError as e:
                faults.append(("bad PMU description", str(e)))
                continue
            for cpu in pmu.cpus:
                socket = self._socket_of(cpu, pmu)
                for direction, attr in attrs.items():
                    labels = (("direction", direction), ("link", str(pmu.index)), ("socket", socket))
                    plans.append(Plan(UPI, labels, name, attr, cpu, UPI_BYTES_PER_FLIT))
        for name in list_pmus(self._sysfs, IIO_FREE_PREFIX):
            try:
                pmu = read_pmu(self._sysfs, name)
            except PmuError as e:
                faults.append(("bad PMU description", str(e)))
                continue
            for alias in sorted(pmu.events):
                m = _IIO_EVENT.match(alias)
                if not m:
                    continue  # ioclk and friends
                per_count = pmu.bytes_per_count(alias)
                if per_count is None:
                    faults.append(("no byte scale", f"{pmu.path}/events/{alias}.scale/.unit"))
                    continue
                try:
                    attr = pmu.event_attr(alias)
                except PmuError as e:
                    faults.append(("bad event encoding", str(e)))
                    continue
                for die, cpu in enumerate(pmu.cpus):
                    labels = (
                        ("direction", _IIO_DIRECTION[m.group(1)]),
                        ("pci_bus", self._stack_bus(pmu.index, die)),
                        ("port", m.group(2)),
                        ("socket", self._socket_of(cpu, pmu)),
                        ("stack", str(pmu.index)),
                    )
                    plans.append(Plan(IIO, labels, name, attr, cpu, per_count))
        return plans, faults

    def _socket_of(self, cpu: int, pmu: Pmu) -> str:
        try:
            return read_str(self._sysfs / f"devices/system/cpu/cpu{cpu}/topology/physical_package_id")
        except (OSError, UnicodeDecodeError):
            # One CPU per socket in an uncore cpumask, in socket order.
            return str(pmu.cpus.index(cpu))

    def _stack_bus(self, stack: int | None, die: int) -> str:
        """The root bus (``0000:16``) the kernel maps IIO stack ``stack`` on die ``die`` to; "" when
        the kernel does not expose the mapping (before 5.10, or a stack with no PCIe root)."""
        if stack is None:
            return ""
        try:
            bus = read_str(devices_dir(self._sysfs) / f"{IIO_PREFIX}{stack}" / f"die{die}")
        except (OSError, UnicodeDecodeError):
            return ""
        return bus.lower() if re.fullmatch(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{2}", bus) else ""

    # -- counters ----------------------------------------------------------------------------

    def _open(self) -> None:
        try:
            plans, faults = self.plan()
        except PmuError as e:
            raise SourceUnavailable(f"cannot list uncore PMUs: {e}") from None
        if not plans:
            detail = f"; {faults[0][0]}: {faults[0][1]}" if faults else ""
            raise SourceUnavailable(
                f"no uncore UPI or IIO PMUs under {devices_dir(self._sysfs)} (a VM, a CPU without "
                f"UPI, or the intel_uncore driver not loaded){detail}")
        assert self._opener is not None
        errors: list[PerfOpenError | OSError] = []
        live: list[_Live] = []
        for p in plans:
            try:
                live.append(_Live(p, self._opener(p.attr, p.cpu)))
            except OSError as e:
                errors.append(e)
                faults.append(("perf_event_open failed", f"{p.pmu} cpu{p.cpu}: {_reason(e)}"))
        if not live:
            first = errors[0]
            raise SourceUnavailable(f"cannot open uncore counters: {_reason(first)}")
        self._live = live
        self._was_open = True
        self._pending_faults = faults
        self._provides = frozenset(lv.plan.family for lv in live)

    def _close_all(self) -> None:
        live, self._live = self._live, []
        for lv in live:
            with contextlib.suppress(OSError):  # the fd is gone either way
                lv.counter.close()


def _reason(e: OSError) -> str:
    if isinstance(e, PerfOpenError):
        return e.reason
    if e.errno == errno.ENOSYS:
        return "perf_event_open is not available"
    return e.strerror or str(e)
