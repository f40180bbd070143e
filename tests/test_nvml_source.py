"""The nvml source on a scripted fake NVML (tests/helpers/fakenvml.py): 8 GPUs, the three byte
counter paths, wraps, resets, lost and returning GPUs, unsupported fields, a hung GPU, and the real
"no driver" path of this machine."""

from __future__ import annotations

import ctypes.util
import threading
from itertools import pairwise
from pathlib import Path

import pytest

from helpers.fakenvml import FakeGpu, FakeNvml, eight_gpus
from pcietax.engine import Engine
from pcietax.model import TaxModel
from pcietax.pcie_math import ceiling
from pcietax.sources import nvml_binding as nv
from pcietax.sources.base import Snapshot, SourceAbsent, SourceUnavailable
from pcietax.sources.nvml import INFO, RX, TX, NvmlSource, nvidia_gpu_functions
from pcietax.sources.pcie import CEILING, CORRECTABLE, REPLAY, SPEED, WIDTH

MIB = 1 << 20


def _has_libnvml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return ctypes.util.find_library("nvidia-ml") is not None


no_driver_here = pytest.mark.skipif(
    _has_libnvml(), reason="this host has libnvidia-ml.so: not the no-driver case"
)


@pytest.fixture
def fakes():
    """Every fake made in a test; hung calls are released at the end so no thread outlives it."""
    made: list[FakeNvml] = []
    sources: list[NvmlSource] = []

    def make(gpus, budget: float = 2.0, sysfs: str = "/sys", **kw) -> tuple[FakeNvml, NvmlSource]:
        f = FakeNvml(gpus=gpus, **kw)
        src = NvmlSource(f, sysfs=sysfs, gpu_budget=budget, start_budget=2.0, clock=f.clock)
        made.append(f)
        sources.append(src)
        return f, src

    yield make
    for f in made:
        f.release.set()
    for s in sources:
        s.close()


# The `gpu` label is the GPU's PCI address (catalog.GPU_ID); these tests name GPUs by their place
# in the fakes' lists, so translate the addresses the fakes use back to that place.
_PLACE = {**{f"0000:{b.lower()}:00.0": str(i) for i, b in enumerate(("18", "2A", "3A", "5D", "9A", "AB",
                                                                      "BA", "DB"))},
          "0000:3b:00.0": "0", "0000:5e:00.0": "1"}


def _place(gpu: str) -> str:
    return _PLACE.get(gpu, gpu)


def by(snap: Snapshot, family: str, key: str = "gpu") -> dict[str, float]:
    return {(_place(dict(s.labels)[key]) if key == "gpu" else dict(s.labels)[key]): s.value
            for s in [*snap.counters, *snap.gauges] if s.family == family}


def faults(snap: Snapshot) -> list[str]:
    return [str(f) for f in snap.faults]


# -- the binding's constants ------------------------------------------------------------------


