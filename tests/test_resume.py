"""Resume and stops: a run directory belongs to one run; exact resume after SIGKILL with
DataLoader workers; SIGTERM/SIGINT exit non-zero with the resume sentence in every phase."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_train, phantom_overrides, train_in_process
from tb_lightning.config import PROJECT_ROOT
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.run_dirs import config_differences, plan_resume, run_dir_of
from tb_lightning.core.tasks import run_task
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.models.torch_file import load_checkpoint
from tb_lightning.train import train

TESTS_DIR = Path(__file__).resolve().parent
# Compared exactly: a CPU run repeats bit for bit, a resumed one too.
COMPARED = ("val/loss", "val/auroc", "val/acc", "val/sensitivity", "threshold")


def workers_overrides(phantom_root: Path, log_dir: Path) -> list[str]:
    """A trainable backbone with random augmentation in 2 DataLoader workers: every source of
    randomness that a resume must reproduce (shuffles, augmentations, dropout)."""
    return [
        *phantom_overrides(phantom_root),
        "model.net.freeze_features=false",
        "data/augment=cxr",
        "data.num_workers=2",
        "trainer.max_epochs=2",
        f"paths.log_dir={log_dir}",
    ]


def pause_overrides(flag: Path) -> list[str]:
    return [
        "+callbacks.pause._target_=helpers.pause.PauseAt",
        "+callbacks.pause.epoch=1",
        "+callbacks.pause.batch=1",
        f"+callbacks.pause.flag_file={flag}",
    ]


def start_run(overrides: list[str], own_group: bool = False) -> subprocess.Popen:
    """`python -m tb_lightning.train` in a subprocess; own_group: in a process group of its
    own (with its DataLoader workers), so that a test can signal the group as scancel does."""
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(TESTS_DIR)]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tb_lightning.train", *overrides],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=own_group,
    )


def wait_for(flag: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run never reached its pause point")
        time.sleep(0.2)


def fingerprint(run_dir: Path) -> dict[str, str]:
    """Every file of a run directory and its content hash."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def finished_run(phantom_root, tmp_path_factory) -> Path:
    """Run A: a finished 2-epoch run with workers and augmentation, in its runs folder."""
    log_dir = tmp_path_factory.mktemp("logs")
    run_dir = log_dir / "train" / "runs" / "A"
    train_in_process(workers_overrides(phantom_root, log_dir), run_dir)
    return run_dir


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_with_workers_equals_uninterrupted(
    finished_run, phantom_root, tmp_path
):
    log_dir, flag = tmp_path / "logs", tmp_path / "paused"
    run_dir = log_dir / "train" / "runs" / "killed"
    overrides = [*workers_overrides(phantom_root, log_dir), *pause_overrides(flag)]
    process = start_run([*overrides, f"hydra.run.dir={run_dir}"])
    wait_for(flag, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["epoch"] == 0  # epoch 1 was killed half-way
    assert not (run_dir / "metrics.json").exists()
    before = fingerprint(run_dir)

    # The same overrides (no hydra.run.dir) and ckpt_path=last: the run continues in its own
    # directory, with its own split, and leaves its .hydra/ as it was.
    resume = start_run([*overrides, "ckpt_path=last"])
    output, _ = resume.communicate(timeout=600)
    assert resume.returncode == 0, output[-3000:]
    assert f"Run directory: {run_dir}" in output and f"Resuming from {last}" in output
    assert "Restored the random number generators" in output
    after = fingerprint(run_dir)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "split.csv", "data_report.json"):
        assert after[name] == before[name], name
    assert list(run_dir.glob(".hydra/invocation-*/overrides.yaml"))
    resumed = json.loads((run_dir / "metrics.json").read_text())
    reference = json.loads((finished_run / "metrics.json").read_text())
    for key in COMPARED:
        assert resumed[key] == reference[key], key
    # Stronger than the metrics: the final weights are bit for bit the uninterrupted run's.
    a = load_checkpoint(last)["state_dict"]
    b = load_checkpoint(finished_run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_stops_like_sigterm_to_the_run(
    phantom_root, tmp_path
):
    """SLURM's scancel (or `kill -- -PGID`) signals the DataLoader workers too: torch's handler
    used to end them at once, and the run then died with a traceback ("DataLoader worker ... is
    killed by signal"), at times mid-way through writing a checkpoint."""
    log_dir, flag = tmp_path / "logs", tmp_path / "paused"
    run_dir = log_dir / "train" / "runs" / "scancelled"
    overrides = [*workers_overrides(phantom_root, log_dir), *pause_overrides(flag)]
    process = start_run([*overrides, f"hydra.run.dir={run_dir}"], own_group=True)
    wait_for(flag, process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert process.returncode == 143, output[-3000:]
    assert "Stopped by SIGTERM during training." in output
    assert f"Kept: {last} (the end of the last finished epoch)" in output
    assert "Traceback" not in output and "DataLoader worker" not in output, output[-3000:]
    assert load_checkpoint(last)["epoch"] == 0


def test_sigterm_in_training_exits_143_with_the_resume_command(phantom_root, tmp_path, caplog):
    """Lightning stops after the batch, flushes TensorBoard, and used to exit 0."""
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            *phantom_overrides(phantom_root),
            "trainer.max_epochs=2",
            "+callbacks.signal._target_=helpers.pause.SignalAt",
            "+callbacks.signal.epoch=1",
            "+callbacks.signal.batch=1",
            f"+callbacks.signal.signum={int(signal.SIGTERM)}",
        ],
        output_dir=run_dir,
    )
    with pytest.raises(SystemExit) as stop:
        run_task(train, cfg)
    assert stop.value.code == 143
    last = run_dir / "checkpoints" / "last.ckpt"
    assert "Stopped by SIGTERM during training." in caplog.text
    assert f"Kept: {last} (the end of the last finished epoch)" in caplog.text
    assert "Resume with: python -m tb_lightning.train " in caplog.text
    assert f"ckpt_path={last}" in caplog.text
    assert load_checkpoint(last)["epoch"] == 0
    assert not (run_dir / "metrics.json").exists()
    # TensorBoard was flushed: epoch 0's validation point is on disk.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (run_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    assert len(events.Scalars("val/loss")) == 1


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_before_training_exits_non_zero_naming_the_phase(
    phantom_root, tmp_path, monkeypatch, signum, code
):
    """During the data scan (or extraction) Lightning is not running: SIGTERM used to kill the
    process without a word, SIGINT to print a traceback."""

    def interrupted_setup(self, stage=None):
        os.kill(os.getpid(), signum)
        time.sleep(0.2)  # the signal arrives before this ends; it is acted upon after it

    monkeypatch.setattr(TBDataModule, "setup", interrupted_setup)
    cfg = compose_train(phantom_overrides(phantom_root), output_dir=tmp_path)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(SystemExit) as stop:
        run_task(train, cfg)
    assert stop.value.code == code
    # The handlers of the process are put back.
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_stop_message_names_phase_and_command(tmp_path):
    from tb_lightning.core.errors import Stopped
    from tb_lightning.engine.training import stop_message

    message = stop_message(Stopped(signal.SIGTERM, "the data scan"), None, tmp_path)
    assert message.startswith("Stopped by SIGTERM during the data scan. No epoch had finished")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    message = stop_message(Stopped(signal.SIGINT, "training"), None, tmp_path)
    assert "Kept: " in message and f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}" in message


