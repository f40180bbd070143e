"""The upi source on a fixture 2-socket Sapphire Rapids (tests/helpers/fakeuncore.py) with a fake
perf opener, plus the PMU format/encoding rules it relies on. The live-kernel side of the binding is
in test_perf.py."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from helpers.fakeuncore import SCALE_NEW, SCALE_OLD, STACK_BUSES, FakePerf, FakeUncore
from pcietax.engine import Engine
from pcietax.model import TaxModel
from pcietax.perf import PerfOpenError, Reading
from pcietax.pmu import PmuError, encode, parse_cpulist, parse_format, parse_terms, read_pmu
from pcietax.sources.base import SourceAbsent, SourceUnavailable
from pcietax.sources.procfs import ProcfsSource
from pcietax.sources.upi import IIO, UPI, UpiSource, scaled_delta

# Intel's encodings, written out here rather than taken from the code under test:
# UNC_UPI_RxL_FLITS.ALL_DATA = event 0x03 umask 0x0f, UNC_UPI_TxL_FLITS.ALL_DATA = 0x02/0x0f,
# IIO free-running bw_in_port<N> = event 0xff umask 0x20+N.
RX_CONFIG = 0x0F03
TX_CONFIG = 0x0F02


def bw_in(port: int) -> int:
    return 0xFF | (0x20 + port) << 8


@pytest.fixture
def spr(tmp_path):
    node = FakeUncore(tmp_path)
    node.spr()
    return node


def values(snap, family):
    return {tuple(sorted(dict(s.labels).items())): s.value for s in snap.counters if s.family == family}


def upi_key(socket, link, direction):
    return (("direction", direction), ("link", str(link)), ("socket", str(socket)))


# -- formats and encodings -------------------------------------------------------------------


def test_format_bit_ranges():
    f = parse_format("umask", "config:8-15,32-55\n")
    assert f.word == "config"
    assert f.bits == (*range(8, 16), *range(32, 56))
    assert parse_format("event", "config:0-7,21").bits == (*range(8), 21)
    assert parse_format("filter_tid", "config1:0-15").word == "config1"
    assert parse_format("edge", "config:18").bits == (18,)


def test_wide_umask_scatters_over_both_ranges():
    spr_umask = parse_format("umask", "config:8-15,32-55")
    # The low 8 bits of the value land in 8-15, the rest from bit 32 on (perf's pmu_format_value).
    assert spr_umask.place(0x0F) == 0x0F00
    assert spr_umask.place(0x1FF) == 0xFF00 | 1 << 32
    fmts = {"event": parse_format("event", "config:0-7"), "umask": spr_umask,
            "filter": parse_format("filter", "config1:0-15")}
    assert encode(fmts, parse_terms("event=0x03,umask=0x0f")) == {
        "config": 0x0F03, "config1": 0, "config2": 0, "config3": 0}
    assert encode(fmts, {"filter": 0xBEEF})["config1"] == 0xBEEF


@pytest.mark.parametrize("text", ["config", "config:", "config:7-0", "config:0-64", "conf:0-7",
                                  "config:0-7;8", "config4:0-1"])
def test_bad_format_is_an_error(text):
    with pytest.raises(PmuError, match="format/x"):
        parse_format("x", text)


def test_terms_and_their_errors():
    assert parse_terms("event=0xff,umask=0x20") == {"event": 0xFF, "umask": 0x20}
    assert parse_terms("event=2,edge") == {"event": 2, "edge": 1}
    with pytest.raises(PmuError, match="bad value"):
        parse_terms("event=0xzz")
    with pytest.raises(PmuError, match="bad event term"):
        parse_terms("event=1,,umask=2")
    fmts = {"event": parse_format("event", "config:0-7")}
    with pytest.raises(PmuError, match="'umask' is not in its format"):
        encode(fmts, {"event": 1, "umask": 1}, "uncore_upi_0")
    with pytest.raises(PmuError, match="does not fit in 8 bits"):
        encode(fmts, {"event": 0x100})


def test_cpulist():
    assert parse_cpulist("0,56\n") == (0, 56)
    assert parse_cpulist("0-3,8") == (0, 1, 2, 3, 8)
    assert parse_cpulist("") == ()
    with pytest.raises(PmuError):
        parse_cpulist("0,x")


def test_read_pmu_from_the_fixture(spr):
    upi = read_pmu(spr.sys, "uncore_upi_2")
    assert upi.type == spr.types["uncore_upi_2"]
    assert upi.cpus == (0, 56)
    assert upi.index == 2
    assert upi.attr("event=0x03,umask=0x0f").config == RX_CONFIG
    iio = read_pmu(spr.sys, "uncore_iio_free_running_0")
    assert iio.event_attr("bw_in_port3").config == bw_in(3)
    assert iio.bytes_per_count("bw_in_port3") == pytest.approx(32.0)  # 3.0517578125e-5 MiB
    assert iio.bytes_per_count("ioclk") is None
    with pytest.raises(PmuError, match="no event 'bw_out_port0'"):
        iio.event_attr("bw_out_port0")


def test_read_pmu_errors(spr):
    (spr.sys / "devices/uncore_upi_1/type").write_text("twenty\n")
    with pytest.raises(PmuError, match="uncore_upi_1/type"):
        read_pmu(spr.sys, "uncore_upi_1")
    (spr.sys / "devices/uncore_upi_3/format/umask").write_text("config:8-15;32\n")
    with pytest.raises(PmuError, match="format/umask"):
        read_pmu(spr.sys, "uncore_upi_3")


# -- discovery --------------------------------------------------------------------------------


def test_plan_covers_every_link_socket_and_root_port(spr):
    plans, faults = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc)).plan()
    assert faults == []
    upi = [p for p in plans if p.family == UPI]
    assert len(upi) == 4 * 2 * 2  # links x sockets x rx/tx
    want = {(c, cpu) for c in (RX_CONFIG, TX_CONFIG) for cpu in (0, 56)}
    assert {(p.attr.config, p.cpu) for p in upi} == want
    assert {dict(p.labels)["socket"] for p in upi} == {"0", "1"}
    assert all(p.bytes_per_count == pytest.approx(64 / 9) for p in upi)
    iio = [p for p in plans if p.family == IIO]
    assert len(iio) == 6 * 8 * 2  # stacks x ports x sockets (bw_out is gone since 6.15)
    p = next(p for p in iio if dict(p.labels) == {"direction": "rx", "pci_bus": STACK_BUSES[1][1],
                                                   "port": "5", "socket": "1", "stack": "1"})
    assert (p.cpu, p.attr.config, p.bytes_per_count) == (56, bw_in(5), pytest.approx(32.0))


def test_scale_and_events_come_from_the_running_kernel(tmp_path):
    node = FakeUncore(tmp_path)
    node.spr(before_6_15=True)
    plans, _ = UpiSource(sysfs=str(node.sys), procfs=str(node.proc)).plan()
    iio = [p for p in plans if p.family == IIO]
    # The older kernel lists bw_out too, with the 4-byte scale it had then.
    assert {dict(p.labels)["direction"] for p in iio} == {"rx", "tx"}
    assert [p.bytes_per_count for p in iio] == pytest.approx([4.0] * len(iio))
    assert float(SCALE_OLD) * 2**20 == pytest.approx(4.0)
    assert float(SCALE_NEW) * 2**20 == 32


def test_missing_scale_and_bus_mapping(spr):
    (spr.sys / "devices/uncore_iio_free_running_2/events/bw_in_port4.scale").unlink()
    os.unlink(spr.sys / "devices/uncore_iio_3/die1")
    plans, faults = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc)).plan()
    assert faults == [("no byte scale", f"{spr.sys}/bus/event_source/devices/uncore_iio_free_running_2"
                                        "/events/bw_in_port4.scale/.unit")]
    stack3 = {dict(p.labels)["socket"]: dict(p.labels)["pci_bus"] for p in plans
              if p.family == IIO and dict(p.labels)["stack"] == "3"}
    assert stack3 == {"0": STACK_BUSES[3][0], "1": ""}


def test_malformed_pmu_is_a_fault_and_the_rest_still_count(spr):
    (spr.sys / "devices/uncore_upi_1/format/umask").write_text("garbage\n")
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=FakePerf(spr))
    src.start()
    snap = src.read()
    assert [f.what for f in snap.faults] == ["bad PMU description"]
    assert {dict(s.labels)["link"] for s in snap.counters if s.family == UPI} == {"0", "2", "3"}
    assert src.read().faults == []  # reported once, not every cycle


# -- counting ---------------------------------------------------------------------------------


def test_flits_become_bytes_per_socket_link_direction(spr):
    perf = FakePerf(spr)
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=perf)
    src.start()
    first = src.read()
    assert first.provides == {UPI, IIO}
    assert set(values(first, UPI).values()) == {0.0}
    perf.counter("uncore_upi_0", RX_CONFIG, 56).tick(9_000)  # socket 1 received 1000 lines on link 0
    perf.counter("uncore_upi_0", TX_CONFIG, 0).tick(9_000)  # which socket 0 sent
    perf.counter("uncore_iio_free_running_1", bw_in(2), 0).tick(1_000)
    snap = src.read()
    upi = values(snap, UPI)
    assert upi[upi_key(1, 0, "rx")] == pytest.approx(64_000)
    assert upi[upi_key(0, 0, "tx")] == pytest.approx(64_000)
    assert sum(upi.values()) == pytest.approx(128_000)
    iio = values(snap, IIO)
    key = (("direction", "rx"), ("pci_bus", STACK_BUSES[1][0]), ("port", "2"), ("socket", "0"),
           ("stack", "1"))
    assert iio[key] == pytest.approx(32_000)
    assert sum(iio.values()) == pytest.approx(32_000)
    src.close()
    assert perf.live() == []


def test_multiplexed_counts_are_scaled_per_interval_and_never_go_back(spr):
    perf = FakePerf(spr)
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=perf)
    src.start()
    c = perf.counter("uncore_upi_1", RX_CONFIG, 0)
    # Reproduces the kernel rotating events when more are asked for than the box has counters:
    # the event held a counter for half of the first second, all of the next two.
    c.tick(9_000, running_share=0.5)
    got = [values(src.read(), UPI)[upi_key(0, 1, "rx")]]
    for _ in range(2):
        c.tick(9_000)
        got.append(values(src.read(), UPI)[upi_key(0, 1, "rx")])
    assert got == pytest.approx([128_000, 192_000, 256_000])
    # Scaling the cumulative count instead (value x enabled/running) would have dropped from
    # 128000 to 96000 bytes after the second read: a false counter reset downstream.
    assert c.value * c.enabled / c.running * 64 / 9 < 256_000


def test_narrow_counter_wrap_is_extended(spr):
    perf = FakePerf(spr, bits=48)
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=perf)
    src.start()
    c = perf.counter("uncore_upi_3", TX_CONFIG, 56)
    c.value = (1 << 48) - 900  # a 48-bit PMON counter just below its top
    before = values(src.read(), UPI)[upi_key(1, 3, "tx")]
    c.tick(9_000)  # passes 2**48 and reads back as 8100
    after = values(src.read(), UPI)[upi_key(1, 3, "tx")]
    assert after - before == pytest.approx(64_000)
    assert scaled_delta(Reading(10, 0, 0), Reading(5, 0, 0), bits=4) == 11  # 10 -> 15 -> 0 -> 5


def test_paranoid_eacces_takes_the_source_down_with_the_reason(spr):
    perf = FakePerf(spr)
    perf.deny = errno.EACCES
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=perf)
    reason = r"permission denied: kernel\.perf_event_paranoid=2.*CAP_PERFMON"
    with pytest.raises(SourceUnavailable, match=reason):
        src.start()


def test_partial_open_failure_keeps_the_rest(spr):
    perf = FakePerf(spr)
    perf.fail_pmus = {"uncore_upi_2"}
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=perf)
    src.start()
    snap = src.read()
    assert {f.what for f in snap.faults} == {"perf_event_open failed"}
    assert len(snap.faults) == 4  # two CPUs x rx/tx of the one PMU
    assert "uncore_upi_2 cpu0: no such PMU on that CPU" in snap.faults[0].where
    assert {dict(s.labels)["link"] for s in snap.counters if s.family == UPI} == {"0", "1", "3"}


def test_pmu_that_disappears_and_returns(spr):
    perf = FakePerf(spr)
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=perf)
    src.start()
    perf.counter("uncore_upi_0", RX_CONFIG, 0).tick(9_000)
    assert values(src.read(), UPI)[upi_key(0, 0, "rx")] == pytest.approx(64_000)
    # The uncore driver goes away (module unloaded, PCI device removed): reads fail with ENODEV
    # and the PMUs leave sysfs.
    for c in perf.live():
        c.gone = True
    with pytest.raises(SourceUnavailable, match=r"every uncore counter failed to read.*No such device"):
        src.read()
    assert perf.live() == []  # closed, not leaked
    for n in [n for n in spr.types if n.startswith("uncore_")]:
        spr.remove_pmu(n)
    with pytest.raises(SourceUnavailable, match="no uncore UPI or IIO PMUs"):
        src.read()
    spr.spr()  # back, with new type numbers
    perf.opened.clear()
    values(src.read(), UPI)
    perf.counter("uncore_upi_0", RX_CONFIG, 0).tick(900)
    # The series continues from where it was: reopening does not restart it.
    assert values(src.read(), UPI)[upi_key(0, 0, "rx")] == pytest.approx(70_400)


def test_amd_is_absent(tmp_path):
    node = FakeUncore(tmp_path)
    node.set_cpuinfo("AuthenticAMD", family=25, model=17, name="AMD EPYC 9654")
    node.add_pmu("amd_df", {"event": "config:0-7,32-35,59-60", "umask": "config:8-15"}, cpumask="0,96")
    src = UpiSource(sysfs=str(node.sys), procfs=str(node.proc), opener=FakePerf(node))
    with pytest.raises(SourceAbsent, match=r"^unsupported_cpu: AuthenticAMD"):
        src.start()
    (node.proc / "cpuinfo").unlink()  # no cpuinfo (a restricted container): the PMUs tell
    with pytest.raises(SourceAbsent, match=r"^unsupported_cpu: PMUs amd_df"):
        src.start()


def test_intel_without_uncore_pmus_is_absent(tmp_path):
    node = FakeUncore(tmp_path)  # what a VM shows: GenuineIntel, no uncore_* PMUs
    with pytest.raises(SourceAbsent, match=r"no uncore UPI or IIO PMUs under .*intel_uncore"):
        UpiSource(sysfs=str(node.sys), procfs=str(node.proc), opener=FakePerf(node)).start()
    # A kernel without perf events has no event_source/devices directory at all: absent too.
    shutil.rmtree(node.sys / "bus/event_source")
    with pytest.raises(SourceAbsent):
        UpiSource(sysfs=str(node.sys), procfs=str(node.proc), opener=FakePerf(node)).start()


def test_uncore_pmus_that_are_there_but_broken_are_a_failure(spr):
    # Every UPI/IIO PMU present but undescribable (a format file the kernel changed): not absent.
    for name in [n for n in spr.types if n.startswith(("uncore_upi_", "uncore_iio_free_running_"))]:
        (spr.sys / "bus/event_source/devices" / name / "type").write_text("garbage\n")
    with pytest.raises(SourceUnavailable, match=r"no uncore UPI or IIO PMUs.*bad PMU description") as e:
        UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=FakePerf(spr)).start()
    assert not isinstance(e.value, SourceAbsent)


def test_unreadable_pmu_directory_is_a_failure_not_an_absence(tmp_path):
    node = FakeUncore(tmp_path)
    devices = node.sys / "bus/event_source/devices"
    shutil.rmtree(devices)
    devices.write_text("not a directory")  # ENOTDIR: listing fails, which proves nothing absent
    with pytest.raises(SourceUnavailable, match="cannot list uncore PMUs") as e:
        UpiSource(sysfs=str(node.sys), procfs=str(node.proc), opener=FakePerf(node)).start()
    assert not isinstance(e.value, SourceAbsent)


def test_pmus_that_were_there_and_left_are_a_failure_at_restart(spr):
    perf = FakePerf(spr)
    src = UpiSource(sysfs=str(spr.sys), procfs=str(spr.proc), opener=perf)
    src.start()
    src.close()
    for n in [n for n in spr.types if n.startswith("uncore_")]:
        spr.remove_pmu(n)
    with pytest.raises(SourceUnavailable, match="no uncore UPI or IIO PMUs") as e:
        src.start()
    assert not isinstance(e.value, SourceAbsent)


def test_model_counts_each_crossing_once():
    from pcietax.model import Inputs
    from pcietax.sources.base import labels_of

    model = TaxModel(window=10)
    series = {(UPI, labels_of(socket="0", link="0", direction="tx")): 0.0,
              (UPI, labels_of(socket="1", link="0", direction="rx")): 0.0}
    model.update(Inputs(0.0, dict(series), frozenset({UPI})))
    state = model.update(Inputs(1.0, {k: 1000.0 for k in series}, frozenset({UPI})))
    assert state.measured["upi"]
    assert state.moved[("upi", "ingress")] + state.moved[("upi", "egress")] == pytest.approx(1000.0)


# -- this machine ------------------------------------------------------------------------------


def _host_has_uncore() -> bool:
    d = "/sys/bus/event_source/devices"
    return any(n.startswith(("uncore_upi", "uncore_iio_free_running")) for n in os.listdir(d))


@pytest.mark.skipif(_host_has_uncore(), reason="this host has uncore UPI/IIO PMUs (not a VM)")
def test_real_host_without_uncore_is_absent_with_reason_and_others_go_on():
    """The real path on a VM (this project's CI): real /sys, real /proc, the real syscall opener."""
    engine = Engine([UpiSource(), ProcfsSource()], TaxModel(), retry_min=3600)
    try:
        engine.start_sources()
        frame = engine.collect()
    finally:
        engine.close()
    upi = frame.status["upi"]
    assert not upi.up and upi.absent
    assert ("no uncore UPI or IIO PMUs" in upi.reason) or upi.reason.startswith("unsupported_cpu")
    assert frame.status["procfs"].up
    assert not any(fam in (UPI, IIO) for fam, _ in frame.counters)
    assert frame.tax is not None and frame.tax.measured["upi"] is False


def test_perf_open_error_reasons():
    from pcietax.perf import EventAttr

    e = PerfOpenError(errno.EACCES, EventAttr(24, 0x0F03), 0, paranoid=3)
    assert "kernel.perf_event_paranoid=3" in str(e) and "type=24,config=0xf03" in str(e)
    assert "kernel.perf_event_paranoid=unknown" in PerfOpenError(errno.EPERM, EventAttr(1), 0).reason
    assert "unknown PMU type" in PerfOpenError(errno.ENOENT, EventAttr(99), 0).reason
    assert "cpumask" in PerfOpenError(errno.EINVAL, EventAttr(99), 0).reason
    assert "offline" in PerfOpenError(errno.ENODEV, EventAttr(99), 0).reason
    assert PerfOpenError(errno.E2BIG, EventAttr(99), 0).reason == os.strerror(errno.E2BIG)
