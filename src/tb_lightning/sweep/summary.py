"""The sweep summary: which configuration of a multirun is best, and whether that beats the noise.

Read from the multirun directory itself (each job's `.hydra/overrides.yaml`, `metrics.json`,
`predictions.csv`, and `error.txt` for a failed job), so it works for any launcher and can be
rewritten after each job. Writes:

- `sweep_summary.csv`: one row per job; `configuration` names what it is apart from its repeat
  keys (`seed`, `data.fold`), so that repeats of one configuration share it; `run_dir` is
  relative to the multirun folder (core/artefacts.py), so the folder can move.
- `sweep_configurations.csv`: one row per configuration: `n_runs`, the mean and sd of each
  figure over its runs, and for k-fold the pooled out-of-fold AUROC with its interval.
- `sweep_summary.md`: both tables and, first, the conclusion in words.

Ranking. Configurations are ranked by the threshold-free ranking metric (`optimized_metric`:
val AUROC unless set; val AP or val loss also work). The top one is compared with each other one
*paired*, on the same validation images (evaluation/compare.py): the verdict is `tied` when the
95% interval of their difference includes 0 (within the noise of those images, and of the seeds
when there are repeats), `worse` when the whole interval lies on the worse side. The top one is
`best`; when every other one is `tied`, a sentence says that nothing is distinguishable. Repeats
(jobs differing only in seed and/or fold) are never ranked against each other: they are one
configuration, summarised by mean +/- sd and, for k-fold, by the pooled out-of-fold figure.
Exact ties for the top place are broken by the higher val AP, then the lower val loss, then the
lower job number; the summary says where this rule applied.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from tb_lightning.core.artefacts import read_data_root, relative_path
from tb_lightning.core.atomic import atomic_write
from tb_lightning.core.choices import loss_label
from tb_lightning.core.tasks import ERROR_FILE
from tb_lightning.evaluation import compare
from tb_lightning.evaluation.compare import Difference, Scored
from tb_lightning.evaluation.report import TRAINING_LOSS_KEY
from tb_lightning.stats.metrics import METRICS
from tb_lightning.sweep.naming import REPEAT_KEYS, parse_overrides


def split_columns(split: str, threshold: bool) -> tuple[tuple[str, str], ...]:
    """(metrics.json key, short column title) of the figures stats/metrics.py's table shows for
    `split` (`Metric.sweep`): threshold-free figures first (they rank the jobs), then, with
    `threshold`, the job's operating threshold, then the figures at it."""
    shown = [m for m in METRICS if split in m.sweep]
    free = [(f"{split}/{m.key}", m.column_title(split)) for m in shown if m.threshold_free]
    at = [(f"{split}/{m.key}", m.column_title(split)) for m in shown if not m.threshold_free]
    return (*free, *([("threshold", "threshold")] if threshold else []), *at)


VAL_COLUMNS = split_columns("val", threshold=True)
# Shown when a job has a held-out test split (data.test_size).
TEST_COLUMNS = split_columns("test", threshold=False)
METRIC_COLUMNS = VAL_COLUMNS + TEST_COLUMNS
# Figures printed with their 95% interval (bootstrap for AUROC, Wilson for the rates), read
# from metrics.json's `<split>.overall.ci`; CSV columns `<split>_<name>_ci_low/high`.
WITH_INTERVALS = tuple(
    f"{split}/{m.key}"
    for split in ("val", "test")
    for m in METRICS
    if m.sweep_interval and split in m.sweep
)
FOLD_KEY = "data.fold"
# The configuration's name when the sweep varies nothing but repeat keys.
ONLY_CONFIGURATION = "all jobs"


@dataclass
class JobResult:
    """One job of a multirun, as found on disk."""

    job: str
    run_dir: Path
    overrides: dict[str, str]
    status: str  # ok | failed | incomplete
    metrics: dict[str, float] = field(default_factory=dict)
    # metrics.json key -> (low, high) of its 95% interval.
    intervals: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    threshold_policy: str = ""  # how its operating threshold was chosen (threshold.policy)
    pos_weight: float = 1.0
    focal_gamma: float = 0.0  # its training loss (stats/loss.py); 0: the weighted BCE
    error: str = ""
    configuration: str = ""
    # The verdict of the job's configuration when it is that configuration's only run ("" for
    # repeats: they are not ranked against each other).
    verdict: str = ""
    difference: Difference | None = None

    @property
    def unit(self) -> str:
        """Which repeat it is apart from its fold: its seed (jobs of one seed pool their folds)."""
        seed = self.overrides.get("seed")
        return f"seed={seed}" if seed is not None else "run"


