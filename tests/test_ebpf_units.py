"""The eBPF source's user-space pieces that need no kernel: process labels, target resolution,
library discovery, IFUNC address arithmetic."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import pytest

from pcietax.sources import cuda_libs
from pcietax.sources.ebpf_targets import TargetError, Targets
from pcietax.sources.ifunc import IfuncError, _module_of
from pcietax.sources.proclabels import OTHER, DeltaTracker, ProcessFolder

# --- process labels ---------------------------------------------------------------------------


def test_top_n_then_other_and_every_series_only_rises():
    folder, tracker = ProcessFolder(top_n=2), DeltaTracker()
    comms = {1: "vllm", 2: "nginx", 3: "curl", 4: "late-big"}
    history: list[dict] = []
    raw: dict = {}
    for step in range(6):
        for tgid in comms:
            if tgid == 4 and step < 3:
                continue  # a newcomer that moves the most, after the slots are taken
            raw[(tgid, "ingress")] = raw.get((tgid, "ingress"), 0) + (10_000 if tgid == 4 else tgid * 10)
        folder.add(tracker.deltas(raw), comms)
        history.append(folder.totals())
    final = history[-1]
    labels = {proc for proc, _ in final}
    assert len(labels - {OTHER}) == 2 and OTHER in labels
    # The newcomer lands in "other" (sticky slots), so nothing that was exported can move away.
    assert final[(OTHER, "ingress")] >= 3 * 10_000
    for before, after in itertools.pairwise(history):
        for k, v in before.items():
            assert after[k] >= v, k
    # Nothing is lost: labelled totals add up to everything counted.
    assert sum(final.values()) == sum(raw.values())


def test_busiest_comm_of_a_cycle_gets_the_last_slot():
    folder = ProcessFolder(top_n=1)
    folder.add({(1, "x"): 5.0, (2, "x"): 500.0}, {1: "small", 2: "big"})
    assert set(folder.totals()) == {("big", "x"), (OTHER, "x")}


def test_reused_pid_after_cleanup_counts_its_new_bytes():
    t = DeltaTracker()
    assert t.deltas({(7, "a"): 100.0}) == {(7, "a"): 100.0}
    t.forget({7})
    # the map entry was deleted and re-created by a new process with the same pid
    assert t.deltas({(7, "a"): 30.0}) == {(7, "a"): 30.0}
    assert t.deltas({(7, "a"): 30.0}) == {}
    # a value that went down without a forget is still a fresh entry, never a negative delta
    assert t.deltas({(7, "a"): 10.0}) == {(7, "a"): 10.0}


def test_negative_top_n_is_refused():
    with pytest.raises(ValueError):
        ProcessFolder(top_n=-1)


# --- targets ----------------------------------------------------------------------------------


def _proc(root, pid: int, comm: str, cgroup: str = "/") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cgroup").write_text(f"0::{cgroup}\n")


def test_targets_resolve_pids_comm_and_cgroup(tmp_path):
    proc = tmp_path / "proc"
    _proc(proc, 10, "vllm-worker", "/kubepods/pod1/c1")
    _proc(proc, 11, "bash")
    _proc(proc, 12, "python3", "/kubepods/pod1/c2")
    cg = tmp_path / "cgroup" / "kubepods" / "pod1"
    cg.mkdir(parents=True)
    (cg / "cgroup.procs").write_text("")
    assert Targets(str(proc)).node_wide
    assert Targets(str(proc), pids=[11, 99]).resolve() == {11}  # 99 does not exist
    assert Targets(str(proc), comm="^vllm").resolve() == {10}
    t = Targets(str(proc), cgroup="/kubepods/pod1", cgroup_root=str(tmp_path / "cgroup"))
    assert t.resolve() == {10, 12}
    assert t.cgroup is not None and t.cgroup.level == 2 and t.cgroup.id == os.stat(cg).st_ino
    # the full path form names the same cgroup
    full = Targets(str(proc), cgroup=str(cg), cgroup_root=str(tmp_path / "cgroup"))
    assert full.cgroup == t.cgroup


def test_target_errors_name_the_option(tmp_path):
    with pytest.raises(TargetError, match=r"--target\.comm"):
        Targets(str(tmp_path), comm="[")
    with pytest.raises(TargetError, match=r"--target\.cgroup .* not a cgroup v2 directory"):
        Targets(str(tmp_path), cgroup="/missing", cgroup_root=str(tmp_path))
    (tmp_path / "plain").mkdir()
    with pytest.raises(TargetError, match=r"no cgroup\.procs"):
        Targets(str(tmp_path), cgroup="/plain", cgroup_root=str(tmp_path))


# --- CUDA library discovery -------------------------------------------------------------------


MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1 /usr/bin/python3.11
7f1c00000000-7f1c00100000 r-xp 00000000 08:01 2 /usr/local/cuda/lib64/libcudart.so.12.4.127
7f1c00100000-7f1c00200000 r--p 00100000 08:01 2 /usr/local/cuda/lib64/libcudart.so.12.4.127
7f1c10000000-7f1c20000000 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
7f1c30000000-7f1c30100000 r-xp 00000000 08:01 4 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c40000000-7f1c40100000 rw-s 00000000 00:05 5 /dev/nvidiactl
7f1c50000000-7f1c50100000 r-xp 00000000 08:01 6 /opt/old/libcudart.so.11.0 (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
"""