def test_binding_constants_match_installed_pynvml():
    pynvml = pytest.importorskip("pynvml")
    pairs = {
        "SUCCESS": "NVML_SUCCESS",
        "ERROR_NOT_SUPPORTED": "NVML_ERROR_NOT_SUPPORTED",
        "ERROR_NOT_FOUND": "NVML_ERROR_NOT_FOUND",
        "ERROR_LIBRARY_NOT_FOUND": "NVML_ERROR_LIBRARY_NOT_FOUND",
        "ERROR_GPU_IS_LOST": "NVML_ERROR_GPU_IS_LOST",
        "ERROR_RESET_REQUIRED": "NVML_ERROR_RESET_REQUIRED",
        "ERROR_UNINITIALIZED": "NVML_ERROR_UNINITIALIZED",
        "FI_PCIE_TX_BYTES": "NVML_FI_DEV_PCIE_COUNT_TX_BYTES",
        "FI_PCIE_RX_BYTES": "NVML_FI_DEV_PCIE_COUNT_RX_BYTES",
        "FI_PCIE_REPLAY_COUNTER": "NVML_FI_DEV_PCIE_REPLAY_COUNTER",
        "FI_PCIE_CORRECTABLE_ERRORS": "NVML_FI_DEV_PCIE_COUNT_CORRECTABLE_ERRORS",
        "VALUE_TYPE_UNSIGNED_INT": "NVML_VALUE_TYPE_UNSIGNED_INT",
        "VALUE_TYPE_UNSIGNED_LONG_LONG": "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG",
        "GPM_METRIC_PCIE_TX_PER_SEC": "NVML_GPM_METRIC_PCIE_TX_PER_SEC",
        "GPM_METRIC_PCIE_RX_PER_SEC": "NVML_GPM_METRIC_PCIE_RX_PER_SEC",
        "PCIE_UTIL_TX_BYTES": "NVML_PCIE_UTIL_TX_BYTES",
        "PCIE_UTIL_RX_BYTES": "NVML_PCIE_UTIL_RX_BYTES",
    }
    ours = {name: getattr(nv, name) for name in pairs}
    assert ours == {name: getattr(pynvml, theirs) for name, theirs in pairs.items()}


# -- no driver: the real binding on this machine -------------------------------------------------


@no_driver_here
def test_real_binding_without_driver_is_absent_with_reason():
    # This machine: no libnvidia-ml.so.1 and no NVIDIA GPU on its PCI bus, the CPU-only node case.
    assert nvidia_gpu_functions(Path("/sys/bus/pci/devices")) == []
    src = NvmlSource(nv.PynvmlBinding())
    with pytest.raises(SourceAbsent) as e:
        src.start()
    msg = str(e.value)
    assert msg.startswith("NVML unavailable")
    assert "libnvidia-ml.so.1" in msg and "no NVIDIA GPU on the PCI bus" in msg
    src.close()  # closing a source that never started is harmless


@no_driver_here
def test_engine_reports_real_nvml_absent_and_keeps_collecting():
    engine = Engine([NvmlSource(nv.PynvmlBinding())], TaxModel())
    engine.start_sources()
    frame = engine.collect()
    st = frame.status["nvml"]
    assert not st.up and st.absent and "libnvidia-ml.so.1" in st.reason
    assert frame.tax is not None and not frame.tax.measured["host_to_gpu"]
    engine.close()


def _node_with(fake_node, *, gpu: bool, other_nvidia: bool = False):
    """A fixture PCI bus with a NIC, and optionally an NVIDIA GPU (3D controller 0x0302, as every
    data-centre NVIDIA GPU reports) or NVIDIA functions that are not GPUs (an NVSwitch bridge
    0x0680 and a GPU's HDMI audio function 0x0403)."""
    fake_node.add_pci("0000:17:00.0", 0x020000)  # ConnectX NIC (vendor 0x15b3)
    if gpu:
        fake_node.add_pci("0000:1b:00.0", 0x030200, vendor=0x10DE, device=0x2330)
    if other_nvidia:
        fake_node.add_pci("0000:05:00.0", 0x068000, vendor=0x10DE, device=0x22A3, link=None)
        fake_node.add_pci("0000:06:00.1", 0x040300, vendor=0x10DE, device=0x10F0, link=None)
    return str(fake_node.sys)


@pytest.mark.parametrize("case", ["no_library", "driver_not_loaded", "zero_devices"])
def test_no_nvml_and_no_nvidia_gpu_on_the_bus_is_absent(fakes, fake_node, case):
    sysfs = _node_with(fake_node, gpu=False, other_nvidia=True)
    kw = {"no_library": {"no_driver": True}, "driver_not_loaded": {"init_error": nv.ERROR_DRIVER_NOT_LOADED},
          "zero_devices": {}}[case]
    f, src = fakes([], sysfs=sysfs, **kw)
    with pytest.raises(SourceAbsent, match="no NVIDIA GPU on the PCI bus"):
        src.start()
    assert not f.initialized  # NVML shut down again when there is nothing to read


