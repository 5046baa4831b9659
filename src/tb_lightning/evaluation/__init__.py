"""Evaluation at an operating threshold (the numbers: stats/): scoring a split, per-source
breakdowns, paired comparisons, figures and the printed report."""
