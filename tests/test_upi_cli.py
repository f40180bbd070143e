"""`pcietax serve` with the upi source: down with its reason, everything else served, and
--path.sysfs/--path.procfs honoured (the real CLI in a subprocess, scraped over loopback)."""

from __future__ import annotations

import os

import pytest

from helpers.exporters import serve_until
from helpers.fakeuncore import FakeUncore


def _serve(tmp_path, *extra: str, until: str = 'pcietax_source_up{source="upi"}') -> tuple[str, str]:
    """Start serve, poll /metrics until ``until`` shows up, stop it; (metrics, log)."""
    log = tmp_path / "serve.log"
    body, _ = serve_until(log, *extra, until=until)
    return body, log.read_text()


def _host_has_uncore() -> bool:
    return any(n.startswith(("uncore_upi", "uncore_iio_free_running"))
               for n in os.listdir("/sys/bus/event_source/devices"))


@pytest.mark.skipif(_host_has_uncore(), reason="this host has uncore UPI/IIO PMUs (not a VM)")
def test_serve_on_this_vm_reports_upi_down_and_serves_the_rest(tmp_path):
    body, log = _serve(tmp_path)
    assert 'pcietax_source_up{source="upi"} 0.0' in body
    assert 'pcietax_source_up{source="procfs"} 1.0' in body
    assert 'pcietax_hop_measured{hop="upi"} 0.0' in body
    assert "pcietax_upi_bytes_total" not in body
    assert "source upi: down: " in log
    assert ("no uncore UPI or IIO PMUs" in log) or ("unsupported_cpu" in log)


def test_serve_honours_path_flags_and_refuses_amd(tmp_path):
    node = FakeUncore(tmp_path / "node")
    node.set_cpuinfo("AuthenticAMD", family=25, model=17, name="AMD EPYC 9654")
    body, log = _serve(tmp_path, f"--path.sysfs={node.sys}", f"--path.procfs={node.proc}")
    assert 'pcietax_source_up{source="upi"} 0.0' in body
    assert "source upi: down: unsupported_cpu: AuthenticAMD" in log


def test_no_source_flag_leaves_upi_out(tmp_path):
    body, _ = _serve(tmp_path, "--no-source.upi", until='pcietax_source_up{source="procfs"}')
    assert "pcietax_source_up" in body
    assert 'source="upi"' not in body
    assert ",upi" not in body.split("pcietax_build_info{", 1)[1].split("}", 1)[0]
