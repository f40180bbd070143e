"""The four pcietax dashboards (DESIGN.md section 5). Ratios are always sum of rates over sum of
rates, never an average of pcietax_tax_ratio; every selector is scoped with
``cluster=~"$cluster", node=~"$node"``, aggregations keep ``cluster`` so same-named nodes of two
clusters never merge, and rates use ``$__rate_interval``. The TTFT dashboard reads the recording
rules of alerts/pcietax.rules.yml: TTFT of every engine in alerts/engines.py, one series per engine."""

from __future__ import annotations

from alerts import rules as R
from alerts.engines import ENGINES
from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.models.dashboard import VariableOption

from .panels import (
    CORES_UNIT,
    DS,
    RATIO_UNIT,
    SCOPE,
    bars,
    base,
    missing_hops_override,
    q,
    st,
    tbl,
    ts,
    unstack,
)

RI = "$__rate_interval"
NIC_IRQ = 'name=~"$nic_irq"'
# Interrupt names of common NIC drivers' queues (mlx5_comp3@pci:..., ice-eth0-TxRx-3, virtio0-input.0).
NIC_IRQ_DEFAULT = ".*(mlx|ice|i40e|ixgbe|bnxt|ena|efa|virtio|eth|ens|enp|TxRx).*"
LINK_RX = "pcietax_(nic_receive|gpu_pcie_receive)_bytes_total"
LINK_TX = "pcietax_(nic_transmit|gpu_pcie_transmit)_bytes_total"
TAX_STEPS = ((None, "green"), (1.5, "yellow"), (2.5, "red"))
SEL = f"{{{SCOPE}}}"

# What every panel that shows the ratio says (DESIGN.md section 1: absent hops, scoped useful bytes).
RATIO_SCOPE = ("RDMA (verbs) payload is counted node-wide; socket payload is scoped to the target "
               "processes.")
RATIO_PARTIAL = ("The ratio is partial where a hop has no working source (pcietax_hop_measured = 0): "
                 "\"hops missing\" beside it counts them, and 0 means every hop is in the ratio.")


def _by(labels: str) -> str:
    """Aggregation labels: `cluster` goes wherever `node` does (absent labels cost nothing)."""
    return f"cluster, {labels}" if labels.split(",")[0].strip() == "node" else labels


def _rate(metric: str, by: str, extra: str = "") -> str:
    sel = f"{{{SCOPE}{', ' + extra if extra else ''}}}"
    return f"sum by ({_by(by)}) (rate({metric}{sel}[{RI}]))"


def _ratio(by: str) -> str:
    return (f"{_rate('pcietax_moved_bytes_total', by)}\n/\n"
            f"({_rate('pcietax_useful_bytes_total', by)} > 0)")


def _hops_missing() -> str:
    # 0 where every hop is measured (count() of nothing is no series, so add the zero explicitly).
    return (f"count by (cluster, node) (pcietax_hop_measured{SEL} == 0)\n"
            f"or\n0 * count by (cluster, node) (pcietax_hop_measured{SEL})")


