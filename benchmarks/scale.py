"""`make bench-scale`: does time per image stay flat, and memory stay flat, as the data grow?

For N = 1k, 4k and 16k synthetic images (the phantom generator at 128 px, quick to make) it runs
the path a training run takes, one stage per fresh process so that each stage's peak memory is
its own: scan (the integrity scan, cold) -> split (scan cache warm) -> feature extraction
(frozen AlexNet, streamed into the memory-mapped cache) -> 2 head epochs (Lightning, reading the
cache through its memory map). Per stage and N: seconds, milliseconds per image, peak RSS
(VmHWM: includes the pages of the cache file the process touched, which the kernel can drop
at will) and peak anonymous RSS (sampled every 20 ms: the memory the process itself holds).
The train stage opens the cache the extract stage wrote, as the next run would, which checks
every row against the block checksums (core/mapped_table.py): that check's seconds against a
head epoch's, measured in the same process, are the cost of verification (target: at most
+10% of an epoch at N = 16k). The figures are printed and written to docs/benchmarks.md
(section "scale").

    python benchmarks/scale.py [--sizes 1000 4000 16000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from page import cpu_name, write_section  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PAGE = PROJECT_ROOT / "docs" / "benchmarks.md"
STAGES = ("scan", "split", "extract", "train")
IMAGE_SIZE = 128
TB_SHARE = 0.2  # of the N phantoms, as the Kaggle set (700 of 4,200 is 1/6)
# Extrapolated to NIH ChestX-ray14's size.
TARGET_N = 112_120


class AnonPeak:
    """The peak of RssAnon (/proc/self/status), sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self._read())
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak_kb, self._read())


def overrides(root: Path, work: Path, n: int) -> list[str]:
    n_tb = int(n * TB_SHARE)
    return [
        "data=phantom",
        f"data.root={root}",
        f"data.phantom.num_normal={n - n_tb}",
        f"data.phantom.num_tb={n_tb}",
        f"data.phantom.image_size={IMAGE_SIZE}",
        f"data.image_size={IMAGE_SIZE}",
        "data.val_size=0.2",
        "data.batch_size=64",
        f"data.num_workers={min(2, os.cpu_count() or 1)}",
        f"data.cache_dir={work / 'features'}",
        f"data.scan_cache_dir={work / 'scan'}",
        f"paths.data_dir={work}",
        f"paths.output_dir={work / 'run'}",
        "model.net.weights=null",
        "trainer=cpu",
        "trainer.max_epochs=2",
    ]


def run_stage(stage: str, root: Path, work: Path, n: int) -> dict:
    """One stage in this process; returns its seconds and peak memory."""
    import logging

    # Imported before the clock starts: the stages are timed, not Python's imports.
    import lightning as L
    from hydra import compose, initialize_config_dir
    from timing import EpochTimer

    import tb_lightning.data.datamodule  # noqa: F401
    from tb_lightning.config import CONF_DIR
    from tb_lightning.core.allocator import keep_large_blocks_in_heap
    from tb_lightning.core.tasks import instantiate_config
    from tb_lightning.data.feature_cache import build_feature_cache
    from tb_lightning.trained.runner import run_over_images

    logging.basicConfig(level=logging.WARNING)
    keep_large_blocks_in_heap()  # as `python -m tb_lightning.train` does (core/allocator.py)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides(root, work, n))
    # Seeded as a training run is: the same random-init backbone in every stage, hence the same
    # cache key, so that the train stage reads (and checks) the extract stage's cache.
    L.seed_everything(cfg.seed, workers=True)
    anon = AnonPeak()
    started = time.perf_counter()
    datamodule = instantiate_config(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if stage in ("extract", "train"):
        model = instantiate_config(cfg.model, _recursive_=False)
        cache_files = set(Path(cfg.data.cache_dir).glob("*.npy"))
        started = time.perf_counter()  # the extraction (or, warm, the cache's opening) alone
        cache = build_feature_cache(datamodule, model.net, run_over_images)
        if stage == "extract":
            elapsed = time.perf_counter() - started
        else:
            if cache.path not in cache_files:
                raise RuntimeError("the train stage extracted again instead of reading the cache")
            verify_seconds = cache.table.verify_seconds
            datamodule.serve_features(cache)
            timer = EpochTimer()
            trainer = L.Trainer(
                accelerator="cpu",
                max_epochs=2,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[timer],
            )
            started = time.perf_counter()
            trainer.fit(model, datamodule=datamodule)
            elapsed = time.perf_counter() - started
            # Per image: the second epoch (train + val), after the first warmed up.
            return {
                **peaks(anon),
                "seconds": elapsed,
                "epoch_seconds": timer.times[-1],
                "verify_seconds": verify_seconds,
                "cache_mb": cache.path.stat().st_size / 2**20,
            }
    else:
        elapsed = time.perf_counter() - started
    return {**peaks(anon), "seconds": elapsed}


def peaks(anon: AnonPeak) -> dict[str, float]:
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_anon_mb": anon.stop() / 1024,
    }


