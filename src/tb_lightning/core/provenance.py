"""provenance.json: what produced a run's results, in every run directory.

Every run, multirun job and multirun folder of train, eval, predict and export gets a
`provenance.json` (written by the Hydra callback `Provenance`, conf/hydra/default.yaml): the
command line and overrides, the package versions, the git commit of the checkout (and whether it
had uncommitted changes), Python, OS, CPU and GPU, start and end time, and a fingerprint of the
data the run used. It is written when the job starts (`ended`: null) and rewritten when it ends,
so that a run killed on the way still says what it was.

The data fingerprint names no file and no folder, so that it travels with a run:

- train: the run's split.csv: its row count (per split and class) and two SHA-256 digests,
  `sha256` over the sorted sha256 column (the image files' bytes: the same images give the same
  digest, however named or split), `split_sha256` over the sorted `sha256,label,split` rows (the
  same images in the same split with the same labels);
- eval, predict: the images scored (predictions.csv): their count and a digest of their sorted
  paths as predictions.csv writes them;
- export: the exported model's training data (model.json's `training_data`).

Nothing here may stop a run: whatever cannot be found out is null.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tb_lightning.core import PROJECT_ROOT
from tb_lightning.core.atomic import atomic_write_json
from tb_lightning.core.run_dirs import launched_rank

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
# The distributions whose versions decide what a run computes (and this project's own).
PACKAGES = (
    "torch",
    "torchvision",
    "lightning",
    "hydra-core",
    "omegaconf",
    "torchmetrics",
    "numpy",
    "tb-lightning",
)
# How the digests are computed, written beside them so that anyone can recompute one.
IMAGES_DIGEST = "SHA-256 of the sorted sha256 column of split.csv, one hex digest per line"
SPLIT_DIGEST = "SHA-256 of the sorted 'sha256,label,split' rows of split.csv, one per line"
PATHS_DIGEST = "SHA-256 of the sorted path column of predictions.csv, one path per line"
# How many changed files of a dirty checkout are named (their count is always given).
MAX_CHANGED_FILES = 20
GIT_TIMEOUT_S = 10


def now() -> str:
    """The local time with its UTC offset, to the second (ISO 8601)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line() -> str:
    """This process's command as a user typed it: `python -m tb_lightning.train a=b`, or the
    console script's name (`tb-train a=b`), never the interpreter's or script's full path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        program = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        program = [Path(sys.argv[0]).name] if sys.argv and sys.argv[0] else ["python"]
    return shlex.join([*program, *sys.argv[1:]])


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """name -> installed version (None when not installed), read without importing anything."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def git_state(root: Path) -> dict[str, Any] | None:
    """The checkout's commit and whether tracked files differ from it (`dirty`, with the first
    changed files, relative to the checkout); None when root is no git checkout (an installed
    package) or git is missing."""
    # Only root's own repository: a package installed into a venv inside some other checkout
    # must not report that checkout's commit.
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "commit": commit.strip(),
        "branch": branch.strip() if branch else None,
        "dirty": bool(changed) if status is not None else None,
        "changed_files": changed[:MAX_CHANGED_FILES],
        "changed_count": len(changed),
    }


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo on Linux, platform elsewhere)."""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f,
    ):
        for line in f:
            key, _, value = line.partition(":")
            # x86: "model name"; ARM: "Hardware" or "Model" (a board's name).
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or None


def memory_gib() -> float | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return None


def machine() -> dict[str, Any]:
    """Python, OS, host, CPU model and cores, memory."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": platform.platform(),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "architecture": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_gib": memory_gib(),
    }


def driver_version(proc_text: str) -> str | None:
    """The version in /proc/driver/nvidia/version's text (proprietary or open kernel module)."""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", proc_text)
    return found.group(1) if found else None


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version: the kernel module's, else nvidia-smi's."""
    with contextlib.suppress(OSError):
        version = driver_version(Path("/proc/driver/nvidia/version").read_text())
        if version:
            return version
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
                check=False,
            )
            if result.returncode == 0 and result.stdout.strip():
                return result.stdout.splitlines()[0].strip()
    return None


def accelerators() -> dict[str, Any] | None:
    """torch's build and the GPUs it sees (names, driver); None when torch is not imported
    (it is not imported for this alone: a run imports it before it ends)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    record: dict[str, Any] = {"torch_cuda": getattr(torch.version, "cuda", None), "gpus": []}
    try:
        if torch.cuda.is_available():
            record["gpus"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
            record["cudnn"] = torch.backends.cudnn.version()
            record["driver"] = nvidia_driver()
        elif torch.backends.mps.is_available():
            record["gpus"] = ["Apple MPS"]
    except Exception as err:  # noqa: BLE001 - a broken driver is recorded, never raised
        record["error"] = f"{type(err).__name__}: {err}"
    return record


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in sorted(lines)).encode()).hexdigest()