def overview() -> dashboard.Dashboard:
    return (
        base("pcietax / PCIe tax overview", "pcietax-overview",
             "Bytes moved by every hop of the data path per useful byte, per node and direction.")
        .with_row(dashboard.Row("Tax"))
        .with_panel(missing_hops_override(st(
            "Tax ratio", RATIO_UNIT, q(_ratio("node, direction"), "{{node}} {{direction}}", "A"),
            q(_hops_missing(), "{{node}} hops missing", "B"),
            desc="Bytes moved by all measured hops per useful byte (1.0 = direct path; a TCP receive into a "
                 f"pageable buffer then cudaMemcpy is about 4). {RATIO_PARTIAL} {RATIO_SCOPE}",
            w=8, steps=TAX_STEPS), "B"))
        .with_panel(st(
            "Hops measured or missing", "none",
            q(f"max by (cluster, node, hop) (pcietax_hop_measured{SEL})", "{{node}} {{hop}}"),
            desc="A hop without a working source is absent from the ratio, not zero.",
            w=8, steps=((None, "red"), (1, "green")),
            mapping={"1": ("measured", "green"), "0": ("missing", "red")}))
        .with_panel(bars(
            "Nodes ranked by tax", RATIO_UNIT,
            q(f"sort_desc(\n{_ratio('node')}\n)", "{{node}}", instant=True),
            desc=f"Both directions together, highest first. {RATIO_PARTIAL} (Tax ratio panel) {RATIO_SCOPE}",
            w=8, h=6, steps=TAX_STEPS))
        .with_row(dashboard.Row("Bytes per hop"))
        .with_panel(unstack(ts(
            "Useful vs moved bytes per hop", "Bps",
            q(_rate("pcietax_moved_bytes_total", "hop"), "moved: {{hop}}", "A"),
            q(_rate("pcietax_useful_bytes_total", "direction"), "useful: {{direction}}", "B"),
            desc="Moved bytes stacked by hop; the thick lines are useful payload. The stack over the line "
                 f"is the tax. A hop without a working source is not drawn, not zero. {RATIO_SCOPE}",
            w=24, stacked=True), "B"))
        .with_row(dashboard.Row("Links"))
        .with_panel(ts(
            "Ceiling vs achieved per link", "Bps",
            q(f"max by (cluster, node, pci_bus_id) (pcietax_pcie_link_ceiling_bytes_per_second{SEL})",
              "ceiling {{pci_bus_id}}", "A"),
            # One query per direction: rate() drops the metric name, so receive and transmit of one
            # device in a single name-regex selector would collide on the same label set.
            q(f"max by (cluster, node, pci_bus_id) (rate({{__name__=~\"{LINK_RX}\", {SCOPE}}}[{RI}]))",
              "receive {{pci_bus_id}}", "B"),
            q(f"max by (cluster, node, pci_bus_id) (rate({{__name__=~\"{LINK_TX}\", {SCOPE}}}[{RI}]))",
              "transmit {{pci_bus_id}}", "C"),
            desc="Usable unidirectional ceiling of each negotiated link (pcietax calc) against its "
                 "traffic in each direction.", w=24))
    )


def staging() -> dashboard.Dashboard:
    return (
        base("pcietax / Host staging", "pcietax-staging",
             "CPU and memory work the host does to stage network data for the GPUs.")
        .with_panel(ts(
            "Staging CPU by kind", CORES_UNIT,
            q(_rate("pcietax_staging_cpu_seconds_total", "node, kind"), "{{node}} {{kind}}"),
            desc="NIC hardirqs and NET_RX/NET_TX softirqs (eBPF); irq_coarse/softirq_coarse cover all IRQ "
                 "and softirq time from /proc/stat where eBPF is not running.", w=12, stacked=True))
        .with_panel(ts(
            "IRQ and softirq CPU per CPU", CORES_UNIT,
            q(f'sum by (cluster, node, cpu) (rate(node_cpu_seconds_total{{{SCOPE}, mode=~"irq|softirq"}}'
              f'[{RI}]))', "{{node}} cpu{{cpu}}"),
            desc="From node_exporter (node_cpu_seconds_total): one hot CPU means the NIC's queues are "
                 "steered to it.", w=12))
        .with_panel(ts(
            "Socket copies per process", "Bps",
            q(f"topk(10, {_rate('pcietax_socket_copy_bytes_total', 'node, process, direction')})",
              "{{node}} {{process}} {{direction}}"),
            desc="Payload copied between kernel and user space (hop kernel_copy).", w=12))
        .with_panel(ts(
            "CUDA copies per process (pinned vs pageable)", "Bps",
            q(_rate("pcietax_cuda_copy_bytes_total", "node, process, kind, memory"),
              "{{node}} {{process}} {{kind}} {{memory}}"),
            desc="Host<->device copies seen by uprobes; pageable copies cost the driver's bounce copy "
                 "(hop user_copy) on top of the DMA.", w=12))
        .with_panel(ts(
            "UPI bytes per link", "Bps",
            q(_rate("pcietax_upi_bytes_total", "node, socket, link, direction"),
              "{{node}} socket{{socket}} link{{link}} {{direction}}"),
            desc="Data crossing the CPU socket interconnect (uncore UPI PMUs).", w=12))
        .with_panel(ts(
            "IRQ rate per NIC queue", "ops",
            q(f"topk(20, {_rate('pcietax_hardirq_total', 'node, irq, name', NIC_IRQ)})",
              "{{node}} {{irq}} {{name}}"),
            desc="Hard interrupts per second of the IRQ lines whose name matches $nic_irq.", w=12))
        .with_variable(
            dashboard.TextBoxVariable("nic_irq").label("NIC IRQ names (regex)")
            .default_value(NIC_IRQ_DEFAULT)
            .current(VariableOption(text=NIC_IRQ_DEFAULT, value=NIC_IRQ_DEFAULT, selected=True)))
    )


