"""DeltaTracker (eBPF per-(tgid, key) map values -> increases) runs on CounterAbsorber, the one raw
-> increase implementation: both give the same increases on the same raw sequences.

The kernel behaviour reproduced: a BPF hash map entry keyed by tgid holds a cumulative byte sum;
when the process exits the exporter deletes the entry (forget), and a new process that reuses the
pid creates a fresh entry that counts from zero, so its value can be below the old one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pcietax.counters import CounterAbsorber
from pcietax.sources.proclabels import DeltaTracker


def _spec(seq):
    """The increases as DeltaTracker has always defined them, written out independently: first
    sight and any lower value are wholly new, a rise is its difference, zero steps are left out."""
    last: dict = {}
    out = []
    for op, arg in seq:
        if op == "forget":
            last = {k: v for k, v in last.items() if k[0] not in arg}
            continue
        step = {}
        for k, v in arg.items():
            prev = last.get(k, 0.0)
            d = v - prev if v >= prev else v
            last[k] = v
            if d > 0:
                step[k] = d
        out.append(step)
    return out


def _via_absorber(seq):
    """The same sequence through CounterAbsorber.update directly, differencing its totals."""
    a = CounterAbsorber()
    out = []
    for op, arg in seq:
        if op == "forget":
            a.forget_matching(lambda k, dead=arg: k[0] in dead)
            continue
        step = {}
        for k, v in arg.items():
            before = a.value(k) or 0.0
            d = a.update(k, v, confirm=False) - before
            if d > 0:
                step[k] = d
        out.append(step)
    return out


def _via_tracker(seq):
    t = DeltaTracker()
    out = []
    for op, arg in seq:
        if op == "forget":
            t.forget(arg)
        else:
            out.append(t.deltas(arg))
    return out


# A worked sequence: a rise, an unchanged key, a re-created entry without a forget (the map entry
# was deleted by the kernel-side cleanup and made again), a forget and a reused pid.
WORKED = [
    ("read", {(7, "rx"): 100.0, (8, "rx"): 50.0}),
    ("read", {(7, "rx"): 160.0, (8, "rx"): 50.0}),
    ("read", {(7, "rx"): 40.0, (8, "rx"): 70.0}),  # 7's entry re-created: all 40 are new
    ("forget", {8}),
    ("read", {(7, "rx"): 45.0, (8, "rx"): 5.0}),  # pid 8 reused: its 5 bytes are new
    ("read", {(7, "rx"): 45.0, (8, "rx"): 5.0, (8, "tx"): 2.0}),
]
WORKED_INCREASES = [
    {(7, "rx"): 100.0, (8, "rx"): 50.0},
    {(7, "rx"): 60.0},
    {(7, "rx"): 40.0, (8, "rx"): 20.0},
    {(7, "rx"): 5.0, (8, "rx"): 5.0},
    {(8, "tx"): 2.0},
]


def test_worked_sequence_gives_the_hand_worked_increases_on_every_path():
    assert _spec(WORKED) == WORKED_INCREASES
    assert _via_absorber(WORKED) == WORKED_INCREASES
    assert _via_tracker(WORKED) == WORKED_INCREASES


_KEYS = st.tuples(st.integers(1, 4), st.sampled_from(["rx", "tx"]))
_STEP = st.one_of(
    st.tuples(st.just("read"), st.dictionaries(_KEYS, st.integers(0, 2**40).map(float), max_size=6)),
    st.tuples(st.just("forget"), st.sets(st.integers(1, 4), max_size=2)),
)


@settings(max_examples=300, deadline=200)
@given(st.lists(_STEP, max_size=30))
def test_tracker_and_absorber_agree_on_any_sequence(seq):
    want = _spec(seq)
    assert _via_tracker(seq) == want
    assert _via_absorber(seq) == want


def test_forget_of_nothing_or_unknown_pids_keeps_state():
    t = DeltaTracker()
    t.deltas({(1, "rx"): 10.0})
    t.forget(set())
    t.forget({99})
    assert len(t) == 1 and t.deltas({(1, "rx"): 12.0}) == {(1, "rx"): 2.0}
