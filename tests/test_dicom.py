"""DICOM input (data/dicom.py): which files are DICOM, the viewer's pixel pipeline against the PNG
each file was built from, refusals with one sentence, flags, patient grouping and privacy, through
load_image, the scan, the DataModule, `python -m tb_lightning.train` and `...predict`.

The DICOM files are built here with pydicom from the shared PNGs (../shared/data/nlm-tb-128;
those tests skip without it) and from small synthetic images; refusals use pydicom's bundled
test files.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PROJECT_ROOT, TEST_DATA_DIR, run_cli
from data_builders import pixels
from datamodules import make_datamodule
from tb_lightning.core import extras
from tb_lightning.core.errors import ConfigError
from tb_lightning.data import integrity
from tb_lightning.data.dicom import patient_key
from tb_lightning.data.sources import Sample, image_files, scan_class_folders
from tb_lightning.data.transforms import BadImageError, check_image_file, load_image
from tb_lightning.inference.predict_files import collect_inputs

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_encoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    MPEG4HP41,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

NLM_PNGS = PROJECT_ROOT.parent / "shared" / "data" / "nlm-tb-128"
# What no output, log or error may ever hold (each file below carries them).
IDENTIFYING = {
    "PatientName": "Doe^Jane",
    "PatientID": "SECRET123",
    "StudyDate": "20200101",
    "PatientBirthDate": "19700101",
    "InstitutionName": "St Elsewhere",
    "AccessionNumber": "ACC998877",
}
# Whole values only: a 3-byte word like "Doe" turns up by chance in a checkpoint's weights.
SECRETS = [value.encode() for value in (*IDENTIFYING.values(), "Elsewhere")]


def dicom_of(
    stored: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    identifying: dict[str, str] | None = None,
    **elements: object,
) -> Dataset:
    """A single-frame DX dataset holding `stored` (H, W) or (H, W, 3) as its stored values, with
    the identifying elements (IDENTIFYING unless given) and `elements` over them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    for keyword, value in (IDENTIFYING if identifying is None else identifying).items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 3 if stored.ndim == 3 else 1
    if stored.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(np.uint8 if bits_stored <= 8 else np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def gray_of(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png).convert("L"))


@pytest.fixture(scope="module")
def synthetic_png(tmp_path_factory) -> Path:
    """A 96 px 8-bit grayscale PNG (data_builders.pixels): the tests that need no real image."""
    path = tmp_path_factory.mktemp("synthetic") / "synthetic.png"
    Image.fromarray(pixels(7)).save(path)
    return path


@pytest.fixture(scope="module", params=["synthetic", "nlm"])
def png(request, synthetic_png) -> Path:
    """A grayscale PNG: the synthetic one, and one real NLM radiograph (skipped without it)."""
    if request.param == "synthetic":
        return synthetic_png
    if not NLM_PNGS.is_dir():
        pytest.skip(f"real images not found at {NLM_PNGS}")
    return sorted((NLM_PNGS / "Tuberculosis").glob("*.png"))[0]


def test_dicom_files_are_found_by_extension_and_by_content(tmp_path):
    """.dcm in any case and extension-less (or UID-named) files with the DICM preamble are
    images, in class folders and predict inputs; other extension-less files and DICOMDIR not."""
    ds = dicom_of(pixels(1, 64))
    folder = tmp_path / "Normal"
    save(ds, folder / "a.dcm")
    save(ds, folder / "b.DCM")
    save(ds, folder / "IM0001")  # no extension: found by its preamble
    save(ds, folder / "1.2.826.0.1.3680043.8.498.1")  # UID-named: an all-digit "extension"
    save(ds, folder / "DICOMDIR")  # the index of a medium, never an image
    (folder / "README").write_text("notes, not an image\n")
    (folder / "scan.dat").write_bytes(b"\0" * 128 + b"DICM")  # another extension: not opened
    save(ds, folder / ".hidden.dcm")
    save(dicom_of(pixels(2, 64)), tmp_path / "Tuberculosis" / "c.dcm")
    found = sorted(p.name for p in image_files(folder))
    assert found == ["1.2.826.0.1.3680043.8.498.1", "IM0001", "a.dcm", "b.DCM"]
    samples = scan_class_folders(tmp_path, ("Normal", "Tuberculosis"))
    assert len(samples) == 5 and sum(s.label for s in samples) == 1
    assert sorted(Path(p).name for p in collect_inputs(folder)) == found
    for name in found:
        assert check_image_file(folder / name)["format"] == "DICOM"


