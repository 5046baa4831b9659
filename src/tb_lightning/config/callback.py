"""A mistake in the config costs neither seconds nor a folder: the Hydra callback that checks it.

`ConfigCheck` comes first in conf/hydra/default.yaml `callbacks:`. Hydra calls it once the config
is composed and before it creates the run's (or multirun's) folder; the entry points import torch
only later. It runs the task's checks of values (config/checks.py VALUE_CHECKS) and on a mistake
prints its one sentence and exits 1: nothing imported, nothing written. A multirun is checked
once, before any job: every job's config as Hydra's basic sweeper will compose it (each swept
value combination), so that a sweep in which one job would fail does not start. With another
sweeper (Optuna: the values are drawn as it goes) the base config is checked, and each job still
checks its own in the entry point.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from tb_lightning.config.checks import VALUE_CHECKS
from tb_lightning.core.errors import UserError

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def task_config(config: DictConfig) -> DictConfig:
    """The config a task function receives: Hydra's composed config without its `hydra` node."""
    cfg = copy.deepcopy(config)
    with read_write(cfg), open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def check_task_config(config: DictConfig, task: str | None) -> str | None:
    """The sentence of the first mistake the task's checks of values find, or None."""
    check = VALUE_CHECKS.get(task or "")
    if check is None:
        return None
    try:
        check(task_config(config))
    except UserError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - e.g. a value that needs a run folder to resolve
        # The entry point runs the same checks again, where such a value resolves; whatever
        # goes wrong there is reported there.
        return None
    return None


def sweep_jobs(config: DictConfig) -> tuple[list[list[str]], set[str]] | None:
    """Each job's overrides as Hydra's basic sweeper will launch them, and the swept keys; None
    for another sweeper (or a sweep that Hydra itself will refuse when it starts)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        arguments = [f"{key}={value}" for key, value in params.items()]
        arguments += list(OmegaConf.to_container(config.hydra.overrides.task))  # type: ignore[arg-type]
        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - Hydra reports a sweep it cannot expand itself
        return None
    return jobs, {o.get_key_element() for o in parsed if o.is_sweep_override()}


def job_config(config: DictConfig, overrides: list[str]) -> DictConfig | None:
    """One job's composed config (as the launcher will compose it), or None when it does not
    compose (Hydra then says why)."""
    from hydra.core.global_hydra import GlobalHydra

    try:
        return GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
    except Exception:  # noqa: BLE001
        return None


def multirun_mistake(config: DictConfig, task: str | None) -> str | None:
    """What would stop the jobs of a multirun, said once, or None."""
    sweep = sweep_jobs(config)
    if sweep is None:
        return check_task_config(config, task)
    jobs, swept = sweep
    failures: list[tuple[int, list[str], str]] = []
    for number, overrides in enumerate(jobs):
        cfg = job_config(config, overrides)
        message = check_task_config(cfg, task) if cfg is not None else None
        if message:
            values = [o for o in overrides if o.split("=", 1)[0] in swept]
            failures.append((number, values, message))
    if not failures:
        return None
    if len(failures) == len(jobs) and len({message for *_, message in failures}) == 1:
        return failures[0][2]  # the same mistake in every job: said once
    number, overrides, message = failures[0]
    count = f"{len(failures)} of {len(jobs)} jobs would fail; " if len(failures) > 1 else ""
    return f"{count}job {number} ({' '.join(overrides)}): {message}"


def seed_split_warning(config: DictConfig, task: str | None) -> str | None:
    """A k-fold training sweep over seeds whose jobs would hold out different test images (the
    default data.split_seed follows seed): allowed (repeated splits are a design of their own),
    but the folder will not load as one seed x fold ensemble, which hours later is too late to
    learn. The sentence that says so and the fix, or None."""
    if task != "train":
        return None
    sweep = sweep_jobs(config)
    if sweep is None or "seed" not in sweep[1]:
        return None
    split_seeds = set()
    for overrides in sweep[0]:
        cfg = job_config(config, overrides)
        if cfg is None:
            return None
        data = cfg.get("data") or {}
        if not data.get("num_folds") or not data.get("test_size") or data.get("split_file"):
            return None
        split_seeds.add(data.get("split_seed"))
    if len(split_seeds) < 2:
        return None
    return (
        "Warning: seed is swept in a k-fold run with a held-out test split (data.test_size) and "
        "data.split_seed follows seed, so each seed holds out other test images and "
        "eval/predict/export will refuse this folder as one ensemble; for a seed x fold "
        "ensemble, fix the split: add data.split_seed=42 (any one value)."
    )


def stop(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings.
    raise SystemExit(1)


class ConfigCheck(Callback):
    """Hydra callback: the composed config's values, checked before torch is imported and before
    any folder is made; a mistake is one sentence and exit code 1."""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **_: Any) -> None:
        message = check_task_config(config, config_name)
        if message:
            stop(message)

    def on_multirun_start(
        self, config: DictConfig, config_name: str | None = None, **_: Any
    ) -> None:
        message = multirun_mistake(config, config_name)
        if message:
            stop(f"No job was started: {message}")
        warning = seed_split_warning(config, config_name)
        if warning:
            print(warning, file=sys.stderr, flush=True)
