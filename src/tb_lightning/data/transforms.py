"""Decoding and preprocessing: every image becomes a normalised 3 x S x S float tensor."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from tb_lightning.core.errors import DataError
from tb_lightning.data.dicom import (
    MAGIC,
    PREAMBLE_BYTES,
    UnusableDicom,
    check_header,
    is_dicom_content,
    read_pixels,
)
from tb_lightning.data.preprocess import preprocess_steps

# The backbones are ImageNet models, so inputs are normalised with ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# PIL modes of 16/32-bit integer grayscale (16-bit PNGs open as one of these).
PIL_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# The limits every image meets before a pixel of it is decoded (scan, training, eval, predict).
MIN_SIDE = 64  # smaller images hold too little to learn from (and are usually icons/thumbnails)
MAX_SIDE = 8192  # larger ones are not chest X-rays as exported for ML; decoding them costs GBs
# A larger file is refused without reading it (hashing and torchvision's JPEG decode would read
# it all); an 8192 x 8192 8-bit RGB image stored with no compression at all is 192 MiB.
MAX_FILE_BYTES = 256 * 2**20
# The formats PIL may open: what .png/.jpg/.jpeg files hold (PIL's JPEG opener also opens a
# camera's multi-picture JPEG, as MPO). No other PIL plugin ever sees a file (EPS, for one,
# hands the file to Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG")
# DICOM files (data/dicom.py: a .dcm name or the DICM preamble) never reach PIL; their header is
# read by pydicom, and check_image_file's `format` says "DICOM".


class BadImageError(DataError):
    """An image file that cannot be used; `problem` is the reason alone (for skipped.csv)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"Cannot use image {path}: {problem}; remove or replace this file.")
        self.path = str(path)
        self.problem = problem


def check_image_file(path: str | Path) -> dict[str, Any]:
    """Check one image file before any pixel of it is decoded; `problem` says why it is unusable.

    The one check of every image, wherever it is decoded: the scan (data/integrity.py), training,
    eval and predict (via load_image). In order: a regular file (a `.png` link to /dev/zero
    would never end); its size from stat, nothing read (at most MAX_FILE_BYTES); its header
    only (PIL reads no pixel at open; pydicom stops before the pixel data): a PNG, JPEG or
    DICOM image whose sides are within MIN_SIDE..MAX_SIDE. Returns {"problem": None or the
    reason, "bytes", "width", "height", "mode", "format"} (as far as it got); a DICOM file's
    also holds bits_stored, modality, view_position, patient (the hashed PatientID or None) and
    flags (data/dicom.py check_header). Truncated pixel data is found only by decoding
    (load_image, the scan).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return {"problem": "does not exist"}
    except OSError as err:
        return {"problem": f"cannot be read ({err.strerror or err})"}
    if not stat.S_ISREG(info.st_mode):
        return {"problem": "not a regular file"}
    result: dict[str, Any] = {"problem": None, "bytes": info.st_size}
    if info.st_size == 0:
        return {**result, "problem": "empty file (0 bytes)"}
    if info.st_size > MAX_FILE_BYTES:
        return {
            **result,
            "problem": f"huge image file ({info.st_size / 2**20:.0f} MiB, more than "
            f"{MAX_FILE_BYTES // 2**20} MiB)",
        }
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; open errors differ from bad content
    except OSError as err:
        return {**result, "problem": f"cannot be read ({err.strerror or err})"}
    with f:
        try:
            head = f.read(PREAMBLE_BYTES + len(MAGIC))
            f.seek(0)
        except OSError as err:
            return {**result, "problem": f"cannot be read ({err.strerror or err})"}
        if is_dicom_content(path, head):
            result.update(check_header(path))
            if result["problem"]:
                return result
            width, height = result["width"], result["height"]
            return {**result, "problem": side_problem(width, height)}
        try:
            with Image.open(f, formats=IMAGE_FORMATS) as image:
                width, height = image.size
                result.update(width=width, height=height, mode=image.mode, format=image.format)
        except UnidentifiedImageError:
            return {**result, "problem": "not an image (the content is not a PNG or JPEG image)"}
        except Image.DecompressionBombError:  # PIL's own pixel limit, checked at open
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            return {
                **result,
                "problem": f"huge image (over {limit} pixels by its header, more than "
                f"{MAX_SIDE} px a side)",
            }
        except (OSError, SyntaxError, ValueError) as err:
            return {**result, "problem": f"truncated or corrupt image header ({err})"}
    return {**result, "problem": side_problem(width, height)}


def side_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused (MIN_SIDE..MAX_SIDE a side), or None."""
    if max(width, height) > MAX_SIDE:
        return f"huge image ({width}x{height} px, more than {MAX_SIDE} px)"
    if min(width, height) < MIN_SIDE:
        return f"tiny image ({width}x{height} px, less than {MIN_SIDE} px)"
    return None


def pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image of any valid mode as a uint8 (H, W, 3) array.

    16-bit grayscale is scaled to 8 bits (x / 257, the full 0..65535 range onto 0..255):
    PIL's own convert("RGB") clips it at 255 instead, which turns most X-rays white.
    Alpha is dropped; palette, CMYK and the rest go through PIL's conversion.
    """
    if image.mode in PIL_WIDE_GRAY_MODES:
        wide = np.asarray(image).astype(np.float32)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


def decode_png(path: str | Path) -> torch.Tensor:
    """A PNG as a uint8 (3, H, W) tensor, decoded by PIL, pixel for pixel as torchvision would.

    torchvision 0.29's PNG decoder crashes the whole process (SIGSEGV, from libpng's longjmp)
    on corrupt or short pixel data, where PIL raises an OSError; PIL is about as fast on PNG.
    16-bit samples keep their high byte (x >> 8), as torchvision's uint16 -> uint8 scaling did,
    so training, eval and the feature cache see the same pixels as before.
    """
    with Image.open(path, formats=("PNG",)) as image:
        image.load()  # corrupt or short pixel data raises here
        if image.mode in PIL_WIDE_GRAY_MODES:
            wide = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
            gray = (wide >> 8).astype(np.uint8)
        elif image.mode == "L":
            gray = np.array(image)
        else:  # RGB as is; palette, alpha, 1-bit through PIL's conversion (alpha dropped)
            gray = None
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    # numpy, not torch, makes the channel-first copy: torch's copy of a small tensor is ~10x
    # slower on a busy machine (thread-pool start-up).
    if gray is not None:
        return torch.from_numpy(np.repeat(gray[None], 3, axis=0))
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor (3, H, W); grayscale is repeated to 3 channels.

    check_image_file runs first, so a huge, tiny or non-image file is refused (BadImageError)
    before any decoder allocates its pixels. PNGs are decoded by PIL (decode_png: torchvision's
    PNG decoder crashes on corrupt data); JPEGs by torchvision.io in C++ (faster than PIL,
    CMYK included), with PIL as the fallback for what it rejects; DICOM files by pydicom, as a
    viewer shows them, then 8-bit (data/dicom.py read_pixels). A truncated or corrupt file
    fails in the decoders and is refused the same way.
    """
    info = check_image_file(path)
    if info["problem"]:
        raise BadImageError(path, info["problem"])
    if info["format"] == "DICOM":
        try:
            pixels = read_pixels(path)
        except UnusableDicom as err:
            raise BadImageError(path, err.problem) from None
        return array_to_tensor(pixels)
    try:
        if info["format"] == "PNG":
            return decode_png(path)
        try:
            return decode_image(str(path), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass
        with Image.open(path, formats=IMAGE_FORMATS) as pil_image:
            rgb = pil_to_rgb_array(pil_image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        problem = f"truncated or corrupt {info['format']} ({err})"
        raise BadImageError(path, problem) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def array_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W) gray or (H, W, 3) RGB array as a (3, H, W) tensor, as decode_png returns."""
    if pixels.ndim == 2:
        return torch.from_numpy(np.repeat(pixels[None], 3, axis=0))
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def build_transform(image_size: int, preprocess: Mapping[str, Any] | None = None) -> v2.Compose:
    """Resize to image_size x image_size, preprocess (data/preprocess.py: CLAHE or nothing),
    scale to [0, 1] and normalise (no augmentation)."""
    return v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            *preprocess_steps(preprocess),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
