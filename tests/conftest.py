"""Shared fixtures: a small phantom set, one trained run and one 3-fold multirun for every test
that needs a checkpoint or an ensemble, the real images from ../shared/data, and the two ways to
run training (CLI and in-process).

The session fixtures are built once per `pytest` run, also with pytest-xdist: the first worker
that asks builds them (under a file lock) in the base temporary folder all workers share, the
others wait and read them (shared_folder). Tests only read them: a test that changes a run
works on a copy.

Every test writes only under pytest's temporary folders: phantom_overrides points the run, log,
scan-cache and feature-cache folders there.

Cost: each `python -m tb_lightning.<task>` start pays ~5 s of imports (torch, Lightning, Hydra)
before any work, so the default suite runs each entry point through the CLI where the process is
what is tested (exit codes, signals, Hydra's folders, what a user types) and calls the task
function in-process elsewhere (train_in_process, eval_config and compose_task).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from tb_lightning.config import CONF_DIR, PROJECT_ROOT
from tb_lightning.data.phantom import ensure_phantom_dataset

# One compute thread per process, set before torch is first imported and inherited by the CLI
# subprocesses: `make test` runs one pytest worker per core (pytest-xdist), and workers with a
# thread per core each would fight over the cores. (Every process of the suite then computes
# with the same thread count, so runs compared bit for bit stay comparable.)
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
TESTS_DIR = Path(__file__).resolve().parent
# paths.data_dir of every config composed here (the default data roots and caches live under
# it): a temporary folder, so that no test writes into the checkout's data/. One for the whole
# pytest run: made by the process that starts (and later removes) it, handed to pytest-xdist's
# workers through the environment they inherit, since the shared runs' saved configs name it
# (a resume's config must match theirs).
_DATA_DIR_VARIABLE = "TB_LIGHTNING_TEST_DATA_DIR"
if os.environ.get(_DATA_DIR_VARIABLE):
    TEST_DATA_DIR = Path(os.environ[_DATA_DIR_VARIABLE])
else:
    TEST_DATA_DIR = Path(tempfile.mkdtemp(prefix="tb-lightning-tests-"))
    os.environ[_DATA_DIR_VARIABLE] = str(TEST_DATA_DIR)
    atexit.register(shutil.rmtree, TEST_DATA_DIR, ignore_errors=True)

# Small and fast: 64 px phantoms (the smallest AlexNet takes is 63), 24 Normal / 12 TB.
PHANTOM_SIZE = 64
PHANTOM_NORMAL = 24
PHANTOM_TB = 12


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long end-to-end tests (marked slow) first: with `-n auto` (make test-slow, make
    test-all) each worker starts on one of them and the many short tests fill the gaps, instead
    of one worker being left alone with a long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def shared_folder(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
    """`<base temp>/shared/<name>`, filled by build(folder) once per pytest run: with
    pytest-xdist the first worker to ask builds it under a file lock, the others wait and reuse
    it (each worker's session fixtures would otherwise build their own copy). A build that
    failed is started again by the next worker that asks."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's popen-gw<N>
    folder = base / "shared" / name
    done = folder.with_name(f"{name}.done")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.with_name(f"{name}.lock"))):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small phantom set (24 Normal, 12 TB at 64 px), one for every worker: the trained
    run's split.csv names these very files."""

    def build(root: Path) -> None:
        ensure_phantom_dataset(
            root, PHANTOM_NORMAL, PHANTOM_TB, image_size=PHANTOM_SIZE, progress=False
        )

    return shared_folder(tmp_path_factory, "phantom", build)


def phantom_overrides(root: Path) -> list[str]:
    """Overrides for a quick CPU run on the small phantom set, writing only beside it (tmp)."""
    return [
        "data=phantom",
        f"data.root={root}",
        f"data.phantom.num_normal={PHANTOM_NORMAL}",
        f"data.phantom.num_tb={PHANTOM_TB}",
        f"data.phantom.image_size={PHANTOM_SIZE}",
        f"data.image_size={PHANTOM_SIZE}",
        "data.val_size=12",
        "data.batch_size=8",
        "data.num_workers=0",
        # Caches and runs stay out of the checkout's data/ and outputs/ folders.
        f"data.cache_dir={root.parent / 'feature_cache'}",
        f"data.scan_cache_dir={root.parent / 'scan_cache'}",
        f"paths.log_dir={root.parent / 'outputs'}",
        f"paths.data_dir={TEST_DATA_DIR}",
        "model.net.weights=null",
        "trainer=cpu",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]


def eval_config(ckpt: Path, output_dir: Path, *overrides: str) -> DictConfig:
    """conf/eval.yaml composed for `ckpt` (100 bootstrap resamples: fast), writing output_dir."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "eval",
            [
                f"ckpt_path={ckpt}",
                "eval.bootstrap=100",
                "trainer.accelerator=cpu",
                f"paths.output_dir={output_dir}",
                *overrides,
            ],
        )


def compose_train(overrides: list[str], output_dir: Path | str = "/tmp/unused") -> DictConfig:
    """conf/train.yaml composed as Hydra would, for a run in output_dir (no Hydra job)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={output_dir}",
                f"paths.data_dir={TEST_DATA_DIR}",
                *overrides,
            ],
        )


