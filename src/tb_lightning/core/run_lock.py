"""A run folder belongs to one process: its lock, held for the whole run.

Every run, multirun and multirun job folder holds `.run.lock` while its process works in it:
one line of JSON naming the holder (host, PID, start time, command). The exclusion itself is a
kernel lock on that file (`flock`), which the kernel drops when the process ends however it
ends, SIGKILL and power loss of a client included (NFS leases expire); so a lock file left by a
killed process is recognised as stale and taken over (named in the log), never a lock that
blocks a user forever. Where the file system has no such locks, the holder's PID decides: a
holder on this host whose PID is gone is stale.

`RunDirGuard` (a Hydra callback, conf/hydra/default.yaml) takes the lock before Hydra creates
the folder's `.hydra/` and log file: a second process in the same folder (two trainings with
the same `hydra.run.dir`, two resumes of one run) is refused with one sentence naming the
holder, exit code 1, and nothing of the first run touched. It also refuses, the same way, a
folder that cannot be created or written (a read-only parent), naming the key to change.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tb_lightning.core.errors import ConfigError
from tb_lightning.core.run_dirs import SAVED_CONFIG, launched_rank

try:
    import fcntl
except ImportError:  # Windows: the PID check alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
# Errors of flock on a file system without kernel locks (some NFS mounts, FUSE).
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunDirInUse(ConfigError):
    """Another live process holds the folder's lock."""


