"""Several trained models as one: `ckpt_path=<k-fold multirun directory>` (every job's
checkpoints/best.ckpt, or its last.ckpt where the run keeps no best: experiment=nlm_scratch) for
predict, eval and export.

What is an ensemble: the folds of one k-fold run, or of one k-fold run repeated over seeds
(`-m sweep=kfold seed=0,1,2`), each (seed, fold) exactly once, all there. The jobs' saved configs
(.hydra/config.yaml, compared as run_dirs.comparable compares a resume's) may differ only in
data.fold and seed, so they share data.num_folds, the data and its split settings; their
split.csv files share the test split. Anything else (an lr sweep, a copied job, an ordinary run
or another run's fold mixed in, a missing fold) is refused in one sentence naming the job, since
its numbers would claim an ensemble it is not. `allow_partial=true` accepts missing folds and
every output says which (ensemble_folds).

Combination: the mean of the members' logits, then the sigmoid (trained/ensemble_model.py says
why).

Operating threshold: chosen on the out-of-fold predictions, each image of a member's val split
(its split.csv) scored by that member, which did not train on it; with several seeds, each
image's out-of-fold logit is the mean over the members that did not train on it (one per seed:
those whose val split holds it), so each image counts once. Pooled over the images, the
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

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tb_lightning.core.artefacts import threshold_text
from tb_lightning.core.errors import ConfigError, UserError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.core.run_dirs import SAVED_CONFIG, comparable, saved_config
from tb_lightning.data.preprocess import describe_preprocess
from tb_lightning.data.split import read_split_sides
from tb_lightning.stats.bootstrap import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from tb_lightning.stats.calibration import (
    auroc_interval,
    calibration_refusal,
    calibration_warnings,
    fit_temperature,
)
from tb_lightning.stats.metrics import RANKING, RATES, weighted_metrics
from tb_lightning.stats.thresholds import choose_threshold
from tb_lightning.trained.checkpoint import load_checkpoint_file
from tb_lightning.trained.ensemble_model import (
    COMBINATION,
    EnsembleModel,
    describe_members,
    describe_missing,
)
from tb_lightning.trained.model import TrainedModel
from tb_lightning.trained.runner import probabilities

log = logging.getLogger(__name__)

# What may differ between the jobs of one k-fold run repeated over seeds: the fold a job
# validates on and its seed (comparable() already leaves out where outputs go).
MEMBER_KEYS = ("data.fold", "seed")
PARTIAL_KEY = "allow_partial"


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


def _jobs(items: list[str]) -> str:
    """`job 3`, `jobs 0 and 3`, `jobs 0, 3 and 5`."""
    listed = items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
    return f"job{'s' if len(items) > 1 else ''} {listed}"


def _value(value: Any) -> str:
    return "null" if value is None else repr(value)


def _fold_value(job: Path, flat: dict[str, Any], key: str) -> Any:
    """`key` of a job's saved config; its metrics.json's (the value the run used) when the
    config holds an interpolation there."""
    value = flat.get(key)
    if isinstance(value, str) and "${" in value and (job / "metrics.json").is_file():
        try:
            return json.loads((job / "metrics.json").read_text()).get(key, value)
        except (OSError, ValueError):
            return value
    return value


def kfold_layout(
    folder: Path, checkpoints: list[Path], allow_partial: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each job's {"fold", "seed"} and the ensemble's {"num_folds", "seeds", "missing_folds"},
    or a UserError when the jobs are not the folds of one k-fold run (repeated over seeds at
    most), each exactly once and all there (missing ones allowed with allow_partial)."""
    jobs = [ckpt.parent.parent for ckpt in checkpoints]
    head = f"ckpt_path={folder} is not a k-fold ensemble:"
    flats: list[dict[str, Any]] = []
    for job in jobs:
        config = saved_config(job)
        if config is None:
            raise UserError(
                f"{head} job {job.name} has no {SAVED_CONFIG}, so nothing says which fold of "
                "which run it is; pass a multirun directory as training wrote it."
            )
        flats.append(comparable(config))
    members = []
    for job, flat in zip(jobs, flats, strict=True):
        num_folds = _fold_value(job, flat, "data.num_folds")
        if num_folds is None:
            raise UserError(
                f"{head} job {job.name} is not a k-fold job (data.num_folds is null); pass the "
                "multirun directory of one `-m sweep=kfold` run (its folds, over several seeds "
                "at most), or one checkpoint file."
            )
        members.append(
            {"fold": _fold_value(job, flat, "data.fold"), "seed": flat.get("seed"), "k": num_folds}
        )
    # The run: the configuration most jobs share (ties: the first job's); the others are
    # foreign, whichever job comes first.
    keys = [
        json.dumps(
            {k: v for k, v in flat.items() if k not in MEMBER_KEYS}, sort_keys=True, default=str
        )
        for flat in flats
    ]
    run_key = max(keys, key=lambda k: (keys.count(k), -keys.index(k)))
    ref = keys.index(run_key)
    for job, key, flat in zip(jobs, keys, flats, strict=True):
        if key == run_key:
            continue
        differences = [
            k
            for k in sorted(set(flat) | set(flats[ref]))
            if k not in MEMBER_KEYS and flat.get(k) != flats[ref].get(k)
        ]
        shown = ", ".join(
            f"{k}: {_value(flat.get(k))}, against {_value(flats[ref].get(k))} in job "
            f"{jobs[ref].name}"
            for k in differences[:3]
        ) + (f" and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise UserError(
            f"{head} job {job.name} is not a fold of this run (differs in {shown}); an "
            "ensemble is the folds of one `-m sweep=kfold` run (over several seeds at most): "
            f"move job {job.name} out, or give each configuration its own multirun directory."
        )
    num_folds = members[ref]["k"]
    for job, member in zip(jobs, members, strict=True):
        fold = member["fold"]
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
            raise UserError(
                f"{head} job {job.name} is not a fold of this run (data.fold={_value(fold)} is "
                f"not a fold of data.num_folds={num_folds}); move it out of the folder."
            )
    holders: dict[tuple[str, int], list[str]] = {}
    for job, member in zip(jobs, members, strict=True):
        holders.setdefault((_value(member["seed"]), member["fold"]), []).append(job.name)
    for (seed, fold), names in holders.items():
        if len(names) > 1:
            raise UserError(
                f"{head} {_jobs(names)} are both fold {fold} (seed {seed}), which would count "
                "that fold's model twice; keep one of them in the folder."
            )
    seeds = list(dict.fromkeys(m["seed"] for m in members))
    folds = {
        "num_folds": num_folds,
        "seeds": seeds,
        "missing_folds": [
            {"fold": fold, "seed": seed}
            for seed in seeds
            for fold in range(num_folds)
            if (_value(seed), fold) not in holders
        ],
    }
    missing = describe_missing(folds)
    if missing and not allow_partial:
        raise UserError(
            f"ckpt_path={folder} is not a complete k-fold ensemble: {missing}; train "
            f"{'it' if len(folds['missing_folds']) == 1 else 'them'} again with the run's "
            f"overrides (the run folder copied in as a job), or pass {PARTIAL_KEY}=true to use "
            f"the {len(jobs)} fold model{'s there are' if len(jobs) > 1 else ' there is'}."
        )
    return [{"fold": m["fold"], "seed": m["seed"]} for m in members], folds


