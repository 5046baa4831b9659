"""Hostile and mistaken inputs, replayed: one sentence and a non-zero exit, or the right result.

Split files (one class, one image, rows outside the data folder or through a symlink),
eval.split_file rows outside the checkpoint's training data, manifests whose folder links
elsewhere, NaN and infinity in any float setting, JSON artefacts that a strict parser must read,
predict with nothing usable, and the messages that must name the right key. Config mistakes are
checked through check_config (before any image is read); a few go through the command line to
see exit code 1 and no traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_task, compose_train, eval_config, phantom_overrides, run_cli
from data_builders import class_tree, write_bad, write_png
from datamodules import make_datamodule
from tb_lightning.config.checks import (
    check_config,
    check_eval_config,
    check_predict_config,
    check_preprocess,
    check_threshold_value,
)
from tb_lightning.core.atomic import atomic_write_json, finite_json
from tb_lightning.core.errors import ConfigError, DataError, UserError
from tb_lightning.data import integrity
from tb_lightning.data.sources import Sample, scan_manifest
from tb_lightning.data.split import read_split_sides, write_split_csv
from tb_lightning.evaluation.evaluate import split_samples
from tb_lightning.inference.predict_files import collect_inputs, run_prediction
from tb_lightning.stats.calibration import MIN_CALIBRATION_IMAGES
from tb_lightning.trained.checkpoint import load_checkpoint_file

# Only checkpoints loaded here, nothing trained: loads without the discarded init (conftest).
# Hostile inputs, ~20 s of CPU: with the slow tests (make test-slow, CI), not in make test.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quick_loads")]


def strict_json(text: str) -> object:
    """json.loads that refuses NaN, Infinity and -Infinity (Python's json accepts them; JSON,
    jq, JavaScript and Go do not)."""

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def phantom_samples(root: Path, label: int) -> list[Sample]:
    folder = root / ("Normal", "Tuberculosis")[label]
    return [Sample(str(p), label, p.stem, "phantom") for p in sorted(folder.glob("*.png"))]


def split_of(root: Path, val: tuple[int, int], test: tuple[int, int] = (0, 0)) -> dict:
    """train/val/test sides from the phantom set: (Normal, TB) counts for val and test, the rest
    of the images train."""
    normal, tb = phantom_samples(root, 0), phantom_samples(root, 1)
    sides = {
        "val": normal[: val[0]] + tb[: val[1]],
        "test": normal[val[0] : val[0] + test[0]] + tb[val[1] : val[1] + test[1]],
    }
    sides["train"] = normal[val[0] + test[0] :] + tb[val[1] + test[1] :]
    return sides


def write_split(path: Path, sides: dict) -> Path:
    write_split_csv(path, sides["train"], sides["val"], sides.get("test", ()))
    return path


def config_error(overrides: list[str]) -> str:
    """The sentence check_config refuses the overrides with (a ConfigError, or a DataError for
    a split file's rows)."""
    cfg = compose_train(overrides)
    with pytest.raises(UserError) as err:
        check_config(cfg)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- split files: classes and sizes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "val, test, side, counts",
    [
        ((6, 0), (0, 0), "val", "6 image(s) (6 Normal, 0 Tuberculosis)"),  # one-class val
        ((0, 1), (0, 0), "val", "1 image(s) (0 Normal, 1 Tuberculosis)"),  # one-image val
        ((4, 2), (3, 0), "test", "3 image(s) (3 Normal, 0 Tuberculosis)"),  # one-class test
    ],
)
def test_split_file_with_a_one_class_split_is_refused_up_front(
    phantom_root, tmp_path, val, test, side, counts
):
    split = write_split(tmp_path / "split.csv", split_of(phantom_root, val, test))
    message = config_error([*phantom_overrides(phantom_root), f"data.split_file={split}"])
    assert message.startswith(f"data.split_file={split}: its {side} split has {counts}, but ")
    assert "add rows of the missing class to that split" in message
    assert "data.split_file=null" in message


