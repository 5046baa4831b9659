"""The end-of-training report: the seed's text format, and the same numbers as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tb_lightning.data.sources import CLASS_NAMES


def format_seed_report(metrics: Mapping[str, Any], prefix: str = "val") -> str:
    """The seed README's validation report, followed by AUROC and the confusion matrix."""
    lines = [
        f"Validation loss: {metrics[f'{prefix}/loss']:.6f}, "
        f"Validation acc: {100 * metrics[f'{prefix}/acc']:.6f},"
    ]
    for name in CLASS_NAMES:
        lines.append(f"for class {name}:")
        lines.append(
            f" validation precision: {metrics[f'{prefix}/precision/{name}']:.6f}, "
            f"validation recall: {metrics[f'{prefix}/recall/{name}']:.6f} , "
            f"validation F1: {metrics[f'{prefix}/f1/{name}']:.6f}"
        )
    lines.append(f"Validation AUROC: {metrics[f'{prefix}/auroc']:.6f}")
    (tn, fp), (fn, tp) = metrics[f"{prefix}/confusion_matrix"]
    width = max(len(str(v)) for v in (tn, fp, fn, tp)) + 2
    lines.append("Confusion matrix (rows: true, columns: predicted):")
    lines.append(f"{'':>14}{'Normal':>{width + 6}}{'Tuberculosis':>{width + 12}}")
    lines.append(f"{'Normal':>14}{tn:>{width + 6}}{fp:>{width + 12}}")
    lines.append(f"{'Tuberculosis':>14}{fn:>{width + 6}}{tp:>{width + 12}}")
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | Path, metrics: Mapping[str, Any]) -> str:
    """Write report.txt and metrics.json into output_dir; return the report text."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = format_seed_report(metrics)
    if "test/loss" in metrics:  # the held-out test split (data.test_size), in the same format
        test = format_seed_report(metrics, prefix="test")
        report += "\nHeld-out test split:\n" + test.replace("Validation", "Test").replace(
            "validation", "test"
        )
    (output_dir / "report.txt").write_text(report)
    (output_dir / "metrics.json").write_text(json.dumps(dict(metrics), indent=2) + "\n")
    return report
