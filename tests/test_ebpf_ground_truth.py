"""Real kernel, real probes, real traffic: `pcietax workload` under `pcietax serve`, every hop's bytes
against the workload's own ground truth (issue 3).

Layout: the workload's network peer lives in a network namespace joined by a veth pair, and the
exporter measures that veth (`--nic`), so the NIC hop carries only the workload's traffic. At the
same time an outsider (the same workload under another comm, on loopback, through the same CUDA
runtime stand-in) moves data; it is outside the target set and must not be counted anywhere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, needs_root, pcietax_cmd, pcietax_env
from helpers.netns import VethNs
from helpers.scrape import has, scrape, value
from pcietax.workload.scenarios import DIRECTION, EXPECTED_RATIO, SCENARIOS

pytestmark = [needs_root, pytest.mark.root]

TARGET = "ptx-target"
OUTSIDER = "ptx-outsider"
PAYLOAD = 48 << 20
HOPS = ("nic_dma", "kernel_copy", "user_copy", "host_to_gpu")
# What the NIC counts per packet besides payload: Ethernet 14 + IPv4 20 + TCP 20 + the timestamp
# option 12 (an ACK is all header). How many packets a transfer takes depends on how the receiver
# kept up (segments shrink with the window), and a segment the sender retransmits crosses the NIC
# again (up to one MSS each), so the NIC's truth is payload + packets x headers, plus at most the
# retransmitted segments (counted by the sending side's TCP: /proc/net/snmp RetransSegs).
HEADER_BYTES = 66
MTU = 65000  # the veth's (VethNs.create)
MSS = MTU - 52  # IPv4 20 + TCP 20 + timestamps 12


def _nic(iface: str, direction: str, sender: list[str]) -> tuple[int, int, int]:
    """(bytes, packets) the host side of the veth counted in ``direction``, and the TCP segments
    retransmitted so far in the sender's network namespace (``sender``: a command prefix)."""
    stats = Path(f"/sys/class/net/{iface}/statistics")
    side = "rx" if direction == "ingress" else "tx"
    snmp = subprocess.run([*sender, "cat", "/proc/net/snmp"], capture_output=True, text=True,
                          check=True).stdout
    tcp = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Tcp:")]
    retrans = int(dict(zip(tcp[0], tcp[1], strict=True))["RetransSegs"])
    return (int((stats / f"{side}_bytes").read_text()), int((stats / f"{side}_packets").read_text()),
            retrans)


def _wait_line(proc: subprocess.Popen, prefix: str, stream: str = "stdout", timeout: float = 60) -> str:
    f = getattr(proc, stream)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = f.readline()
        if not line:
            raise AssertionError(f"{proc.args} exited before printing {prefix!r} (rc={proc.poll()})")
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no {prefix!r} line from {proc.args}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def veth():
    v = VethNs.create(mtu=MTU)
    yield v
    v.destroy()


@pytest.fixture(scope="module")
def peer(veth):
    argv = [*veth.exec_prefix(), *pcietax_cmd(), "workload", "--serve-peer", f"{veth.peer_ip}:0"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=pcietax_env())
    addr = _wait_line(p, "listening ").split(" ", 1)[1]
    yield addr
    _stop(p)


@pytest.fixture(scope="module")
def outsider():
    """Busy for the whole module: socket copies on loopback and CUDA copies through the stand-in."""
    p = subprocess.Popen([*pcietax_cmd(), "workload", "--comm", OUTSIDER, "--bytes", "8MiB",
                          "--duration", "3600", "--rate", "40MiB"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=pcietax_env())
    yield p
    _stop(p)


@pytest.fixture(scope="module")
def exporter(veth, tmp_path_factory, outsider):
    from pcietax.workload.cudart import DRIVER_SONAME, build_stub

    # Every stand-in library given up front (--cuda.lib): probed from the start, for every process.
    runtime, layered = build_stub(), build_stub(driver=True)
    libs = [str(runtime), str(layered), str(layered.with_name(DRIVER_SONAME))]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as logf:
        p = subprocess.Popen(
            [*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}", "--nic", veth.host_if,
             "--target.comm", f"^{TARGET}$", "--cuda.probes", "always", "--memcpy.probe",
             *(a for lib in libs for a in ("--cuda.lib", lib)),
             "--no-source.rdma", "--no-source.pcie"],
            stdout=logf, stderr=subprocess.STDOUT, env=pcietax_env())
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 120  # BCC compiles the program at start: seconds on a busy box
    while time.monotonic() < deadline:
        assert p.poll() is None, log.read_text()
        try:
            s = scrape(url)
            if value(s, "pcietax_source_up", source="ebpf") == 1 and value(
                    s, "pcietax_source_up", source="netdev") == 1:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        raise AssertionError(f"exporter never came up:\n{log.read_text()}")
    yield url, log
    _stop(p)


