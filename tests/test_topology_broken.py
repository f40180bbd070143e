"""Bad input never raises: dangling links, symlink loops, garbage or unreadable files and devices
that vanish during the walk leave the affected devices unknown, with the reason, and the rest of
the node is still judged. Tests run as root, so "unreadable" is made real in two ways: a
directory where the kernel has a file (open() fails with EISDIR), and a child process that drops
to nobody and meets mode-000 files (EACCES, as an unprivileged exporter would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import needs_root, pcietax_cmd, pcietax_env
from helpers.topotree import hgx_h100
from pcietax.topology import SysfsReader, discover
from pcietax.topology.render import render_text, to_json

GPU0, NIC0 = "0000:18:00.0", "0000:19:00.0"  # behind switch 0, PIX to each other
GPU0_DSP = "0000:17:00.0"


def _dev(lay, addr: str) -> Path:
    return Path(os.path.realpath(lay.sysfs / "bus/pci/devices" / addr))


def _pair(topo, gpu, nic):
    return next(p for p in topo.pairs if p.gpu == gpu and p.nic_addr == nic)


def _judged(topo) -> None:
    """The rest of the node is still judged: switch 3 is untouched by every breakage here."""
    assert _pair(topo, "0000:bd:00.0", "0000:be:00.0").gpudirect == "ready"
    render_text(topo)
    json.dumps(to_json(topo))


def test_dangling_link_is_reported_and_walk_goes_on(tmp_path):
    lay = hgx_h100(tmp_path)
    gone = "../../../devices/pci0000:98/0000:98:01.0/0000:99:00.0"
    (lay.sysfs / "bus/pci/devices/0000:99:00.0").symlink_to(gone)
    topo = discover(lay.sysfs)
    d = topo.tree.devices["0000:99:00.0"]
    assert d.kind == "unknown" and "gone" in d.problems[0]
    assert d in topo.unknown_devices()
    _judged(topo)


def test_symlink_loop_is_reported(tmp_path):
    lay = hgx_h100(tmp_path)
    (lay.sysfs / "bus/pci/devices/0000:f0:00.0").symlink_to("0000:f0:00.0")
    topo = discover(lay.sysfs)
    assert "symlink loop" in topo.tree.devices["0000:f0:00.0"].problems[0]
    _judged(topo)


def test_garbage_class_and_non_pci_names(tmp_path):
    lay = hgx_h100(tmp_path)
    (_dev(lay, NIC0) / "class").write_text("0xzz0700\n")
    (lay.sysfs / "bus/pci/devices/README").write_text("not a device\n")
    topo = discover(lay.sysfs)
    d = topo.tree.devices[NIC0]
    assert d.kind == "unknown" and "garbage class" in d.problems[0]
    assert NIC0 not in {n.addr for n in topo.nics}  # not judged as a NIC it may not be
    assert any("README" in where for where, _ in topo.tree.problems)
    _judged(topo)


def test_class_that_is_a_directory_is_unreadable_not_a_crash(tmp_path):
    lay = hgx_h100(tmp_path)
    cls = _dev(lay, GPU0) / "class"
    cls.unlink()
    cls.mkdir()
    topo = discover(lay.sysfs)
    d = topo.tree.devices[GPU0]
    assert d.kind == "unknown" and "directory" in d.problems[0]
    assert "Could not read" in render_text(topo)
    _judged(topo)


def test_bridge_config_unreadable_makes_acs_unknown(tmp_path):
    lay = hgx_h100(tmp_path)
    cfg = _dev(lay, GPU0_DSP) / "config"
    cfg.unlink()
    cfg.mkdir()
    topo = discover(lay.sysfs)
    p = _pair(topo, GPU0, NIC0)
    assert (p.gpudirect, p.reason) == ("blocked", "unknown_acs")
    assert GPU0_DSP in p.acs_unknown
    _judged(topo)


def test_gpu_resource_unreadable_makes_bar_unknown(tmp_path):
    lay = hgx_h100(tmp_path)
    res = _dev(lay, GPU0) / "resource"
    res.unlink()
    res.mkdir()
    topo = discover(lay.sysfs)
    assert (_pair(topo, GPU0, NIC0).gpudirect, _pair(topo, GPU0, NIC0).reason) == ("blocked", "unknown_bar")
    (_dev(lay, "0000:1a:00.0") / "resource").write_text("0x0 garbage\n")
    topo = discover(lay.sysfs)
    assert _pair(topo, "0000:1a:00.0", NIC0).reason == "unknown_bar"
    assert any("garbage resource" in p for p in topo.tree.devices["0000:1a:00.0"].problems)


def test_non_ascii_numa_node_on_two_sockets_makes_cross_bridge_paths_unknown(tmp_path):
    lay = hgx_h100(tmp_path)
    (_dev(lay, GPU0) / "numa_node").write_bytes(b"\xff\xfe\n")
    topo = discover(lay.sysfs)
    assert any("not ASCII" in p for p in topo.tree.devices[GPU0].problems)
    assert _pair(topo, GPU0, NIC0).gpudirect == "ready"  # same switch: NUMA does not matter
    far = _pair(topo, GPU0, "0000:be:00.0")
    assert (far.path, far.reason) == ("unknown", "unknown_path")


def test_device_outside_any_host_bridge_is_unplaced(tmp_path):
    lay = hgx_h100(tmp_path)
    real = lay.sysfs / "devices/platform/soc/0000:aa:00.0"
    real.mkdir(parents=True)
    (real / "class").write_text("0x020000\n")
    (real / "vendor").write_text("0x15b3\n")
    (lay.sysfs / "bus/pci/devices/0000:aa:00.0").symlink_to("../../../devices/platform/soc/0000:aa:00.0")
    topo = discover(lay.sysfs)
    p = _pair(topo, GPU0, "0000:aa:00.0")
    assert (p.path, p.gpudirect, p.reason) == ("unknown", "blocked", "unknown_path")
    assert "host bridge" in p.detail
    assert topo.best[GPU0].nic_addr != "0000:aa:00.0"
    _judged(topo)


class VanishingReader(SysfsReader):
    """Real reads, except that right after the device list is taken the given directories are
    removed from the tree: the kernel's view when a device is hot-removed mid-walk."""

    def __init__(self, victims: list[Path], after_reads_of: str | None = None) -> None:
        self.victims = victims
        self.after = after_reads_of

    def listdir(self, path):
        names = super().listdir(path)
        if str(path).endswith("bus/pci/devices") and self.after is None:
            self._vanish()
        return names

    def read_str(self, path):
        text = super().read_str(path)
        if self.after is not None and str(path).endswith(f"{self.after}/class"):
            self._vanish()  # gone between reading its class and the rest
        return text

    def _vanish(self):
        for v in self.victims:
            shutil.rmtree(v, ignore_errors=True)