def split_fingerprint(split_csv: Path) -> dict[str, Any] | None:
    """A split.csv's rows counted and digested (module docstring); None when unreadable. A
    split.csv of an older version without hashes gets no `sha256` (its rows are counted)."""
    try:
        with open(split_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    hashes = [row.get("sha256") or "" for row in rows]
    labelled = [f"{row.get('sha256')},{row.get('label')},{row.get('split')}" for row in rows]
    complete = bool(rows) and all(hashes)
    return {
        "source": split_csv.name,
        "images": len(rows),
        "splits": dict(Counter(row.get("split") or "" for row in rows)),
        "classes": dict(Counter(row.get("class_name") or row.get("label") or "" for row in rows)),
        "sha256": _digest(hashes) if complete else None,
        "sha256_of": IMAGES_DIGEST,
        "split_sha256": _digest(labelled) if complete else None,
        "split_sha256_of": SPLIT_DIGEST,
    }


def csv_paths(path: Path) -> list[str] | None:
    """The path column of a CSV file (lines starting with # skipped), or None."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = (line for line in f if not line.startswith("#"))  # a header comment
            return [row.get("path") or "" for row in csv.DictReader(lines)]
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def scored_fingerprint(predictions_csv: Path) -> dict[str, Any] | None:
    """The images an eval or predict run scored (its predictions.csv): count and path digest,
    and the bad files it left out (skipped.csv beside it)."""
    paths = csv_paths(predictions_csv)
    if paths is None:
        return None
    skipped = csv_paths(predictions_csv.parent / "skipped.csv") or []
    return {
        "source": predictions_csv.name,
        "images": len(paths),
        "skipped": len(skipped),
        "paths_sha256": _digest(paths),
        "paths_sha256_of": PATHS_DIGEST,
    }


def data_fingerprint(output_dir: Path) -> dict[str, Any] | None:
    """The fingerprint of the data a finished run used, from what it wrote (module docstring)."""
    if (output_dir / "split.csv").is_file():
        return split_fingerprint(output_dir / "split.csv")
    if (output_dir / "predictions.csv").is_file():
        return scored_fingerprint(output_dir / "predictions.csv")
    if (output_dir / "model.json").is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            training = json.loads((output_dir / "model.json").read_text()).get("training_data")
            return {**training, "source": "model.json (the exported model's training split.csv)"}
    return None


def invocation_record(config: DictConfig) -> dict[str, Any]:
    """What is known when a job (or multirun) starts."""
    hydra_cfg = config.hydra
    choices = dict(OmegaConf.to_container(hydra_cfg.runtime.choices) or {})
    record: dict[str, Any] = {
        "task": config.get("task_name") or hydra_cfg.job.name,
        "status": "running",
        "started": now(),
        "ended": None,
        "duration_s": None,
        "command": command_line(),
        "overrides": {
            "task": list(hydra_cfg.overrides.task),
            "hydra": list(hydra_cfg.overrides.hydra),
        },
        # This invocation's composed config, relative to the run directory (set per job).
        "config": None,
        # The config groups chosen (data=phantom, model=alexnet, ...), Hydra's own left out.
        "choices": {k: v for k, v in choices.items() if not str(k).startswith("hydra")},
        "packages": package_versions(),
        "git": git_state(PROJECT_ROOT),
        "machine": machine(),
        "accelerators": accelerators(),
        "data": None,
    }
    if hydra_cfg.mode == RunMode.MULTIRUN:
        record["job"] = {"num": hydra_cfg.job.get("num"), "id": hydra_cfg.job.get("id")}
    return record


def job_status(output_dir: Path, job_return: JobReturn | None) -> str:
    """completed, or failed (an exception, or a multirun job stopped by a user's mistake: its
    error.txt), or stopped (the program ended before the job returned)."""
    from tb_lightning.core.tasks import ERROR_FILE

    if job_return is None:
        return "stopped"
    if job_return.status == JobStatus.FAILED or (output_dir / ERROR_FILE).is_file():
        return "failed"
    return "completed"


class Provenance(Callback):
    """Hydra callback: provenance.json in every run, multirun job and multirun folder, written
    at the start (`ended`: null) and rewritten at the end with the end time, status, GPUs and
    the data fingerprint. A program that ends before its job returns (a user's mistake, a
    signal) still rewrites it at exit, with status `stopped`."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple[dict[str, Any], float, bool]] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(config, Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        self._end(Path(config.hydra.runtime.output_dir), job_return)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(config, Path(str(config.hydra.sweep.dir)), multirun=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end(Path(str(config.hydra.sweep.dir)), JobReturn(status=JobStatus.COMPLETED))

    def _start(self, config: DictConfig, folder: Path, multirun: bool = False) -> None:
        # Another process of the same run (a DDP rank) writes nothing: rank 0 records the run.
        # A folder that does not exist is a multirun stopped before its first job.
        if launched_rank() != 0 or not folder.is_dir():
            return
        try:
            record = invocation_record(config)
            if multirun:
                record.pop("job", None)
                record["data"] = "in each job's provenance.json"
            else:
                record["config"] = saved_config_file(folder)
            earlier = read_provenance(folder)
            if earlier:  # a resume continuing its run: the earlier invocations are kept
                record["earlier"] = [*earlier.pop("earlier", []), earlier]
            self._open[folder] = (record, time.monotonic(), multirun)
            atomic_write_json(folder / PROVENANCE_FILE, record)
        except Exception as err:  # noqa: BLE001 - provenance never stops a run
            log.warning("Could not write %s: %s", folder / PROVENANCE_FILE, err)
            return
        if len(self._open) == 1:
            atexit.register(self._end_all_at_exit)

    def _end(self, folder: Path, job_return: JobReturn | None) -> None:
        opened = self._open.pop(folder, None)
        if not self._open:
            atexit.unregister(self._end_all_at_exit)
        if opened is None or not folder.is_dir():  # a folder removed meanwhile is not made again
            return
        record, started, multirun = opened
        try:
            record["ended"] = now()
            record["duration_s"] = round(time.monotonic() - started, 1)
            record["accelerators"] = accelerators()
            if multirun:
                record["jobs"] = jobs_by_status(folder)
                # Hydra's record of the sweep, written once the first job is launched.
                record["config"] = "multirun.yaml" if (folder / "multirun.yaml").is_file() else None
                record["status"] = "completed" if job_return is not None else "stopped"
            else:
                record["status"] = job_status(folder, job_return)
                record["data"] = data_fingerprint(folder)
            atomic_write_json(folder / PROVENANCE_FILE, record)
        except Exception as err:  # noqa: BLE001 - provenance never stops a run
            log.warning("Could not write %s: %s", folder / PROVENANCE_FILE, err)

    def _end_all_at_exit(self) -> None:
        """At exit, the folders whose job never returned (SystemExit, a signal): `stopped`."""
        for folder in list(self._open):
            self._end(folder, None)


def saved_config_file(folder: Path) -> str | None:
    """This invocation's composed config, relative to the run: .hydra/config.yaml, or for a
    resume .hydra/invocation-<time>/config.yaml (core/run_dirs.py), the newest written."""
    saved = [folder / ".hydra" / "config.yaml", *folder.glob(".hydra/invocation-*/config.yaml")]
    existing = [path for path in saved if path.is_file()]
    if not existing:
        return None
    return max(existing, key=lambda path: path.stat().st_mtime).relative_to(folder).as_posix()


def jobs_by_status(sweep_dir: Path) -> dict[str, int]:
    """How many of a multirun's jobs completed, failed or stopped (their provenance.json)."""
    statuses = Counter(
        (read_provenance(job) or {}).get("status", "unknown")
        for job in sweep_dir.iterdir()
        if job.is_dir() and (job / PROVENANCE_FILE).is_file()
    )
    return dict(sorted(statuses.items()))


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """A folder's provenance.json, or None (absent or unreadable)."""
    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
