"""Evaluation at an operating threshold: metrics, bootstrap intervals, threshold policies,
per-source breakdowns, figures and the printed report."""