def test_devices_vanishing_during_the_walk(tmp_path):
    lay = hgx_h100(tmp_path)
    nic = _dev(lay, NIC0)
    topo = discover(lay.sysfs, VanishingReader([nic]))
    assert "gone" in topo.tree.devices[NIC0].problems[0]
    assert NIC0 not in {n.addr for n in topo.nics}
    _judged(topo)

    lay2 = hgx_h100(tmp_path / "2")
    gpu0 = _dev(lay2, GPU0)
    topo = discover(lay2.sysfs, VanishingReader([gpu0], after_reads_of=GPU0))
    d = topo.tree.devices[GPU0]
    assert d.kind == "gpu" and d.problems  # known to be a GPU, the rest unreadable
    p = _pair(topo, GPU0, "0000:19:00.0")
    assert p.gpudirect == "blocked"
    _judged(topo)

    lay3 = hgx_h100(tmp_path / "3")
    topo = discover(lay3.sysfs, VanishingReader([_dev(lay3, GPU0_DSP)]))
    # the bridge under GPU0 vanished (and with it, in sysfs, everything below it)
    assert GPU0 not in {g.addr for g in topo.gpus}
    assert "gone" in topo.tree.devices[GPU0_DSP].problems[0]
    _judged(topo)


def test_cli_on_a_broken_tree_exits_zero_and_says_what_it_could_not_read(tmp_path):
    lay = hgx_h100(tmp_path)
    (lay.sysfs / "bus/pci/devices/0000:f0:00.0").symlink_to("0000:f0:00.0")
    (_dev(lay, NIC0) / "class").write_text("garbage\n")
    for fmt in ("text", "json"):
        r = subprocess.run([*pcietax_cmd(), "topo", "--path.sysfs", str(lay.sysfs), "--format", fmt],
                           env=pcietax_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        if fmt == "json":
            doc = json.loads(r.stdout)
            unknown = {u["pci_bus_id"]: u["problems"] for u in doc["unknown_devices"]}
            assert "symlink loop" in unknown["0000:f0:00.0"][0]
            assert "garbage class" in unknown[NIC0][0]
        else:
            assert "0000:f0:00.0" in r.stdout and "symlink loop" in r.stdout


@needs_root
def test_unprivileged_reader_meets_permission_denied(tmp_path):
    # A world-traversable copy: pytest's tmp_path lives under a 0700 directory nobody cannot enter.
    top = Path(tempfile.mkdtemp(prefix="pcietax-topo-"))
    try:
        top.chmod(0o755)
        lay = hgx_h100(top / "node")
        for dirpath, _dirs, _files in os.walk(top):
            os.chmod(dirpath, 0o755)
        (_dev(lay, GPU0_DSP) / "config").chmod(0o000)
        (_dev(lay, GPU0) / "resource").chmod(0o000)
        r = subprocess.run([*pcietax_cmd(), "topo", "--path.sysfs", str(lay.sysfs), "--format", "json"],
                           env=pcietax_env(), capture_output=True, text=True, timeout=60,
                           user=65534, group=65534, cwd="/")
        if r.returncode != 0 and "Permission denied" in r.stderr and "python" in r.stderr.lower():
            pytest.skip(f"nobody cannot run this tree's python: {r.stderr[-200:]}")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        bridge = next(b for b in doc["bridges"] if b["pci_bus_id"] == GPU0_DSP)
        assert bridge["acs"]["state"] == "unknown" and "Permission denied" in bridge["acs"]["why"]
        gpu = next(g for g in doc["gpus"] if g["pci_bus_id"] == GPU0)
        assert gpu["bar1_bytes"] is None and "Permission denied" in gpu["problems"][0]
        pair = next(p for p in doc["pairs"] if p["gpu"] == GPU0 and p["nic_pci_bus_id"] == NIC0)
        assert (pair["gpudirect"], pair["reason"]) == ("blocked", "unknown_acs")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_any_single_corrupted_file_never_raises(tmp_path):
    """Each of a fixed sample of the tree's files, in turn, becomes garbage bytes, a directory,
    a dangling link, or disappears: the walk, the verdicts and both renderings always finish."""
    import random

    lay = hgx_h100(tmp_path)
    files = sorted(p for p in lay.sysfs.rglob("*") if p.is_file() and not p.is_symlink())
    rng = random.Random(5)
    for i, f in enumerate(rng.sample(files, 28)):
        saved = f.read_bytes()
        mode = i % 4
        f.unlink()
        if mode == 0:
            f.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice((0, 3, 64, 300)))))
        elif mode == 1:
            f.mkdir()
        elif mode == 2:
            f.symlink_to("nowhere")
        try:
            topo = discover(lay.sysfs)
            render_text(topo)
            json.dumps(to_json(topo))
            assert len(topo.tree.devices) == 43, f
        finally:
            if f.is_dir() and not f.is_symlink():
                f.rmdir()
            elif f.exists() or f.is_symlink():
                f.unlink()
            f.write_bytes(saved)