@pytest.mark.parametrize("case", ["no_library", "driver_not_loaded", "zero_devices"])
def test_no_nvml_but_an_nvidia_gpu_on_the_bus_is_a_failure(fakes, fake_node, case):
    # The DaemonSet without runtimeClassName: nvidia: the GPU is there, libnvidia-ml.so.1 is not.
    sysfs = _node_with(fake_node, gpu=True)
    kw = {"no_library": {"no_driver": True}, "driver_not_loaded": {"init_error": nv.ERROR_DRIVER_NOT_LOADED},
          "zero_devices": {}}[case]
    _, src = fakes([], sysfs=sysfs, **kw)
    with pytest.raises(SourceUnavailable) as e:
        src.start()
    assert not isinstance(e.value, SourceAbsent)
    assert "the PCI bus has 1 NVIDIA GPU(s): 0000:1b:00.0" in str(e.value)


@pytest.mark.parametrize("code", [18, nv.ERROR_NO_PERMISSION, nv.ERROR_UNKNOWN])
def test_init_failure_of_an_installed_driver_is_a_failure_even_without_a_gpu(fakes, fake_node, code):
    # 18 = NVML_ERROR_LIB_RM_VERSION_MISMATCH: a driver upgrade without a reboot. The NVIDIA stack
    # is installed and broken, whatever the bus shows.
    sysfs = _node_with(fake_node, gpu=False)
    _, src = fakes([], sysfs=sysfs, init_error=code)
    with pytest.raises(SourceUnavailable) as e:
        src.start()
    assert not isinstance(e.value, SourceAbsent)


def test_unreadable_pci_bus_is_a_failure_not_an_absence(fakes, tmp_path):
    sysfs = tmp_path / "sys"
    (sysfs / "bus/pci").mkdir(parents=True)
    (sysfs / "bus/pci/devices").write_text("not a directory")
    _, src = fakes([], sysfs=str(sysfs), no_driver=True)
    with pytest.raises(SourceUnavailable, match="cannot tell whether this node has NVIDIA GPUs") as e:
        src.start()
    assert not isinstance(e.value, SourceAbsent)


def test_node_without_pci_bus_is_absent(fakes, tmp_path):
    _, src = fakes([], sysfs=str(tmp_path / "sys"), no_driver=True)
    with pytest.raises(SourceAbsent):
        src.start()


def test_gpu_scan_survives_hostile_sysfs(fake_node):
    sysfs = _node_with(fake_node, gpu=True)
    bad = fake_node.add_pci("0000:99:00.0", 0x030200, vendor=0x10DE, link=None)
    (bad.path / "vendor").write_bytes(b"\xff\xfe" * 10)  # invalid UTF-8: not proven a GPU
    huge = fake_node.add_pci("0000:9a:00.0", 0x030200, vendor=0x10DE, link=None)
    (huge.path / "class").write_text("z" * (8 << 20))  # 8 MiB of garbage: 64 bytes read, malformed
    assert nvidia_gpu_functions(Path(sysfs) / "bus/pci/devices") == ["0000:1b:00.0"]


def test_engine_exports_nvml_absent_on_a_cpu_only_node(fakes, fake_node):
    sysfs = _node_with(fake_node, gpu=False)
    _, src = fakes([], sysfs=sysfs, no_driver=True)
    engine = Engine([src], TaxModel(), retry_min=0.0, retry_max=0.0)
    try:
        engine.start_sources()
        st = engine.collect().status["nvml"]
        assert (st.up, st.absent) == (False, True)
    finally:
        engine.close()


