"""`pcietax serve` on this machine, which has no NVIDIA driver: the nvml source is down with its
reason and everything else is still served."""

from __future__ import annotations

import ctypes
import subprocess
import time
import urllib.request

import pytest

from conftest import free_port, pcietax_cmd, pcietax_env


def _has_libnvml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(_has_libnvml(), reason="this host has libnvidia-ml.so: not the no-driver case")
def test_serve_without_nvidia_driver_serves_everything_else():
    port = free_port()
    proc = subprocess.Popen(
        [*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}", "--collect.interval=200ms"],
        env=pcietax_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    body = r.read().decode()
                if 'pcietax_source_up{source="procfs"}' in body:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        lines = set(body.splitlines())
        assert 'pcietax_source_up{source="nvml"} 0.0' in lines
        assert 'pcietax_source_up{source="procfs"} 1.0' in lines
        assert 'pcietax_hop_measured{hop="host_to_gpu"} 0.0' in lines
        assert any(x.startswith("pcietax_softirq_total{") for x in lines)  # another source's data
        assert not any(x.startswith("pcietax_gpu_") for x in lines)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "source nvml: down: NVML unavailable: NVML Shared Library Not Found" in out