def _settled(url: str, before: dict, truth: dict, timeout: float = 30) -> dict:
    """Scrape until the run's useful and CUDA bytes are in (the engine reads every second, and a
    series new to the engine shows its bytes one cycle late), then once more for the NIC."""
    want_useful = sum(truth["socket_copy_bytes"].values())
    want_cuda = sum(c["bytes"] for per in truth["cuda_copies"].values() for c in per.values())
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(url)
        useful = _delta(s, before, "pcietax_useful_bytes_total")
        cuda = _delta(s, before, "pcietax_moved_bytes_total", hop="host_to_gpu")
        if (useful >= want_useful and cuda >= want_cuda) or time.monotonic() > deadline:
            time.sleep(1.2)
            return scrape(url)
        time.sleep(0.3)


def _delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def _run_target(url: str, log: Path, peer: str, *args: str, on_before=lambda: None) -> tuple[dict, dict]:
    """Run the target workload once the exporter has put the opt-in memcpy probe on it (the one
    probe still attached per process, after a rescan); CUDA libraries are probed from the start.
    Returns the exporter's scrape from just before it moved data, and the workload's ground truth."""
    argv = [*pcietax_cmd(), "workload", "--comm", TARGET, "--peer", peer, "--wait-signal", *args]
    wl = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=pcietax_env())
    try:
        _wait_line(wl, "ready pid=", stream="stderr")
        # The exporter finds the target by comm and probes its memcpy (rescan <= 2 s).
        deadline = time.monotonic() + 30
        while f"memcpy probe on pid {wl.pid} " not in Path(log).read_text():
            assert time.monotonic() < deadline, f"pid {wl.pid} not probed:\n{Path(log).read_text()}"
            time.sleep(0.2)
        before = scrape(url)
        on_before()
        wl.send_signal(signal.SIGUSR1)
        out, err = wl.communicate(timeout=120)
        assert wl.returncode == 0, err
    finally:
        _stop(wl)
    return before, json.loads(out)


