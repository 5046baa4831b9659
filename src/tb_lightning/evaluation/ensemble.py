"""Several trained models as one: `ckpt_path=<k-fold multirun directory>` (every job's
checkpoints/best.ckpt) for predict and eval.

Combination: the mean of the members' logits, then the sigmoid. Why the mean logit rather than
the mean probability: it is the log of the geometric mean of the members' odds, so one member's
extreme (near 0 or 1) probability does not swamp the others, and members that share a
calibration scale keep it. Each member applies its own stored temperature first.

Operating threshold: chosen on the out-of-fold predictions, each image of a member's val split
(its split.csv) scored by that member, which did not train on it; pooled over the members, the
members' threshold.policy (all the same, else refused) picks the threshold. It is computed when the
ensemble is loaded (one pass over the val images), so nothing is written into the training runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tb_lightning.core.errors import ConfigError, UserError
from tb_lightning.data.split import read_split_csv
from tb_lightning.evaluation.thresholds import choose_threshold
from tb_lightning.inference.checkpoint import LoadedModel, load_model
from tb_lightning.inference.runner import predict_images

log = logging.getLogger(__name__)

COMBINATION = "mean logit"


class EnsembleModel(nn.Module):
    """Members' classifiers -> the mean of their TB logits, shape (N,)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images) for member in self.members]).mean(dim=0)


def member_checkpoints(folder: Path) -> list[Path]:
    """`<job>/checkpoints/best.ckpt` of every job of a multirun directory, in job order."""
    jobs = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    found = [job / "checkpoints" / "best.ckpt" for job in jobs]
    missing = [str(p) for p in found if not p.is_file()]
    if not found or missing:
        what = f"lacks {', '.join(missing)}" if missing else "holds no job folders (0, 1, ...)"
        raise UserError(
            f"ckpt_path={folder} is a folder but not a finished multirun: it {what}; pass a "
            "multirun directory whose jobs all finished, or one checkpoint file."
        )
    return found


def out_of_fold(members: list[LoadedModel]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of every member's val images, each scored by its own member."""
    probs, labels = [], []
    for loaded in members:
        split_csv = loaded.run_dir / "split.csv"
        if not split_csv.is_file():
            raise UserError(
                f"{split_csv} is missing: the out-of-fold threshold needs each member's val "
                "split; pass the multirun directory as training wrote it."
            )
        _, val = read_split_csv(split_csv)
        run = predict_images(
            loaded.model,
            [s.path for s in val],
            loaded.image_size,
            progress=False,
            description="Out-of-fold predictions",
        )
        if not run.readable.all():
            bad = run.reasons[int(np.argmin(run.readable))]
            raise UserError(f"A val image of {split_csv} cannot be read any more ({bad}).")
        probs.append(run.probs)
        labels.append([s.label for s in val])
    return np.concatenate(probs), np.concatenate(labels)


def load_ensemble(folder: str | Path) -> LoadedModel:
    """The members of a k-fold multirun as one model, with its out-of-fold threshold."""
    folder = Path(folder).expanduser().resolve()
    members = [load_model(path) for path in member_checkpoints(folder)]
    sizes = {m.image_size for m in members}
    policies = {(m.stored_threshold or {}).get("policy") for m in members}
    targets = {(m.stored_threshold or {}).get("target") for m in members}
    if len(sizes) > 1 or len(policies) > 1 or len(targets) > 1 or None in policies:
        raise UserError(
            f"The jobs of {folder} differ in image size {sorted(sizes)} or threshold.policy "
            f"{sorted(map(str, policies))}, or lack a stored threshold: an ensemble needs members "
            "trained alike (e.g. the folds of one sweep=kfold run)."
        )
    probs, labels = out_of_fold(members)
    policy, target = policies.pop(), targets.pop()
    choice = {
        "value": choose_threshold(probs, labels, policy, target),
        "policy": policy,
        "target": target,
        "val_images": int(len(labels)),
        "chosen_on": f"the out-of-fold predictions of the {len(members)} fold models",
    }
    log.info(
        "Ensemble of %d models (%s of their logits), threshold p_tb >= %.4f chosen on %d "
        "out-of-fold predictions",
        len(members),
        COMBINATION,
        choice["value"],
        len(labels),
    )
    return LoadedModel(
        model=EnsembleModel([m.model for m in members]).eval(),
        checkpoint_path=folder,
        image_size=sizes.pop(),
        stored_threshold=choice,
        hparams_threshold=members[0].hparams_threshold,
        # The reference report's weighted loss: the first fold's class weight (the folds' train
        # splits hold nearly the same class shares).
        pos_weight=members[0].pos_weight,
        member_runs=[m.run_dir for m in members],
    )


def load_checkpoint_or_ensemble(
    ckpt_path: str | Path, ensemble_refusal: str | None = None
) -> LoadedModel:
    """`ckpt_path` as eval and predict take it: one checkpoint file, or a k-fold multirun
    directory as one ensemble. `ensemble_refusal`: why this command cannot use an ensemble
    (the sentence's reason), or None when it can."""
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_dir():
        return load_model(path)
    if ensemble_refusal:
        raise ConfigError(f"ckpt_path={path} is a multirun (an ensemble), but {ensemble_refusal}")
    return load_ensemble(path)
