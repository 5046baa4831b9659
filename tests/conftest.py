"""Shared fixtures: a small phantom set, the real images from ../shared/data, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tb_lightning.config import PROJECT_ROOT
from tb_lightning.data.phantom import ensure_phantom_dataset

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Small and fast: 128 px phantoms, 24 Normal / 12 TB.
PHANTOM_SIZE = 128
PHANTOM_NORMAL = 24
PHANTOM_TB = 12


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    ensure_phantom_dataset(
        root, PHANTOM_NORMAL, PHANTOM_TB, image_size=PHANTOM_SIZE, progress=False
    )
    return root


def phantom_overrides(root: Path) -> list[str]:
    """Overrides for a quick CPU run on the small phantom set."""
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
        # Cached backbone features stay out of the checkout's data/ folder.
        f"data.cache_dir={root.parent / 'feature_cache'}",
        "model.net.weights=null",
        "trainer=cpu",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
    ]


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
        # The subprocess imports the same checkout's code as the tests.
        "PYTHONPATH": str(PROJECT_ROOT / "src"),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
