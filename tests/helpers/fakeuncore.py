"""Writes the sysfs/procfs a 2-socket Intel Sapphire Rapids host shows for its uncore PMUs, in the
exact kernel layout, and a fake perf opener that behaves like perf_event_open on those PMUs.

Layout reproduced (arch/x86/events/intel/uncore*.c, kernel 6.15+ unless ``before_6_15``):
  sys/devices/uncore_upi_{0..3}/{type,cpumask,format/*}     one PMU per link index; cpumask
                                                             "0,56" = one CPU on each socket
  sys/devices/uncore_iio_free_running_{0..5}/{type,cpumask,format/*,events/*}
  sys/devices/uncore_iio_{0..5}/die{0,1}                     stack -> root bus ("0000:16")
  sys/bus/event_source/devices/<pmu> -> ../../../devices/<pmu>
  sys/devices/system/cpu/cpuN/topology/physical_package_id
  proc/cpuinfo, proc/sys/kernel/perf_event_paranoid
Nothing here imports pcietax: the fixtures describe the kernel, not our code's idea of it.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# spr_uncore_raw_formats_attr: event, umask_ext4, edge, inv, thresh8
SPR_UPI_FORMAT = {"event": "config:0-7", "umask": "config:8-15,32-55", "edge": "config:18",
                  "inv": "config:23", "thresh": "config:24-31"}
# skx_uncore_iio_freerunning_formats_attr
IIO_FREE_FORMAT = {"event": "config:0-7", "umask": "config:8-15"}
# SPR free-running scales: 4 bytes (inherited from ICX) until the 6.15 fix made it 32 bytes and
# dropped bw_out, whose increment is not fixed (commit 506f981ab40f).
SCALE_OLD = "3.814697266e-6"
SCALE_NEW = "3.0517578125e-5"
STACK_BUSES = {0: ("0000:00", "0000:80"), 1: ("0000:16", "0000:97"), 2: ("0000:30", "0000:b0"),
               3: ("0000:4a", "0000:c9"), 4: ("0000:64", "0000:e2"), 5: ("0000:e7", "0000:f8")}


@dataclass
class FakeUncore:
    root: Path
    sockets: int = 2
    cpus_per_socket: int = 56
    _next_type: int = 24
    types: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sys = self.root / "sys"
        self.proc = self.root / "proc"
        (self.sys / "bus/event_source/devices").mkdir(parents=True, exist_ok=True)
        (self.proc / "sys/kernel").mkdir(parents=True, exist_ok=True)
        for cpu in range(self.sockets * self.cpus_per_socket):
            topo = self.sys / f"devices/system/cpu/cpu{cpu}/topology"
            topo.mkdir(parents=True, exist_ok=True)
            (topo / "physical_package_id").write_text(f"{cpu // self.cpus_per_socket}\n")
        self.set_cpuinfo("GenuineIntel", family=6, model=143, name="Intel(R) Xeon(R) Platinum 8480+")
        self.set_paranoid(2)

    @property
    def cpumask(self) -> str:
        return ",".join(str(s * self.cpus_per_socket) for s in range(self.sockets))

    def set_cpuinfo(self, vendor: str | None, family: int = 6, model: int = 143, name: str = "") -> None:
        lines = []
        for cpu in range(2):  # two entries are enough to show the per-CPU block format
            lines += [f"processor\t: {cpu}"]
            if vendor is not None:
                lines += [f"vendor_id\t: {vendor}"]
            lines += [f"cpu family\t: {family}", f"model\t\t: {model}", f"model name\t: {name}", ""]
        (self.proc / "cpuinfo").write_text("\n".join(lines) + "\n")

    def set_paranoid(self, level: int) -> None:
        (self.proc / "sys/kernel/perf_event_paranoid").write_text(f"{level}\n")

    def add_pmu(self, name: str, formats: dict[str, str], events: dict[str, str] | None = None,
                cpumask: str | None = None, attrs: dict[str, str] | None = None) -> Path:
        d = self.sys / "devices" / name
        (d / "format").mkdir(parents=True, exist_ok=True)
        self.types[name] = self._next_type
        self._next_type += 1
        (d / "type").write_text(f"{self.types[name]}\n")
        (d / "cpumask").write_text(f"{self.cpumask if cpumask is None else cpumask}\n")
        (d / "perf_event_mux_interval_ms").write_text("1\n")
        for term, spec in formats.items():
            (d / "format" / term).write_text(spec + "\n")
        if events:
            (d / "events").mkdir(exist_ok=True)
            for ev, text in events.items():
                (d / "events" / ev).write_text(text + "\n")
        for k, v in (attrs or {}).items():
            (d / k).write_text(v + "\n")
        link = self.sys / "bus/event_source/devices" / name
        if not link.is_symlink():
            os.symlink(f"../../../devices/{name}", link)
        return d

    def remove_pmu(self, name: str) -> None:
        (self.sys / "bus/event_source/devices" / name).unlink()
        shutil.rmtree(self.sys / "devices" / name)

    def spr(self, before_6_15: bool = False, links: int = 4, stacks: int = 6) -> None:
        """``before_6_15``: the IIO free-running events as kernels before the scale fix list them."""
        for link in range(links):
            self.add_pmu(f"uncore_upi_{link}", SPR_UPI_FORMAT)
        old = before_6_15
        for stack in range(stacks):
            ev = {"ioclk": "event=0xff,umask=0x10"}
            for port in range(8):
                ev[f"bw_in_port{port}"] = f"event=0xff,umask={0x20 + port:#x}"
                ev[f"bw_in_port{port}.scale"] = SCALE_OLD if old else SCALE_NEW
                ev[f"bw_in_port{port}.unit"] = "MiB"
                if old:
                    ev[f"bw_out_port{port}"] = f"event=0xff,umask={0x30 + port:#x}"
                    ev[f"bw_out_port{port}.scale"] = SCALE_OLD
                    ev[f"bw_out_port{port}.unit"] = "MiB"
            self.add_pmu(f"uncore_iio_free_running_{stack}", IIO_FREE_FORMAT, ev)
            buses = STACK_BUSES[stack]
            self.add_pmu(f"uncore_iio_{stack}", {"event": "config:0-7", "umask": "config:8-15,32-43,45-55"},
                         attrs={f"die{d}": buses[d] for d in range(self.sockets)})


class FakeCounter:
    """One open event. ``bits`` < 64 reproduces a counter reported at its hardware width (the SPR
    UPI PMON counters are 48 bits) instead of perf's 64-bit accumulation."""

    def __init__(self, bits: int = 64) -> None:
        self.bits = bits
        self.value = 0
        self.enabled = 0
        self.running = 0
        self.closed = False
        self.gone = False  # reproduces a PMU whose device went away: read() fails with ENODEV

    def tick(self, counts: int, ns: int = 1_000_000_000, running_share: float = 1.0) -> None:
        """The event counted ``counts`` while it was scheduled, over ``ns`` of enabled time of
        which ``running_share`` it actually held a counter (multiplexing when < 1)."""
        self.value += counts
        self.enabled += ns
        self.running += int(ns * running_share)

    def read(self):
        from pcietax.perf import Reading

        if self.closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if self.gone:
            raise OSError(errno.ENODEV, "No such device")
        return Reading(self.value % (1 << self.bits), self.enabled, self.running)

    def close(self) -> None:
        self.closed = True


