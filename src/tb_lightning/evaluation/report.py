"""Screening metrics with confidence intervals, the WHO check, and the printed report.

Rates (sensitivity, specificity, PPV, NPV, accuracy) get Wilson score intervals: they are
proportions of counted images, and a percentile bootstrap of a proportion collapses to [0, 0]
or [1, 1] at 0/n and n/n, which reads as certainty on 12 images. The threshold-free figures and
the calibration errors have no such closed form and keep the stratified bootstrap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest

from tb_lightning.core.artefacts import threshold_text
from tb_lightning.core.choices import loss_label
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.stats.bootstrap import bootstrap_ci
from tb_lightning.stats.loss import mean_loss
from tb_lightning.stats.metrics import (
    CALIBRATION_SECTION,
    COUNTS,
    RANKING_SECTION,
    SCREENING,
    THRESHOLD_SECTION,
    Metric,
    weighted_metrics,
)

# WHO target product profile for CXR/CAD screening: the minimum is sensitivity >= 0.90 with
# specificity >= 0.70 (its triage target asks for sensitivity above 0.95).
WHO_MIN_SENSITIVITY = 0.90
WHO_MIN_SPECIFICITY = 0.70

CI_LEVEL = 0.95
# Fewer images than this of a class (overall or in a source): the group is labelled too small to
# say much, beside its figures; its intervals are then wide whatever the point values look like.
MIN_CLASS_IMAGES = 10
# How each interval is computed, as metrics.json's `ci_method` names it (stats/metrics.py's
# table, in its order: metrics.json's `ci` and `ci_method` follow it).
CI_METHODS = {m.key: m.interval for m in SCREENING}
LABELS = {m.key: m.label for m in SCREENING}
# Beside a bootstrap interval of zero width as printed (e.g. AUROC 1 when the classes never
# overlap, or an ECE whose resamples differ only past the third decimal).
ZERO_WIDTH_NOTE = "zero width: every resample gave this value; not certainty"


def looks_zero_width(ci: Sequence[float | None], digits: int = 3) -> bool:
    """Whether an interval prints as one number ([0.130, 0.130]): it would read as certainty,
    so the reports mark it with ZERO_WIDTH_NOTE."""
    low, high = ci[0], ci[1]
    return low is not None and high is not None and _fmt(low, digits) == _fmt(high, digits)


# The headings of the screening table's sections; the one at the threshold names it.
SECTION_HEADINGS = {
    RANKING_SECTION: "threshold-free:",
    CALIBRATION_SECTION: "calibration (lower is better):",
    THRESHOLD_SECTION: "at p_tb >= {threshold}:",
}


def _num(value: Any) -> float | None:
    """JSON-friendly float: NaN (undefined) becomes null."""
    value = float(value)
    return None if np.isnan(value) else value


def wilson_interval(
    successes: int, trials: int, level: float = CI_LEVEL
) -> tuple[float | None, float | None]:
    """The Wilson score interval of successes/trials; (None, None) when trials is 0 (the rate
    itself is undefined, e.g. PPV when nothing is called TB)."""
    if trials == 0:
        return None, None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def rate_counts(confusion: Sequence[Sequence[int]]) -> dict[str, tuple[int, int]]:
    """name -> (successes, trials) of each rate (a figure that is a proportion of counted
    images), from [[tn, fp], [fn, tp]]."""
    (tn, fp), (fn, tp) = confusion
    return {m.key: m.proportion(tn, fp, fn, tp) for m in SCREENING if m.proportion is not None}


def small_classes(counts: Mapping[str, int]) -> dict[str, int]:
    """The classes with fewer than MIN_CLASS_IMAGES images, with their counts."""
    return {name: n for name, n in counts.items() if n < MIN_CLASS_IMAGES}


def screening_summary(
    probs: np.ndarray, target: np.ndarray, threshold: float, n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """Every screening number for one set of images, each with its 95% CI: Wilson score for the
    rates, the stratified bootstrap for AUROC, AP, Brier and ECE (`ci_method` says which)."""
    target = np.asarray(target).astype(int)
    point = weighted_metrics(probs, target, threshold)
    boot = bootstrap_ci(probs, target, threshold, n_bootstrap, seed, CI_LEVEL)
    tn, fp, fn, tp = (int(point[name]) for name in COUNTS)
    confusion = [[tn, fp], [fn, tp]]
    ci = {
        name: [_num(lo), _num(hi)]
        for name, (lo, hi) in boot.items()
        if CI_METHODS.get(name) == "bootstrap"
    }
    for name, (successes, trials) in rate_counts(confusion).items():
        ci[name] = list(wilson_interval(successes, trials))
    counts = {CLASS_NAMES[0]: int((target == 0).sum()), CLASS_NAMES[1]: int(target.sum())}
    few = small_classes(counts)
    summary: dict[str, Any] = {
        "images": int(len(target)),
        "counts": counts,
        "threshold": float(threshold),
        **{m.key: _num(point[m.key]) for m in SCREENING},
        "confusion_matrix": confusion,
        "ci": {name: ci[name] for name in CI_METHODS},
        "ci_method": dict(CI_METHODS),
        # In metrics.json too, so that a small group is flagged wherever its figures are read.
        "too_few_images": bool(few),
        "small_classes": few,
        "min_class_images": MIN_CLASS_IMAGES,
    }
    sens, spec = summary["sensitivity"], summary["specificity"]
    low_sens, low_spec = summary["ci"]["sensitivity"][0], summary["ci"]["specificity"][0]
    summary["who_screening_minimum"] = {
        "sensitivity": WHO_MIN_SENSITIVITY,
        "specificity": WHO_MIN_SPECIFICITY,
        "met": bool(
            sens is not None
            and spec is not None
            and sens >= WHO_MIN_SENSITIVITY
            and spec >= WHO_MIN_SPECIFICITY
        ),
        # Stricter: even the lower ends of both (Wilson) intervals reach the minimum.
        "met_by_lower_ci": bool(
            low_sens is not None
            and low_spec is not None
            and low_sens >= WHO_MIN_SENSITIVITY
            and low_spec >= WHO_MIN_SPECIFICITY
        ),
    }
    return summary


def reference_report_metrics(
    logits: np.ndarray,
    probs: np.ndarray,
    target: np.ndarray,
    threshold: float,
    pos_weight: float,
    prefix: str,
    focal_gamma: float = 0.0,
) -> dict[str, Any]:
    """The numbers of the reference report (format_reference_report) at the given threshold.

    The loss is the training loss (stats/loss.py): the weighted BCE on the logit with the
    checkpoint's pos_weight (or its focal loss, focal_gamma > 0), averaged over images.
    """
    logits = np.asarray(logits, dtype=np.float64)
    target = np.asarray(target).astype(int)
    loss = mean_loss(logits, target, pos_weight, focal_gamma)
    called = np.asarray(probs) >= threshold  # the same probabilities as every other metric
    metrics: dict[str, Any] = {
        f"{prefix}/loss": float(loss),
        f"{prefix}/acc": float(np.mean(called == target.astype(bool))),
    }
    for label, name in enumerate(CLASS_NAMES):
        is_class, said_class = target == label, called == bool(label)
        hits = float(np.sum(is_class & said_class))
        precision = hits / said_class.sum() if said_class.sum() else 0.0
        recall = hits / is_class.sum() if is_class.sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics[f"{prefix}/precision/{name}"] = precision
        metrics[f"{prefix}/recall/{name}"] = recall
        metrics[f"{prefix}/f1/{name}"] = f1
    return metrics


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(ci: Sequence[float | None], digits: int = 3) -> str:
    if ci[0] is None and ci[1] is None:
        return "n/a"
    return f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def too_few_note(summary: Mapping[str, Any]) -> str | None:
    """The note of a flagged group (`too few images to say much: 3 Tuberculosis < 10`), else
    None."""
    if not summary.get("too_few_images"):
        return None
    few = ", ".join(f"{n} {name}" for name, n in summary["small_classes"].items())
    return f"too few images to say much: {few} < {summary['min_class_images']}"


def ci_method_line(n_bootstrap: int) -> str:
    """Which interval each figure has, in the words of the table header."""
    bootstrapped = ", ".join(m.short for m in SCREENING if m.interval == "bootstrap")
    return (
        f"95% CI: rates Wilson score; {bootstrapped} {n_bootstrap} bootstrap resamples (stratified)"
    )


def format_screening_table(summary: Mapping[str, Any], n_bootstrap: int) -> str:
    """The screening metrics with their 95% CIs and the WHO check.

    Threshold-free figures (AUROC, average precision) come first; the rest are at the summary's
    threshold, which their heading states. A group with too few images of a class says so first.
    """
    fractions = {
        name: f"{successes}/{trials}"
        for name, (successes, trials) in rate_counts(summary["confusion_matrix"]).items()
    }
    lines = [f"{'metric':<19}{'value':>7}   {ci_method_line(n_bootstrap)}"]
    note = too_few_note(summary)
    if note:
        lines.append(note[0].upper() + note[1:])
    section = None
    for m in SCREENING:  # section by section, in the table's order
        if m.section != section:
            section = m.section
            lines.append(
                SECTION_HEADINGS[section].format(threshold=threshold_text(summary["threshold"]))
            )
        if m.proportion is not None:
            lines.append(_rate_row(summary, m, fractions[m.key]))
        else:
            lines.append(_bootstrap_row(summary, m))
    lines.append(who_line(summary))
    return "\n".join(lines) + "\n"


def who_line(summary: Mapping[str, Any]) -> str:
    """The WHO check of a summary at its threshold, by the point estimates and by the lower
    ends of the Wilson intervals (report.txt's last table line, report.html's verdict)."""
    who = summary["who_screening_minimum"]
    verdict = "MET" if who["met"] else "NOT met"
    strict = "met" if who["met_by_lower_ci"] else "not met"
    return (
        f"WHO screening minimum (sensitivity >= {who['sensitivity']:.2f}, specificity >= "
        f"{who['specificity']:.2f}) at p_tb >= {threshold_text(summary['threshold'])}: {verdict} "
        f"(by the lower Wilson 95% bounds: {strict})"
    )


def _rate_row(summary: Mapping[str, Any], m: Metric, fraction: str) -> str:
    """A rate's row: value, Wilson interval and the counts it is the proportion of."""
    ci = _interval(summary["ci"][m.key])
    return f"{m.label:<19}{_fmt(summary[m.key]):>7}   {ci:<16}{fraction}"