@dataclass
class Configuration:
    """The jobs of a sweep that differ only in repeat keys."""

    name: str
    jobs: list[JobResult]
    # unit -> predictions on its validation images (folds pooled); None when some finished job
    # has no predictions.csv (an older run) or a unit's folds overlap.
    units: dict[str, Scored] | None = None
    value: float = math.nan  # the ranking metric (on the units; else the mean of the runs)
    oof: tuple[float, float, float] | None = None  # pooled out-of-fold AUROC, its interval
    verdict: str = ""
    difference: Difference | None = None
    note: str = ""

    @property
    def ok(self) -> list[JobResult]:
        return [j for j in self.jobs if j.status == "ok"]

    @property
    def is_kfold(self) -> bool:
        return len({j.overrides.get(FOLD_KEY) for j in self.ok} - {None}) > 1


@dataclass
class Summary:
    """Everything the three files say."""

    jobs: list[JobResult]
    keys: list[str]  # override keys that vary between jobs
    configurations: list[Configuration]
    metric: str  # the metric configurations are ranked and compared by
    requested_metric: str  # optimized_metric, when it cannot be compared (then val/auroc)
    top: Configuration | None = None
    tie_note: str = ""
    sweep_dir: Path = Path(".")  # the multirun folder: run_dir columns are relative to it

    @property
    def losses(self) -> list[str]:
        """The training losses of the finished jobs (stats/loss.py loss_label), in order."""
        return sorted({loss_label(j.focal_gamma) for j in self.jobs if j.status == "ok"})

    @property
    def losses_differ(self) -> bool:
        """Jobs trained with different losses: their val losses measure different things."""
        return len(self.losses) > 1

    @property
    def has_repeats(self) -> bool:
        return any(len(c.ok) > 1 for c in self.configurations)


