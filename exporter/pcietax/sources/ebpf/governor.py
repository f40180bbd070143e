"""The CPU budget governor (``--probe.budget``, CPU seconds per second for all probes together).

Each probe group (defs.GROUPS) is either on or off; while on, its cost rate (CPU s/s: kernel run
time plus traps) is measured. Every period the governor sets each group's duty cycle from those
measured rates, highest priority first, so the whole tracer stays within the budget; a group that
cannot be afforded at all still gets ``min_duty``, so its estimate never goes stale. Counts taken
in a window are scaled by (time since the last window ended) / (time on): estimates, and the
families' HELP says so. A group that is always on (``--cuda.probes always``) is never cycled but
its cost is outside the budget (the operator chose exactness).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GroupState:
    name: str
    pinned_on: bool = False  # never duty-cycled
    duty: float = 1.0
    cost_rate: float = 0.0  # CPU s per s while on (smoothed)
    measured: bool = False
    on: bool = True
    window_start: float = 0.0  # when it was last switched on
    last_end: float = 0.0  # end of its last folded window
    on_s: float = 0.0  # time on since last_end
    on_total: float = 0.0  # time on since start, up to window_start when on
    closed: list[tuple[float, float]] = field(default_factory=list)  # windows since last_end

    def windows(self, now: float) -> list[tuple[float, float]]:
        """The windows since the last fold, the open one up to now."""
        return [*self.closed, (self.window_start, now)] if self.on else list(self.closed)

    def total_on(self, now: float) -> float:
        return self.on_total + (now - self.window_start if self.on else 0.0)

    def scale(self, now: float) -> float | None:
        """Scale for counts gathered since last_end; None when it was never on (nothing to fold)."""
        on = self.on_s + (now - self.window_start if self.on else 0.0)
        if on <= 0:
            return None
        return max(now - self.last_end, on) / on


def plan(budget: float, cost_rates: dict[str, float], order: tuple[str, ...], pinned: set[str],
         min_duty: float = 0.02) -> dict[str, float]:
    """Duty cycle per group. Every group first gets ``min_duty`` (so no estimate goes stale), out
    of the budget: when those floors alone cost more than the budget, they shrink in proportion so
    the total still fits. What is left goes by priority, each group taking what it can use (all of
    it when it costs nothing measurable). A pinned group (``--cuda.probes always``: the operator
    chose exact copies over the budget) is on and outside the budget, so it cannot starve the
    others."""
    free = [g for g in order if g not in pinned]
    floors = sum(min_duty * max(cost_rates.get(g, 0.0), 0.0) for g in free)
    floor = min_duty if floors <= budget else min_duty * budget / floors
    left = budget - min(floors, budget)
    duties: dict[str, float] = {}
    for g in order:
        if g in pinned:
            duties[g] = 1.0
            continue
        c = cost_rates.get(g, 0.0)
        if c <= 0:
            duties[g] = 1.0
            continue
        d = min(1.0, floor + max(left, 0.0) / c)
        duties[g] = d
        left -= (d - floor) * c
    return duties


@dataclass
class Governor:
    budget: float
    period: float = 10.0
    order: tuple[str, ...] = ()
    min_duty: float = 0.02
    groups: dict[str, GroupState] = field(default_factory=dict)
    period_start: float = 0.0

    def start(self, now: float, pinned: set[str]) -> None:
        self.period_start = now
        for g in self.order:
            self.groups[g] = GroupState(g, pinned_on=g in pinned, window_start=now, last_end=now)

    def observe(self, group: str, cost_s: float, on_s: float) -> None:
        """Cost measured over on_s seconds of the group being on."""
        if on_s <= 0.05:
            return
        st = self.groups[group]
        rate = cost_s / on_s
        st.cost_rate = rate if not st.measured else 0.5 * st.cost_rate + 0.5 * rate
        st.measured = True

    def replan(self) -> None:
        pinned = {g for g, s in self.groups.items() if s.pinned_on}
        d = plan(self.budget, {g: s.cost_rate for g, s in self.groups.items()}, self.order, pinned,
                 self.min_duty)
        for g, s in self.groups.items():
            s.duty = d[g]

    def planned_cost(self) -> float:
        return sum(s.duty * s.cost_rate for s in self.groups.values() if not s.pinned_on)

    def check(self, now: float) -> bool:
        """Between periods: when what is on now costs well over the budget (a workload just
        started, or the first period, planned before anything was measured), plan again and start
        a new period at once instead of paying for the rest of this one. True when it re-planned."""
        if self.planned_cost() <= 1.5 * self.budget:
            return False
        self.replan()
        self.period_start = now
        return True

    def offsets(self) -> dict[str, float]:
        """Where each cycled group's window starts, as a fraction of the period: one after the
        other in priority order, so windows overlap only when the duties add up to more than one
        period. A window never opens beside all the others: the probes slow what they watch, and
        a window shared by every group would sample the workload at its slowest."""
        out: dict[str, float] = {}
        at = 0.0
        for g in self.order:
            s = self.groups[g]
            if s.pinned_on or s.duty >= 1.0:
                continue
            out[g] = at % 1.0
            at += s.duty
        return out

    def wanted(self, now: float) -> dict[str, bool]:
        """Which groups should be on now: each for duty x period from its offset in the period.
        A new period re-plans from the costs measured so far."""
        if now - self.period_start >= self.period:
            self.period_start = now - ((now - self.period_start) % self.period)
            self.replan()
        f = (now - self.period_start) / self.period
        offs = self.offsets()
        return {g: g not in offs or (f - offs[g]) % 1.0 < s.duty for g, s in self.groups.items()}

    def next_change(self, now: float) -> float:
        """When ``wanted`` may next differ from now: a window's start or end, or the next period."""
        f = (now - self.period_start) / self.period
        edges = [1.0]
        for g, o in self.offsets().items():
            for e in (o, (o + self.groups[g].duty) % 1.0):
                if e > f + 1e-9:
                    edges.append(e)
        return self.period_start + min(edges) * self.period

    def switched(self, group: str, on: bool, now: float) -> None:
        st = self.groups[group]
        if on and not st.on:
            st.window_start = now
        elif not on and st.on:
            st.on_s += now - st.window_start
            st.on_total += now - st.window_start
            st.closed.append((st.window_start, now))
        st.on = on

    def folded(self, group: str, now: float) -> None:
        """The group's counts up to now were folded with scale(now)."""
        st = self.groups[group]
        st.last_end = now
        st.on_s = 0.0
        st.closed = []
        if st.on:
            st.on_total += now - st.window_start
            st.window_start = now
