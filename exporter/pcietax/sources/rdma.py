"""RDMA port data counters (InfiniBand and RoCE), as node_exporter's infiniband collector reads
them: ``port_rcv_data`` / ``port_xmit_data`` count 4-byte words. Their bytes are useful payload of
the verbs path (DESIGN.md section 1)."""

from __future__ import annotations

import os
from pathlib import Path

from ..fsread import read_int
from .base import Snapshot, SourceUnavailable
from .netdev import _ports

RX = "pcietax_rdma_port_receive_bytes_total"
TX = "pcietax_rdma_port_transmit_bytes_total"

# The 32-bit legacy port counters saturate instead of wrapping; the kernel serves the 64-bit
# extended ones through the same files where the device has them, which is every device since
# ConnectX-3. A drop is therefore a reset (driver reload), never a wrap.


class RdmaSource:
    name = "rdma"

    def __init__(self, sysfs: str = "/sys") -> None:
        self._base = Path(sysfs) / "class/infiniband"

    def start(self) -> None:
        if not self._base.is_dir():
            raise SourceUnavailable(f"no RDMA devices ({self._base} missing)")

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
                    path = counters / fname
                    try:
                        snap.counter(fam, read_int(path) * 4, device=dev, port=port)
                    except FileNotFoundError:
                        continue  # some ports (e.g. SR-IOV VFs) have no data counters
                    except (OSError, ValueError, UnicodeDecodeError) as e:
                        snap.fault("unreadable RDMA counter", e if str(path) in str(e) else f"{path}: {e}")
        return snap
