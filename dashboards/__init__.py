"""Grafana dashboards for pcietax, written with grafana-foundation-sdk; ``python -m dashboards.generate``
writes the committed JSON beside this file."""