def test_monochrome2_8bit_is_the_png_pixel_for_pixel(png, tmp_path):
    """No rescale, no VOI, 8 bits: the stored values are the pixels (identity), so load_image
    and the scan's perceptual hash match the PNG's."""
    dcm = save(dicom_of(gray_of(png)), tmp_path / "image.dcm")
    assert torch.equal(load_image(dcm), load_image(png))
    ours, theirs = integrity.inspect_file(str(dcm)), integrity.inspect_file(str(png))
    assert ours["problem"] is None and ours["phash"] == theirs["phash"]
    assert (ours["format"], ours["mode"]) == ("DICOM", "MONOCHROME2")
    assert (ours["height"], ours["width"]) == gray_of(png).shape


def test_monochrome1_of_the_inverted_image_is_the_png(png, tmp_path):
    inverted = 255 - gray_of(png)
    dcm = save(dicom_of(inverted, "MONOCHROME1"), tmp_path / "mono1.dcm")
    assert torch.equal(load_image(dcm), load_image(png))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_windowed_12bit_is_the_png_within_one_grey_level(png, photometric, tmp_path):
    """12-bit values 1024 + 8 p (p the PNG's pixel; inverted for MONOCHROME1) with the window
    that spans them exactly: the 8-bit image is the PNG again, within rounding. Read as plain
    12-bit data without the window it would be (1024 + 8 p) / 16, far from it."""
    gray = gray_of(png).astype(np.int64)
    values = 1024 + 8 * (255 - gray if photometric == "MONOCHROME1" else gray)
    # LINEAR: center - 0.5 - (width - 1) / 2 = 1024, (width - 1) = 8 * 255.
    ds = dicom_of(values, photometric, 12, WindowCenter=[2044.5, 100], WindowWidth=[2041, 50])
    decoded = load_image(save(ds, tmp_path / "windowed.dcm"))
    difference = (decoded.int() - load_image(png).int()).abs()
    assert int(difference.max()) <= 1  # the first window of two is the one applied
    assert torch.equal(decoded[0], decoded[2])


def test_12bit_without_voi_spans_bits_stored_not_bits_allocated(png, tmp_path):
    """12 of 16 bits, no window: 0..4095 is mapped to 0..255 (not 0..65535, which would make
    the image black), and junk in the 4 unused high bits is ignored, as BitsStored says."""
    values = 16 * gray_of(png).astype(np.int64) | 0xA000  # 0..4080, plus unused high bits
    decoded = load_image(save(dicom_of(values, bits_stored=12), tmp_path / "12bit.dcm"))
    assert int((decoded.int() - load_image(png).int()).abs().max()) <= 1


def test_voi_lut_sequence_is_applied_before_a_window(png, tmp_path):
    """The VOI LUT (first item) wins over WindowCenter/Width, as pydicom's apply_voi_lut
    chooses; its entries' range (0..4080 here) is mapped to 0..255."""
    gray = gray_of(png).astype(np.int64)
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [8 * 255 + 1, 100, 16])  # entries, first input, bits
    item.add_new("LUTData", "US", [2 * i for i in range(8 * 255 + 1)])  # v -> 2 (v - 100)
    ds = dicom_of(100 + 8 * gray, "MONOCHROME2", 12, WindowCenter=40, WindowWidth=80)
    ds.VOILUTSequence = [item]
    assert torch.equal(load_image(save(ds, tmp_path / "lut.dcm")), load_image(png))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_lossless_is_the_png(png, syntax, tmp_path):
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no {syntax.name} encoder installed")
    ds = dicom_of(gray_of(png))
    ds.compress(syntax)
    assert torch.equal(load_image(save(ds, tmp_path / "compressed.dcm")), load_image(png))


