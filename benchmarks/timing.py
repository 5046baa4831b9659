"""The epoch clock the benchmarks share (bench.py, scale.py, image_cache.py)."""

from __future__ import annotations

import time

import lightning as L


class EpochTimer(L.Callback):
    """Wall time of each train+val epoch: from the epoch's start to the end of its validation
    (the sanity check left out)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.times.append(time.perf_counter() - self.start)
