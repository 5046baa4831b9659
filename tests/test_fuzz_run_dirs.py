"""Fuzz suite, run folders (issue 24): each attack on "a run directory belongs to one run"
replayed. Two runs started in the same second, two resumes of one run, the lock a killed
process left, a stop by signal, a read-only parent (new folders too), a run of an older version,
and a resume refused for a real difference whose suggested command is then run as printed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import TESTS_DIR, compose_train, phantom_overrides, run_cli
from tb_lightning.config import CONF_DIR, PROJECT_ROOT, compose_train_config
from tb_lightning.core import run_lock
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.run_dirs import (
    SAVED_CONFIG,
    SAVED_OVERRIDES,
    claim_new_dir,
    override_value,
    plan_resume,
)
from tb_lightning.core.run_lock import LOCK_NAME, RunDirInUse, RunLock
from tb_lightning.train import train

# Attacks on what the project writes: with the slow tests (make test-slow, CI), not in make test.
pytestmark = pytest.mark.slow

# Keys a version before calibration and CLAHE did not write into a run's config.
ADDED_SINCE = ("calibration", "data.preprocess", "data.clahe")
STAMP = "2026-12-02_12-12-54"


def cli_env() -> dict[str, str]:
    """The environment of conftest.run_cli (this checkout's code, tests/helpers importable)."""
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(TESTS_DIR)]),
    }