def test_split_file_with_a_one_class_train_split_is_refused(phantom_root, tmp_path):
    sides = split_of(phantom_root, (4, 2))
    sides["val"] += [s for s in sides["train"] if s.label == 1]
    sides["train"] = [s for s in sides["train"] if s.label == 0]
    split = write_split(tmp_path / "split.csv", sides)
    message = config_error([*phantom_overrides(phantom_root), f"data.split_file={split}"])
    assert "its train split has 20 image(s) (20 Normal, 0 Tuberculosis)" in message


def test_split_file_of_one_image_per_class_is_enough(phantom_root, tmp_path):
    """The least the rest of the code needs: each split with an image of each class."""
    split = write_split(tmp_path / "split.csv", split_of(phantom_root, (1, 1), (1, 1)))
    check_config(compose_train([*phantom_overrides(phantom_root), f"data.split_file={split}"]))


def test_split_file_too_small_to_calibrate_on_is_refused_up_front(phantom_root, tmp_path):
    """The same sentence as engine/training.py refuse_calibration_split, before training."""
    split = write_split(tmp_path / "split.csv", split_of(phantom_root, (2, 2)))
    message = config_error(
        [*phantom_overrides(phantom_root), f"data.split_file={split}", "calibration=temperature"]
    )
    assert message.startswith(
        f"calibration=temperature needs at least {MIN_CALIBRATION_IMAGES} validation images"
    )
    assert f"(data.split_file={split}): give it more val rows" in message


def test_one_class_val_split_through_the_command_line(phantom_root, tmp_path):
    """The attack as a user meets it: exit 1, one sentence, no traceback, nothing trained."""
    split = write_split(tmp_path / "split.csv", split_of(phantom_root, (6, 0)))
    run_dir = tmp_path / "run"
    result = run_cli(
        "tb_lightning.train",
        *phantom_overrides(phantom_root),
        f"data.split_file={split}",
        f"hydra.run.dir={run_dir}",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert f"data.split_file={split}: its val split has 6 image(s)" in output
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "split.csv").exists()


# --- split files: rows outside the data folder ----------------------------------------------------


def test_split_file_row_outside_data_root(phantom_root, tmp_path):
    stray = write_png(tmp_path / "elsewhere" / "stray.png", 7, size=64)
    sides = split_of(phantom_root, (4, 2))
    sides["train"].append(Sample(str(stray), 0, "stray", "phantom"))
    split = write_split(tmp_path / "split.csv", sides)
    overrides = [*phantom_overrides(phantom_root), f"data.split_file={split}"]
    message = config_error(overrides)
    line = 2 + len(sides["train"]) - 1  # the header, then the train rows: the stray is last
    assert message.startswith(
        f"data.split_file={split} line {line} lists '{stray}' (train row), which is outside "
        f"data.root {phantom_root.resolve()} (symlinks followed: {stray.resolve()})"
    )
    assert message.endswith(
        "pass data.root=<the folder that holds the images>, remove the row, or set "
        "data.allow_outside_paths=true if the file is trusted."
    )
    # Trusted: the key lets the row in.
    check_config(compose_train([*overrides, "data.allow_outside_paths=true"]))


