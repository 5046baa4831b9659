"""The sweep summary: one row per job of a multirun (overrides, best val metrics, run dir).

Read from the multirun directory itself (each job's `.hydra/overrides.yaml`, `metrics.json`, and
`error.txt` for a failed job), so it works for any launcher and can be rewritten after each job.
Jobs that differ only by `data.fold` also get a mean and standard deviation row per group.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from tb_lightning.core.atomic import atomic_write
from tb_lightning.core.tasks import ERROR_FILE
from tb_lightning.sweep.naming import parse_overrides

# (metrics.json key, short column title): threshold-free figures first (they rank the jobs),
# then the job's operating threshold and the figures at it.
VAL_COLUMNS = (
    ("val/auroc", "val AUROC"),
    ("val/average_precision", "val AP"),
    ("val/loss", "val loss"),
    ("threshold", "threshold"),
    ("val/sensitivity", "val sens @thr"),
    ("val/specificity", "val spec @thr"),
)
# Shown when a job has a held-out test split (data.test_size).
TEST_COLUMNS = (
    ("test/auroc", "test AUROC"),
    ("test/sensitivity", "test sens @thr"),
    ("test/specificity", "test spec @thr"),
)
METRIC_COLUMNS = VAL_COLUMNS + TEST_COLUMNS
FOLD_KEY = "data.fold"


@dataclass
class JobResult:
    """One job of a multirun, as found on disk."""

    job: str
    run_dir: Path
    overrides: dict[str, str]
    status: str  # ok | failed | incomplete
    metrics: dict[str, float] = field(default_factory=dict)
    threshold_policy: str = ""  # how its operating threshold was chosen (threshold.policy)
    error: str = ""
    best: bool = False


def job_sort_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


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
            job = JobResult(run_dir.name, run_dir, overrides, "ok", metrics)
            job.threshold_policy = str(choice.get("policy", "")) if isinstance(choice, dict) else ""
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


def mark_best(jobs: Sequence[JobResult], metric: str, direction: str = "maximize") -> None:
    """Flag the successful job with the best `metric` (ties: the first)."""
    candidates = [
        j for j in jobs if j.status == "ok" and not math.isnan(j.metrics.get(metric, math.nan))
    ]
    if not candidates:
        return
    pick = max if direction == "maximize" else min
    pick(candidates, key=lambda j: j.metrics[metric]).best = True


def fold_groups(
    jobs: Sequence[JobResult], keys: Sequence[str], fold_key: str = FOLD_KEY
) -> list[tuple[str, list[JobResult]]]:
    """Successful jobs that differ only by `fold_key`, grouped by their other swept values."""
    if fold_key not in keys:
        return []
    others = [k for k in keys if k != fold_key]
    groups: dict[str, list[JobResult]] = {}
    for job in jobs:
        if job.status == "ok" and fold_key in job.overrides:
            label = " ".join(f"{k}={job.overrides.get(k, '')}" for k in others)
            groups.setdefault(label, []).append(job)
    return [(label, members) for label, members in groups.items() if len(members) >= 2]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1), the usual k-fold report."""
    return statistics.fmean(values), statistics.stdev(values)


def summarise(
    sweep_dir: str | Path, metric: str = "val/auroc", direction: str = "maximize"
) -> tuple[list[JobResult], list[str], list[tuple[str, list[JobResult]]]]:
    jobs = collect_jobs(sweep_dir)
    keys = varying_keys(jobs)
    mark_best(jobs, metric, direction)
    return jobs, keys, fold_groups(jobs, keys)


def metric_columns(jobs: Sequence[JobResult]) -> tuple[tuple[str, str], ...]:
    """The val columns, and the test columns when some job has a held-out test split."""
    has_test = any("test/auroc" in j.metrics for j in jobs)
    return METRIC_COLUMNS if has_test else VAL_COLUMNS


def _fmt(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.4f}"


