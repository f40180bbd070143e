"""RDMA port data counters (InfiniBand and RoCE), as node_exporter's infiniband collector reads
them: ``port_rcv_data`` / ``port_xmit_data`` count 4-byte words. Their bytes are useful payload of
the verbs path (DESIGN.md section 1)."""

from __future__ import annotations

import os
from pathlib import Path

from .. import catalog
from .base import Snapshot, SourceAbsent, SourceUnavailable
from .netdev import _ports, port_bytes

RX = catalog.RDMA_PORT_RECEIVE_BYTES
TX = catalog.RDMA_PORT_TRANSMIT_BYTES

# The 32-bit legacy port counters saturate instead of wrapping; the kernel serves the 64-bit
# extended ones through the same files where the device has them, which is every device since
# ConnectX-3. A drop is therefore a reset (driver reload), never a wrap.


class RdmaSource:
    name = "rdma"
    shares_lane = True  # kernel files only: read in the engine's shared lane

    def __init__(self, sysfs: str = "/sys") -> None:
        self._base = Path(sysfs) / "class/infiniband"

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
        pass

    def read(self) -> Snapshot:
        snap = Snapshot(provides=frozenset({RX, TX}))
        try:
            devices = sorted(os.listdir(self._base))
        except OSError as e:
            raise SourceUnavailable(f"cannot list {self._base}: {e}") from e
        for dev in devices:
            for port, counters in _ports(self._base / dev, snap):
                for fam, fname in ((RX, "port_rcv_data"), (TX, "port_xmit_data")):
                    path = f"{counters}/{fname}"
                    try:
                        value = port_bytes(path)
                    except FileNotFoundError:
                        continue  # some ports (e.g. SR-IOV VFs) have no data counters
                    except (OSError, ValueError, UnicodeDecodeError) as e:
                        snap.fault("unreadable RDMA counter", e if str(path) in str(e) else f"{path}: {e}")
                        continue
                    if value is not None:  # None: "N/A (no PMA)", quietly absent as node_exporter has it
                        snap.counter(fam, value, device=dev, port=port)
        return snap