def job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def _intervals(stored: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    found = {}
    for key in WITH_INTERVALS:
        split, name = key.split("/")
        ci = (((stored.get(split) or {}).get("overall") or {}).get("ci") or {}).get(name)
        if isinstance(ci, list) and len(ci) == 2:
            found[key] = (ci[0], ci[1])
    return found


def collect_jobs(sweep_dir: str | Path) -> list[JobResult]:
    """Every job directory under sweep_dir (those holding `.hydra/overrides.yaml`)."""
    jobs = []
    for overrides_file in Path(sweep_dir).glob("*/.hydra/overrides.yaml"):
        run_dir = overrides_file.parent.parent
        overrides = parse_overrides(OmegaConf.load(overrides_file))
        error_file, metrics_file = run_dir / ERROR_FILE, run_dir / "metrics.json"
        if error_file.is_file():
            job = JobResult(
                run_dir.name, run_dir, overrides, "failed", error=error_file.read_text()
            )
        elif metrics_file.is_file():
            stored = json.loads(metrics_file.read_text())
            metrics = {k: float(v) for k, v in stored.items() if isinstance(v, int | float)}
            choice = stored.get("threshold") or {}
            if isinstance(choice, dict) and "value" in choice:
                metrics["threshold"] = float(choice["value"])
            job = JobResult(run_dir.name, run_dir, overrides, "ok", metrics, _intervals(stored))
            job.threshold_policy = str(choice.get("policy", "")) if isinstance(choice, dict) else ""
            job.pos_weight = float(stored.get("pos_weight") or 1.0)
            # A run written before model.loss existed was trained with the weighted BCE.
            loss = stored.get(TRAINING_LOSS_KEY) or {}
            job.focal_gamma = float(loss.get("focal_gamma") or 0.0)
        else:
            job = JobResult(run_dir.name, run_dir, overrides, "incomplete")
        jobs.append(job)
    return sorted(jobs, key=lambda j: job_sort_key(j.run_dir))


def varying_keys(jobs: Sequence[JobResult]) -> list[str]:
    """Override keys whose value differs between jobs (all keys when there is one job)."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    if len(jobs) < 2:
        return keys
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def configuration_name(job: JobResult, keys: Sequence[str]) -> str:
    """The job's values of the varying keys that are not repeat keys."""
    parts = [f"{k}={job.overrides[k]}" for k in keys if k not in REPEAT_KEYS and k in job.overrides]
    return " ".join(parts) or ONLY_CONFIGURATION


def val_predictions(job: JobResult) -> Scored | None:
    """The job's validation predictions (train's predictions.csv), None for an older run."""
    path = job.run_dir / "predictions.csv"
    if not path.is_file():
        return None
    from tb_lightning.trained.runner import probabilities  # torch: only when there are some

    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split") == "val"]
    if not rows or "logit" not in rows[0]:
        return None
    logits = np.array([float(r["logit"]) for r in rows], dtype=np.float32)
    # Images are paired by their full path: the relative ones joined to the data root that
    # predictions.json names (a run written before it has full paths in the file).
    root = read_data_root(job.run_dir)
    return Scored(
        tuple(os.path.join(root, r["path"]) if root else r["path"] for r in rows),
        np.array([int(r["label"]) for r in rows]),
        logits,
        probabilities(logits),
        job.pos_weight,
        job.focal_gamma,
    )


def load_units(configuration: Configuration) -> dict[str, Scored] | None:
    """unit -> the configuration's predictions in it (a seed's folds pooled)."""
    by_unit: dict[str, list[tuple[str | None, Scored]]] = {}
    for job in configuration.ok:
        scored = val_predictions(job)
        if scored is None:
            return None
        by_unit.setdefault(job.unit, []).append((job.overrides.get(FOLD_KEY), scored))
    units = {}
    for unit, parts in by_unit.items():
        folds = [fold for fold, _ in parts]
        keys = [k for _, s in parts for k in s.keys]
        if len(parts) > 1 and (None in folds or len(set(folds)) < len(folds)):
            return None  # two runs of one unit that are not distinct folds: nothing to pool
        if len(set(keys)) < len(keys):
            return None  # folds whose val images overlap are no k-fold split
        units[unit] = compare.pooled([s for _, s in parts])
    return units


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); sd NaN for a single value."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def column_stats(configuration: Configuration, key: str) -> tuple[float, float]:
    return mean_sd([j.metrics[key] for j in configuration.ok if key in j.metrics])


def summarise(sweep_dir: str | Path, metric: str = "val/auroc") -> Summary:
    """Read the jobs, group them into configurations, rank and compare those."""
    jobs = collect_jobs(sweep_dir)
    keys = varying_keys(jobs)
    compared = metric if metric in compare.METRICS else "val/auroc"
    groups: dict[str, list[JobResult]] = {}
    for job in jobs:
        job.configuration = configuration_name(job, keys)
        groups.setdefault(job.configuration, []).append(job)
    configurations = [Configuration(name, members) for name, members in groups.items()]
    summary = Summary(jobs, keys, configurations, compared, metric, sweep_dir=Path(sweep_dir))
    if compared == "val/loss" and summary.losses_differ:
        # Each job's val loss is its own training loss: no common scale to rank on.
        summary.metric = compared = "val/auroc"
    for configuration in configurations:
        if not configuration.ok:
            continue
        configuration.units = load_units(configuration)
        if configuration.units:
            configuration.value = compare.figure(configuration.units, compared)
            if configuration.is_kfold:
                oof = compare.figure(configuration.units, "val/auroc")
                configuration.oof = (oof, *compare.interval(configuration.units, "val/auroc"))
        else:
            configuration.value = column_stats(configuration, compared)[0]
            configuration.note = "no predictions.csv in some job (an older run): not compared"
    rank(summary)
    return summary


def _tie_key(configuration: Configuration, use_loss: bool = True) -> tuple[float, float, int]:
    """The documented tie rule: higher val AP, then lower val loss (not when the jobs' training
    losses differ), then the earlier job."""
    ap = column_stats(configuration, "val/average_precision")[0]
    loss = column_stats(configuration, "val/loss")[0] if use_loss else math.nan
    first = min(job_sort_key(j.run_dir) for j in configuration.jobs)[0]
    return (
        -(ap if not math.isnan(ap) else -math.inf),
        loss if not math.isnan(loss) else math.inf,
        first,
    )


