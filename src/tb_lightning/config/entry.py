"""The one shape of every command (`python -m tb_lightning.<task>`): a thin Hydra main that says
what it is about to do and hands the config to a work function through `run_entry`; eval,
predict and export load their model with `trained_model_of`.

Why the Hydra main stays in each entry module (4 lines): Hydra names the job (and so
`<task>.log`, provenance's task and MLflow's experiment) after the module that defines it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from omegaconf import DictConfig

from tb_lightning.config.printing import print_config
from tb_lightning.core.tasks import quiet_known_warnings, run_task, written_files

if TYPE_CHECKING:  # torch-heavy: imported only where a model is loaded
    from tb_lightning.trained.model import TrainedModel

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_entry(
    cfg: DictConfig, work: Callable[[DictConfig], T], first_line: str, list_outputs: bool = True
) -> T | None:
    """The shared tail of every command: its first log line (at once, before torch is imported;
    the config was checked by config/callback.py), the resolved config printed and saved, then
    `work(cfg)` under run_task (a user's mistake: one sentence, exit 1), and a last line naming
    what the run folder holds."""
    log.info("%s", first_line)
    print_config(cfg, cfg.paths.output_dir)
    quiet_known_warnings()
    result = run_task(work, cfg)
    output_dir = Path(cfg.paths.output_dir)
    if list_outputs and result is not None and output_dir.is_dir():
        log.info("Wrote %s in %s", written_files(output_dir), output_dir)
    return result


def trained_model_of(
    cfg: DictConfig, ensemble_refusal: str | None = None
) -> tuple[TrainedModel, float, str]:
    """(the model of `ckpt_path`, its operating threshold, where that threshold comes from):
    one checkpoint, or a k-fold folder unless `ensemble_refusal` says why this command cannot
    take one; `threshold.value` overrides the stored threshold, `threshold.policy` (and
    `threshold.target`) re-chooses an ensemble's on its out-of-fold predictions."""
    from tb_lightning.trained.load import load_trained_model

    trained = load_trained_model(
        cfg.get("ckpt_path"),
        ensemble_refusal,
        allow_partial=cfg.get("allow_partial", False),
        policy=cfg.threshold.get("policy"),
        target=cfg.threshold.get("target"),
    )
    threshold, source = trained.threshold_for(cfg.threshold.get("value"))
    return trained, threshold, source