class FakePerf:
    """An ``Opener`` with perf_event_open's checks for uncore PMUs: the type must belong to a PMU
    in the sysfs tree (else ENOENT), the CPU must be in its cpumask (else EINVAL, as the uncore
    driver answers), every config term must be one the PMU's format allows (else EINVAL).
    ``deny`` reproduces EACCES from perf_event_paranoid for every open."""

    def __init__(self, node: FakeUncore, bits: int = 64) -> None:
        self.node = node
        self.bits = bits
        self.deny: int | None = None
        self.fail_pmus: set[str] = set()
        self.opened: dict[tuple[str, int, int], FakeCounter] = {}

    def __call__(self, attr, cpu: int, pid: int = -1):
        from pcietax.perf import PerfOpenError

        if self.deny is not None:
            raise PerfOpenError(self.deny, attr, cpu, paranoid=2)
        by_type = {t: n for n, t in self.node.types.items()
                   if (self.node.sys / "bus/event_source/devices" / n).exists()}
        name = by_type.get(attr.type)
        if name is None:
            raise PerfOpenError(errno.ENOENT, attr, cpu)
        if name in self.fail_pmus:
            raise PerfOpenError(errno.ENODEV, attr, cpu)
        d = self.node.sys / "devices" / name
        mask = (d / "cpumask").read_text().strip()
        if str(cpu) not in mask.split(",") or pid != -1:
            raise PerfOpenError(errno.EINVAL, attr, cpu)
        if attr.config & ~_format_mask(d, "config") or attr.config1 & ~_format_mask(d, "config1"):
            raise PerfOpenError(errno.EINVAL, attr, cpu)
        c = FakeCounter(self.bits)
        self.opened[(name, attr.config, cpu)] = c
        return c

    def counter(self, pmu: str, config: int, cpu: int) -> FakeCounter:
        return self.opened[(pmu, config, cpu)]

    def live(self) -> list[FakeCounter]:
        return [c for c in self.opened.values() if not c.closed]


def _format_mask(pmu_dir: Path, word: str) -> int:
    """Every bit the PMU's format/ files give to ``word`` (the uncore driver's event_mask)."""
    mask = 0
    for f in (pmu_dir / "format").iterdir():
        w, _, ranges = f.read_text().strip().partition(":")
        if w != word:
            continue
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for b in range(int(lo), int(hi or lo) + 1):
                mask |= 1 << b
    return mask