# The descriptors of the locks this process holds. A flock belongs to the open file, which a
# fork shares: a forked child (a DataLoader worker) would keep the lock held after its parent
# was killed. The child closes its copies at once, so the lock lives exactly as long as the
# process that took it.
_HELD_FDS: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def holder_record() -> dict[str, Any]:
    """This process, as a lock file names it."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    command = " ".join(shlex.quote(a) for a in [*program, *sys.argv[1:]])
    if len(command) > 200:  # a long command line: its start is enough to recognise it
        command = command[:197] + "..."
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
    }


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has not written its name yet"
    return (
        f"PID {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
        f"{holder.get('command')}"
    )


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def holder_alive(holder: dict[str, Any] | None) -> bool:
    """Whether the process a lock file names may still run (the check without kernel locks).
    A holder on another host cannot be checked from here, so it counts as alive."""
    if not holder or holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


class RunLock:
    """The lock of one folder; `acquire` refuses with RunDirInUse while another process holds
    it, and takes over a stale one (its holder is gone)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self.taken_over: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, refusal: str = "") -> RunLock:
        """Hold the lock; `refusal` ends the sentence that names the holder (the fix)."""
        if self.held:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd, refusal):
                    os.close(fd)
                    continue  # the file was replaced meanwhile: lock the new one
            except BaseException:
                os.close(fd)
                raise
            break
        self._fd = fd
        _HELD_FDS.add(fd)
        previous = read_holder(self.path)
        me = (socket.gethostname(), os.getpid())
        if previous and (previous.get("host"), previous.get("pid")) != me:
            # Nobody holds the kernel lock, yet a holder is named: a process that was killed.
            self.taken_over = previous
            log.warning(
                "Took over the lock of %s (%s), which is no longer running.",
                self.folder,
                describe_holder(previous),
            )
        payload = (json.dumps(holder_record()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
        atexit.register(self.release)
        return self

    def _lock(self, fd: int, refusal: str) -> bool:
        """Lock the open file; False when it is no longer the file at self.path."""
        kernel_lock = fcntl is not None
        if kernel_lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._refuse(read_holder(self.path), refusal)
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    raise
                kernel_lock = False
        if not kernel_lock:
            holder = read_holder(self.path)
            if holder and holder.get("pid") != os.getpid() and holder_alive(holder):
                self._refuse(holder, refusal)
        # A holder that released (removed the file) between our open and our lock: the file
        # we locked is no longer the lock file.
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _refuse(self, holder: dict[str, Any] | None, refusal: str) -> None:
        gone = "" if holder_alive(holder) else ", gone, but a process it started still holds it"
        raise RunDirInUse(
            f"{self.folder} is in use by another process ({describe_holder(holder)}{gone}; its "
            f"lock is {self.path}){'; ' + refusal if refusal else ''}."
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent; also run at exit)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD_FDS.discard(fd)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(fd)  # closing drops the kernel lock
        atexit.unregister(self.release)


def prepare_folder(folder: Path, key: str) -> None:
    """Create `folder` if needed and make sure files can be written in it, before Hydra or the
    run writes anything: one sentence naming the folder that blocks and the key to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        blocker = nearest_existing(folder)
        if blocker is not None and blocker != folder:
            problem, target = f"{folder} cannot be created: {blocker} cannot be written in", blocker
        else:
            problem, target = f"{folder} cannot be written", "it"
        if (folder / SAVED_CONFIG).is_file():  # a run being resumed continues in its own folder
            fix = f"make {target} writable (a resume continues in its run's own folder)"
        else:
            fix = f"make {target} writable, or choose another folder with {key}=<folder>"
        raise ConfigError(f"{problem} ({reason}); {fix}.") from None


def nearest_existing(folder: Path) -> Path | None:
    """The folder itself or its nearest ancestor that exists."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return None


def chosen_by_default(config: DictConfig, key: str) -> bool:
    """True when `hydra.<key>` is this project's default (conf/hydra/default.yaml), i.e. a
    folder under paths.log_dir; False when the user (or a preset) set it."""
    node = OmegaConf.to_container(OmegaConf.select(config, key.rsplit(".", 1)[0]), resolve=False)
    value = node.get(key.rsplit(".", 1)[1]) if isinstance(node, dict) else None
    return isinstance(value, str) and value.startswith(("${tb_run_dir:", "${tb_new_dir:"))


class RunDirGuard(Callback):
    """Hydra callback: before Hydra creates a run's (or multirun's) folder and writes into it,
    make sure it can be created and written, and take its lock for the whole run; each job
    of a multirun also locks its own folder while it runs (jobs may run in other processes,
    e.g. on SLURM). Refusals are one sentence and exit code 1."""

    def __init__(self) -> None:
        self.locks: dict[str, RunLock] = {}

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(config, "hydra.run.dir", "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._guard(config, "hydra.sweep.dir", "multirun")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release("run")

    # Hydra calls the end hooks in reverse order, so the sweep summary (sweep/callback.py)
    # still writes into the multirun's and the job's folders after this callback's end hooks:
    # a multirun's lock goes when its process ends, a job's when the next job starts (or at the
    # end of the process: a job on SLURM has its own).

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or launched_rank() != 0:
            return
        self._release("job")
        folder = Path(config.hydra.runtime.output_dir)
        self._take(folder, "job", "wait until it ends, or start this multirun in another folder")

    def _guard(self, config: DictConfig, key: str, role: str) -> None:
        # Another process of the same run (a DDP rank that Lightning or SLURM started) works in
        # the folder of rank 0, which holds the lock.
        if launched_rank() != 0:
            return
        try:
            folder = Path(str(OmegaConf.select(config, key, throw_on_missing=True)))
        except Exception:  # noqa: BLE001 - a broken interpolation: Hydra reports it next
            return
        setting = key if not chosen_by_default(config, key) else "paths.log_dir"
        try:
            prepare_folder(folder, setting)
        except ConfigError as err:
            self._stop(err)
        if (folder / SAVED_CONFIG).is_file() and role == "run":
            fix = "wait until it ends, or stop it, before resuming this run"
        else:
            fix = f"wait until it ends, or choose another folder with {setting}=<folder>"
        self._take(folder, role, fix)

    def _take(self, folder: Path, role: str, fix: str) -> None:
        lock = RunLock(folder)
        try:
            lock.acquire(fix)
        except ConfigError as err:
            self._stop(err)
        except OSError as err:  # Hydra would turn it into a warning and run without the lock
            self._stop(
                ConfigError(
                    f"{lock.path} cannot be written ({err.strerror or err}); make {folder} "
                    "writable."
                )
            )
        self.locks[role] = lock

    def _release(self, role: str) -> None:
        lock = self.locks.pop(role, None)
        if lock is not None:
            lock.release()

    @staticmethod
    def _stop(err: ConfigError) -> None:
        log.error("%s", err)
        # SystemExit, not an exception: Hydra turns a callback's exceptions into warnings.
        raise SystemExit(1) from None
