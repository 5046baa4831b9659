"""Every source yields the same table (path, label, patient id, source)."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import compose_train
from data_builders import class_tree, nlm_tree, write_png
from datamodules import make_datamodule
from tb_lightning.core.errors import DataError
from tb_lightning.core.tasks import instantiate_config
from tb_lightning.data.datamodule import TBDataModule
from tb_lightning.data.sources import scan_class_map, scan_manifest, scan_nlm


def data_module(**kwargs) -> TBDataModule:
    return make_datamodule(**{"image_size": 64, "num_workers": 0, "val_size": 0.25, **kwargs})


def compose_data(overrides: list[str]) -> TBDataModule:
    return instantiate_config(compose_train(overrides).data)


@pytest.mark.parametrize("class_folders", [False, True])
def test_nlm_labels_sources_and_patients_from_names(tmp_path, class_folders):
    nlm_tree(tmp_path, class_folders=class_folders)
    (tmp_path / "README.txt").write_text("ignored")
    samples = scan_nlm(tmp_path)
    assert len(samples) == 19
    by_source = Counter((s.source, s.label) for s in samples)
    assert by_source == {("CHNCXR", 0): 6, ("CHNCXR", 1): 6, ("MCUCXR", 0): 4, ("MCUCXR", 1): 3}
    for s in samples:
        prefix, number, label = s.path.rsplit("/", 1)[1].removesuffix(".png").split("_")
        assert s.label == int(label) and s.patient_id == f"{prefix}_{number}"


def test_nlm_suffix_contradicting_folder_and_bad_names_are_refused(tmp_path):
    write_png(tmp_path / "Normal" / "CHNCXR_0001_1.png", 0)
    with pytest.raises(DataError, match=r"CHNCXR_0001_1\.png is in the folder 'Normal/'"):
        scan_nlm(tmp_path)
    (tmp_path / "Normal" / "CHNCXR_0001_1.png").unlink()
    write_png(tmp_path / "scan-17.png", 1)
    with pytest.raises(DataError, match=r"scan-17\.png does not follow the NLM naming"):
        scan_nlm(tmp_path)


def test_folder_class_map_merges_folders_and_ignores_the_rest(tmp_path):
    class_tree(tmp_path, names=("healthy", "tb_smear", "tb_culture", "unsure"), counts=(5, 2, 3, 4))
    samples = scan_class_map(
        tmp_path, {"healthy": "Normal", "tb_smear": "Tuberculosis", "tb_culture": "tb"}
    )
    assert Counter(s.label for s in samples) == {0: 5, 1: 5}
    assert not any("unsure" in s.path for s in samples)
    with pytest.raises(DataError, match="data.class_map.healthy"):
        scan_class_map(tmp_path, {"healthy": "sick?"})
    with pytest.raises(DataError, match="no folder 'nope/'"):
        scan_class_map(tmp_path, {"nope": 0})


def test_manifest_paths_labels_patients_and_sources(tmp_path):
    class_tree(tmp_path / "img", counts=(4, 4))
    rows = ["path,label,patient_id,source"]
    for i in range(4):
        rows.append(f"img/Normal/Normal-{i}.png,Normal,p{i // 2},siteA")
        rows.append(f"{tmp_path}/img/Tuberculosis/Tuberculosis-{i}.png,1,,")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    samples = scan_manifest(tmp_path / "list.csv")
    assert [s.label for s in samples] == [0, 1] * 4
    assert {s.source for s in samples if s.label == 0} == {"siteA"}
    assert {s.source for s in samples if s.label == 1} == {"manifest"}
    assert [s.patient_id for s in samples if s.label == 0] == ["p0", "p0", "p1", "p1"]
    assert all(s.patient_id.startswith("Tuberculosis-") for s in samples if s.label == 1)


@pytest.mark.parametrize(
    "content, message",
    [
        ("file,label\nimg/a.png,0\n", r"lacks the column\(s\) \['path'\]"),
        ("path,label\nimg/gone.png,0\n", r"line 2 lists .*gone\.png, which does not exist"),
        ("path,label\nimg/Normal/Normal-0.png,maybe\n", r"line 2: label 'maybe'"),
    ],
)
def test_manifest_mistakes_name_the_row(tmp_path, content, message):
    class_tree(tmp_path / "img", counts=(1, 1))
    (tmp_path / "list.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        scan_manifest(tmp_path / "list.csv")


@pytest.mark.parametrize("row", ["../secret/x.png", "{outside}/secret/x.png", "~/x.png"])
def test_manifest_paths_must_stay_inside_its_folder(tmp_path, row):
    write_png(tmp_path / "secret" / "x.png", 0)
    class_tree(tmp_path / "data" / "img", counts=(1, 1))
    manifest = tmp_path / "data" / "list.csv"
    row = row.format(outside=tmp_path)
    manifest.write_text(f"path,label\nimg/Normal/Normal-0.png,0\n{row},1\n")
    with pytest.raises(DataError, match="line 3 lists .*outside the manifest's folder") as err:
        scan_manifest(manifest)
    assert str(manifest) in str(err.value) and "data.allow_outside_paths=true" in str(err.value)
    if not row.startswith("~"):
        samples = scan_manifest(manifest, allow_outside_paths=True)
        assert samples[1].path == str(tmp_path / "secret" / "x.png")  # `..` folded away


def test_manifest_outside_paths_through_the_config(tmp_path):
    class_tree(tmp_path / "img", counts=(6, 6))
    (tmp_path / "lists").mkdir()
    rows = ["path,label"] + [
        f"../img/{name}/{name}-{i}.png,{name}"
        for name in ("Normal", "Tuberculosis")
        for i in range(6)
    ]
    (tmp_path / "lists" / "list.csv").write_text("\n".join(rows) + "\n")
    overrides = ["data=manifest", f"data.root={tmp_path / 'lists' / 'list.csv'}"]
    overrides += ["data.num_workers=0", "data.image_size=64", "data.scan_cache_dir=null"]
    overrides += ["data.val_size=0.25"]
    with pytest.raises(DataError, match="data.allow_outside_paths=true"):
        compose_data(overrides).setup()
    dm = compose_data([*overrides, "data.allow_outside_paths=true"])
    dm.setup()
    assert dm.report["images"] == 12


def test_manifest_with_a_utf8_byte_order_mark(tmp_path):
    class_tree(tmp_path / "img", counts=(1, 1))
    content = "path,label\nimg/Normal/Normal-0.png,0\nimg/Tuberculosis/Tuberculosis-0.png,TB\n"
    # Excel's "CSV UTF-8" starts the file with a BOM.
    (tmp_path / "list.csv").write_bytes(content.encode("utf-8-sig"))
    assert [s.label for s in scan_manifest(tmp_path / "list.csv")] == [0, 1]
    (tmp_path / "latin1.csv").write_bytes("path,label\nimg/é.png,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv is not UTF-8 text"):
        scan_manifest(tmp_path / "latin1.csv")


def test_manifest_duplicate_rows_are_refused(tmp_path):
    class_tree(tmp_path / "img", counts=(6, 1))
    rows = ["path,label"] + [f"img/Normal/Normal-{i}.png,0" for i in range(6)]
    rows += ["img/Tuberculosis/Tuberculosis-0.png,1", "img/Normal/Normal-0.png,0"]
    rows += ["./img/Normal/../Normal/Normal-1.png,1"]  # the same file, spelled otherwise
    rows += [f"{tmp_path}/img/Normal/Normal-{i}.png,0" for i in (2, 3, 4)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        scan_manifest(tmp_path / "list.csv")
    message = str(err.value)
    assert "lists the same image more than once" in message
    assert "line 9 repeats line 2" in message and "Normal-0.png" in message
    assert "line 10 repeats line 3" in message and "line 11 repeats line 4" in message
    assert "line 12" not in message and "2 more" in message  # the first few only
    assert "remove the repeated rows" in message


def test_manifest_through_the_config_keeps_patients_together(tmp_path):
    class_tree(tmp_path / "img", counts=(12, 12))
    rows = ["path,label,patient_id"]
    for name in ("Normal", "Tuberculosis"):
        rows += [f"img/{name}/{name}-{i}.png,{name},{name}{i // 3}" for i in range(12)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    dm = compose_data(
        ["data=manifest", f"data.root={tmp_path / 'list.csv'}", "data.val_size=0.25"]
        + ["data.num_workers=0", "data.image_size=64", "data.scan_cache_dir=null"]
    )
    dm.setup()
    train = {s.patient_id for s in dm.train_samples}
    val = {s.patient_id for s in dm.val_samples}
    assert not train & val and len(val) == 2  # 6 of 24 images = 2 patients of 3 images
    assert dm.class_counts("val") == [3, 3]


def test_several_sources_keep_their_source(tmp_path):
    nlm_tree(tmp_path / "nlm")
    class_tree(tmp_path / "kaggle", counts=(6, 4), seed0=500)
    class_tree(tmp_path / "other", names=("ok", "tb"), counts=(3, 3), seed0=700)
    dm = data_module(
        sources=[
            {"source": "nlm_tb", "root": str(tmp_path / "nlm")},
            {"source": "tb_cxr", "root": str(tmp_path / "kaggle")},
            {"source": "folder", "root": str(tmp_path / "other"), "class_map": {"ok": 0, "tb": 1}},
        ]
    )
    dm.setup()
    per_source = dm.report["counts"]["per_source"]
    assert per_source == {
        "CHNCXR": {"Normal": 6, "Tuberculosis": 6},
        "MCUCXR": {"Normal": 4, "Tuberculosis": 3},
        "folder": {"Normal": 3, "Tuberculosis": 3},
        "tb_cxr": {"Normal": 6, "Tuberculosis": 4},
    }
    assert dm.report["images"] == 35


def test_nlm_tb_128_through_data_nlm_tb_and_data_folder(shared_data):
    root = shared_data / "nlm-tb-128"
    common = [f"data.root={root}", "data.num_workers=0", "data.image_size=128"]
    nlm = compose_data(["data=nlm_tb", *common])
    nlm.setup()
    report = nlm.report
    assert report["images"] == 500 and report["patients"] == 500
    assert report["counts"]["per_source"] == {
        "CHNCXR": {"Normal": 205, "Tuberculosis": 212},
        "MCUCXR": {"Normal": 51, "Tuberculosis": 32},
    }
    assert report["duplicates"]["exact_groups"] == 0
    assert report["duplicates"]["near_pairs_across_split"] == 0  # one image per patient
    folder = compose_data(["data=folder", *common, "data.val_size=0.2"])
    folder.setup()
    assert folder.report["counts"]["total"] == {"Normal": 256, "Tuberculosis": 244}
    assert {s.path for s in folder.val_samples} == {s.path for s in nlm.val_samples}


def test_a_source_is_one_registry_entry(tmp_path, monkeypatch):
    """A new source is a scanner and its DATA_SOURCES entry: the config checks allow it (also in
    data.sources) and the data module scans it, with nothing else to change."""
    from tb_lightning.config.checks import check_data
    from tb_lightning.data import sources

    def scan_flat(request: sources.ScanRequest) -> list[sources.Sample]:
        # A flat folder where the file name says the class: tb-*.png are Tuberculosis.
        return [
            sources.Sample(str(p), int(p.name.startswith("tb-")), p.stem, request.row_source)
            for p in sources.image_files(request.root)
        ]

    record = sources.DataSource(scan_flat, "a flat folder, tb-*.png are Tuberculosis")
    monkeypatch.setitem(sources.DATA_SOURCES, "flat", record)
    for i in range(8):
        write_png(tmp_path / "flat" / f"{'tb' if i % 2 else 'ok'}-{i}.png", i)
    overrides = [f"data.root={tmp_path / 'flat'}", "data.val_size=0.25", "data.num_workers=0"]
    cfg = compose_train(["data=tb_cxr", "data.source=flat", *overrides, "data.image_size=64"])
    check_data(cfg.data)
    dm = instantiate_config(cfg.data)
    assert Counter((s.label, s.source) for s in dm.scan()) == {(0, "flat"): 4, (1, "flat"): 4}
    entry = {"source": "flat", "root": str(tmp_path / "flat"), "name": "mine"}
    check_data({**cfg.data, "sources": [entry]})
    multi = data_module(sources=[entry])
    assert {s.source for s in multi.scan()} == {"mine"}
