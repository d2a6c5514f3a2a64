"""Analyses: one module per measurement, each returning a frozen result dataclass."""
