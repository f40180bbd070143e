"""The workload's network peer: a separate process (comm ``ptx-peer``) so that its socket copies
are never the workload's. One connection per transfer; the workload sends a 9-byte request
(``S`` = send me N bytes, ``R`` = take N bytes from me, then a big-endian u64 N)."""

from __future__ import annotations

import socket
import struct
import sys
import threading

HEADER = struct.Struct(">cQ")
CHUNK = 1 << 20


def set_comm(name: str) -> None:
    """prctl(PR_SET_NAME): the comm the exporter's --target.comm and process label see."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def recv_exact(conn: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = conn.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed early")
        got += n


def _handle(conn: socket.socket) -> None:
    with conn:
        head = bytearray(HEADER.size)
        try:
            recv_exact(conn, memoryview(head))
        except ConnectionError:
            return
        op, n = HEADER.unpack(head)
        buf = memoryview(bytearray(CHUNK))
        if op == b"S":
            while n > 0:
                k = min(n, CHUNK)
                conn.sendall(buf[:k])
                n -= k
        elif op == b"R":
            while n > 0:
                k = conn.recv_into(buf[: min(n, CHUNK)])
                if k == 0:
                    return
                n -= k


def serve(listen: str) -> int:
    from ..server import parse_listen_address

    set_comm("ptx-peer")
    host, port = parse_listen_address(listen)
    srv = socket.create_server((host or "0.0.0.0", port), reuse_port=False)
    print(f"listening {srv.getsockname()[0]}:{srv.getsockname()[1]}", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
