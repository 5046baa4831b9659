"""Image sources: each turns a folder into the same table of `Sample`s (path, label, ...).

`DATA_SOURCES` (at the end) is the one registry of them: `data.source` (and each `data.sources`
entry's `source`) -> a `DataSource` record holding its scanner, a one-line description and the
data.* keys it reads. The config checks (config/checks.py), the data module (data/datamodule.py)
and the evaluation read it, so that a new source is a scanner and one entry here, plus its
`conf/data/<name>.yaml` (tests/test_registries.py holds the two together).

No torch here, directly or through the imports: config/checks.py reads the registry before
torch is imported (the phantom generator, numpy and PIL, is imported when a phantom set is
scanned).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tb_lightning.core.errors import DataError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.dicom import is_dicom_file

# Label 0 is the negative class, label 1 the positive one; metric names use these class names.
# Keys one entry of data.sources may set (the rest come from the top-level data.* keys).
SOURCE_KEYS = ("source", "root", "class_names", "class_map", "name")
# PNG and JPEG by extension; DICOM by its .dcm extension or, without one, its content
# (is_image_file).
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
    """True for visible files with a .png/.jpg/.jpeg/.dcm extension in any case, and for DICOM
    files without an extension (data/dicom.py is_dicom_file: the DICM preamble, read from
    extension-less files only)."""
    if not path.is_file() or path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_dicom_file(path)


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
    """The error of a data.root that is not there, with the fix its source's record gives (how to
    get the data set), else the one of any class-folder tree."""
    registered = DATA_SOURCES.get(source)
    fix = (
        registered.missing_root_fix
        if registered and registered.missing_root_fix
        else "pass data.root=<the folder holding one sub-folder per class>"
    )
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
        fix = f"add the '{class_name}' images there or fix data.root"
        # Readability is checked for all sources at once by data/integrity.py (cached).
        samples.extend(
            Sample(str(p), label, p.stem, source) for p in class_folder_images(class_dir, fix)
        )
    return samples


# NLM Shenzhen / Montgomery names: <prefix>_<patient number>_<label>, e.g. CHNCXR_0001_0.png.
NLM_NAME = re.compile(r"^(?P<prefix>[A-Za-z]+)_(?P<number>\d+)_(?P<label>[01])$")
LABEL_ALIASES = {
    "0": 0,
    "normal": 0,
    "negative": 0,
    "1": 1,
    "tuberculosis": 1,
    "tb": 1,
    "positive": 1,
}


def parse_label(value: object, where: str) -> int:
    """0/1, Normal/Tuberculosis (or TB), any case, as label 0/1; `where` names the culprit."""
    label = LABEL_ALIASES.get(str(value).strip().lower())
    if label is None:
        raise DataError(
            f"{where}: label {value!r} is neither Normal nor Tuberculosis; use 0/1, "
            "Normal/Tuberculosis or TB."
        )
    return label


def image_files(folder: Path) -> list[Path]:
    """Every visible image (is_image_file) under folder, recursively, sorted; hidden folders
    skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def class_folder_images(folder: Path, fix: str) -> list[Path]:
    """image_files of one class's folder; an empty one is an error that ends with `fix`."""
    paths = image_files(folder)
    if not paths:
        raise DataError(
            f"Class folder {folder} holds no .png/.jpg/.jpeg images (nor DICOM files); {fix}."
        )
    return paths


def scan_nlm(root: str | Path, source: str | None = None) -> list[Sample]:
    """The NLM Shenzhen (CHNCXR_*) and Montgomery (MCUCXR_*) sets: flat or in class folders.

    The filename suffix is the label (0 normal, 1 TB), the prefix the source (unless `source`
    names one for all), prefix + number the patient.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root={root} does not exist; pass the folder holding the NLM images "
            "(CHNCXR_0001_0.png, MCUCXR_0104_1.png, ... flat or in class folders)."
        )
    samples: list[Sample] = []
    for path in image_files(root):
        match = NLM_NAME.match(path.stem)
        if match is None:
            raise DataError(
                f"{path} does not follow the NLM naming <PREFIX>_<number>_<0|1>.png (e.g. "
                "CHNCXR_0001_0.png); rename or remove it, or use data=folder for this tree."
            )
        label = int(match["label"])
        prefix = match["prefix"].upper()
        folder_label = LABEL_ALIASES.get(path.parent.name.lower()) if path.parent != root else None
        if folder_label is not None and folder_label != label:
            raise DataError(
                f"{path} is in the folder '{path.parent.name}/' but its suffix _{label} says "
                f"{CLASS_NAMES[label]}; move the file or fix its name."
            )
        samples.append(Sample(str(path), label, f"{prefix}_{match['number']}", source or prefix))
    if not samples:
        raise DataError(
            f"data.root={root} holds no .png/.jpg/.jpeg images (nor DICOM files); fix data.root."
        )
    return samples


def scan_class_map(
    root: str | Path, class_map: Mapping[str, object], source: str = "folder"
) -> list[Sample]:
    """Any class-folder tree: class_map maps each folder (relative to root) to Normal/TB.

    Several folders may map to one class (e.g. {healthy: Normal, tb_smear: TB, tb_culture: TB});
    folders not in class_map are left out.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(missing_root_message(root, source))
    samples: list[Sample] = []
    for folder_name, class_value in class_map.items():
        label = parse_label(class_value, f"data.class_map.{folder_name}")
        folder = find_class_dir(root, str(folder_name))
        if folder is None:
            raise DataError(
                f"data.root={root} has no folder '{folder_name}/' named in data.class_map; fix "
                "data.class_map or data.root."
            )
        fix = f"add images or remove '{folder_name}' from data.class_map"
        samples.extend(
            Sample(str(p), label, p.stem, source) for p in class_folder_images(folder, fix)
        )
    return samples


