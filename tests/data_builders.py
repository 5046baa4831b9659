"""Small image trees for the data tests: class folders, NLM names, manifests, bad files; and
tiny checkpoints in tb_lightning.train's layout, built in-process without training."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Readable but unusual images: each must decode to the same picture as its 8-bit original.
VALID_ODD_KINDS = ("png16", "rgba", "palette", "cmyk")
# Unusable files and the words of the problem data_report.json / the error names.
BAD_KINDS = {
    "zero_byte": "empty file",
    "truncated_png": "truncated or corrupt PNG",
    "truncated_jpeg": "truncated or corrupt JPEG",
    "not_an_image": "not an image",
    "tiny": "tiny image",
    "huge": "huge image",
}


def pixels(seed: int, size: int = 96) -> np.ndarray:
    """A distinct, smooth-ish 8-bit grayscale picture (blurred noise, so hashes differ)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def write_png(path: Path, seed: int, size: int = 96) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(seed, size)).save(path)
    return path


def class_tree(root: Path, names=("Normal", "Tuberculosis"), counts=(8, 6), seed0=0) -> Path:
    """<root>/<name>/<name>-<i>.png with distinct images."""
    seed = seed0
    for name, n in zip(names, counts, strict=True):
        for i in range(n):
            write_png(root / name / f"{name}-{i}.png", seed)
            seed += 1
    return root


def nlm_tree(root: Path, n_chn=(6, 6), n_mcu=(4, 3), class_folders=False) -> Path:
    """CHNCXR_<n>_<label>.png / MCUCXR_<n>_<label>.png, flat or in Normal/ Tuberculosis/."""
    seed = 1000
    for prefix, (n_normal, n_tb) in (("CHNCXR", n_chn), ("MCUCXR", n_mcu)):
        for label, n in ((0, n_normal), (1, n_tb)):
            for _ in range(n):
                folder = root / ("Normal", "Tuberculosis")[label] if class_folders else root
                write_png(folder / f"{prefix}_{seed:04d}_{label}.png", seed)
                seed += 1
    return root


def write_odd_valid(folder: Path, kind: str, seed: int) -> Path:
    """A valid image in an unusual mode whose 8-bit grayscale content is pixels(seed)."""
    folder.mkdir(parents=True, exist_ok=True)
    gray = pixels(seed)
    if kind == "png16":
        path = folder / f"{kind}.png"
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # full 16-bit range
    elif kind == "rgba":
        path = folder / f"{kind}.png"
        alpha = np.full_like(gray, 200)
        Image.fromarray(np.stack([gray, gray, gray, alpha], -1), "RGBA").save(path)
    elif kind == "palette":
        path = folder / f"{kind}.png"
        Image.fromarray(gray).convert("P").save(path)
    elif kind == "cmyk":
        path = folder / f"{kind}.jpg"
        Image.fromarray(np.stack([gray] * 3, -1)).convert("CMYK").save(path, quality=95)
    else:
        raise ValueError(kind)
    return path