def test_init_that_hangs_does_not_block_start(fakes):
    f, src = fakes(eight_gpus(), init_hangs=True)
    src._start_budget = 0.2
    with pytest.raises(SourceUnavailable, match=r"did not return within 0\.2s"):
        src.start()
    with pytest.raises(SourceUnavailable, match="still blocked"):
        src.start()  # no second thread piles up on the stuck driver
    f.release.set()
    src._start_thread.join(5)
    src.start()  # the late init worked: no second init
    assert f.calls.count("handle_by_index") == 8
    assert len(by(src.read(), INFO)) == 8


# -- eight GPUs on the field path --------------------------------------------------------------


def test_eight_gpus_bytes_links_health_and_identity(fakes):
    gpus = eight_gpus()
    for i, g in enumerate(gpus):
        g.rx, g.tx = (1000 * i, 1000 * i + 4096 * (i + 1)), (7 * i, 7 * i + 512 * (i + 1))
        g.replay, g.correctable = (i,), (2 * i,)
    f, src = fakes(gpus)
    src.start()
    first = src.read()
    f.advance()
    snap = src.read()
    assert faults(snap) == []
    rx0, rx = by(first, RX), by(snap, RX)
    tx0, tx = by(first, TX), by(snap, TX)
    assert sorted(rx) == [str(i) for i in range(8)]
    assert {k: rx[k] - rx0[k] for k in rx} == {str(i): 4096.0 * (i + 1) for i in range(8)}
    assert {k: tx[k] - tx0[k] for k in tx} == {str(i): 512.0 * (i + 1) for i in range(8)}
    # identity labels: gpu and pci_bus_id are the sysfs-form bus id, and the UUID
    labels = {_place(dict(s.labels)["gpu"]): dict(s.labels) for s in snap.counters if s.family == RX}
    assert labels["3"]["pci_bus_id"] == "0000:5d:00.0"
    assert labels["3"]["uuid"] == gpus[3].uuid
    info = {_place(dict(s.labels)["gpu"]): dict(s.labels) for s in snap.gauges if s.family == INFO}
    assert info["6"] == {"gpu": "0000:ba:00.0", "pci_bus_id": "0000:ba:00.0", "uuid": gpus[6].uuid,
                         "name": "NVIDIA H100 80GB HBM3", "numa_node": "1", "counter_path": "field"}
    # links: Gen5 = 32 GT/s per lane, x16, for both states, as the sysfs pcie source spells them
    speed = {
        (dict(s.labels)["pci_bus_id"], dict(s.labels)["state"], dict(s.labels)["device_kind"]): s.value
        for s in snap.gauges if s.family == SPEED
    }
    assert speed[("0000:18:00.0", "current", "gpu")] == 32.0 and speed[("0000:18:00.0", "max", "gpu")] == 32.0
    assert set(by(snap, WIDTH, "pci_bus_id").values()) == {16.0}
    assert set(by(snap, CEILING, "pci_bus_id").values()) == {ceiling(5, 16, 256).usable_bytes_per_second}
    assert by(snap, REPLAY, "pci_bus_id")["0000:db:00.0"] == 7
    assert by(snap, CORRECTABLE, "pci_bus_id")["0000:db:00.0"] == 14
    assert snap.provides == {RX, TX, REPLAY, CORRECTABLE}


def test_degraded_link_reports_its_own_ceiling(fakes):
    g = FakeGpu(pci_bus_id="00000000:3B:00.0", link=(4, 8, 5, 16))
    _, src = fakes([g])
    src.start()
    snap = src.read()
    speed = {dict(s.labels)["state"]: s.value for s in snap.gauges if s.family == SPEED}
    width = {dict(s.labels)["state"]: s.value for s in snap.gauges if s.family == WIDTH}
    assert speed == {"current": 16.0, "max": 32.0} and width == {"current": 8.0, "max": 16.0}
    want = ceiling(4, 8, 256).usable_bytes_per_second
    assert by(snap, CEILING, "pci_bus_id") == {"0000:3b:00.0": want}


