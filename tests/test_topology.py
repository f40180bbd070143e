"""Topology: path classes, ACS/IOMMU/BAR verdicts and the best NIC per GPU on fixture trees in the
real sysfs layout. Expected path classes come from the fixture's plain description of where each
device sits (helpers.topotree.expected_path: nvidia-smi's legend), not from the code under test."""

from __future__ import annotations

import struct

from helpers.topotree import (
    ACS_KERNEL,
    CR,
    DT,
    EC,
    RR,
    SV,
    TB,
    UF,
    cascade,
    config_space,
    expected_path,
    hgx_h100,
    no_gpu,
)
from pcietax.pcie_config import Config
from pcietax.topology import discover
from pcietax.topology.render import render_text, to_json


def _by_pair(topo):
    return {(p.gpu, p.nic_addr): p for p in topo.pairs}


# -- ACS parsing ------------------------------------------------------------------------------


def test_acs_bits_decode_in_register_order():
    for bit, name in ((SV, "SV"), (TB, "TB"), (RR, "RR"), (CR, "CR"), (UF, "UF"), (EC, "EC"), (DT, "DT")):
        acs = Config(config_space(0x1000, 0xC030, 0x060400, port_type=6, acs_ctrl=bit)).acs()
        assert acs.state == "present" and acs.offset == 0x148
        assert acs.enabled == (name,)
        assert acs.redirects == (name in ("RR", "CR"))


def test_acs_absent_when_no_capability_and_unknown_when_not_readable():
    full = config_space(0x1000, 0xC030, 0x060400, port_type=6, acs_ctrl=None)
    assert Config(full).acs().state == "absent"
    assert Config(full).acs().redirects is False
    short = config_space(0x1000, 0xC030, 0x060400, port_type=6, acs_ctrl=RR, size=64)
    acs = Config(short).acs()
    assert acs.state == "unknown" and acs.redirects is None and acs.enabled is None
    assert "64" in acs.why
    # 256 bytes: a kernel without extended config access; ACS lives past 0x100, so unknown.
    assert Config(full[:256]).acs().state == "unknown"
    assert Config(b"\xff" * 4096).acs().state == "unknown"  # device gone: all-ones


def test_acs_corrupt_extended_list_is_unknown_not_a_hang():
    b = bytearray(config_space(0x1000, 0xC030, 0x060400, port_type=6, acs_ctrl=None))
    struct.pack_into("<I", b, 0x100, 0x0001 | (2 << 16) | (0x100 << 20))  # AER pointing at itself
    acs = Config(bytes(b)).acs()
    assert acs.state == "unknown" and "corrupt" in acs.why
    struct.pack_into("<I", b, 0x100, 0x0001 | (2 << 16) | (0x40 << 20))  # next below 0x100
    assert Config(bytes(b)).acs().state == "unknown"


def test_port_type_read_from_pcie_capability():
    assert Config(config_space(0x1000, 0xC030, 0x060400, port_type=6)).port_type() == 6
    assert Config(config_space(0x1000, 0xC030, 0x060400, port_type=6, size=64)).port_type() is None


# -- the HGX H100-like node -------------------------------------------------------------------


def test_hgx_path_classes_match_the_layout(tmp_path):
    lay = hgx_h100(tmp_path)
    topo = discover(lay.sysfs)
    assert [g.addr for g in topo.gpus] == sorted(p.addr for p in lay.gpus)
    assert [n.addr for n in topo.nics] == sorted(p.addr for p in lay.nics)  # BMC VGA is not a GPU
    pairs = _by_pair(topo)
    assert len(pairs) == 8 * 9
    seen = set()
    for g in lay.gpus:
        for n in lay.nics:
            p = pairs[(g.addr, n.addr)]
            want = expected_path(g, n)
            seen.add(want)
            assert p.path == want, (g.addr, n.addr, p.detail)
            if want == "PIX":
                assert (p.gpudirect, p.reason) == ("ready", "none")
            else:
                assert (p.gpudirect, p.reason) == ("blocked", f"path_{want.lower()}")
    assert seen == {"PIX", "PHB", "NODE", "SYS"}


