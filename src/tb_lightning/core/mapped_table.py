"""A table of rows, one per image, written once and read through a memory map: the storage of the
feature cache (inference/features.py) and of the decoded-image cache (data/image_cache.py).

Why our own: the caches must stay flat in memory however many images there are (100k and
more), survive kills and concurrent sweep jobs, and notice damage. So:

- `<name>.npy` (NumPy's format: a header, then the rows) is filled batch by batch as the rows
  are computed (memory: one batch), in a temporary file renamed into place when complete;
- `<name>.json`, the sidecar, is written after it (atomically): the cache key, the image paths
  in row order, and a digest of sampled rows. A table is only read when its sidecar matches;
- readers map the file copy-on-write (`np.load(mmap_mode="c")`): rows are paged in as they are
  read, nothing is loaded whole, and splits index the one map instead of copying rows;
- one builder at a time (a lock file); the others wait, then read what it wrote;
- a truncated file, a bad header, a sidecar that does not match or sampled rows whose digest
  differs are rebuilt with a warning; temporary files of killed writes are removed.
Files are only ever replaced (rename), never changed in place, so the maps of running jobs keep
their rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from filelock import FileLock

from tb_lightning.core.atomic import TMP_SUFFIX, atomic_target, atomic_write

log = logging.getLogger(__name__)

# Rows read back and digested to tell a damaged table from a good one without reading it all.
SAMPLED_ROWS = 256
# A temporary file untouched for this long was left by a killed write, not one in progress: a
# build writes into it batch by batch, and every write renews its modification time.
STALE_TMP_SECONDS = 3600

# fill(write) computes every row and calls write(first row index, rows) batch by batch.
RowWriter = Callable[[int, np.ndarray], None]


class MappedTable:
    """`folder/<prefix>-<key[:24]>.npy` and its sidecar, for the rows of `paths` in that order.

    Args:
        folder: the cache folder (made when missing).
        prefix: the files' name prefix, e.g. `features`; also how temporary files are found.
        key: a hash of everything the rows depend on.
        paths: the images, one row each, in row order.
        dtype: the rows' NumPy dtype.
        what: how log lines name the rows, e.g. "backbone features".
    """

    def __init__(
        self,
        folder: str | Path,
        prefix: str,
        key: str,
        paths: list[str],
        dtype: np.dtype | type,
        what: str,
    ) -> None:
        self.folder = Path(folder).expanduser()
        self.prefix = prefix
        self.key = key
        self.paths = list(paths)
        self.dtype = np.dtype(dtype)
        self.what = what
        self.path = self.folder / f"{prefix}-{key[:24]}.npy"
        self.sidecar = self.path.with_suffix(".json")

    def load_or_build(self, fill: Callable[[RowWriter], None]) -> np.ndarray:
        """The table, mapped from its file; built with `fill` when there is no valid one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.remove_tmp_files(STALE_TMP_SECONDS)
        table = self.read()
        if table is None:
            # One builder at a time; the others wait here, then read what it wrote.
            with FileLock(str(self.path) + ".lock"):
                # Only the lock holder writes this file, so its temporary files are leftovers.
                self.remove_tmp_files(0, f".{self.path.name}.*{TMP_SUFFIX}")
                table = self.read()
                if table is None:
                    table = self.build(fill)
        return table

    def read(self) -> np.ndarray | None:
        """The mapped table when its files are whole and match; None (with a warning when a
        file is there but damaged) otherwise."""
        if not (self.path.is_file() and self.sidecar.is_file()):
            return None
        try:
            stored = json.loads(self.sidecar.read_text())
            # A truncated file or a damaged header fails here; nothing is read yet.
            table = np.load(self.path, mmap_mode="c")
            valid = (
                stored["key"] == self.key
                and stored["paths"] == self.paths
                and table.dtype == self.dtype
                and len(table) == len(self.paths)
                and stored["rows_digest"] == rows_digest(table)
            )
        except Exception as err:  # truncated file, bad header or JSON, missing key, ...
            log.warning("Cache %s is damaged (%s); rebuilding it.", self.path, err)
            return None
        if not valid:
            log.warning("Cache %s does not match its key; rebuilding it.", self.path)
            return None
        log.info("Loaded cached %s of %d images from %s", self.what, len(table), self.path)
        return table

    def build(self, fill: Callable[[RowWriter], None]) -> np.ndarray:
        """Fill a temporary .npy batch by batch, publish it, then its sidecar."""
        table: np.ndarray | None = None
        with atomic_target(self.path) as tmp:

            def write(start: int, rows: np.ndarray) -> None:
                nonlocal table
                if table is None:  # the row shape is known from the first batch
                    table = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=self.dtype, shape=(len(self.paths), *rows.shape[1:])
                    )
                table[start : start + len(rows)] = rows

            fill(write)
            if table is None:
                raise RuntimeError(f"no image to cache {self.what} of")
            table.flush()
            digest = rows_digest(table)
            del table
        sidecar = {"key": self.key, "paths": self.paths, "rows_digest": digest}
        atomic_write(self.sidecar, json.dumps(sidecar))
        log.info(
            "Cached %s of %d images (%.0f MB) in %s",
            self.what,
            len(self.paths),
            self.path.stat().st_size / 2**20,
            self.path,
        )
        table = self.read()
        if table is None:
            raise RuntimeError(f"the cache {self.path} just written cannot be read back")
        return table

    def remove_tmp_files(self, min_age_s: float, pattern: str | None = None) -> None:
        """Delete temporary files of interrupted writes (matching pattern, at least min_age_s
        old). Other jobs may be writing other cache files right now: their temporary files are
        young, so only those of this file (under its lock, min_age_s=0) or old ones go."""
        now = time.time()
        removed = 0
        for tmp in self.folder.glob(pattern or f".{self.prefix}-*{TMP_SUFFIX}"):
            try:
                if now - tmp.stat().st_mtime >= min_age_s:
                    tmp.unlink()
                    removed += 1
            except OSError:  # removed or renamed by another job first, or not ours to delete
                continue
        if removed:
            log.info(
                "Removed %d temporary file(s) of interrupted cache writes from %s",
                removed,
                self.folder,
            )


def files_digest(paths: list[str] | tuple[str, ...]) -> str:
    """sha256 of each file's path, size and modification time (content changes change these):
    the part of a cache key that says which files the rows come from."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def rows_digest(table: np.ndarray) -> str:
    """sha256 of up to SAMPLED_ROWS rows spread over the table (first and last included), which
    must also be finite: damage is found without reading every row of a large table."""
    if len(table) == 0:
        return hashlib.sha256(b"").hexdigest()
    picks = np.unique(np.linspace(0, len(table) - 1, min(SAMPLED_ROWS, len(table))).astype(int))
    sample = np.ascontiguousarray(table[picks])
    if sample.dtype.kind == "f" and not np.isfinite(sample).all():
        raise ValueError("sampled rows are not finite")
    return hashlib.sha256(sample.tobytes()).hexdigest()