def measure(sizes: list[int], work_root: Path) -> list[dict]:
    from tb_lightning.data.phantom import ensure_phantom_dataset

    rows = []
    for n in sizes:
        root, work = work_root / f"phantom-{n}", work_root / f"work-{n}"
        n_tb = int(n * TB_SHARE)
        started = time.perf_counter()
        ensure_phantom_dataset(root, n - n_tb, n_tb, image_size=IMAGE_SIZE, progress=False)
        print(f"N={n}: generated in {time.perf_counter() - started:.0f} s", flush=True)
        for stage in STAGES:
            result = subprocess.run(
                [sys.executable, __file__, "--stage", stage, str(root), str(work), str(n)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if result.returncode != 0:
                raise SystemExit(f"stage {stage} at N={n} failed:\n{result.stderr[-3000:]}")
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            row = {"n": n, "stage": stage, **figures, "ms_per_image": figures["seconds"] / n * 1e3}
            if stage == "train":  # the second epoch, over the train and val images
                row["ms_per_image"] = figures["epoch_seconds"] / n * 1e3
            rows.append(row)
            print(
                f"N={n:>6} {stage:<8} {row['seconds']:7.1f} s  {row['ms_per_image']:6.3f} ms/image"
                f"  peak RSS {row['peak_rss_mb']:7.0f} MB  peak anon {row['peak_anon_mb']:7.0f} MB",
                flush=True,
            )
        table = work / "features"
        size_mb = sum(p.stat().st_size for p in table.glob("*.npy")) / 2**20
        rows.append({"n": n, "stage": "cache file", "size_mb": size_mb})
    return rows


def section(rows: list[dict], sizes: list[int]) -> str:
    by = {(r["n"], r["stage"]): r for r in rows}
    lines = [
        "## Scale (benchmarks/scale.py, `make bench-scale`)",
        "",
        f"Machine: {cpu_name()}. Phantom images at {IMAGE_SIZE} px ({int(TB_SHARE * 100)}% TB),"
        " frozen AlexNet (2304 features per image), `data.num_workers=2`; each stage in a fresh"
        " process. Peak RSS (VmHWM) counts the cache file's pages the process touched (the"
        " kernel drops them at will); peak anon is the memory the process holds itself. The"
        " train stage is 2 head epochs on the train split (80%); ms/image is per image per"
        " epoch.",
        "",
        "| stage | " + " | ".join(f"N={n:,}: s, ms/image" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for stage in STAGES:
        cells = [
            f"{by[n, stage]['seconds']:.1f} s, {by[n, stage]['ms_per_image']:.3f}" for n in sizes
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | " + " | ".join(f"N={n:,}: peak RSS / anon MB" for n in sizes) + " |"]
    lines.append("|---|" + "---:|" * len(sizes))
    for stage in STAGES:
        cells = [
            f"{by[n, stage]['peak_rss_mb']:.0f} / {by[n, stage]['peak_anon_mb']:.0f}" for n in sizes
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    cache = " | ".join(f"{by[n, 'cache file']['size_mb']:.1f} MB" for n in sizes)
    lines += ["", f"| feature cache file | {cache} |", "|---|" + "---:|" * len(sizes)]
    # Verification: the train stage's check of every row at load, against its head epoch.
    lines += [
        "",
        "Checking every row of the feature cache when a run opens it (CRC32 per block of"
        " rows, one streaming pass; in the train stage, the process that runs the epochs; the"
        " file is in the page cache as the extract stage left it, and a check from a cold disk"
        " reads at disk speed, paging in what the first epoch then finds in memory):",
        "",
        "| | " + " | ".join(f"N={n:,}" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
        "| check at load, s | "
        + " | ".join(f"{by[n, 'train']['verify_seconds']:.3f}" for n in sizes)
        + " |",
        "| check, MB/s | "
        + " | ".join(
            f"{by[n, 'train']['cache_mb'] / max(by[n, 'train']['verify_seconds'], 1e-9):.0f}"
            for n in sizes
        )
        + " |",
        "| head epoch (train + val), s | "
        + " | ".join(f"{by[n, 'train']['epoch_seconds']:.2f}" for n in sizes)
        + " |",
        "| epoch + check vs epoch without | "
        + " | ".join(f"x{verify_ratio(by[n, 'train']):.3f}" for n in sizes)
        + " |",
    ]
    # The targets: time per image within +-20% across N, peak at the largest N <= 1.25x the
    # smallest, and the figure extrapolated to TARGET_N.
    small, large = sizes[0], sizes[-1]
    lines += ["", "Targets (largest N against smallest):", ""]
    ratio = verify_ratio(by[large, "train"])
    lines.append(
        f"- verification at N={large:,}: an epoch plus the check at load x{ratio:.3f} of one"
        f" without ({'within' if ratio <= 1.10 else 'over'} +10%)"
    )
    for stage in STAGES:
        a, b = by[small, stage], by[large, stage]
        time_ratio = b["ms_per_image"] / a["ms_per_image"]
        rss_ratio = b["peak_rss_mb"] / a["peak_rss_mb"]
        anon_ratio = b["peak_anon_mb"] / a["peak_anon_mb"]
        flat = "within" if 0.8 <= time_ratio <= 1.2 else "outside"
        lines.append(
            f"- {stage}: ms/image x{time_ratio:.2f} ({flat} +-20%), peak RSS x{rss_ratio:.2f},"
            f" peak anon x{anon_ratio:.2f}"
            f" ({'within' if anon_ratio <= 1.25 else 'over'} 1.25x)"
        )
    per_image = sum(by[large, s]["ms_per_image"] for s in ("scan", "extract")) / 1e3
    per_epoch = by[large, "train"]["ms_per_image"] / 1e3
    cache_per_image = by[large, "cache file"]["size_mb"] / large
    lines += [
        "",
        f"Extrapolated to {TARGET_N:,} images on this machine (128 px phantoms; real 512 px"
        " films decode and extract several times slower): scan + extraction"
        f" {per_image * TARGET_N / 60:.0f} min, a head epoch {per_epoch * TARGET_N:.0f} s,"
        f" feature cache {cache_per_image * TARGET_N / 1024:.2f} GB on disk; peak anonymous"
        f" memory as at {large:,} ({max(by[large, s]['peak_anon_mb'] for s in STAGES):.0f} MB).",
    ]
    return "\n".join(lines)


def verify_ratio(train: dict) -> float:
    """(head epoch + the cache's check at load) / head epoch: what verification adds to an
    epoch (to each run's first; later epochs check nothing)."""
    return (train["epoch_seconds"] + train["verify_seconds"]) / train["epoch_seconds"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stage":
        stage, root, work, n = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(run_stage(stage, root, work, n)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--no-page", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    work_root = args.keep or Path(tempfile.mkdtemp(prefix="tb-bench-scale-"))
    try:
        rows = measure(args.sizes, work_root)
    finally:
        if args.keep is None:
            shutil.rmtree(work_root, ignore_errors=True)
    text = section(rows, args.sizes)
    print(text)
    if not args.no_page:
        write_section(PAGE, "scale", text)
        print(f"Wrote the scale section of {PAGE}")


if __name__ == "__main__":
    main()
