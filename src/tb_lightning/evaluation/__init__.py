"""Evaluation at an operating threshold: metrics, confidence intervals, threshold policies,
per-source breakdowns, figures and the printed report."""
