"""`make screenshots`: what a user sees, captured into docs/img/ for the README.

Runs the README's sweep (sweep=lr_dropout, 6 jobs, of the from-scratch recipe
experiment=nlm_scratch on ../shared/data/nlm-tb-128 at its native 128 px, on a shorter
schedule), evaluates the best job, draws Grad-CAM figures of two synthetic
phantom images (no real radiograph goes into docs/), opens TensorBoard on the sweep in headless
Chromium and captures each tab: Time Series, Scalars, HParams (table and parallel
coordinates), Custom Scalars, Images; then MLflow's Compare page of the same runs (the sweep
logs to both). Everything it runs writes into a new folder of its own,
outputs/screenshots/<time>/, which stays for a look in TensorBoard afterwards.

Not part of `make test`: it needs Debian's Chromium (`apt-get install chromium`) and the
`screenshots` extra (playwright, which drives it; `make screenshots` installs it).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "nlm-tb-128"
VIEWPORT = {"width": 1500, "height": 950}
# Figures of `python -m tb_lightning.eval` shown in the README.
EVAL_FIGURES = ("roc_curve", "pr_curve", "confusion_matrix", "calibration_curve")


def run(*args: str) -> None:
    """A tb_lightning command, as a user types it; stops the script when it fails."""
    command = [sys.executable, "-m", *args]
    print("$ python -m", " ".join(args), flush=True)
    if subprocess.run(command, cwd=PROJECT_ROOT).returncode != 0:
        raise SystemExit(f"Failed: python -m {' '.join(args)}")


def best_job(sweep_dir: Path) -> Path:
    """The run directory of the sweep summary's best job (its verdict column)."""
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    best = [r for r in rows if r.get("verdict") == "best"]
    if not best:
        raise SystemExit(f"{sweep_dir}/sweep_summary.csv marks no best job")
    return sweep_dir / best[0]["run_dir"]  # written relative to the multirun folder


