"""Several classifiers as one model: the mean of their TB logits (evaluation/ensemble.py builds
it from a k-fold multirun; inference/deploy.py exports it as one file).

Why the mean logit rather than the mean probability: it is the log of the geometric mean of the
members' odds, so one member's extreme (near 0 or 1) probability does not swamp the others, and
members that share a calibration scale keep it.
"""

from __future__ import annotations

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
