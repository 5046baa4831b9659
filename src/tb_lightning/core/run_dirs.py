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

A new run gets a folder of its own (`claim_new_dir`): the timestamped name, created exclusively,
or the name with `-2`, `-3`, ... when another process started in the same second took it.

A run of an older version lacks the keys added since (`calibration`, `data.preprocess`, ...).
Such a key counts as no difference when its value now is its default, the value this version
composes from the run's own overrides (`.hydra/overrides.yaml`) with nothing else set: a new
option's default keeps the behaviour of the version without it, which the run had. The
refusal of a resume whose config differs names a command that does resume the run, checked by
composing it (`resume_command`), or says that this version cannot rebuild the run's config.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable, Mapping
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
    "callbacks.progress_log",
    "callbacks.model_summary",
    # Caches change how fast images are served, not the images.
    "data.cache_images",
    "data.image_cache_dir",
    # Written by earlier versions: a copy of data.preprocess/data.clahe (compared themselves),
    # which the classifier now takes from the data module.
    "model.preprocess",
)
SAVED_CONFIG = Path(".hydra") / "config.yaml"
SAVED_OVERRIDES = Path(".hydra") / "overrides.yaml"
# compose(overrides): this version's conf/train.yaml composed with these overrides alone, as
# written (unresolved), or None when they no longer compose (config/__init__.py).
Compose = Callable[[list[str]], Mapping[str, Any] | None]


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
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> list[tuple[str, Any, Any]]:
    """(key, the run's value, this value) for every key whose values differ (missing: None).

    With `defaults` (this version's config composed from the run's own overrides), a key the
    run's config lacks (added since that run's version) whose value here is its default is no
    difference.
    """
    a, b = comparable(saved), comparable(current)
    d = comparable(defaults) if defaults is not None else {}
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not (k not in a and k in b and k in d and d[k] == b[k])
    ]


def run_differences(
    run: Path,
    saved: Mapping[str, Any],
    current: Any,
    compose: Compose | None,
    all_added: bool = False,
) -> list[tuple[str, Any, Any]]:
    """config_differences between a run and `current`, keys added since the run's version
    judged against their defaults (composed only when some difference is such a key; with
    `all_added`, only when every one is, as a run differing in a key it has cannot match)."""
    differences = config_differences(saved, current)
    flat = comparable(saved)
    added = [k not in flat for k, _, _ in differences]
    if compose is None or not any(added) or (all_added and not all(added)):
        return differences
    defaults = run_defaults(run, compose)
    return config_differences(saved, current, defaults) if defaults is not None else differences


def run_overrides(run: Path) -> list[str] | None:
    """The overrides a run was started with (its .hydra/overrides.yaml), or None."""
    path = run / SAVED_OVERRIDES
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # noqa: BLE001 - an unreadable record is no record
        return None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def own_overrides(overrides: list[str]) -> list[str]:
    """A run's overrides without those that only said which checkpoint it resumed."""
    return [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]


def run_defaults(run: Path, compose: Compose) -> Mapping[str, Any] | None:
    """This version's config composed from the run's own overrides alone (None: unknown)."""
    overrides = run_overrides(run)
    return compose(own_overrides(overrides)) if overrides is not None else None


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


def plan_resume(
    ckpt_path: Any, runs_dir: str | Path, current: Any, compose: Compose | None = None
) -> ResumePlan:
    """The checkpoint `ckpt_path` names (`last`: the newest matching run's last.ckpt), its run
    and the config differences; a ConfigError when there is no such checkpoint. `compose`
    gives the defaults of keys added since an older run (None: every such key differs)."""
    if ckpt_path is None or str(ckpt_path) == "":
        return ResumePlan()
    if str(ckpt_path) == LAST:
        return plan_last(Path(runs_dir), current, compose)
    path = check_ckpt_path(ckpt_path)
    run = run_dir_of(path)
    saved = saved_config(run) if run is not None else None
    differences = (
        run_differences(run, saved, current, compose)
        if run is not None and saved is not None
        else []
    )
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


