"""Temperature scaling (`calibration=temperature`): one number T fitted on the validation split
so that sigmoid(logit / T) matches the observed TB rates better, without changing any ranking
(AUROC, average precision and the order of the images stay the same).

Fitted by minimising the mean binary cross-entropy of the validation images (unweighted: the
class-weighted training loss would pull the probabilities towards balanced classes) over
beta = 1 / T, in which that loss is convex: a golden-section search needs no library beyond NumPy.

A temperature is not always a calibration. Training refuses a validation split of fewer than
MIN_CALIBRATION_IMAGES images (or of one class), and `calibration_warnings` says when the fitted
T means nothing: at an end of the searched range (the fit did not converge), extreme, or fitted
to a model whose AUROC interval includes 0.5 (the fit then flattens the probabilities towards
one value and the ECE falls, which is no evidence of anything). The warnings are stored with T
and printed next to its "ECE before -> after" wherever that is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tb_lightning.stats.bootstrap import bootstrap_ci
from tb_lightning.stats.metrics import calibration_metrics

# beta = 1 / T is searched in this range: T from 0.05 (sharpen 20x) to 100 (flatten 100x).
BETA_RANGE = (0.01, 20.0)
TEMPERATURE_RANGE = (1 / BETA_RANGE[1], 1 / BETA_RANGE[0])
GOLDEN = (np.sqrt(5) - 1) / 2

# The fewest validation images (of both classes) a temperature is fitted on: below it the one
# number is the noise of a handful of images, and on 2 it lands at an end of the range.
MIN_CALIBRATION_IMAGES = 10
# A T within this relative distance of an end of TEMPERATURE_RANGE is where the search stopped,
# not a minimum: the golden-section search ends within ~1e-15 of a bound the loss falls towards.
BOUND_TOLERANCE = 0.01
# Outside these a T rescales the logits more than 10x: logits that need that are nearly
# uninformative (T large) or separate the validation images perfectly (T small).
EXTREME_TEMPERATURE = (0.1, 10.0)


def mean_nll(logits: np.ndarray, labels: np.ndarray, beta: float) -> float:
    """Mean binary cross-entropy of sigmoid(beta * logit), computed stably."""
    z = beta * logits
    # log(1 + e^z) - y z, with log(1 + e^z) = max(z, 0) + log1p(e^-|z|).
    return float(np.mean(np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))) - labels * z))


def fit_temperature(logits: Sequence[float], labels: Sequence[int], iterations: int = 80) -> float:
    """The temperature T minimising the validation loss of sigmoid(logit / T)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    lo, hi = BETA_RANGE
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fa, fb = mean_nll(z, y, a), mean_nll(z, y, b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = mean_nll(z, y, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = mean_nll(z, y, b)
    return float(2.0 / (lo + hi))


def calibration_refusal(
    count: int, classes: int, source: str, fix: str, subject: str = "this split has"
) -> str | None:
    """The sentence that refuses to fit a temperature on `count` images of `classes` classes
    (None when they are enough): `source` says where the count comes from (the key), `fix` how
    to get more."""
    if count >= MIN_CALIBRATION_IMAGES and classes >= 2:
        return None
    one_class = ", all of one class" if count and classes < 2 else ""
    return (
        f"calibration=temperature needs at least {MIN_CALIBRATION_IMAGES} validation images, of "
        f"both classes, to fit a temperature on; {subject} {count}{one_class} ({source}): {fix} "
        "or use calibration=none."
    )


def calibration_warnings(
    temperature: float,
    auroc_ci: Sequence[float | None] | None,
    auroc_of: str = "validation",
) -> list[str]:
    """Why the fitted `temperature` means nothing, one sentence each; [] when it may be trusted.

    `auroc_ci`: the 95% interval [low, high] of the AUROC of the images T was fitted on (the
    `auroc_of` images); None (or undefined ends) when unknown, which skips that check.
    """
    warnings = []
    low_t, high_t = TEMPERATURE_RANGE
    if temperature <= low_t * (1 + BOUND_TOLERANCE) or temperature >= high_t * (
        1 - BOUND_TOLERANCE
    ):
        warnings.append(
            f"T = {temperature:.3f} is at an end of the range searched ({low_t:g} to {high_t:g}):"
            " the fit did not converge inside its range, so T is where the search stopped, not "
            "an estimate."
        )
    elif not EXTREME_TEMPERATURE[0] <= temperature <= EXTREME_TEMPERATURE[1]:
        how = (
            f"flattens the logits {temperature:.0f}x, a sign of nearly uninformative logits"
            if temperature > 1
            else f"sharpens the logits {1 / temperature:.0f}x, a sign of validation images "
            "separated (nearly) perfectly"
        )
        warnings.append(
            f"T = {temperature:.3f} is extreme (outside {EXTREME_TEMPERATURE[0]:g} to "
            f"{EXTREME_TEMPERATURE[1]:g}): it {how} or of a fit on too few images, not of a "
            "calibrated model."
        )
    low, high = auroc_ci if auroc_ci is not None else (None, None)
    if low is not None and high is not None and low <= 0.5 <= high:
        warnings.append(
            f"the {auroc_of} AUROC's 95% interval ({low:.3f} to {high:.3f}) includes 0.5: the "
            "probabilities carry almost no information; calibration is trivial here, and a low "
            "ECE after it is no evidence of a useful model."
        )
    return warnings


def auroc_interval(
    logits: np.ndarray, labels: np.ndarray, n_resamples: int, seed: int
) -> list[float | None]:
    """The bootstrap 95% interval [low, high] of the AUROC of `logits` (None where undefined),
    as the reports compute it (stratified resamples of the images)."""
    probs = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
    # AUROC is threshold-free: any threshold gives the same interval.
    low, high = bootstrap_ci(probs, np.asarray(labels), 0.5, n_resamples, seed)["auroc"]
    return [None if np.isnan(v) else float(v) for v in (low, high)]


def warnings_of(calibration: dict[str, Any]) -> list[str]:
    """The warnings stored with a temperature; for a checkpoint written before they were stored,
    those that T alone gives (its AUROC interval was not kept)."""
    stored = calibration.get("warnings")
    if stored is None:
        return calibration_warnings(float(calibration["temperature"]), None)
    return list(stored)


def describe_calibration(
    calibration: dict[str, Any], raw_logits: np.ndarray, labels: np.ndarray
) -> str:
    """`Probabilities calibrated by temperature scaling: T = 1.84 (fitted on ...); on these
    images ECE 0.107 -> 0.041, Brier 0.192 -> 0.181.`, with the warnings right after it (the
    ECE then says nothing of the model: the line says so itself)."""
    raw = np.asarray(raw_logits, dtype=np.float64)
    target = np.asarray(labels)
    ones = np.ones((1, len(raw)))
    before = calibration_metrics(1 / (1 + np.exp(-raw)), target, ones)
    after = calibration_metrics(1 / (1 + np.exp(-raw / calibration["temperature"])), target, ones)
    warnings = warnings_of(calibration)
    line = (
        f"Probabilities {'rescaled' if warnings else 'calibrated'} by temperature scaling: T = "
        f"{calibration['temperature']:.3f} (fitted on {calibration['fitted_on']}); on these images"
        f" ECE {before['ece'][0]:.3f} -> {after['ece'][0]:.3f}, Brier {before['brier'][0]:.3f} ->"
        f" {after['brier'][0]:.3f} (before -> after)"
    )
    if not warnings:
        return line + ".\n"
    return (
        line
        + ", which is NO evidence of calibration:\n"
        + "".join(f"  WARNING (calibration): {w}\n" for w in warnings)
    )
