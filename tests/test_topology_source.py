"""The topology source (gauges, refresh cadence, faults), its place in the engine and the tax
model, the `pcietax topo` command, the exporter end to end on a fixture tree, and the real sysfs
of this machine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import pcietax_cmd, pcietax_env
from helpers.exporters import serve_until
from helpers.topotree import expected_path, hgx_h100
from pcietax.engine import Engine
from pcietax.model import TaxModel
from pcietax.sources.base import SourceAbsent, SourceUnavailable
from pcietax.sources.topology import BEST_NIC, PATH_INFO, TopologySource
from pcietax.topology import discover

SWITCH2_GPU = "0000:9d:00.0"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _gauges(snap, family):
    return [dict(s.labels) for s in snap.gauges if s.family == family]


def test_source_emits_every_pair_and_each_gpus_best_nic(tmp_path):
    lay = hgx_h100(tmp_path, redirect_switch=2)
    src = TopologySource(sysfs=str(lay.sysfs))
    src.start()
    snap = src.read()
    assert snap.provides == frozenset({PATH_INFO})
    pairs = _gauges(snap, PATH_INFO)
    assert len(pairs) == 8 * 9
    places = {p.addr: p for p in (*lay.gpus, *lay.nics)}
    names = {p.name: p for p in lay.nics}
    for lab in pairs:
        assert set(lab) == {"gpu", "nic", "path", "gpudirect", "reason"}
        assert lab["path"] == expected_path(places[lab["gpu"]], names[lab["nic"]])
    best = {lab["gpu"]: lab for lab in _gauges(snap, BEST_NIC)}
    assert set(best) == {g.addr for g in lay.gpus}
    assert best[SWITCH2_GPU]["gpudirect"] == "blocked" and best[SWITCH2_GPU]["reason"] == "acs"
    assert best["0000:18:00.0"] == {**best["0000:18:00.0"], "gpudirect": "ready", "path": "PIX",
                                    "reason": "none"}
    assert all(s.value == 1 for s in snap.gauges)


def test_source_walks_sysfs_when_functions_come_or_go_and_every_rewalk(tmp_path):
    lay = hgx_h100(tmp_path)
    (lay.sysfs / "bus/pci/devices/0000:f0:00.0").symlink_to("0000:f0:00.0")  # a fault to count
    clock = Clock()
    src = TopologySource(sysfs=str(lay.sysfs), refresh=60, rewalk=600, clock=clock)
    src.start()
    first = src.read()
    assert src.walks == 1 and len(first.faults) == 1
    clock.t += 59
    again = src.read()
    assert src.walks == 1 and again.faults == []  # counted once per walk, not per cycle
    assert again.gauges == first.gauges
    # The tree changes where a listing cannot see it (ACS turned on at a port with setpci): the
    # checks every 60 s find the same functions, and the rewalk at 600 s sees it.
    from helpers.topotree import ACS_KERNEL, config_space

    cfg = lay.sysfs / "bus/pci/devices/0000:17:00.0/config"
    cfg.write_bytes(config_space(0x1000, 0xC030, 0x060400, port_type=6, acs_ctrl=ACS_KERNEL))
    for _ in range(9):
        clock.t += 60
        assert src.read().gauges == first.gauges
    assert src.walks == 1
    clock.t += 60
    third = src.read()
    assert src.walks == 2
    gpu0 = [lab for lab in _gauges(third, PATH_INFO) if lab["gpu"] == "0000:18:00.0" and lab["path"] == "PIX"]
    assert gpu0 and all(lab["reason"] == "acs" for lab in gpu0)
    # Hotplug: a function that goes away is walked at the next check, not ten minutes later.
    (lay.sysfs / "bus/pci/devices/0000:f0:00.0").unlink()
    clock.t += 30
    src.read()
    assert src.walks == 2
    clock.t += 30
    fourth = src.read()
    assert src.walks == 3 and fourth.faults == []  # the broken function is gone with its fault


def test_source_unavailable_without_a_pci_bus(tmp_path):
    src = TopologySource(sysfs=str(tmp_path))
    with pytest.raises(SourceUnavailable, match="no PCI bus"):
        src.start()


def test_engine_passes_ready_gpus_to_the_model(tmp_path):
    lay = hgx_h100(tmp_path, redirect_switch=2)
    engine = Engine([TopologySource(sysfs=str(lay.sysfs))], TaxModel())
    try:
        engine.start_sources()
        frame = engine.collect()
        assert frame.status["topology"].up
        ready = {dict(k[1])["gpu"] for k in frame.gauges
                 if k[0] == BEST_NIC and dict(k[1])["gpudirect"] == "ready"}
        assert ready == {g.addr for g in lay.gpus if g.switch != "switch2"}
    finally:
        engine.close()


def test_topo_command_text_json_and_bad_root(tmp_path):
    lay = hgx_h100(tmp_path, redirect_switch=2)
    base = [*pcietax_cmd(), "topo", "--path.sysfs", str(lay.sysfs)]
    r = subprocess.run(base, env=pcietax_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "GPU0" in r.stdout and "NIC8" in r.stdout and "ECAP_ACS" in r.stdout
    r = subprocess.run([*base, "--format", "json"], env=pcietax_env(), capture_output=True, text=True,
                       timeout=60)
    doc = json.loads(r.stdout)
    assert len(doc["gpus"]) == 8 and len(doc["nics"]) == 9 and len(doc["pairs"]) == 72
    assert doc["best_nic"][SWITCH2_GPU]["reason"] == "acs"
    r = subprocess.run([*pcietax_cmd(), "topo", "--path.sysfs", str(tmp_path / "nowhere")],
                       env=pcietax_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--path.sysfs" in r.stderr and "Traceback" not in r.stderr


def test_exporter_serves_the_verdicts(tmp_path):
    lay = hgx_h100(tmp_path, redirect_switch=2)
    log = tmp_path / "serve.log"
    text, rc = serve_until(log, "--path.sysfs", str(lay.sysfs), "--path.procfs", str(lay.node.proc),
                           until=BEST_NIC)
    assert BEST_NIC in text, log.read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(fams[PATH_INFO].samples) == 72
    best = {s.labels["gpu"]: s.labels for s in fams[BEST_NIC].samples}
    assert best[SWITCH2_GPU]["gpudirect"] == "blocked"
    assert sum(lab["gpudirect"] == "ready" for lab in best.values()) == 6
    up = {s.labels["source"]: s.value for s in fams["pcietax_source_up"].samples}
    assert up["topology"] == 1
    assert rc == 0


def test_real_sysfs_of_this_machine():
    if not Path("/sys/bus/pci/devices").is_dir():
        pytest.skip("this machine has no PCI bus in /sys")
    topo = discover("/sys")
    assert set(topo.tree.devices) == set(os.listdir("/sys/bus/pci/devices"))
    # Every netdev whose device link resolves to a PCI network function is a NIC we name by it.
    expect = {}
    for iface in sorted(os.listdir("/sys/class/net")):
        link = f"/sys/class/net/{iface}/device"
        if not os.path.exists(link):
            continue
        real = Path(os.path.realpath(link))
        fn = next((p for p in (real, *real.parents) if (p / "class").exists() and (p / "config").exists()),
                  None)
        if fn and (fn / "class").read_text().startswith("0x02") and not (fn / "physfn").exists():
            expect.setdefault(fn.name, iface)
    assert {n.addr: n.name for n in topo.nics if n.addr in expect} == expect
    assert {n.addr for n in topo.nics} >= set(expect)
    r = subprocess.run([*pcietax_cmd(), "topo", "--format", "json"], env=pcietax_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["pairs"]) == len(doc["gpus"]) * len(doc["nics"])


def test_no_pci_bus_is_absent(tmp_path):
    with pytest.raises(SourceAbsent):
        TopologySource(sysfs=str(tmp_path)).start()


def test_class_net_directory_with_device_link_names_the_nic(tmp_path):
    """The prometheus/procfs fixture layout: sys/class/net/eth0 a directory holding a ``device``
    link. Topology names the NIC by it, through the same helper as the netdev source."""
    lay = hgx_h100(tmp_path)
    entry = lay.sysfs / "class/net/eth0"
    target = os.readlink(entry)
    entry.unlink()
    entry.mkdir()
    # The kernel's link points at .../<function>/net/eth0; the directory's device link at <function>.
    (entry / "device").symlink_to(os.path.join("..", target.split("/net/")[0]))
    assert (entry / "device").resolve(strict=True).is_dir()
    names = {d.addr: d.name for d in discover(lay.sysfs).nics}
    assert "eth0" in names.values()
