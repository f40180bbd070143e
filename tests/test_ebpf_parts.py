"""The tracer's parts without the kernel: the governor's duty cycles and scaling, the one definition
shared with the C program, the ELF reader's probe sites, label sanitising and pod attribution."""

from __future__ import annotations

import contextlib
import os
import random
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pcietax.sources.ebpf import defs, elf
from pcietax.sources.ebpf.estimate import WindowEstimator, overlap, process_start
from pcietax.sources.ebpf.governor import Governor, plan
from pcietax.sources.ebpf.idents import OTHER_IDENT, Identities
from pcietax.sources.ebpf.switch import GroupSwitch, close_all
from pcietax.sources.proclabels import ProcessFolder, sanitize

C_PROGRAM = Path(__file__).resolve().parents[1] / "ebpf" / "pcietax.bpf.c"

# --- the governor ------------------------------------------------------------------------------


def test_everything_on_while_it_fits_the_budget():
    assert plan(0.01, {"socket": 0.002, "cuda_copy": 0.003, "irq": 0.001},
                ("socket", "cuda_copy", "irq"), set()) == {"socket": 1.0, "cuda_copy": 1.0, "irq": 1.0}


def test_over_budget_the_lower_priorities_are_cut_first_and_the_total_fits():
    costs = {"socket": 0.004, "cuda_copy": 0.012, "irq": 0.02}
    d = plan(0.01, costs, ("socket", "cuda_copy", "irq"), set(), min_duty=0.0)
    assert d["socket"] == 1.0
    assert d["cuda_copy"] == pytest.approx(0.5)
    assert d["irq"] == 0.0
    assert sum(d[g] * c for g, c in costs.items()) == pytest.approx(0.01)


def test_a_pinned_group_stays_on_outside_the_budget_and_others_keep_a_floor():
    d = plan(0.01, {"socket": 0.004, "cuda_copy": 0.05, "irq": 0.02}, ("socket", "cuda_copy", "irq"),
             {"cuda_copy"}, min_duty=0.02)
    assert d == {"socket": 1.0, "cuda_copy": 1.0, "irq": pytest.approx(0.3)}


def test_plan_never_exceeds_the_budget_above_the_floors():
    rng = random.Random(10)  # seeded: the same 2,000 cases every run
    order = ("socket", "cuda_copy", "irq")
    for _ in range(2000):
        budget = 10 ** rng.uniform(-6, 0)
        costs = {g: rng.choice([0.0, 10 ** rng.uniform(-7, 1)]) for g in order}
        d = plan(budget, costs, order, set(), min_duty=0.0)
        assert all(0.0 <= v <= 1.0 for v in d.values())
        assert sum(d[g] * costs[g] for g in order) <= budget * (1 + 1e-9) + 1e-12


def test_windows_follow_the_duty_and_counts_scale_by_elapsed_over_on_time():
    g = Governor(budget=0.001, period=10.0, order=("socket", "cuda_copy"), min_duty=0.0)
    g.start(0.0, pinned=set())
    g.observe("cuda_copy", cost_s=0.004, on_s=1.0)  # 4 ms/s while on: a quarter fits
    g.observe("socket", cost_s=0.0, on_s=1.0)
    assert g.wanted(10.0) == {"socket": True, "cuda_copy": True}  # new period: re-planned
    assert g.groups["cuda_copy"].duty == pytest.approx(0.25)
    g.folded("cuda_copy", 10.0)
    assert g.wanted(12.4) == {"socket": True, "cuda_copy": True}
    assert g.wanted(12.6)["cuda_copy"] is False
    g.switched("cuda_copy", False, 12.5)
    st_ = g.groups["cuda_copy"]
    assert st_.scale(20.0) == pytest.approx(10.0 / 2.5)  # 2.5 s on of 10 s
    g.folded("cuda_copy", 20.0)
    assert st_.scale(21.0) is None  # off since: nothing to fold yet
    assert st_.total_on(21.0) == pytest.approx(10.0 + 2.5)