def _bootstrap_row(summary: Mapping[str, Any], m: Metric) -> str:
    """A bootstrap figure's row; an interval of zero width as printed (every resample gave the
    same value, e.g. AUROC 1 when the classes never overlap) is marked as no proof of certainty."""
    row = f"{m.label:<19}{_fmt(summary[m.key]):>7}   {_interval(summary['ci'][m.key])}"
    if looks_zero_width(summary["ci"][m.key]):
        row += f"  ({ZERO_WIDTH_NOTE})"
    return row


def format_per_source(per_source: Mapping[str, Mapping[str, Any]], threshold: float) -> str:
    """One row per source: images, TB count, AUROC, sensitivity and specificity with their Wilson
    95% CIs, and the too-few-images note of a source that has one."""
    lines = [
        f"Per source (sensitivity and specificity at p_tb >= {threshold_text(threshold)}) with "
        "95% Wilson score intervals:",
        f"{'source':<14}{'images':>7}{'TB':>6}{'AUROC':>8}   {'sensitivity [95% CI]':<25}"
        "specificity [95% CI]",
    ]
    for name, s in per_source.items():
        sens = f"{_fmt(s['sensitivity'])} {_interval(s['ci']['sensitivity'])}"
        spec = f"{_fmt(s['specificity'])} {_interval(s['ci']['specificity'])}"
        note = too_few_note(s)
        row = (
            f"{name:<14}{s['images']:>7}{s['counts'][CLASS_NAMES[1]]:>6}"
            f"{_fmt(s['auroc']):>8}   {sens:<25}{spec}"
        )
        lines.append(f"{row:<86}{note}" if note else row)
    return "\n".join(lines) + "\n"


