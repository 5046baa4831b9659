"""`ckpt_path=`: which checkpoint a run resumes from, and which run directory it continues.

A run directory belongs to one run. A training run resumed from `<run>/checkpoints/<x>.ckpt`
continues in `<run>` (TensorBoard, checkpoints and train.log go on there) only when the config
given now is the config `<run>` was trained with (`<run>/.hydra/config.yaml`, compared key for
key as written, before interpolation, except IGNORED_KEYS). Otherwise Hydra starts a new
directory (conf/hydra/default.yaml asks `resume_run_dir`), nothing in `<run>` is touched, and
train() refuses, naming the keys that differ. `ckpt_path=last` takes the newest `last.ckpt` among
the runs whose config matches, never another experiment's.

When Hydra does continue in an existing directory, it writes this invocation's config into
`.hydra/invocation-<time>/` (`invocation_subdir`), so the run's own `.hydra/` stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tb_lightning.core.errors import ConfigError

LAST = "last"
# Keys that may differ between a run and its resume: they do not change what is computed
# (where outputs go, what the terminal shows).
IGNORED_KEYS = (
    "ckpt_path",
    "paths.log_dir",
    "paths.output_dir",
    "callbacks.progress_bar",
    "callbacks.model_summary",
    # Caches change how fast images are served, not the images.
    "data.cache_images",
    "data.image_cache_dir",
)
SAVED_CONFIG = Path(".hydra") / "config.yaml"


@dataclass
class ResumePlan:
    """What `ckpt_path` asks for: the checkpoint, its run directory (None when the file does not
    sit in a run's checkpoints/ folder) and how that run's config differs from this one."""

    checkpoint: Path | None = None
    run_dir: Path | None = None
    differences: list[tuple[str, Any, Any]] = field(default_factory=list)

    @property
    def continues_run(self) -> bool:
        """True when the resume continues in the checkpoint's own run directory."""
        return self.run_dir is not None and not self.differences


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'net': {'dropout': 0.5}}} -> {'model.net.dropout': 0.5}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def comparable(config: Any) -> dict[str, Any]:
    """A run's config as flat keys, as written (interpolations unresolved), without Hydra's own
    node and the ignored keys."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)
    flat = flatten({k: v for k, v in config.items() if k != "hydra"})
    return {
        k: v
        for k, v in flat.items()
        if not any(k == i or k.startswith(f"{i}.") for i in IGNORED_KEYS)
    }


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, this value) for every key whose values differ (missing: None)."""
    a, b = comparable(saved), comparable(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run was started with (its .hydra/config.yaml), or None."""
    path = run_dir / SAVED_CONFIG
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def run_dir_of(ckpt_path: Path) -> Path | None:
    """`<run>` for a checkpoint at `<run>/checkpoints/<name>.ckpt` of a Hydra run, else None."""
    run = ckpt_path.parent.parent
    if ckpt_path.parent.name == "checkpoints" and (run / SAVED_CONFIG).is_file():
        return run
    return None


def describe_differences(differences: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    shown = [f"{k} ({a!r} there, {b!r} here)" for k, a, b in differences[:limit]]
    more = f" and {len(differences) - limit} more" if len(differences) > limit else ""
    return ", ".join(shown) + more


def plan_resume(ckpt_path: Any, runs_dir: str | Path, current: Any) -> ResumePlan:
    """The checkpoint `ckpt_path` names (`last`: the newest matching run's last.ckpt), its run
    and the config differences; a ConfigError when there is no such checkpoint."""
    if ckpt_path is None or str(ckpt_path) == "":
        return ResumePlan()
    if str(ckpt_path) == LAST:
        return plan_last(Path(runs_dir), current)
    path = check_ckpt_path(ckpt_path)
    run = run_dir_of(path)
    saved = saved_config(run) if run is not None else None
    differences = config_differences(saved, current) if saved is not None else []
    return ResumePlan(path, run, differences)


def check_ckpt_path(ckpt_path: Any) -> Path:
    """A ckpt_path other than `last`, as an existing file."""
    path = Path(str(ckpt_path)).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; pass a checkpoint such as "
            "outputs/train/runs/<run>/checkpoints/last.ckpt, ckpt_path=last for the newest "
            "last.ckpt of a run with this config, or ckpt_path=null to start afresh."
        )
    return path


def plan_last(runs_dir: Path, current: Any) -> ResumePlan:
    """ckpt_path=last: the newest last.ckpt under runs_dir whose run has this very config."""
    candidates = sorted(
        runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    nearest: tuple[Path, list] | None = None
    for path in candidates:
        saved = saved_config(path.parent.parent)
        if saved is None:
            continue
        differences = config_differences(saved, current)
        if not differences:
            return ResumePlan(path.resolve(), path.parent.parent.resolve(), [])
        if nearest is None or len(differences) < len(nearest[1]):
            nearest = (path.parent.parent, differences)
    hint = (
        f" (the closest, {nearest[0]}, differs in {describe_differences(nearest[1], 3)})"
        if nearest
        else ""
    )
    raise ConfigError(
        f"ckpt_path=last found no run under {runs_dir} with a last.ckpt and this config"
        f"{hint}; give the same overrides as the run to resume, pass its checkpoint with "
        "ckpt_path=<run>/checkpoints/last.ckpt, or drop ckpt_path to start afresh."
    )


def refuse_differences(plan: ResumePlan, ckpt_path: Any) -> None:
    """The one sentence for a resume whose config is not its run's."""
    if not plan.differences:
        return
    raise ConfigError(
        f"ckpt_path={ckpt_path} belongs to the run {plan.run_dir}, whose config differs from "
        f"this one in {describe_differences(plan.differences)}; resume with the run's own "
        f"overrides (listed in {plan.run_dir}/.hydra/overrides.yaml), or start a new run from "
        f"its weights with init_from={plan.checkpoint}."
    )


# --- OmegaConf resolvers (registered in config.py, used by conf/hydra/default.yaml) ----------


def resume_run_dir(
    task_name: str, ckpt_path: Any, runs_dir: str, new_dir: str, *, _root_: Any
) -> str:
    """`${tb_run_dir:...}`: the checkpoint's run directory when this training run continues it
    (same config), else new_dir. Errors are left to train(), which reports them in one sentence
    (a resolver cannot)."""
    if task_name != "train" or ckpt_path in (None, ""):
        return new_dir
    try:
        plan = plan_resume(ckpt_path, runs_dir, _root_)
    except (ConfigError, OSError, ValueError):
        return new_dir
    return str(plan.run_dir) if plan.continues_run else new_dir


def invocation_subdir(output_dir: str, stamp: str) -> str:
    """`${tb_hydra_subdir:...}`: `.hydra`, or `.hydra/invocation-<stamp>` when the directory
    already holds a run's `.hydra/` (a resume): Hydra would overwrite the run's own config."""
    if (Path(output_dir) / SAVED_CONFIG).is_file():
        return str(Path(".hydra") / f"invocation-{stamp}")
    return ".hydra"
