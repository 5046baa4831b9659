"""A table of rows, one per image, written once and read through a memory map: the storage of the
feature cache (data/feature_cache.py) and of the decoded-image cache (data/image_cache.py).

Why our own: the caches must stay flat in memory however many images there are (100k and
more), survive kills and concurrent sweep jobs, and notice damage. So:

- `<name>.npy` (NumPy's format: a header, then the rows) is filled batch by batch as the rows
  are computed (memory: one batch), in a temporary file renamed into place when complete;
- `<name>.json`, the sidecar, is written after it (atomically): the cache key, the image paths
  in row order, and a CRC32 of every block of BLOCK_ROWS rows, computed from each batch as it is
  written (no second pass). A table is only used when its sidecar matches and every block's
  rows still have their checksum: one streaming pass over the file at load (memory: one
  READ_CHUNK), about 1 GB/s, a few % of a head epoch (docs/benchmarks.md, "Scale");
- readers map the file copy-on-write (`np.load(mmap_mode="c")`): rows are paged in as they are
  read, nothing is loaded whole, and splits index the one map instead of copying rows;
- one builder at a time (a lock file); the others wait, then read what it wrote;
- a truncated file, a bad header, a sidecar that does not match, a block whose checksum differs
  (the warning names the file and the block) or a table written before block checksums existed
  is rebuilt with a warning, never used; temporary files of killed writes are removed.
Files are only ever replaced (rename), never changed in place, so the maps of running jobs keep
their rows.

Why the blocks are checked at load rather than as their rows are first read: shuffled epochs
start fresh DataLoader workers (data/sampling.py), and each would check again every block it
touches, every epoch (the workers' checks die with them); and damage found in the middle of an
epoch could only stop the run, not rebuild the cache before any row of it is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

from tb_lightning.core.atomic import TMP_SUFFIX, atomic_target, atomic_write_json

log = logging.getLogger(__name__)

# Rows per checksummed block. Every row is in exactly one block (the last one may be partial), so
# a damaged row always changes its block's CRC32; blocks of rows rather than bytes keep the list
# short whatever a row's size: 110 checksums for 112k images (ChestX-ray14), 16 at 16k.
BLOCK_ROWS = 1024
# Bytes read and checksummed at a time when verifying a file: all the memory a check holds (read
# into one buffer rather than through the map, so that the check adds no page to the process).
READ_CHUNK = 1 << 20
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
        block_rows: rows per checksummed block of a table this builds (BLOCK_ROWS when None);
            a table is checked with the block size its sidecar records.
    """

    def __init__(
        self,
        folder: str | Path,
        prefix: str,
        key: str,
        paths: list[str],
        dtype: np.dtype | type,
        what: str,
        block_rows: int | None = None,
    ) -> None:
        self.folder = Path(folder).expanduser()
        self.prefix = prefix
        self.key = key
        self.paths = list(paths)
        self.dtype = np.dtype(dtype)
        self.what = what
        self.block_rows = block_rows or BLOCK_ROWS
        self.path = self.folder / f"{prefix}-{key[:24]}.npy"
        self.sidecar = self.path.with_suffix(".json")
        # Seconds the last read() spent checking the blocks (0 when it checked none).
        self.verify_seconds = 0.0

    def load_or_build(self, fill: Callable[[RowWriter], None]) -> np.ndarray:
        """The table, mapped from its file; built with `fill` when there is no valid one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.remove_tmp_files(STALE_TMP_SECONDS)
        seen = self.files_identity()
        table = self.read()
        if table is None:
            # One builder at a time; the others wait here, then read what it wrote.
            with FileLock(str(self.path) + ".lock"):
                # Only the lock holder writes this file, so its temporary files are leftovers.
                self.remove_tmp_files(0, f".{self.path.name}.*{TMP_SUFFIX}")
                # Read again only when another job replaced the files while this one waited:
                # files that failed above would fail again (a second check, a second warning).
                if seen is None or self.files_identity() != seen:
                    table = self.read()
                if table is None:
                    table = self.build(fill)
        return table

    def files_identity(self) -> tuple[tuple[int, int, int], ...] | None:
        """(inode, size, mtime) of the table and its sidecar; None when either is missing.
        Files are only ever replaced by a rename, which gives a new inode."""
        try:
            return tuple(
                (stat.st_ino, stat.st_size, stat.st_mtime_ns)
                for stat in (self.path.stat(), self.sidecar.stat())
            )
        except OSError:
            return None

    def read(self, verify: bool = True) -> np.ndarray | None:
        """The mapped table when its files are whole and match, and (with `verify`) every
        block's rows have their checksum; None (with a warning when a file is there but damaged
        or unchecked) otherwise."""
        self.verify_seconds = 0.0
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
                and table.flags.c_contiguous
                and len(table) == len(self.paths)
            )
            checksums = stored.get("checksums")
            if valid and checksums is not None:
                if checksums["algorithm"] != "crc32":
                    raise ValueError(f"unknown checksum {checksums['algorithm']!r}")
                block_rows = int(checksums["block_rows"])
                expected = [int(crc) for crc in checksums["crc32"]]
                if block_rows < 1 or len(expected) != math.ceil(len(table) / block_rows):
                    raise ValueError(f"{len(expected)} block checksums for {len(table)} rows")
        except Exception as err:  # truncated file, bad header or JSON, missing key, ...
            log.warning("Cache %s is damaged (%s); rebuilding it.", self.path, err)
            return None
        if not valid:
            log.warning("Cache %s does not match its key; rebuilding it.", self.path)
            return None
        if checksums is None:
            # Written before block checksums existed (a digest of 256 sampled rows only): its
            # other rows cannot be told from damaged ones, so it is not trusted.
            log.warning(
                "Cache %s was written without block checksums (by an older version), so its rows "
                "cannot all be checked; rebuilding it once with them.",
                self.path,
            )
            return None
        if verify:
            started = time.perf_counter()
            try:
                damaged = damaged_blocks(self.path, table, block_rows, expected)
            except OSError as err:  # e.g. the file shrank after it was mapped
                log.warning("Cache %s is damaged (%s); rebuilding it.", self.path, err)
                return None
            self.verify_seconds = time.perf_counter() - started
            if damaged:
                named = [
                    f"block {block} (rows {block * block_rows}-"
                    f"{min((block + 1) * block_rows, len(table)) - 1})"
                    for block in damaged[:5]
                ]
                log.warning(
                    "Cache %s is damaged: %d of its %d blocks of %d rows no longer match their "
                    "checksum: %s%s; rebuilding it.",
                    self.path,
                    len(damaged),
                    len(expected),
                    block_rows,
                    ", ".join(named),
                    ", ..." if len(damaged) > len(named) else "",
                )
                return None
        log.info(
            "Loaded cached %s of %d images from %s%s",
            self.what,
            len(table),
            self.path,
            f" (every row checked: {len(expected)} block(s) in {self.verify_seconds:.2f} s)"
            if verify
            else "",
        )
        return table

    def build(self, fill: Callable[[RowWriter], None]) -> np.ndarray:
        """Fill a temporary .npy batch by batch, checksumming each block's rows as they are
        written, publish it, then its sidecar."""
        table: np.ndarray | None = None
        checksums = BlockChecksums(self.block_rows)
        in_order = True
        with atomic_target(self.path) as tmp:

            def write(start: int, rows: np.ndarray) -> None:
                nonlocal table, in_order
                # The bytes stored are the bytes checksummed: cast to the table's dtype first.
                rows = np.ascontiguousarray(rows, dtype=self.dtype)
                if table is None:  # the row shape is known from the first batch
                    table = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=self.dtype, shape=(len(self.paths), *rows.shape[1:])
                    )
                table[start : start + len(rows)] = rows
                if in_order and start == checksums.rows:
                    checksums.update(rows)
                else:
                    in_order = False

            fill(write)
            if table is None:
                raise RuntimeError(f"no image to cache {self.what} of")
            table.flush()
            if in_order and checksums.rows == len(table):
                crcs = checksums.finish()
            else:  # a fill that wrote out of order (none does today): one pass over the file
                crcs = list(file_block_crcs(tmp, table, self.block_rows))
            del table
        sidecar = {
            "key": self.key,
            "paths": self.paths,
            "checksums": {"algorithm": "crc32", "block_rows": self.block_rows, "crc32": crcs},
        }
        atomic_write_json(self.sidecar, sidecar, indent=None)
        log.info(
            "Cached %s of %d images (%.0f MB) in %s",
            self.what,
            len(self.paths),
            self.path.stat().st_size / 2**20,
            self.path,
        )
        # The checksums were just computed from these very bytes: no second pass over them.
        table = self.read(verify=False)
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


class BlockChecksums:
    """The CRC32 of each block of `block_rows` rows, fed the rows in order as they are written
    (memory: nothing but the running checksum)."""

    def __init__(self, block_rows: int) -> None:
        self.block_rows = block_rows
        self.rows = 0  # rows fed so far
        self.crcs: list[int] = []
        self._crc = 0

    def update(self, rows: np.ndarray) -> None:
        """Feed the next rows (C-contiguous, the table's dtype)."""
        data = rows.reshape(len(rows), -1).view(np.uint8)  # one row of bytes per row
        done = 0
        while done < len(rows):
            take = min(len(rows) - done, self.block_rows - self.rows % self.block_rows)
            self._crc = zlib.crc32(data[done : done + take], self._crc)
            done += take
            self.rows += take
            if self.rows % self.block_rows == 0:
                self.crcs.append(self._crc)
                self._crc = 0

    def finish(self) -> list[int]:
        """The checksums, the partial last block's included."""
        return self.crcs + ([self._crc] if self.rows % self.block_rows else [])


def file_block_crcs(path: str | Path, table: np.memmap, block_rows: int) -> Iterator[int]:
    """The CRC32 of each block of `block_rows` rows of the .npy file `path` that `table` maps,
    read from the file READ_CHUNK bytes at a time into one buffer (not through the map: the
    process keeps no page of the file)."""
    row_bytes = table.itemsize * math.prod(table.shape[1:])
    buffer = memoryview(bytearray(READ_CHUNK))
    with open(path, "rb", buffering=0) as file:
        file.seek(table.offset)
        for first in range(0, len(table), block_rows):
            left = min(block_rows, len(table) - first) * row_bytes
            crc = 0
            while left:
                got = file.readinto(buffer[: min(left, READ_CHUNK)])
                if not got:
                    raise OSError(f"the file ends in the block of rows from {first}")
                crc = zlib.crc32(buffer[:got], crc)
                left -= got
            yield crc


def damaged_blocks(
    path: str | Path, table: np.memmap, block_rows: int, expected: list[int]
) -> list[int]:
    """The indices of the blocks of `path` whose rows no longer have their checksum: one
    streaming pass over the file (memory: READ_CHUNK)."""
    pairs = zip(file_block_crcs(path, table, block_rows), expected, strict=True)
    return [block for block, (crc, want) in enumerate(pairs) if crc != want]


def files_digest(paths: list[str] | tuple[str, ...]) -> str:
    """sha256 of each file's path, size and modification time (content changes change these):
    the part of a cache key that says which files the rows come from."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
