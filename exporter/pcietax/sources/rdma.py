"""RDMA port data counters (InfiniBand and RoCE), as node_exporter's infiniband collector reads
them: ``port_rcv_data`` / ``port_xmit_data`` count 4-byte words. Their bytes are useful payload of
the verbs path (DESIGN.md section 1).

Which ports each device has changes only when a device comes or goes, so the port directories are
listed again when the device listing differs or every ``layout_refresh`` seconds, not every read;
a counter that reads as it did last time gives last time's sample (the engine absorbs it for free).
The netdev source reads the same port counters for RDMA NICs in the same cycle: what it read
moments ago is used rather than read again (netdev.shared_port_bytes)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from .. import catalog
from .base import Labels, Sample, Snapshot, SourceAbsent, SourceUnavailable, labels_of
from .netdev import LAYOUT_REFRESH, _ports, shared_port_bytes

RX = catalog.RDMA_PORT_RECEIVE_BYTES
TX = catalog.RDMA_PORT_TRANSMIT_BYTES

# The 32-bit legacy port counters saturate instead of wrapping; the kernel serves the 64-bit
# extended ones through the same files where the device has them, which is every device since
# ConnectX-3. A drop is therefore a reset (driver reload), never a wrap.


class RdmaSource:
    name = "rdma"
    shares_lane = True  # kernel files only: read in the engine's shared lane

    def __init__(self, sysfs: str = "/sys", layout_refresh: float = LAYOUT_REFRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # Spelled as the netdev source spells it, so the paths of shared reads match.
        self._base = os.fspath(Path(sysfs) / "class/infiniband")
        self._refresh = layout_refresh
        self._clock = clock
        # (device listing, when built, [(counters directory, labels)]); None: build at the next read
        self._layout: tuple[list[str], float, list[tuple[str, Labels]]] | None = None
        self._last: dict[tuple[str, str], Sample] = {}  # (counters directory, family) -> sample

    def start(self) -> None:
        # No RDMA class at all, or an empty one (ib_core loaded, no HCA): no such hardware here.
        try:
            devices = os.listdir(self._base)
        except FileNotFoundError:
            raise SourceAbsent(f"no RDMA devices ({self._base} missing)") from None
        except OSError as e:
            raise SourceUnavailable(f"cannot list {self._base}: {e}") from e
        if not devices:
            raise SourceAbsent(f"no RDMA devices ({self._base} is empty)")

    def close(self) -> None:
        self._layout = None
        self._last.clear()

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({RX, TX}))
        try:
            devices = sorted(os.listdir(self._base))
        except OSError as e:
            raise SourceUnavailable(f"cannot list {self._base}: {e}") from e
        last, seen = self._last, {}
        for counters, lbl in self._ports(snap, devices):
            for fam, fname in ((RX, "port_rcv_data"), (TX, "port_xmit_data")):
                path = f"{counters}/{fname}"
                try:
                    value = shared_port_bytes(path, self._clock)
                except FileNotFoundError:
                    continue  # some ports (e.g. SR-IOV VFs) have no data counters
                except (OSError, ValueError, UnicodeDecodeError) as e:
                    snap.fault("unreadable RDMA counter", e if str(path) in str(e) else f"{path}: {e}")
                    continue
                if value is None:
                    continue  # "N/A (no PMA)", quietly absent as node_exporter has it
                sample = last.get((counters, fam))
                if sample is None or sample.value != value:
                    sample = Sample(fam, lbl, float(value))
                seen[(counters, fam)] = sample
                snap.counters.append(sample)
        self._last = seen
        return snap

    def _ports(self, snap: Snapshot, devices: list[str]) -> list[tuple[str, Labels]]:
        now = self._clock()
        cached = self._layout
        if cached is not None and cached[0] == devices and now - cached[1] < self._refresh:
            return cached[2]
        faults = len(snap.faults)
        out = [(counters, labels_of(device=dev, port=port))
               for dev in devices for port, counters in _ports(os.path.join(self._base, dev), snap)]
        # A listing with a fault (a device without a ports directory) is not kept: the next read
        # lists again and reports it again.
        self._layout = (devices, now, out) if len(snap.faults) == faults else None
        return out
