"""Prometheus recording and alerting rules for pcietax, generated from one Python source
(``python -m alerts.generate``) so tests can build the same rules with short ``for:`` values."""
