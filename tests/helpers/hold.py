"""A Hydra callback that holds a run at the start of its job until a test lets it go.

Added with `+hydra.callbacks.hold._target_=helpers.hold.HoldAtJobStart` (tests/ on PYTHONPATH):
the run has taken its run folder's lock (conf/hydra/default.yaml's guard runs before any job
starts), so a test can start a second process on the same folder at a known moment.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class HoldAtJobStart(Callback):
    """At the job's start: touch `held_file`, then wait until `release_file` exists."""

    def __init__(self, held_file: str, release_file: str, timeout_s: float = 300) -> None:
        self.held_file, self.release_file = Path(held_file), Path(release_file)
        self.timeout_s = timeout_s

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self.held_file.write_text("held\n")
        deadline = time.monotonic() + self.timeout_s
        while not self.release_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