def write_bad(folder: Path, kind: str, seed: int = 0) -> Path:
    """An unusable file of the given BAD_KINDS kind, with an image extension."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "zero_byte":
        path = folder / "zero_byte.png"
        path.write_bytes(b"")
    elif kind in ("truncated_png", "truncated_jpeg"):
        fmt, ext = ("PNG", "png") if kind == "truncated_png" else ("JPEG", "jpg")
        buffer = io.BytesIO()
        Image.fromarray(pixels(seed)).save(buffer, fmt)
        data = buffer.getvalue()
        path = folder / f"{kind}.{ext}"
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_an_image":
        path = folder / "not_an_image.png"
        path.write_text("patient notes, saved with the wrong name\n")
    elif kind == "tiny":
        path = write_png(folder / "tiny.png", seed, size=32)
    elif kind == "huge":
        path = folder / "huge.png"
        Image.fromarray(np.zeros((64, 8200), dtype=np.uint8)).save(path)  # compresses to ~1 KB
    else:
        raise ValueError(kind)
    return path


# --- Tiny checkpoints ---------------------------------------------------------------------------

# The smallest network the tests load: AlexNet's trunk (random, frozen) and an 8-unit head at
# 64 px, the phantom images' size (AlexNet takes 63 px at least). 2.5M weights, a 10 MB file.
TINY_NET = {
    "arch": "alexnet",
    "weights": None,
    "freeze_features": True,
    "hidden_dim": 8,
    "dropout": 0.5,
    "image_size": 64,
}
TINY_OPTIMIZER = {"_target_": "torch.optim.Adam", "lr": 1e-4}
CLAHE = {"name": "clahe", "clip_limit": 2.0, "tile_grid": 4}


@contextlib.contextmanager
def skipped_init_of_discarded_layers(min_weights: int = 4_000_000) -> Iterator[None]:
    """Linear layers of `min_weights` weights or more left uninitialised while building.

    The network builder makes torchvision's whole AlexNet and keeps its conv features (models/
    backbones.py): drawing the 58M random weights of its classifier, thrown away at once, is
    most of the ~0.6 s that building (and so loading) a tiny checkpoint takes. No layer of
    TINY_NET is that large; a checkpoint's weights replace every kept one anyway.
    """
    import torch

    original = torch.nn.Linear.reset_parameters

    def reset_parameters(self: torch.nn.Linear) -> None:
        if self.in_features * self.out_features < min_weights:
            original(self)

    torch.nn.Linear.reset_parameters = reset_parameters
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters = original


def tiny_classifier(
    seed: int = 0,
    preprocess: Mapping[str, Any] | None = None,
    pos_weight: float = 2.0,
    model_threshold: float = 0.5,
    tta: str | None = None,
    loss: str = "bce",
    focal_gamma: float | None = None,
    **net: Any,
):
    """A TBClassifier of TINY_NET (`net` overrides its keys) with weights drawn from `seed`, in
    eval mode, as training leaves one (pos_weight set from the train split); model_threshold is
    its model.threshold; tta, loss and focal_gamma its model.tta, model.loss, model.focal_gamma."""
    import logging

    import torch

    from tb_lightning.models.classifier import TBClassifier

    torch.manual_seed(seed)
    # weights=None with frozen features: build_net's warning is for users, not for tests.
    net_log = logging.getLogger("tb_lightning.models.net")
    level = net_log.level
    net_log.setLevel(logging.ERROR)
    try:
        model = TBClassifier(
            net={**TINY_NET, **net},
            optimizer=TINY_OPTIMIZER,
            threshold=model_threshold,
            preprocess=preprocess,
            tta=tta,
            loss=loss,
            focal_gamma=focal_gamma,
        )
    finally:
        net_log.setLevel(level)
    model.pos_weight.fill_(pos_weight)
    return model.eval()


def threshold_choice(value: float, policy: str = "youden", val_images: int = 12) -> dict:
    """An operating threshold as train stores it in best.ckpt (trained/checkpoint.py)."""
    return {"value": value, "policy": policy, "target": 0.9, "val_images": val_images}


def write_checkpoint(
    path: Path,
    model=None,
    *,
    threshold: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    epoch: int = 1,
    global_step: int = 10,
    **classifier: Any,
) -> Path:
    """`model` (else tiny_classifier(**classifier)) saved as Lightning saves a checkpoint
    (state_dict, hyper_parameters, epoch, global_step), with the operating threshold and the
    calibration that train adds to best.ckpt when given. With `model`, only a `preprocess`
    of `classifier` is used: it replaces the model's (building a network takes ~0.5 s).

    Loading one costs what building its network does (load_checkpoint_file builds it from the
    hyper_parameters): share loaded models between tests where they are only read."""
    import lightning
    import torch

    if model is None:
        model = tiny_classifier(**classifier)
    hparams = dict(model.hparams)
    if "preprocess" in classifier:  # with `model`: one network saved with several
        hparams["preprocess"] = classifier["preprocess"]
    checkpoint: dict[str, Any] = {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
    }
    if threshold is not None:
        checkpoint["operating_threshold"] = dict(threshold)
    if calibration is not None:
        checkpoint["calibration"] = dict(calibration)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def image_set(root: Path, normal: int, tb: int, size: int = 64, seed0: int = 500) -> list:
    """`normal` + `tb` distinct PNGs in <root>/Normal and <root>/Tuberculosis, as Samples."""
    from tb_lightning.data.sources import Sample

    samples = []
    for label, (name, count) in enumerate((("Normal", normal), ("Tuberculosis", tb))):
        for i in range(count):
            path = write_png(root / name / f"{name}-{i}.png", seed0 + 100 * label + i, size)
            samples.append(Sample(str(path), label, path.stem, "folder"))
    return samples


def kfold_folder(
    folder: Path,
    images: Path,
    folds: int = 3,
    seeds: tuple[int, ...] = (42,),
    calibration: Mapping[str, Any] | None = None,
    policy: str = "youden",
) -> Path:
    """A k-fold multirun folder as `-m sweep=kfold` leaves it, of tiny untrained models: job
    `s * folds + k` (seed s, fold k) holds .hydra/config.yaml, split.csv (a shared 4-image test
    split, fold k's val images) and checkpoints/best.ckpt with its stored threshold (and
    `calibration`). What load_ensemble reads, without training; the images go under `images`."""
    from omegaconf import OmegaConf

    from tb_lightning.data.split import write_split_csv

    samples = image_set(images, 4 + 4 * folds, 2 + 3 * folds)
    normal = [s for s in samples if s.label == 0]
    tb = [s for s in samples if s.label == 1]
    test = normal[:2] + tb[:2]
    pool = normal[2:] + tb[2:]  # each fold's val: every folds-th image of the rest
    base = tiny_classifier()
    for s_index, seed in enumerate(seeds):
        for fold in range(folds):
            job = folder / str(s_index * folds + fold)
            val = pool[fold::folds]
            train = [s for s in pool if s not in val]
            write_split_csv(job / "split.csv", train, val, test)
            config = {
                "seed": seed,
                "data": {"root": str(images), "num_folds": folds, "fold": fold, "test_size": 4},
                "model": {"net": TINY_NET},
                "threshold": {"policy": policy, "target": 0.9},
            }
            (job / ".hydra").mkdir(parents=True)
            OmegaConf.save(OmegaConf.create(config), job / ".hydra" / "config.yaml")
            write_checkpoint(
                job / "checkpoints" / "best.ckpt",
                member_of(base, 100 * s_index + fold),
                threshold=threshold_choice(0.5, policy, len(val)),
                calibration=calibration,
            )
    return folder


def member_of(model, seed: int):
    """A copy of `model` whose head is drawn anew from `seed`: another fold's model at the cost
    of a copy, not of building a network."""
    import copy

    import torch

    member = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in member.net.head.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return member
