"""`ckpt_path=`: which checkpoint a run resumes from, and which run directory it continues.

`ckpt_path=last` picks the newest `outputs/train/runs/*/checkpoints/last.ckpt`. A run resumed from
`<run>/checkpoints/*.ckpt` continues in `<run>` itself (see conf/hydra/default.yaml): its
ModelCheckpoints then restore their state (Lightning only restores `best_model_score` when the
checkpoint directory is unchanged), so the best checkpoint is chosen over all epochs, and the
TensorBoard curves continue where they stopped.
"""

from __future__ import annotations

from pathlib import Path

from tb_lightning.errors import ConfigError

LAST = "last"


def find_last_checkpoint(runs_dir: str | Path) -> Path:
    """The most recently written `<runs_dir>/*/checkpoints/last.ckpt`."""
    runs_dir = Path(runs_dir)
    candidates = sorted(runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(
            f"ckpt_path=last found no {runs_dir}/*/checkpoints/last.ckpt; pass the path of a "
            "checkpoint, e.g. ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt."
        )
    return candidates[-1]


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str | Path) -> Path | None:
    """`ckpt_path` as an existing file: `last` searched under runs_dir, a path checked."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == LAST:
        return find_last_checkpoint(runs_dir)
    path = Path(str(ckpt_path)).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path} does not exist; pass a checkpoint such as "
            "outputs/train/runs/<run>/checkpoints/last.ckpt, ckpt_path=last for the newest "
            "last.ckpt, or ckpt_path=null to start afresh."
        )
    return path


def run_dir_of(ckpt_path: Path) -> Path | None:
    """`<run>` for a checkpoint at `<run>/checkpoints/<name>.ckpt` of a Hydra run, else None."""
    run = ckpt_path.parent.parent
    if ckpt_path.parent.name == "checkpoints" and (run / ".hydra").is_dir():
        return run
    return None


def resume_run_dir(task_name: str, ckpt_path: str | None, runs_dir: str, new_dir: str) -> str:
    """Resolver `${tb_run_dir:...}`: the run dir to continue when training resumes, else new_dir.

    Only `train` continues a run; other tasks that take a checkpoint get a directory of their own.
    Errors are left to train(), which reports them in one sentence (a resolver cannot).
    """
    if task_name != "train":
        return new_dir
    try:
        path = resolve_ckpt_path(ckpt_path, runs_dir)
    except ConfigError:
        return new_dir
    run = run_dir_of(path) if path is not None else None
    return str(run) if run is not None else new_dir
