"""report.html: eval's one self-contained page (evaluation/report_html.py).

The session's `python -m tb_lightning.eval` of best.ckpt (conftest.evaluated_run) writes the page
checked here: no outside reference, every picture an embedded image, report.txt's and
metrics.json's numbers, the error gallery's order and counts as predictions.csv has them. In
process: eval.report_images=false, escaping of paths and names, the k-fold ensemble
(conftest.kfold_run), the config checks; and how headless Chromium renders the page, when it is
installed.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from conftest import TEST_DATA_DIR, eval_config
from tb_lightning.config import CONF_DIR
from tb_lightning.config.checks import check_eval_config
from tb_lightning.core.choices import GALLERY_SIZE
from tb_lightning.core.errors import ConfigError
from tb_lightning.core.extras import missing
from tb_lightning.data.sources import Sample
from tb_lightning.eval import evaluate
from tb_lightning.evaluation.evaluate import evaluate_samples
from tb_lightning.evaluation.report_html import select_gallery
from tb_lightning.stats.metrics import SCREENING
from tb_lightning.trained.checkpoint import load_checkpoint_file

# Only checkpoints loaded here, nothing trained: loads without the discarded init (conftest).
pytestmark = pytest.mark.usefixtures("quick_loads")

SECTIONS = ("model", "data", "screening", "per-source", "figures", "gallery")
FIGURES = ("roc_curve", "pr_curve", "calibration_curve", "p_tb_distribution", "confusion_matrix")
GROUPS = ("false_negatives", "false_positives", "borderline")
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "col", "area", "base"}


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Any] = dataclasses.field(default_factory=list)

    def iter(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def find(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Descendants with this tag (any when None) whose attributes hold these values (a
        class attribute holds a class among its words); `_` in a name is a `-`."""
        wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
        found = []
        for node in self.iter():
            if tag and node.tag != tag:
                continue
            ok = True
            for key, value in wanted.items():
                have = node.attrs.get(key)
                if key == "class":
                    ok = ok and have is not None and value in have.split()
                else:
                    ok = ok and have == value
            if ok:
                found.append(node)
        return found

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class Tree(HTMLParser):
    """The page as a tree of Nodes; `errors`: end tags that close nothing open, or tags never
    closed (a `<` left unescaped in a path would make one)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if self.stack[-1].tag == tag:
            self.stack.pop()
        else:
            self.errors.append(f"</{tag}> closes <{self.stack[-1].tag}>")

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(path: Path) -> Node:
    tree = Tree()
    tree.feed(path.read_text(encoding="utf-8"))
    tree.close()
    assert not tree.errors, tree.errors[:5]
    assert [n.tag for n in tree.stack] == ["#root"], "tags left open"
    return tree.root


def decoded(src: str) -> Image.Image:
    """The image of a data: URI (it must be one)."""
    match = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
    assert match, src[:60]
    try:
        payload = base64.b64decode(match.group(2), validate=True)
    except binascii.Error as err:  # pragma: no cover - the assertion says what went wrong
        raise AssertionError(f"not base64: {err}") from None
    image = Image.open(io.BytesIO(payload))
    image.load()
    return image


def assert_self_contained(path: Path) -> Node:
    """No script, no outside reference, every <img> an embedded image that decodes."""
    text = path.read_text(encoding="utf-8")
    page = parse(path)
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|file:)""", text, re.I)
    assert "url(" not in text and "@import" not in text  # CSS that would fetch something
    for img in page.find("img"):
        image = decoded(img.attrs["src"])
        assert image.width > 0 and image.height > 0
    return page


def section_of(page: Node, name: str) -> Node:
    (node,) = page.find("section", id=name)
    return node


def cards(page: Node, group: str) -> list[Node]:
    holders = page.find("div", data_group=group)
    return holders[0].find("div", **{"class": "case"}) if holders else []


def predictions(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "predictions.csv").open()))


def test_eval_writes_one_self_contained_page(evaluated_run, trained_run):
    out, printed = evaluated_run
    assert "report.html" in printed  # named among the files the run wrote
    page = assert_self_contained(out / "report.html")
    assert [s.attrs["id"] for s in page.find("section")] == list(SECTIONS)
    # The figures are eval's own PNGs, embedded byte for byte (not drawn again).
    for name in FIGURES:
        (figure,) = page.find("figure", id=f"figure-{name}")
        (img,) = figure.find("img")
        payload = base64.b64decode(img.attrs["src"].split(",", 1)[1])
        assert payload == (out / "figures" / f"{name}.png").read_bytes()
    text = (out / "report.html").read_text()
    # Nothing of this machine's folders: the checkpoint and split relative to the run.
    assert str(out) not in text and str(trained_run) not in text
    assert "SYNTHETIC DATA: these are phantom images" in text  # report.txt's banner