def test_ckpt_path_last_never_resumes_another_experiments_run(finished_run, phantom_root, tmp_path):
    """Case 1 of the issue: run C (another lr) with ckpt_path=last used to resume, and
    overwrite, run A."""
    log_dir = finished_run.parent.parent.parent
    before = fingerprint(finished_run)
    cfg = compose_train(
        [*workers_overrides(phantom_root, log_dir), "model.optimizer.lr=3e-4", "ckpt_path=last"],
        output_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith("ckpt_path=last found no run under")
    assert "differs in model.optimizer.lr (0.0001 there, 0.0003 here)" in str(err.value)
    assert fingerprint(finished_run) == before


@pytest.mark.parametrize(
    "override, key",
    [("model.net.arch=resnet18", "model.net.arch"), ("seed=7", "seed")],
)
def test_a_resume_with_another_config_touches_nothing_of_the_run(
    finished_run, phantom_root, tmp_path, override, key
):
    """Case 2: a resume with another arch (or only another seed) rewrote split.csv,
    data_report.json and .hydra/ of the old run, then failed (or went on silently). The CLI's
    run directory (resolvers: test_plan_resume_and_config_differences) is then a new one."""
    log_dir = finished_run.parent.parent.parent
    before = fingerprint(finished_run)
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [*workers_overrides(phantom_root, log_dir), override, f"ckpt_path={ckpt}"],
        output_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(
        f"ckpt_path={ckpt} belongs to the run {finished_run}, whose config differs from this one "
        f"in {key}"
    )
    assert f"init_from={ckpt}" in str(err.value)
    assert fingerprint(finished_run) == before
    assert not list(tmp_path.iterdir())  # nothing written for the refused run either


def test_init_from_starts_a_new_run_from_the_weights(finished_run, phantom_root, tmp_path, caplog):
    caplog.set_level("INFO")
    ckpt = finished_run / "checkpoints" / "best.ckpt"
    before = fingerprint(finished_run)
    metrics = train_in_process(
        [
            *workers_overrides(phantom_root, tmp_path),
            "trainer.max_epochs=1",
            "data.num_workers=0",  # no worker processes to start: a new run, not a resume
            "model.optimizer.lr=3e-4",
            f"init_from={ckpt}",
        ],
        tmp_path / "new",
    )
    assert f"Initialised the network from {ckpt}" in caplog.text
    # Relative to the new run's directory, as every path in its files.
    assert (tmp_path / "new" / metrics["init_from"]).resolve() == ckpt.resolve()
    assert fingerprint(finished_run) == before


def test_a_new_run_refuses_a_folder_that_holds_a_run(finished_run, phantom_root):
    before = fingerprint(finished_run)
    cfg = compose_train(phantom_overrides(phantom_root), output_dir=finished_run)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value).startswith(
        f"hydra.run.dir={finished_run} already holds a run (metrics.json"
    )
    assert fingerprint(finished_run) == before


