"""The eBPF source's life cycle on the real kernel: every way it cannot start says why (and the rest
of the exporter keeps serving), sampled CUDA probes estimate right, and stopping detaches
everything (no program left loaded, no uprobe left behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, needs_root, pcietax_cmd, pcietax_env
from helpers.bpfobj import prog_exists, prog_ids_of, uprobe_events
from helpers.scrape import scrape, value
from pcietax.sources.base import SourceUnavailable
from pcietax.sources.ebpf import REQUIRED_TRACEPOINTS, EbpfSource, program_dir


def _workload(*args: str) -> tuple[subprocess.Popen, str]:
    """A workload paused after setup (--wait-signal); returns it and the CUDA runtime it loaded."""
    p = subprocess.Popen([*pcietax_cmd(), "workload", "--comm", "ptx-life", *args, "--wait-signal"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=pcietax_env())
    assert p.stderr is not None
    line = p.stderr.readline()
    assert line.startswith("ready pid="), line
    return p, line.split("cudart=", 1)[1].strip()


def _wait_gone(ids: set[int], timeout: float = 15) -> set[int]:
    """Programs are freed after an RCU grace period: poll, do not sleep blindly."""
    deadline = time.monotonic() + timeout
    left = set(ids)
    while left and time.monotonic() < deadline:
        left = {i for i in left if prog_exists(i)}
        time.sleep(0.1)
    return left


# --- cannot start: the reason says what is missing --------------------------------------------


def test_no_bcc_is_down_with_the_package_to_install():
    # A Python that cannot import bcc (sys.modules entry None makes the import fail as if absent).
    code = ("import sys; sys.modules['bcc'] = None\n"
            "from pcietax.sources.ebpf import EbpfSource\n"
            "from pcietax.sources.base import SourceAbsent, SourceUnavailable\n"
            "try:\n    EbpfSource().start()\nexcept SourceUnavailable as e:\n"
            "    print(e, 'ABSENT' if isinstance(e, SourceAbsent) else 'FAILURE')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=pcietax_env(),
                       timeout=60)
    assert "bcc not installed" in r.stdout and "python3-bpfcc" in r.stdout, r.stdout + r.stderr
    # A missing BCC is a broken install (our image and the packages ship it): a failure, not absent.
    assert "FAILURE" in r.stdout


def test_bad_cgroup_target_is_down_with_the_option_named(tmp_path):
    with pytest.raises(SourceUnavailable, match=r"--target\.cgroup"):
        EbpfSource(target_cgroup=str(tmp_path / "nope"), cgroup_root=str(tmp_path)).start()


def test_bad_comm_regex_is_down_with_the_option_named():
    with pytest.raises(SourceUnavailable, match=r"--target\.comm"):
        EbpfSource(target_comm="(unclosed").start()


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the unprivileged path (root: see the next test)")
def test_not_root_is_down_with_the_reason():
    with pytest.raises(SourceUnavailable, match="not root"):
        EbpfSource(calibrate=False).start()


@needs_root
def test_not_root_is_down_and_the_exporter_serves_the_rest(tmp_path):
    """The whole exporter as an unprivileged user: eBPF down with the reason, netdev still up."""
    port = free_port()
    log = tmp_path / "serve.log"
    os.chmod(tmp_path, 0o777)
    with open(log, "w") as f:
        p = subprocess.Popen([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}",
                              "--no-source.rdma", "--no-source.pcie"],
                             stdout=f, stderr=subprocess.STDOUT, env=pcietax_env(HOME=str(tmp_path)),
                             user=65534, group=65534, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, log.read_text()
            try:
                s = scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert value(s, "pcietax_source_up", source="ebpf") == 0
        assert value(s, "pcietax_source_up", source="netdev") == 1
        assert "not root" in log.read_text()
    finally:
        p.terminate()
        p.wait(timeout=15)


@needs_root
def test_missing_tracepoint_is_down_naming_it(tmp_path):
    # A tracefs with every tracepoint we need except one of the IRQ pair (a kernel without it).
    for tp in (*REQUIRED_TRACEPOINTS, "sock/sock_recv_length", "sock/sock_send_length"):
        if tp != "irq/softirq_exit":
            d = tmp_path / "events" / tp
            d.mkdir(parents=True)
            (d / "format").write_text(Path("/sys/kernel/tracing/events", tp, "format").read_text())
    with pytest.raises(SourceUnavailable, match=r"tracepoint irq:softirq_exit missing"):
        EbpfSource(tracefs=str(tmp_path), calibrate=False).start()


@needs_root
def test_no_socket_tracepoint_at_all_is_down_naming_both(tmp_path):
    for tp in REQUIRED_TRACEPOINTS:
        d = tmp_path / "events" / tp
        d.mkdir(parents=True)
        (d / "format").write_text(Path("/sys/kernel/tracing/events", tp, "format").read_text())
    with pytest.raises(SourceUnavailable, match=r"sock:sock_recv_length .* skb:skb_copy_datagram_iovec"):
        EbpfSource(tracefs=str(tmp_path), calibrate=False).start()


@needs_root
def test_unmounted_tracefs_is_mounted_and_logged(tmp_path, caplog):
    """A fresh VM has /sys/kernel/tracing unmounted: as root the source mounts it and says so."""
    import logging

    where = tmp_path / "tracing"
    src = EbpfSource(tracefs=str(where), cuda_probes="off", calibrate=False)
    try:
        with caplog.at_level(logging.INFO, logger="pcietax"):
            src.start()
        assert (where / "events" / "irq" / "softirq_entry" / "format").exists()
        assert any("tracefs was not mounted: mounted it at" in r.getMessage() for r in caplog.records)
        src.read()
    finally:
        src.close()
        subprocess.run(["umount", str(where)], check=False)


@needs_root
def test_no_kernel_headers_and_no_kheaders_is_down_naming_what_to_install(tmp_path):
    with pytest.raises(SourceUnavailable, match=r"no kernel headers at .*/build and no .*kheaders"
                                                 r".*linux-headers-"):
        EbpfSource(modules=str(tmp_path), sysfs=str(tmp_path), calibrate=False).start()


def test_kheaders_are_used_when_there_is_no_build_tree(tmp_path):
    from pcietax.sources.ebpf.loader import check_headers

    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "kheaders.tar.xz").write_bytes(b"\xfd7zXZ")
    assert check_headers(tmp_path / "modules", tmp_path, release="6.18.0") == "kheaders"
    (tmp_path / "modules" / "6.18.0" / "build").mkdir(parents=True)
    assert check_headers(tmp_path / "modules", tmp_path, release="6.18.0") == "build"


@needs_root
def test_compile_error_is_down_with_the_compiler_message(tmp_path):
    bad = tmp_path / "broken.bpf.c"
    good = (program_dir() / "pcietax.bpf.c").read_text()
    bad.write_text(good + "\nint ptx_broken(struct pt_regs *ctx) { return undeclared_thing; }\n")
    with pytest.raises(SourceUnavailable, match=r"BPF compile/load failed: .*error: .*undeclared_thing"):
        EbpfSource(program=str(bad), calibrate=False).start()


def test_compile_never_redirects_the_process_stderr():
    """Other sources log through fd 2 while eBPF compiles: nothing may swap it out (issue 10)."""
    import inspect

    from pcietax.sources.ebpf import loader, source

    for mod in (loader, source):
        text = inspect.getsource(mod)
        assert "dup2" not in text, mod.__name__


@needs_root
def test_full_map_drops_are_counted_and_logged():
    """Per-process maps sized for 2 processes, node-wide: a few more processes moving TCP bytes
    overflow them; every update the kernel could not make is in pcietax_probe_drops_total."""
    src = EbpfSource(max_procs=2, cuda_probes="off", calibrate=False, nics=["lo"])
    code = ("import socket\ns = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection("
            "s.getsockname()); a, _ = s.accept()\n"
            "for _ in range(10):\n    c.send(b'x' * 100); a.recv(100)\n")
    try:
        src.start()
        for _ in range(4):
            subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        snap = src.read()
    finally:
        src.close()
    drops = {dict(s.labels)["reason"]: s.value for s in snap.counters
             if s.family == "pcietax_probe_drops_total"}
    assert drops["process_map_full"] > 0, drops


# --- stopping detaches everything -------------------------------------------------------------


@needs_root
def test_close_detaches_every_probe_and_unloads_every_program():
    wl, cudart = _workload("--scenario", "pinned", "--bytes", "1MiB")
    before = prog_ids_of("self")
    src = EbpfSource(target_pids=[wl.pid], cuda_probes="always", memcpy=True, calibrate=False)
    try:
        src.start()
        src.read()
        ours = prog_ids_of("self") - before
        # tracepoints (4 IRQ + 2 socket + 3 fork/exec/exit) and uprobes (copy, alloc, free, memcpy)
        assert len(ours) >= 8, ours
        assert all(prog_exists(i) for i in ours)
    finally:
        src.close()
        wl.send_signal(signal.SIGUSR1)
        wl.communicate(timeout=60)
    assert _wait_gone(ours) == set(), "programs still loaded after close()"
    assert prog_ids_of("self") & ours == set()
    assert not [e for e in uprobe_events() if "ptx" in e or cudart in e or "libc" in e]


@needs_root
def test_serve_detaches_everything_on_sigterm(tmp_path):
    port = free_port()
    wl, cudart = _workload("--scenario", "pinned", "--bytes", "1MiB")
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        p = subprocess.Popen([*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}",
                              "--target.pid", str(wl.pid), "--cuda.probes", "always",
                              "--no-source.rdma", "--no-source.pcie", "--no-source.netdev"],
                             stdout=f, stderr=subprocess.STDOUT, env=pcietax_env())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert p.poll() is None, log.read_text()
            try:
                if value(scrape(f"http://127.0.0.1:{port}/metrics"), "pcietax_source_up", source="ebpf"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        ids = prog_ids_of(p.pid)
        assert len(ids) >= 6
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        wl.send_signal(signal.SIGUSR1)
        wl.communicate(timeout=60)
    assert _wait_gone(ids) == set()
    assert not [e for e in uprobe_events() if cudart in e]


# --- sampled CUDA probes ----------------------------------------------------------------------


@needs_root
def test_budget_duty_cycles_copy_probes_and_keeps_pinned_tracking(monkeypatch):
    """Copy probes attached half of each 1 s period: counts are scaled by the measured duty
    cycle; the allocation probes stay attached, so the buffer allocated during the run is known
    pinned. The plan is fixed at one half here (how the budget sets duties is tested on its own in
    test_ebpf_parts.py: the measured costs of a real run are not known in advance)."""
    from pcietax.sources.ebpf import governor

    monkeypatch.setattr(governor, "plan", lambda budget, costs, order, pinned, min_duty:
                        {g: 1.0 if g in pinned else 0.5 for g in order})
    wl, _ = _workload("--scenario", "pinned", "--bytes", "4MiB", "--chunk", "256KiB",
                      "--duration", "8", "--rate", "16MiB")
    src = EbpfSource(target_pids=[wl.pid], cuda_probes="sampled", budget_period=1.0, calibrate=False)
    try:
        src.start()
        src.read()
        wl.send_signal(signal.SIGUSR1)
        out, err = wl.communicate(timeout=60)
        assert wl.returncode == 0, err
        time.sleep(1.2)  # let the last window close
        src.read()  # a new series shows 0 once (the engine's baseline), then its value
        snap = src.read()
        duty = src._governor.groups["cuda_copy"].duty
    finally:
        src.close()
    assert duty == pytest.approx(0.5)
    truth = json.loads(out)["cuda_copies"]["h2d"]["pinned"]
    got = {dict(s.labels)["memory"]: s.value for s in snap.counters
           if s.family == "pcietax_cuda_copy_bytes_total" and dict(s.labels)["kind"] == "h2d"}
    assert got.get("pageable", 0) == 0
    assert got["pinned"] == pytest.approx(truth["bytes"], rel=0.25)
    hits = sum(s.value for s in snap.counters
               if s.family == "pcietax_probe_hits_total" and dict(s.labels)["probe"] == "cuda_copy")
    assert hits < 0.8 * truth["calls"], "copy probes were never detached"


# --- cgroup targets ---------------------------------------------------------------------------


@needs_root
def test_cgroup_target_counts_the_processes_inside_only(tmp_path):
    """--target.cgroup is matched in the kernel by ancestry: a process that joins the cgroup is
    counted from its first byte; the same workload outside it, at the same time, is not."""
    from pcietax.sources.ebpf_targets import cgroup2_mount

    root = Path(cgroup2_mount(Path("/proc")))
    if not (root / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy mounted")
    cg = root / f"ptx-test-{os.getpid()}"
    cg.mkdir()
    peer = subprocess.Popen([*pcietax_cmd(), "workload", "--serve-peer", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, text=True, env=pcietax_env())
    src = EbpfSource(target_cgroup=str(cg), cuda_probes="off", calibrate=False, nics=["lo"])
    try:
        assert peer.stdout is not None
        addr = peer.stdout.readline().split(" ", 1)[1].strip()
        src.start()
        src.read()
        run = [*pcietax_cmd(), "workload", "--scenario", "pinned", "--bytes", "8MiB", "--peer", addr]
        inside = subprocess.Popen(["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *run,
                                   "--comm", "ptx-in"], stdout=subprocess.PIPE, text=True, env=pcietax_env())
        outside = subprocess.Popen([*run, "--comm", "ptx-out"], stdout=subprocess.DEVNULL, env=pcietax_env())
        out, _ = inside.communicate(timeout=120)
        assert inside.returncode == 0 and outside.wait(timeout=120) == 0
        src.read()  # a new series shows 0 once (the engine's baseline), then its value
        snap = src.read()
    finally:
        src.close()
        peer.terminate()
        peer.wait(timeout=10)
        cg.rmdir()
    truth = json.loads(out)["socket_copy_bytes"]
    got = {(dict(s.labels)["process"], dict(s.labels)["direction"]): s.value for s in snap.counters
           if s.family == "pcietax_socket_copy_bytes_total"}
    assert {p for p, _ in got} == {"ptx-in"}
    assert got[("ptx-in", "ingress")] == pytest.approx(truth["ingress"], rel=0.02)
    assert got[("ptx-in", "egress")] == pytest.approx(truth["egress"], rel=0.02)