def test_rgb_dicom_reads_like_the_rgb_png(tmp_path):
    rgb = np.stack([pixels(3, 64), pixels(4, 64), pixels(5, 64)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    dcm = save(dicom_of(rgb, "RGB"), tmp_path / "rgb.dcm")
    assert torch.equal(load_image(dcm), load_image(tmp_path / "rgb.png"))
    ybr = load_image(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.shape == (3, 100, 100) and ybr.dtype == torch.uint8


def test_other_modalities_and_views_are_read_and_flagged(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    info = check_image_file(ct)
    assert (info["problem"], info["modality"], info["flags"]) == (None, "CT", ["modality"])
    assert load_image(ct).shape == (3, 128, 128)
    lateral = save(dicom_of(pixels(1, 64), ViewPosition="LL"), tmp_path / "lateral.dcm")
    assert check_image_file(lateral)["flags"] == ["view_position"]
    unknown = save(dicom_of(pixels(1, 64), ViewPosition=""), tmp_path / "unknown.dcm")
    assert check_image_file(unknown)["flags"] == []


def problem_of(path: Path | str) -> str:
    with pytest.raises(BadImageError) as caught:
        load_image(path)
    assert caught.value.problem == check_image_file(path)["problem"]  # the header check's
    return str(caught.value)


def test_refusals_each_say_what_to_do(tmp_path):
    """Multi-frame, non-image objects, no decoder, and side limits (from Rows/Columns, before
    any pixel is decoded: these files hold too few pixel bytes to decode at all)."""
    message = problem_of(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert "multi-frame DICOM image (2 frames)" in message and "single-frame" in message
    message = problem_of(get_testdata_file("test-SR.dcm"))
    assert "not an image" in message and "Comprehensive SR Storage" in message
    video = dicom_of(pixels(1, 64))
    video.file_meta.TransferSyntaxUID = MPEG4HP41
    video.PixelData = encapsulate([b"\0" * 64])
    message = problem_of(save(video, tmp_path / "video.dcm"))
    assert "MPEG-4 AVC/H.264" in message and "which pydicom cannot decode" in message
    for rows, columns, words in ((32, 64, "tiny image (64x32 px"), (9000, 64, "huge image")):
        header_only = dicom_of(pixels(1, 64), Rows=rows, Columns=columns)
        assert words in problem_of(save(header_only, tmp_path / f"{rows}.dcm"))
    truncated = dicom_of(pixels(1, 64))
    truncated.PixelData = truncated.PixelData[:100]
    path = save(truncated, tmp_path / "truncated.dcm")
    assert check_image_file(path)["problem"] is None  # the header is fine
    with pytest.raises(BadImageError, match="pixel data cannot be decoded"):
        load_image(path)
    assert "pixel data cannot be decoded" in integrity.inspect_file(str(path))["problem"]


def test_missing_decoder_names_the_packages(tmp_path):
    """JPEG-LS without pylibjpeg (blocked in a fresh interpreter): one sentence naming the
    transfer syntax, what pydicom needs and the pip command."""
    code = (
        "import sys\n"
        "for name in ('pylibjpeg', 'openjpeg', 'libjpeg', 'rle'): sys.modules[name] = None\n"
        "from pydicom.data import get_testdata_file\n"
        "from tb_lightning.data.dicom import check_header\n"
        "print(check_header(get_testdata_file('MR_small_jpeg_ls_lossless.dcm'))['problem'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    problem = result.stdout.strip()
    assert problem.startswith("its pixel data is compressed as JPEG-LS Lossless"), problem
    assert "pylibjpeg-libjpeg" in problem and "pip install -e '.[dicom]'" in problem


def test_missing_pydicom_is_one_sentence_with_the_pip_command(monkeypatch, tmp_path):
    path = save(dicom_of(pixels(1, 64)), tmp_path / "a.dcm")
    monkeypatch.setitem(extras.EXTRAS, "dicom", ("no_such_module_for_this_test",))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[dicom\]'") as caught:
        load_image(path)
    assert str(path) in str(caught.value)
    Image.fromarray(pixels(1, 64)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").shape == (3, 64, 64)  # a PNG needs no pydicom


def dicom_tree(root: Path, per_class: int = 12, size: int = 64) -> dict[str, str]:
    """<root>/{Normal,Tuberculosis}/<i>.dcm, two studies (files) per patient, each patient's
    PatientID SECRET123-<label><n> (never to be seen in clear); returns {path: PatientID}."""
    ids = {}
    for label, name in enumerate(("Normal", "Tuberculosis")):
        for i in range(per_class):
            patient = f"SECRET123-{label}{i // 2:02d}"
            ds = dicom_of(
                pixels(100 * label + i, size), identifying={**IDENTIFYING, "PatientID": patient}
            )
            path = save(ds, root / name / f"{name}-{i:02d}.dcm")
            ids[str(path.resolve())] = patient
    return ids


def test_patients_from_the_header_stay_on_one_side_and_survive_the_cache(tmp_path):
    root = tmp_path / "data"
    ids = dicom_tree(root)
    save(dicom_of(pixels(999, 64), Modality="CT"), root / "Normal" / "ct.dcm")
    sides = []
    for attempt in range(2):  # the second from the scan cache alone
        datamodule = make_datamodule(
            source="folder",
            root=str(root),
            image_size=64,
            val_size=8,
            num_workers=0,
            scan_cache_dir=str(tmp_path / "scan_cache"),
        )
        datamodule.setup()
        report = datamodule.report
        assert report["scan"]["from_cache"] == (0 if attempt == 0 else 25)
        side_of = {
            s.path: (name, s.patient_id)
            for name in ("train", "val")
            for s in getattr(datamodule, f"{name}_samples")
        }
        for path, patient in ids.items():
            name, key = side_of[path]
            assert key == patient_key(patient)
            twins = [p for p, other in ids.items() if other == patient]
            assert {side_of[t][0] for t in twins} == {name}  # two studies, one side
        sides.append(side_of)
        dicom = report["dicom"]
        assert dicom["images"] == 25 and dicom["modalities"] == {"DX": 24, "CT": 1}
        assert dicom["patient_from_header"] == 25 and report["patients"] == 13
        assert [f["flags"] for f in dicom["flagged"]] == [["modality"]]
    assert sides[0] == sides[1]
    datamodule.write_split(tmp_path / "split.csv")
    rows = list(csv.DictReader((tmp_path / "split.csv").open()))
    assert all(r["patient_id"].startswith("dicom-") for r in rows)


def test_a_patient_the_source_states_is_kept():
    """Only a file-name patient (class folders, a manifest without patient_id) is replaced."""
    infos = {"/d/CHNCXR_0001_0.dcm": {"patient": "dicom-1"}, "/d/x.dcm": {"patient": "dicom-2"}}
    samples = [
        Sample("/d/CHNCXR_0001_0.dcm", 0, "CHNCXR_0001", "CHNCXR"),
        Sample("/d/x.dcm", 1, "x", "folder"),
    ]
    assert [s.patient_id for s in integrity.with_header_patients(samples, infos)] == [
        "CHNCXR_0001",
        "dicom-2",
    ]


def assert_nothing_identifying(folders: list[Path], output: str) -> None:
    """No identifying value in any file under `folders` (text or binary) or in `output`."""
    checked = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                leaks = [s for s in SECRETS if s in data]
                assert not leaks, f"{path} holds {leaks}"
                checked += 1
    assert checked
    leaks = [s for s in SECRETS if s.decode() in output]
    assert not leaks, f"the output holds {leaks}"


def test_predict_gives_the_png_p_tb_flags_and_skips_and_leaks_nothing(
    trained_run, synthetic_png, tmp_path
):
    """One `python -m tb_lightning.predict` on PNGs and their DICOM copies (MONOCHROME2 8-bit
    and MONOCHROME1 inverted), a CT, a multi-frame file and an SR: the same p_tb for each PNG
    and its copies, modality/view_position columns, skipped.csv reasons, and no identifying
    value in any file it wrote or anything it printed."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    pngs = [synthetic_png]
    if NLM_PNGS.is_dir():
        pngs += sorted((NLM_PNGS / "Normal").glob("*.png"))[:2]
        pngs += sorted((NLM_PNGS / "Tuberculosis").glob("*.png"))[:2]
    for i, png in enumerate(pngs):
        shutil.copy(png, inputs / f"{i}.png")
        save(dicom_of(gray_of(png)), inputs / f"{i}-m2.dcm")
        save(dicom_of(255 - gray_of(png), "MONOCHROME1"), inputs / f"{i}-m1")  # no extension
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in IDENTIFYING.items():
        setattr(ct, keyword, value)
    save(ct, inputs / "ct.dcm")
    shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm"), inputs / "frames.dcm")
    shutil.copy(get_testdata_file("test-SR.dcm"), inputs / "report.dcm")
    out = tmp_path / "predict"
    result = run_cli(
        "tb_lightning.predict",
        f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
        f"input={inputs}",
        f"hydra.run.dir={out}",
        f"paths.data_dir={TEST_DATA_DIR}",
        warm=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    rows = {r["path"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    for i in range(len(pngs)):
        p_tb = {rows[name]["p_tb"] for name in (f"{i}.png", f"{i}-m2.dcm", f"{i}-m1")}
        assert len(p_tb) == 1, p_tb
        assert rows[f"{i}.png"]["modality"] == rows[f"{i}.png"]["view_position"] == ""
        assert (rows[f"{i}-m2.dcm"]["modality"], rows[f"{i}-m2.dcm"]["view_position"]) == (
            "DX",
            "PA",
        )
    assert rows["ct.dcm"]["modality"] == "CT"
    dicom_inputs = 2 * len(pngs) + 1  # the copies and the CT
    assert f"1 of {dicom_inputs} DICOM input(s) are not frontal chest radiographs" in output
    skipped = {r["path"]: r["reason"] for r in csv.DictReader((out / "skipped.csv").open())}
    assert set(skipped) == {"frames.dcm", "report.dcm"}
    assert "multi-frame" in skipped["frames.dcm"] and "not an image" in skipped["report.dcm"]
    assert_nothing_identifying([out], output)


def test_train_and_predict_on_dicom_leak_nothing_and_know_the_patients(tmp_path):
    """`python -m tb_lightning.train` on DICOM files carrying a name, an ID, dates and an
    institution, then predict with its checkpoint: no file under the run folders or the caches,
    and nothing printed, holds them; a new study of a train patient is `seen_by=patient`."""
    root = tmp_path / "data"
    ids = dicom_tree(root)
    run_dir, caches = tmp_path / "train", tmp_path / "caches"
    result = run_cli(
        "tb_lightning.train",
        "data=folder",
        f"data.root={root}",
        "data.image_size=64",
        "data.val_size=8",
        "data.batch_size=8",
        "data.num_workers=0",
        f"data.scan_cache_dir={caches / 'scan'}",
        f"data.cache_dir={caches / 'features'}",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={TEST_DATA_DIR}",
        "model.net.weights=null",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        f"hydra.run.dir={run_dir}",
        warm=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["dicom"]["patient_from_header"] == 24 and report["patients"] == 12
    split = list(csv.DictReader((run_dir / "split.csv").open()))
    train_patient = next(ids[r["path"]] for r in split if r["split"] == "train")
    new_study = save(
        dicom_of(pixels(4242, 64), identifying={**IDENTIFYING, "PatientID": train_patient}),
        tmp_path / "in" / "new_study.dcm",
    )
    out = tmp_path / "predict"
    result = run_cli(
        "tb_lightning.predict",
        f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
        f"input={new_study.parent}",
        f"hydra.run.dir={out}",
        f"paths.data_dir={TEST_DATA_DIR}",
        warm=True,
    )
    output += result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    (row,) = csv.DictReader((out / "predictions.csv").open())
    assert (row["seen_in_training"], row["seen_by"]) == ("train", "patient")
    assert_nothing_identifying([run_dir, out, caches, tmp_path / "outputs"], output)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, on the damaged files
def test_damaged_headers_and_pixels_are_refused_with_a_reason(tmp_path):
    """Random bytes changed in a valid file's header or pixels, or the file cut short: each
    variant decodes or is a BadImageError (load_image) or a `problem` (the scan), never
    another exception, and no reason quotes the identifying values."""
    good = save(dicom_of(pixels(1, 64)), tmp_path / "good.dcm").read_bytes()
    header_end = len(good) - 64 * 64  # mostly the header, where the parsing is
    rng = np.random.default_rng(0)
    path = tmp_path / "damaged.dcm"
    for _ in range(150):
        data = bytearray(good)
        for position in rng.integers(128, header_end + 16, size=int(rng.integers(1, 6))):
            data[position] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(132, len(data)))]
        path.write_bytes(bytes(data))
        try:
            load_image(path)
        except BadImageError as err:
            assert not [s for s in SECRETS if s.decode() in err.problem]
        info = integrity.inspect_file(str(path))
        assert info["problem"] is None or isinstance(info["problem"], str)