def test_the_page_shows_the_numbers_of_metrics_json_and_report_txt(evaluated_run):
    out, _ = evaluated_run
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.txt").read_text()
    page = parse(out / "report.html")
    summary = metrics["val"]["overall"]
    rows = {r.attrs["data-metric"]: r for r in page.find("tr") if "data-metric" in r.attrs}
    assert list(rows) == [m.key for m in SCREENING]
    for m in SCREENING:
        row = rows[m.key]
        assert json.loads(row.attrs["data-value"]) == summary[m.key], m.key
        ci = [json.loads(row.attrs["data-ci-low"]), json.loads(row.attrs["data-ci-high"])]
        assert ci == summary["ci"][m.key], m.key
        label, value, interval = (td.text() for td in row.find("td")[:3])
        assert label == m.label
        assert value == ("n/a" if summary[m.key] is None else f"{summary[m.key]:.3f}")
        # The same row as report.txt's table prints, rounded the same way.
        assert re.search(
            rf"^{re.escape(label)}\s+{re.escape(value)}\s+{re.escape(interval)}", report, re.M
        ), (m.key, value, interval)
    # The seed's figures (per-class precision/recall/F1, the loss): metrics.json's flat keys.
    keyed = [n for n in page.iter() if "data-key" in n.attrs]
    for cell in keyed:
        assert json.loads(cell.attrs["data-value"]) == metrics[cell.attrs["data-key"]]
    assert {"val/loss", "val/f1/Tuberculosis"} <= {n.attrs["data-key"] for n in keyed}
    (tn, fp), (fn, tp) = metrics["val/confusion_matrix"]
    (matrix,) = page.find("table", id="confusion")
    assert [td.text() for td in matrix.find("td")] == [
        f"{tn} (TN)", f"{fp} (FP)", f"{fn} (FN)", f"{tp} (TP)"
    ]  # fmt: skip
    # A model not shown to beat chance (its AUROC interval reaches down to 0.5) says so on top.
    chance = "NOT SHOWN TO BEAT CHANCE" in page.text()
    assert chance == (summary["ci"]["auroc"][0] <= 0.5)
    (who,) = page.find(id="who")
    assert json.loads(who.attrs["data-met"]) == summary["who_screening_minimum"]["met"]
    strict = summary["who_screening_minimum"]["met_by_lower_ci"]
    assert json.loads(who.attrs["data-met-by-lower-ci"]) == strict
    who_line = next(line for line in report.splitlines() if line.startswith("WHO screening"))
    assert who_line in who.text()
    # The threshold story: report.txt's header lines, label and text.
    model = {
        tr.find("th")[0].text(): tr.find("td")[0].text()
        for tr in section_of(page, "model").find("table", **{"class": "kv"})[0].find("tr")
    }
    assert model["Checkpoint"] == metrics["checkpoint"]
    assert model["Checkpoint epoch"].startswith(f"{metrics['epoch']} (counted from 0")
    assert f"Operating threshold: {model['Operating threshold']}\n" in report
    assert metrics["threshold"]["source"] in model["Operating threshold"]
    counts = summary["counts"]
    data = section_of(page, "data").text()
    assert (
        f"{summary['images']} ({counts['Normal']} Normal, {counts['Tuberculosis']} Tuberculosis)"
        in data
    )
    assert "the val rows of ../" in data and "split.csv" in data


