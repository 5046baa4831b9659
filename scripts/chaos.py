"""`make chaos`: kill training runs at random moments, resume them, and check that nothing was lost.

Each round starts a short training run on a small phantom set, kills it with SIGKILL or SIGTERM
at a random moment of its life (data scan, feature extraction, training, a checkpoint write,
the final scoring), then does what a user would do: resume it with `ckpt_path=last` and the
same overrides when it left a `last.ckpt`, else run the same command again. The kill times are
drawn within KILL_WINDOW of the measured length of an uninterrupted run of the same config, so
that they land while the run is running. A round passes when
- the kill interrupted the run (a run that had already finished is a failed round: it tested
  nothing),
- the killed run exited as it should (SIGTERM: code 143 and the resume sentence; SIGKILL: -9),
- every file the runs left is whole (checkpoints load, JSON parses strictly: no NaN/Infinity
  tokens, no temporary file remains),
- the finished run's metrics.json equals an uninterrupted run's with the same config.

Two configs alternate: a frozen backbone on cached features (scan, extraction, head training)
and a trainable one with augmentation and DataLoader workers (scan, training). Not part of
`make test` (a few minutes); exits 1 when any round fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT / "src"))

from tb_lightning.data.phantom import ensure_phantom_dataset  # noqa: E402

# The figures compared with the uninterrupted run (exactly: a CPU run repeats bit for bit).
COMPARED = (
    "val/loss",
    "val/auroc",
    "val/average_precision",
    "val/acc",
    "val/sensitivity",
    "val/specificity",
    "val/confusion_matrix",
)
# Kill times are drawn uniformly in this fraction of an uninterrupted run's length: after the
# interpreter has started (before it, SIGTERM's default action ends any program) and well before
# the end. The length is the shortest seen so far (the reference run, then every full run of a
# round): on a shared 2-core machine one run of the same config took 17 s, another 31 s.
KILL_WINDOW = (0.05, 0.80)
CONFIGS = {
    "cached": ["model.net.freeze_features=true", "data.num_workers=0"],
    "workers": [
        "model.net.freeze_features=false",
        "data/augment=cxr",
        "data.num_workers=2",
    ],
}


def base_overrides(phantom: Path, cache: Path, log_dir: Path) -> list[str]:
    return [
        "data=phantom",
        f"data.root={phantom}",
        "data.phantom.num_normal=24",
        "data.phantom.num_tb=12",
        "data.phantom.image_size=128",
        "data.image_size=128",
        "data.val_size=12",
        "data.batch_size=8",
        f"data.cache_dir={cache}",
        f"data.scan_cache_dir={cache}/scan",
        "model.net.weights=null",
        "trainer=cpu",
        "trainer.max_epochs=4",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        f"paths.log_dir={log_dir}",
    ]


def start(overrides: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src")}
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tb_lightning.train", *overrides],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def run(overrides: list[str], log: Path) -> int:
    return start(overrides, log).wait(timeout=900)


def whole_files(root: Path) -> list[str]:
    """Problems with the files under root: unloadable checkpoints, bad JSON."""
    import torch

    problems = []
    for path in root.rglob("*"):
        if path.suffix == ".ckpt":
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any failure is the finding
                problems.append(f"{path}: {type(err).__name__}: {err}")
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text(), parse_constant=refuse_constant)
            except ValueError as err:
                problems.append(f"{path}: {err}")
    return problems


def refuse_constant(token: str) -> None:
    """json.loads accepts NaN, Infinity and -Infinity, which are not JSON; strict readers don't."""
    raise ValueError(f"{token} is not JSON")


def finished_run(log_dir: Path) -> Path | None:
    found = sorted(log_dir.glob("train/runs/*/metrics.json"))
    return found[-1].parent if found else None


def finished_metrics(log_dir: Path) -> dict | None:
    run = finished_run(log_dir)
    return json.loads((run / "metrics.json").read_text()) if run else None