def test_floors_come_out_of_the_budget_and_shrink_together_when_they_alone_exceed_it():
    order = ("socket", "cuda_copy", "irq")
    costs = {"socket": 0.1, "cuda_copy": 0.3, "irq": 0.1}  # floors of 0.1 each: 0.05 > budget
    d = plan(0.01, costs, order, set(), min_duty=0.1)
    assert sum(d[g] * costs[g] for g in order) == pytest.approx(0.01)
    assert d["socket"] == d["cuda_copy"] == d["irq"] == pytest.approx(0.1 * 0.01 / 0.05)
    # Floors that fit: reserved first, the rest by priority (socket's remainder first).
    d = plan(0.05, costs, order, set(), min_duty=0.1)
    assert d["cuda_copy"] == d["irq"] == pytest.approx(0.1)
    assert d["socket"] == pytest.approx(0.1 + (0.05 - 0.05) / 0.1)
    d = plan(0.06, costs, order, set(), min_duty=0.1)
    assert d["socket"] == pytest.approx(0.2) and d["irq"] == pytest.approx(0.1)


def test_plan_with_floors_never_exceeds_the_budget():
    rng = random.Random(11)
    order = ("socket", "cuda_copy", "irq")
    for _ in range(2000):
        budget = 10 ** rng.uniform(-6, 0)
        costs = {g: rng.choice([0.0, 10 ** rng.uniform(-7, 1)]) for g in order}
        d = plan(budget, costs, order, set(), min_duty=rng.uniform(0, 0.5))
        assert all(0.0 <= v <= 1.0 for v in d.values())
        assert sum(d[g] * costs[g] for g in order) <= budget * (1 + 1e-9) + 1e-12


def _cycled(duties: dict[str, float]) -> Governor:
    g = Governor(budget=1.0, period=10.0, order=tuple(duties), min_duty=0.0)
    g.start(0.0, pinned=set())
    for name, d in duties.items():
        g.groups[name].duty = d
    return g


def test_windows_are_staggered_one_after_another_in_priority_order():
    g = _cycled({"socket": 0.3, "cuda_copy": 0.2, "irq": 1.0})
    assert g.offsets() == {"socket": 0.0, "cuda_copy": pytest.approx(0.3)}  # irq: always on
    on = {t: g.wanted(t / 10) for t in range(0, 100)}  # every 0.1 s of one period
    assert sum(w["socket"] for w in on.values()) == 30
    assert sum(w["cuda_copy"] for w in on.values()) == 20
    assert not any(w["socket"] and w["cuda_copy"] for w in on.values())
    assert all(w["irq"] for w in on.values())
    assert g.next_change(0.0) == pytest.approx(3.0)  # socket closes, cuda_copy opens
    assert g.next_change(3.0) == pytest.approx(5.0)
    assert g.next_change(5.0) == pytest.approx(10.0)  # the next period


def test_staggered_windows_wrap_around_the_period_when_duties_add_up_to_more_than_one():
    g = _cycled({"socket": 0.7, "cuda_copy": 0.6})
    assert g.offsets()["cuda_copy"] == pytest.approx(0.7)
    assert g.wanted(7.5)["cuda_copy"] and g.wanted(0.5)["cuda_copy"]  # 0.7 .. 1.3 of the period
    assert not g.wanted(4.0)["cuda_copy"]


# --- estimates at the edges of a process's life ---------------------------------------------------

ALIVE = (-float("inf"), float("inf"))


def test_counts_scale_by_the_windows_inside_the_interval():
    est = WindowEstimator()
    out = est.fold({(7, "rx"): 100.0}, since=0.0, now=10.0, windows=[(0.0, 1.0), (5.0, 6.0)],
                   lifetime=lambda tgid: ALIVE)
    assert out == {(7, "rx"): pytest.approx(500.0)}  # 100 in 2 s of 10


def test_a_process_started_mid_interval_is_not_credited_with_time_before_it_existed():
    est = WindowEstimator()
    out = est.fold({(7, "rx"): 100.0}, since=0.0, now=10.0, windows=[(0.0, 2.0), (8.0, 10.0)],
                   lifetime=lambda tgid: (8.0, float("inf")))
    assert out[(7, "rx")] == pytest.approx(100.0)  # alive 2 s, all of them seen


