"""scripts/gpu_check.py without a GPU: its measurement loop and report on a fake copier whose copies
move bytes through a scripted fake NVML, read by the real nvml source."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, pcietax_env
from helpers.fakenvml import FakeGpu, FakeNvml
from pcietax.sources import nvml_binding as nv
from pcietax.sources.nvml import NvmlSource

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc
spec.loader.exec_module(gc)

MIB = 1 << 20


class FakeCopier:
    """Copies move payload x overhead through the fake GPU's counters (its receive counter for H2D,
    transmit for D2H) and take payload / rate seconds on the fake clock."""

    def __init__(self, fake: FakeNvml, gpu: int, overhead: float, gbps: float) -> None:
        self.fake, self.g, self.overhead, self.gbps = fake, fake.gpus[gpu], overhead, gbps
        self.live = 0

    def prepare(self, size: int, memory: str):
        self.live += 1
        return size, memory

    def run(self, buffers, direction: str, repeats: int) -> float:
        size, _ = buffers
        moved = size * repeats * self.overhead
        rx, tx = self.g.rx[-1], self.g.tx[-1]
        if direction == "h2d":
            rx += moved
        else:
            tx += moved
        seconds = size * repeats / (self.gbps * 1e9)
        self.g.rx, self.g.tx = (*self.g.rx[: self.fake.step + 1], rx), (*self.g.tx[: self.fake.step + 1], tx)
        self.fake.advance(dt=seconds)
        return seconds

    def release(self, buffers) -> None:
        self.live -= 1


def _setup(**gpu):
    fake = FakeNvml(gpus=[FakeGpu(pci_bus_id="00000000:3B:00.0", rx=(0,), tx=(0,), **gpu)])
    src = NvmlSource(fake, clock=fake.clock)
    src.start()
    return fake, src


def test_measure_reports_rate_and_counter_overhead_for_every_case():
    fake, src = _setup()
    copier = FakeCopier(fake, 0, overhead=1.0625, gbps=20.0)
    counters = gc.NvmlCounters(src, 0)
    rows, skipped = gc.measure(copier, counters, clock=fake.clock, sleep=lambda s: fake.advance(s, 0))
    assert skipped == [] and copier.live == 0
    assert len(rows) == 16
    assert {(r.direction, r.memory, r.size) for r in rows} == {
        (d, m, s) for d in ("h2d", "d2h") for m in ("pinned", "pageable") for s in gc.SIZES}
    for r in rows:
        assert r.counter_path == "field"
        assert r.counter_ratio == pytest.approx(1.0625)
        assert r.gbps == pytest.approx(20.0)
    small = next(r for r in rows if r.size == 64 * 1024)
    assert small.repeats == 4096 and small.payload == 256 * MIB
    src.close()


def test_measure_absorbs_a_32bit_counter_wrap_mid_case():
    fake, src = _setup(value_type=nv.VALUE_TYPE_UNSIGNED_INT)
    fake.gpus[0].rx = (2**32 - 100 * MIB,)  # the 32-bit counter wraps during the first 512 MiB case
    copier = FakeCopier(fake, 0, overhead=1.0, gbps=10.0)
    rows, _ = gc.measure(copier, gc.NvmlCounters(src, 0), sizes=[256 * MIB], clock=fake.clock,
                         sleep=lambda s: fake.advance(s, 0))
    assert [r.counter_ratio for r in rows if r.direction == "h2d"] == [1.0, 1.0]
    src.close()


def test_gpu_without_byte_counters_reports_na():
    fake, src = _setup(path="none")
    rows, _ = gc.measure(FakeCopier(fake, 0, 1.0, 10.0), gc.NvmlCounters(src, 0), sizes=[4 * MIB],
                         clock=fake.clock, sleep=lambda s: None)
    assert {r.counter_path for r in rows} == {"none"} and {r.counter_ratio for r in rows} == {None}
    assert "n/a" in gc.render(rows, {"gpu": "x"}, [])
    src.close()


def test_budget_skips_what_does_not_fit():
    t = [0.0]
    sim = gc.SimGpu()

    def clock() -> float:
        t[0] += 1.0  # every look at the clock costs a second
        return t[0]

    rows, skipped = gc.measure(sim, sim, budget=6.0, clock=clock, sleep=lambda s: None)
    assert 0 < len(rows) < 16 and len(rows) + len(skipped) == 16


def test_repeats_and_device_matching():
    assert gc.repeats_for(256 * MIB) == 2 and gc.repeats_for(64 * 1024) == 4096
    with pytest.raises(ValueError, match="positive"):
        gc.repeats_for(0)
    props = [{"pci_domain_id": 0, "pci_bus_id": 0x18, "pci_device_id": 0},
             {"pci_domain_id": 0, "pci_bus_id": 0x3B, "pci_device_id": 0}]
    assert gc.match_torch_device("0000:3b:00.0", props) == 1
    assert gc.match_torch_device("0000:5e:00.0", props) is None
    assert gc.match_torch_device("0000:3b:00.0", [{}]) is None  # older PyTorch: no PCI ids


def test_dry_run_and_json_run_anywhere():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--json"],
                         env=pcietax_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["rows"]) == 16 and doc["counter_path"] == "field"
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--budget", "0"],
                         env=pcietax_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--budget must be positive" in bad.stderr


def test_without_torch_or_gpu_it_says_why():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")],
                         env=pcietax_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("gpu_check: ") and ("PyTorch" in out.stderr or "NVML" in out.stderr)
