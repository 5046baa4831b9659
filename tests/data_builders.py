"""Small image trees for the data tests: class folders, NLM names, manifests, bad files."""

from __future__ import annotations

import io
from pathlib import Path

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