# Duplicated manifest rows named in the error message; the rest are counted.
MAX_DUPLICATES_SHOWN = 3


def is_inside(image: str | Path, folder: str | Path) -> bool:
    """True when image lies under folder once both are resolved (symlinks followed, `..` folded).

    The file that would be read is what counts, not how the path is spelled: a symlink inside
    the folder that points elsewhere (to a folder or a file) leads outside, and a path that
    spells the folder through another link (/tmp vs /private/tmp) stays inside. A data folder
    made of symlinks into a data store is therefore outside too; that setup works with
    data.allow_outside_paths=true (trusting the listing), or with the listing kept in the store.
    """
    return Path(image).expanduser().resolve().is_relative_to(Path(folder).expanduser().resolve())


def source_folder(source: str, root: str | Path) -> Path:
    """The folder a source's images lie in, resolved: its root, or for a manifest (whose root is
    the CSV file) the CSV's folder. Split files are held to these folders (config/checks.py)."""
    path = Path(root).expanduser()
    registered = DATA_SOURCES.get(source)
    return (path.parent if registered and registered.root_is_file else path).resolve()


def scan_manifest(
    path: str | Path, source: str = "manifest", allow_outside_paths: bool = False
) -> list[Sample]:
    """A CSV with `path,label` and optional `patient_id,source` columns.

    Relative paths are relative to the CSV's folder; a missing patient_id means one image per
    patient, a missing source means `source`. Rows must point inside the CSV's folder, symlinks
    followed (is_inside), unless `allow_outside_paths` (a manifest from elsewhere must not read
    arbitrary files), and each image may be listed once (a repeated row would be trained on
    twice, or leak across the split).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.root={path} is not a file; for data=manifest pass the CSV with path,label "
            "columns (and optional patient_id,source)."
        )
    folder = Path(os.path.normpath(path.parent.absolute()))
    samples: list[Sample] = []
    first_line: dict[Path, int] = {}  # resolved image -> the line that listed it first
    duplicates: list[str] = []
    # utf-8-sig: spreadsheet programs save "CSV UTF-8" with a byte-order mark, which would
    # otherwise become part of the first column's name. Decoded whole (manifests are small) so
    # that a non-UTF-8 file fails here, with a clear message; newline="" as csv wants.
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"Manifest {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
            "UTF-8 CSV."
        ) from err
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"path", "label"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(
            f"Manifest {path} lacks the column(s) {sorted(missing)}; its header must hold "
            "path,label (and optionally patient_id,source)."
        )
    for line, row in enumerate(reader, start=2):
        # Folded lexically: the path that is checked is the path that is read.
        image = Path(os.path.normpath(folder / Path(row["path"]).expanduser()))
        if not allow_outside_paths and not is_inside(image, folder):
            raise DataError(
                f"Manifest {path} line {line} lists {row['path']!r}, which is outside the "
                f"manifest's folder {folder} (symlinks followed: {image.resolve()}); move the "
                "image under that folder or set data.allow_outside_paths=true."
            )
        if not image.is_file():
            raise DataError(
                f"Manifest {path} line {line} lists {image}, which does not exist; fix the "
                "path or remove the row."
            )
        key = image.resolve()  # one file under two spellings (./a.png, a link) counts once
        if key in first_line:
            duplicates.append(f"line {line} repeats line {first_line[key]} ({image})")
            continue
        first_line[key] = line
        label = parse_label(row["label"], f"Manifest {path} line {line}")
        patient = (row.get("patient_id") or "").strip() or image.stem
        samples.append(
            Sample(str(image), label, patient, (row.get("source") or "").strip() or source)
        )
    if duplicates:
        more = len(duplicates) - MAX_DUPLICATES_SHOWN
        shown = "; ".join(duplicates[:MAX_DUPLICATES_SHOWN]) + (
            f"; {more} more" if more > 0 else ""
        )
        raise DataError(
            f"Manifest {path} lists the same image more than once ({shown}); remove the "
            "repeated rows so that each image is listed once."
        )
    if not samples:
        raise DataError(f"Manifest {path} has no rows; add path,label rows.")
    return samples


# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanRequest:
    """What a scanner is given: one source's settings, from the data.* keys (or from one
    data.sources entry, the rest of the keys coming from data.*)."""

    source: str  # data.source: the registered name
    root: Path  # data.root, expanded and resolved (split.csv and the scan cache hold full paths)
    class_names: tuple[str, ...] = CLASS_NAMES  # data.class_names: [negative, positive]
    class_map: Mapping[str, Any] | None = None  # data.class_map: folder -> Normal/Tuberculosis
    # A data.sources entry's `name`: the `source` of its rows (the per-source figures); unset,
    # the scanner chooses (`row_source`, or for NLM the file-name prefix).
    name: str | None = None
    allow_outside_paths: bool = False  # data.allow_outside_paths (manifest rows)
    phantom: Mapping[str, Any] = field(default_factory=dict)  # data.phantom.* (the generator)

    @property
    def row_source(self) -> str:
        """The `source` of the rows: the entry's name, else the source's own."""
        return self.name or self.source


@dataclass(frozen=True)
class DataSource:
    """One value of data.source: how its root is read, and what the rest of the code needs to
    know of it without scanning."""

    scan: Callable[[ScanRequest], list[Sample]]
    description: str  # one line: what data.root holds
    # The data.* keys the scanner reads (data.root always): each must be in the source's
    # conf/data/<name>.yaml (tests/test_registries.py); a key that holds settings (phantom) has
    # its values checked with the config (config/checks.py).
    keys: tuple[str, ...] = ("root",)
    # How to get the data set, for the error of a data.root that does not exist (None: the
    # generic "pass data.root=<the folder holding one sub-folder per class>").
    missing_root_fix: str | None = None
    # data.root names a file (a manifest's CSV): its images lie in the file's folder, to which
    # the rows of a split file are held (source_folder).
    root_is_file: bool = False
    # Images generated under data.root from the config on first use, not medical images: the
    # data module makes them in prepare_data, the reports carry the synthetic-data banner, and
    # a data.sources entry may not name the source.
    synthetic: bool = False


def _scan_tb_cxr(request: ScanRequest) -> list[Sample]:
    return scan_class_folders(request.root, request.class_names, request.row_source)


def _scan_nlm_tb(request: ScanRequest) -> list[Sample]:
    return scan_nlm(request.root, request.name)


def _scan_folder(request: ScanRequest) -> list[Sample]:
    if request.class_map:
        return scan_class_map(request.root, request.class_map, request.row_source)
    return scan_class_folders(request.root, request.class_names, request.row_source)


def _scan_manifest(request: ScanRequest) -> list[Sample]:
    return scan_manifest(request.root, request.row_source, request.allow_outside_paths)


def _scan_phantom(request: ScanRequest) -> list[Sample]:
    # numpy and PIL: imported when a phantom set is scanned, not with the registry.
    from tb_lightning.data.phantom import ensure_phantom_dataset

    pairs = ensure_phantom_dataset(request.root, **request.phantom)
    return [Sample(str(p), label, Path(p).stem, request.row_source) for p, label in pairs]


# data.source -> its record, in the order the config checks list the allowed values.
DATA_SOURCES: dict[str, DataSource] = {
    "tb_cxr": DataSource(
        _scan_tb_cxr,
        "the Kaggle TB Chest X-ray Database layout: <root>/Normal/*, <root>/Tuberculosis/*",
        keys=("root", "class_names"),
        missing_root_fix=(
            f"download the Kaggle 'Tuberculosis (TB) Chest X-ray Database' ({KAGGLE_URL}), "
            "unpack it and pass data.root=<the folder holding Normal/ and Tuberculosis/>"
        ),
    ),
    "nlm_tb": DataSource(
        _scan_nlm_tb,
        "NLM Shenzhen/Montgomery: label in the file name (CHNCXR_0001_0.png), flat or in "
        "class folders",
    ),
    "folder": DataSource(
        _scan_folder,
        "any class-folder tree: <root>/<class_names[i]>/*, or folders mapped to the classes "
        "by data.class_map",
        keys=("root", "class_names", "class_map"),
    ),
    "manifest": DataSource(
        _scan_manifest,
        "a CSV of path,label[,patient_id,source] rows; data.root is the CSV file",
        keys=("root", "allow_outside_paths"),
        root_is_file=True,
    ),
    "phantom": DataSource(
        _scan_phantom,
        "synthetic CXR-like phantoms generated under data.root (data.phantom.*): not medical "
        "images",
        keys=("root", "phantom"),
        synthetic=True,
    ),
}


def synthetic_sources() -> frozenset[str]:
    """The sources whose images are generated; their names are also their rows' `source`."""
    return frozenset(name for name, source in DATA_SOURCES.items() if source.synthetic)
