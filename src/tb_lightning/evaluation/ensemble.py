"""Several trained models as one: `ckpt_path=<k-fold multirun directory>` (every job's
checkpoints/best.ckpt, or its last.ckpt where the run keeps no best: experiment=nlm_scratch) for
predict, eval and export.

Combination: the mean of the members' logits, then the sigmoid (inference/ensemble_model.py says
why).

Operating threshold: chosen on the out-of-fold predictions, each image of a member's val split
(its split.csv) scored by that member, which did not train on it; pooled over the members, the
members' threshold.policy (all the same, else refused) picks the threshold. It is computed when the
ensemble is loaded (one pass over the val images), so nothing is written into the training runs.

Calibration: when the members were trained with calibration=temperature, the ensemble fits one
temperature of its own on the pooled out-of-fold logits (the members' raw logits; each member's
own temperature, fitted on its 1/k of the images, is set aside) and divides the mean logit by
it; the threshold is then chosen on those calibrated probabilities. Members trained without it
give an uncalibrated ensemble; a mix is refused. Fewer pooled out-of-fold images than
calibration.MIN_CALIBRATION_IMAGES are refused; the temperature carries the warnings of
calibration_warnings, the AUROC interval being the bootstrap one of the pooled predictions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tb_lightning.core.errors import ConfigError, UserError
from tb_lightning.data.preprocess import describe_preprocess
from tb_lightning.data.split import read_split_csv
from tb_lightning.evaluation.calibration import (
    auroc_interval,
    calibration_refusal,
    calibration_warnings,
    fit_temperature,
    warnings_of,
)
from tb_lightning.evaluation.evaluate import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from tb_lightning.evaluation.thresholds import choose_threshold
from tb_lightning.inference.checkpoint import LoadedModel, load_model
from tb_lightning.inference.ensemble_model import COMBINATION, EnsembleModel
from tb_lightning.inference.runner import predict_images, probabilities

log = logging.getLogger(__name__)


def job_checkpoint(job: Path) -> Path | None:
    """The checkpoint that holds a finished job's model and operating threshold: best.ckpt, or
    last.ckpt when the run keeps no best (callbacks.model_checkpoint=null: the last epoch is the
    model, and train stores the threshold in last.ckpt); None while it has neither."""
    for name in ("best.ckpt", "last.ckpt"):
        if (job / "checkpoints" / name).is_file():
            return job / "checkpoints" / name
    return None


def member_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint (job_checkpoint) of every job of a multirun directory, in job order."""
    jobs = sorted(
        (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    found = [job_checkpoint(job) for job in jobs]
    missing = [f"{job}/checkpoints" for job, ckpt in zip(jobs, found, strict=True) if not ckpt]
    if not found or missing:
        what = (
            f"has no best.ckpt or last.ckpt in {', '.join(missing)}"
            if missing
            else "holds no job folders (0, 1, ...)"
        )
        raise UserError(
            f"ckpt_path={folder} is a folder but not a finished multirun: it {what}; pass a "
            "multirun directory whose jobs all finished, or one checkpoint file."
        )
    return found


def out_of_fold(members: list[LoadedModel]) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every member's val images, each scored by its own member."""
    logits, labels = [], []
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
            preprocess=loaded.preprocess,
        )
        if not run.readable.all():
            bad = run.reasons[int(np.argmin(run.readable))]
            raise UserError(f"A val image of {split_csv} cannot be read any more ({bad}).")
        logits.append(run.logits)
        labels.append([s.label for s in val])
    return np.concatenate(logits), np.concatenate(labels)


def load_ensemble(folder: str | Path) -> LoadedModel:
    """The members of a k-fold multirun as one model, with its out-of-fold threshold."""
    folder = Path(folder).expanduser().resolve()
    checkpoints = member_checkpoints(folder)
    members = [load_model(path) for path in checkpoints]
    sizes = {m.image_size for m in members}
    preprocesses = {describe_preprocess(m.preprocess) for m in members}
    calibrated = {bool(m.calibration) for m in members}
    policies = {(m.stored_threshold or {}).get("policy") for m in members}
    targets = {(m.stored_threshold or {}).get("target") for m in members}
    if (
        max(len(sizes), len(preprocesses), len(calibrated), len(policies), len(targets)) > 1
        or None in policies
    ):
        raise UserError(
            f"The jobs of {folder} differ in image size {sorted(sizes)}, data.preprocess "
            f"{sorted(preprocesses)}, calibration or threshold.policy "
            f"{sorted(map(str, policies))}, or lack a stored threshold: an ensemble needs members "
            "trained alike (e.g. the folds of one sweep=kfold run)."
        )
    is_calibrated, calibration = calibrated.pop(), None
    if is_calibrated:
        # The members' raw logits, then one temperature for the ensemble (each member's own T,
        # fitted on its 1/k of the images, is set aside).
        for loaded in members:
            loaded.model.temperature.fill_(1.0)
    logits, labels = out_of_fold(members)
    if is_calibrated:
        refusal = calibration_refusal(
            len(labels),
            len(set(labels.tolist())),
            f"ckpt_path={folder}",
            "train the folds on more images",
            subject="the pooled out-of-fold predictions of its members are",
        )
        if refusal:
            raise ConfigError(refusal)
        temperature = fit_temperature(logits, labels)
        calibration = {
            "method": "temperature",
            "temperature": temperature,
            "fitted_on": f"the out-of-fold predictions of the {len(members)} fold models "
            f"({len(labels)} images)",
            # The interval of the pooled out-of-fold AUROC, as the reports' (same resamples).
            "warnings": calibration_warnings(
                temperature,
                auroc_interval(logits, labels, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED),
                auroc_of="out-of-fold",
            ),
        }
        for warning in calibration["warnings"]:
            log.warning("The ensemble's calibration temperature: %s", warning)
        # In float32, as the ensemble's forward divides.
        logits = (torch.from_numpy(logits.astype(np.float32)) / calibration["temperature"]).numpy()
    policy, target = policies.pop(), targets.pop()
    choice = {
        "value": choose_threshold(probabilities(logits), labels, policy, target),
        "policy": policy,
        "target": target,
        "val_images": int(len(labels)),
        "chosen_on": f"the out-of-fold predictions of the {len(members)} fold models",
    }
    log.info(
        "Ensemble of %d models (%s%s), threshold p_tb >= %.4f chosen on %d out-of-fold predictions",
        len(members),
        COMBINATION,
        f", temperature {calibration['temperature']:.3f}" if calibration else "",
        choice["value"],
        len(labels),
    )
    temperature = calibration["temperature"] if calibration else 1.0
    return LoadedModel(
        model=EnsembleModel([m.model for m in members], temperature).eval(),
        checkpoint_path=folder,
        image_size=sizes.pop(),
        stored_threshold=choice,
        hparams_threshold=members[0].hparams_threshold,
        # The reference report's weighted loss: the first fold's class weight (the folds' train
        # splits hold nearly the same class shares).
        pos_weight=members[0].pos_weight,
        calibration=calibration,
        preprocess=members[0].preprocess,
        member_checkpoints=checkpoints,
    )


def load_checkpoint_or_ensemble(
    ckpt_path: str | Path, ensemble_refusal: str | None = None
) -> LoadedModel:
    """`ckpt_path` as eval and predict take it: one checkpoint file, or a k-fold multirun
    directory as one ensemble. `ensemble_refusal`: why this command cannot use an ensemble
    (the sentence's reason), or None when it can."""
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_dir():
        loaded = load_model(path)
        # Repeated wherever the temperature is applied (eval, predict, export): its
        # probabilities are not calibrated ones.
        for warning in warnings_of(loaded.calibration) if loaded.calibration else []:
            log.warning("The checkpoint's calibration temperature: %s", warning)
        return loaded
    if ensemble_refusal:
        raise ConfigError(f"ckpt_path={path} is a multirun (an ensemble), but {ensemble_refusal}")
    return load_ensemble(path)