def start(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python <args>` in the background, as a user starts it; stdout and stderr together."""
    return subprocess.Popen(
        [*prefix, sys.executable, *args],
        cwd=PROJECT_ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"it ended early:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.1)


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def strip_added_keys(run: Path) -> None:
    """Make `run`'s saved config the one a version before `calibration` and `data.preprocess`
    wrote: those keys (and the CLAHE ones that came with them) absent."""
    saved = OmegaConf.load(run / SAVED_CONFIG)
    for key in ADDED_SINCE:
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(saved, parent) if parent else saved
        del node[name]
    OmegaConf.save(saved, run / SAVED_CONFIG)


def copy_run(run: Path, logs: Path, name: str = "run") -> Path:
    """A copy of `run` in logs/train/runs/<name> (what paths.log_dir=<logs> resumes from)."""
    target = logs / "train" / "runs" / name
    shutil.copytree(run, target)
    return target


HOLDER = """
import os, sys, time
from tb_lightning.core.run_lock import RunLock
from tb_lightning.core.signals import exit_on_stop, raise_if_stopped
with exit_on_stop():
    RunLock(sys.argv[1]).acquire()
    # A forked child that outlives its parent, as a DataLoader worker may after a SIGKILL.
    child, (ready, started) = 1, os.pipe()
    if len(sys.argv) > 2:
        child = os.fork()
        if child == 0:  # fork's own hooks have run: the child is at work
            os.write(started, b"x")
            time.sleep(120)
            os._exit(0)
        os.read(ready, 1)
    print("held", child, flush=True)
    while True:  # a run at work: it acts on a signal at its next safe point
        time.sleep(0.05)
        raise_if_stopped()
"""


def hold_lock(folder: Path, fork: bool = False) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a run does (signals handled as in a run);
    with `fork`, a child of it lives on (its PID in `.child`)."""
    holder = start("-c", HOLDER, str(folder), *(["fork"] if fork else []))
    word, child = holder.stdout.readline().split()
    assert word == "held"
    holder.child = int(child)
    return holder


@pytest.fixture
def base_run(trained_run) -> tuple[Path, list[str]]:
    """The session's finished run (made by the CLI: its .hydra/overrides.yaml is the
    command's) and the overrides it was started with. Tests work on copies of it."""
    return trained_run, [str(o) for o in OmegaConf.load(trained_run / SAVED_OVERRIDES)]


# --- Two runs started in the same second --------------------------------------------------


def test_runs_started_in_the_same_second_claim_a_folder_each(tmp_path):
    """The resolver behind the default hydra.run.dir (and hydra.sweep.dir), in 4 processes at
    once asking for the same timestamped name: 4 folders, never one shared."""
    candidate = tmp_path / "runs" / STAMP
    code = "import sys; from tb_lightning.core.run_dirs import claim_new_dir; "
    code += "print(claim_new_dir(sys.argv[1]))"
    claims = [start("-c", code, str(candidate)) for _ in range(4)]
    got = sorted(finish(p)[1].strip() for p in claims)
    assert got == sorted([str(candidate), *(f"{candidate}-{n}" for n in (2, 3, 4))])
    # Hydra resolves hydra.run.dir several times in one process: always the folder it claimed.
    other = str(tmp_path / "runs" / "other")
    assert claim_new_dir(other) == other and claim_new_dir(other) == other
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(
        [STAMP, f"{STAMP}-2", f"{STAMP}-3", f"{STAMP}-4", "other"]
    )


def frozen_run_dir() -> str:
    """conf/hydra/default.yaml's hydra.run.dir with the clock stopped at STAMP: two runs given
    it ask for the same folder, as two runs started in the same second do."""
    hydra = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "hydra" / "default.yaml"))
    default = hydra["run"]["dir"]
    assert "${now:%Y-%m-%d_%H-%M-%S}" in default
    return f"hydra.run.dir='{default.replace('${now:%Y-%m-%d_%H-%M-%S}', STAMP)}'"


def test_two_trainings_started_together_each_get_their_own_folder(phantom_root, tmp_path):
    """Both used to print the same `Run directory:` and write their checkpoints and
    metrics.json into one folder whose .hydra/config.yaml was the first one's."""
    logs = tmp_path / "logs"
    common = [*phantom_overrides(phantom_root), "trainer.max_epochs=1", f"paths.log_dir={logs}"]
    runs = {
        seed: start("-m", "tb_lightning.train", *common, f"seed={seed}", frozen_run_dir())
        for seed in (1, 2)
    }
    folders = {}
    for seed, process in runs.items():
        code, output = finish(process)
        assert code == 0, output[-3000:]
        (folder,) = re.findall(r"Run directory: (\S+)", output)
        folders[seed] = Path(folder)
    runs_dir = logs / "train" / "runs"
    assert sorted(folders.values()) == [runs_dir / STAMP, runs_dir / f"{STAMP}-2"]
    for seed, folder in folders.items():
        assert OmegaConf.load(folder / SAVED_CONFIG).seed == seed  # its own run's config
        assert f"seed={seed}" in OmegaConf.load(folder / SAVED_OVERRIDES)
        assert json.loads((folder / "metrics.json").read_text())  # its own results, complete
        assert (folder / "metrics.json").is_file() and (folder / "checkpoints/last.ckpt").is_file()
        assert not (folder / LOCK_NAME).exists()  # released at the end of the run


# --- The lock: a second process refused, a killed one's lock taken over, signals release it --


def test_a_held_lock_refuses_a_second_process_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(RunDirInUse) as err:
            RunLock(tmp_path).acquire("wait until it ends")
        assert str(err.value).startswith(
            f"{tmp_path} is in use by another process (PID {holder.pid} on "
            f"{socket.gethostname()}, started "
        )
        assert f"its lock is {tmp_path / LOCK_NAME}); wait until it ends." in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    """SIGKILL at any moment leaves the lock file, never a lock that blocks forever; not even
    while a child the killed process forked (a DataLoader worker) still runs."""
    holder = hold_lock(tmp_path, fork=True)
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
        os.kill(holder.child, 0)  # the child still runs
        lock = RunLock(tmp_path).acquire()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.child, signal.SIGKILL)
    assert lock.taken_over["pid"] == holder.pid
    assert f"Took over the lock of {tmp_path} (PID {holder.pid} on" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_run_stopped_by_a_signal_releases_its_lock(tmp_path, signum, code):
    holder = hold_lock(tmp_path)
    holder.send_signal(signum)
    assert holder.wait(timeout=60) == code
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()


def test_without_kernel_locks_the_holders_pid_decides(tmp_path, monkeypatch):
    """A file system without flock (some NFS mounts): a holder on this host whose PID is gone
    is stale; a live one refuses."""

    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    alive = start("-c", "import time; time.sleep(120)")
    try:
        record = {"host": socket.gethostname(), "pid": alive.pid, "started": "x", "command": "y"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(RunDirInUse, match=rf"\(PID {alive.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        alive.kill()
        alive.wait()
    lock = RunLock(tmp_path).acquire()  # the PID is gone now
    assert lock.taken_over["pid"] == alive.pid
    lock.release()


def test_two_resumes_of_one_run_the_second_is_refused_naming_the_holder(base_run, tmp_path):
    """Two `ckpt_path=last` resumes of one run both trained into it."""
    base, overrides = base_run
    logs = tmp_path / "logs"
    run = copy_run(base, logs)
    resume = [*overrides, f"paths.log_dir={logs}", "ckpt_path=last"]
    held, release = tmp_path / "held", tmp_path / "release"
    first = start(
        "-m",
        "tb_lightning.train",
        *resume,
        # Holds the first resume at the start of its job (its lock taken) until released.
        "+hydra.callbacks.hold._target_=helpers.hold.HoldAtJobStart",
        f"+hydra.callbacks.hold.held_file={held}",
        f"+hydra.callbacks.hold.release_file={release}",
    )
    try:
        wait_for(held, first)
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid
        before = fingerprint(run)
        second = run_cli("tb_lightning.train", *resume)
        output = second.stdout + second.stderr
        assert second.returncode == 1, output[-3000:]
        assert f"{run} is in use by another process (PID {first.pid} on {socket.gethostname()}" in (
            output
        )
        assert "python -m tb_lightning.train" in output  # the holder's command
        assert "wait until it ends, or stop it, before resuming this run." in output
        assert "Traceback" not in output and output.count("in use by another process") == 1
        assert fingerprint(run) == before  # nothing of the first resume's run touched
    finally:
        release.touch()
    code, output = finish(first)
    assert code == 0, output[-3000:]
    assert f"Run directory: {run}" in output and "Resuming from" in output
    assert not (run / LOCK_NAME).exists()


# --- A folder that cannot be created --------------------------------------------------------


def unprivileged() -> tuple[str, ...]:
    """A prefix that runs the command without root's right to write anywhere: root ignores a
    folder's permissions, a user namespace without mappings does not."""
    if os.geteuid() != 0:
        return ()
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-U", "true"], capture_output=True).returncode == 0:
        return (unshare, "-U")
    pytest.skip("running as root without user namespaces: no folder is read-only to root")


# (task, overrides, the folder named in the sentence: None when it is the read-only one itself)
READ_ONLY_CASES = [
    ("train", ["hydra.run.dir={ro}/x/run"], "{ro}/x/run"),
    ("train", ["paths.log_dir={ro}/logs"], "{ro}/logs/train/runs/"),
    ("train", ["hydra.run.dir={ro}"], None),
    ("train", ["-m", "paths.log_dir={ro}", "seed=1,2"], "{ro}/train/multiruns/"),
    # The checkpoint exists (checked before the folder), and is never read: the folder is refused.
    ("eval", ["ckpt_path={ckpt}", "paths.log_dir={ro}"], "{ro}/eval/runs/"),
]


@pytest.mark.parametrize("task, overrides, folder", READ_ONLY_CASES)
def test_a_read_only_parent_is_one_sentence_before_any_work(
    phantom_root, tmp_path, task, overrides, folder
):
    """Used to end in Hydra's PermissionError traceback."""
    prefix = unprivileged()
    key = "hydra.run.dir" if overrides[0].startswith("hydra.run.dir") else "paths.log_dir"
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    ckpt = tmp_path / "unread.ckpt"
    ckpt.write_bytes(b"not read")
    try:
        args = [o.format(ro=ro, ckpt=ckpt) for o in overrides]
        flags = [a for a in args if a.startswith("-")]  # Hydra's -m comes before the overrides
        data = phantom_overrides(phantom_root) if task == "train" else []
        command = [
            "-m",
            f"tb_lightning.{task}",
            *flags,
            *data,
            *(a for a in args if a not in flags),
        ]
        code, output = finish(start(*command, prefix=prefix))
        assert list(ro.iterdir()) == []  # nothing created
    finally:
        ro.chmod(0o755)
    assert code == 1, output[-3000:]
    assert "Traceback" not in output and "Error" not in output, output[-3000:]
    if folder is None:
        sentence = f"{ro} cannot be written (Permission denied); make it writable, or "
    else:
        sentence = f"{folder.format(ro=ro)}"
        assert f" cannot be created: {ro} cannot be written in (Permission denied); make {ro} " in (
            output
        )
    assert sentence in output
    assert f"choose another folder with {key}=<folder>." in output
    assert len(output.strip().splitlines()) == 1  # one sentence, nothing else


# --- A run of an older version --------------------------------------------------------------


def fake_run(runs: Path, overrides: list[str]) -> Path:
    """A run folder as Hydra leaves it (config, overrides, a last.ckpt), without training."""
    run = runs / "old"
    for folder in ("checkpoints", ".hydra"):
        (run / folder).mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    OmegaConf.save(compose_train(overrides), run / SAVED_CONFIG)
    OmegaConf.save(OmegaConf.create(overrides), run / SAVED_OVERRIDES)
    return run


def test_keys_added_since_an_older_run_differ_only_when_set(tmp_path):
    overrides = ["data=phantom", "seed=3", "model.optimizer.lr=0.001"]
    run = fake_run(tmp_path / "runs", overrides)
    strip_added_keys(run)
    ckpt, runs = run / "checkpoints" / "last.ckpt", tmp_path / "runs"
    current = compose_train(overrides)
    # Without the defaults every added key differed ("None there, 'none' here").
    assert "calibration" in [k for k, _, _ in plan_resume(ckpt, runs, current).differences]
    plan = plan_resume(ckpt, runs, current, compose_train_config)
    assert plan.continues_run and plan.differences == []
    assert plan_resume("last", runs, current, compose_train_config).run_dir == run.resolve()
    # Set to another value than its default, an added key is a difference.
    changed = compose_train([*overrides, "calibration=temperature"])
    plan = plan_resume(ckpt, runs, changed, compose_train_config)
    assert plan.differences == [("calibration", None, "temperature")]


@pytest.mark.parametrize(
    "value",
    [None, True, False, 3, 0.0001, 1e-05, "none", "true", "null", "3", "a b", "it's", "${seed}",
     "/x/y-z_1.ckpt", "a,b", [1, 2], ["a", "b c"]],
)  # fmt: skip
def test_a_suggested_override_reads_back_as_the_value(value):
    parsed = OverridesParser.create().parse_override(f"key={override_value(value)}")
    assert parsed.value() == value


def test_an_older_run_resumes_taking_over_the_lock_of_its_killed_process(base_run, tmp_path):
    """An older version's run (no calibration, no data.preprocess in its config) could not be
    resumed at all; here its killed process also left its lock behind."""
    base, overrides = base_run
    run = copy_run(base, tmp_path / "logs")
    strip_added_keys(run)
    killed = hold_lock(run)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    ckpt = run / "checkpoints" / "last.ckpt"
    result = run_cli("tb_lightning.train", *overrides, f"ckpt_path={ckpt}", warm=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Run directory: {run}" in output and f"Resuming from {ckpt}" in output
    assert f"Took over the lock of {run} (PID {killed.pid} on" in output
    assert not (run / LOCK_NAME).exists()


def test_a_real_difference_is_refused_and_the_suggested_command_resumes(base_run, tmp_path):
    """The refusal used to point at the run's overrides, which cannot resume an older run."""
    base, overrides = base_run
    run = copy_run(base, tmp_path / "logs")
    strip_added_keys(run)
    before = fingerprint(run)
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [*overrides, "model.optimizer.lr=0.003", f"ckpt_path={ckpt}"], output_dir=tmp_path / "new"
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(
        f"ckpt_path={ckpt} belongs to the run {run}, whose config differs from this one in "
        "model.optimizer.lr (0.0001 there, 0.003 here); start a new run from its weights with "
        f"init_from={ckpt}, or resume it with its own config: python -m tb_lightning.train "
    )
    assert fingerprint(run) == before
    command = shlex.split(message.split("resume it with its own config: ", 1)[1])
    assert command[:3] == ["python", "-m", "tb_lightning.train"]
    result = run_cli("tb_lightning.train", *command[3:])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Run directory: {run}" in output and f"Resuming from {ckpt}" in output