def test_ceiling_uses_programmed_mps_from_sysfs(fake_node):
    rp = fake_node.add_pci("0000:00:01.0", 0x060400)
    fake_node.add_pci("0000:3b:00.0", 0x030200, rp, vendor=0x10DE)
    cfg = fake_node.sys / "bus/pci/devices/0000:3b:00.0/config"
    # A minimal config space: capability list with a PCIe capability at 0x40 whose Device Control
    # sets MPS = 512 (bits 7:5 = 2), as the kernel shows it to root.
    data = bytearray(256)
    data[0x06] = 0x10
    data[0x34] = 0x40
    data[0x40], data[0x41] = 0x10, 0x00
    data[0x48:0x4A] = (2 << 5).to_bytes(2, "little")
    cfg.write_bytes(bytes(data))
    f = FakeNvml(gpus=[FakeGpu(pci_bus_id="00000000:3B:00.0")])
    src = NvmlSource(f, sysfs=str(fake_node.sys), clock=f.clock)
    src.start()
    want = ceiling(5, 16, 512).usable_bytes_per_second
    assert by(src.read(), CEILING, "pci_bus_id") == {"0000:3b:00.0": want}
    src.close()


# -- wraps and resets (absorbed by the engine) -----------------------------------------------------


def _engine(src: NvmlSource, f: FakeNvml) -> Engine:
    e = Engine([src], TaxModel(), read_budget=5.0, clock=f.clock)
    e.start_sources()
    return e


def _exported(frame, family: str, gpu: str) -> float:
    return next(
        v for (fam, labels), v in frame.counters.items()
        if fam == family and _place(dict(labels)["gpu"]) == gpu
    )


def test_32bit_field_counter_wrap_is_absorbed(fakes):
    top = 2**32
    g = FakeGpu(pci_bus_id="00000000:3B:00.0", value_type=nv.VALUE_TYPE_UNSIGNED_INT,
                rx=(top - 3000, top - 1000, 500, 2500), tx=(0,))
    f, src = fakes([g])
    engine = _engine(src, f)
    seen = []
    for _ in range(4):
        seen.append(_exported(engine.collect(), RX, "0"))
        f.advance()
    assert [b - a for a, b in pairwise(seen)] == [2000, 1500, 2000]
    assert engine.frame().status["nvml"].resets == 1
    engine.close()


def test_64bit_counter_drop_is_a_reset_not_a_wrap(fakes):
    g = FakeGpu(pci_bus_id="00000000:3B:00.0", rx=(10_000, 20_000, 300, 1300))
    f, src = fakes([g])
    engine = _engine(src, f)
    seen = []
    for _ in range(4):
        seen.append(_exported(engine.collect(), RX, "0"))
        f.advance()
    # the first low read is held until the next confirms the reset (a half-written value would
    # come back); then everything the counter shows is new: 300 bytes, then 1000 more
    assert [b - a for a, b in pairwise(seen)] == [10_000, 0, 1300]
    engine.close()


# -- unsupported fields and paths ---------------------------------------------------------------


def test_unsupported_health_fields_and_numa_are_absent_not_faults(fakes):
    gpus = [FakeGpu(pci_bus_id="00000000:3B:00.0", replay=None, correctable=None, numa_node=None),
            FakeGpu(pci_bus_id="00000000:5E:00.0")]
    _, src = fakes(gpus)
    src.start()
    snap = src.read()
    assert faults(snap) == []
    assert by(snap, REPLAY, "pci_bus_id") == {"0000:5e:00.0": 0}
    assert by(snap, CORRECTABLE, "pci_bus_id") == {"0000:5e:00.0": 0}
    assert {_place(dict(s.labels)["gpu"]): dict(s.labels)["numa_node"]
            for s in snap.gauges if s.family == INFO} == {
        "0": "", "1": "0"}


