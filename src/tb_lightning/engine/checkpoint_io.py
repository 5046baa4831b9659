"""Checkpoints written atomically: a kill during a save never leaves a truncated file.

Lightning's TorchCheckpointIO writes through an fsspec transaction, which for local files goes
through a temporary file in the system temp dir and `shutil.move`: across file systems that is a
copy into the destination, and nothing is fsynced. Here the bytes go to a temporary file beside
the target, are fsynced, and `os.replace` swaps it in (core/atomic.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from tb_lightning.core.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic (see the module docstring); loads are unchanged.

    Configured in conf/trainer/default.yaml as a Trainer plugin.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options "
                f"(got {storage_options!r})."
            )
        if "://" in str(path):  # remote storage: leave it to fsspec as Lightning does
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)
