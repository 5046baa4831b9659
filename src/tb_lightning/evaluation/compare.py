"""Is one model better than another, or is the difference noise? Paired bootstrap comparisons.

Two models scored on the same images are compared on those images: every bootstrap replicate
draws one set of image multiplicities (stratified by class, as bootstrap.py does) and computes
the figure of both models on it, so the noise they share (which images happened to be in the
validation split) cancels out of their difference. The 95% interval of the difference then says
whether the two are distinguishable: an interval that includes 0 means "within the noise".

Repeats (the seeds of one configuration) are a second level of noise: when the models were
trained with two or more seeds, each replicate also draws the seeds with replacement (the same
draw for both models), so that a difference that one lucky seed makes does not pass for a
real one. A model's predictions are given per *unit*: one seed, its folds' out-of-fold
predictions pooled into one set (k-fold), or one run's validation images. The figure of a
model is the mean over its units of the metric on each unit.

Why a bootstrap and not DeLong's test: it works alike for AUROC, average precision and the loss,
for pooled out-of-fold predictions and over seeds, and it is the method of every other interval
in the reports. 2000 replicates, as there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tb_lightning.stats.bootstrap import CHUNK, bootstrap_weights
from tb_lightning.stats.loss import per_image_loss
from tb_lightning.stats.metrics import ranking_metrics

PAIRED_RESAMPLES = 2000
PAIRED_SEED = 42
LEVEL = 0.95


@dataclass(frozen=True)
class Scored:
    """One model's predictions on one unit's images: an id per image (its path), the true
    labels (0 Normal, 1 TB), the logits (for the loss) and the TB probabilities."""

    keys: tuple[str, ...]
    labels: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    pos_weight: float = 1.0
    focal_gamma: float = 0.0  # the training loss's (stats/loss.py); 0: the weighted BCE

    def __post_init__(self) -> None:
        if not len(self.keys) == len(self.labels) == len(self.logits) == len(self.probs):
            raise ValueError("keys, labels, logits and probs differ in length")


def pooled(parts: Sequence[Scored]) -> Scored:
    """The predictions of several folds as one set (their images are disjoint)."""
    return Scored(
        tuple(k for p in parts for k in p.keys),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.logits for p in parts]),
        np.concatenate([p.probs for p in parts]),
        float(np.mean([p.pos_weight for p in parts])),
        parts[0].focal_gamma,  # the folds of one configuration: one loss
    )


def weighted_loss(scored: Scored, weights: np.ndarray) -> np.ndarray:
    """The training loss (stats/loss.py: the weighted BCE, or the focal loss) per weighting."""
    per_image = per_image_loss(scored.logits, scored.labels, scored.pos_weight, scored.focal_gamma)
    return (weights @ per_image) / weights.sum(axis=1)


def _ranking(name: str) -> Callable[[Scored, np.ndarray], np.ndarray]:
    def metric(scored: Scored, weights: np.ndarray) -> np.ndarray:
        return ranking_metrics(scored.probs, scored.labels.astype(bool), weights)[name]

    return metric


# The threshold-free figures a sweep is ranked by (metrics.json key -> how to compute it on a
# weighting of the images) and whether higher is better.
METRICS: dict[str, Callable[[Scored, np.ndarray], np.ndarray]] = {
    "val/auroc": _ranking("auroc"),
    "val/average_precision": _ranking("average_precision"),
    "val/loss": weighted_loss,
}
HIGHER_IS_BETTER = {"val/auroc": True, "val/average_precision": True, "val/loss": False}


def figure(units: Mapping[str, Scored], metric: str) -> float:
    """The model's figure: the metric on each unit, averaged over the units."""
    values = [METRICS[metric](s, np.ones((1, len(s.keys))))[0] for s in units.values()]
    return float(np.mean(values))


@dataclass(frozen=True)
class Difference:
    """`value` = figure(b) - figure(a) on the units both have, with its 95% interval."""

    value: float
    low: float
    high: float
    images: int  # distinct images compared
    units: int  # seeds (or runs) compared