# metrics.json's record of the loss that `<split>/loss` is: {name, focal_gamma, pos_weight}.
TRAINING_LOSS_KEY = "training_loss"


def training_loss_record(pos_weight: float, focal_gamma: float) -> dict[str, Any]:
    """What `<split>/loss` is, for metrics.json and the reports (stats/loss.py)."""
    return {"name": loss_label(focal_gamma), "focal_gamma": focal_gamma, "pos_weight": pos_weight}


# How each split is named in the reference-format lines ("Validation loss: ...").
SPLIT_WORDS = {"val": "Validation", "test": "Test", "all": "Evaluation"}
SPLIT_TITLES = {"val": "Validation split", "test": "Held-out test split", "all": "All images"}


def format_reference_report(
    metrics: Mapping[str, Any], prefix: str, threshold: float, loss_name: str = "weighted BCE"
) -> str:
    """The seed README's report (loss, accuracy, per-class precision/recall/F1) at `threshold`,
    followed by the confusion matrix; `prefix` is the split whose keys are read (val, test);
    `loss_name` says which training loss the loss is (stats/loss.py loss_label)."""
    word = SPLIT_WORDS.get(prefix, prefix.capitalize())
    lower = word.lower()
    lines = [
        f"At p_tb >= {threshold_text(threshold)} (the loss, {loss_name}, is threshold-free):",
        f"{word} loss: {metrics[f'{prefix}/loss']:.6f}, "
        f"{word} acc: {100 * metrics[f'{prefix}/acc']:.6f},",
    ]
    for name in CLASS_NAMES:
        lines.append(f"for class {name}:")
        lines.append(
            f" {lower} precision: {metrics[f'{prefix}/precision/{name}']:.6f}, "
            f"{lower} recall: {metrics[f'{prefix}/recall/{name}']:.6f} , "
            f"{lower} F1: {metrics[f'{prefix}/f1/{name}']:.6f}"
        )
    (tn, fp), (fn, tp) = metrics[f"{prefix}/confusion_matrix"]
    width = max(len(str(v)) for v in (tn, fp, fn, tp)) + 2
    lines.append(
        f"Confusion matrix at p_tb >= {threshold_text(threshold)} (rows: true, columns: predicted):"
    )
    lines.append(f"{'':>14}{'Normal':>{width + 6}}{'Tuberculosis':>{width + 12}}")
    lines.append(f"{'Normal':>14}{tn:>{width + 6}}{fp:>{width + 12}}")
    lines.append(f"{'Tuberculosis':>14}{fn:>{width + 6}}{tp:>{width + 12}}")
    return "\n".join(lines) + "\n"


def format_split_block(
    scores: Mapping[str, Any], split: str, n_bootstrap: int, note: str | None = None
) -> str:
    """Everything about one split at one threshold: a title, an optional note, the reference
    report, the screening table with CIs, and the per-source rows (when there are sources)."""
    summary = scores[split]["overall"]
    counts = summary["counts"]
    title = (
        f"== {SPLIT_TITLES.get(split, split)}: {summary['images']} images "
        f"({counts[CLASS_NAMES[0]]} {CLASS_NAMES[0]}, {counts[CLASS_NAMES[1]]} {CLASS_NAMES[1]}) =="
    )
    parts = [title + "\n"]
    if note:
        parts.append(note + "\n")
    loss_name = (scores.get(TRAINING_LOSS_KEY) or {}).get("name", loss_label(0.0))
    parts.append(format_reference_report(scores, split, summary["threshold"], loss_name))
    parts.append(format_screening_table(summary, n_bootstrap))
    if scores[split]["per_source"]:
        parts.append(format_per_source(scores[split]["per_source"], summary["threshold"]))
    return "".join(parts)