def test_hgx_nic_labels_prefer_netdev_then_rdma(tmp_path):
    lay = hgx_h100(tmp_path)
    topo = discover(lay.sysfs)
    assert {n.addr: n.name for n in topo.nics} == {p.addr: p.name for p in lay.nics}
    assert {p.name for p in lay.nics} >= {"eth0", "mlx5_0"}  # netdev wins over mlx5_8 on the extra NIC


def test_hgx_best_nic_is_behind_the_same_switch(tmp_path):
    lay = hgx_h100(tmp_path)
    topo = discover(lay.sysfs)
    places = {p.addr: p for p in lay.nics}
    for g in lay.gpus:
        best = topo.best[g.addr]
        assert best.gpudirect == "ready"
        assert places[best.nic_addr].switch == g.switch


def test_acs_redirect_on_one_switch_blocks_only_its_pairs(tmp_path):
    lay = hgx_h100(tmp_path, redirect_switch=2)
    topo = discover(lay.sysfs)
    pairs = _by_pair(topo)
    ports = set(lay.switch_ports["switch2"])
    for g in lay.gpus:
        for n in lay.nics:
            p = pairs[(g.addr, n.addr)]
            if expected_path(g, n) != "PIX":
                continue
            if g.switch == "switch2":
                assert (p.gpudirect, p.reason) == ("blocked", "acs")
                # exactly the two downstream ports between this GPU and this NIC
                assert len(p.acs_redirect) == 2 and set(p.acs_redirect) <= ports
            else:
                assert (p.gpudirect, p.reason) == ("ready", "none")
    tips = [t for t in to_json(topo)["advice"] if t["reason"] == "acs"]
    text = " ".join(t["text"] for t in tips)
    for port in ports:
        assert port in text
    assert "setpci" in text and "ECAP_ACS+0x6.w=0000" in text
    assert "iommu=pt" in text  # the switch's groups translate (DMA-FQ)
    # the root ports above the switch have RR/CR on too, but they are not between GPU and NIC
    assert lay.root_ports["pci0000:9a"] not in text


def test_no_acs_capability_means_nothing_redirects(tmp_path):
    lay = hgx_h100(tmp_path, acs=False)
    topo = discover(lay.sysfs)
    ready = [p for p in topo.pairs if p.path == "PIX"]
    assert ready and all(p.gpudirect == "ready" for p in ready)
    assert {b["acs"]["state"] for b in to_json(topo)["bridges"]} == {"absent"}


def test_short_unprivileged_config_is_unknown_never_off(tmp_path):
    lay = hgx_h100(tmp_path, config_size=64)
    topo = discover(lay.sysfs)
    pix = [p for p in topo.pairs if p.path == "PIX"]
    assert pix and all((p.gpudirect, p.reason) == ("blocked", "unknown_acs") for p in pix)
    assert not any(p.gpudirect == "ready" for p in topo.pairs)
    for b in to_json(topo)["bridges"]:
        assert b["acs"]["state"] == "unknown" and b["acs"]["enabled"] is None
    assert any("as root" in t["text"] for t in to_json(topo)["advice"])


def test_small_bar1_blocks_and_says_how_to_fix(tmp_path):
    lay = hgx_h100(tmp_path, bar1=256 << 20)
    topo = discover(lay.sysfs)
    pix = [p for p in topo.pairs if p.path == "PIX"]
    assert all((p.gpudirect, p.reason) == ("blocked", "small_bar") for p in pix)
    assert all(g.bar_bytes == 256 << 20 for g in topo.gpus)
    assert any("Resizable BAR" in t["text"] for t in to_json(topo)["advice"])


def test_iommu_groups_and_types_are_reported(tmp_path):
    lay = hgx_h100(tmp_path, redirect_switch=2)
    topo = discover(lay.sysfs)
    by = {g.addr: g for g in topo.gpus}
    for g in lay.gpus:
        assert by[g.addr].iommu_group is not None
        assert by[g.addr].iommu_type == ("DMA-FQ" if g.switch == "switch2" else "identity")
    # every function has its own group in this fixture: GPU and NIC never share one
    assert {p.same_iommu_group for p in topo.pairs} == {False}