def out_of_fold(
    members: list[TrainedModel], seeds: list[Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of every image of the members' val splits, each scored by the members
    that did not train on it: the fold model whose val split holds it, or with several seeds
    (`seeds`: each member's) the mean over those, one per seed. Images in the order first met
    (members in job order, each in its split.csv order)."""
    seeds = seeds if seeds is not None else [None] * len(members)
    pooled: dict[str, tuple[int, list[float]]] = {}  # path -> (label, logits)
    holder: dict[tuple[str, str], Path] = {}  # (path, seed) -> the split.csv holding it in val
    test: tuple[Path, set[str]] | None = None
    dtype = None
    for loaded, seed in zip(members, seeds, strict=True):
        split_csv = loaded.run_dir / "split.csv"
        if not split_csv.is_file():
            raise UserError(
                f"{split_csv} is missing: the out-of-fold threshold needs each member's val "
                "split; pass the multirun directory as training wrote it."
            )
        sides = read_split_sides(split_csv)
        # Members of one run share the held-out test split; another one (a data.split_seed
        # that follows the seed) means some member trained on another's test images.
        tests = {s.path for s in sides["test"]}
        if test is None:
            test = (split_csv, tests)
        elif tests != test[1]:
            raise UserError(
                f"ckpt_path={loaded.run_dir.parent} is not a k-fold ensemble: the test split of "
                f"{split_csv} is not that of {test[0]}, so some members trained on the others' "
                "test images; repeat a k-fold run over seeds with a fixed data.split_seed (e.g. "
                "data.split_seed=42 seed=0,1,2)."
            )
        val = sides["val"]
        run = loaded.predict(
            [s.path for s in val], progress=False, description="Out-of-fold predictions"
        )
        if not run.readable.all():
            bad = run.reasons[int(np.argmin(run.readable))]
            raise UserError(f"A val image of {split_csv} cannot be read any more ({bad}).")
        dtype = run.logits.dtype
        for sample, logit in zip(val, run.logits, strict=True):
            key = (sample.path, _value(seed))
            if key in holder:
                raise UserError(
                    f"ckpt_path={loaded.run_dir.parent} is not a k-fold ensemble: "
                    f"{sample.path} is in the val split of both {holder[key]} and {split_csv} "
                    f"(seed {_value(seed)}), so the folds do not partition the images; pass a "
                    "multirun directory of one `-m sweep=kfold` run as training wrote it."
                )
            holder[key] = split_csv
            pooled.setdefault(sample.path, (sample.label, []))[1].append(float(logit))
    # The mean in float64, back in the members' dtype: an image scored by one member keeps its
    # very logit (a plain k-fold run's out-of-fold predictions, as before seeds were pooled).
    logits = np.array([np.mean(v, dtype=np.float64) for _, v in pooled.values()]).astype(dtype)
    return logits, np.array([label for label, _ in pooled.values()])


def load_ensemble(
    folder: str | Path,
    allow_partial: bool = False,
    policy: str | None = None,
    target: float | None = None,
) -> TrainedModel:
    """The members of a k-fold multirun (over seeds at most) as one model, with its out-of-fold
    threshold; allow_partial accepts missing folds (ensemble_folds names them). The threshold is
    chosen by the members' threshold.policy, or by `policy` (and `target`) when given
    (threshold.policy on eval's, predict's and export's command line)."""
    folder = Path(folder).expanduser().resolve()
    checkpoints = member_checkpoints(folder)
    members = [load_checkpoint_file(path) for path in checkpoints]
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
    # After the members' own checks, whose sentence says more for members trained unlike.
    jobs, folds = kfold_layout(folder, checkpoints, allow_partial)
    chosen_on = f"the out-of-fold predictions of the {describe_members(len(members), folds)}"
    if len(folds["seeds"]) > 1:
        chosen_on += " (each image's mean over those that did not train on it, one per seed)"
    missing = describe_missing(folds)
    if missing:
        chosen_on += f" ({describe_missing(folds, verb=False)} missing: {PARTIAL_KEY}=true)"
        log.warning(
            "The ensemble of %s has %d fold models only: %s (%s=true); their models are not in "
            "the mean, and their val images %s.",
            folder,
            len(members),
            missing,
            PARTIAL_KEY,
            "are scored out of fold by the other seeds' models only"
            if len(folds["seeds"]) > 1
            else "have no out-of-fold prediction",
        )
    is_calibrated, calibration = calibrated.pop(), None
    if is_calibrated:
        # The members' raw logits, then one temperature for the ensemble (each member's own T,
        # fitted on its 1/k of the images, is set aside).
        for loaded in members:
            loaded.model.temperature.fill_(1.0)
    logits, labels = out_of_fold(members, [job["seed"] for job in jobs])
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
            "fitted_on": f"{chosen_on} ({len(labels)} images)",
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
    trained_policy, trained_target = policies.pop(), targets.pop()
    given = policy is not None
    if not given:
        policy, target = trained_policy, trained_target
    choice = {
        "value": choose_threshold(probabilities(logits), labels, policy, target),
        "policy": policy,
        "target": target,
        "val_images": int(len(labels)),
        "chosen_on": chosen_on,
    }
    if given:  # said in the reports beside the choice (stats/thresholds.py)
        choice["trained_policy"] = trained_policy
    log.info(
        "Ensemble of %s (%s%s), threshold p_tb >= %s chosen on %d out-of-fold predictions",
        describe_members(len(members), folds),
        COMBINATION,
        f", temperature {calibration['temperature']:.3f}" if calibration else "",
        threshold_text(choice["value"]),
        len(labels),
    )
    temperature = calibration["temperature"] if calibration else 1.0
    return TrainedModel(
        model=EnsembleModel([m.model for m in members], temperature).eval(),
        checkpoint_path=folder,
        image_size=sizes.pop(),
        stored_threshold=choice,
        hparams_threshold=members[0].hparams_threshold,
        # The reference report's weighted loss: the first fold's class weight (the folds' train
        # splits hold nearly the same class shares).
        pos_weight=members[0].pos_weight,
        # The folds' loss: one config (the jobs may differ only in fold and seed).
        focal_gamma=members[0].focal_gamma,
        calibration=calibration,
        preprocess=members[0].preprocess,
        member_checkpoints=checkpoints,
        ensemble_folds=folds,
        net=members[0].net,
        members=members,
        out_of_fold=out_of_fold_figures(probabilities(logits), labels, choice),
    )


def out_of_fold_figures(
    probs: np.ndarray, labels: np.ndarray, choice: dict[str, Any]
) -> dict[str, Any]:
    """The figures of the pooled out-of-fold predictions at the threshold chosen on them (for
    model.json: what the ensemble was chosen on). Those at the threshold are optimistic, as a
    threshold chosen on a validation split makes them."""
    figures = weighted_metrics(probs, labels, choice["value"])
    names = (*RANKING, *RATES)
    return {
        "split": "out-of-fold",
        "description": choice["chosen_on"],
        "images": int(len(labels)),
        "counts": {
            CLASS_NAMES[0]: int((labels == 0).sum()),
            CLASS_NAMES[1]: int((labels == 1).sum()),
        },
        "threshold": choice["value"],
        **{name: float(figures[name]) for name in names},
    }
