"""Image sources: each turns a folder into the same table of `Sample`s (path, label, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tb_lightning.errors import DataError

# Label 0 is the negative class, label 1 the positive one; metric names use these class names.
CLASS_NAMES = ("Normal", "Tuberculosis")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
KAGGLE_URL = "https://www.kaggle.com/datasets/tawsifurrahman/tuberculosis-tb-chest-xray-dataset"


@dataclass(frozen=True)
class Sample:
    """One image of the table every source yields."""

    path: str
    label: int
    patient_id: str
    source: str


def is_image_file(path: Path) -> bool:
    """True for visible files with a .png/.jpg/.jpeg extension in any case."""
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def check_readable(path: Path) -> None:
    """Open the image header so a broken file is reported at scan time, not mid-epoch."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - reading the header is the check
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(
            f"Cannot read image {path} ({err}); remove or replace this file and run again."
        ) from None


def find_class_dir(root: Path, class_name: str) -> Path | None:
    """The sub-folder of root named class_name, matched exactly first, then ignoring case."""
    exact = root / class_name
    if exact.is_dir():
        return exact
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == class_name.lower():
            return child
    return None


def missing_root_message(root: Path, source: str) -> str:
    if source == "tb_cxr":
        fix = (
            f"download the Kaggle 'Tuberculosis (TB) Chest X-ray Database' ({KAGGLE_URL}), "
            "unpack it and pass data.root=<the folder holding Normal/ and Tuberculosis/>"
        )
    else:
        fix = "pass data.root=<the folder holding one sub-folder per class>"
    return f"data.root={root} does not exist; {fix}, or try the synthetic set with data=phantom."


def scan_class_folders(
    root: str | Path, class_names: Sequence[str], source: str = "folder"
) -> list[Sample]:
    """List the images under root/<class_name>/ (recursively), label = index in class_names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(missing_root_message(root, source))
    class_dirs = [find_class_dir(root, name) for name in class_names]
    for class_name, class_dir in zip(class_names, class_dirs, strict=True):
        if class_dir is None:
            raise DataError(
                f"data.root={root} has no class folder '{class_name}/' (data.class_names="
                f"{list(class_names)}); point data.root at the folder that holds the class "
                "folders, or set data.class_names to their names."
            )
    samples: list[Sample] = []
    for label, (class_name, class_dir) in enumerate(zip(class_names, class_dirs, strict=True)):
        paths = sorted(p for p in class_dir.rglob("*") if is_image_file(p))
        if not paths:
            raise DataError(
                f"Class folder {class_dir} holds no .png/.jpg/.jpeg images; add the "
                f"'{class_name}' images there or fix data.root."
            )
        for path in paths:
            check_readable(path)
            samples.append(Sample(str(path), label, path.stem, source))
    return samples
