"""Several classifiers as one model: the mean of their TB logits (trained/ensemble.py builds
it from a k-fold multirun; inference/deploy.py exports it as one file), and the words that
say which folds it holds.

Why the mean logit rather than the mean probability: it is the log of the geometric mean of the
members' odds, so one member's extreme (near 0 or 1) probability does not swamp the others, and
members that share a calibration scale keep it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

COMBINATION = "mean logit"


class EnsembleModel(nn.Module):
    """Members' classifiers -> the mean of their TB logits divided by the ensemble's
    temperature (1 when uncalibrated), shape (N,)."""

    def __init__(self, members: list[nn.Module], temperature: float = 1.0) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean_logit = torch.stack([member(images) for member in self.members]).mean(dim=0)
        return mean_logit / self.temperature


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def describe_members(count: int, folds: dict[str, Any] | None) -> str:
    """`3 fold models`, or for a k-fold run repeated over seeds `6 fold models of 2 seeds`."""
    seeds = len(folds["seeds"]) if folds else 1
    return f"{count} fold models" + (f" of {seeds} seeds" if seeds > 1 else "")


def describe_missing(folds: dict[str, Any] | None, verb: bool = True) -> str | None:
    """`fold 1 of 3 is missing`, `folds 1 and 2 of 3 are missing`, `fold 1 of 3 (seed 43) is
    missing` (seeds named when the ensemble has several; without `verb`: `fold 1 of 3`); None
    when no fold is missing."""
    if not folds or not folds.get("missing_folds"):
        return None
    missing, several_seeds = folds["missing_folds"], len(folds["seeds"]) > 1
    by_seed: dict[Any, list[int]] = {}
    for entry in missing:
        by_seed.setdefault(entry["seed"], []).append(entry["fold"])
    parts = []
    for seed, numbers in by_seed.items():
        listed = _and([str(n) for n in sorted(numbers)])
        part = f"fold{'s' if len(numbers) > 1 else ''} {listed} of {folds['num_folds']}"
        parts.append(part + (f" (seed {seed})" if several_seeds else ""))
    if not verb:
        return _and(parts)
    return f"{_and(parts)} {'is' if len(missing) == 1 else 'are'} missing"