def test_gpu_without_any_byte_counter_keeps_links_and_drops_provides(fakes):
    _, src = fakes([FakeGpu(pci_bus_id="00000000:3B:00.0", path="none")])
    src.start()
    snap = src.read()
    assert by(snap, RX) == {} and by(snap, TX) == {}
    assert by(snap, INFO, "counter_path") == {"none": 1.0}
    assert RX not in snap.provides and TX not in snap.provides
    assert len(by(snap, WIDTH, "state")) == 2


def test_provides_bytes_when_at_least_one_gpu_counts(fakes):
    gpus = [FakeGpu(pci_bus_id="00000000:3B:00.0", path="none"), FakeGpu(pci_bus_id="00000000:5E:00.0")]
    _, src = fakes(gpus)
    src.start()
    assert {RX, TX} <= src.read().provides


# -- the GPM and throughput paths (integrated over the clock passed in) --------------------------


def test_gpm_path_integrates_mib_per_second_over_the_interval(fakes):
    g = FakeGpu(pci_bus_id="00000000:3B:00.0", path="gpm", rx=(0, 100, 50), tx=(0, 10, 0))
    f, src = fakes([g])
    src.start()
    first = src.read()
    assert by(first, RX) == {"0": 0.0} and by(first, INFO, "counter_path") == {"gpm": 1.0}
    f.advance(dt=2.0)
    s1 = src.read()
    f.advance(dt=0.5)
    s2 = src.read()
    assert by(s1, RX) == {"0": 100 * MIB * 2.0}
    assert by(s2, RX) == {"0": 100 * MIB * 2.0 + 50 * MIB * 0.5}
    assert by(s2, TX) == {"0": 10 * MIB * 2.0}
    assert {RX, TX} <= s2.provides and faults(s2) == []
    assert len(f.live_samples) == 1  # only the newest sample is kept as the next baseline
    src.close()
    assert f.live_samples == set()


def test_throughput_path_is_a_sampled_estimate(fakes):
    g = FakeGpu(pci_bus_id="00000000:3B:00.0", path="throughput", rx=(0, 2000, 2000), tx=(0, 1000, 0))
    f, src = fakes([g])
    src.start()
    assert by(src.read(), INFO, "counter_path") == {"throughput_sampled": 1.0}
    f.advance(dt=1.5)
    s = src.read()
    assert by(s, RX) == {"0": 2000 * 1024 * 1.5} and by(s, TX) == {"0": 1000 * 1024 * 1.5}


def test_each_gpu_takes_its_best_path(fakes):
    gpus = [FakeGpu(pci_bus_id=f"00000000:{b}:00.0", path=p)
            for b, p in (("18", "field"), ("2A", "gpm"), ("3A", "throughput"), ("5D", "none"))]
    _, src = fakes(gpus)
    src.start()
    assert by(src.read(), INFO, "counter_path") == {
        "field": 1.0, "gpm": 1.0, "throughput_sampled": 1.0, "none": 1.0}


# -- lost GPUs, returning GPUs, hung GPUs ----------------------------------------------------------


def test_lost_gpu_holds_its_counters_others_flow_and_its_reset_is_absorbed(fakes):
    gpus = eight_gpus()
    for g in gpus:
        g.rx = (0, 1000, 2000, 3000, 4000, 5000)
    gpus[3].lost_steps = frozenset({2, 3})
    gpus[3].rx = (0, 1000, 0, 0, 100, 600)  # back at step 4 with its counter reset by the driver
    f, src = fakes(gpus)
    engine = _engine(src, f)
    series = []
    for _ in range(6):
        fr = engine.collect()
        series.append({str(i): _exported(fr, RX, str(i)) for i in range(8)})
        assert fr.status["nvml"].up
        f.advance()
    assert [s["0"] for s in series] == [0, 1000, 2000, 3000, 4000, 5000]
    # back at 100 (held until the next read confirms the driver's reset), then 600: 1000 + 600
    assert [s["3"] for s in series] == [0, 1000, 1000, 1000, 1000, 1600]
    assert all(s1[k] >= s0[k] for s0, s1 in pairwise(series) for k in s0)
    assert "handle_by_uuid" in f.calls
    assert engine.frame().status["nvml"].errors == 2  # one "GPU lost" fault per read while it was gone


