"""Each fold model alone against the k-fold ensemble, on the held-out test split the folds share:
the markdown table of docs/experiments.md.

    python scripts/fold_table.py NAME=<k-fold multirun dir>=<eval dir of its ensemble> [...]

The fold rows come from each job's metrics.json (train's final report: the test split at the
fold's own threshold, chosen on its val fold, which it did not train on); the ensemble row from
the metrics.json of `python -m tb_lightning.eval ckpt_path=<multirun dir> eval.split=test`
(the threshold chosen on the pooled out-of-fold predictions). Nothing is computed here but the
mean and sample standard deviation over the folds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def test_block(metrics_json: Path) -> dict[str, Any]:
    """The test split's overall figures, with the val AUROC where the file has a val split."""
    metrics = json.loads(metrics_json.read_text())
    if "test" not in metrics:
        raise SystemExit(f"{metrics_json} holds no test split; train with data.test_size.")
    val_auroc = metrics["val"]["overall"]["auroc"] if "val" in metrics else None
    return {**metrics["test"]["overall"], "val_auroc": val_auroc}


def row(name: str, model: str, block: dict[str, Any]) -> str:
    (tn, fp), (fn, tp) = block["confusion_matrix"]
    low, high = block["ci"]["auroc"]
    val = f"{block['val_auroc']:.3f}" if block["val_auroc"] is not None else "-"
    return (
        f"| {name} | {model} | {val} | {block['auroc']:.3f} [{low:.3f}, {high:.3f}] | "
        f"{block['threshold']:.3f} | {block['sensitivity']:.3f} ({tp}/{tp + fn}) | "
        f"{block['specificity']:.3f} ({tn}/{tn + fp}) | {block['ece']:.3f} |"
    )


def config_rows(name: str, multirun: Path, ensemble_eval: Path) -> list[str]:
    jobs = sorted((p for p in multirun.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    folds = [test_block(job / "metrics.json") for job in jobs]
    lines = [row(name, f"fold {job.name} alone", b) for job, b in zip(jobs, folds, strict=True)]
    summary = {
        key: (statistics.mean(b[key] for b in folds), statistics.stdev(b[key] for b in folds))
        for key in ("val_auroc", "auroc", "sensitivity", "specificity", "ece")
    }
    lines.append(
        f"| {name} | folds: mean ± std | {summary['val_auroc'][0]:.3f} ± "
        f"{summary['val_auroc'][1]:.3f} | {summary['auroc'][0]:.3f} ± {summary['auroc'][1]:.3f}"
        f" | (own) | {summary['sensitivity'][0]:.3f} ± {summary['sensitivity'][1]:.3f} | "
        f"{summary['specificity'][0]:.3f} ± {summary['specificity'][1]:.3f} | "
        f"{summary['ece'][0]:.3f} ± {summary['ece'][1]:.3f} |"
    )
    ensemble = test_block(ensemble_eval / "metrics.json")
    lines.append(row(name, f"**{len(jobs)}-fold ensemble**", ensemble))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="NAME=<multirun dir>=<ensemble eval dir>")
    args = parser.parse_args()
    print(
        "| config | model | val AUROC (own fold) | test AUROC [95% CI] | threshold | "
        "test sensitivity | test specificity | test ECE |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.configs:
        name, multirun, ensemble_eval = spec.split("=")
        print("\n".join(config_rows(name, Path(multirun), Path(ensemble_eval))))


if __name__ == "__main__":
    main()