def test_discovery_probes_the_file_the_process_maps_through_its_root(tmp_path):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "maps").write_text(MAPS)
    root = str(tmp_path / "42" / "root")
    assert cuda_libs.discover(tmp_path, 42, cuda_libs.RUNTIME_RE) == [
        root + "/usr/local/cuda/lib64/libcudart.so.12.4.127"]  # once, not the deleted one
    assert cuda_libs.discover(tmp_path, 42, cuda_libs.DRIVER_RE) == [
        root + "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"]
    libc = cuda_libs.discover(tmp_path, 42, cuda_libs.LIBC_RE)
    assert libc == [root + "/usr/lib/x86_64-linux-gnu/libc.so.6"]
    assert cuda_libs.discover(tmp_path, 43, cuda_libs.RUNTIME_RE) == []  # process gone


def test_library_kinds():
    assert cuda_libs.lib_kind("/x/libcudart.so.12") == "runtime"
    assert cuda_libs.lib_kind("/x/libcudart.so") == "runtime"
    assert cuda_libs.lib_kind("/x/libcuda.so.1") == "driver"
    assert cuda_libs.lib_kind("/x/libcudnn.so.9") is None


# --- IFUNC address arithmetic -----------------------------------------------------------------


def test_ifunc_offset_is_relative_to_the_libc_load_base():
    base = 0x7F1C30000000
    path, b = _module_of(base + 0x181F00 + 0x28000, MAPS.encode().replace(
        b"7f1c30000000-7f1c30100000 r-xp 00000000", b"7f1c30000000-7f1c30300000 r-xp 00000000"))
    assert path.endswith("libc.so.6") and b == base
    with pytest.raises(IfuncError, match="not in a mapped file"):
        _module_of(0x1000, MAPS.encode())


@pytest.mark.skipif(not shutil.which("readelf"), reason="needs readelf (binutils)")
def test_ifunc_resolves_memcpy_here_to_an_implementation_not_the_resolver():
    """On this machine: memcpy's symbol is an IFUNC whose value is the resolver; what we attach to
    must be the implementation dlsym returns, somewhere else in the same file."""
    from pcietax.sources.ifunc import resolved_memcpy

    path, vaddr = resolved_memcpy()
    out = subprocess.run(["readelf", "-Ws", path], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if re.search(r"\smemcpy@@", line)]
    assert rows, "libc exports memcpy"
    value, kind = int(rows[0][1], 16), rows[0][3]
    assert kind == "IFUNC"
    assert vaddr != value
    assert 0 < vaddr < os.path.getsize(path)