def test_a_resume_goes_to_its_run_directory_only_with_the_same_config(finished_run):
    """The resolver behind hydra.run.dir: the checkpoint's run when the configs match (and then
    this invocation's .hydra record beside the run's own), a new directory otherwise."""
    from tb_lightning.core.run_dirs import invocation_subdir, resume_run_dir

    ckpt = str(finished_run / "checkpoints" / "last.ckpt")
    runs = str(finished_run.parent)
    saved = OmegaConf.load(finished_run / ".hydra" / "config.yaml")
    same = OmegaConf.merge(saved, {"ckpt_path": ckpt, "hydra": {"run": {"dir": "x"}}})
    other = OmegaConf.merge(same, {"seed": 7})
    assert resume_run_dir("train", ckpt, runs, "/new", _root_=same) == str(finished_run)
    assert resume_run_dir("train", ckpt, runs, "/new", _root_=other) == "/new"
    assert resume_run_dir("eval", ckpt, runs, "/new", _root_=same) == "/new"
    assert invocation_subdir(str(finished_run), "T") == ".hydra/invocation-T"
    assert invocation_subdir("/a/new/run", "T") == ".hydra"


def test_plan_resume_and_config_differences(tmp_path):
    def make_run(name: str, lr: float, mtime: int) -> Path:
        run = tmp_path / "runs" / name
        (run / ".hydra").mkdir(parents=True)
        OmegaConf.save(
            OmegaConf.create({"seed": 1, "model": {"lr": lr}, "ckpt_path": None}),
            run / ".hydra" / "config.yaml",
        )
        ckpt = run / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir()
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))
        return run

    old, new = make_run("old", 0.1, 1000), make_run("new", 0.2, 2000)
    current = {"seed": 1, "model": {"lr": 0.1}, "ckpt_path": "last", "hydra": {"x": 1}}
    plan = plan_resume("last", tmp_path / "runs", current)
    assert plan.run_dir == old.resolve() and plan.continues_run  # the newest *matching* run
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}}) == [
        ("a.b", 1, 2),
        ("a.c", None, 3),
    ]
    plan = plan_resume(new / "checkpoints" / "last.ckpt", tmp_path / "runs", current)
    assert plan.differences == [("model.lr", 0.2, 0.1)] and not plan.continues_run
    assert run_dir_of(new / "checkpoints" / "last.ckpt") == new
    with pytest.raises(ConfigError, match=r"^ckpt_path=last found no run under .* \(the closest"):
        plan_resume("last", tmp_path / "runs", {**current, "seed": 2})
    with pytest.raises(ConfigError, match=r"^ckpt_path=/no/such.ckpt does not exist"):
        plan_resume("/no/such.ckpt", tmp_path / "runs", current)
