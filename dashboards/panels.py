"""Small helpers over grafana-foundation-sdk so each dashboard reads as a list of panels: every
panel gets the datasource variable, a unit, and Prometheus targets with legends."""

from __future__ import annotations

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    DataSourceRef,
    StackingMode,
)
from grafana_foundation_sdk.models.dashboard import (
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableHide,
    VariableRefresh,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every selector is scoped to the cluster and node variables. A Prometheus that sees one cluster has
# no `cluster` label at all: the variable is then empty and its All value ".*" matches the empty label.
SCOPE = 'cluster=~"$cluster", node=~"$node"'

RATIO_UNIT = "suffix:x"  # bytes moved per useful byte
CORES_UNIT = "suffix: cores"  # CPU seconds per second


def q(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
      table_format: bool = False) -> prometheus.Dataquery:
    d = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        d = d.legend_format(legend)
    d = d.instant() if instant else d.range()
    if table_format:
        d = d.format(PromQueryFormat.TABLE)
    return d


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=v, color=c) for v, c in steps])


def ts(title: str, unit: str, *targets: prometheus.Dataquery, desc: str = "", w: int = 12, h: int = 8,
       stacked: bool = False) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(desc).unit(unit).datasource(DS).span(w).height(h)
         .fill_opacity(10 if not stacked else 60).line_width(1))
    if stacked:
        p = p.stacking(StackingConfig().mode(StackingMode.NORMAL))
    for t in targets:
        p = p.with_target(t)
    return p


def unstack(p: timeseries.Panel, ref: str) -> timeseries.Panel:
    """Draw one query as a line over a stacked panel (e.g. useful bytes over the moved hops)."""
    return p.override_by_query(ref, [
        DynamicConfigValue(id_val="custom.stacking", value={"mode": "none", "group": "A"}),
        DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        DynamicConfigValue(id_val="custom.lineWidth", value=3),
    ])


def st(title: str, unit: str, *targets: prometheus.Dataquery, desc: str = "", w: int = 6, h: int = 6,
       steps: tuple[tuple[float | None, str], ...] = ((None, "green"),),
       mapping: dict[str, tuple[str, str]] | None = None, lo: float | None = None,
       hi: float | None = None) -> stat.Panel:
    p = (stat.Panel().title(title).description(desc).unit(unit).datasource(DS).span(w).height(h)
         .thresholds(thresholds(*steps)).color_mode(BigValueColorMode.BACKGROUND)
         .graph_mode(BigValueGraphMode.NONE)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if mapping:
        p = p.mappings([ValueMap(options={k: ValueMappingResult(text=t, color=c)
                                          for k, (t, c) in mapping.items()})])
    if lo is not None:
        p = p.min(lo)
    if hi is not None:
        p = p.max(hi)
    for t in targets:
        p = p.with_target(t)
    return p


def tbl(title: str, unit: str, *targets: prometheus.Dataquery, desc: str = "", w: int = 12,
        h: int = 8) -> table.Panel:
    p = table.Panel().title(title).description(desc).unit(unit).datasource(DS).span(w).height(h)
    for t in targets:
        p = p.with_target(t)
    return p


def bars(title: str, unit: str, *targets: prometheus.Dataquery, desc: str = "", w: int = 12, h: int = 8,
         steps: tuple[tuple[float | None, str], ...] = ((None, "green"),)) -> bargauge.Panel:
    p = (bargauge.Panel().title(title).description(desc).unit(unit).datasource(DS).span(w).height(h)
         .thresholds(thresholds(*steps)))
    for t in targets:
        p = p.with_target(t)
    return p


def base(title: str, uid: str, description: str) -> dashboard.Dashboard:
    """A dashboard with the datasource, cluster and node variables every pcietax dashboard shares.
    `cluster` is the label a multi-cluster data source (Thanos, Mimir, federation) puts on every
    series, usually from each Prometheus's external_labels."""
    return (
        dashboard.Dashboard(title).uid(uid).description(description).tags(["pcietax", "pcie", "gpu"])
        .refresh("30s").time("now-1h", "now").timezone("browser").editable()
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_label_variable("cluster", "Cluster", "label_values(pcietax_build_info, cluster)"))
        .with_variable(_label_variable("node", "Node",
                                       'label_values(pcietax_build_info{cluster=~"$cluster"}, node)'))
    )


def _label_variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    """A multi-select variable over a label's values, "All" matching every value."""
    return (
        dashboard.QueryVariable(name).label(label).datasource(DS).query(query).definition(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
        .all_value(".*").hide(VariableHide.DONT_HIDE)
    )


def missing_hops_override(p: stat.Panel | timeseries.Panel, ref: str) -> stat.Panel | timeseries.Panel:
    """Show the count of unmeasured hops beside a ratio: a plain number, green at 0, red above."""
    return p.override_by_query(ref, [
        DynamicConfigValue(id_val="unit", value="none"),
        DynamicConfigValue(id_val="decimals", value=0),
        DynamicConfigValue(id_val="thresholds", value={
            "mode": "absolute", "steps": [{"value": None, "color": "green"}, {"value": 1, "color": "red"}]}),
        DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
    ])
