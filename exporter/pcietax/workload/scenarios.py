"""The canonical data paths of DESIGN.md section 1 that a CPU machine can run, each with its
exact ground truth: what every hop moves for the payload it carries.

Per request (one chunk):
- ``pageable``: TCP recv into a pageable buffer -> cudaMemcpyAsync H2D (the driver bounces it):
  nic_dma, kernel_copy, user_copy, host_to_gpu -> ratio 4
- ``memcpy``: TCP recv into an app buffer -> memcpy into a pinned buffer -> cudaMemcpyAsync H2D:
  nic_dma, kernel_copy, user_copy (the memcpy; measured with --memcpy.probe), host_to_gpu -> 4
- ``pinned``: TCP recv straight into a pinned buffer -> cudaMemcpyAsync H2D:
  nic_dma, kernel_copy, host_to_gpu -> 3
- ``egress``: the mirror of ``pageable``: cudaMemcpyAsync D2H into a pageable buffer -> TCP send:
  host_to_gpu, user_copy, kernel_copy, nic_dma -> 4
"""

from __future__ import annotations

import ctypes
import mmap
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cudart import D2H, H2D, Cudart
from .peer import HEADER, recv_exact

SCENARIOS = ("pageable", "memcpy", "pinned", "egress")
EXPECTED_RATIO = {"pageable": 4.0, "memcpy": 4.0, "pinned": 3.0, "egress": 4.0}
DIRECTION = {"pageable": "ingress", "memcpy": "ingress", "pinned": "ingress", "egress": "egress"}


@dataclass
class GroundTruth:
    """Exact counts of what the workload did; payload excludes the 9-byte request headers, socket
    bytes include them (they are socket payload too)."""

    payload: dict[str, int] = field(default_factory=lambda: {"ingress": 0, "egress": 0})
    socket: dict[str, int] = field(default_factory=lambda: {"ingress": 0, "egress": 0})
    cuda: dict[str, dict[str, dict[str, int]]] = field(default_factory=lambda: {
        k: {m: {"bytes": 0, "calls": 0} for m in ("pinned", "pageable")} for k in ("h2d", "d2h")})
    memcpy: dict[str, int] = field(default_factory=lambda: {"ingress": 0, "egress": 0})
    requests: int = 0
    seconds: float = 0.0
    by_scenario: dict[str, int] = field(default_factory=dict)

    def copy(self, kind: str, memory: str, n: int) -> None:
        c = self.cuda[kind][memory]
        c["bytes"] += n
        c["calls"] += 1

    def hops(self) -> dict[str, dict[str, int]]:
        """Bytes per hop and direction that the exporter should measure (nic_dma is the payload the
        NIC carried; its counters add protocol headers on top)."""
        out = {}
        for x, kind in (("ingress", "h2d"), ("egress", "d2h")):
            c = self.cuda[kind]
            out[x] = {
                "nic_dma": self.socket[x],
                "kernel_copy": self.socket[x],
                "user_copy": c["pageable"]["bytes"] + self.memcpy[x],
                "host_to_gpu": c["pinned"]["bytes"] + c["pageable"]["bytes"],
            }
        return out

    def as_dict(self) -> dict[str, Any]:
        hops = self.hops()
        ratio = {x: round(sum(h.values()) / self.socket[x], 4) for x, h in hops.items() if self.socket[x]}
        return {
            "payload_bytes": self.payload, "socket_copy_bytes": self.socket, "cuda_copies": self.cuda,
            "memcpy_bytes": self.memcpy, "hops": hops, "expected_ratio": ratio,
            "requests": self.requests, "seconds": round(self.seconds, 6),
            "throughput_bytes_per_second": round(sum(self.payload.values()) / self.seconds, 1)
            if self.seconds else 0.0,
            "scenarios": self.by_scenario,
        }


_libc = ctypes.CDLL(None)
_libc.memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcpy.restype = ctypes.c_void_p