def ttft() -> dashboard.Dashboard:
    alerts = "|".join(("PcieTaxRatioHigh", "PcieTaxTTFTStagingSpike", "PcieTaxTTFTSpikeNotStaging"))
    # Pearson correlation over the dashboard's range; subqueries so either side may be an expression.
    # TTFT has one series per engine of a node, staging and the ratio one per node: group_left.
    on = "on (cluster, node) group_left"
    corr = (
        f"(\n  avg_over_time(({{a}} * {on} {{b}})[$__range:])\n"
        f"  - avg_over_time(({{a}})[$__range:]) * {on} avg_over_time(({{b}})[$__range:])\n)\n"
        f"/\n(stddev_over_time(({{a}})[$__range:]) * {on} stddev_over_time(({{b}})[$__range:]))"
    )
    ratio_node = f"max by (cluster, node) ({R.RATIO}{SEL})"
    engines = ", ".join(e.title for e in ENGINES)
    return (
        base("pcietax / TTFT vs staging", "pcietax-ttft",
             "Time to first token beside staging CPU and the tax ratio, with the pcietax alerts.")
        .annotation(
            dashboard.AnnotationQuery().name("pcietax alerts").datasource(DS).enable(True)
            .icon_color("red").expr(f'ALERTS{{alertstate="firing", alertname=~"{alerts}", {SCOPE}}}')
            .title_format("{{alertname}}").text_format("{{node}} {{engine}} {{direction}}")
            .tag_keys("alertname,node").step("15s"))
        .with_panel(ts(
            "TTFT p50 / p99", "s",
            q(f"{R.TTFT_P50}{SEL}", "p50 {{node}} {{engine}}", "A"),
            q(f"{R.TTFT_P99}{SEL}", "p99 {{node}} {{engine}}", "B"),
            desc=f"One series per engine and node, normalised by the recording rules from: {engines}. "
                 "tgi_proxy is not a TTFT histogram (TGI has none) but the sum of its validation, queue and "
                 "prefill-batch quantiles; docs/engines.md gives its error.", w=24))
        .with_panel(ts(
            "Staging CPU", CORES_UNIT, q(f"{R.STAGING}{SEL}", "{{node}}"),
            desc="NIC hardirq + NET_RX/NET_TX softirq time (eBPF), else all IRQ/softirq time.", w=12))
        .with_panel(missing_hops_override(ts(
            "Tax ratio", RATIO_UNIT, q(f"{R.RATIO}{SEL}", "{{node}} {{direction}}", "A"),
            q(_hops_missing(), "{{node}} hops missing", "B"),
            desc=f"Sum of moved-byte rates over sum of useful-byte rates. {RATIO_PARTIAL} {RATIO_SCOPE}",
            w=12), "B"))
        .with_panel(st(
            "Correlation over the window", "none",
            q(corr.format(a=f"{R.TTFT_P99}{SEL}", b=f"{R.STAGING}{SEL}"), "TTFT~staging {{node}} {{engine}}",
              "A", instant=True),
            q(corr.format(a=f"{R.TTFT_P99}{SEL}", b=ratio_node), "TTFT~tax {{node}} {{engine}}", "B",
              instant=True),
            desc="Pearson correlation of p99 TTFT with staging CPU and with the tax ratio over the "
                 "dashboard's time range: near 1 means TTFT moves with host staging. The ratio can be "
                 f"partial (see Tax ratio). {RATIO_SCOPE}",
            w=24, steps=((None, "green"), (0.5, "yellow"), (0.8, "red")), lo=-1, hi=1))
    )


