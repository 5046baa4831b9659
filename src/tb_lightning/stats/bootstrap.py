"""Percentile bootstrap confidence intervals for the screening metrics.

The reports use them for AUROC, average precision, Brier and ECE; the rates (proportions of
counted images) get Wilson score intervals instead (report.py says why).
"""

from __future__ import annotations

import numpy as np

from tb_lightning.stats.metrics import weighted_metrics

# Every interval of train's report, eval and the ensembles: 2000 percentile-bootstrap resamples
# from one seed, so that the same predictions give the same interval wherever they are reported.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 42

CHUNK = 250  # bootstrap resamples evaluated at once


def bootstrap_weights(
    target: np.ndarray, n_resamples: int, seed: int | np.random.SeedSequence
) -> np.ndarray:
    """(n_resamples, n) multiplicities of a bootstrap stratified by class.

    Each class is resampled with replacement to its own size, so every replicate keeps the
    observed numbers of Normal and TB images: sensitivity and specificity are defined in every
    replicate even when TB images are few (an unstratified draw can hold no TB image at all).
    A multinomial draw of n over n equally likely images *is* the multiplicity vector of one
    bootstrap resample of size n.
    """
    rng = np.random.default_rng(seed)
    target = np.asarray(target)
    weights = np.zeros((n_resamples, len(target)))
    for label in (0, 1):
        idx = np.flatnonzero(target == label)
        if len(idx):
            weights[:, idx] = rng.multinomial(
                len(idx), np.full(len(idx), 1 / len(idx)), size=n_resamples
            )
    return weights


def bootstrap_ci(
    probs: np.ndarray,
    target: np.ndarray,
    threshold: float,
    n_resamples: int = 2000,
    seed: int = 42,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """name -> (low, high): the percentile interval of each metric over the resamples.

    Replicates where a metric is undefined (e.g. PPV with nothing called TB) are left out of
    that metric's interval; a metric undefined in every replicate gets (nan, nan).
    """
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    # In chunks, so that memory stays ~CHUNK x n floats however many images there are. Each
    # chunk has its own seed derived from `seed`: the result depends on the seed only.
    chunks = []
    seeds = np.random.SeedSequence(seed).spawn((n_resamples + CHUNK - 1) // CHUNK)
    for i, chunk_seed in enumerate(seeds):
        size = min(CHUNK, n_resamples - i * CHUNK)
        weights = bootstrap_weights(target, size, chunk_seed)
        chunks.append(weighted_metrics(probs, target, threshold, weights))
    replicates = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name, values in replicates.items():
        values = values[~np.isnan(values)]
        if len(values) == 0:
            intervals[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            intervals[name] = (float(low), float(high))
    return intervals