def test_a_process_that_exits_between_windows_is_credited_at_its_last_rate_up_to_its_exit():
    est = WindowEstimator()
    life = {7: ALIVE}
    est.fold({(7, "rx"): 100.0}, 0.0, 10.0, [(0.0, 1.0)], lambda t: life[t])  # 100 B/s
    life[7] = (-float("inf"), 14.0)
    out = est.fold({}, 10.0, 20.0, [(16.0, 17.0)], lambda t: life[t])
    assert out == {(7, "rx"): pytest.approx(400.0)}
    assert len(est) == 0  # estimated once, then forgotten: no double count
    assert est.fold({}, 20.0, 30.0, [(20.0, 21.0)], lambda t: life[t]) == {}


def test_a_process_seen_in_a_window_after_its_last_fold_is_not_extrapolated_twice():
    est = WindowEstimator()
    life = {7: ALIVE}
    est.fold({(7, "rx"): 100.0}, 0.0, 10.0, [(0.0, 1.0)], lambda t: life[t])
    life[7] = (-float("inf"), 16.5)
    out = est.fold({(7, "rx"): 50.0}, 10.0, 20.0, [(16.0, 17.0)], lambda t: life[t])
    # Counted 50 in its 0.5 s inside the window; alive 6.5 s of the interval.
    assert out == {(7, "rx"): pytest.approx(50.0 * 6.5 / 0.5)}
    assert est.exited(20.0, 30.0, [], lambda t: life[t]) == {}


def test_counts_outside_the_known_lifetime_are_taken_whole_not_dropped():
    est = WindowEstimator()
    out = est.fold({(7, "rx"): 10.0}, 0.0, 10.0, [(0.0, 1.0)], lambda t: (5.0, 6.0))
    assert out[(7, "rx")] == pytest.approx(100.0)  # clock edge: scaled over the whole interval
    out = est.fold({(8, "rx"): 10.0}, 0.0, 10.0, [], lambda t: ALIVE)
    assert out[(8, "rx")] == 10.0  # no window at all: as counted


def test_overlap_of_windows():
    assert overlap([(0, 2), (5, 7)], 1, 6) == 2
    assert overlap([], 0, 10) == 0


def test_process_start_on_the_monotonic_clock(tmp_path):
    now = process_start(Path("/proc"), os.getpid())
    assert 0 < time.monotonic() - now < 3600 * 24 * 365
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "stat").write_bytes(b"9 (x\xff) ) S 1 2")  # hostile name, fields missing
    assert process_start(tmp_path, 9) == -float("inf")
    assert process_start(tmp_path, 10) == -float("inf")


# --- opening and closing windows --------------------------------------------------------------


class FakeProbes:
    """The source's attach/detach/gate callbacks, recording their order; ``slow`` makes a detach
    take as long as a kernel grace period does for perf-event probes."""

    def __init__(self, slow: float = 0.0, fail: bool = False) -> None:
        self.log: list[tuple[str, ...]] = []
        self.slow, self.fail = slow, fail
        self.detaching = threading.Event()

    def gate(self, i: int, is_open: bool) -> None:
        self.log.append(("gate", str(i), "open" if is_open else "shut"))

    def attach(self, g: str) -> None:
        self.log.append(("attach", g))

    def detach(self, g: str) -> None:
        self.detaching.set()
        time.sleep(self.slow)
        if self.fail:
            raise OSError("EBUSY")
        self.log.append(("detach", g))