def topology() -> dashboard.Dashboard:
    return (
        base("pcietax / Topology and links", "pcietax-topology",
             "GPU-NIC paths, PCIe link state and health, and what pcietax itself costs.")
        .with_panel(tbl(
            "GPU-NIC path matrix", "none",
            q(f"max by (cluster, node, gpu, nic, path, gpudirect, reason) (pcietax_gpu_nic_path_info{SEL})",
              instant=True, table_format=True),
            desc="Path class (PIX/PXB good ... SYS across sockets) and the GPUDirect verdict per pair.",
            w=24))
        .with_panel(tbl(
            "Link speed vs max", "suffix: GT/s",
            q(f"max by (cluster, node, pci_bus_id, device_kind, state) (pcietax_pcie_link_speed_gts{SEL})",
              instant=True, table_format=True), w=12))
        .with_panel(tbl(
            "Link width vs max", "suffix: lanes",
            q(f"max by (cluster, node, pci_bus_id, device_kind, state) (pcietax_pcie_link_width{SEL})",
              instant=True, table_format=True), w=12))
        .with_panel(ts(
            "Replay and correctable-error rate", "ops",
            q(_rate("pcietax_pcie_replay_total", "node, pci_bus_id"), "replay {{pci_bus_id}}", "A"),
            q(_rate("pcietax_pcie_correctable_errors_total", "node, pci_bus_id"),
              "correctable {{pci_bus_id}}", "B"), w=12))
        .with_panel(st(
            "Sources up", "none",
            q(f"max by (cluster, node, source) (pcietax_source_up{SEL})", "{{node}} {{source}}"),
            w=8, steps=((None, "red"), (1, "green")), mapping={"1": ("up", "green"), "0": ("down", "red")}))
        .with_panel(st(
            "Collection", "none",
            q(f"max by (cluster, node) (pcietax_collect_resting{SEL})", "{{node}}"),
            desc="At rest (payload below the ratio's threshold) the exporter reads its sources every "
                 "--collect.rest-interval (15 s) instead of every second: host series step at that "
                 "interval until traffic wakes it.",
            w=4, steps=((None, "green"), (1, "blue")),
            mapping={"0": ("1 Hz", "green"), "1": ("at rest", "blue")}))
        .with_panel(ts(
            "Probe hits", "ops", q(_rate("pcietax_probe_hits_total", "node, probe"), "{{node}} {{probe}}"),
            desc="Events traced by the exporter's eBPF probes.", w=8))
        .with_panel(ts(
            "Probe overhead", CORES_UNIT,
            q(_rate("pcietax_probe_overhead_seconds_total", "node, probe"), "{{node}} {{probe}}"),
            desc="CPU time the probes cost the traced processes (the exporter's own tax).", w=8))
        .with_panel(ts(
            "Source read time", "s",
            q(f"max by (cluster, node, source) (pcietax_collect_duration_seconds{SEL})",
              "{{node}} {{source}}"),
            desc="Time each source took in the last background collection cycle.", w=8))
    )


DASHBOARDS = {
    "pcietax-overview.json": overview,
    "pcietax-staging.json": staging,
    "pcietax-ttft.json": ttft,
    "pcietax-topology.json": topology,
}
