"""Grafana dashboards for pcietax, written with grafana-foundation-sdk; ``python -m dashboards.generate``
writes the committed JSON beside this file."""

import warnings

# The SDK nudges towards its v2 schema (Grafana 12's API only) on import and on every dashboard;
# the classic JSON model is what file provisioning, ConfigMap sidecars and Grafana 10/11 import.
warnings.filterwarnings("ignore", "Prefer using dashboardv2", DeprecationWarning)