def _overrides_text(job: JobResult, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={job.overrides[k]}" for k in keys if k in job.overrides)


def _group_stats(members: Sequence[JobResult], key: str) -> tuple[float, float]:
    values = [j.metrics[key] for j in members if key in j.metrics]
    return mean_std(values) if len(values) >= 2 else (math.nan, math.nan)


def summary_csv(jobs, keys, groups) -> str:
    """One row per job (and mean/std rows per k-fold group); `threshold_policy` says how each
    job's threshold, at which the `@thr` columns are, was chosen."""
    columns = metric_columns(jobs)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "job",
            "status",
            "overrides",
            *(k for k, _ in columns),
            "threshold_policy",
            "best",
            "run_dir",
            "error",
        ]
    )
    for job in jobs:
        writer.writerow(
            [
                job.job,
                job.status,
                _overrides_text(job, keys),
                *(_fmt(job.metrics.get(k)) for k, _ in columns),
                job.threshold_policy,
                "best" if job.best else "",
                str(job.run_dir),
                job.error.strip(),
            ]
        )
    for label, members in groups:
        stats = [_group_stats(members, k) for k, _ in columns]
        for i, name in enumerate(("mean", "std")):
            writer.writerow(
                [
                    f"{name} over {len(members)} folds",
                    "aggregate",
                    label,
                    *(_fmt(s[i]) for s in stats),
                    "",
                    "",
                    "",
                    "",
                ]
            )
    return out.getvalue()


def summary_markdown(jobs, keys, groups, metric: str, direction: str) -> str:
    columns = metric_columns(jobs)
    titles = [title for _, title in columns]
    policies = sorted({j.threshold_policy for j in jobs if j.threshold_policy})
    chosen_by = f"threshold.policy={'/'.join(policies)}" if policies else "threshold.policy"
    lines = [
        f"# Sweep summary ({len(jobs)} jobs; best = {direction} {metric}, marked **best**)",
        "",
        "Threshold-free: val AUROC, val AP (average precision) and val loss rank the jobs. "
        "`threshold` is each job's own operating threshold (p_tb >= it is called "
        f"Tuberculosis), chosen on that job's validation split by {chosen_by}; the `@thr` "
        "columns are sensitivity and specificity at it: on the validation split they are "
        "optimistic (the threshold was chosen on those images)"
        + (
            ", on the held-out test split they are not."
            if columns is METRIC_COLUMNS
            else "; data.test_size holds out a test split that is scored at it too."
        ),
        "",
        "| job | status | overrides | " + " | ".join(titles) + " | best | run dir |",
        "|---|---|---|" + "---:|" * len(titles) + "---|---|",
    ]
    for job in jobs:
        status = job.status
        if job.error:
            status = f"failed: {' '.join(job.error.split())}".replace("|", "\\|")
        values = [_fmt(job.metrics.get(k)) for k, _ in columns]
        if job.best:
            values = [f"**{v}**" for v in values]
        lines.append(
            f"| {job.job} | {status} | {_overrides_text(job, keys)} | "
            + " | ".join(values)
            + f" | {'**best**' if job.best else ''} | {job.run_dir} |"
        )
    for label, members in groups:
        cells = []
        for key, _ in columns:
            mean, std = _group_stats(members, key)
            cells.append("" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        lines.append(
            f"| mean ± std | {len(members)} folds | {label} | " + " | ".join(cells) + " |  |  |"
        )
    if groups:
        lines += [
            "",
            "mean ± std: over the folds of each group; std is the sample std (n - 1). Each fold "
            "has its own threshold, so the `@thr` means are over different thresholds.",
        ]
    return "\n".join(lines) + "\n"


def write_summary(
    sweep_dir: str | Path, metric: str = "val/auroc", direction: str = "maximize"
) -> list[JobResult]:
    """Write sweep_summary.csv and sweep_summary.md into sweep_dir; return the jobs."""
    sweep_dir = Path(sweep_dir)
    jobs, keys, groups = summarise(sweep_dir, metric, direction)
    atomic_write(sweep_dir / "sweep_summary.csv", summary_csv(jobs, keys, groups))
    atomic_write(
        sweep_dir / "sweep_summary.md", summary_markdown(jobs, keys, groups, metric, direction)
    )
    return jobs
