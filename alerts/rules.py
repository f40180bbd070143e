"""The recording and alerting rules, as data. ``render(RuleConfig())`` is exactly what
``alerts/pcietax.rules.yml`` holds; tests build the same rules with short ``for:`` values and
windows through the same code, never from a hand-edited copy.

Conventions (monitoring mixins): recording rules are named ``level:metric:operations``; every
alert carries ``severity``, ``summary``, ``description`` and ``runbook_url``. Ratios are always
sum-of-rates over sum-of-rates (DESIGN.md section 1), never an average of ``pcietax_tax_ratio``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from .engines import BY_NAME, ENGINES, TGI_PREFILL_SELECTOR

_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")

RUNBOOK = "https://github.com/pcietax/pcietax/blob/main/docs/runbook.md"

# TTFT histograms of the inference servers (alerts/engines.py: names, units, buckets, upstream
# sources). Each engine keeps its own normalised series, labelled `engine`: their bucket layouts
# differ, so they are never merged into one histogram, and a node running two engines keeps both.
SECONDS_ENGINES = tuple(e for e in ENGINES if e.unit == "seconds" and not e.proxy)
MILLISECONDS_ENGINES = tuple(e for e in ENGINES if e.unit == "milliseconds")
TGI = BY_NAME["tgi_proxy"]

# eBPF staging kinds are exact (NIC hardirqs, NET_RX/NET_TX softirqs); the /proc/stat kinds cover
# every IRQ and softirq of the node and are used only where eBPF is not running.
STAGING_EBPF = "hardirq|softirq_net_rx|softirq_net_tx"
STAGING_COARSE = "irq_coarse|softirq_coarse"
STAGING_CPU = "pcietax_staging_cpu_seconds_total"


@dataclass(frozen=True)
class RuleConfig:
    node_label: str = "node"  # the label that ties the exporter to the inference servers of a node
    exporter_job: str = "pcietax"  # the scrape job of the exporter (for its own target-down alert)
    ratio_high: float = 2.5  # moved bytes per useful byte
    useful_min_bytes_per_second: float = 1e6  # below this a node is idle: no ratio alert
    staging_high_cores: float = 0.5  # staging CPU seconds per second (cores)
    ttft_floor_seconds: float = 0.5  # a p99 TTFT below this is never a spike
    ttft_spike_factor: float = 2.0  # p99 above this multiple of its own baseline is a spike
    ttft_baseline: str = "1h"  # window of the TTFT baseline
    gpu_busy_bytes_per_second: float = 1e8  # idle GPUs drop link speed on purpose: judge speed when busy
    for_ratio: str = "10m"
    for_ttft: str = "5m"
    for_link: str = "10m"
    for_gpudirect: str = "15m"
    for_source_down: str = "10m"
    # A source that was up within this window and now says absent (the exporter restarted after the
    # node lost the hardware) is a failure: it still pages, for this long.
    source_lost_window: str = "1h"
    runbook: str = RUNBOOK
    # Labels kept beside node_label in every aggregation and join. A central ruler (Thanos, Mimir,
    # a federating Prometheus) sees every cluster's series, where node names can repeat; grouping
    # by `cluster` too keeps them apart. Where the label is absent, grouping by it changes nothing.
    keep_labels: tuple[str, ...] = ("cluster",)

    def __post_init__(self) -> None:
        for label in (self.node_label, *self.keep_labels):
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"label {label!r} is not a Prometheus label name")
        if self.node_label in self.keep_labels or len(set(self.keep_labels)) != len(self.keep_labels):
            raise ValueError(f"keep_labels {self.keep_labels!r} repeat a label or the node label")
        for name in ("ttft_baseline", "for_ratio", "for_ttft", "for_link", "for_gpudirect",
                     "for_source_down", "source_lost_window"):
            value = getattr(self, name)
            if not _DURATION.fullmatch(value):
                raise ValueError(f"{name} {value!r} is not a Prometheus duration (e.g. 30s, 10m, 1h)")
        for name in ("ratio_high", "staging_high_cores", "ttft_floor_seconds", "ttft_spike_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


    @property
    def group(self) -> str:
        """The labels of one node, for ``by (...)`` and ``on (...)``: e.g. ``cluster, node``."""
        return ", ".join((*self.keep_labels, self.node_label))

    def selector(self, *more: str) -> tuple[str, str]:
        """A Go-template query selector for this alert's node (plus ``more`` labels of the alert):
        (``cluster=%q,node=%q``, ``$labels.cluster $labels.node``). An absent label prints as "",
        and ``cluster=""`` matches the series that have none."""
        labels = (*self.keep_labels, self.node_label, *more)
        return ",".join(f"{x}=%q" for x in labels), " ".join(f"$labels.{x}" for x in labels)


# --- names of the recorded series (fixed; dashboards and docs refer to them) -------------------

USEFUL = "node_direction:pcietax_useful_bytes:rate1m"
MOVED = "node_direction:pcietax_moved_bytes:rate1m"
MOVED_HOP = "node_hop_direction:pcietax_moved_bytes:rate1m"
RATIO = "node_direction:pcietax_tax_ratio:rate1m"
HOPS_MISSING = "node:pcietax_hops_missing:count"
STAGING = "node:pcietax_staging_cpu_seconds:rate1m"
TTFT_BUCKETS = "node_le:pcietax_ttft_seconds_bucket:rate1m"
TTFT_MS_BUCKETS = "node_le:pcietax_ttft_milliseconds_bucket:rate1m"
TTFT_TGI_BUCKETS = "node_le:pcietax_tgi_ttft_part_seconds_bucket:rate1m"
TTFT_P50 = "node:pcietax_ttft_seconds:p50_rate1m"
TTFT_P99 = "node:pcietax_ttft_seconds:p99_rate1m"


def ttft_baseline_name(cfg: RuleConfig) -> str:
    return f"node:pcietax_ttft_seconds:p99_rate1m_avg{cfg.ttft_baseline}"


def _num(x: float) -> str:
    """A threshold as PromQL text: 2.5, 1e+06 -> 1000000, never a float repr surprise."""
    return f"{x:g}" if abs(x) < 1e6 else str(int(x)) if float(x).is_integer() else repr(x)


def recording_rules(cfg: RuleConfig) -> list[dict[str, Any]]:
    n = cfg.group

    def bucket_rate(family: str, engine: str, selector: str = "", part: str = "") -> str:
        sel = f"{{{selector}}}" if selector else ""
        labels = [("engine", engine)] + ([("part", part)] if part else [])
        return ("label_replace(" * len(labels) + f"\n  sum by ({n}, le) (rate({family}_bucket{sel}[1m]))"
                + "".join(f',\n  "{k}", "{v}", "", "")' for k, v in labels))

    tgi_parts = (("validation", TGI.proxy[0], ""), ("queue", TGI.proxy[1], ""),
                 ("prefill", TGI.proxy[2], TGI_PREFILL_SELECTOR))

    def quantile(q: str) -> str:
        # histogram_quantile gives NaN for a window without requests; ">= 0" drops those points so an
        # idle minute does not poison the baseline average. TGI has no TTFT histogram: its proxy is
        # the sum of the quantiles of validation, queue and prefill-batch time, and only where all
        # three parts have data (docs/engines.md gives the error of that proxy).
        tgi = f"histogram_quantile({q}, {TTFT_TGI_BUCKETS}) >= 0"
        return (
            f"(histogram_quantile({q}, {TTFT_BUCKETS}) >= 0)\n"
            f"or\n(histogram_quantile({q}, {TTFT_MS_BUCKETS}) / 1000 >= 0)\n"
            f"or\n(\n  sum by ({n}, engine) ({tgi})\n"
            f"  and on ({n}, engine)\n  count by ({n}, engine) ({tgi}) == {len(tgi_parts)}\n)"
        )

    return [
        {"record": USEFUL,
         "expr": f"sum by ({n}, direction) (rate(pcietax_useful_bytes_total[1m]))"},
        {"record": MOVED,
         "expr": f"sum by ({n}, direction) (rate(pcietax_moved_bytes_total[1m]))"},
        {"record": MOVED_HOP,
         "expr": f"sum by ({n}, hop, direction) (rate(pcietax_moved_bytes_total[1m]))"},
        # Sum of rates over sum of rates; undefined (absent) while no useful byte moves.
        {"record": RATIO, "expr": f"{MOVED}\n/\n({USEFUL} > 0)"},
        {"record": HOPS_MISSING, "expr": f"count by ({n}) (pcietax_hop_measured == 0)"},
        # eBPF kinds where the node has them, else the coarse /proc/stat figure (never both: the
        # coarse kinds include the eBPF ones).
        {"record": STAGING,
         "expr": (f'sum by ({n}) (rate({STAGING_CPU}{{kind=~"{STAGING_EBPF}"}}[1m]))\n'
                  f'or\nsum by ({n}) (rate({STAGING_CPU}{{kind=~"{STAGING_COARSE}"}}[1m]))')},
        # One series per engine and node (label `engine`); distinct labels, so `or` keeps them all.
        {"record": TTFT_BUCKETS,
         "expr": "\nor\n".join(bucket_rate(e.family, e.name) for e in SECONDS_ENGINES)},
        {"record": TTFT_MS_BUCKETS,
         "expr": "\nor\n".join(bucket_rate(e.family, e.name) for e in MILLISECONDS_ENGINES)},
        {"record": TTFT_TGI_BUCKETS,
         "expr": "\nor\n".join(bucket_rate(f, TGI.name, sel, part=part) for part, f, sel in tgi_parts)},
        {"record": TTFT_P50, "expr": quantile("0.5")},
        {"record": TTFT_P99, "expr": quantile("0.99")},
        {"record": ttft_baseline_name(cfg),
         "expr": f"avg_over_time({TTFT_P99}[{cfg.ttft_baseline}])"},
    ]


def _ttft_spike(cfg: RuleConfig) -> str:
    return (
        f"(\n  {TTFT_P99} > {_num(cfg.ttft_floor_seconds)}\n"
        f"  and\n  {TTFT_P99} > {_num(cfg.ttft_spike_factor)} * {ttft_baseline_name(cfg)}\n)"
    )


def _staging_high(cfg: RuleConfig) -> str:
    n = cfg.group
    return (
        f"(\n  {STAGING} > {_num(cfg.staging_high_cores)}\n"
        f"  and on ({n})\n  max by ({n}) ({RATIO}) > {_num(cfg.ratio_high)}\n)"
    )


def _q(cfg: RuleConfig, metric: str, fmt: str = "%.2f", agg: str = "") -> str:
    """A template that prints the node's current value of a recorded series (Go template);
    ``agg`` wraps the selector (e.g. ``max``) where the series has more labels than the node."""
    labels, args = cfg.selector()
    sel = f"{metric}{{{labels}}}"
    if agg:
        sel = f"{agg}({sel})"
    return (f'{{{{ with printf "{sel}" {args} | query }}}}'
            f'{{{{ . | first | value | printf "{fmt}" }}}}{{{{ else }}}}n/a{{{{ end }}}}')


def alert_rules(cfg: RuleConfig) -> list[dict[str, Any]]:
    n = cfg.group
    node = f"{{{{ $labels.{cfg.node_label} }}}}"
    rb = cfg.runbook

    def alert(name: str, expr: str, for_: str | None, severity: str, summary: str, description: str,
              ) -> dict[str, Any]:
        rule: dict[str, Any] = {"alert": name, "expr": expr}
        if for_ and for_ != "0s":
            rule["for"] = for_
        rule["labels"] = {"severity": severity}
        rule["annotations"] = {
            "summary": summary,
            "description": description,
            "runbook_url": f"{rb}#{name.lower()}",
        }
        return rule

    ratio_high = alert(
        "PcieTaxRatioHigh",
        f"{RATIO} > {_num(cfg.ratio_high)}\n"
        f"and on ({n}, direction)\n{USEFUL} > {_num(cfg.useful_min_bytes_per_second)}",
        cfg.for_ratio, "warning",
        f"PCIe tax {{{{ $value | printf \"%.2f\" }}}} on {node} ({{{{ $labels.direction }}}})",
        f"Node {node} moves {{{{ $value | printf \"%.2f\" }}}} bytes over PCIe and memory for every useful "
        f"{{{{ $labels.direction }}}} byte (threshold {_num(cfg.ratio_high)}; 1.0 is a direct path). "
        f"The data path is host-staged: check GPUDirect and pinned buffers. Hops the node cannot measure "
        f"({_q(cfg, HOPS_MISSING, '%.0f')} missing) are not in the ratio.",
    )
    ratio_high["annotations"]["ratio"] = "{{ $value | printf \"%.2f\" }}"

    spike = _ttft_spike(cfg)
    staging_high = _staging_high(cfg)
    engine = "{{ $labels.engine }}"
    # the baseline of the same engine on the same node (a node may run two engines)
    labels, args = cfg.selector("engine")
    sel = f"{ttft_baseline_name(cfg)}{{{labels}}}"
    baseline = (f'{{{{ with printf "{sel}" {args} | query }}}}'
                f'{{{{ . | first | value | printf "%.3f" }}}}{{{{ else }}}}n/a{{{{ end }}}}')
    numbers = (
        f"p99 TTFT ({engine}) {{{{ $value | printf \"%.3f\" }}}}s vs a {cfg.ttft_baseline} baseline of "
        f"{baseline}s; staging CPU {_q(cfg, STAGING)} cores; PCIe tax ratio {_q(cfg, RATIO, agg='max')}"
        # TGI has no TTFT histogram: say so wherever its proxy is what spiked.
        f'{{{{ if eq $labels.engine "{TGI.name}" }}}} (TGI proxy: validation + queue + prefill batch '
        f"quantiles, docs/engines.md){{{{ end }}}}"
    )
    ttft_staging = alert(
        "PcieTaxTTFTStagingSpike",
        f"{spike}\nand on ({n})\n{staging_high}",
        cfg.for_ttft, "critical",
        f"TTFT spike on {node} ({engine}) is host staging",
        f"{numbers}. Time to first token is more than {_num(cfg.ttft_spike_factor)}x its baseline while "
        f"the node's CPU is busy staging network data and the tax ratio is above {_num(cfg.ratio_high)}.",
    )
    ttft_not_staging = alert(
        "PcieTaxTTFTSpikeNotStaging",
        f"{spike}\nunless on ({n})\n{staging_high}",
        cfg.for_ttft, "info",
        f"TTFT spike on {node} ({engine}) is not host staging",
        f"{numbers}. Staging CPU and the tax ratio are not both high: look elsewhere (queueing, "
        f"prefill batch size, KV cache, the model server).",
    )

    link = 'device_kind=~"gpu|nic"'
    degraded = alert(
        "PcieLinkDegraded",
        (
            f'label_replace(\n  pcietax_pcie_link_width{{state="current", {link}}}\n'
            f'  < ignoring (state) pcietax_pcie_link_width{{state="max", {link}}},\n'
            f'  "limit", "width", "", "")\n'
            f'or\nlabel_replace(\n  pcietax_pcie_link_speed_gts{{state="current", device_kind="nic"}}\n'
            f'  < ignoring (state) pcietax_pcie_link_speed_gts{{state="max", device_kind="nic"}},\n'
            f'  "limit", "speed", "", "")\n'
            # GPUs lower their link speed when idle to save power; a slow link only matters under load.
            'or\nlabel_replace(\n  (\n'
            '    pcietax_pcie_link_speed_gts{state="current", device_kind="gpu"}\n'
            f'    < ignoring (state) pcietax_pcie_link_speed_gts{{state="max", device_kind="gpu"}}\n  )\n'
            f'  and on ({n}, pci_bus_id)\n  (\n    sum by ({n}, pci_bus_id) (\n'
            '      rate(pcietax_gpu_pcie_receive_bytes_total[5m])\n'
            '      + rate(pcietax_gpu_pcie_transmit_bytes_total[5m])\n'
            f'    ) > {_num(cfg.gpu_busy_bytes_per_second)}\n  ),\n  "limit", "speed", "", "")'
        ),
        cfg.for_link, "warning",
        f"PCIe link of {{{{ $labels.device_kind }}}} {{{{ $labels.pci_bus_id }}}} on {node} below its max "
        f"{{{{ $labels.limit }}}}",
        f"The {{{{ $labels.device_kind }}}} at {{{{ $labels.pci_bus_id }}}} on {node} negotiated "
        f"{{{{ $labels.limit }}}} {{{{ $value }}}}, below the maximum its link supports. Its PCIe ceiling is "
        f"lower by the same factor (pcietax_pcie_link_ceiling_bytes_per_second).",
    )
    replay = alert(
        "PcieReplayErrors",
        (
            'label_replace(increase(pcietax_pcie_replay_total[10m]) > 0, "counter", "replay", "", "")\n'
            "or\n"
            'label_replace(increase(pcietax_pcie_correctable_errors_total[10m]) > 0, '
            '"counter", "correctable", "", "")'
        ),
        None, "warning",
        f"PCIe {{{{ $labels.counter }}}} errors on {{{{ $labels.pci_bus_id }}}} ({node})",
        f"{{{{ $value | printf \"%.0f\" }}}} PCIe {{{{ $labels.counter }}}} events in 10 minutes on the "
        f"{{{{ $labels.device_kind }}}} at {{{{ $labels.pci_bus_id }}}} on {node}: the link retransmits, "
        f"which costs bandwidth and often precedes a link that trains down.",
    )
    gpu_labels, gpu_args = cfg.selector("gpu")
    gpudirect = alert(
        "GPUDirectBlocked",
        (
            f"count by ({n}, gpu) (pcietax_gpu_nic_path_info)\nunless on ({n}, gpu)\n"
            f'count by ({n}, gpu) (pcietax_gpu_nic_path_info{{gpudirect="ready"}})'
        ),
        cfg.for_gpudirect, "info",
        f"GPU {{{{ $labels.gpu }}}} on {node} has no GPUDirect-ready NIC",
        f"None of the {{{{ $value | printf \"%.0f\" }}}} NIC paths of GPU {{{{ $labels.gpu }}}} on {node} "
        f"allows GPUDirect RDMA, so its network traffic is staged through host memory. "
        f"Reasons: {{{{ range printf \"pcietax_gpu_nic_path_info{{{gpu_labels}}}\" {gpu_args} "
        f"| query | sortByLabel \"nic\" }}}}"
        f"{{{{ .Labels.nic }}}} ({{{{ .Labels.path }}}}): {{{{ .Labels.reason }}}}; {{{{ end }}}}"
        f"Run pcietax topo on the node.",
    )
    # One rule for both cases (promtool rejects two rules with one name and one label set): a source
    # that reports itself down, or the whole exporter target that Prometheus cannot scrape. A source
    # whose hardware is not on the node (pcietax_source_absent 1: no GPU, no RDMA device, an AMD
    # CPU) is down by design and pages no one, unless it was up within source_lost_window.
    source_down = alert(
        "PcieTaxSourceDown",
        (
            "pcietax_source_up == 0\nunless\n"
            "(pcietax_source_absent == 1 unless "
            f"max_over_time(pcietax_source_up[{cfg.source_lost_window}]) == 1)\n"
            f'or\nup{{job="{cfg.exporter_job}"}} == 0'
        ),
        cfg.for_source_down, "warning",
        f"pcietax {{{{ if $labels.source }}}}source {{{{ $labels.source }}}}{{{{ else }}}}exporter "
        f"{{{{ $labels.instance }}}}{{{{ end }}}} down on {node}",
        f"{{{{ if $labels.source }}}}The {{{{ $labels.source }}}} source of pcietax on {node} has been down "
        f"for {cfg.for_source_down}; the hops it measures are missing from the tax ratio and the exporter "
        f"logs the reason.{{{{ else }}}}Prometheus has not scraped the pcietax exporter at "
        f"{{{{ $labels.instance }}}} ({node}) for {cfg.for_source_down}: no tax, staging or link data for "
        f"that node.{{{{ end }}}}",
    )
    return [ratio_high, ttft_staging, ttft_not_staging, degraded, replay, gpudirect, source_down]


def rule_groups(cfg: RuleConfig) -> dict[str, Any]:
    return {
        "groups": [
            {"name": "pcietax.rules", "rules": recording_rules(cfg)},
            {"name": "pcietax.alerts", "rules": alert_rules(cfg)},
        ]
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    # Multi-line PromQL as block literals, so the YAML reads like the query.
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)

HEADER = "# Generated by `python -m alerts.generate` from alerts/rules.py; do not edit by hand.\n"


def render_prometheusrule(cfg: RuleConfig | None = None, namespace: str = "monitoring") -> str:
    """The same groups as a prometheus-operator PrometheusRule (deploy/kubernetes/)."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "pcietax", "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "pcietax"}},
        "spec": rule_groups(cfg or RuleConfig()),
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def render(cfg: RuleConfig | None = None) -> str:
    return HEADER + yaml.dump(rule_groups(cfg or RuleConfig()), Dumper=_Dumper, sort_keys=False,
                              width=1000, allow_unicode=True)