def test_split_file_row_through_a_symlink_out_of_data_root(tmp_path):
    """Spelled inside data.root, but a folder link there leads out: outside, resolved."""
    root = class_tree(tmp_path / "root", counts=(3, 3))
    write_png(tmp_path / "outside" / "secret.png", 99)
    (root / "Normal" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    sides = {
        "train": [Sample(str(root / "Normal" / "linked" / "secret.png"), 0, "s", "folder")],
        "val": [],
    }
    for label, name in enumerate(("Normal", "Tuberculosis")):
        sides["train"].append(Sample(str(root / name / f"{name}-0.png"), label, "a", "folder"))
        sides["val"] += [
            Sample(str(root / name / f"{name}-{i}.png"), label, str(i), "folder") for i in (1, 2)
        ]
    split = write_split(tmp_path / "split.csv", sides)
    overrides = ["data=folder", f"data.root={root}", "data.image_size=64"]
    message = config_error([*overrides, f"data.split_file={split}"])
    assert "line 2 lists" in message and "linked/secret.png" in message
    assert f"(symlinks followed: {tmp_path / 'outside' / 'secret.png'})" in message


# --- eval.split_file ------------------------------------------------------------------------------


def test_eval_split_file_row_outside_the_training_data(trained_run, phantom_root, tmp_path):
    stray = write_png(tmp_path / "elsewhere" / "stray.png", 11, size=64)
    sides = read_split_sides(trained_run / "split.csv")
    sides["val"].append(Sample(str(stray), 1, "stray", "phantom"))
    split = write_split(tmp_path / "split.csv", sides)
    with pytest.raises(DataError) as err:
        split_samples(trained_run, split, "val")
    message = str(err.value)
    assert message.startswith(f"eval.split_file={split} line ")
    assert f"lists '{stray}' (val row), which is outside the checkpoint's training data " in message
    assert str(phantom_root.resolve()) in message
    assert message.endswith(
        "evaluate images of that folder, remove the row, or set eval.allow_outside_paths=true "
        "if the file is trusted."
    )
    samples, _ = split_samples(trained_run, split, "val", allow_outside_paths=True)
    assert samples[-1].path == str(stray)
    # The run's own split.csv needs no check: the run wrote it.
    own, _ = split_samples(trained_run, None, "val")
    assert len(own) == len(sides["val"]) - 1


def test_eval_split_file_of_a_run_that_records_no_data_folder(trained_run, tmp_path):
    """Without data_report.json the run's .hydra/config.yaml says where it read; without
    either the rows cannot be checked, and only eval.allow_outside_paths lets them in."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.csv").write_bytes((trained_run / "split.csv").read_bytes())
    split = run / "split.csv"
    with pytest.raises(DataError) as err:
        split_samples(run, split, "val")
    assert str(err.value).startswith(f"The checkpoint's run {run} records no data folder")
    assert str(err.value).endswith("set eval.allow_outside_paths=true if the file is trusted.")
    assert split_samples(run, split, "val", allow_outside_paths=True)[0]
    report = json.loads((trained_run / "data_report.json").read_text())
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        OmegaConf.to_yaml({"data": report["settings"]["sources"][0]})
    )
    assert split_samples(run, split, "val")[0]


def test_eval_split_file_without_train_rows_names_eval_split_file(trained_run, tmp_path):
    sides = read_split_sides(trained_run / "split.csv")
    split = write_split(tmp_path / "split.csv", {**sides, "train": []})
    with pytest.raises(DataError) as err:
        split_samples(trained_run, split, "val")
    assert str(err.value) == f"eval.split_file={split} has no 'train' rows; regenerate it."


def test_eval_allow_outside_paths_must_be_a_bool(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    config = eval_config(ckpt, tmp_path / "out", "eval.allow_outside_paths=maybe")
    with pytest.raises(ConfigError, match="eval.allow_outside_paths='maybe' must be true or"):
        check_eval_config(config)


# --- manifests ------------------------------------------------------------------------------------


def manifest_with_linked_folder(tmp_path: Path) -> Path:
    """lists/list.csv whose rows go through lists/linked -> store (a folder outside lists/)."""
    class_tree(tmp_path / "store", counts=(3, 3))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "linked").symlink_to(tmp_path / "store", target_is_directory=True)
    rows = ["path,label"] + [
        f"linked/{name}/{name}-{i}.png,{name}"
        for name in ("Normal", "Tuberculosis")
        for i in (0, 1, 2)
    ]
    manifest = tmp_path / "lists" / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_manifest_folder_with_a_symlink_out_of_it(tmp_path):
    manifest = manifest_with_linked_folder(tmp_path)
    with pytest.raises(DataError) as err:
        scan_manifest(manifest)
    message = str(err.value)
    assert message.startswith(
        f"Manifest {manifest} line 2 lists 'linked/Normal/Normal-0.png', which is outside the "
        f"manifest's folder {tmp_path / 'lists'} (symlinks followed: "
        f"{tmp_path / 'store' / 'Normal' / 'Normal-0.png'})"
    )
    assert message.endswith("set data.allow_outside_paths=true.")
    # The legitimate setup (a folder of links into a data store) through the key.
    assert len(scan_manifest(manifest, allow_outside_paths=True)) == 6


def test_manifest_file_symlink_out_of_its_folder(tmp_path):
    class_tree(tmp_path / "lists" / "img", counts=(1, 1))
    secret = write_png(tmp_path / "secret.png", 5)
    (tmp_path / "lists" / "img" / "x.png").symlink_to(secret)
    manifest = tmp_path / "lists" / "list.csv"
    manifest.write_text("path,label\nimg/Normal/Normal-0.png,0\nimg/x.png,1\n")
    with pytest.raises(DataError, match="line 3 lists 'img/x.png', which is outside"):
        scan_manifest(manifest)


def test_manifest_reached_through_a_linked_folder_stays_inside(tmp_path):
    """Links are followed on both sides: the manifest's own folder spelled through a link is
    still its folder."""
    class_tree(tmp_path / "real" / "img", counts=(1, 1))
    (tmp_path / "real" / "list.csv").write_text(
        "path,label\nimg/Normal/Normal-0.png,0\nimg/Tuberculosis/Tuberculosis-0.png,1\n"
    )
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert [s.label for s in scan_manifest(tmp_path / "alias" / "list.csv")] == [0, 1]


# --- NaN and infinity in float settings -----------------------------------------------------------


FLOAT_KEYS = [
    "model.optimizer.lr",
    "model.optimizer.weight_decay",
    "model.optimizer.backbone_lr_scale",
    "model.net.dropout",
    "model.threshold",
    "data.clahe.clip_limit",
    "data.val_size",
    "data.test_size",
    "threshold.target",
    "data.augment.rotation_degrees",
    "data.augment.crop_scale",
    "trainer.gradient_clip_val",
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_float_settings_are_refused(phantom_root, key, value):
    overrides = [*phantom_overrides(phantom_root), "data.preprocess=clahe", "data/augment=cxr"]
    if key == "data.augment.crop_scale":
        overrides.append(f"{key}=[{value},1.0]")
        name = f"{key}[0]"
    else:
        overrides.append(f"{'+' if key == 'trainer.gradient_clip_val' else ''}{key}={value}")
        name = key
    message = config_error(overrides)
    assert message == (
        f"{name}={float(value)} is not a finite number; set {name} to a finite value (NaN and "
        "infinity are never a setting here)."
    )


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_each_float_check_refuses_non_finite_values_itself(value):
    """Without the whole-config sweep too: a caller of one check gets the same refusal."""
    with pytest.raises(ConfigError, match="data.clahe.clip_limit=.* must be a number > 0"):
        check_preprocess(
            {
                "preprocess": "clahe",
                "image_size": 64,
                "clahe": {"clip_limit": value, "tile_grid": 8},
            }
        )
    with pytest.raises(ConfigError, match="threshold.value=.* must be a number in"):
        check_threshold_value(value)


def test_non_finite_threshold_value_in_predict_and_eval(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    with pytest.raises(ConfigError, match=r"^threshold.value=nan is not a finite number"):
        check_eval_config(eval_config(ckpt, tmp_path / "out", "threshold.value=nan"))
    cfg = OmegaConf.create(
        {"ckpt_path": str(ckpt), "input": str(tmp_path), "batch_size": 4, "num_workers": 0}
    )
    cfg.threshold = {"value": math.inf}
    cfg.trainer = {"accelerator": "cpu"}
    with pytest.raises(ConfigError, match=r"^threshold.value=inf is not a finite number"):
        check_predict_config(cfg)


# --- JSON artefacts: strict -----------------------------------------------------------------------


def test_every_json_artefact_of_a_run_is_strict_json(trained_run, phantom_root):
    """metrics.json, data_report.json, the phantom set's settings and the scan cache."""
    files = sorted(trained_run.rglob("*.json"))
    assert {"metrics.json", "data_report.json"} <= {p.name for p in files}
    files += sorted(phantom_root.glob("*.json"))
    cache = integrity.cache_file_for(phantom_root.parent / "scan_cache", [str(phantom_root)])
    files += [cache] if cache.is_file() else []
    for path in files:
        strict_json(path.read_text())


def test_non_finite_floats_are_written_as_null(tmp_path):
    value = {"a": math.nan, "b": [1.5, math.inf, (2, -math.inf)], "c": {"d": math.nan}, "e": 3}
    atomic_write_json(tmp_path / "x.json", value)
    assert strict_json((tmp_path / "x.json").read_text()) == {
        "a": None,
        "b": [1.5, None, [2, None]],
        "c": {"d": None},
        "e": 3,
    }
    assert finite_json(math.nan) is None and finite_json(0.25) == 0.25


def test_data_report_with_a_nan_setting_is_strict_json(phantom_root, tmp_path):
    """A NaN that reaches an artefact (here: a data module built without the config checks,
    with clip_limit=nan) is written as null, never as a bare NaN token."""
    dm = make_datamodule(
        source="phantom",
        root=str(phantom_root),
        image_size=64,
        val_size=12,
        num_workers=0,
        phantom={"num_normal": 24, "num_tb": 12, "image_size": 64},
        preprocess="clahe",
        clahe={"clip_limit": math.nan, "tile_grid": 8},
        scan_cache_dir=str(tmp_path / "scan"),
    )
    dm.setup()
    dm.write_data_report(tmp_path / "data_report.json")
    report = strict_json((tmp_path / "data_report.json").read_text())
    assert report["settings"]["preprocess"]["clip_limit"] is None
    for path in (tmp_path / "scan").glob("*.json"):
        strict_json(path.read_text())


# --- predict with nothing usable ------------------------------------------------------------------


def test_predict_where_every_input_is_bad(trained_run, tmp_path):
    inputs = tmp_path / "in"
    for kind in ("not_an_image", "zero_byte", "truncated_png"):
        write_bad(inputs, kind)
    loaded = load_checkpoint_file(trained_run / "checkpoints" / "best.ckpt")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        run_prediction(loaded, collect_inputs(inputs), 0.5, "test", out)
    assert str(err.value) == (
        f"No image could be predicted: all 3 input(s) are bad files, each listed with the "
        f"reason in {out / 'skipped.csv'}; fix or replace them, or pass input=<other images>."
    )
    assert len((out / "skipped.csv").read_text().splitlines()) == 4  # header + 3: nothing lost


def test_predict_where_every_input_is_bad_exits_1(trained_run, tmp_path, caplog, capsys):
    """predict's task as its entry point runs it (run_task, in-process: the command line's
    start-up adds nothing here): exit code 1, the sentence, no traceback."""
    from tb_lightning.core.tasks import run_task
    from tb_lightning.predict import predict

    inputs = tmp_path / "in"
    write_bad(inputs, "not_an_image")
    out = tmp_path / "out"
    cfg = compose_task(
        "predict",
        [
            f"ckpt_path={trained_run / 'checkpoints' / 'best.ckpt'}",
            f"input={inputs}",
            "trainer.accelerator=cpu",
            f"paths.output_dir={out}",
        ],
    )
    with pytest.raises(SystemExit) as stop:
        run_task(predict, cfg)
    assert stop.value.code == 1
    output = caplog.text + "".join(capsys.readouterr())
    assert "Traceback" not in output
    assert f"all 1 input(s) are bad files, each listed with the reason in {out}" in output


# --- messages that name the right key -------------------------------------------------------------


def test_fractional_image_size_must_be_an_integer(phantom_root):
    message = config_error([*phantom_overrides(phantom_root), "data.image_size=64.5"])
    assert message == "data.image_size=64.5 must be an integer (pixels a side), e.g. 512."
