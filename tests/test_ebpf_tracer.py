"""Tracer v2 on the real kernel (issue 10): counted from the first byte, network payload only.

Every traced process here is tests/helpers/ebpfactor.py, which moves an exact number of bytes as
soon as it starts and exits, before the source's next read; the source is read only afterwards,
so anything counted was counted in the kernel without a /proc scan. The TCP peer lives behind a
veth pair in a network namespace (a real, non-loopback path), except in the loopback tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, needs_root, pcietax_cmd, pcietax_env
from helpers.netns import VethNs
from pcietax.sources.ebpf import EbpfSource
from pcietax.workload.cudart import build_stub

pytestmark = [needs_root, pytest.mark.root]

ACTOR = str(Path(__file__).parent / "helpers" / "ebpfactor.py")
NBYTES = 3 << 20


def _wait_line(p: subprocess.Popen, prefix: str) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith(prefix), (line, p.args)
    return line.strip()


def _peer(argv_prefix: list[str], ip: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([*argv_prefix, *pcietax_cmd(), "workload", "--serve-peer", f"{ip}:0"],
                         stdout=subprocess.PIPE, text=True, env=pcietax_env())
    return p, _wait_line(p, "listening ").split(" ", 1)[1]


def _stop(p: subprocess.Popen) -> None:
    p.terminate()
    p.wait(timeout=10)


@pytest.fixture(scope="module")
def stub() -> str:
    return str(build_stub())


@pytest.fixture(scope="module")
def veth():
    v = VethNs.create()
    yield v
    v.destroy()


@pytest.fixture(scope="module")
def veth_peer(veth):
    p, addr = _peer(veth.exec_prefix(), veth.peer_ip)
    yield addr
    _stop(p)


@pytest.fixture(scope="module")
def lo_peer():
    p, addr = _peer([], "127.0.0.1")
    yield addr
    _stop(p)


def actor(mode: str, name: bytes, peer: str = "", stub: str = "", wait: bool = False,
          extra: tuple[str, ...] = ()) -> subprocess.Popen:
    argv = [sys.executable, ACTOR, "--mode", mode, "--name", name.hex(), "--bytes", str(NBYTES),
            "--peer", peer, "--cudart", stub, *extra] + (["--wait"] if wait else [])
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=pcietax_env(PTX_EXPORTER=str(REPO / "exporter")))


def finish(p: subprocess.Popen) -> list[dict]:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    return [json.loads(x) for x in out.splitlines() if x.startswith("{")]


@dataclass
class Series:
    socket: dict[tuple[str, str], float]
    cuda_bytes: dict[str, float]
    cuda_calls: dict[str, float]
    labels: dict[str, dict[str, str]]


def series(src: EbpfSource) -> Series:
    src.read()  # a new series shows 0 once (the engine's baseline), then its value
    snap = src.read()
    out = Series({}, {}, {}, {})
    for s in snap.counters:
        lab = dict(s.labels)
        if s.family == "pcietax_socket_copy_bytes_total":
            out.socket[(lab["process"], lab["direction"])] = s.value
            out.labels[lab["process"]] = lab
        elif s.family == "pcietax_cuda_copy_bytes_total" and lab["kind"] == "h2d":
            out.cuda_bytes[lab["process"]] = out.cuda_bytes.get(lab["process"], 0.0) + s.value
        elif s.family == "pcietax_cuda_copy_calls_total" and lab["kind"] == "h2d":
            out.cuda_calls[lab["process"]] = out.cuda_calls.get(lab["process"], 0.0) + s.value
    return out


class FakePods:
    """The shape of sources/pods.PodResolver (issue 12): raw /proc/PID/cgroup bytes in, a pod out.
    This fake knows one 'pod': the cgroup the test makes; the real resolver maps kubelet paths."""

    @dataclass(frozen=True)
    class Ref:
        namespace: str
        pod: str
        container: str

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.asked: list[bytes] = []

    def lookup(self, proc_cgroup: bytes):
        self.asked.append(proc_cgroup)
        return self.Ref("infer", "vllm-0", "engine") if self.marker in proc_cgroup else None


@pytest.fixture(scope="module")
def cgroup_dir():
    from pcietax.sources.ebpf_targets import cgroup2_mount

    root = Path(cgroup2_mount(Path("/proc")))
    if not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy mounted")
    cg = root / f"ptx-pod-{os.getpid()}"
    cg.mkdir()
    yield cg
    for _ in range(50):
        try:
            cg.rmdir()
            break
        except OSError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def by_comm(stub, cgroup_dir):
    """Targets by --target.comm, read-time; CUDA copy probes always on; the stand-in given with
    --cuda.lib, so it is probed before any process maps it."""
    pods = FakePods(cgroup_dir.name.encode())
    src = EbpfSource(target_comm="^ptx-t-", cuda_probes="always", cuda_libs_given=[stub], calibrate=False,
                     pod_resolver=pods)
    src.start()
    src.read()
    yield src, pods
    src.close()


def test_target_that_starts_copying_at_once_is_counted_exactly(by_comm, veth_peer, stub):
    src, _ = by_comm
    target = actor("tcp", b"ptx-t-once", veth_peer, stub)
    outsider = actor("tcp", b"ptx-x-outsider", veth_peer, stub)
    truth = finish(target)[0]
    finish(outsider)
    s = series(src)
    assert s.socket[("ptx-t-once", "ingress")] == truth["socket"]["ingress"]
    assert s.socket[("ptx-t-once", "egress")] == truth["socket"]["egress"]
    assert s.cuda_bytes["ptx-t-once"] == truth["cuda"]["bytes"]
    assert s.cuda_calls["ptx-t-once"] == truth["cuda"]["calls"]
    assert not any(p.startswith("ptx-x") for p, _ in s.socket)
    assert "ptx-x-outsider" not in s.cuda_bytes


def test_forked_child_of_a_comm_target_is_counted(by_comm, veth_peer, stub):
    src, _ = by_comm
    parent = actor("fork-tcp", b"ptx-t-forker", veth_peer, stub)
    child = finish(parent)[0]
    s = series(src)
    assert s.socket[("ptx-t-forker", "ingress")] == child["socket"]["ingress"]
    assert s.cuda_bytes["ptx-t-forker"] == child["cuda"]["bytes"]


def test_unix_socket_ipc_is_not_network_payload(by_comm):
    src, _ = by_comm
    truth = finish(actor("unix", b"ptx-t-ipc"))[0]
    assert truth["unix_bytes"] == NBYTES
    s = series(src)
    assert s.socket.get(("ptx-t-ipc", "ingress"), 0) == 0
    assert s.socket.get(("ptx-t-ipc", "egress"), 0) == 0


def test_loopback_peer_is_not_network_payload_without_nic_lo(by_comm, lo_peer, stub):
    src, _ = by_comm
    truth = finish(actor("tcp", b"ptx-t-loop", lo_peer, stub))[0]
    s = series(src)
    assert s.socket.get(("ptx-t-loop", "ingress"), 0) == 0
    assert s.cuda_bytes["ptx-t-loop"] == truth["cuda"]["bytes"]  # its CUDA copies still count


def test_loopback_counts_when_lo_is_a_selected_nic(lo_peer, stub):
    src = EbpfSource(target_comm="^ptx-l-", cuda_probes="off", calibrate=False, nics=["lo"])
    try:
        src.start()
        src.read()
        truth = finish(actor("tcp", b"ptx-l-loop", lo_peer, stub))[0]
        s = series(src)
    finally:
        src.close()
    assert s.socket[("ptx-l-loop", "ingress")] == truth["socket"]["ingress"]


def test_hostile_comm_and_mapped_path_neither_freeze_nor_break_labels(by_comm, veth_peer, stub, tmp_path):
    """Any user can name a process with bytes that are not UTF-8 and map a file whose path is not:
    the source keeps reading, the governor keeps running, the label is sanitised (issue 13 item 1)."""
    src, _ = by_comm
    odd = os.path.join(os.fsencode(tmp_path), b"lib\xff\xfe\x01.so")
    with open(odd, "wb") as f:
        f.write(b"\0" * 4096)
    name = b"ptx-t-\xff\xfe\x01\x7f"
    truth = finish(actor("tcp", name, veth_peer, stub, extra=("--map-file", odd.hex())))[0]
    s = series(src)
    label = "ptx-t-\ufffd\ufffd\ufffd\ufffd"
    assert s.socket[(label, "ingress")] == truth["socket"]["ingress"]
    assert src._thread is not None and src._thread.is_alive()


def test_pod_labels_come_from_the_cgroup_captured_at_event_time(by_comm, cgroup_dir, veth_peer, stub):
    """A process in a pod's cgroup that exits before the read is still attributed to its pod: the
    kernel recorded its cgroup id, the source turns the id back into its /proc/PID/cgroup line."""
    src, pods = by_comm
    run = [sys.executable, ACTOR, "--mode", "tcp", "--name", b"ptx-t-pod".hex(), "--bytes", str(NBYTES),
           "--peer", veth_peer, "--cudart", stub]
    p = subprocess.Popen(["sh", "-c", f'echo $$ > {cgroup_dir}/cgroup.procs && exec "$@"', "sh", *run],
                         stdout=subprocess.PIPE, text=True,
                         env=pcietax_env(PTX_EXPORTER=str(REPO / "exporter")))
    truth = finish(p)[0]
    s = series(src)
    lab = s.labels["ptx-t-pod"]
    assert (lab["namespace"], lab["pod"], lab["container"]) == ("infer", "vllm-0", "engine")
    assert s.socket[("ptx-t-pod", "ingress")] == truth["socket"]["ingress"]
    assert any(cgroup_dir.name.encode() in raw for raw in pods.asked)
    # Outside the pod the labels are empty (absent in Prometheus).
    assert (s.labels["ptx-t-once"]["pod"] if "ptx-t-once" in s.labels else "") == ""


def test_forked_child_of_a_target_pid_is_counted_a_stranger_is_not(veth_peer, stub):
    parent = actor("fork-tcp", b"ptx-p-parent", veth_peer, stub, wait=True)
    stranger = actor("fork-tcp", b"ptx-p-stranger", veth_peer, stub, wait=True)
    pid = int(_wait_line(parent, "ready").split()[1])
    _wait_line(stranger, "ready")
    src = EbpfSource(target_pids=[pid], cuda_probes="always", cuda_libs_given=[stub], calibrate=False)
    try:
        src.start()
        src.read()
        for p in (parent, stranger):
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        child = finish(parent)[0]
        finish(stranger)
        s = series(src)
    finally:
        src.close()
    assert s.socket[("ptx-p-parent", "ingress")] == child["socket"]["ingress"]
    assert s.cuda_bytes["ptx-p-parent"] == child["cuda"]["bytes"]
    assert "ptx-p-stranger" not in s.cuda_bytes
    assert not any(p == "ptx-p-stranger" for p, _ in s.socket)


def test_a_failing_governor_tick_is_reported_and_survived(by_comm):
    src, _ = by_comm
    gov = src._governor
    real = gov.wanted
    calls = {"n": 0}

    def flaky(now: float):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(now)

    gov.wanted = flaky  # type: ignore[method-assign]
    try:
        deadline = time.monotonic() + 5
        while calls["n"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        from pcietax.sources.base import SourceUnavailable

        with pytest.raises(SourceUnavailable, match="governor thread failed: RuntimeError: injected"):
            src.read()
        src.read()  # reported once, then up again: the thread lived on
        assert src._thread is not None and src._thread.is_alive()
    finally:
        gov.wanted = real  # type: ignore[method-assign]


@pytest.mark.parametrize("probes", ["sampled", "always"], ids=["defaults", "always"])
def test_serve_counts_a_target_started_at_once_and_exports_drops(tmp_path, veth, veth_peer, stub, probes):
    """`pcietax serve` end to end: the staged path of a target started after the exporter, with no
    pause, reads ratio 4 +- 0.15 (socket bytes -> kernel_copy, pageable CUDA copies -> user_copy and
    host_to_gpu; nic_dma from the veth), at defaults (under the budget governor) and always."""
    from conftest import free_port
    from helpers.scrape import scrape, value

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        p = subprocess.Popen([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}",
                              "--target.comm", "^ptx-s-", "--cuda.lib", stub, "--nic", veth.host_if,
                              "--cuda.probes", probes,
                              "--no-source.rdma", "--no-source.pcie"],
                             stdout=f, stderr=subprocess.STDOUT, env=pcietax_env())
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, log.read_text()
            try:
                s0 = scrape(url)
                if value(s0, "pcietax_source_up", source="ebpf") == 1:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        finish(actor("tcp", b"ptx-s-staged", veth_peer, stub, extra=("--bytes", str(256 << 20))))
        time.sleep(11)  # every duty-cycle window of the run has closed and been folded
        s1 = scrape(url)
    finally:
        p.terminate()
        p.wait(timeout=20)
    hops = ("nic_dma", "kernel_copy", "user_copy", "host_to_gpu")
    moved = sum(value(s1, "pcietax_moved_bytes_total", hop=h, direction="ingress")
                - value(s0, "pcietax_moved_bytes_total", hop=h, direction="ingress") for h in hops)
    useful = (value(s1, "pcietax_useful_bytes_total", direction="ingress")
              - value(s0, "pcietax_useful_bytes_total", direction="ingress"))
    print(f"staged ratio started at once: {moved / useful:.4f}")
    assert moved / useful == pytest.approx(4.0, abs=0.15)
    assert value(s1, "pcietax_probe_drops_total", reason="process_map_full") == 0