def rank(summary: Summary) -> None:
    """The top configuration, and every other one's paired difference and verdict."""
    ranked = [c for c in summary.configurations if c.ok and not math.isnan(c.value)]
    if len(ranked) < 2:
        return  # one configuration (repeats, k-fold): nothing to rank
    sign = 1 if compare.HIGHER_IS_BETTER[summary.metric] else -1
    best_value = max(sign * c.value for c in ranked)
    leaders = sorted(
        (c for c in ranked if sign * c.value == best_value),
        key=lambda c: _tie_key(c, use_loss=not summary.losses_differ),
    )
    top = leaders[0]
    summary.top = top
    top.verdict = "best"
    if len(leaders) > 1:
        others = ", ".join(_label(c, summary) for c in leaders[1:])
        summary.tie_note = (
            f"{_label(top, summary)} and {others} tie exactly on {_title(summary.metric)} "
            f"({top.value:.4f}); {_label(top, summary)} is put first by the tie rule (higher val "
            + (
                "AP, then the earlier job)."
                if summary.losses_differ
                else "AP, then lower val loss, then the earlier job)."
            )
        )
    for configuration in ranked:
        if configuration is top:
            continue
        if top.units is None or configuration.units is None:
            continue
        difference = compare.paired_difference(top.units, configuration.units, summary.metric)
        configuration.difference = difference
        configuration.verdict = compare.verdict(difference, summary.metric)
        if difference is None:
            configuration.note = "not compared: other validation images than the top one"
    for configuration in summary.configurations:
        if len(configuration.jobs) == 1:
            configuration.jobs[0].verdict = configuration.verdict
            configuration.jobs[0].difference = configuration.difference


# --- text ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _title(key: str) -> str:
    return dict(METRIC_COLUMNS).get(key, key)


def _label(configuration: Configuration, summary: Summary) -> str:
    """`job 3 (model.optimizer.lr=0.001)` without repeats, else the configuration's name."""
    if not summary.has_repeats and len(configuration.jobs) == 1:
        job = configuration.jobs[0]
        return f"job {job.job} ({configuration.name})" if configuration.name else f"job {job.job}"
    return f"`{configuration.name}`"


def _with_interval(value: float | None, ci: tuple[float | None, float | None] | None) -> str:
    if value is None or math.isnan(value):
        return ""
    if not ci or ci[0] is None or ci[1] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _difference_text(difference: Difference | None) -> str:
    if difference is None:
        return ""
    return f"{difference.value:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}]"


def compared_on(difference: Difference | None, kfold: bool) -> str:
    if difference is None:
        return ""
    images = f"{difference.images} {'out-of-fold' if kfold else 'val'} images"
    return images + (f", {difference.units} seeds" if difference.units > 1 else "")


def job_folder(job: JobResult, summary: Summary) -> str:
    """The job's run directory relative to the multirun folder (core/artefacts.py)."""
    return relative_path(job.run_dir, summary.sweep_dir)


def metric_columns(jobs: Sequence[JobResult]) -> tuple[tuple[str, str], ...]:
    """The val columns, and the test columns when some job has a held-out test split."""
    has_test = any(key in j.metrics for j in jobs for key, _ in TEST_COLUMNS)
    return METRIC_COLUMNS if has_test else VAL_COLUMNS


def _ci_columns(key: str) -> list[str]:
    stem = key.replace("/", "_")
    return [f"{stem}_ci_low", f"{stem}_ci_high"]