def _wait(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def test_the_gate_bounds_the_window_and_the_detach_follows_in_the_background():
    f = FakeProbes()
    sw = GroupSwitch(("socket", "irq"), f.gate, f.attach, f.detach, attached=("socket",))
    try:
        sw.open("socket")
        assert f.log == [("gate", "0", "open")]  # attached already: no attach
        sw.close("socket")
        assert f.log[1] == ("gate", "0", "shut")
        assert _wait(lambda: sw.state("socket") == "detached")
        assert f.log[2] == ("detach", "socket")
        sw.open("socket")
        assert f.log[3:] == [("attach", "socket"), ("gate", "0", "open")]  # attached before opened
    finally:
        sw.stop()


def test_opening_again_calls_off_a_queued_detach_and_waits_for_a_running_one():
    f = FakeProbes(slow=0.3)
    sw = GroupSwitch(("socket", "irq"), f.gate, f.attach, f.detach, attached=("socket", "irq"))
    try:
        sw.close("irq")
        assert f.detaching.wait(5)  # irq detaching now (0.3 s)
        sw.close("socket")  # queued behind it
        sw.open("socket")  # called off: never detached
        sw.open("irq")  # waits for the detach, then attaches again
        assert ("attach", "irq") in f.log and f.log.index(("detach", "irq")) < f.log.index(("attach", "irq"))
        time.sleep(0.4)
        assert ("detach", "socket") not in f.log and ("attach", "socket") not in f.log
        assert sw.state("socket") == sw.state("irq") == "attached"
    finally:
        sw.stop()


def test_a_failed_detach_is_reported_and_the_group_stays_attached():
    f = FakeProbes(fail=True)
    sw = GroupSwitch(("socket",), f.gate, f.attach, f.detach, attached=("socket",))
    try:
        sw.close("socket")
        assert _wait(lambda: sw.error is not None)
        assert "detaching socket: OSError: EBUSY" in sw.error
        assert _wait(lambda: sw.state("socket") == "attached")
        sw.open("socket")
        assert ("attach", "socket") not in f.log
    finally:
        sw.stop()


def test_close_all_runs_detaches_in_parallel_and_counts_the_late_ones():
    started = threading.Barrier(3, timeout=5)  # all three must be running at once to pass it
    assert close_all([started.wait] * 3, timeout=5) == 0
    gate = threading.Event()
    try:
        assert close_all([gate.wait, lambda: None], timeout=0.2) == 1
    finally:
        gate.set()
    assert close_all([], timeout=0) == 0


# --- one definition -----------------------------------------------------------------------------


def test_the_c_program_uses_only_generated_enums_and_defines_none_itself():
    text = C_PROGRAM.read_text()
    header = defs.c_header()
    used = set(re.findall(r"\b(P|S|E|DIR|K)_[A-Z_]+\b", text))
    assert used, "the program uses the generated enums"
    for name in re.findall(r"\b(?:P|S|E|DIR|K)_[A-Z0-9_]+\b", text):
        assert re.search(rf"\b{name}\b", header), f"{name} is not generated by defs.c_header()"
    assert not re.search(r"^\s*enum\s*\{\s*P_", text, re.M), "probe ids must come from defs.py only"


def test_hit_indices_are_dense_and_unique():
    idx = {defs.hit_index(p, s) for p in defs.PROBES for s in defs.SITES}
    assert idx == set(range(len(defs.PROBES) * len(defs.SITES)))


# --- ELF probe sites ----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "site"), [(b"\x55\x48\x89\xe5", "push"), (b"\x53\x48", "push"),
                                            (b"\x41\x54\x55", "push"), (b"\x48\x89\xf8", "step"),
                                            (b"\xf3\x0f\x1e\xfa", "step"), (b"", "step")])
def test_site_kinds(code, site):
    assert elf.site_kind(code) == site


def test_libc_symbols_have_offsets_and_sites():
    import ctypes

    fns = elf.functions("/lib/x86_64-linux-gnu/libc.so.6", {"sched_getcpu", "labs"})
    mem = ctypes.cast(ctypes.CDLL("libc.so.6").labs, ctypes.c_void_p).value
    assert fns["labs"].site == elf.site_kind(ctypes.string_at(mem, 4))


@pytest.mark.parametrize("data", [b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\0" * 58,
                                  b"\x7fELF\x02\x01" + b"\xff" * 200, b"MZ" + b"\0" * 100])
def test_garbage_files_raise_elf_error_only(tmp_path, data):
    p = tmp_path / "x.so"
    p.write_bytes(data)
    with pytest.raises(elf.ElfError):
        elf.functions(str(p))


def test_fuzzed_elf_headers_never_escape_as_other_errors(tmp_path):
    rng = random.Random(7)
    p = tmp_path / "f.so"
    for _ in range(300):
        p.write_bytes(b"\x7fELF\x02\x01" + rng.randbytes(rng.randrange(64, 512)))
        with contextlib.suppress(elf.ElfError):
            elf.functions(str(p))


def test_truncated_section_table_is_an_elf_error(tmp_path):
    head = bytearray(b"\x7fELF\x02\x01" + b"\0" * 58)
    struct.pack_into("<Q", head, 0x28, 10_000)  # e_shoff far past the end
    struct.pack_into("<H", head, 0x3A, 64)
    struct.pack_into("<H", head, 0x3C, 3)
    p = tmp_path / "t.so"
    p.write_bytes(bytes(head))
    with pytest.raises(elf.ElfError):
        elf.functions(str(p))