def draw_resamples(
    labels: np.ndarray, n_units: int, n_resamples: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The replicates, in chunks: (image multiplicities (r, n_images) stratified by class, unit
    multiplicities (r, n_units)); units are drawn with replacement only when there are 2 or
    more. Public so that tests can recompute the same replicates with another library."""
    rng_seeds = np.random.SeedSequence(seed).spawn((n_resamples + CHUNK - 1) // CHUNK)
    chunks = []
    for i, chunk_seed in enumerate(rng_seeds):
        size = min(CHUNK, n_resamples - i * CHUNK)
        image_seed, unit_seed = chunk_seed.spawn(2)
        image_weights = bootstrap_weights(labels, size, image_seed)
        if n_units >= 2:
            unit_weights = np.random.default_rng(unit_seed).multinomial(
                n_units, np.full(n_units, 1 / n_units), size=size
            )
        else:
            unit_weights = np.ones((size, n_units))
        chunks.append((image_weights, unit_weights.astype(np.float64)))
    return chunks


def shared_units(a: Mapping[str, Scored], b: Mapping[str, Scored]) -> list[str]:
    """The units both models have on the same images (same keys, any order), in a's order."""
    return [u for u in a if u in b and set(a[u].keys) == set(b[u].keys)]


def _aligned(b: Scored, keys: Sequence[str]) -> Scored:
    """b's predictions in the order of `keys`."""
    index = {k: i for i, k in enumerate(b.keys)}
    order = np.array([index[k] for k in keys])
    return Scored(
        tuple(keys), b.labels[order], b.logits[order], b.probs[order], b.pos_weight, b.focal_gamma
    )


def _resampled_figures(
    models: Sequence[Sequence[Scored]], metric: str, n_resamples: int, seed: int
) -> np.ndarray:
    """(models, replicates): each model's figure on every replicate. `models` hold their units
    in the same order, each unit's images in the same order for every model."""
    first = models[0]
    # One multiplicity per distinct image, shared by every unit (and model) holding it.
    keys = sorted({k for unit in first for k in unit.keys})
    position = {k: i for i, k in enumerate(keys)}
    labels = np.zeros(len(keys), dtype=int)
    columns = []
    for unit in first:
        cols = np.array([position[k] for k in unit.keys])
        labels[cols] = unit.labels
        columns.append(cols)
    compute = METRICS[metric]
    chunks = []
    for image_weights, unit_weights in draw_resamples(labels, len(first), n_resamples, seed):
        per_unit = np.stack(
            [
                np.stack(
                    [compute(u, image_weights[:, c]) for u, c in zip(units, columns, strict=True)],
                    axis=1,
                )
                for units in models
            ]
        )  # (models, r, units)
        chunks.append((per_unit * unit_weights).sum(axis=2) / unit_weights.sum(axis=1))
    return np.concatenate(chunks, axis=1)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval; replicates where the figure is undefined (a unit left without
    one class) are left out, as in bootstrap.py."""
    values = values[~np.isnan(values)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(
    a: Mapping[str, Scored],
    b: Mapping[str, Scored],
    metric: str,
    n_resamples: int = PAIRED_RESAMPLES,
    seed: int = PAIRED_SEED,
    level: float = LEVEL,
) -> Difference | None:
    """figure(b) - figure(a) on their shared units, with a paired bootstrap interval; None when
    they share no unit scored on the same images (nothing to pair)."""
    units = shared_units(a, b)
    if not units:
        return None
    first = [a[u] for u in units]
    second = [_aligned(b[u], a[u].keys) for u in units]
    with np.errstate(invalid="ignore"):
        figures = _resampled_figures([first, second], metric, n_resamples, seed)
    low, high = _percentiles(figures[1] - figures[0], level)
    point = figure({u: b[u] for u in units}, metric) - figure({u: a[u] for u in units}, metric)
    images = len({k for unit in first for k in unit.keys})
    return Difference(point, low, high, images, len(units))


def interval(
    units: Mapping[str, Scored],
    metric: str,
    n_resamples: int = PAIRED_RESAMPLES,
    seed: int = PAIRED_SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """The 95% bootstrap interval of one model's figure (images, and seeds when several),
    drawn as paired_difference draws them."""
    with np.errstate(invalid="ignore"):
        figures = _resampled_figures([list(units.values())], metric, n_resamples, seed)
    return _percentiles(figures[0], level)


def verdict(difference: Difference | None, metric: str) -> str:
    """`tied` when the interval of (this - top) includes 0, `worse` when it lies wholly on the
    worse side of 0, "" when nothing was compared."""
    if difference is None:
        return ""
    low, high = (
        (difference.low, difference.high)
        if HIGHER_IS_BETTER[metric]
        else (-difference.high, -difference.low)
    )
    if high < 0:
        return "worse"
    # Better than the top: possible only when compared on part of the top's units (the top is
    # chosen on all of its own).
    return "better" if low > 0 else "tied"
