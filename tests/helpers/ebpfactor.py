"""A small traced process for the eBPF tracer's tests: moves an exact number of bytes the way the
test asks, as soon as it starts (or after a line on stdin with --wait), then prints its own ground
truth as JSON and exits.

  --mode tcp        TCP receive from a `pcietax workload --serve-peer` into a pageable buffer,
                    one cudaMemcpyAsync H2D per 64 KiB chunk (the staged path)
  --mode unix       the same bytes over an AF_UNIX socketpair inside the process (IPC), no CUDA
  --mode fork-tcp   fork; the child does `tcp` and exits; the parent waits for it
  --name BYTES      rename the process to these raw bytes (hex) first: prctl(PR_SET_NAME)
  --map-file PATH   mmap this file (its path may be any bytes, hex) before moving data
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import socket
import sys
import threading

CHUNK = 64 << 10


def set_name(raw: bytes) -> None:
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(raw[:15]), 0, 0, 0)


def tcp(peer: str, nbytes: int, cudart: str) -> dict:
    sys.path.insert(0, os.environ.get("PTX_EXPORTER", ""))
    from pcietax.workload.cudart import H2D, Cudart
    from pcietax.workload.peer import HEADER, recv_exact

    cuda = Cudart(cudart)
    dev = cuda.malloc(CHUNK)
    buf = bytearray(CHUNK)
    addr = ctypes.addressof((ctypes.c_char * CHUNK).from_buffer(buf))
    host, _, port = peer.rpartition(":")
    calls = 0
    with socket.create_connection((host, int(port))) as s:
        s.sendall(HEADER.pack(b"S", nbytes))
        left = nbytes
        while left:
            n = min(left, CHUNK)
            recv_exact(s, memoryview(buf)[:n])
            cuda.memcpy_async(dev, addr, n, H2D)
            calls += 1
            left -= n
    return {"socket": {"ingress": nbytes, "egress": HEADER.size},
            "cuda": {"bytes": nbytes, "calls": calls}}


def unix(nbytes: int) -> dict:
    a, b = socket.socketpair()
    data = b"x" * CHUNK

    def send() -> None:
        left = nbytes
        while left:
            left -= a.send(data[:min(left, CHUNK)])

    t = threading.Thread(target=send)
    t.start()
    got = 0
    while got < nbytes:
        got += len(b.recv(CHUNK))
    t.join()
    return {"socket": {"ingress": 0, "egress": 0}, "cuda": {"bytes": 0, "calls": 0}, "unix_bytes": got}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("tcp", "unix", "fork-tcp"), required=True)
    ap.add_argument("--peer", default="")
    ap.add_argument("--bytes", type=int, default=4 << 20)
    ap.add_argument("--cudart", default="")
    ap.add_argument("--name", default=None, help="hex bytes")
    ap.add_argument("--map-file", default=None, help="hex bytes of a path")
    ap.add_argument("--wait", action="store_true")
    a = ap.parse_args()
    if a.name:
        set_name(bytes.fromhex(a.name))
    keep = None
    if a.map_file:
        fd = os.open(bytes.fromhex(a.map_file), os.O_RDONLY)
        keep = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)
    if a.wait:
        print("ready", os.getpid(), flush=True)
        sys.stdin.readline()
    if a.mode == "tcp":
        out = tcp(a.peer, a.bytes, a.cudart)
    elif a.mode == "unix":
        out = unix(a.bytes)
    else:
        pid = os.fork()
        if pid == 0:
            try:
                child = tcp(a.peer, a.bytes, a.cudart)
                print(json.dumps({"child": os.getpid(), **child}), flush=True)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    print(json.dumps({"pid": os.getpid(), **out}), flush=True)
    del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
