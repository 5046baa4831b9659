"""`make chaos`: kill training runs at random moments, resume them, and check that nothing was lost.

Each round starts a short training run on a small phantom set, kills it with SIGKILL or SIGTERM
at a random moment of its life (data scan, feature extraction, training, a checkpoint write,
the final scoring), then does what a user would do: resume it with `ckpt_path=last` and the
same overrides when it left a `last.ckpt`, else run the same command again. A round passes when
- the killed run exited as it should (SIGTERM: code 143 and the resume sentence; SIGKILL: -9),
- every file the runs left is whole (checkpoints load, JSON parses, no temporary file remains),
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
                json.loads(path.read_text())
            except ValueError as err:
                problems.append(f"{path}: {err}")
    return problems


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

    failures, kinds = [], {"SIGKILL": 0, "SIGTERM": 0}
    for i in range(args.rounds):
        name = list(CONFIGS)[i % len(CONFIGS)]
        round_dir = work / f"round-{i:02d}"
        log = work / f"round-{i:02d}.log"
        overrides = [*base_overrides(phantom, round_dir / "cache", round_dir), *CONFIGS[name]]
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        kinds[signal.Signals(sig).name] += 1
        at = rng.uniform(0.5, duration[name])
        process = start(overrides, log)
        time.sleep(at)
        process.send_signal(sig)
        code = process.wait(timeout=300)
        text = log.read_text()
        problems = []
        if code == 0:
            outcome = "finished before the kill"
        elif code == -signal.SIGTERM and not list(round_dir.glob("train/runs/*")):
            # Before Python has imported the entry point (the first ~0.3 s) the signal's
            # default action ends the process, as for any program; nothing was written.
            outcome = "ended by the signal before start-up"
        elif sig == signal.SIGKILL:
            outcome = "killed"
            if code != -signal.SIGKILL:
                problems.append(f"SIGKILL gave exit code {code}")
        else:
            outcome = "stopped"
            if code != 143:
                problems.append(f"SIGTERM gave exit code {code}, not 143")
            if "Stopped by SIGTERM" not in text:
                problems.append("no 'Stopped by SIGTERM' sentence")
        last = list(round_dir.glob("train/runs/*/checkpoints/last.ckpt"))
        problems += whole_files(round_dir / "train")
        resume = ["ckpt_path=last"] if last and code != 0 else []
        if code != 0 and run([*overrides, *resume], log) != 0:
            problems.append("the resumed run failed")
        metrics = finished_metrics(round_dir)
        if metrics is None:
            problems.append("no metrics.json after the resume")
        else:
            for key in COMPARED:
                if metrics.get(key) != reference[name].get(key):
                    problems.append(f"{key}: {metrics.get(key)} != {reference[name].get(key)}")
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
        print(
            f"round {i:2d} {name:8s} {signal.Signals(sig).name} at {at:5.1f} s: {outcome}, "
            f"{how}: {status}"
        )
        if problems:
            failures.append(i)
    print(
        f"\n{args.rounds} rounds ({kinds['SIGKILL']} SIGKILL, {kinds['SIGTERM']} SIGTERM): "
        f"{args.rounds - len(failures)} passed, {len(failures)} failed"
        + (f" (rounds {failures}); logs in {work}" if failures else "")
    )
    if not failures and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