def _assert_cuda_exact(after: dict, before: dict, truth: dict) -> None:
    for kind, per_mem in truth["cuda_copies"].items():
        for mem, c in per_mem.items():
            got = (_delta(after, before, "pcietax_cuda_copy_bytes_total", kind=kind, memory=mem),
                   _delta(after, before, "pcietax_cuda_copy_calls_total", kind=kind, memory=mem))
            assert got == (c["bytes"], c["calls"]), (kind, mem)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_hop_matches_ground_truth(exporter, peer, outsider, veth, scenario):
    url, log = exporter
    x = DIRECTION[scenario]
    # The peer (in the namespace) sends ingress payload; this host sends egress.
    sender = veth.exec_prefix() if x == "ingress" else []
    nic: dict[str, tuple[int, int, int]] = {}
    before, truth = _run_target(url, log, peer, "--scenario", scenario, "--bytes", str(PAYLOAD),
                                on_before=lambda: nic.update(before=_nic(veth.host_if, x, sender)))
    after = _settled(url, before, truth)
    nic["after"] = _nic(veth.host_if, x, sender)
    nic_bytes, packets, retrans = (a - b for a, b in zip(nic["after"], nic["before"], strict=True))

    # Socket copies (kernel <-> user), per target process: within 2%.
    for d in ("ingress", "egress"):
        got = _delta(after, before, "pcietax_socket_copy_bytes_total", direction=d, process=TARGET)
        assert got == pytest.approx(truth["socket_copy_bytes"][d], rel=0.02), (d, got)
    # CUDA copies: exact, bytes and calls, per kind and memory class.
    _assert_cuda_exact(after, before, truth)
    for d in ("ingress", "egress"):
        got = _delta(after, before, "pcietax_memcpy_bytes_total", direction=d)
        assert got == pytest.approx(truth["memcpy_bytes"][d], rel=0.02, abs=4096), (d, got)

    # Every hop of the scenario's direction, as the model exports it.
    for hop in HOPS:
        got = _delta(after, before, "pcietax_moved_bytes_total", hop=hop, direction=x)
        want = truth["hops"][x][hop]
        if hop == "nic_dma":
            # The hop is the NIC's own counter, and that is the payload plus what the wire added
            # (0.1-3.9 % in these runs, as segment sizes and retransmissions went): counted here,
            # not guessed with a tolerance.
            assert got == pytest.approx(nic_bytes, abs=4096), (hop, got, nic_bytes)
            framed = want + packets * HEADER_BYTES
            assert framed - 4096 <= nic_bytes <= framed + retrans * MSS + 4096, (
                hop, nic_bytes, framed, packets, retrans)
        else:
            assert got == pytest.approx(want, rel=0.02, abs=4096), (hop, got, want)
        assert value(after, "pcietax_hop_measured", hop=hop) == 1

    useful = _delta(after, before, "pcietax_useful_bytes_total", direction=x)
    moved = sum(_delta(after, before, "pcietax_moved_bytes_total", hop=h, direction=x) for h in HOPS)
    assert moved / useful == pytest.approx(EXPECTED_RATIO[scenario], abs=0.15)

    # The outsider was busy all along and is nowhere.
    assert outsider.poll() is None
    assert not has(after, "pcietax_socket_copy_bytes_total", process=OUTSIDER)
    assert not has(after, "pcietax_cuda_copy_bytes_total", process=OUTSIDER)
    assert not has(after, "pcietax_socket_copy_bytes_total", process="ptx-peer")


def test_host_register_pins_like_host_alloc(exporter, peer):
    """Memory the program already had, pinned in place with cudaHostRegister (PyTorch's pin_memory,
    vLLM's buffers), must be classed pinned exactly as cudaHostAlloc memory is: no bounce copy, so
    no user_copy hop and a ratio of 3, not 4."""
    url, log = exporter
    before, truth = _run_target(url, log, peer, "--scenario", "pinned", "--pin", "register",
                                "--bytes", str(PAYLOAD))
    after = _settled(url, before, truth)
    assert truth["cuda_copies"]["h2d"]["pinned"]["bytes"] == PAYLOAD
    _assert_cuda_exact(after, before, truth)
    assert _delta(after, before, "pcietax_moved_bytes_total", hop="user_copy", direction="ingress") == 0
    useful = _delta(after, before, "pcietax_useful_bytes_total", direction="ingress")
    moved = sum(_delta(after, before, "pcietax_moved_bytes_total", hop=h, direction="ingress") for h in HOPS)
    assert moved / useful == pytest.approx(3.0, abs=0.15)


@pytest.mark.parametrize("args", [["--stub-driver"], ["--api", "driver"]],
                         ids=["runtime-over-driver", "driver-api"])
def test_cuda_copies_count_once_through_runtime_and_driver(exporter, peer, args):
    """NVIDIA's runtime calls the driver API for each copy: with both libraries probed, a runtime
    copy must count once (runtime-over-driver); a program calling the driver API itself must count
    too (driver-api: the driver probes' argument positions)."""
    url, log = exporter
    before, truth = _run_target(url, log, peer, "--scenario", "pageable", "--scenario", "pinned",
                                "--scenario", "egress", "--bytes", "16MiB", *args)
    after = _settled(url, before, truth)
    _assert_cuda_exact(after, before, truth)
