"""DICOM files: which files are DICOM, their header check, the viewer's pixel pipeline, the
patient key, and what is flagged (modality, view position). pydicom (the `dicom` extra) is
imported inside the functions, only when a DICOM file is read.

What is a DICOM file here: a `.dcm` file (any case), or a file without an extension (or with an
all-digit one, as UID-named files have: `1.2.840.113619.2.1`) whose bytes 128-131 are `DICM`
(the Part 10 preamble); a file named `DICOMDIR` (an index of a DICOM medium) is not an image.

The pixels become what a radiology viewer shows, by pydicom's own functions
(`pydicom.pixels`), then 8-bit gray (`read_pixels`, which explains the mapping). Only
single-frame image objects are read; the rest each get one sentence (`UnusableDicom.problem`,
turned into transforms.BadImageError by the caller).

Privacy: of the header, only the pixel module, the transfer syntax, Modality, ViewPosition,
SOPClassUID and PatientID are read; PatientID is kept only as a hash with a fixed prefix
(`patient_key`). Nothing else (names, dates, institution, accession number) is read into any
output, log or error sentence, and pydicom's value-validation warnings (which quote values) are
turned off.

No torch here (data/sources.py imports this module before torch may be imported).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tb_lightning.core.extras import require

if TYPE_CHECKING:  # numpy is imported with pydicom, when a DICOM file is read
    import numpy as np

DICOM_SUFFIXES = frozenset({".dcm"})
# The Part 10 preamble: 128 bytes, then the magic.
PREAMBLE_BYTES = 128
MAGIC = b"DICM"
# Names of files that carry the magic but hold no image (the index of a DICOM medium).
NOT_IMAGE_NAMES = frozenset({"dicomdir"})
# Modalities of a projection radiograph (DR is not a DICOM code, but is written by some devices);
# anything else (CT, MR, OT, SC, ...) is read and flagged.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
# Frontal chest views; others (LL, RL, ...) are read and flagged; an empty ViewPosition (type 2:
# often left empty) is unknown, not flagged.
FRONTAL_VIEWS = frozenset({"PA", "AP"})
# The patient key: SHA-256 of this fixed prefix + PatientID, first 16 hex digits. The prefix makes
# the key this project's own (a bare SHA-256 of an ID is found in any table of hashed IDs); keys
# of the same PatientID are equal across runs and machines, so splits and split.csv can group by
# them. A short numeric PatientID can still be recovered by trying every value: the key is a
# pseudonym for grouping, not anonymisation.
PATIENT_KEY_PREFIX = "tb-lightning/patient-id/v1:"
PATIENT_KEY_PREFIX_SHORT = "dicom-"  # Sample.patient_id = dicom-<16 hex digits>
# PhotometricInterpretation's defined terms (PS3.3 C.7.6.3.1.2), the values an error may name.
DEFINED_PHOTOMETRICS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "XYB",
    }
)
# Characters a code string (CS) may hold.
CODE_STRING = re.compile(r"[^A-Z0-9 _]")


class UnusableDicom(ValueError):
    """A DICOM file that cannot be used; `problem` is the reason alone (a clause, no value of
    the header but numbers and codes)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def has_dicom_magic(head: bytes) -> bool:
    """True when the first bytes of a file (at least 132) carry the Part 10 preamble's DICM."""
    return head[PREAMBLE_BYTES : PREAMBLE_BYTES + len(MAGIC)] == MAGIC


def read_head(path: str | Path) -> bytes:
    """The first 132 bytes of a file (fewer for a shorter one; empty when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(PREAMBLE_BYTES + len(MAGIC))
    except OSError:
        return b""


def may_lack_extension(path: Path) -> bool:
    """No extension, or an all-digit one (a UID-named file: 1.2.840.10008.1): such a file may
    be DICOM, which only its content tells."""
    return path.suffix == "" or path.suffix[1:].isdigit()


def is_dicom_file(path: Path) -> bool:
    """A `.dcm` file, or one without an image extension that carries the DICM preamble.

    Reads 132 bytes of extension-less files only; a `.dcm` file is not opened here (its header
    is checked when it is read: transforms.check_image_file).
    """
    if path.name.lower() in NOT_IMAGE_NAMES:
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return may_lack_extension(path) and has_dicom_magic(read_head(path))


def is_dicom_content(path: str | Path, head: bytes) -> bool:
    """Whether check_image_file reads this file as DICOM: a `.dcm` name, or the magic."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(head)