def train_in_process(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """train(cfg) in this process, as the CLI runs it but without Hydra's job (and its start-up
    time); like Hydra, it records the composed config in run_dir/.hydra/config.yaml."""
    from tb_lightning.train import train

    cfg = compose_train(overrides, output_dir=run_dir)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return train(cfg)


@pytest.fixture(scope="session")
def trained_run(phantom_root, tmp_path_factory) -> Path:
    """One short training run through the CLI, as a user runs it (2 epochs, the max_f1 policy):
    its run directory, and its best.ckpt for every test of eval, predict and export."""

    def build(run_dir: Path) -> None:
        result = run_cli(
            "tb_lightning.train",
            *phantom_overrides(phantom_root),
            "trainer.max_epochs=2",
            "threshold.policy=max_f1",
            f"hydra.run.dir={run_dir}",
            warm=True,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return shared_folder(tmp_path_factory, "train", build)


@pytest.fixture(scope="session")
def evaluated_run(trained_run, tmp_path_factory) -> tuple[Path, str]:
    """`python -m tb_lightning.eval` of the session's best.ckpt on its val split, as a user runs
    it: its run directory and what it printed (stdout and stderr)."""

    def build(folder: Path) -> None:
        result = run_cli(
            "tb_lightning.eval",
            f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
            f"hydra.run.dir={folder}",
            warm=True,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        folder.with_name("eval.output.txt").write_text(result.stdout + result.stderr)

    out = shared_folder(tmp_path_factory, "eval", build)
    return out, out.with_name("eval.output.txt").read_text()


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory) -> Path:
    """`python -m tb_lightning.export` of the session's best.ckpt with its default format
    (ONNX), as a user runs it: its run directory (model.onnx, model.json, provenance.json)."""

    def build(folder: Path) -> None:
        result = run_cli(
            "tb_lightning.export",
            f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
            f"hydra.run.dir={folder}",
            warm=True,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return shared_folder(tmp_path_factory, "export", build)


# The session's k-fold run: 3 folds of 1 epoch and a shared 8-image test split.
KFOLD_FOLDS = 3
KFOLD_TEST_SIZE = 8


@pytest.fixture(scope="session")
def kfold_run(phantom_root, tmp_path_factory) -> Path:
    """One `-m sweep=kfold` multirun through the CLI, as a user runs it: its multirun directory
    (jobs 0-2, sweep_summary.*), the ensemble of every test of `ckpt_path=<folder>`."""

    def build(folder: Path) -> None:
        result = run_cli(
            "tb_lightning.train", "-m", *phantom_overrides(phantom_root), "sweep=kfold",
            f"data.num_folds={KFOLD_FOLDS}", f"data.test_size={KFOLD_TEST_SIZE}",
            "trainer.max_epochs=1", f"hydra.sweep.dir={folder}", warm=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    return shared_folder(tmp_path_factory, "kfold", build)


def compose_task(name: str, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml (eval, predict, export) composed as its entry point would, for an
    in-process run of the task function (tb_lightning.<name>.<function>(cfg))."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[f"paths.data_dir={TEST_DATA_DIR}", *overrides])


@pytest.fixture
def quick_loads():
    """Checkpoints load without drawing the random weights of torchvision's AlexNet classifier,
    which the network builder throws away at once (~0.5 s of each load;
    data_builders.skipped_init_of_discarded_layers). For tests that load checkpoints and do
    not train (the random draws of a training run would change): modules that only load use
    it through `pytestmark = pytest.mark.usefixtures("quick_loads")`. Function-scoped, so the
    session's and the modules' runs are trained before it applies."""
    from data_builders import skipped_init_of_discarded_layers

    with skipped_init_of_discarded_layers():
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA}")
    return SHARED_DATA


def run_cli(
    module: str, *overrides: str, cwd: Path = PROJECT_ROOT, warm: bool = False
) -> subprocess.CompletedProcess:
    """Run `python -m <module> <overrides>` as a user would, capturing its output.

    warm: in a fork of this process (helpers/warm_cli.py), whose imports are done: the same
    command, its own process, exit code and output, ~7 s of CPU less. The default suite's
    end-to-end runs are warm; a test about the start-up itself (what is imported before a
    mistake is answered) or about a fresh process needs a cold one (the default).
    TB_LIGHTNING_TESTS_COLD_CLI=1 makes every run cold.
    """
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        # The subprocess imports the same checkout's code as the tests (and tests/helpers).
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(TESTS_DIR)]),
    }
    if warm and not os.environ.get("TB_LIGHTNING_TESTS_COLD_CLI"):
        from helpers.warm_cli import AUTOGRAD_FORK_ERROR, run_in_fork

        result = run_in_fork(module, list(overrides), env, cwd)
        # A test of this worker ran backward() before: PyTorch refuses autograd in a fork
        # once its engine started threads, at the child's first backward. Cold, then.
        if result.returncode == 0 or AUTOGRAD_FORK_ERROR not in result.stderr:
            return result
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