def test_cascaded_switches_give_pxb_and_pxb_is_ready(tmp_path):
    lay = cascade(tmp_path)
    topo = discover(lay.sysfs)
    pairs = _by_pair(topo)
    kinds = set()
    for g in lay.gpus:
        for n in lay.nics:
            p = pairs[(g.addr, n.addr)]
            kinds.add(p.path)
            assert p.path == expected_path(g, n)
            assert p.gpudirect == "ready"
            if p.path == "PXB":
                assert len(p.via) == 6  # leaf DSP, leaf USP, top DSP on each side
    assert kinds == {"PIX", "PXB"}


def test_cascade_acs_redirect_on_the_top_switch_blocks_pxb_only(tmp_path):
    lay = cascade(tmp_path)
    # Turn redirect on at the top switch's downstream ports (0000:42:0x.0) by rewriting their config.
    for port in ("0000:42:00.0", "0000:42:01.0"):
        cfg = lay.sysfs / "bus/pci/devices" / port / "config"
        cfg.write_bytes(config_space(0x1000, 0xC030, 0x060400, port_type=6, acs_ctrl=ACS_KERNEL))
    topo = discover(lay.sysfs)
    for p in topo.pairs:
        if p.path == "PXB":
            assert (p.gpudirect, p.reason) == ("blocked", "acs")
        else:
            assert p.gpudirect == "ready"


def test_node_without_gpus_has_no_pairs(tmp_path):
    lay = no_gpu(tmp_path)
    topo = discover(lay.sysfs)
    assert topo.gpus == [] and topo.pairs == [] and topo.best == {}
    assert [n.name for n in topo.nics] == ["eno1", "eno2"]
    assert "No GPUs found" in render_text(topo)


def test_text_matrix_reads_like_nvidia_smi(tmp_path):
    lay = hgx_h100(tmp_path, redirect_switch=2)
    topo = discover(lay.sysfs)
    text = render_text(topo)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("NIC0"))
    assert lines[header].split()[:9] == [f"NIC{i}" for i in range(9)]
    rows = [lines[header + 1 + i].split() for i in range(8)]
    nics = [n.addr for n in topo.nics]
    places = {p.addr: p for p in (*lay.gpus, *lay.nics)}
    for i, g in enumerate(topo.gpus):
        assert rows[i][0] == f"GPU{i}"
        for j, cell in enumerate(rows[i][1:10]):
            want = expected_path(places[g.addr], places[nics[j]])
            blocked = want == "PIX" and places[g.addr].switch == "switch2"
            assert cell == want + ("*" if blocked else "")
    assert "BLOCKED (acs)" in text and "What to change" in text


def test_gpu_without_a_nic_behind_its_switch_is_told_to_move_one(tmp_path):
    lay = hgx_h100(tmp_path)
    # Switch 3 (socket 1) loses its NICs: they are not enumerated at all.
    gone = {p.addr for p in lay.nics if p.switch == "switch3"}
    for addr in gone:
        (lay.sysfs / "bus/pci/devices" / addr).unlink()
    topo = discover(lay.sysfs)
    nic_places = {p.addr: p for p in lay.nics}
    for g in lay.gpus:
        best = topo.best[g.addr]
        if g.switch == "switch3":
            # nearest is switch 2's NICs: another host bridge in the same socket
            assert (best.path, best.gpudirect, best.reason) == ("NODE", "blocked", "path_node")
            assert nic_places[best.nic_addr].switch == "switch2"
        else:
            assert best.gpudirect == "ready"
    tips = [t for t in to_json(topo)["advice"] if t["reason"] == "path_node"]
    assert {d for t in tips for d in t["devices"]} >= {g.addr for g in lay.gpus if g.switch == "switch3"}
    assert all("same switch" in t["text"] for t in tips)


def test_degraded_link_is_flagged_and_is_the_bottleneck(tmp_path):
    lay = hgx_h100(tmp_path)
    gpu = lay.gpus[0].addr
    (lay.sysfs / "bus/pci/devices" / gpu / "current_link_width").write_text("8\n")
    topo = discover(lay.sysfs)
    tips = [t for t in to_json(topo)["advice"] if t["reason"] == "link"]
    assert [t["devices"] for t in tips] == [[gpu]]
    assert "x8" in tips[0]["text"] and "x16" in tips[0]["text"]
    assert topo.best[gpu].bottleneck == "32 GT/s x8"