def patient_key(patient_id: object) -> str | None:
    """`dicom-<16 hex digits>` for a non-empty PatientID (see PATIENT_KEY_PREFIX), else None."""
    text = str(patient_id or "").strip()
    if not text:
        return None
    digest = hashlib.sha256((PATIENT_KEY_PREFIX + text).encode("utf-8")).hexdigest()
    return PATIENT_KEY_PREFIX_SHORT + digest[:16]


def is_patient_key(value: object) -> bool:
    """True for a patient key patient_key() made (as split.csv's patient_id holds it)."""
    text = str(value or "")
    return (
        text.startswith(PATIENT_KEY_PREFIX_SHORT)
        and len(text) == len(PATIENT_KEY_PREFIX_SHORT) + 16
    )


def code_string(value: object) -> str:
    """A code-string (CS) header value as it may be written out: upper case, at most 16 of the
    characters CS allows, so that a malformed header cannot put free text into an output."""
    return CODE_STRING.sub("", str(value or "").strip().upper())[:16]


def flags_of(modality: str, view_position: str) -> list[str]:
    """Why an image is not a frontal chest radiograph by its header: `modality` (other than
    CR/DX/DR, or none), `view_position` (other than PA/AP; an empty one is not flagged)."""
    flags = []
    if modality not in RADIOGRAPH_MODALITIES:
        flags.append("modality")
    if view_position and view_position not in FRONTAL_VIEWS:
        flags.append("view_position")
    return flags


# --- pydicom --------------------------------------------------------------------------------


def _pydicom(path: str | Path) -> Any:
    """pydicom, configured: its 'dicom' extra or one sentence with the pip command."""
    require("dicom", f"Reading the DICOM file {path}")
    import pydicom
    from pydicom import config

    # Validation of header values warns with the value itself (a name, a date): never logged.
    config.settings.reading_validation_mode = config.IGNORE
    return pydicom


def _read(path: str | Path, header_only: bool) -> Any:
    """The dataset of a file (up to the pixel data when header_only), or UnusableDicom.

    A `.dcm` file without the preamble (a bare dataset, as some older tools write) is read too
    (force=True); its transfer syntax, when absent, is the encoding pydicom found.
    """
    pydicom = _pydicom(path)
    force = Path(path).suffix.lower() in DICOM_SUFFIXES
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=force)
    except Exception as err:  # noqa: BLE001 - any parse error is the file's problem
        # The exception's text may quote header bytes: only its kind is said.
        raise UnusableDicom(
            f"not a readable DICOM file (pydicom: {type(err).__name__} while reading it)"
        ) from None
    if "TransferSyntaxUID" not in ds.file_meta:
        from pydicom import uid

        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            uid.ImplicitVRLittleEndian
            if implicit
            else uid.ExplicitVRLittleEndian
            if little
            else uid.ExplicitVRBigEndian
        )
    return ds


