"""How long a user waits for the first sign of life: `--help`, and the first log line of a run.

For each command, N runs (default 5), best and median wall seconds from the process start:
- `python -m tb_lightning.train --help` (and eval's) to its exit;
- `python -m tb_lightning.train experiment=quickstart` to its first log line (then killed).

With `--baseline <git ref>` the same commands run from a checkout of that ref as well,
alternating with this one run by run (the machine's drift hits both alike), and the section
gives the ratio. Written to docs/benchmarks.md, section "startup", with the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from page import cpu_name, write_section  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 3.0  # issue 13: first log line and --help within 3 s on the 2-core machine


def first_output_s(src: Path, args: list[str], until: str | None) -> float:
    """Seconds from starting `python -m <args>` to its exit (until=None), or to its first log
    line that holds `until` ("" for any log line)."""
    env = {**os.environ, "PYTHONPATH": str(src), "HYDRA_FULL_ERROR": "0"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=src.parent,
    )
    try:
        if until is None:
            proc.communicate(timeout=120)
            return time.perf_counter() - start
        for line in proc.stdout:
            # Hydra's log lines start with "[<date> <time>]["; Lightning's own may not.
            is_log_line = line.startswith("[") and "][" in line
            if (until and until in line) or (not until and is_log_line):
                return time.perf_counter() - start
        raise RuntimeError(f"{' '.join(args)} printed no log line")
    finally:
        proc.kill()
        proc.wait()


def commands(run_dir: str) -> dict[str, tuple[list[str], str | None]]:
    """name -> (python -m arguments, the log line to wait for; None: the exit)."""
    quickstart = [
        "tb_lightning.train",
        "experiment=quickstart",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={run_dir}/data",
    ]
    return {
        "train --help (to exit)": (["tb_lightning.train", "--help"], None),
        "eval --help (to exit)": (["tb_lightning.eval", "--help"], None),
        "train experiment=quickstart (to its first log line)": (quickstart, ""),
        # Not a target: when the work starts, torch and Lightning loaded (the seed is set).
        "train experiment=quickstart (to `Seed set`, torch and Lightning loaded)": (
            quickstart,
            "Seed set",
        ),
    }


def checkout(ref: str, where: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "worktree", "add", "--detach", str(where), ref],
        check=True,
        capture_output=True,
    )
    return where / "src"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", help="a git ref to measure beside this checkout")
    parser.add_argument("--output", default=str(PROJECT_ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sources = {"this checkout": PROJECT_ROOT / "src"}
        if args.baseline:
            sources[f"baseline {args.baseline}"] = checkout(args.baseline, Path(tmp) / "baseline")
        times: dict[tuple[str, str], list[float]] = {}
        try:
            for name, (cmd, until) in commands(f"{tmp}/run").items():
                for src in sources.values():  # warm-up: file caches, .pyc files
                    first_output_s(src, cmd, until)
                for _ in range(args.runs):
                    for src_name, src in sources.items():
                        seconds = first_output_s(src, cmd, until)
                        times.setdefault((name, src_name), []).append(seconds)
        finally:
            if args.baseline:
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(PROJECT_ROOT),
                        "worktree",
                        "remove",
                        "--force",
                        str(Path(tmp) / "baseline"),
                    ],
                    check=False,
                )

    header = "| command | " + " | ".join(f"{s}: best / median s" for s in sources)
    header += " | median ratio |" if args.baseline else " |"
    lines = [
        "## Start-up (benchmarks/startup.py)",
        "",
        f"- CPU: {cpu_name()}; Python {sys.version.split()[0]}",
        f"- {args.runs} runs each after one warm-up"
        + (", alternating with the baseline run by run" if args.baseline else ""),
        f"- target: the first output (the `--help` text, the first log line) within "
        f"{TARGET_S:.0f} s; the last row is the time to the first line after torch and "
        "Lightning have loaded, when the work starts (not a target)",
        "",
        header,
        "|---|" + "---:|" * (len(sources) + (1 if args.baseline else 0)),
    ]
    missed = []
    for name in commands(""):
        cells, medians = [], []
        for src_name in sources:
            values = times[(name, src_name)]
            medians.append(statistics.median(values))
            cells.append(f"{min(values):.2f} / {medians[-1]:.2f}")
        ratio = [f"{medians[0] / medians[1]:.2f}x"] if args.baseline else []
        lines.append(f"| {name} | " + " | ".join(cells + ratio) + " |")
        if medians[0] > TARGET_S and "Seed set" not in name:
            missed.append(name)
    section = "\n".join(lines) + "\n"
    print(section)
    write_section(Path(args.output), "startup", section)
    if missed:
        print(f"Target missed ({TARGET_S} s): {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
