"""Atomic file writes: a reader, or a kill at any moment, sees the old file or the new one, never
half of one.

The bytes go to a temporary file beside the target (`.<name>.<random>.tmp`), are fsynced, and
`os.replace` swaps it in (an atomic rename on POSIX and Windows); then the directory is fsynced
so that the rename itself survives a crash. Every file this project writes for later reading
(checkpoints, metrics, reports, caches, phantoms, summaries) goes through here.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_with(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call write(binary file) on a temporary file, then rename it to path.

    The file gets the mode a plain open() would give it (mkstemp makes it private, 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename durable (POSIX); not possible on Windows
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to path atomically."""
    payload = data.encode() if isinstance(data, str) else data
    atomic_write_with(path, lambda f: f.write(payload))


def atomic_write_csv(
    path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """A CSV file (header, then rows) written atomically."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, out.getvalue())


def finite_json(value: Any) -> Any:
    """value with every non-finite float (NaN, +-Infinity) replaced by None, recursively through
    mappings, lists and tuples. Python's json writes those floats as bare NaN/Infinity tokens,
    which are not JSON: strict parsers (jq, JavaScript, Go) reject the whole file. null is what
    an undefined figure means in JSON, and what this project's readers already expect."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def atomic_write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """Write value as strict JSON (non-finite floats become null: finite_json), atomically.

    Every JSON file the project writes goes through here; allow_nan=False makes a non-finite
    float that got past finite_json (a NumPy scalar type, say) an error, never a bad file.
    """
    text = json.dumps(finite_json(value), indent=indent, allow_nan=False)
    atomic_write(path, text + "\n")


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """For a library that writes to a file name (ONNX export): a temporary name beside path,
    renamed over path when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save(obj, path) such that path holds either the old or the new file, never half."""
    import torch

    atomic_write_with(path, lambda f: torch.save(obj, f))


def check_writable(folder: str | Path, key: str) -> None:
    """Create `folder` if needed and make sure files can be written in it: one sentence naming
    the folder and the config key that sets it, before any work that would be lost."""
    from tb_lightning.core.errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{folder} cannot be written ({err.strerror or err}); make it writable, or choose "
            f"another folder with {key}=<folder>."
        ) from None


def remove_temp_files(folder: str | Path, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes (`.<name>.<random>.tmp`) in
    folder, those at least min_age_s old; only call it on folders no other process writes."""
    import time

    removed = []
    now = time.time()
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed.append(path)
    return removed