def test_the_gallery_groups_are_ordered_and_counted_as_predictions_csv(evaluated_run):
    out, _ = evaluated_run
    page = parse(out / "report.html")
    rows = predictions(out)
    by_path = {r["path"]: r for r in rows}
    threshold = float(rows[0]["threshold"])
    totals = {
        "false_negatives": [r for r in rows if (r["label"], r["predicted_label"]) == ("1", "0")],
        "false_positives": [r for r in rows if (r["label"], r["predicted_label"]) == ("0", "1")],
        "borderline": rows,
    }
    for group in GROUPS:
        (heading,) = page.find("h3", id=group)
        total = len(totals[group])
        shown = min(total, GALLERY_SIZE)
        assert int(heading.attrs["data-total"]) == total, group
        assert int(heading.attrs["data-shown"]) == shown, group
        found = cards(page, group)
        assert len(found) == shown, group
        for card in found:  # each card is predictions.csv's row of its image
            row = by_path[card.attrs["data-path"]]
            assert card.attrs["data-p-tb"] == row["p_tb"]
            assert card.attrs["data-label"] == row["label"]
            assert card.attrs["data-called"] == row["predicted_label"]
            assert f"p_tb {row['p_tb']}" in card.text()
        p_tb = [float(c.attrs["data-p-tb"]) for c in found]
        everyone = [float(r["p_tb"]) for r in totals[group]]
        if group == "false_negatives":  # lowest p_tb first: the most confident misses
            assert p_tb == sorted(everyone)[:shown]
        elif group == "false_positives":  # highest first
            assert p_tb == sorted(everyone, reverse=True)[:shown]
        else:  # nearest the threshold first (p_tb as written: 6 decimals)
            distance = [abs(p - threshold) for p in p_tb]
            assert distance == sorted(distance)
            assert distance[-1] <= sorted(abs(p - threshold) for p in everyone)[shown - 1] + 1e-6
    # Pictures: a thumbnail per card, and its Grad-CAM overlay (the saliency extra is installed
    # here; without it the page says why there is none).
    gallery = section_of(page, "gallery")
    for card in gallery.find("div", **{"class": "case"}):
        pictures = card.find("img")
        assert len(pictures) == (1 if missing("saliency") else 2)
        assert all(max(decoded(img.attrs["src"]).size) <= 128 for img in pictures)
    if missing("saliency"):
        assert "'saliency' packages are not installed" in gallery.text()


def test_select_gallery_orders_and_caps_each_group():
    probs = np.array([0.9, 0.1, 0.45, 0.55, 0.2, 0.7, 0.5, 0.05, 0.3])
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 0, 0])
    chosen = select_gallery(probs, labels, 0.5, size=2)
    assert chosen["false_negatives"] == ([1, 4], 3)  # 0.1, 0.2 of 0.1, 0.45, 0.2
    assert chosen["false_positives"] == ([0, 5], 3)  # 0.9, 0.7 of 0.9, 0.55, 0.7
    assert chosen["borderline"] == ([6, 2], 9)  # 0.5 (distance 0), then 0.45 before 0.55
    assert select_gallery(probs, labels, 0.5, size=0)["borderline"] == ([], 9)


def test_report_images_false_leaves_every_image_out(trained_run, tmp_path):
    out = tmp_path / "eval"
    evaluate(
        eval_config(
            trained_run / "checkpoints" / "best.ckpt",
            out,
            "eval.report_images=false",
            "eval.report_gallery_size=3",
        )
    )
    page = assert_self_contained(out / "report.html")
    # The figures (numbers, no image of anyone) stay; no thumbnail, no Grad-CAM.
    assert len(page.find("img")) == len(FIGURES)
    assert all(not card.find("img") for card in section_of(page, "gallery").find("div"))
    assert "Images left out (eval.report_images=false)" in section_of(page, "gallery").text()
    found = cards(page, "borderline")
    assert len(found) == 3 and found[0].attrs["data-path"]  # named by path only
    (heading,) = page.find("h3", id="borderline")
    assert heading.attrs["data-total"] == str(len(predictions(out)))


def test_paths_names_and_sources_are_escaped(trained_run, phantom_root, tmp_path):
    """Image paths, sources, the checkpoint's folder and the threshold's source with <, &, "
    and ' are text in the page, never markup."""
    loaded = load_checkpoint_file(trained_run / "checkpoints" / "best.ckpt")
    odd = tmp_path / "data <&\"'>"
    samples = []
    for label, folder in enumerate(("Normal", "Tuberculosis")):
        (odd / folder).mkdir(parents=True)
        for i, src in enumerate(sorted((phantom_root / folder).glob("*.png"))[:4]):
            target = odd / folder / f"x<{i}>&y.png"
            shutil.copy(src, target)
            samples.append(Sample(str(target), label, None, "site<b>&co" if i % 2 else "plain"))
    moved = dataclasses.replace(
        loaded, checkpoint_path=tmp_path / "run <script>&" / "checkpoints" / "best.ckpt"
    )
    out = tmp_path / "out"
    evaluate_samples(
        moved, samples, 0.5, 'set by "hand" <here> & there', out, "all", n_bootstrap=20
    )
    page = assert_self_contained(out / "report.html")
    text = (out / "report.html").read_text()
    for raw in ("x<0>&y.png", "<here>", "site<b>&co", "<script>&", 'data <&"'):
        assert raw not in text, raw
    assert "x&lt;0&gt;&amp;y.png" in text and "site&lt;b&gt;&amp;co" in text
    # Parsed back, the same names (escaping loses nothing).
    paths = {card.attrs["data-path"] for card in page.find("div", **{"class": "case"})}
    assert {r["path"] for r in predictions(out)} == paths
    assert "Normal/x<0>&y.png" in paths
    sources = {tr.attrs["data-source"] for tr in page.find("tr") if "data-source" in tr.attrs}
    assert sources == {"plain", "site<b>&co"}
    assert 'set by "hand" <here> & there' in section_of(page, "model").text()
    assert "run <script>&" in section_of(page, "model").text()


