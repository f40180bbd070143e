"""A network namespace joined to this one by a veth pair, for tests that need a NIC whose counters
carry only their own traffic (loopback counts every process on the machine)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class VethNs:
    ns: str
    host_if: str
    peer_if: str
    host_ip: str
    peer_ip: str

    @classmethod
    def create(cls, tag: str | None = None, mtu: int = 65000) -> VethNs:
        # Names from our pid: unique among concurrent test runs, <= 15 chars for interfaces.
        tag = tag or f"{os.getpid() % 100000}"
        octet = os.getpid() % 250 + 1
        v = cls(ns=f"ptxns{tag}", host_if=f"ptxh{tag}", peer_if=f"ptxp{tag}",
                host_ip=f"10.213.{octet}.1", peer_ip=f"10.213.{octet}.2")
        v.destroy()
        _ip("netns", "add", v.ns)
        try:
            _ip("link", "add", v.host_if, "type", "veth", "peer", "name", v.peer_if)
            _ip("link", "set", v.peer_if, "netns", v.ns)
            _ip("addr", "add", f"{v.host_ip}/30", "dev", v.host_if)
            _ip("link", "set", v.host_if, "mtu", str(mtu), "up")
            _ip("-n", v.ns, "addr", "add", f"{v.peer_ip}/30", "dev", v.peer_if)
            _ip("-n", v.ns, "link", "set", v.peer_if, "mtu", str(mtu), "up")
            _ip("-n", v.ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError:
            v.destroy()
            raise
        return v

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def destroy(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