def test_lost_gpu_fault_names_the_gpu(fakes):
    gpus = eight_gpus()
    gpus[5].lost_steps = frozenset({1})
    f, src = fakes(gpus)
    src.start()
    src.read()
    f.advance()
    snap = src.read()
    assert faults(snap) == ["GPU lost: GPU 5 (0000:ab:00.0): GPU is lost"]
    assert len(by(snap, RX)) == 8  # held, not dropped
    assert {RX, TX} <= snap.provides  # the seven others still count


def test_hung_gpu_is_held_while_the_others_keep_flowing(fakes):
    gpus = eight_gpus()
    for g in gpus:
        g.rx = (0, 10, 20, 30)
    gpus[2].hang_steps = frozenset({1})
    f, src = fakes(gpus, budget=1.0)  # generous: a loaded CI box must not make the others look hung
    src.start()
    at_start = f.calls.count("field_values")
    src.read()
    f.advance()
    s1 = src.read()  # GPU 2's call blocks in the driver
    assert faults(s1) == ["NVML call hung: GPU 2 (0000:3a:00.0): no answer within 1s"]
    assert by(s1, RX) == {**{str(i): 10.0 for i in range(8)}, "2": 0.0}
    f.advance()
    s2 = src.read()  # still blocked: no second call piles onto it
    assert by(s2, RX)["0"] == 20.0 and by(s2, RX)["2"] == 0.0
    assert f.calls.count("field_values") - at_start == 8 + 8 + 7
    f.release.set()
    f.advance()
    for _ in range(50):  # the stuck call returns; the GPU flows again on a later read
        s3 = src.read()
        if by(s3, RX)["2"] == 30.0:
            break
    assert by(s3, RX) == {str(i): 30.0 for i in range(8)}


def test_engine_keeps_serving_while_one_gpu_hangs(fakes):
    gpus = eight_gpus()
    for g in gpus:
        g.rx = (0, 10, 20)
    gpus[7].hang_steps = frozenset({1, 2})
    f, src = fakes(gpus, budget=1.0)
    engine = Engine([src], TaxModel(), read_budget=2.0, clock=f.clock)
    engine.start_sources()
    engine.collect()
    frames = []

    def cycles() -> None:
        for _ in range(2):
            f.advance()
            frames.append(engine.collect())

    t = threading.Thread(target=cycles)
    t.start()
    t.join(30)
    assert not t.is_alive(), "a hung GPU blocked the collection cycle"
    last = frames[-1]
    assert last.status["nvml"].up
    assert _exported(last, RX, "0") == 20 and _exported(last, RX, "7") == 0
    engine.close()


def test_every_family_the_source_emits_renders_through_the_prometheus_sink(fakes):
    from prometheus_client import CollectorRegistry, generate_latest

    from pcietax.sinks.prometheus import PcietaxCollector

    gpus = eight_gpus()
    gpus[0].rx = (0, 123456)
    f, src = fakes(gpus)
    engine = _engine(src, f)
    engine.collect()
    f.advance()
    engine.collect()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PcietaxCollector(engine.frame, ["nvml"]))
    text = generate_latest(reg).decode()
    lines = set(text.splitlines())
    uuid0 = gpus[0].uuid
    assert ('pcietax_gpu_pcie_receive_bytes_total{gpu="0000:18:00.0",pci_bus_id="0000:18:00.0",'
            f'uuid="{uuid0}"}} 123456.0') in lines
    assert ('pcietax_gpu_info{counter_path="field",gpu="0000:18:00.0",name="NVIDIA H100 80GB HBM3",'
            f'numa_node="0",pci_bus_id="0000:18:00.0",uuid="{uuid0}"}} 1.0') in lines
    assert 'pcietax_pcie_link_width{device_kind="gpu",pci_bus_id="0000:db:00.0",state="max"} 16.0' in lines
    assert 'pcietax_hop_measured{hop="host_to_gpu"} 1.0' in lines
    assert 'pcietax_moved_bytes_total{direction="ingress",hop="host_to_gpu"} 123456.0' in lines
    engine.close()


