"""The sink's own renderer writes byte for byte what client_python writes, in both formats that
Prometheus negotiates, for a whole fixture node and for awkward label values and numbers."""

from __future__ import annotations

import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from helpers.gpunode import gpu_node
from pcietax.catalog import LabelSetMismatch
from pcietax.engine import Engine, Frame, SourceStatus
from pcietax.model import NIC, Inputs, TaxModel
from pcietax.sinks.prometheus import PcietaxRegistry, exposition
from pcietax.sources import SourceOptions, by_name
from pcietax.sources.base import labels_of

# What Prometheus 2.x sends: OpenMetrics first, then the text format.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _both(reg: PcietaxRegistry) -> None:
    assert reg.render(CONTENT_TYPE_PLAIN_0_0_4) == generate_latest(reg)
    assert reg.render(OPENMETRICS) == generate_openmetrics(reg)


def test_whole_node_identical(tmp_path):
    node = gpu_node(tmp_path, ncpu=8, irq_lines=200)
    opts = SourceOptions(sysfs=str(node.sys), procfs=str(node.proc))
    specs = by_name()
    names = ("netdev", "rdma", "procfs", "pcie", "topology")
    eng = Engine([specs[n].build(opts) for n in names], TaxModel())
    eng.start_sources()
    try:
        eng.collect()
        # Every series every fixture source emits has exactly its catalog label set (rendering
        # checks it and raises otherwise).
        reg = PcietaxRegistry(eng.frame, list(names))
        _both(reg)
        body = reg.render(CONTENT_TYPE_PLAIN_0_0_4).decode()
        assert body.count("pcietax_hardirq_total{") == 202  # 200 lines + ERR + MIS
    finally:
        eng.close()


def _awkward_frame() -> Frame:
    counters = {
        ("pcietax_hardirq_total", labels_of(irq="77", name='weird "quoted" \\ name\nnext')): 2.0**60,
        ("pcietax_hardirq_total", labels_of(irq="78", name="")): 0.0,
        ("pcietax_hardirq_total", labels_of(irq="79", name="ünïcode")): 1e-9,
        ("pcietax_nic_receive_bytes_total", labels_of(nic="eth0", pci_bus_id="")): 123456789012345678.0,
    }
    gauges = {
        ("pcietax_pcie_link_speed_gts", labels_of(pci_bus_id="0000:3b:00.0", device_kind="nic",
                                                  state="current")): float("nan"),
        ("pcietax_pcie_link_width", labels_of(pci_bus_id="0000:3b:00.0", device_kind="nic",
                                              state="current")): float("inf"),
        ("pcietax_tax_ratio", labels_of(direction="ingress")): -1.5,
    }
    model = TaxModel()
    model.update(Inputs(0, {("pcietax_nic_receive_bytes_total", labels_of(nic="a")): 1.0}, frozenset(NIC)))
    tax = model.update(Inputs(1, {("pcietax_nic_receive_bytes_total", labels_of(nic="a")): 9.0},
                              frozenset(NIC)))
    status = {"netdev": SourceStatus("netdev", True, "", 0.001234, 3, 1),
              "nvml": SourceStatus("nvml", False, "no GPU", 0.0, 0, 0)}
    return Frame(1.0, counters, gauges, status, tax)


def test_awkward_labels_and_numbers():
    frame = _awkward_frame()
    reg = PcietaxRegistry(lambda: frame, ["netdev", "nvml"])
    _both(reg)
    _both(reg)  # second render from the prefix cache
    text = reg.render(CONTENT_TYPE_PLAIN_0_0_4).decode()
    assert 'name="weird \\"quoted\\" \\\\ name\\nnext"' in text
    assert 'pcietax_nic_receive_bytes_total{nic="eth0",pci_bus_id=""} 1.2345678901234568e+17' in text


@pytest.mark.parametrize("accept", [
    PROMETHEUS_ACCEPT,
    "",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=underscores",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text",
])
def test_exposition_negotiates_and_renders_like_client_python(accept):
    frame = _awkward_frame()
    reg = PcietaxRegistry(lambda: frame, ["netdev", "nvml"])
    encoder, ctype = choose_encoder(accept)
    assert reg.render(ctype) is not None  # served by the fast path
    assert exposition(reg, accept) == (encoder(reg), ctype)


def test_other_formats_fall_back_to_client_python():
    frame = _awkward_frame()
    reg = PcietaxRegistry(lambda: frame, ["netdev", "nvml"])
    accept = "application/openmetrics-text;version=1.0.0;escaping=dots"
    encoder, ctype = choose_encoder(accept)
    assert reg.render(ctype) is None
    assert exposition(reg, accept) == (encoder(reg), ctype)


def test_cached_lines_follow_new_values():
    key = ("pcietax_hardirq_total", labels_of(irq="1", name="i8042"))
    frames = [Frame(0.0, {key: 5.0}, {}, {}, None), Frame(1.0, {key: 6.0}, {}, {}, None)]
    current = [frames[0]]
    reg = PcietaxRegistry(lambda: current[0], [])
    assert b'pcietax_hardirq_total{irq="1",name="i8042"} 5.0\n' in reg.render(CONTENT_TYPE_PLAIN_0_0_4)
    current[0] = frames[1]
    body = reg.render(CONTENT_TYPE_PLAIN_0_0_4)
    assert b'name="i8042"} 6.0\n' in body and b"5.0" not in body
    assert body == generate_latest(reg)


@pytest.mark.parametrize("v", [0.0, -0.0, 1.0, 3, 1234567.0, 12345678.0, 1.5e300, 2.0**53 + 2, 1e-9, -2.5,
                               -12345678.0, float("inf"), float("-inf"), float("nan"), 0.1 + 0.2])
def test_number_format_is_client_pythons(v):
    from prometheus_client.utils import floatToGoString

    from pcietax.sinks.prometheus import _go_float

    assert _go_float(v) == floatToGoString(v)


@pytest.mark.parametrize("labels", [
    labels_of(nic="eth0", pci_bus_id="0000:3b:00.0", extra="x"),  # a label the catalog lacks
    labels_of(nic="eth0"),  # a catalog label missing
])
def test_a_label_set_that_differs_from_the_catalog_fails_loudly(labels):
    """Issue 11: the sink used to drop labels the catalog does not list, which turns two series
    into duplicates without a trace. Now rendering fails, in both paths, so a test catches it."""
    frame = Frame(0.0, {("pcietax_nic_receive_bytes_total", labels): 1.0}, {}, {}, None)
    reg = PcietaxRegistry(lambda: frame, [])
    with pytest.raises(LabelSetMismatch, match="catalog"):
        reg.render(CONTENT_TYPE_PLAIN_0_0_4)
    with pytest.raises(LabelSetMismatch, match="catalog"):
        generate_latest(reg)


def test_a_direction_outside_the_catalog_fails_loudly():
    frame = Frame(0.0, {("pcietax_socket_copy_bytes_total", labels_of(direction="rx", process="x")): 1.0},
                  {}, {}, None)
    with pytest.raises(LabelSetMismatch, match="direction"):
        PcietaxRegistry(lambda: frame, []).render(CONTENT_TYPE_PLAIN_0_0_4)