def plan_last(runs_dir: Path, current: Any, compose: Compose | None = None) -> ResumePlan:
    """ckpt_path=last: the newest last.ckpt under runs_dir whose run has this very config."""
    candidates = sorted(
        runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    nearest: tuple[Path, list] | None = None
    for path in candidates:
        run = path.parent.parent
        saved = saved_config(run)
        if saved is None:
            continue
        differences = run_differences(run, saved, current, compose, all_added=True)
        if not differences:
            return ResumePlan(path.resolve(), run.resolve(), [])
        if nearest is None or len(differences) < len(nearest[1]):
            nearest = (run, differences)
    hint = closest = ""
    if nearest:
        hint = f" (the closest, {nearest[0]}, differs in {describe_differences(nearest[1], 3)})"
        last = (nearest[0] / "checkpoints" / "last.ckpt").resolve()
        command = resume_command(nearest[0], last, compose)
        # Last, with no full stop after it: a command to copy.
        closest = f"; the closest resumes with its own config: {command}" if command else ""
    raise ConfigError(
        f"ckpt_path=last found no run under {runs_dir} with a last.ckpt and this config"
        f"{hint}; give the same overrides as the run to resume, pass its checkpoint with "
        f"ckpt_path=<run>/checkpoints/last.ckpt, or drop ckpt_path to start afresh{closest or '.'}"
    )


def refuse_differences(plan: ResumePlan, ckpt_path: Any, compose: Compose | None = None) -> None:
    """The one sentence for a resume whose config is not its run's, with the command that
    resumes the run (checked to give its config) when this version can rebuild it."""
    if not plan.differences or plan.run_dir is None:
        return
    command = resume_command(plan.run_dir, plan.checkpoint, compose)
    start = (
        f"ckpt_path={ckpt_path} belongs to the run {plan.run_dir}, whose config differs from "
        f"this one in {describe_differences(plan.differences)}; start a new run from its "
        f"weights with init_from={plan.checkpoint}"
    )
    if command:  # last, with no full stop after it: a command to copy
        raise ConfigError(f"{start}, or resume it with its own config: {command}")
    if run_overrides(plan.run_dir) is not None and compose is not None:
        raise ConfigError(
            f"{start} (this version cannot rebuild the run's config from its overrides, so it "
            "cannot be resumed)."
        )
    raise ConfigError(f"{start}, or resume it with the overrides it was started with.")


def resume_command(run: Path, checkpoint: Path | None, compose: Compose | None) -> str | None:
    """`python -m tb_lightning.train <the run's overrides> ckpt_path=<checkpoint>`, plus the
    run's value of every key whose default this version changed, when composing it gives the
    run's config; None when it would not (or cannot be known)."""
    if compose is None or checkpoint is None:
        return None
    saved, overrides = saved_config(run), run_overrides(run)
    if saved is None or overrides is None:
        return None
    base = own_overrides(overrides)
    defaults = compose(base)
    if defaults is None:
        return None
    known = comparable(defaults)
    extra = []
    for key, value, _ in config_differences(saved, defaults, defaults):
        if key not in known or not plain_value(value):
            return None  # a key this version no longer has, or no value a command can give
        extra.append(f"{key}={override_value(value)}")
    command = [*base, *extra, f"ckpt_path={override_value(str(checkpoint))}"]
    composed = compose(command)
    if composed is None or config_differences(saved, composed, defaults):
        return None
    return "python -m tb_lightning.train " + " ".join(shlex.quote(o) for o in command)


def plain_value(value: Any) -> bool:
    """A value a command-line override can give: a scalar or a list of scalars."""
    if isinstance(value, list):
        return all(not isinstance(v, list) and plain_value(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


# Unquoted in an override these read as another type (or as Hydra's grammar).
_UNQUOTED = re.compile(r"[A-Za-z_/.~][\w./~@+-]*")
_TYPED = {"true", "false", "null", "nan", "inf"}


def override_value(value: Any) -> str:
    """`value` as Hydra's override grammar reads it back: null, true, 3, 1e-04, [a,b], or a
    string (quoted when it would otherwise read as another type)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    text = str(value)
    if _UNQUOTED.fullmatch(text) and text.lower() not in _TYPED:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- OmegaConf resolvers (registered in config.py, used by conf/hydra/default.yaml) ----------


def resume_run_dir(
    task_name: str,
    ckpt_path: Any,
    runs_dir: str,
    new_dir: str,
    *,
    _root_: Any,
    compose: Compose | None = None,
) -> str:
    """`${tb_run_dir:...}`: the checkpoint's run directory when this training run continues it
    (same config), else new_dir. Errors are left to train(), which reports them in one sentence
    (a resolver cannot)."""
    if task_name != "train" or ckpt_path in (None, ""):
        return new_dir
    try:
        plan = plan_resume(ckpt_path, runs_dir, _root_, compose)
    except (ConfigError, OSError, ValueError):
        return new_dir
    return str(plan.run_dir) if plan.continues_run else new_dir


def launched_rank() -> int:
    """This process's rank when a launcher started several processes for one run (Lightning's
    DDP, torchrun, srun), else 0. The other ranks work in rank 0's folder."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


# The folder each candidate name became in this process: Hydra resolves hydra.run.dir (and
# sweep.dir) more than once, and every resolution must give the folder claimed the first time.
_CLAIMED: dict[str, str] = {}


def claim_new_dir(candidate: str) -> str:
    """A folder of this process's own: `candidate` created exclusively (os.mkdir without
    exist_ok), or `candidate-2`, `-3`, ... when another process took it (two runs started in
    the same second: SLURM arrays, launch loops). The same answer on every call with the same
    candidate. When the folder cannot be created, `candidate` as it is: the run-directory guard
    (core/run_lock.py) then names the folder and the key in one sentence."""
    if candidate in _CLAIMED:
        return _CLAIMED[candidate]
    if launched_rank() != 0:
        return candidate
    path = Path(candidate)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return candidate
    number = 1
    while True:
        attempt = path if number == 1 else path.with_name(f"{path.name}-{number}")
        try:
            os.mkdir(attempt)
        except FileExistsError:
            number += 1
            continue
        except OSError:
            return candidate
        _CLAIMED[candidate] = str(attempt)
        return str(attempt)


def invocation_subdir(output_dir: str, stamp: str) -> str:
    """`${tb_hydra_subdir:...}`: `.hydra`, or `.hydra/invocation-<stamp>` when the directory
    already holds a run's `.hydra/` (a resume): Hydra would overwrite the run's own config."""
    if (Path(output_dir) / SAVED_CONFIG).is_file():
        return str(Path(".hydra") / f"invocation-{stamp}")
    return ".hydra"
