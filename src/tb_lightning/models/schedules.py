"""Learning-rate schedules (`model/scheduler=cosine|plateau|none`) from torch.optim.lr_scheduler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, ReduceLROnPlateau, SequentialLR


def scheduler_name(scheduler: Mapping[str, Any] | None) -> str:
    """The schedule's name: none, cosine or plateau (checked with the config)."""
    return (scheduler or {}).get("name", "none")


def build_scheduler(
    optimizer: Optimizer, scheduler: Mapping[str, Any] | None, max_epochs: int
) -> dict[str, Any] | None:
    """A Lightning lr_scheduler config stepped once per epoch, or None for a constant lr.

    cosine: linear warm-up from `warmup_start_factor` x lr over `warmup_epochs`, then cosine decay
    to `min_lr_scale` x lr at the last epoch. plateau: multiply the lr by `factor` when `monitor`
    has not improved for `patience` epochs.
    """
    name = scheduler_name(scheduler)
    if name == "none":
        return None
    if name == "cosine":
        warmup = int(scheduler.get("warmup_epochs", 0))  # below max_epochs: checked
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        cosine = CosineAnnealingLR(
            optimizer,
            T_max=max_epochs - warmup,
            eta_min=min(base_lrs) * float(scheduler.get("min_lr_scale", 0.0)),
        )
        if warmup:
            start = float(scheduler.get("warmup_start_factor", 0.1))
            ramp = LinearLR(optimizer, start_factor=start, total_iters=warmup)
            schedule = SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
        else:
            schedule = cosine
        return {"scheduler": schedule, "interval": "epoch"}
    plateau = ReduceLROnPlateau(
        optimizer,
        mode=scheduler.get("mode", "max"),
        factor=float(scheduler.get("factor", 0.5)),
        patience=int(scheduler.get("patience", 2)),
    )
    return {
        "scheduler": plateau,
        "interval": "epoch",
        "monitor": scheduler.get("monitor", "val/auroc"),
    }