def _number(ds: Any, keyword: str, default: int | None = None) -> int | None:
    """An integer element of the header (None or default when absent or empty)."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        return int(value)
    except (TypeError, ValueError):
        raise UnusableDicom(
            f"its header's {keyword} is not a number; the file is damaged or not a standard image"
        ) from None


def _sop_class_name(ds: Any) -> str:
    """The SOP class of the object as the standard names it (e.g. Basic Text SR Storage)."""
    uid = ds.get("SOPClassUID")
    name = str(getattr(uid, "name", "") or "") if uid else ""
    # An unregistered UID's name is the UID itself.
    return name if name and name != str(uid) else "SOP class unknown"


def _decoder_problem(transfer_syntax: Any) -> str | None:
    """Why pixels of this transfer syntax cannot be decoded here, or None when they can."""
    from pydicom.pixels import get_decoder

    if not transfer_syntax.is_compressed:
        return None
    name = transfer_syntax.name
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return (
            f"its pixel data is compressed as {name}, which pydicom cannot decode; convert it to "
            "an uncompressed DICOM or a PNG (e.g. gdcmconv --raw, or dcmj2pnm)"
        )
    if decoder.is_available:
        return None
    needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
    return (
        f"its pixel data is compressed as {name} and no decoder for it is installed (pydicom "
        f"needs one of: {needs}); install them with pip install -e '.[dicom]' (pylibjpeg and "
        "its plugins), or convert the file to an uncompressed DICOM (gdcmconv --raw)"
    )


def _header(ds: Any) -> dict[str, Any]:
    """The checked header of a dataset: width, height, mode (PhotometricInterpretation),
    bits_stored, modality, view_position, patient (the key), flags; UnusableDicom for a
    non-image object, a multi-frame image, an unknown photometric interpretation or a transfer
    syntax without a decoder here."""
    rows, columns = _number(ds, "Rows"), _number(ds, "Columns")
    if not rows or not columns:
        raise UnusableDicom(
            f"not an image: a DICOM object ({_sop_class_name(ds)}) without pixel data, such as "
            "a structured report or a presentation state"
        )
    frames = _number(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise UnusableDicom(
            f"a multi-frame DICOM image ({frames} frames), where one radiograph is one frame; "
            "export the frame to use as a single-frame DICOM or a PNG"
        )
    photometric = code_string(ds.get("PhotometricInterpretation")) or "MONOCHROME2"
    samples = _number(ds, "SamplesPerPixel", 1)
    gray = photometric.startswith("MONOCHROME") and samples == 1
    colour = photometric in ("RGB", "PALETTE COLOR") or photometric.startswith("YBR")
    if not (gray or colour):
        # Named only when it is a defined term: a damaged header must not echo free text.
        named = photometric if photometric in DEFINED_PHOTOMETRICS else "of an unknown kind"
        raise UnusableDicom(
            f"its PhotometricInterpretation ({named}, {samples} samples per pixel) is not a "
            "grayscale or colour image this reader knows; convert it to a PNG"
        )
    bits_allocated = _number(ds, "BitsAllocated", 8) or 8
    bits_stored = _number(ds, "BitsStored", bits_allocated) or bits_allocated
    problem = _decoder_problem(ds.file_meta.TransferSyntaxUID)
    if problem:
        raise UnusableDicom(problem)
    modality = code_string(ds.get("Modality"))
    view_position = code_string(ds.get("ViewPosition"))
    return {
        "width": columns,
        "height": rows,
        "mode": photometric,
        "bits_stored": bits_stored,
        "modality": modality,
        "view_position": view_position,
        "patient": patient_key(ds.get("PatientID")),
        "flags": flags_of(modality, view_position),
    }


def _checked_header(ds: Any) -> dict[str, Any]:
    """_header, with any error of a damaged header (pydicom converts values when they are
    first read) as UnusableDicom; its text may quote header bytes, so only its kind is said."""
    try:
        return _header(ds)
    except (UnusableDicom, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - any conversion error is the file's problem
        raise UnusableDicom(
            f"its header cannot be read (pydicom: {type(err).__name__}); the file is damaged "
            "or not a standard DICOM image"
        ) from None


def check_header(path: str | Path) -> dict[str, Any]:
    """The header check of one DICOM file, before any pixel is decoded (pydicom reads up to
    the pixel data, stop_before_pixels): check_image_file's dict ({"problem", "width",
    "height", "mode", "format": "DICOM"}) plus bits_stored, modality, view_position, patient
    (the key or None) and flags. The side limits are check_image_file's, applied by it."""
    try:
        header = _checked_header(_read(path, header_only=True))
    except UnusableDicom as err:
        return {"problem": err.problem, "format": "DICOM"}
    return {"problem": None, "format": "DICOM", **header}


# --- pixels ---------------------------------------------------------------------------------


