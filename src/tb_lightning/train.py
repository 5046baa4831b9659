"""`python -m tb_lightning.train`: compose the config, fit, score the chosen checkpoint, report.

Overrides are Hydra's: `python -m tb_lightning.train data.root=/data/TB trainer=gpu`.

This module imports only Hydra at the top: torch and Lightning (several seconds) are imported
once the config is composed and checked (config/callback.py), the run directory announced and
the config printed, so that `--help`, config errors and the first log line come at once. The work
itself is tb_lightning/engine/training.py.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from tb_lightning.config import CONF_DIR
from tb_lightning.config.entry import run_entry

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """The work: train as configured and return the chosen checkpoint's final metrics
    (metrics.json)."""
    from tb_lightning.engine.training import train as run_training

    return run_training(cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from tb_lightning.core.allocator import keep_large_blocks_in_heap

    keep_large_blocks_in_heap()
    # Its report lists the run folder's files: no "Wrote" line.
    metrics = run_entry(cfg, train, f"Run directory: {Path(cfg.paths.output_dir)}", False)
    if metrics is None:  # a multirun job stopped by a user's mistake (its error.txt says which)
        return float("nan")  # Optuna records a NaN as a failed trial and goes on
    # The sweepers (e.g. Optuna) optimise what main returns.
    value = metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    return float(value) if value is not None else None


# Command-line choices that need the optional 'sweeps' extra (Hydra plugins): Hydra would
# refuse them while composing, before any code of ours runs, with a list of what it has.
SWEEP_PLUGIN_CHOICES = (
    "sweep=optuna",
    "hydra/sweeper=optuna",
    "hydra/launcher=submitit",
    "hydra/launcher=slurm",
)


def cli() -> None:
    """The command (`python -m tb_lightning.train`, `tb-train`): Ctrl-C and SIGTERM stop it
    with a sentence and exit code 130 / 143 from its first moment (core/signals.py)."""
    from tb_lightning.core.errors import ConfigError
    from tb_lightning.core.extras import require
    from tb_lightning.core.signals import exit_on_stop

    chosen = [a for a in sys.argv[1:] if a.startswith(SWEEP_PLUGIN_CHOICES)]
    try:
        if chosen:
            require("sweeps", chosen[0])
    except ConfigError as err:
        print(err, file=sys.stderr)
        raise SystemExit(1) from None
    with exit_on_stop():
        main()


if __name__ == "__main__":
    cli()
