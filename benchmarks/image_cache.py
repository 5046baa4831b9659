"""A fine-tuning epoch of `experiment=nlm_scratch` with and without the decoded-image cache
(`data.cache_images`), in the same run: how much of a CPU epoch decoding the files costs.

    python benchmarks/image_cache.py [--data-root ../shared/data/nlm-tb-128] [--epochs 2]

Each way trains the same model from the same seed for --epochs epochs; the figure is the last
epoch's train + val seconds (the first warms up). The cached way also opens its cache once more,
as the next run would, which checks every row against the block checksums
(core/mapped_table.py): that check's seconds against the epoch's are the cost of verification.
Written to docs/benchmarks.md (section "image_cache") and printed; `make bench-scale` runs it
after benchmarks/scale.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from page import cpu_name, write_section  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PAGE = PROJECT_ROOT / "docs" / "benchmarks.md"
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "nlm-tb-128"


def epoch_seconds(overrides: list[str], epochs: int) -> tuple[float, float, float, float]:
    """(the last epoch's seconds, the image cache's build seconds, the seconds of its check
    when a run opens it, its size in MB; 0 for the last three without the cache) for one way."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from timing import EpochTimer

    from tb_lightning.config import CONF_DIR
    from tb_lightning.core.tasks import instantiate_config
    from tb_lightning.data.image_cache import build_image_cache

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(0, workers=True)
    datamodule = instantiate_config(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    build_s = verify_s = size_mb = 0.0
    if cfg.data.cache_images:
        started = time.perf_counter()
        build_image_cache(datamodule)
        build_s = time.perf_counter() - started
        # The next run's opening of the cache: every row checked. Its map serves this run.
        cache = build_image_cache(datamodule)
        verify_s, size_mb = cache.table.verify_seconds, cache.path.stat().st_size / 2**20
        datamodule.serve_images(cache)
    model = instantiate_config(cfg.model, _recursive_=False)
    timer = EpochTimer()

    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.times[-1], build_s, verify_s, size_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-page", action="store_true")
    args = parser.parse_args()
    if not args.data_root.is_dir():
        print(f"Skipped: {args.data_root} not found (the NLM images of ../shared/data).")
        return
    workers = min(2, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="tb-bench-imagecache-") as work:
        common = [
            "experiment=nlm_scratch",
            f"data.root={args.data_root}",
            f"data.num_workers={workers}",
            f"data.scan_cache_dir={work}/scan",
            f"paths.data_dir={work}",
            f"paths.output_dir={work}/run",
        ]
        files_s, *_ = epoch_seconds(common, args.epochs)
        cached_s, build_s, verify_s, size_mb = epoch_seconds(
            [*common, "data.cache_images=true", f"data.image_cache_dir={work}/images"],
            args.epochs,
        )
    text = "\n".join(
        [
            "## Decoded-image cache (benchmarks/image_cache.py)",
            "",
            f"Machine: {cpu_name()}. `experiment=nlm_scratch` (ResNet-18 trained from scratch at"
            f" 128 px, augmentation on) on {args.data_root.name}, `data.num_workers={workers}`;"
            f" epoch {args.epochs} of {args.epochs} (train + val), the same run and seed each way.",
            "",
            "| images from | s/epoch | vs files |",
            "|---|---:|---:|",
            f"| the files (decode + resize every epoch) | {files_s:.2f} | 1.00x |",
            f"| `data.cache_images=true` (built once in {build_s:.1f} s) | {cached_s:.2f} |"
            f" {files_s / cached_s:.2f}x |",
            "",
            f"Checking every row of the cache ({size_mb:.0f} MB) when a run opens it (CRC32 per"
            f" block of rows, one streaming pass): {verify_s:.3f} s"
            f" ({size_mb / max(verify_s, 1e-9):.0f} MB/s), so an epoch plus the check takes"
            f" x{(cached_s + verify_s) / cached_s:.3f} of one without (target: within +10%; both"
            " grow with the number of images, so the ratio holds at any N).",
        ]
    )
    print(text)
    if not args.no_page:
        write_section(PAGE, "image_cache", text)
        print(f"Wrote the image_cache section of {PAGE}")


if __name__ == "__main__":
    main()