def read_pixels(path: str | Path) -> np.ndarray:
    """The image of a single-frame DICOM file as a viewer shows it: uint8 (H, W) gray, or
    (H, W, 3) RGB for a colour image; UnusableDicom with the reason otherwise.

    Grayscale (MONOCHROME1/2), by pydicom.pixels:

    1. the stored values, decoded (compressed transfer syntaxes through pydicom's decoders,
       BitsStored respected: unused high bits cleared, signed values sign-extended);
    2. apply_modality_lut: the Modality LUT or RescaleSlope/RescaleIntercept;
    3. the first VOI transform (index 0) when there is one, as apply_voi_lut chooses it (the VOI
       LUT Sequence before WindowCenter/WindowWidth): apply_voi (the LUT; its input rounded to
       integers, as a LUT is indexed) or apply_windowing (LINEAR, LINEAR_EXACT or SIGMOID);
    4. the float values v are mapped to 0..255 linearly, round(255 * (v - lo) / (hi - lo)),
       clipped, with [lo, hi] the output range of the last step, from the header alone (so the
       same for every image of a file, never stretched to the image's own min..max):
       - windowing: the window's output range, pydicom's apply_windowing of -inf and +inf
         (0..2^BitsStored-1 unsigned, or the signed range, through the rescale, or the
         Modality LUT's range);
       - VOI LUT: min..max of the LUT's entries (apply_voi over all of its inputs);
       - no VOI: the stored range (0..2^BitsStored-1 unsigned, -2^(BitsStored-1)..
         2^(BitsStored-1)-1 signed) through apply_modality_lut: for an 8-bit MONOCHROME2 file
         without rescale or VOI that is 0..255, so its pixels are its stored values unchanged
         (the same as the PNG it was made from);
    5. MONOCHROME1 (0 is white) is inverted: 255 - gray.

    Colour: RGB as stored, YBR_* converted to RGB by pydicom, PALETTE COLOR through
    apply_color_lut; more than 8 bits are scaled to 8 (round(255 * v / (2^bits - 1))).
    """
    ds = _read(path, header_only=False)
    header = _checked_header(ds)
    if "PixelData" not in ds:
        raise UnusableDicom(
            "a DICOM image object without its pixel data (no (7FE0,0010) element): the file "
            "is incomplete"
        )
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(ds)  # YBR_* arrives as RGB (pydicom's default conversion)
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's problem
        # The decoders' messages speak of lengths, bits and codecs, never of header values.
        raise UnusableDicom(
            f"its pixel data cannot be decoded ({type(err).__name__}: {err})"
        ) from None
    photometric = header["mode"]
    if photometric.startswith("MONOCHROME"):
        return _gray(arr, ds, invert=photometric == "MONOCHROME1")
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged palette is the file's problem
            raise UnusableDicom(f"its palette cannot be applied ({type(err).__name__})") from None
        bits = 16 if arr.dtype.itemsize > 1 else 8
        return _to_uint8(arr, 0, 2**bits - 1)
    return _to_uint8(arr, 0, 2 ** header["bits_stored"] - 1)


def _stored_range(ds: Any) -> tuple[int, int]:
    """The range of the stored values: BitsStored bits, signed or not (PixelRepresentation)."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation") or 0):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def voi_kind(ds: Any) -> str | None:
    """`lut`, `window` or None: the VOI transform pydicom's apply_voi_lut applies (prefer_lut)."""
    sequence = ds.get("VOILUTSequence")
    if sequence and None not in (
        sequence[0].get("LUTDescriptor", None),
        sequence[0].get("LUTData", None),
    ):
        return "lut"
    if None not in (ds.get("WindowCenter", None), ds.get("WindowWidth", None)):
        return "window"
    return None


def _gray(arr: np.ndarray, ds: Any, invert: bool) -> np.ndarray:
    """Steps 2-5 of read_pixels for a grayscale image."""
    import numpy as np
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    try:
        low, high = _stored_range(ds)
        values = apply_modality_lut(arr, ds)
        kind = voi_kind(ds)
        if kind == "lut":
            if not np.issubdtype(values.dtype, np.integer):
                values = np.rint(values).astype(np.int64)
            values = apply_voi(values, ds, index=0)
            descriptor = ds.VOILUTSequence[0].LUTDescriptor
            entries, first = int(descriptor[0]) or 2**16, int(descriptor[1])
            table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds, index=0)
            lo, hi = float(table.min()), float(table.max())
        elif kind == "window":
            values = apply_windowing(values, ds, index=0)
            ends = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
            lo, hi = float(ends.min()), float(ends.max())
        else:
            ends = apply_modality_lut(np.array([low, high], dtype=np.int64), ds)
            lo, hi = float(np.min(ends)), float(np.max(ends))
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged LUT or window is the file's problem
        # Only the kind: a converted value's error may quote header bytes.
        raise UnusableDicom(
            f"its Modality LUT, VOI LUT or window cannot be applied ({type(err).__name__})"
        ) from None
    gray = _to_uint8(values, lo, hi)
    return 255 - gray if invert else gray


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """round(255 * (v - lo) / (hi - lo)), clipped to 0..255, as uint8 (lo..hi: read_pixels)."""
    import numpy as np

    if values.dtype == np.uint8 and (lo, hi) == (0, 255):
        return np.ascontiguousarray(values)
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
