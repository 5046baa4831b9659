"""Shared fixtures: a small phantom set, one trained run for every test that needs a checkpoint,
the real images from ../shared/data, and the two ways to run training (CLI and in-process).

Every test writes only under pytest's temporary folders: phantom_overrides points the run, log,
scan-cache and feature-cache folders there.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
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
# it): a temporary folder, so that no test writes into the checkout's data/.
TEST_DATA_DIR = Path(tempfile.mkdtemp(prefix="tb-lightning-tests-"))
atexit.register(shutil.rmtree, TEST_DATA_DIR, ignore_errors=True)

# Small and fast: 64 px phantoms (the smallest AlexNet takes is 63), 24 Normal / 12 TB.
PHANTOM_SIZE = 64
PHANTOM_NORMAL = 24
PHANTOM_TB = 12


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long end-to-end tests (marked slow) first: with `-n auto` (make test) each worker
    starts on one of them and the many short tests fill the gaps, instead of one worker being
    left alone with a long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    ensure_phantom_dataset(
        root, PHANTOM_NORMAL, PHANTOM_TB, image_size=PHANTOM_SIZE, progress=False
    )
    return root


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
    run_dir = tmp_path_factory.mktemp("train")
    result = run_cli(
        "tb_lightning.train",
        *phantom_overrides(phantom_root),
        "trainer.max_epochs=2",
        "threshold.policy=max_f1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA}")
    return SHARED_DATA


def run_cli(module: str, *overrides: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    """Run `python -m <module> <overrides>` as a user would, capturing its output."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        # The subprocess imports the same checkout's code as the tests (and tests/helpers).
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(TESTS_DIR)]),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