# --- labels and pods ----------------------------------------------------------------------------


def test_sanitize_replaces_invalid_utf8_and_control_characters():
    assert sanitize(b"ptx-\xff\xfe\x01") == "ptx-\ufffd\ufffd\ufffd"
    assert sanitize(b"ok\n") == "ok"
    assert len(sanitize(b"a" * 500)) == 64


def test_sanitize_always_gives_printable_text():
    rng = random.Random(13)
    for _ in range(2000):
        s = sanitize(rng.randbytes(rng.randrange(0, 80)))
        assert all(ch.isprintable() for ch in s) and len(s) <= 64


def test_identity_tuples_fold_into_other_with_empty_pod_labels():
    f = ProcessFolder(top_n=1, other=OTHER_IDENT)
    a, b = ("vllm", "ns", "p1", "c"), ("vllm", "ns", "p2", "c")
    f.add({(1, "ingress"): 10.0, (2, "ingress"): 5.0}, {1: a, 2: b})
    assert f.totals() == {(a, "ingress"): 10.0, (OTHER_IDENT, "ingress"): 5.0}


@dataclass(frozen=True)
class _Ref:
    namespace: str
    pod: str
    container: str


class _Pods:
    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def lookup(self, proc_cgroup: bytes):
        self.asked.append(proc_cgroup)
        if b"kubepods" in proc_cgroup:
            return _Ref("ns\xff", "pod-a", "c\n1")
        return None


def test_pod_of_a_live_process_is_read_from_its_cgroup_file_and_cached_by_id(tmp_path):
    (tmp_path / "41").mkdir()
    (tmp_path / "41" / "cgroup").write_bytes(b"0::/kubepods/burstable/pod1/abc\n")
    (tmp_path / "41" / "comm").write_bytes(b"python3\n")
    pods = _Pods()
    ids = Identities(tmp_path, None, pods)
    assert ids.ident(41, None, 777) == ("python3", "ns\xff", "pod-a", "c\ufffd1")
    ids.forget({41})
    assert ids.ident(41, b"python3", 777)[2] == "pod-a"
    assert len(pods.asked) == 1  # cached by cgroup id


def test_pod_of_an_exited_process_comes_from_its_cgroup_id(tmp_path):
    cg = tmp_path / "cgroup" / "kubepods" / "podx" / "ctr"
    cg.mkdir(parents=True)
    pods = _Pods()
    ids = Identities(tmp_path / "proc", str(tmp_path / "cgroup"), pods)
    ident = ids.ident(99, b"engine", cg.stat().st_ino)  # no /proc/99: it has exited
    assert ident == ("engine", "ns\xff", "pod-a", "c\ufffd1")
    assert pods.asked == [b"0::/kubepods/podx/ctr\n"]


def test_outside_kubernetes_pod_labels_are_empty(tmp_path):
    assert Identities(tmp_path, None, None).ident(5, b"x", 1) == ("x", "", "", "")


# --- the start-up calibration ------------------------------------------------------------------


def test_dispatch_is_calibrated_even_where_no_uprobe_site_could_be(monkeypatch):
    """A libc whose calibration functions cannot be probed (here: every uprobe attach refused)
    once stopped the tracepoint calibration after its first estimate and left the default. The fake
    reproduces what an attached program does to the calibration's AF_UNIX sends: each costs more
    (2 us here, well above this VM's noise) while it is attached."""
    import socket

    from pcietax.sources.ebpf import selfcost

    attached = [False]
    real_pair = socket.socketpair

    class Slowed:
        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def send(self, data: bytes) -> int:
            if attached[0]:
                end = time.perf_counter() + 2e-6
                while time.perf_counter() < end:
                    pass
            return self._sock.send(data)

        def __getattr__(self, name: str):
            return getattr(self._sock, name)

    monkeypatch.setattr(selfcost.socket, "socketpair", lambda: tuple(Slowed(s) for s in real_pair()))

    def attach_tracepoint():
        attached[0] = True
        return lambda: attached.__setitem__(0, False)

    cal = selfcost.calibrate(lambda path, offset: None, attach_tracepoint)
    assert not cal.measured  # the uprobe sites were not
    assert cal.trap_s["tracepoint"] > 1e-6 > selfcost.DEFAULT_TRAP_S["tracepoint"]
