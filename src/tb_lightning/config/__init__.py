"""Where the config tree lives, and the OmegaConf resolvers the configs use."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from tb_lightning.core import PROJECT_ROOT
from tb_lightning.core.run_dirs import claim_new_dir, invocation_subdir, resume_run_dir

CONF_DIR = PROJECT_ROOT / "conf"


def compose_train_config(overrides: list[str]) -> Mapping[str, Any] | None:
    """conf/train.yaml composed with these overrides alone, as written (unresolved), or None
    when they no longer compose (a run of an older version): the defaults a resume compares
    an older run's missing keys with (core/run_dirs.py). Read-only: the result is shared."""
    return _compose_train_config(tuple(overrides))


@functools.lru_cache(maxsize=16)
def _compose_train_config(overrides: tuple[str, ...]) -> Mapping[str, Any] | None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its config tree
            cfg = compose("train", list(overrides))
        else:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose("train", list(overrides))
    except Exception:  # noqa: BLE001 - overrides this version cannot compose: no defaults
        return None
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def tb_run_dir(task_name: str, ckpt_path: Any, runs_dir: str, new_dir: str, *, _root_: Any) -> str:
    """`${tb_run_dir:...}`: the run a resume continues, else a new folder of this run's own."""
    chosen = resume_run_dir(
        task_name, ckpt_path, runs_dir, new_dir, _root_=_root_, compose=compose_train_config
    )
    return claim_new_dir(new_dir) if chosen == new_dir else chosen


def register_resolvers() -> None:
    """Register `${tb_project_root:}` (conf/paths) and `${tb_run_name:...}` (conf/logger)."""
    if not OmegaConf.has_resolver("tb_project_root"):
        OmegaConf.register_new_resolver("tb_project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("tb_run_name"):
        # Imported on use: the resolver needs Hydra's job state, not at import time.
        def tb_run_name(output_dir: str | None = None, ckpt_path: str | None = None) -> str:
            from tb_lightning.sweep.naming import dashboard_run_name

            return dashboard_run_name(output_dir, ckpt_path)

        OmegaConf.register_new_resolver("tb_run_name", tb_run_name)
    # conf/hydra/default.yaml: a resumed training run continues in its own directory (only when
    # its config is the run's), a new run gets a directory of its own, and the run's own .hydra/
    # is never overwritten.
    if not OmegaConf.has_resolver("tb_run_dir"):
        OmegaConf.register_new_resolver("tb_run_dir", tb_run_dir)
    if not OmegaConf.has_resolver("tb_new_dir"):
        # Cached in the config object: a multirun's job configs (copies of the cache, also
        # pickled to other processes by the SLURM launcher) resolve the same sweep folder.
        OmegaConf.register_new_resolver("tb_new_dir", claim_new_dir, use_cache=True)
    if not OmegaConf.has_resolver("tb_hydra_subdir"):
        OmegaConf.register_new_resolver("tb_hydra_subdir", invocation_subdir)


register_resolvers()