def test_nvml_is_registered_first_so_its_gpu_series_win():
    from pcietax.sources import SOURCES, SourceOptions

    assert SOURCES[0].name == "nvml"
    src = SOURCES[0].build(SourceOptions(sysfs="/nonexistent"))
    assert isinstance(src, NvmlSource) and isinstance(src._nv, nv.PynvmlBinding)


def test_nvml_gpu_link_series_win_over_the_sysfs_source(fakes, fake_node):
    """Both sources give the GPU's link width under the same labels; the engine keeps NVML's."""
    from pcietax.sources.pcie import PcieSource

    rp = fake_node.add_pci("0000:00:01.0", 0x060400)
    fake_node.add_pci("0000:3b:00.0", 0x030200, rp, vendor=0x10DE,
                      link=("32.0 GT/s PCIe", 8, "32.0 GT/s PCIe", 16))
    f, src = fakes([FakeGpu(pci_bus_id="00000000:3B:00.0", link=(5, 4, 5, 16))])
    engine = Engine([src, PcieSource(sysfs=str(fake_node.sys))], TaxModel(), clock=f.clock)
    engine.start_sources()
    gauges = engine.collect().gauges
    width = {dict(lb)["state"]: v for (fam, lb), v in gauges.items()
             if fam == WIDTH and dict(lb)["pci_bus_id"] == "0000:3b:00.0"}
    assert width == {"current": 4.0, "max": 16.0}
    engine.close()


def test_real_binding_decodes_field_records_by_their_value_type():
    """The wrapper reads each record's union by its declared type, on pynvml's real ctypes structs
    (filled as the driver would fill them), and maps NVMLError to NvmlError with its code."""
    pynvml = pytest.importorskip("pynvml")

    class Lib:  # stands in for the loaded library behind pynvml's functions
        NVMLError = pynvml.NVMLError

        @staticmethod
        def nvmlDeviceGetFieldValues(handle, ids):
            recs = (pynvml.c_nvmlFieldValue_t * len(ids))()
            recs[0].fieldId, recs[0].valueType, recs[0].nvmlReturn = ids[0], 1, 0
            recs[0].value.ullVal = (0xDEAD << 32) | 4000  # junk in the upper half of a 32-bit record
            recs[1].fieldId, recs[1].valueType, recs[1].nvmlReturn = ids[1], 3, 0
            recs[1].value.ullVal = 2**40 + 5
            recs[2].fieldId, recs[2].nvmlReturn = ids[2], pynvml.NVML_ERROR_NOT_SUPPORTED
            return recs

        @staticmethod
        def nvmlDeviceGetUUID(handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    b = nv.PynvmlBinding()
    b._nv = Lib
    vals = b.field_values(None, [nv.FI_PCIE_RX_BYTES, nv.FI_PCIE_TX_BYTES, nv.FI_PCIE_CORRECTABLE_ERRORS])
    assert vals[0] == nv.FieldValue(nv.FI_PCIE_RX_BYTES, nv.SUCCESS, 4000.0, 32)
    assert vals[1] == nv.FieldValue(nv.FI_PCIE_TX_BYTES, nv.SUCCESS, float(2**40 + 5), 64)
    assert vals[2].ret == nv.ERROR_NOT_SUPPORTED
    with pytest.raises(nv.NvmlError) as e:
        b.uuid(None)
    assert e.value.code == nv.ERROR_GPU_IS_LOST