def test_an_ensemble_gets_the_same_page_with_its_members(kfold_run, tmp_path):
    out = tmp_path / "eval"
    evaluate(eval_config(kfold_run, out, "eval.split=test", f"paths.data_dir={TEST_DATA_DIR}"))
    metrics = json.loads((out / "metrics.json").read_text())
    page = assert_self_contained(out / "report.html")
    assert [s.attrs["id"] for s in page.find("section")] == list(SECTIONS)
    (members,) = page.find("table", id="members")
    listed = [tr.find("td")[1].text() for tr in members.find("tbody")[0].find("tr")]
    assert listed == metrics["ensemble_members"] and len(listed) == 3
    epochs = [tr.find("td")[2].text() for tr in members.find("tbody")[0].find("tr")]
    assert epochs == [str(e) for e in metrics["ensemble_member_epochs"]]
    model = section_of(page, "model").text()
    assert "Ensemble" in model and "mean logit of 3 fold models" in model
    assert "out-of-fold predictions" in model  # where its threshold came from
    gallery = section_of(page, "gallery")
    assert "this model is an ensemble of 3 fold models" in gallery.text()
    assert all(len(c.find("img")) == 1 for c in gallery.find("div", **{"class": "case"}))
    rows = predictions(out)
    for group, pair in (("false_negatives", ("1", "0")), ("false_positives", ("0", "1"))):
        total = sum((r["label"], r["predicted_label"]) == pair for r in rows)
        assert page.find("h3", id=group)[0].attrs["data-total"] == str(total)


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.report_images=yes", "eval.report_images='yes' must be true"),
        ("eval.report_gallery_size=-1", "eval.report_gallery_size=-1 must be an integer from 0"),
        ("eval.report_gallery_size=101", "eval.report_gallery_size=101 must be an integer"),
        ("eval.report_gallery_size=2.5", "eval.report_gallery_size=2.5 must be an integer"),
    ],
)
def test_the_report_keys_are_checked(override, message, tmp_path):
    ckpt = tmp_path / "x.ckpt"
    ckpt.touch()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", override])
    with pytest.raises(ConfigError) as err:
        check_eval_config(cfg)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_headless_chromium_renders_the_page(evaluated_run, tmp_path):
    """What a person sees: the page as Chromium draws it (no network, no script needed)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium): no browser to render")
    out, _ = evaluated_run
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
            "--window-size=1200,3000", (out / "report.html").resolve().as_uri(),
        ],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    pixels = np.asarray(image, dtype=np.float64)
    inked = (pixels.min(axis=2) < 200).mean()  # text, tables, figures: not a blank page
    assert inked > 0.02 and pixels.std() > 10


def test_without_the_saliency_extra_the_gallery_says_so(trained_run, monkeypatch):
    """No captum: thumbnails alone, and the page says why there is no Grad-CAM map."""
    from tb_lightning.data.split import read_split_csv
    from tb_lightning.evaluation import report_html

    monkeypatch.setattr(report_html, "missing", lambda extra: ["captum"])
    loaded = load_checkpoint_file(trained_run / "checkpoints" / "best.ckpt")
    _, val = read_split_csv(trained_run / "split.csv")
    paths = [s.path for s in val][:4]
    gallery = report_html.build_gallery(
        loaded, paths, paths, ["phantom"] * 4, np.array([0, 1, 0, 1]),
        np.array([0.9, 0.1, 0.4, 0.6]), 0.5, None, "val", size=2,
    )  # fmt: skip
    assert not gallery.gradcam
    assert any("'saliency' packages are not installed (captum)" in n for n in gallery.notes)
    cases = [c for group, _ in gallery.groups.values() for c in group]
    assert cases and all(c.thumbnail and c.overlay is None for c in cases)
