"""Run names for TensorBoard that carry a sweep job's swept values, e.g. `lr=0.0003,dropout=0.5`.

`conf/logger/tensorboard.yaml` uses it as the logger's version (`${sweep_run_name:}`), so that
`tensorboard --logdir <multirun dir>` lists `<job>/tensorboard/lr=0.0003,dropout=0.5`.
"""

from __future__ import annotations

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
        parsed = OverridesParser.create().parse_overrides(list(task))
        keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
    return keys


def short_names(keys: Iterable[str]) -> dict[str, str]:
    """Last component of each key (`lr`), the full key where two would clash."""
    keys = list(keys)
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def run_name(job_overrides: Iterable[str], keys: set[str]) -> str:
    """`lr=0.0003,dropout=0.5`: the job's values of the swept keys, in command-line order."""
    values = {k: v for k, v in parse_overrides(job_overrides).items() if k in keys}
    names = short_names(values)
    return ",".join(f"{names[k]}={v}" for k, v in values.items())


def sweep_run_name() -> str:
    """The current job's run name in a multirun; "" in a single run (no extra folder level)."""
    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    name = run_name(hydra_cfg.overrides.task, swept_keys(hydra_cfg))
    return name or f"job{hydra_cfg.job.num}"
