"""The classic dashboard JSON that Grafana 10.4 LTS and 11 import, from the SDK's model.

grafana-foundation-sdk ~=0.0.21 writes schemaVersion 42 (Grafana 12). Grafana 10.4 and 11.0-11.2
know schemaVersion 39 as their latest. The migrations after it (Grafana's
apps/dashboard/pkg/migration/schemaversion/v40.go, v41.go, v42.go) only normalise `refresh` to a
string, drop `timepicker.time_options` and copy `hideFrom.viz` to `hideFrom.tooltip`; none of those
appear in these dashboards (a test checks), so 39 describes the JSON exactly. Panel options that
Grafana added after 10.4 are removed; the panel types used all exist in 10.4.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 39
PANEL_TYPES = frozenset({"row", "stat", "bargauge", "timeseries", "table"})
# option -> the Grafana release that added it (grafana/grafana#88205: stat percent change colour, 11.1)
NEWER_OPTIONS = {"stat": {"percentChangeColorMode": "11.1"}}
# Variable keys 10.4's model does not have; where they exist their default is the value dropped.
NEWER_VARIABLE_KEYS = {"allowCustomValue": True}


def for_grafana_10_4(d: dict[str, Any]) -> dict[str, Any]:
    """Set the schema version 10.4 reads and drop options it does not have. Raises on anything this
    module does not know to be loadable there, so a new panel type cannot slip in unnoticed."""
    d["schemaVersion"] = SCHEMA_VERSION
    for p in d.get("panels", []):
        kind = p.get("type")
        if kind not in PANEL_TYPES:
            raise ValueError(f"panel {p.get('title')!r}: type {kind!r} not known to load in Grafana 10.4")
        for opt in NEWER_OPTIONS.get(kind, {}):
            p.get("options", {}).pop(opt, None)
    for v in d.get("templating", {}).get("list", []):
        for key, default in NEWER_VARIABLE_KEYS.items():
            if v.get(key, default) != default:
                raise ValueError(f"variable {v.get('name')!r}: {key}={v[key]!r} cannot be kept for 10.4")
            v.pop(key, None)
    return d
