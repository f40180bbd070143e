"""`pcietax serve` on this machine, which has no NVIDIA driver and no NVIDIA GPU: the nvml source is
down and absent with its reason, and everything else is still served."""

from __future__ import annotations

import ctypes

import pytest

from helpers.exporters import serve_until


def _has_libnvml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_has_libnvml(), reason="this host has libnvidia-ml.so: not the no-driver case")
def test_serve_without_nvidia_driver_serves_everything_else(tmp_path):
    log = tmp_path / "serve.log"
    # Absent shows only once the nvml start has finished (and failed): no race with its log line.
    body, rc = serve_until(log, "--collect.interval=200ms", until='pcietax_source_absent{source="nvml"} 1.0')
    lines = set(body.splitlines())
    assert 'pcietax_source_up{source="nvml"} 0.0' in lines
    assert 'pcietax_source_absent{source="nvml"} 1.0' in lines  # no GPU on this machine's PCI bus
    assert 'pcietax_source_up{source="procfs"} 1.0' in lines
    assert 'pcietax_hop_measured{hop="host_to_gpu"} 0.0' in lines
    assert any(x.startswith("pcietax_softirq_total{") for x in lines)  # another source's data
    assert not any(x.startswith("pcietax_gpu_") for x in lines)
    assert rc == 0
    assert "source nvml: down: NVML unavailable: NVML Shared Library Not Found" in log.read_text()
