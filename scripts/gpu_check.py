#!/usr/bin/env python3
"""Check pcietax's NVML GPU byte counters against copies of known size on a real GPU.

Copies known volumes host->device and device->host, from pinned and from pageable host memory, at
64 KiB, 256 KiB, 4 MiB and 256 MiB per copy, reads the GPU's PCIe byte counters through pcietax's
nvml source before and after, and prints per size and path: the measured GB/s, the counter delta
divided by the payload (the protocol overhead the counters include, plus any other traffic on the
GPU meanwhile), and which counter path the GPU supports (field / gpm / throughput_sampled / none).

Needs: an NVIDIA GPU and driver, PyTorch with CUDA, nvidia-ml-py, and this package (installed, or
run from the repository: the script finds ../exporter). Finishes within --budget seconds (170 by
default: under 3 minutes with start-up). ``--dry-run`` runs the same loop on a simulated GPU, so the
pipeline can be checked anywhere.

    python scripts/gpu_check.py [--gpu N] [--json] [--budget 170] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

try:
    import pcietax  # noqa: F401
except ImportError:  # run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "exporter"))

from pcietax.counters import CounterAbsorber
from pcietax.sources import nvml_binding as nv
from pcietax.sources.nvml import INFO, RX, TX, NvmlSource

KIB, MIB = 1 << 10, 1 << 20
SIZES = (64 * KIB, 256 * KIB, 4 * MIB, 256 * MIB)
DIRECTIONS = ("h2d", "d2h")
MEMORIES = ("pinned", "pageable")
TARGET_BYTES = 512 * MIB  # per case: enough traffic that idle chatter on the link is small beside it
MAX_REPEATS = 4096
SETTLE_S = 2.0  # the driver may publish field counters a little after the copy completes


def repeats_for(size: int, target: int = TARGET_BYTES, cap: int = MAX_REPEATS) -> int:
    """How many copies of ``size`` bytes one case makes."""
    if size <= 0:
        raise ValueError(f"payload size must be positive, got {size}")
    return max(1, min(cap, target // size))


@dataclass(frozen=True)
class Row:
    direction: str
    memory: str
    size: int
    repeats: int
    seconds: float
    counter_bytes: float | None  # GPU receive (h2d) or transmit (d2h) counter delta; None: no counter
    counter_path: str

    @property
    def payload(self) -> int:
        return self.size * self.repeats

    @property
    def gbps(self) -> float:
        return self.payload / self.seconds / 1e9 if self.seconds > 0 else float("nan")

    @property
    def counter_ratio(self) -> float | None:
        return None if self.counter_bytes is None else self.counter_bytes / self.payload


class Copier(Protocol):
    def prepare(self, size: int, memory: str) -> Any: ...
    def run(self, buffers: Any, direction: str, repeats: int) -> float: ...  # seconds, synchronised
    def release(self, buffers: Any) -> None: ...


class Counters(Protocol):
    path: str

    def read(self) -> tuple[float, float] | None: ...  # (rx, tx) monotonic bytes, or None
    def sampling(self) -> contextlib.AbstractContextManager[None]: ...


# -- the measurement loop (pure apart from the copier and counters it is given) ---------------------


def measure(
    copier: Copier,
    counters: Counters,
    *,
    sizes: Sequence[int] = SIZES,
    budget: float = 170.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[Row], list[str]]:
    """Every (direction, memory, size) case that fits in ``budget`` seconds; returns the rows and the
    cases skipped for time."""
    t_end = clock() + budget
    rows: list[Row] = []
    skipped: list[str] = []
    for memory in MEMORIES:
        for size in sizes:
            if clock() >= t_end:
                skipped += [f"{d}/{memory}/{human(size)}" for d in DIRECTIONS]
                continue
            bufs = copier.prepare(size, memory)
            try:
                for direction in DIRECTIONS:
                    if clock() >= t_end:
                        skipped.append(f"{direction}/{memory}/{human(size)}")
                        continue
                    n = repeats_for(size)
                    copier.run(bufs, direction, 1)  # warm-up outside the counted window
                    before = settle(counters, clock, sleep)
                    with counters.sampling():
                        seconds = copier.run(bufs, direction, n)
                    after = settle(counters, clock, sleep)
                    delta = None
                    if before is not None and after is not None:
                        k = 0 if direction == "h2d" else 1  # the GPU receives H2D, transmits D2H
                        delta = after[k] - before[k]
                    rows.append(Row(direction, memory, size, n, seconds, delta, counters.path))
            finally:
                copier.release(bufs)
    return rows, skipped


def settle(
    counters: Counters, clock: Callable[[], float], sleep: Callable[[float], None]
) -> tuple[float, float] | None:
    """Read until two reads agree (field counters may lag the copy) or SETTLE_S passes. Integrated
    paths are read once: waiting would only add idle time to their integral."""
    cur = counters.read()
    if counters.path != "field" or cur is None:
        return cur
    deadline = clock() + SETTLE_S
    while clock() < deadline:
        sleep(0.05)
        nxt = counters.read()
        if nxt == cur:
            break
        cur = nxt
    return cur


def human(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def render(rows: Sequence[Row], header: dict[str, str], skipped: Sequence[str]) -> str:
    out = [f"{k}: {v}" for k, v in header.items()]
    out += ["", f"{'copy':<5}{'memory':<10}{'payload':>9}{'x':>6}{'GB/s':>9}{'counter/payload':>17}  counter"]
    for r in rows:
        ratio = "n/a" if r.counter_ratio is None else f"{r.counter_ratio:.3f}"
        out.append(f"{r.direction:<5}{r.memory:<10}{human(r.size):>9}{r.repeats:>6}{r.gbps:>9.2f}{ratio:>17}"
                   f"  {r.counter_path}")
    if skipped:
        out += ["", "skipped (time budget): " + ", ".join(skipped)]
    return "\n".join(out) + "\n"


def as_json(rows: Sequence[Row], header: dict[str, str], skipped: Sequence[str]) -> str:
    return json.dumps({
        **header,
        "rows": [{**asdict(r), "payload": r.payload, "gbps": r.gbps, "counter_ratio": r.counter_ratio}
                 for r in rows],
        "skipped": list(skipped),
    }, indent=2)


def match_torch_device(nvml_bus: str, props: Sequence[dict[str, int]]) -> int | None:
    """CUDA device index whose PCI domain/bus/device equal NVML's bus id (sysfs form), or None.
    CUDA and NVML number GPUs differently (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), the bus id
    does not lie."""
    for i, p in enumerate(props):
        try:
            addr = f"{p['pci_domain_id']:04x}:{p['pci_bus_id']:02x}:{p['pci_device_id']:02x}.0"
        except KeyError:
            return None
        if addr == nvml_bus:
            return i
    return None


# -- the real GPU ----------------------------------------------------------------------------------


class NvmlCounters:
    """One GPU's byte counters through pcietax's own nvml source, with wraps absorbed as the exporter
    does. For the sampled paths a background thread keeps reading during copies, as the exporter's
    collection loop would."""

    def __init__(self, source: NvmlSource, gpu: int, period: float = 0.05) -> None:
        self._src = source
        self._index = gpu  # NVML index; the `gpu` label is the PCI address (catalog.GPU_ID)
        self._gpu = ""
        self._period = period
        self._lock = threading.Lock()
        self._abs = CounterAbsorber()
        self.path = "none"
        self.info: dict[str, str] = {}
        self.read()

    def read(self) -> tuple[float, float] | None:
        with self._lock:
            snap = self._src.read()
            infos = [dict(s.labels) for s in snap.gauges if s.family == INFO]  # in NVML index order
            if self._index < len(infos):
                lv = infos[self._index]
                self.info, self.path, self._gpu = lv, lv["counter_path"], lv["gpu"]
            vals = {}
            for s in snap.counters:
                if s.family in (RX, TX) and dict(s.labels).get("gpu") == self._gpu:
                    vals[s.family] = self._abs.update(s.family, s.value, s.bits)
            return (vals[RX], vals[TX]) if len(vals) == 2 else None

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        if self.path != "throughput_sampled":
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self._period):
                self.read()

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()


class TorchCopier:
    def __init__(self, torch: Any, device: Any) -> None:
        self.torch, self.device = torch, device

    def prepare(self, size: int, memory: str) -> Any:
        t = self.torch
        host = t.empty(size, dtype=t.uint8, pin_memory=memory == "pinned")
        host.fill_(1)  # fault pageable pages in now, not inside the timed copies
        dev = t.empty(size, dtype=t.uint8, device=self.device)
        return host, dev

    def run(self, buffers: Any, direction: str, repeats: int) -> float:
        host, dev = buffers
        sync = self.torch.cuda.synchronize
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            if direction == "h2d":
                dev.copy_(host, non_blocking=True)
            else:
                host.copy_(dev, non_blocking=True)
        sync(self.device)
        return time.perf_counter() - t0

    def release(self, buffers: Any) -> None:
        del buffers
        self.torch.cuda.empty_cache()


# -- a simulated GPU for --dry-run ------------------------------------------------------------------


class SimGpu:
    """Copier and counters in one: copies move payload x ``overhead`` through 'PCIe' at ``gbps``."""

    path = "field"

    def __init__(self, gbps: float = 25.0, overhead: float = 1.02) -> None:
        self.gbps, self.overhead = gbps, overhead
        self.rx = self.tx = 0.0

    def prepare(self, size: int, memory: str) -> Any:
        return (size, memory)

    def run(self, buffers: Any, direction: str, repeats: int) -> float:
        size, memory = buffers
        moved = size * repeats * self.overhead
        if direction == "h2d":
            self.rx += moved
        else:
            self.tx += moved
        return size * repeats / (self.gbps * 1e9 * (0.5 if memory == "pageable" else 1.0))

    def release(self, buffers: Any) -> None:
        pass

    def read(self) -> tuple[float, float] | None:
        return (self.rx, self.tx)

    def sampling(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to check (default 0)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for the copies (default 170)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--dry-run", action="store_true", help="simulated GPU: check the pipeline anywhere")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        print("gpu_check: --budget must be positive", file=sys.stderr)
        return 2
    if args.dry_run:
        sim = SimGpu()
        rows, skipped = measure(sim, sim, budget=args.budget, sleep=lambda _s: None)
        header = {"gpu": "simulated (dry run)", "counter_path": sim.path}
    else:
        try:
            rows, skipped, header = _real(args.gpu, args.budget)
        except RuntimeError as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            return 1
    sys.stdout.write(as_json(rows, header, skipped) + "\n" if args.json else render(rows, header, skipped))
    return 0


def _real(gpu: int, budget: float) -> tuple[list[Row], list[str], dict[str, str]]:
    # NVML numbers GPUs in PCI bus order; make CUDA do the same so the index fallback below is right
    # (unless CUDA_VISIBLE_DEVICES renumbers them, which the note then says).
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(f"PyTorch is not installed ({e})") from None
    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch sees no CUDA device")
    src = NvmlSource(nv.PynvmlBinding())
    try:
        src.start()
    except Exception as e:
        raise RuntimeError(f"NVML: {e}") from None
    try:
        counters = NvmlCounters(src, gpu)
        if not counters.info:
            raise RuntimeError(f"NVML has no GPU {gpu}")
        bus = counters.info["pci_bus_id"]
        props = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            props.append({k: getattr(p, k) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id")
                          if hasattr(p, k)})
        cuda_index = match_torch_device(bus, props)
        note = ""
        if cuda_index is None:
            cuda_index = gpu
            note = "CUDA device matched by index in PCI bus order (this PyTorch reports no PCI ids)"
            if os.environ.get("CUDA_VISIBLE_DEVICES"):
                note += "; CUDA_VISIBLE_DEVICES is set, so the match may be wrong"
        device = torch.device("cuda", cuda_index)
        rows, skipped = measure(TorchCopier(torch, device), counters, budget=budget)
        header = {
            "gpu": f"{counters.info.get('name', '?')} (NVML {gpu}, CUDA {cuda_index}, {bus})",
            "driver": src.driver_version,
            "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
            "counter_path": counters.path,
            "host": os.uname().nodename,
        }
        if note:
            header["note"] = note
        return rows, skipped, header
    finally:
        src.close()


if __name__ == "__main__":
    sys.exit(main())