class Runner:
    def __init__(self, cuda: Cudart, peer: tuple[str, int], chunk: int,
                 on_request: Callable[[float], None] | None = None, request_delay: float = 0.0,
                 rate: float = 0.0, pin: str = "alloc") -> None:
        self.cuda = cuda
        self.peer = peer
        self.chunk = chunk
        self.truth = GroundTruth()
        self._on_request = on_request or (lambda _s: None)
        self._delay = request_delay
        self._rate = rate
        self._pinned = 0
        self._device = 0
        if pin not in ("alloc", "register"):
            raise ValueError(f"pin must be alloc or register, got {pin!r}")
        self._pin = pin
        self._registered: mmap.mmap | None = None
        self._app = bytearray(chunk)
        self._app_addr = ctypes.addressof((ctypes.c_char * chunk).from_buffer(self._app))

    def setup(self) -> None:
        """Pinned and device buffers (allocated after the exporter attached, so their pinned ranges
        are known: see docs/ebpf.md on processes started before the exporter)."""
        if self._pin == "register":
            # Page-aligned memory of our own, pinned in place: the cudaHostRegister path.
            self._registered = mmap.mmap(-1, self.chunk)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(self._registered))
            self.cuda.host_register(addr, self.chunk)
            self._pinned = addr
        else:
            self._pinned = self.cuda.host_alloc(self.chunk)
        self._device = self.cuda.malloc(self.chunk)

    def close(self) -> None:
        if self._pinned and self._registered is not None:
            self.cuda.host_unregister(self._pinned)
            self._pinned = 0
            # ctypes views into the mapping may still exist; the mapping goes with the process.
        elif self._pinned:
            self.cuda.free_host(self._pinned)
            self._pinned = 0
        if self._device:
            self.cuda.free(self._device)
            self._device = 0

    def _connect(self, op: bytes, n: int) -> socket.socket:
        s = socket.create_connection(self.peer)
        s.sendall(HEADER.pack(op, n))
        self.truth.socket["egress"] += HEADER.size
        return s

    def run(self, scenario: str, nbytes: int) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
        t0 = time.perf_counter()
        egress = scenario == "egress"
        pinned_view = memoryview((ctypes.c_char * self.chunk).from_address(self._pinned)).cast("B")
        app_view = memoryview(self._app)
        with self._connect(b"R" if egress else b"S", nbytes) as s:
            left = nbytes
            while left > 0:
                n = min(left, self.chunk)
                r0 = time.perf_counter()
                if scenario == "pageable":
                    recv_exact(s, app_view[:n])
                    self.cuda.memcpy_async(self._device, self._app_addr, n, H2D)
                    self.truth.copy("h2d", "pageable", n)
                elif scenario == "memcpy":
                    recv_exact(s, app_view[:n])
                    _libc.memcpy(self._pinned, self._app_addr, n)
                    self.truth.memcpy["ingress"] += n
                    self.cuda.memcpy_async(self._device, self._pinned, n, H2D)
                    self.truth.copy("h2d", "pinned", n)
                elif scenario == "pinned":
                    recv_exact(s, pinned_view[:n])
                    self.cuda.memcpy_async(self._device, self._pinned, n, H2D)
                    self.truth.copy("h2d", "pinned", n)
                else:
                    self.cuda.memcpy_async(self._app_addr, self._device, n, D2H)
                    self.truth.copy("d2h", "pageable", n)
                    self.cuda.sync()
                    s.sendall(app_view[:n])
                self.cuda.sync()
                if self._delay:
                    time.sleep(self._delay)
                x = "egress" if egress else "ingress"
                self.truth.payload[x] += n
                self.truth.socket[x] += n
                self.truth.requests += 1
                self._on_request(time.perf_counter() - r0)
                left -= n
                if self._rate > 0:
                    # pace to the requested rate (bytes per second) per request
                    spare = n / self._rate - (time.perf_counter() - r0)
                    if spare > 0:
                        time.sleep(spare)
            if egress:
                s.shutdown(socket.SHUT_WR)
                s.recv(1)  # wait for the peer to take everything (it closes; no bytes come back)
        self.truth.seconds += time.perf_counter() - t0
        self.truth.by_scenario[scenario] = self.truth.by_scenario.get(scenario, 0) + nbytes