def _overrides_text(job: JobResult, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={job.overrides[k]}" for k in keys if k in job.overrides)


def summary_csv(summary: Summary) -> str:
    """One row per job. The `@thr` figures are at each job's own operating threshold, chosen as
    `threshold_policy` says; `verdict`/`difference*` compare the job's configuration with the
    top one (empty for repeats, which are compared as a configuration)."""
    columns = metric_columns(summary.jobs)
    header = ["job", "status", "configuration", "overrides"]
    for key, _ in columns:
        header += [key] + (_ci_columns(key) if key in WITH_INTERVALS else [])
    header += ["threshold_policy", "verdict", "difference", "difference_ci_low"]
    header += ["difference_ci_high", "compared_on", "run_dir", "error"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for job in summary.jobs:
        row = [job.job, job.status, job.configuration, _overrides_text(job, summary.keys)]
        for key, _ in columns:
            row.append(_fmt(job.metrics.get(key)))
            if key in WITH_INTERVALS:
                row += [_fmt(v) for v in job.intervals.get(key, (None, None))]
        d = job.difference
        row += [job.threshold_policy, job.verdict]
        row += [_fmt(d.value), _fmt(d.low), _fmt(d.high)] if d else ["", "", ""]
        row += [compared_on(d, False), job_folder(job, summary), job.error.strip()]
        writer.writerow(row)
    return out.getvalue()


def configurations_csv(summary: Summary) -> str:
    """One row per configuration: runs, mean and sd of each figure, the pooled out-of-fold
    AUROC of a k-fold configuration, the ranking value and the verdict."""
    columns = metric_columns(summary.jobs)
    header = ["configuration", "n_runs", "n_failed", "units"]
    for key, _ in columns:
        stem = key.replace("/", "_")
        header += [f"{stem}_mean", f"{stem}_sd"]
    header += ["oof_auroc", "oof_auroc_ci_low", "oof_auroc_ci_high", "ranked_by", "rank_value"]
    header += ["verdict", "difference", "difference_ci_low", "difference_ci_high"]
    header += ["compared_on", "note"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for c in summary.configurations:
        row: list[Any] = [c.name, len(c.ok), len(c.jobs) - len(c.ok), _units_text(c)]
        for key, _ in columns:
            mean, sd = column_stats(c, key)
            row += [_fmt(mean), _fmt(sd)]
        row += [_fmt(v) for v in c.oof] if c.oof else ["", "", ""]
        row += [summary.metric, _fmt(c.value), c.verdict]
        d = c.difference
        row += [_fmt(d.value), _fmt(d.low), _fmt(d.high)] if d else ["", "", ""]
        row += [compared_on(d, c.is_kfold), c.note]
        writer.writerow(row)
    return out.getvalue()


def _units_text(configuration: Configuration) -> str:
    """`folds 0,1,2` / `seeds 0,1` / `seeds 0,1 x folds 0,1,2`: what its runs repeat."""
    parts = []
    for key, word in (("seed", "seeds"), (FOLD_KEY, "folds")):
        values = sorted({j.overrides[key] for j in configuration.ok if key in j.overrides})
        if len(values) > 1:
            parts.append(f"{word} {','.join(values)}")
    return " x ".join(parts)


def conclusion(summary: Summary) -> list[str]:
    """The summary's first paragraph: what can be concluded, in words."""
    metric = _title(summary.metric)
    lines = []
    if summary.requested_metric != summary.metric:
        why = (
            "compares different training losses here"
            if summary.requested_metric == "val/loss"
            else "is not threshold-free"
        )
        lines.append(
            f"optimized_metric={summary.requested_metric} {why}, so the "
            f"configurations are ranked and compared by {metric} instead."
        )
    if summary.losses_differ:
        lines.append(
            "The jobs were trained with different losses (" + ", ".join(summary.losses) + "): "
            "each val loss is its job's own training loss, so the val loss columns do not "
            "compare between them and break no tie."
        )
    ranked = [c for c in summary.configurations if c.ok and not math.isnan(c.value)]
    if summary.top is None:
        if len(ranked) == 1:
            c = ranked[0]
            what = f"{len(c.ok)} runs ({_units_text(c) or 'repeats'})" if len(c.ok) > 1 else "1 run"
            text = f"One configuration, {what}: nothing is ranked."
            if c.oof:
                text += (
                    f" Its folds' pooled out-of-fold val AUROC is {c.oof[0]:.3f} "
                    f"[{c.oof[1]:.3f}, {c.oof[2]:.3f}]; the folds are repeats, not rivals."
                )
            lines.append(text)
        else:
            lines.append("No finished job: nothing to conclude.")
        return lines
    top = summary.top
    chance = chance_sentence(top, summary)
    tied = [c for c in ranked if c.verdict == "tied"]
    worse = [c for c in ranked if c.verdict == "worse"]
    better = [c for c in ranked if c.verdict == "better"]
    uncompared = [c for c in ranked if c is not top and not c.verdict]
    noun = "configuration" if summary.has_repeats else "job"
    if not worse and not better and tied and not uncompared:
        lines.append(
            f"**No {noun} is distinguishable from the top one** ({_label(top, summary)}, "
            f"{metric} {top.value:.3f}): the 95% interval of every paired difference with it "
            "includes 0, so the differences are within the noise of these validation images"
            + (" and seeds" if _max_units(ranked) > 1 else "")
            + ". Treat them as equally good here; telling them apart needs more images "
            "(e.g. sweep=kfold) or repeats (seed=0,1,2)."
        )
    else:
        if tied:
            # A "best" only where it beats the noise: with ties, the top one is only the
            # highest of a group the data cannot order.
            lines.append(
                f"**Top: {_label(top, summary)}**, {metric} {top.value:.3f}, but not "
                f"distinguishable from {_count(len(tied), 'other ' + noun)} (`tied`, below): the "
                f"best of this sweep is one of these {len(tied) + 1}, not shown to be this one."
            )
        else:
            lines.append(
                f"**Best: {_label(top, summary)}**, {metric} {top.value:.3f}, ahead of every "
                f"other {noun} beyond the noise."
            )
        if tied:
            lines.append(
                f"Within the noise of it (`tied`, the 95% interval of the paired difference "
                f"includes 0): {', '.join(_label(c, summary) for c in tied)}."
            )
        if worse:
            lines.append(
                f"Worse beyond the noise (`worse`): {', '.join(_label(c, summary) for c in worse)}."
            )
        if better:
            lines.append(
                "Better than the top one on the runs both have (`better`; the top one leads on "
                f"all of its own): {', '.join(_label(c, summary) for c in better)}."
            )
    if uncompared:
        lines.append(
            f"Not compared ({uncompared[0].note or 'no paired predictions'}): "
            f"{', '.join(_label(c, summary) for c in uncompared)}."
        )
    if summary.tie_note:
        lines.append(summary.tie_note)
    if chance:
        lines.append(chance)
    return lines


def chance_sentence(top: Configuration, summary: Summary) -> str:
    """A warning when even the top configuration is not shown to beat chance: its val AUROC's
    95% interval (its run's, or over its repeats' images and seeds) includes 0.5."""
    if len(top.ok) == 1:
        value = top.ok[0].metrics.get("val/auroc", math.nan)
        low, high = top.ok[0].intervals.get("val/auroc", (None, None))
    elif top.units:
        value = compare.figure(top.units, "val/auroc")
        low, high = top.oof[1:] if top.oof else compare.interval(top.units, "val/auroc")
    else:
        return ""
    if low is None or high is None or not low <= 0.5 <= high:
        return ""
    return (
        f"**Warning: even the top one is not shown to beat chance**: its val AUROC {value:.3f} "
        f"has the 95% interval [{low:.3f}, {high:.3f}], which includes 0.5. None of these "
        "configurations is evidence that the model learned anything."
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _max_units(configurations: Sequence[Configuration]) -> int:
    return max((len(c.units or {}) for c in configurations), default=0)


def summary_markdown(summary: Summary) -> str:
    columns = metric_columns(summary.jobs)
    policies = sorted({j.threshold_policy for j in summary.jobs if j.threshold_policy})
    chosen_by = f"threshold.policy={'/'.join(policies)}" if policies else "threshold.policy"
    n_conf = len(summary.configurations)
    lines = [
        f"# Sweep summary: {_count(len(summary.jobs), 'job')}, "
        f"{_count(n_conf, 'configuration')}, ranked by {_title(summary.metric)}",
        "",
        *(part for line in conclusion(summary) for part in (line, "")),
        "How to read it: `best` is the configuration with the best "
        f"{_title(summary.metric)}; each other one is compared with it on the same validation "
        "images (a paired bootstrap of the difference, 2000 resamples"
        + (", seeds resampled too" if summary.has_repeats else "")
        + "): `tied` when the 95% interval of the difference includes 0 (within the noise: "
        "not shown to be worse), `worse` when the whole interval is below the top one. "
        "Repeats of one configuration (jobs differing only in seed or data.fold) are never "
        "ranked against each other. Intervals: val AUROC bootstrap, sensitivity and "
        "specificity Wilson score. `threshold` is each job's own operating threshold "
        f"(p_tb >= it is called Tuberculosis), chosen on its validation split by {chosen_by}; "
        "the `@thr` figures on the validation split are optimistic (the threshold was chosen "
        "on those images)"
        + (
            ", on the held-out test split they are not."
            if columns is METRIC_COLUMNS
            else "; data.test_size holds out a test split that is scored at it too."
        ),
        "",
        "## Jobs",
        "",
    ]
    titles = []
    for key, title in columns:
        titles.append(f"{title} [95% CI]" if key in WITH_INTERVALS else title)
        if key == summary.metric and not summary.has_repeats:
            titles += [f"Δ {title} vs best [95% CI]", "verdict"]
    lines += [
        "| job | status | overrides | " + " | ".join(titles) + " | run dir |",
        "|---|---|---|" + "---:|" * len(titles) + "---|",
    ]
    for job in summary.jobs:
        status = job.status
        if job.error:
            status = f"failed: {' '.join(job.error.split())}".replace("|", "\\|")
        cells = []
        for key, _ in columns:
            value = job.metrics.get(key)
            cells.append(
                _with_interval(value, job.intervals.get(key))
                if key in WITH_INTERVALS
                else _fmt(value)
            )
            if key == summary.metric and not summary.has_repeats:
                verdict = f"**{job.verdict}**" if job.verdict == "best" else job.verdict
                cells += [_difference_text(job.difference), verdict]
        lines.append(
            f"| {job.job} | {status} | {_overrides_text(job, summary.keys)} | "
            + " | ".join(cells)
            + f" | {job_folder(job, summary)} |"
        )
    if summary.has_repeats:
        lines += configurations_markdown(summary, columns)
    return "\n".join(lines) + "\n"


def configurations_markdown(summary: Summary, columns: Sequence[tuple[str, str]]) -> list[str]:
    any_kfold = any(c.oof for c in summary.configurations)
    titles = ["configuration", "runs"]
    titles += [f"{title} mean ± sd" for _, title in columns]
    if any_kfold:
        titles.append("pooled out-of-fold val AUROC [95% CI]")
    if summary.top is not None:
        titles += [f"Δ {_title(summary.metric)} vs best [95% CI]", "verdict"]
    lines = [
        "",
        "## Configurations",
        "",
        "Repeats (seeds, folds) of one configuration pooled: mean ± sample sd (n - 1) over "
        "its runs; each run has its own threshold, so the `@thr` means are over different "
        "thresholds."
        + (
            " Pooled out-of-fold: every fold's validation images scored by the model that did "
            "not train on them, as one set (averaged over seeds)."
            if any_kfold
            else ""
        ),
        "",
        "| " + " | ".join(titles) + " |",
        "|---|---:|" + "---:|" * (len(titles) - 2),
    ]
    for c in summary.configurations:
        cells = [c.name, f"{len(c.ok)}" + (f" ({_units_text(c)})" if _units_text(c) else "")]
        for key, _ in columns:
            mean, sd = column_stats(c, key)
            cells.append("" if math.isnan(mean) else f"{mean:.4f} ± {_fmt(sd) or 'n/a'}")
        if any_kfold:
            cells.append(_with_interval(c.oof[0], c.oof[1:]) if c.oof else "")
        if summary.top is not None:
            verdict = f"**{c.verdict}**" if c.verdict == "best" else c.verdict
            cells += [_difference_text(c.difference), verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary(sweep_dir: str | Path, metric: str = "val/auroc") -> Summary:
    """Write sweep_summary.csv/.md and sweep_configurations.csv into sweep_dir."""
    sweep_dir = Path(sweep_dir)
    summary = summarise(sweep_dir, metric)
    atomic_write(sweep_dir / "sweep_summary.csv", summary_csv(summary))
    atomic_write(sweep_dir / "sweep_configurations.csv", configurations_csv(summary))
    atomic_write(sweep_dir / "sweep_summary.md", summary_markdown(summary))
    return summary
