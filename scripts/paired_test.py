"""Models compared on the same test images, as docs/experiments.md reports them: each one's
AUROC, its sensitivity and specificity at its own operating threshold, the best specificity the
test ROC allows at sensitivity >= 0.90 (an oracle: that threshold is read off the test images),
and its paired difference in AUROC and average precision with the first one.

    python scripts/paired_test.py NAME=<eval dir> [NAME=<eval dir> ...]

Each eval dir is a `python -m tb_lightning.eval ... eval.split=test` run folder (its
predictions.csv and predictions.json). The paired intervals come from the sweep summary's own
paired bootstrap (evaluation/compare.py: the same images resampled for both models, 2000
resamples, stratified), so they are the summaries' verdicts, on test images.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from tb_lightning.evaluation import compare
from tb_lightning.evaluation.compare import Scored

SCREENING_SENSITIVITY = 0.90


def read_eval(folder: Path) -> tuple[Scored, float]:
    """The eval run's predictions keyed by full path, and its operating threshold."""
    sidecar = json.loads((folder / "predictions.json").read_text())
    root = Path(sidecar["data_root"])
    with (folder / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([float(r["p_tb"]) for r in rows])
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    scored = Scored(
        tuple(str(root / r["path"]) for r in rows),
        np.array([int(r["label"]) for r in rows]),
        np.log(clipped / (1 - clipped)),  # only the loss would use it; not reported here
        probs,
    )
    return scored, float(sidecar["threshold"])


def rates(scored: Scored, threshold: float) -> tuple[float, float]:
    called = scored.probs >= threshold
    tb = scored.labels == 1
    return float(called[tb].mean()), float((~called[~tb]).mean())


def best_specificity_at(scored: Scored, sensitivity: float) -> float:
    """The highest specificity of any threshold whose sensitivity on these images is at least
    `sensitivity` (every distinct p_tb tried as the threshold)."""
    best = 0.0
    for threshold in np.unique(scored.probs):
        sens, spec = rates(scored, threshold)
        if sens >= sensitivity:
            best = max(best, spec)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=EVAL_DIR")
    args = parser.parse_args()
    pairs = [run.split("=", 1) for run in args.runs]
    runs = [(name, read_eval(Path(folder))) for name, folder in pairs]
    reference_name, (reference, _) = runs[0]
    print(
        f"| model | test AUROC [95% CI] | sens / spec at its threshold | best spec at sens >= "
        f"{SCREENING_SENSITIVITY:.2f} on the test ROC (oracle) | Δ AUROC vs {reference_name} "
        f"[95% CI] | Δ AP vs {reference_name} [95% CI] |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, (scored, threshold) in runs:
        units = {"run": scored}
        auroc = compare.figure(units, "val/auroc")  # the metric by its key: any image set
        low, high = compare.interval(units, "val/auroc")
        sens, spec = rates(scored, threshold)
        oracle = best_specificity_at(scored, SCREENING_SENSITIVITY)
        cells = []
        for metric in ("val/auroc", "val/average_precision"):
            if name == reference_name:
                cells.append("-")
                continue
            diff = compare.paired_difference({"run": reference}, units, metric)
            cells.append(
                "no shared images"
                if diff is None
                else f"{diff.value:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] ({diff.images} images)"
            )
        print(
            f"| {name} | {auroc:.3f} [{low:.3f}, {high:.3f}] | {sens:.3f} / {spec:.3f} "
            f"(p_tb >= {threshold:.3f}) | {oracle:.3f} | {cells[0]} | {cells[1]} |"
        )


if __name__ == "__main__":
    main()
