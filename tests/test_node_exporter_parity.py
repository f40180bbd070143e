"""The RDMA, NIC and IRQ counters of ``pcietax serve`` match what the real
``prometheus-node-exporter`` (Debian's, v1.5) reports for the same fixture roots, value for value,
before and after every counter rose.

Mapping (node_exporter -> pcietax):
- node_infiniband_port_data_{received,transmitted}_bytes_total{device,port}
  -> pcietax_rdma_port_{receive,transmit}_bytes_total{device,port}
- node_network_{receive,transmit}_bytes_total{device} for a NIC without RDMA
  -> pcietax_nic_{receive,transmit}_bytes_total{nic}; a RoCE NIC is netdev + port bytes, an
  InfiniBand NIC port bytes only (counted once)
- sum over cpu of node_interrupts_total{type} -> pcietax_hardirq_total{irq}; node_exporter skips
  ERR and MIS (one number, no per-CPU columns), pcietax keeps them.
"""

from __future__ import annotations

import time

import pytest

from conftest import pcietax_cmd, pcietax_env
from helpers.exporters import (
    NODE_EXPORTER,
    free_port,
    node_exporter_argv,
    parse,
    running,
    scrape,
    select,
    serve_args,
)
from helpers.gpunode import gpu_node, nic_name

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(NODE_EXPORTER is None, reason="prometheus-node-exporter not installed"),
]

IB_RX, IB_TX = ("node_infiniband_port_data_received_bytes_total",
                "node_infiniband_port_data_transmitted_bytes_total")
NET_RX, NET_TX = "node_network_receive_bytes_total", "node_network_transmit_bytes_total"


def _compare(ne: dict, pt: dict) -> None:
    # RDMA ports: same set of ports, same bytes.
    for ne_name, pt_name in ((IB_RX, "pcietax_rdma_port_receive_bytes_total"),
                             (IB_TX, "pcietax_rdma_port_transmit_bytes_total")):
        a, b = select(ne, ne_name), select(pt, pt_name)
        assert a and a == b

    # IRQs: per-CPU series summed per line.
    per_line: dict[str, float] = {}
    for labels, v in select(ne, "node_interrupts_total").items():
        irq = dict(labels)["type"]
        per_line[irq] = per_line.get(irq, 0.0) + v
    ours = {dict(labels)["irq"]: v for labels, v in select(pt, "pcietax_hardirq_total").items()}
    assert set(ours) - set(per_line) == {"ERR", "MIS"}
    assert len(per_line) > 100
    assert per_line == {k: v for k, v in ours.items() if k not in ("ERR", "MIS")}

    # NICs: node_exporter's netdev and infiniband figures combined the way pcietax counts a NIC once.
    ports = {dict(lb)["device"]: v for lb, v in select(ne, IB_RX).items()}
    ports_tx = {dict(lb)["device"]: v for lb, v in select(ne, IB_TX).items()}
    net_rx = {dict(lb)["device"]: v for lb, v in select(ne, NET_RX).items()}
    net_tx = {dict(lb)["device"]: v for lb, v in select(ne, NET_TX).items()}
    nic_rx = {dict(lb)["nic"]: v for lb, v in select(pt, "pcietax_nic_receive_bytes_total").items()}
    nic_tx = {dict(lb)["nic"]: v for lb, v in select(pt, "pcietax_nic_transmit_bytes_total").items()}
    assert nic_rx["eno1"] == net_rx["eno1"] and nic_tx["eno1"] == net_tx["eno1"]  # no RDMA
    for sw in range(8):
        dev = f"mlx5_{sw}"
        iface = nic_name(sw)
        if sw < 6:  # InfiniBand: port bytes only
            assert (nic_rx[iface], nic_tx[iface]) == (ports[dev], ports_tx[dev])
        else:  # RoCE: netdev + port
            assert nic_rx[iface] == net_rx[iface] + ports[dev]
            assert nic_tx[iface] == net_tx[iface] + ports_tx[dev]
    # Virtual devices are in node_exporter's netdev (lo is excluded by its default) but are not
    # NICs for pcietax.
    assert {"docker0", "veth9f3a1c2"} <= set(net_rx) and not {"lo", "docker0", "veth9f3a1c2"} & set(nic_rx)
    assert len(nic_rx) == 9


def test_counters_match_node_exporter(tmp_path):
    # The exporters read through a symlink, so the later read switches trees atomically (a tree
    # rewritten in place has moments with a sysfs link missing, which is another test's subject).
    root = tmp_path / "node"
    (tmp_path / "a").mkdir()
    root.symlink_to("a")
    gpu_node(tmp_path / "a", ncpu=16, irq_lines=300)
    sysfs, procfs = root / "sys", root / "proc"
    ne_port, pt_port = free_port(), free_port()
    ne_argv = node_exporter_argv(sysfs, procfs, ne_port, ["infiniband", "interrupts", "netdev"])
    pt_argv = pcietax_cmd() + serve_args(sysfs, procfs, pt_port, ["--collect.interval=100ms"])
    with running(ne_argv, port=ne_port) as ne_url, \
            running(pt_argv, env=pcietax_env(), port=pt_port) as pt_url:
        first = parse(scrape(pt_url))
        _compare(parse(scrape(ne_url)), first)

        # Every counter rises (scale 2); pcietax re-reads on its own interval: poll until it has.
        gpu_node(tmp_path / "b", ncpu=16, irq_lines=300, scale=2)
        (tmp_path / "next").symlink_to("b")
        (tmp_path / "next").rename(root)
        ne = parse(scrape(ne_url))
        deadline = time.monotonic() + 30
        while True:
            pt = parse(scrape(pt_url))
            try:
                _compare(ne, pt)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        rx = "pcietax_rdma_port_receive_bytes_total"
        assert select(pt, rx) != select(first, rx)
        errors = select(pt, "pcietax_source_errors_total")
        assert errors and all(v == 0 for v in errors.values())
