"""The collection loop: sources -> counter absorption -> tax model -> one immutable Frame.

Every read has a time budget, so a source that hangs (an NVML call stuck in the driver) is marked
down and skipped instead of blocking the others or a scrape. Sources that only read kernel files
(``shares_lane = True``) are read one after another in one worker thread, the shared lane: five
threads contending for the GIL cost more than the reads themselves (3.1 against 1.2 ms of CPU a
cycle on the 8-CPU fixture node). Any other source has a worker of its own, and so does a shared
source from the first read that overran the budget: the sources queued behind it are read again
at once in a fresh lane, so one hang costs the others one extra budget at most, once.
Scrapes never touch a source: they render the latest Frame, which is replaced atomically.

At rest (``rest_interval``): while the node moves less payload than the tax ratio needs (the
model's minimum useful bytes per window), a full cycle runs only every ``rest_interval``; every
``sense_period`` (2 s) between, a source with a ``sense()`` (netdev: ``/proc/net/dev`` alone)
says whether bytes flow, and traffic at the ratio's threshold starts a full cycle at once. While
active, every tick reads in full, and the model's own byte counts keep it active until a ratio
window after the last traffic, so bytes the sensor cannot see (RDMA verbs, GPU PCIe) count too.
An idle 8-CPU node then costs less than a node_exporter scraped every 15 s instead of five times
as much; with no sensor up the node never rests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from itertools import compress
from operator import is_not

from .counters import CounterAbsorber
from .model import HOPS, ROUTED, Inputs, SeriesKey, TaxModel, TaxState
from .sources.base import Sample, Snapshot, Source, SourceAbsent, SourceUnavailable

log = logging.getLogger("pcietax")

# Hops whose bytes say payload flows (UPI is left out: coherence traffic crosses it at rest).
ACTIVITY_HOPS = frozenset(HOPS) - {"upi"}

# At rest, the sensors are asked this often (seconds; at least once a tick): traffic wakes a full
# cycle within it. Each check is ~0.2 ms of cold CPU (a wakeup, a procfs read): once a second that
# was a third of an idle 8-CPU node's cost.
REST_SENSE_PERIOD = 2.0

# Re-log a fault that keeps happening at most this often (seconds): one line says what and where,
# without flooding the journal once per second.
FAULT_RELOG_INTERVAL = 600.0


@dataclass(frozen=True)
class SourceStatus:
    name: str
    up: bool
    reason: str  # "" when up
    duration: float  # seconds the last read took
    errors: int  # faults absorbed so far
    resets: int  # wraps and resets absorbed so far
    absent: bool = False  # down because the hardware is not on this node (never alerted on)


@dataclass(frozen=True)
class Frame:
    """Everything one scrape renders, from one collection cycle."""

    t: float
    counters: dict[SeriesKey, float]
    gauges: dict[SeriesKey, float]
    status: dict[str, SourceStatus]
    tax: TaxState | None
    resting: bool = False  # this cycle ran at rest: the next full one is up to rest_interval away


@dataclass
class _Slot:
    source: Source
    started: bool = False
    reason: str = "not started"
    retry_at: float = 0.0
    backoff: float = 0.0
    starting: Future[None] | None = None
    last: Snapshot | None = None
    pending: Future[Snapshot] | None = None
    duration: float = 0.0
    errors: int = 0
    absorber: CounterAbsorber = field(default_factory=CounterAbsorber)
    read_ok: bool = False
    absent: bool = False  # the last start said SourceAbsent, and the source was never up
    ever_up: bool = False
    source_resets: int = 0  # absorbed inside the source (Snapshot.resets)
    # The source failed since its last good read: a lower value next is a reset (driver reload),
    # not a half-written file, so it is absorbed without waiting for a confirming read.
    after_gap: bool = False
    shared: bool = False  # read in the shared lane (see the module docstring)
    # What the last good read was absorbed into: the samples fed (this cycle's unchanged ones are
    # the same objects: a source that re-parses only what changed hands them back), each series'
    # monotonic value, the routed subset of those (for the model), and whether every series came
    # once (a series given twice takes the slow path every cycle).
    fed: list[Sample] | None = None
    out: dict[SeriesKey, float] = field(default_factory=dict)
    routed: dict[SeriesKey, float] = field(default_factory=dict)
    exact: bool = False


class Engine:
    def __init__(
        self,
        sources: Sequence[Source],
        model: TaxModel,
        *,
        read_budget: float = 2.0,
        start_budget: float = 60.0,
        retry_min: float = 30.0,
        retry_max: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        rest_interval: float = 0.0,
        sense_period: float = REST_SENSE_PERIOD,
    ) -> None:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate source names: {names}")
        self._slots = [_Slot(s, shared=bool(getattr(s, "shares_lane", False))) for s in sources]
        self._model = model
        self._budget = read_budget
        self._start_budget = start_budget
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=len(sources) + 1, thread_name_prefix="pcietax-src")
        self._cycle_lock = threading.Lock()
        self._frame: Frame | None = None
        self._logged: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.abandoned: list[str] = []  # sources left to the process exit by close(exiting=True)
        self._rest_interval = rest_interval
        self._sense_period = sense_period
        self._active_until = float("-inf")
        self._traffic: tuple[float, float] | None = None  # (t, bytes) at the last full cycle
        self._sensed: tuple[tuple[str, ...], float, float] | None = None  # (sensors, t, bytes)
        self._resting = False
        self._rebaseline = False  # the sensor's baseline is older than the last active spell

    # -- lifecycle ---------------------------------------------------------------------------

    def start_sources(self) -> None:
        """Start every source at once (an eBPF compile takes seconds; NVML init can hang in the
        driver) and wait up to ``start_budget`` for all of them. One still starting then is
        reported down as starting, and comes up in the first cycle after its start returns."""
        for slot in self._slots:
            self._try_start(slot)
        deadline = time.monotonic() + self._start_budget
        for slot in self._slots:
            self._poll_start(slot, max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 5.0, exiting: bool = False) -> list[str]:
        """Stop collecting and close every source within ``timeout`` seconds in all: sources close
        in parallel, and one whose close (or start) is still running at the deadline is left to
        the process exit (the kernel detaches probes with the process): their names are returned.

        ``exiting``: the process exits next. A source with ``abandon()`` (the eBPF source: its
        detaches wait for grace periods, ~1.7 s for 23 probes on a busy VM, while the kernel frees
        them all in ~0.6 s with the process) stops counting and leaves its kernel objects to the
        exit and is named in ``self.abandoned``: the caller then exits without atexit handlers."""
        deadline = time.monotonic() + timeout
        abandoned: list[str] = []
        self.abandoned = abandoned
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))

        gave_up: set[str] = set()

        def close_one(slot: _Slot) -> None:
            if slot.starting is not None:
                # A start still running would leave its probes attached after we close: wait for it.
                self._poll_start(slot, max(0.0, deadline - time.monotonic()))
                if slot.starting is not None:
                    # Its own verdict, not the join's: this thread and the join share one deadline.
                    gave_up.add(slot.source.name)
                    return
            if slot.started and exiting and hasattr(slot.source, "abandon"):
                slot.source.abandon()
                abandoned.append(slot.source.name)
                slot.started = False
            elif slot.started:
                try:
                    slot.source.close()
                except Exception as e:  # closing must go on for every source
                    log.warning("source %s: close failed: %s", slot.source.name, e)
                slot.started = False

        closers = [threading.Thread(target=close_one, args=(slot,), daemon=True,
                                    name=f"pcietax-close-{slot.source.name}") for slot in self._slots]
        for t in closers:
            t.start()
        for t in closers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        late = [slot.source.name for slot, t in zip(self._slots, closers, strict=True)
                if t.is_alive() or slot.source.name in gave_up]
        if late:
            log.warning("sources %s did not close within %.1fs; not waiting for them", late, timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return late

    def ready(self) -> bool:
        """True once a complete collection cycle has run (readiness: /-/ready)."""
        return self._frame is not None

    def run_in_background(self, interval: float) -> None:
        """Collect every ``interval`` seconds in a daemon thread (the first cycle runs now); at
        rest every ``rest_interval`` (see the module docstring)."""
        self.collect()

        def loop() -> None:
            while not self._stop.wait(self._wait(interval)):
                try:
                    if self.cycle_due(interval):
                        self.collect()
                except Exception:  # the loop must survive anything a cycle throws
                    log.exception("collection cycle failed")

        self._thread = threading.Thread(target=loop, name="pcietax-collect", daemon=True)
        self._thread.start()

    # -- rest ---------------------------------------------------------------------------------

    @property
    def _threshold(self) -> float:
        """Bytes per second below which the node is at rest: the ratio's own minimum."""
        return self._model.min_useful / self._model.window

    def cycle_due(self, interval: float) -> bool:
        """Whether this tick (every ``interval``) runs a full cycle."""
        if self._rest_interval <= interval or self._frame is None:
            self._resting = False
            return True
        now = self._clock()
        if now < self._active_until:
            # Active: every tick reads in full, and the model's bytes (_note_traffic) say how long.
            self._resting = False
            self._rebaseline = True
            return True
        last = self._sensed
        if self._rebaseline or last is None or now - last[1] >= self._sense_period - interval / 2:
            # Leaving activity, the sensor's last value is from before it: take a fresh one, and
            # judge from the next (bytes averaged over the busy spell would wake it again).
            flowing = self._sense(now, judge=not self._rebaseline)
            self._rebaseline = False
            if flowing is None or flowing:
                # Unknown (no sensor up, or its baseline is new) counts as traffic: never rest blind.
                self._active_until = now + self._model.window
                self._resting = False
                return True
        self._resting = True
        if not self._frame.resting:
            return True  # going to rest: one full cycle now, so scrapes see resting=1 at once
        # Half a tick early: a rest interval that is a multiple of the tick keeps its period.
        return now - self._frame.t >= self._rest_interval - interval / 2

    def _wait(self, interval: float) -> float:
        """Seconds to the next tick: at rest, the next sense or full cycle, whichever is first (a
        tick with neither to do was a wakeup for nothing, half of them at rest)."""
        frame = self._frame
        if not self._resting or frame is None or self._sense_period <= interval:
            return interval
        due = frame.t + self._rest_interval - self._clock()
        return max(interval, min(self._sense_period, due))

    def _sense(self, now: float, judge: bool = True) -> bool | None:
        """Traffic at the ratio's threshold since the last sense, by the sensors; None when no
        sensor is up. A sensor runs on this thread, so only a lane source (kernel files) that has
        never overrun its budget is asked."""
        sensors = [slot for slot in self._slots if slot.started and slot.read_ok and slot.shared
                   and slot.pending is None and callable(getattr(slot.source, "sense", None))]
        total = 0.0
        for slot in sensors:
            try:
                value = slot.source.sense()
            except Exception as e:  # the next full read reports the fault; this tick reads in full
                log.debug("source %s: sense failed: %s", slot.source.name, e)
                return None
            if value is None:
                return None
            total += value
        if not sensors:
            return None
        names = tuple(slot.source.name for slot in sensors)
        prev, self._sensed = self._sensed, (names, now, total)
        if not judge:
            return False
        if prev is None or prev[0] != names or now <= prev[1] or total < prev[2]:
            return True  # no comparable baseline, or a counter went back (a reset): read in full
        return self._flowing(total - prev[2], now - prev[1])

    def _flowing(self, moved: float, seconds: float) -> bool:
        rate = moved / seconds
        return rate > 0 and rate >= self._threshold  # at a threshold of 0, any byte is traffic

    def _note_traffic(self, now: float, tax: TaxState) -> None:
        """After a full cycle: traffic the sensors cannot see (RDMA verbs, GPU PCIe) keeps the node
        active too, from the model's own byte counts since the previous full cycle."""
        total = sum(v for (hop, _), v in tax.moved.items() if hop in ACTIVITY_HOPS) + sum(tax.useful.values())
        prev, self._traffic = self._traffic, (now, total)
        if prev is not None and now > prev[0] and self._flowing(total - prev[1], now - prev[0]):
            self._active_until = max(self._active_until, now + self._model.window)

    # -- one cycle ---------------------------------------------------------------------------

    def frame(self) -> Frame:
        f = self._frame
        return f if f is not None else self.collect()

    def collect(self) -> Frame:
        with self._cycle_lock:
            now = self._clock()
            # A retried start gets the cycle's read budget: a quick one comes up in this cycle, a
            # hanging one is polled again next cycle instead of holding the loop.
            start_deadline = time.monotonic() + self._budget
            fresh = []
            for slot in self._slots:
                if not slot.started and slot.starting is None and now >= slot.retry_at:
                    self._try_start(slot)
                    fresh.append(slot)
            for slot in self._slots:
                wait_s = max(0.0, start_deadline - time.monotonic()) if slot in fresh else 0.0
                self._poll_start(slot, wait_s)
            started = [slot for slot in self._slots if slot.started]
            lane = [slot for slot in started if slot.shared and slot.pending is None]
            own = [(slot, self._submit(slot)) for slot in started if slot not in lane]
            deadline = lane_deadline = time.monotonic() + self._budget
            while lane:
                lane = self._read_lane(lane, lane_deadline)
                lane_deadline = time.monotonic() + self._budget  # the rest of a stuck lane: a fresh budget
            for slot, fut in own:  # submitted before the lane: their budget runs from then
                if fut is not None:
                    self._finish(slot, fut, max(0.0, deadline - time.monotonic()))
            frame = self._build(now)
            if frame.tax is not None:
                self._note_traffic(now, frame.tax)
            self._frame = frame
            return frame

    def _read_lane(self, lane: list[_Slot], deadline: float) -> list[_Slot]:
        """Read ``lane`` in order in one worker. A read still running at ``deadline`` is left
        pending and its source gets a worker of its own from now on; the sources queued behind it
        are returned unread, to be read in a fresh lane."""
        futs: list[Future[Snapshot]] = [Future() for _ in lane]
        done = threading.Event()

        def run() -> None:
            try:
                for slot, fut in zip(lane, futs, strict=True):
                    if not fut.set_running_or_notify_cancel():
                        return  # the lane was given up behind a hung read
                    t0 = time.perf_counter()
                    try:
                        fut.set_result(slot.source.read())
                    except BaseException as e:  # the read's failure is the slot's, not the lane's
                        fut.set_exception(e)
                    finally:
                        slot.duration = time.perf_counter() - t0
            finally:
                done.set()

        self._pool.submit(run)
        # One wait for the whole lane: a wait per read would wake this thread, and take the GIL
        # from the lane, once per source.
        done.wait(max(0.0, deadline - time.monotonic()))
        rest: list[_Slot] = []
        hung = False
        for i, (slot, fut) in enumerate(zip(lane, futs, strict=True)):
            if hung and fut.cancelled():
                rest.append(slot)  # unread behind a hung read: for a fresh lane
                continue
            # Behind a hung read but not cancelled: the lane began it just before the cancel, and
            # it is this slot's own read now (two reads of one source never run at once).
            self._finish(slot, fut, self._budget if hung else 0.0)
            if slot.pending is fut:
                self._isolate(slot)
                if not hung:
                    hung = True
                    for f in futs[i + 1:]:
                        f.cancel()
        return rest

    def _isolate(self, slot: _Slot) -> None:
        slot.shared = False
        log.warning("source %s: read overran %gs; reading it in a worker of its own from now on",
                    slot.source.name, self._budget)

    def _submit(self, slot: _Slot) -> Future[Snapshot] | None:
        if slot.pending is not None:
            if not slot.pending.done():
                return None  # still hung from an earlier cycle: skip, keep reporting it down
            fut, slot.pending = slot.pending, None
            return fut
        src = slot.source

        def timed() -> Snapshot:
            t0 = time.perf_counter()
            try:
                return src.read()
            finally:
                slot.duration = time.perf_counter() - t0

        return self._pool.submit(timed)

    def _finish(self, slot: _Slot, fut: Future[Snapshot], timeout: float) -> None:
        name = slot.source.name
        try:
            snap = fut.result(timeout=timeout)
        except FutureTimeout:
            if not fut.done():
                slot.pending = fut
                slot.after_gap = True
                slot.read_ok = False
                slot.reason = f"read took longer than {self._budget:g}s"
                slot.duration = self._budget
                self._log_once(name, slot.reason)
                return
            # Finished after all: the read raised TimeoutError itself (an NVML or socket timeout;
            # since Python 3.11 the same class as a future's timeout), or it completed just now.
            if fut.exception() is not None:
                self._failed(slot, fut.exception())
                return
            snap = fut.result()
        except Exception as e:
            self._failed(slot, e)
            return
        slot.read_ok = True
        slot.ever_up = True
        slot.reason = ""
        slot.last = snap
        slot.source_resets += snap.resets
        for fault in snap.faults:
            slot.errors += 1
            self._log_once(name, str(fault))

    def _failed(self, slot: _Slot, e: BaseException | None) -> None:
        slot.read_ok = False
        slot.after_gap = True
        # A source that was up and now reads as absent has lost hardware it had: a failure.
        slot.absent = False
        if isinstance(e, SourceUnavailable):
            slot.reason = str(e)  # down with its reason, not a fault
            self._log_once(slot.source.name, f"down: {e}")
            return
        slot.errors += 1
        slot.reason = f"read failed: {type(e).__name__}: {e}"
        self._log_once(slot.source.name, slot.reason)

    def _try_start(self, slot: _Slot) -> None:
        slot.reason = "starting"
        slot.starting = self._pool.submit(slot.source.start)

    def _poll_start(self, slot: _Slot, timeout: float) -> None:
        fut = slot.starting
        if fut is None:
            return
        name = slot.source.name
        if not wait([fut], timeout=timeout).done:
            if timeout > 0:
                slot.reason = f"starting (longer than {timeout:.0f}s so far)"
                self._log_once(name, slot.reason)
            return
        slot.starting = None
        e = fut.exception()
        # Hardware that was seen and is now gone is a failure, not an absence.
        slot.absent = isinstance(e, SourceAbsent) and not slot.ever_up
        if e is None:
            slot.started, slot.reason, slot.backoff = True, "", 0.0
            log.info("source %s: up", name)
            return
        if isinstance(e, SourceUnavailable):
            slot.reason = str(e) or "unavailable"
        else:
            slot.reason = f"start failed: {type(e).__name__}: {e}"
        slot.backoff = min(self._retry_max, max(self._retry_min, slot.backoff * 2))
        slot.retry_at = self._clock() + slot.backoff
        self._log_once(name, f"down: {slot.reason}")

    def _log_once(self, source: str, message: str) -> None:
        key = f"{source}: {message}"
        now = time.monotonic()
        last = self._logged.get(key)
        if last is None or now - last >= FAULT_RELOG_INTERVAL:
            self._logged[key] = now
            log.warning("source %s", key)

    def _build(self, now: float) -> Frame:
        counters: dict[SeriesKey, float] = {}
        routed: dict[SeriesKey, float] = {}
        gauges: dict[SeriesKey, float] = {}
        provides: set[str] = set()
        status: dict[str, SourceStatus] = {}
        for slot in self._slots:
            name = slot.source.name
            up = slot.started and slot.read_ok
            snap = slot.last if slot.started else None
            if snap is not None:
                if up:
                    self._absorb(slot, snap)
                    slot.absorber.end_cycle()  # forget series this source stopped giving long ago
                    slot.after_gap = False
                    for s in snap.gauges:
                        gauges.setdefault((s.family, s.labels), s.value)
                    provides |= snap.provides
                # A source that failed this cycle keeps its last counters (held, not dropped): they are
                # still true totals, and a counter series that blinks out breaks rate() for everyone.
                if counters.keys().isdisjoint(slot.out.keys()):
                    counters.update(slot.out)
                    routed.update(slot.routed)
                else:  # a series two sources give: the earlier source wins
                    for key, value in slot.out.items():
                        counters.setdefault(key, value)
                    for key, value in slot.routed.items():
                        routed.setdefault(key, value)
            status[name] = SourceStatus(
                name=name,
                up=up,
                reason=slot.reason,
                duration=slot.duration,
                errors=slot.errors,
                resets=slot.absorber.wraps + slot.absorber.resets + slot.source_resets,
                absent=slot.absent and not up,
            )
        # Which GPUs can do peer-to-peer is the model's to decide, from the topology gauges.
        tax = self._model.update(Inputs(now, counters, frozenset(provides), gauges=gauges, routed=routed))
        return Frame(now, counters, gauges, status, tax, resting=self._resting)

    @staticmethod
    def _absorb(slot: _Slot, snap: Snapshot) -> None:
        """Absorb a good read into ``slot.out``. When the read gives the same series in the same
        order as the last one, only the samples that are not the very objects fed last time are
        absorbed and the rest carried (a big node's 5,000 IRQ lines, a few of which change a
        second); anything else is absorbed in full."""
        cs = snap.counters
        fed, ab = slot.fed, slot.absorber
        if fed is not None and slot.exact and not slot.after_gap and len(cs) == len(fed):
            changed = list(compress(range(len(cs)), map(is_not, cs, fed)))
            if all(cs[i].labels == fed[i].labels and cs[i].family == fed[i].family for i in changed):
                held = set(ab.held)  # a held drop is decided by this read, changed or not
                ab.carry()
                out, routed = slot.out, slot.routed
                for i in changed:
                    s = cs[i]
                    key = (s.family, s.labels)
                    held.discard(key)
                    out[key] = value = ab.update(key, s.value, s.bits)
                    if s.family in ROUTED:
                        routed[key] = value
                if held:
                    for s in cs:
                        key = (s.family, s.labels)
                        if key in held:
                            out[key] = value = ab.update(key, s.value, s.bits)
                            if s.family in ROUTED:
                                routed[key] = value
                slot.fed = list(cs)  # a copy: the source may reuse its list
                return
        out, routed = {}, {}
        exact = True
        confirm = not slot.after_gap
        for s in cs:
            key = (s.family, s.labels)
            value = ab.update(key, s.value, s.bits, confirm=confirm)
            if key in out:
                exact = False  # given twice in one read: the first wins, as it always did
                continue
            out[key] = value
            if s.family in ROUTED:
                routed[key] = value
        slot.out, slot.routed, slot.fed, slot.exact = out, routed, list(cs), exact