def phantom_examples(folder: Path) -> list[str]:
    """One TB and one Normal synthetic phantom at 512 px, for the Grad-CAM pictures.

    The README shows no real radiograph: the images of ../shared/data stay out of the repository,
    figures drawn from them included. The model is the sweep's (trained on real images), so the
    maps show the figure's layout, not what the model finds in real films.
    """
    from tb_lightning.data.phantom import ensure_phantom_dataset

    made = ensure_phantom_dataset(
        folder, 1, 1, image_size=512, lesions="conspicuous", progress=False
    )
    return [str(path) for path, _ in reversed(made)]  # TB first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, port: int) -> subprocess.Popen:
    """TensorBoard on logdir, every image step kept (its default keeps 4 per tag)."""
    tensorboard = Path(sys.executable).with_name("tensorboard")
    process = subprocess.Popen(
        [
            str(tensorboard),
            "--logdir",
            str(logdir),
            "--port",
            str(port),
            "--samples_per_plugin",
            "images=100",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs") as answer:
                if answer.read().count(b"tensorboard") > 0:
                    return process
        except OSError:
            pass
        time.sleep(1)
    process.terminate()
    raise SystemExit(f"TensorBoard did not list the runs of {logdir} within 60 s")


def capture_tensorboard(port: int, out: Path, chromium: str) -> list[Path]:
    """One screenshot per tab (HParams: table and parallel coordinates)."""
    from playwright.sync_api import sync_playwright

    base = f"http://127.0.0.1:{port}/"
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)

        def shoot(name: str) -> None:
            page.wait_for_timeout(4000)  # the charts draw after the data arrive
            path = out / f"tensorboard-{name}.png"
            page.screenshot(path=str(path))
            shots.append(path)

        # Time Series, tall enough for its first two groups (train, val): its settings pane
        # opens by default and hides charts, so it is closed first.
        page.set_viewport_size({**VIEWPORT, "height": 1700})
        page.goto(base + "#timeseries", wait_until="networkidle")
        page.locator("button[aria-label='Close side pane']").first.click(timeout=30_000)
        shoot("timeseries")
        page.set_viewport_size(VIEWPORT)
        for tab in ("scalars", "custom_scalars", "images", "hparams"):
            page.goto(base + f"#{tab}", wait_until="networkidle")
            shoot(tab.replace("_", "-") + ("-table" if tab == "hparams" else ""))
        page.get_by_text("PARALLEL COORDINATES VIEW").click()
        shoot("hparams-parallel-coordinates")
        browser.close()
    return shots


def start_mlflow_ui(store: Path, port: int) -> subprocess.Popen:
    """`mlflow ui` on the sweep's embedded store (what `make mlflow` opens for outputs/)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    uri = f"sqlite:///{store}"
    process = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(90):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            time.sleep(1)
    process.terminate()
    raise SystemExit(f"mlflow ui did not answer on {uri} within 90 s")


def capture_mlflow_compare(store: Path, port: int, out: Path, chromium: str) -> Path:
    """MLflow's Compare page of the sweep's runs: their swept params and final figures."""
    import json
    import urllib.parse

    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    ids = [e.experiment_id for e in experiments]
    runs = client.search_runs(ids, order_by=["attributes.start_time ASC"])
    query = urllib.parse.urlencode(
        {"runs": json.dumps([r.info.run_id for r in runs]), "experiments": json.dumps(ids)}
    )
    path = out / "mlflow-compare.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        # Wide enough for six runs' columns beside the row names.
        page = browser.new_page(viewport={"width": 1800, "height": 1100})
        page.goto(f"http://127.0.0.1:{port}/#/compare-runs?{query}", wait_until="networkidle")
        page.get_by_text("Parameters").first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)
        # The assistant's side pane (MLflow 3) and the plot of an arbitrary metric hide the
        # table of params and final figures: closed and folded first.
        assistant = page.locator("button[aria-label='Close']")
        if assistant.count():
            assistant.first.click()
        page.get_by_text("Visualizations").first.click()
        page.wait_for_timeout(2000)
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "img")
    parser.add_argument(
        "--sweep-dir", type=Path, help="capture this finished multirun instead of running one"
    )
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("make screenshots needs Chromium: apt-get install chromium")
    work = PROJECT_ROOT / "outputs" / "screenshots" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    sweep_dir = args.sweep_dir or work / "sweep"
    if args.sweep_dir is None:
        if not args.data_root.is_dir():
            raise SystemExit(f"--data-root {args.data_root} is not a folder of NLM images")
        run(
            "tb_lightning.train",
            "-m",
            "sweep=lr_dropout",
            "experiment=nlm_scratch",
            f"data.root={args.data_root}",
            f"trainer.max_epochs={args.epochs}",
            # TensorBoard and MLflow (its embedded store in <work>/mlruns) side by side.
            "logger=[tensorboard,mlflow]",
            f"logger.mlflow.save_dir={work / 'mlruns'}",
            f"hydra.sweep.dir={sweep_dir}",
        )
    elif not (sweep_dir / "sweep_summary.csv").is_file():
        raise SystemExit(f"--sweep-dir {sweep_dir} holds no sweep_summary.csv (not a multirun)")
    best = best_job(sweep_dir)
    # The recipe keeps no best.ckpt (its last epoch is the model): last.ckpt then.
    checkpoint = next(
        best / "checkpoints" / name
        for name in ("best.ckpt", "last.ckpt")
        if (best / "checkpoints" / name).is_file()
    )
    run("tb_lightning.eval", f"ckpt_path={checkpoint}", f"hydra.run.dir={work / 'eval'}")
    examples = work / "examples.csv"
    examples.write_text("path\n" + "\n".join(phantom_examples(work / "phantoms")) + "\n")
    run(
        "tb_lightning.predict",
        f"ckpt_path={checkpoint}",
        f"input={examples}",
        "saliency=true",
        f"hydra.run.dir={work / 'predict'}",
    )

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EVAL_FIGURES:
        source = work / "eval" / "figures" / f"{name}.png"
        if source.is_file():
            written.append(Path(shutil.copyfile(source, args.out / f"eval-{name}.png")))
    for number, figure in enumerate(sorted((work / "predict" / "saliency").glob("*.png"))):
        written.append(Path(shutil.copyfile(figure, args.out / f"gradcam-{number}.png")))
    port = free_port()
    tensorboard = start_tensorboard(sweep_dir, port)
    try:
        written += capture_tensorboard(port, args.out, chromium)
    finally:
        tensorboard.terminate()
    store = work / "mlruns" / "mlflow.db"
    if store.is_file():
        port = free_port()
        mlflow_ui = start_mlflow_ui(store, port)
        try:
            written.append(capture_mlflow_compare(store, port, args.out, chromium))
        finally:
            mlflow_ui.terminate()
    print(f"Runs in {work}; pictures:")
    for path in written:
        print(f"  {path.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