def temp_files(folder: Path) -> list[Path]:
    """Temporary files of interrupted writes (`.<name>.<random>.tmp`) under folder."""
    return sorted(folder.rglob("*.tmp"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times and signals")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="tb-chaos-"))
    phantom = work / "phantom"
    ensure_phantom_dataset(phantom, 24, 12, image_size=128, progress=False)

    reference, duration = {}, {}
    for name, extra in CONFIGS.items():
        log_dir = work / f"reference-{name}"
        overrides = [*base_overrides(phantom, log_dir / "cache", log_dir), *extra]
        began = time.monotonic()
        code = run(overrides, work / f"reference-{name}.log")
        duration[name] = time.monotonic() - began
        reference[name] = finished_metrics(log_dir)
        if code != 0 or reference[name] is None:
            print(f"the uninterrupted {name} run failed; see {work}/reference-{name}.log")
            return 1
        print(f"reference {name}: {duration[name]:.1f} s, val/auroc {reference[name]['val/auroc']}")

    reference_duration = dict(duration)
    failures, kinds = [], {"SIGKILL": 0, "SIGTERM": 0}
    interrupted = lost = identical = 0
    for i in range(args.rounds):
        name = list(CONFIGS)[i % len(CONFIGS)]
        round_dir = work / f"round-{i:02d}"
        log = work / f"round-{i:02d}.log"
        overrides = [*base_overrides(phantom, round_dir / "cache", round_dir), *CONFIGS[name]]
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        kinds[signal.Signals(sig).name] += 1
        at = rng.uniform(*KILL_WINDOW) * duration[name]
        began = time.monotonic()
        process = start(overrides, log)
        try:
            process.wait(timeout=at)
            running, ended = False, time.monotonic() - began
            # Faster than any run so far: the later rounds draw their kill times within this.
            duration[name] = min(duration[name], ended)
        except subprocess.TimeoutExpired:
            running = True
            process.send_signal(sig)
        code = process.wait(timeout=300)
        if running:
            ended = time.monotonic() - began
        text = log.read_text()
        problems = []
        # Interrupted: still running when the signal was sent, and ended by it (not finished).
        landed = running and code != 0
        interrupted += landed
        if not landed:
            outcome = "finished before the kill" if code == 0 else f"ended (code {code}) before it"
            problems.append(
                f"the kill at {at:.1f} s did not interrupt the run (it ended after {ended:.1f} s; "
                f"the reference run took {reference_duration[name]:.1f} s)"
            )
        elif code == -signal.SIGTERM and not list(round_dir.glob("train/runs/*")):
            # Before Python has imported the entry point (the first ~0.3 s) the signal's
            # default action ends the process, as for any program; nothing was written.
            outcome = "ended by the signal before start-up"
        elif sig == signal.SIGKILL:
            outcome = "killed"
            if code != -signal.SIGKILL:
                problems.append(f"SIGKILL gave exit code {code}")
        else:
            phase = re.search(r"Stopped by SIGTERM during ([^.]+)\.", text)
            outcome = f"stopped during {phase[1]}" if phase else "stopped"
            if code != 143:
                problems.append(f"SIGTERM gave exit code {code}, not 143")
            if "Stopped by SIGTERM" not in text:
                problems.append("no 'Stopped by SIGTERM' sentence")
        last = list(round_dir.glob("train/runs/*/checkpoints/last.ckpt"))
        problems += whole_files(round_dir / "train")
        resume = ["ckpt_path=last"] if last and code != 0 else []
        began = time.monotonic()
        if code != 0 and run([*overrides, *resume], log) != 0:
            problems.append("the resumed run failed")
        elif code != 0 and not resume:  # a whole run again: its length is a run's length
            duration[name] = min(duration[name], time.monotonic() - began)
        metrics = finished_metrics(round_dir)
        if metrics is None:
            lost += 1
            problems.append("no metrics.json after the resume")
        else:
            differ = [
                f"{key}: {metrics.get(key)} != {reference[name].get(key)}"
                for key in COMPARED
                if metrics.get(key) != reference[name].get(key)
            ]
            identical += not differ
            problems += differ
        problems += whole_files(round_dir / "train")
        # The run that finished (resumed, or run again) has removed what a kill left in it;
        # a killed run that had no checkpoint to resume is left as it was (noted, not a loss).
        run_dir = finished_run(round_dir)
        if run_dir is not None:
            problems += [f"temporary file left: {p}" for p in temp_files(run_dir)]
        abandoned = [p for p in temp_files(round_dir / "train") if run_dir not in p.parents]
        how = "resumed from last.ckpt" if resume else ("run again" if code else "-")
        if abandoned:
            how += f" ({len(abandoned)} temporary file(s) left in the abandoned run's folder)"
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        share = at / reference_duration[name]
        print(
            f"round {i:2d} {name:8s} {signal.Signals(sig).name} at {at:5.1f} s ({share:4.0%} of "
            f"the reference; {'during the run' if landed else 'AFTER the run'}): {outcome}, {how}: "
            f"{status}"
        )
        if problems:
            failures.append(i)
    print(
        f"\n{args.rounds} rounds ({kinds['SIGKILL']} SIGKILL, {kinds['SIGTERM']} SIGTERM): "
        f"{interrupted} interrupted a running training, {lost} lost run(s), {identical} with "
        f"metrics identical to the uninterrupted run's; {args.rounds - len(failures)} passed, "
        f"{len(failures)} failed" + (f" (rounds {failures}); logs in {work}" if failures else "")
    )
    if not failures and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
