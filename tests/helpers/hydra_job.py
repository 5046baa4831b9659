"""The part of a Hydra job's config that the provenance callback reads, for tests that drive
the callback by hand (in the test process or in a small subprocess: no torch imported here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def job_config(output_dir: Path) -> Any:
    """A single run's job of train, writing into output_dir."""
    return OmegaConf.create(
        {
            "task_name": "train",
            "hydra": {
                "mode": "RUN",
                "job": {"name": "train"},
                "runtime": {"output_dir": str(output_dir), "choices": {"data": "phantom"}},
                "overrides": {"task": ["seed=1"], "hydra": []},
            },
        }
    )
