"""Run names for TensorBoard: what each run is.

A multirun job is named by its swept values (`lr=0.0003,dropout=0.5`), a single run by its
experiment and the overrides it was started with (`quickstart`, `nlm_scratch,fold=2`).
`conf/logger/tensorboard.yaml` uses it as the logger's version (`${tb_run_name:...}`), so that
`tensorboard --logdir <multirun dir>` lists `<job>/tensorboard/lr=0.0003,dropout=0.5`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """`['model.net.dropout=0.3', ...]` -> {'model.net.dropout': '0.3'} (Hydra's own parser)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group: o.get_value_element_as_str() for o in parsed if not o.is_delete()}


def swept_keys(hydra_cfg) -> set[str]:
    """Keys a multirun varies: the sweeper's `params` (sweep=..., Optuna) and command-line sweeps.

    Command-line sweeps (`model.optimizer.lr=1e-4,3e-4`) are read from the multirun.yaml that
    Hydra's sweeper writes into the sweep directory before the first job starts.
    """
    keys = set((OmegaConf.select(hydra_cfg, "sweeper.params") or {}).keys())
    multirun_yaml = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if multirun_yaml.is_file():
        task = OmegaConf.select(OmegaConf.load(multirun_yaml), "hydra.overrides.task") or []
        keys |= command_line_sweeps(task)
    return keys


def command_line_sweeps(task_overrides: Iterable[str]) -> set[str]:
    """The keys (or config groups) that command-line overrides sweep (`lr=1e-4,3e-4`)."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """Last component of each key (`lr`), the full key where two would clash."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def run_name(job_overrides: Iterable[str], keys: set[str]) -> str:
    """`lr=0.0003,dropout=0.5`: the job's values of the swept keys, in command-line order."""
    values = {k: v for k, v in parse_overrides(job_overrides).items() if k in keys}
    names = short_names(values)
    return ",".join(f"{names[k]}={name_value(k, v)}" for k, v in values.items())


def name_value(key: str, value: str) -> str:
    """A value as a run name shows it, without a `/` (a name is a folder of TensorBoard's):
    `timm/convnext_nano` -> `timm-convnext_nano`, a path by its last part."""
    if key.endswith("net.arch"):
        return value.replace("/", "-")
    return value.rstrip("/").rsplit("/", 1)[-1]


# Overrides that say where a run reads or writes, or how it is shown, not what it is: left out
# of a single run's name.
NOT_IN_NAMES = (
    "hydra.",
    "paths.",
    "callbacks.",
    "logger",  # logger=mlflow, 'logger=[tensorboard,mlflow]', logger.mlflow.tags=...
    "ckpt_path",
    "trainer.accelerator",
    "trainer.devices",
    "data.num_workers",
    "data.cache_dir",
    "data.scan_cache_dir",
    "data.cache_features",
)
# Longer names are cut and end in a hash of the whole (a folder name, read in a narrow column).
MAX_NAME = 80


def single_run_name(overrides: Iterable[str]) -> str:
    """`experiment=quickstart data.root=/x/nlm-tb-128 model.optimizer.lr=1e-3` ->
    `quickstart,root=nlm-tb-128,lr=0.001`; "defaults" without any."""
    values = {
        k: v
        for k, v in parse_overrides(overrides).items()
        if not k.startswith(NOT_IN_NAMES) and k != "sweep"
    }
    names = short_names(values)
    parts = []
    for key, value in values.items():
        value = name_value(key, value)
        parts.append(value if key == "experiment" else f"{names[key]}={value}")
    name = ",".join(parts) or "defaults"
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}~{digest}"
    return name


def existing_run_name(log_dir: Path) -> str | None:
    """The name a resumed run's event files already have (its one folder under tensorboard/)."""
    names = [p.name for p in log_dir.glob("*") if p.is_dir()] if log_dir.is_dir() else []
    return names[0] if len(names) == 1 else None


def dashboard_run_name(output_dir: str | None = None, ckpt_path: str | None = None) -> str:
    """The current run's TensorBoard name; a resumed run (ckpt_path) keeps the one it has."""
    if ckpt_path and output_dir:
        existing = existing_run_name(Path(output_dir) / "tensorboard")
        if existing:
            return existing
    if not HydraConfig.initialized():
        return "defaults"
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return single_run_name(hydra_cfg.overrides.task)
    name = run_name(hydra_cfg.overrides.task, swept_keys(hydra_cfg))
    return name or f"job{hydra_cfg.job.num}"


def current_swept_keys() -> list[str]:
    """The keys the current multirun sweeps, in a stable order; [] outside a multirun."""
    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return []
    return sorted(swept_keys(hydra_cfg))


# Keys whose values make repeats of one configuration (never rivals): the sweep summary pools
# them, the HParams tab groups them.
REPEAT_KEYS = ("seed", "data.fold")


def trial_id(name: str, run_dir: Path) -> str:
    """The HParams tab's Trial ID, which is also its session group: a single run's name, then
    the folder that tells runs apart (`quickstart [runs/2026-11-30_01-44-35]`); a multirun job's
    configuration (its swept values but seeds and folds) and the multirun folder
    (`lr=0.0003,dropout=0.5 [2026-11-30_01-44-35]`), so that the repeats of one configuration
    form one group, for which TensorBoard shows the mean, median, min or max of the metrics."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra_cfg = HydraConfig.get()
        keys = swept_keys(hydra_cfg) - set(REPEAT_KEYS)
        configuration = run_name(hydra_cfg.overrides.task, keys) or "all jobs"
        return f"{configuration} [{run_dir.parent.name}]"
    return f"{name} [{run_dir.parent.name}/{run_dir.name}]"


def sweep_size(hydra_cfg) -> int | None:
    """How many jobs the current multirun launches: Optuna's `n_trials`, or the basic sweeper's
    grid (its `params` and the command-line sweeps, read from multirun.yaml as the sweeper
    combined them); None where it cannot be known (another sweeper, a glob over config groups)."""
    n_trials = OmegaConf.select(hydra_cfg, "sweeper.n_trials")
    if n_trials is not None:
        return int(n_trials)
    if not str(OmegaConf.select(hydra_cfg, "sweeper._target_") or "").endswith("BasicSweeper"):
        return None
    multirun_yaml = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        saved = OmegaConf.load(multirun_yaml)
        params = OmegaConf.select(saved, "hydra.sweeper.params")
        params = OmegaConf.to_container(params, resolve=True) if params else {}
        task = list(OmegaConf.select(saved, "hydra.overrides.task") or [])
        parsed = OverridesParser.create().parse_overrides(
            [f"{key}={value}" for key, value in params.items()] + task
        )
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # an unreadable or unusual sweep: its size stays unknown, nothing fails
        return None


def job_label() -> str | None:
    """`job #2 of 8` in a multirun (Hydra's job number, as in its `#2 : ...` launch line and
    the job's folder), `job #2` where the sweep's size is unknown; None outside a multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    size = sweep_size(hydra_cfg)
    return f"job #{hydra_cfg.job.num}" + (f" of {size}" if size else "")
