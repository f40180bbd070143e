"""Bad input through the whole exporter: `pcietax serve` on a fixture node with a garbage
/proc/interrupts line and an unreadable RDMA port counter keeps serving every other series, counts
each fault in pcietax_source_errors_total on every cycle, keeps the sources up, and logs each fault
once (not once per cycle)."""

from __future__ import annotations

import subprocess
import time

import pytest

from conftest import pcietax_cmd, pcietax_env
from helpers.exporters import free_port, parse, scrape, select, serve_args, wait_ready
from helpers.gpunode import gpu_node


@pytest.mark.e2e
def test_faults_counted_logged_once_rest_flows(tmp_path):
    node = gpu_node(tmp_path / "node", ncpu=4, irq_lines=40)
    with open(node.proc / "interrupts", "a") as f:
        f.write("IPI:  12  13\n")  # a named line cut after two of four CPUs
    node.make_directory_in_place("sys/class/infiniband/mlx5_7/ports/1/counters/port_xmit_data")
    port = free_port()
    argv = pcietax_cmd() + serve_args(node.sys, node.proc, port, ["--collect.interval=50ms"])
    proc = subprocess.Popen(argv, env=pcietax_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_ready(url, proc)
        deadline = time.monotonic() + 30
        while True:
            m = parse(scrape(url))
            errors = {dict(lb)["source"]: v for lb, v in select(m, "pcietax_source_errors_total").items()}
            if errors["procfs"] >= 5 and errors["rdma"] >= 5:
                break
            assert time.monotonic() < deadline, f"faults not counted: {errors}"
            time.sleep(0.1)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    up = {dict(lb)["source"]: v for lb, v in select(m, "pcietax_source_up").items()}
    # upi is down: the fixture node has no uncore PMUs, as in a VM.
    assert up == {"netdev": 1.0, "rdma": 1.0, "procfs": 1.0, "pcie": 1.0, "topology": 1.0, "upi": 0.0}
    # The affected series are skipped; everything else flows.
    irqs = {dict(lb)["irq"] for lb in select(m, "pcietax_hardirq_total")}
    assert "IPI" not in irqs and {"LOC", "NMI", "ERR", "0", "24"} <= irqs
    tx = {dict(lb)["device"] for lb in select(m, "pcietax_rdma_port_transmit_bytes_total")}
    rx = {dict(lb)["device"] for lb in select(m, "pcietax_rdma_port_receive_bytes_total")}
    assert "mlx5_7" not in tx and "mlx5_7" in rx and len(tx) == 7
    # The RoCE NIC behind mlx5_7 was never counted whole: skipped, not reported with netdev bytes only.
    nics = {dict(lb)["nic"] for lb in select(m, "pcietax_nic_transmit_bytes_total")}
    assert "ens7f0np0" not in nics and len(nics) == 8
    # One log line per fault and source, although it happened on every cycle.
    lines = stderr.splitlines()
    loc = [ln for ln in lines if "source procfs: truncated line" in ln]
    assert len(loc) == 1 and "interrupts:" in loc[0]
    port_lines = [ln for ln in lines if "mlx5_7/ports/1/counters/port_xmit_data" in ln]
    assert len(port_lines) == 2  # one from the rdma source, one from the netdev source
    assert sorted("source rdma" in ln for ln in port_lines) == [False, True]
    assert sorted("source netdev" in ln for ln in port_lines) == [False, True]
    assert "Traceback" not in stderr
