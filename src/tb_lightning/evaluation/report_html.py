"""report.html: one evaluation as one self-contained page, to read in a browser or print.

Everything the page shows comes from the objects report.txt and metrics.json are written from
(evaluate.py hands them over): the threshold story and the banners are report.txt's own lines,
the tables read metrics.json's dictionary and format it with report.py's helpers, the figures
are the PNGs eval has just written to figures/ (embedded, not redrawn). What is new here is the
error gallery: the false negatives (lowest p_tb first), the false positives (highest first) and
the images nearest the threshold, each as a small thumbnail with its Grad-CAM overlay.

The page is one file: figures and thumbnails are data: URIs, the CSS is inline, there is no
script and no link to anything outside it, so it can be mailed or archived as it is. No absolute
path is written into it: the checkpoint and split file relative to the run folder, the images
relative to their data root, as predictions.csv names them.

Built with f-strings and html.escape rather than a template engine: the page has one fixed
shape, every value from outside (paths, labels, sources, notes) goes through one escaping
helper (`esc`), and no dependency is added (jinja2 is installed only as one of torch's).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tb_lightning.core.artefacts import probability_text, threshold_text
from tb_lightning.core.atomic import atomic_write, finite_json
from tb_lightning.core.choices import GALLERY_SIZE, loss_label
from tb_lightning.core.extras import missing
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.data.preprocess import describe_preprocess
from tb_lightning.data.transforms import build_transform, load_image
from tb_lightning.evaluation.report import (
    CI_LEVEL,
    SECTION_HEADINGS,
    SPLIT_TITLES,
    TRAINING_LOSS_KEY,
    ZERO_WIDTH_NOTE,
    _fmt,
    _interval,
    ci_method_line,
    looks_zero_width,
    rate_counts,
    too_few_note,
    who_line,
)
from tb_lightning.inference.saliency import (
    BORDER_FLAG,
    EMPTY_FLAG,
    blend,
    border_share,
    flag_map,
    flag_note,
    gradcam,
)
from tb_lightning.stats.metrics import SCREENING
from tb_lightning.trained.model import TrainedModel

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
# The thumbnails' longer side in pixels (aspect kept; JPEG).
THUMBNAIL_SIZE = 128
THUMBNAIL_QUALITY = 85
# Grad-CAM batches of the gallery images (at most 3 x the gallery size of them).
GRADCAM_BATCH = 16

# The gallery's groups, in page order: key -> (heading, what it holds, in which order).
GROUPS = {
    "false_negatives": (
        "False negatives",
        "Tuberculosis images called Normal",
        "most confident mistakes first (lowest p_tb)",
    ),
    "false_positives": (
        "False positives",
        "Normal images called Tuberculosis",
        "most confident mistakes first (highest p_tb)",
    ),
    "borderline": (
        "Nearest the threshold",
        "images of either class whose p_tb lies nearest the threshold, right or wrong",
        "nearest first",
    ),
}
# The evaluation figures (figures.py), in page order, with what each shows.
FIGURES = (
    (
        "roc_curve",
        "ROC curve (threshold-free); the red dot is the operating point at p_tb >= {t}, the "
        "green box the WHO screening minimum (sensitivity >= 0.90 with specificity >= 0.70).",
    ),
    (
        "pr_curve",
        "Precision-recall curve (threshold-free); the red dot is the operating point at "
        "p_tb >= {t}, the dotted line the prevalence.",
    ),
    (
        "calibration_curve",
        "Calibration: the mean predicted p_tb of each of 10 equal-width bins against the "
        "fraction of its images that are TB (the number beside each point: its images).",
    ),
    (
        "p_tb_distribution",
        "Predicted p_tb per true class; the dashed line is the threshold p_tb >= {t}.",
    ),
    ("confusion_matrix", "Counts at p_tb >= {t}: true class in rows, the call in columns."),
)

# One cyan-to-red ramp of matplotlib's 'jet' (the overlays' colour map), for the legend.
JET_CSS = "#00007f, #0000ff, #007fff, #00ffff, #7fff7f, #ffff00, #ff7f00, #ff0000, #7f0000"

CSS = """
:root { --ok: #1b7f3b; --bad: #b3261e; --warn: #8a5a00; --muted: #555; --line: #ddd; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
  sans-serif; color: #111; background: #fff; max-width: 1120px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.55em; margin: 0 0 .2em; }
h2 { font-size: 1.25em; margin: 1.8em 0 .5em; padding-bottom: .2em;
  border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.2em 0 .3em; }
p { margin: .4em 0; }
.subtitle { color: var(--muted); margin: 0 0 1em; }
.banner { border-left: 6px solid #e0a000; background: #fff6e0; padding: .55em .9em;
  margin: .6em 0; white-space: pre-wrap; }
.banner.synthetic { border-color: var(--bad); background: #fde9e7; font-weight: 600; }
.banner.info { border-color: #7a9cc6; background: #eef3fa; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { padding: .28em .75em; border-bottom: 1px solid #e6e6e6; text-align: left;
  vertical-align: top; }
thead th { border-bottom: 2px solid #bbb; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.section th { background: #f2f2f2; font-weight: 600; }
table.kv th { font-weight: 600; white-space: nowrap; color: #333; }
.muted { color: var(--muted); }
.mono, .path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: .92em; }
.path { word-break: break-all; }
.verdict { font-weight: 700; }
.verdict.met { color: var(--ok); }
.verdict.not { color: var(--bad); }
.who { border: 1px solid var(--line); border-radius: 6px; padding: .6em .9em; margin: .8em 0; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr));
  gap: 18px; }
figure { margin: 0; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: .9em; color: #333; margin-top: .3em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(290px, 1fr));
  gap: 12px; margin: .5em 0 1.2em; }
.gallery.text { grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); }
.case { border: 1px solid #ccc; border-radius: 6px; padding: 8px; font-size: 13px; }
.case.wrong { border-color: #e3a29c; }
.case .pics { display: flex; gap: 6px; margin-bottom: 6px; }
.case .pics div { text-align: center; font-size: 11px; color: var(--muted); }
.case .pics img { display: block; width: 128px; height: 128px; object-fit: contain;
  background: #000; }
.case .ptb { font-size: 15px; font-weight: 700; font-variant-numeric: tabular-nums; }
.call { font-weight: 600; }
.call.wrong { color: var(--bad); }
.call.right { color: var(--ok); }
.flag { color: var(--warn); font-weight: 600; }
.legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle;
  background: linear-gradient(to right, JET); border: 1px solid #999; }
footer { margin-top: 2.5em; padding-top: .6em; border-top: 1px solid var(--line);
  color: var(--muted); font-size: .85em; }
@page { margin: 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  #screening, #figures, #gallery { break-before: page; }
  h2, h3, .group-head { break-after: avoid; }
  .group-head { break-inside: avoid; }
  .figures { grid-template-columns: 1fr 1fr; }
  figure, .case, .banner, .who, tr, table.kv { break-inside: avoid; }
  img { max-width: 100%; }
  .gallery { grid-template-columns: repeat(3, 1fr); }
}
""".replace("JET", JET_CSS)


def esc(value: Any) -> str:
    """Any value as HTML text (quotes too: it may land in an attribute)."""
    return html.escape(str(value), quote=True)


def data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def json_attr(value: Any) -> str:
    """A number as a data- attribute holds it: JSON, so that it reads back as metrics.json's."""
    return esc(json.dumps(finite_json(value)))


# ---------------------------------------------------------------------------------------------
# The gallery: which images, and their pictures.


@dataclass(frozen=True)
class GalleryCase:
    """One image of the gallery, as predictions.csv names it, and its pictures (data: URIs)."""

    path: str  # relative to the data root, as in predictions.csv
    source: str
    label: int
    p_tb: float
    seen: str = ""  # its role in training when that makes its call no evidence (seen_note)
    thumbnail: str | None = None
    overlay: str | None = None
    flag: str = ""  # saliency.py's flag of its map: EMPTY_FLAG, BORDER_FLAG or ""
    flag_note: str | None = None


@dataclass
class Gallery:
    """The three groups (GROUPS order): key -> (the cases shown, how many there are in all),
    and what the page says about its pictures."""

    groups: dict[str, tuple[list[GalleryCase], int]]
    size: int
    images: bool  # thumbnails embedded (eval.report_images)
    gradcam: bool  # overlays embedded
    notes: list[str] = field(default_factory=list)  # why pictures are missing, flags counted
    image_size: int | None = None
    preprocess: str | None = None


def select_gallery(
    probs: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    threshold: float,
    size: int,
) -> dict[str, tuple[list[int], int]]:
    """key -> (the indices shown, in order; how many images the group has in all).

    False negatives (TB called Normal at p_tb >= threshold) by lowest p_tb, false positives by
    highest, and every image by its distance to the threshold; at most `size` of each. Ties keep
    the images' order (a stable sort), so the same evaluation gives the same page.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    called = probs >= threshold
    fn = np.flatnonzero((labels == 1) & ~called)
    fn = fn[np.argsort(probs[fn], kind="stable")]
    fp = np.flatnonzero((labels == 0) & called)
    fp = fp[np.argsort(-probs[fp], kind="stable")]
    near = np.argsort(np.abs(probs - threshold), kind="stable")
    return {
        "false_negatives": (fn[:size].tolist(), len(fn)),
        "false_positives": (fp[:size].tolist(), len(fp)),
        "borderline": (near[:size].tolist(), len(near)),
    }


def seen_note(role: str, split: str) -> str:
    """A card's line on an image the model has seen, as report.txt's SEEN IN TRAINING line
    counts them (evaluate.seen_warning): a train image always; a val image outside
    eval.split=val (there every image is one, and the optimism note says so); else ""."""
    if role == "train":
        return "SEEN IN TRAINING: the model trained on it (train split)"
    if role == "val" and split != "val":
        return "SEEN IN TRAINING: its val split chose the checkpoint and threshold"
    return ""


def jpeg_uri(pixels: np.ndarray) -> str:
    """A float image in [0, 1] ((H, W) grey or (H, W, 3) RGB) as a JPEG data: URI."""
    array = np.clip(np.round(np.asarray(pixels) * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return data_uri(buffer.getvalue(), "image/jpeg")


def thumbnail_gray(decoded: torch.Tensor, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """The decoded image (3, H, W) uint8 as grey floats in [0, 1], its longer side at most
    `size` (aspect kept: the file as it is, not the model's square input)."""
    gray = decoded.float().mean(dim=0).round().clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(gray, mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float64) / 255.0


def resize_map(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A Grad-CAM map (at the model's square input) stretched onto a thumbnail of `shape`:
    the model saw the whole image stretched to a square, so the map covers the whole image."""
    height, width = shape
    image = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    return np.clip(np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)), 0, 1)


def gradcam_unavailable(loaded: TrainedModel) -> str | None:
    """Why the gallery gets no Grad-CAM overlays, or None when it does."""
    absent = missing("saliency")
    if absent:
        return (
            "Grad-CAM overlays are left out: the optional 'saliency' packages are not installed "
            f"({', '.join(absent)}); install them with pip install -e '.[saliency]'."
        )
    if loaded.members:
        return (
            "Grad-CAM overlays are left out: this model is an ensemble of "
            f"{len(loaded.members)} fold models, and one Grad-CAM map would be each member's "
            "own (predict's saliency=true refuses an ensemble too); evaluate one member's "
            "best.ckpt to see its maps."
        )
    return None


def build_gallery(
    loaded: TrainedModel,
    paths: Sequence[str],
    names: Sequence[str],
    sources: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    seen: Sequence[str] | None,
    split: str,
    size: int = GALLERY_SIZE,
    images: bool = True,
    device: torch.device | None = None,
) -> Gallery:
    """The gallery of one evaluation: which images (select_gallery), and with `images` their
    thumbnails and Grad-CAM overlays, computed for those images only (at most 3 x `size`), on
    `device`, as the model saw them (its image size and preprocessing).

    `paths`: the files; `names`: the same as predictions.csv writes them; `seen`: each one's
    seen_in_training role (a card says so where seen_note does, for eval.split=`split`).
    """
    chosen = select_gallery(probs, labels, threshold, size)
    wanted = sorted({i for shown, _ in chosen.values() for i in shown})
    gallery = Gallery({}, size, images, False, image_size=loaded.image_size)
    if loaded.preprocess:
        gallery.preprocess = describe_preprocess(loaded.preprocess)
    pictures: dict[int, dict[str, Any]] = {}
    if images and wanted:
        reason = gradcam_unavailable(loaded)
        if reason:
            gallery.notes.append(reason)
        gallery.gradcam = reason is None
        drawn = gallery_pictures(loaded, [paths[i] for i in wanted], gallery.gradcam, device)
        pictures = dict(zip(wanted, drawn, strict=True))
        flags = [p["flag"] for p in pictures.values() if p.get("flag")]
        if flags:
            gallery.notes.append(flag_counts(flags, len(pictures)))
    for key, (shown, total) in chosen.items():
        cases = [
            GalleryCase(
                path=names[i],
                source=sources[i],
                label=int(labels[i]),
                p_tb=float(probs[i]),
                seen=seen_note(seen[i], split) if seen else "",
                **pictures.get(i, {}),
            )
            for i in shown
        ]
        gallery.groups[key] = (cases, total)
    return gallery


def gallery_pictures(
    loaded: TrainedModel,
    paths: Sequence[str],
    with_gradcam: bool,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Each path's thumbnail (and overlay, map flag and note: GalleryCase's fields).

    The map is of the image as the model scored it (decoded, resized, preprocessed: the
    transform of predict); the pictures show the file itself.
    """
    net = None
    if with_gradcam:
        device = device or torch.device("cpu")
        net = loaded.model.net.to(device).eval()
    transform = build_transform(loaded.image_size, loaded.preprocess)
    out: list[dict[str, Any]] = []
    for start in range(0, len(paths), GRADCAM_BATCH):
        chunk = list(paths[start : start + GRADCAM_BATCH])
        decoded = [load_image(p) for p in chunk]
        maps: list[np.ndarray | None] = [None] * len(chunk)
        if net is not None:
            batch = torch.stack([transform(d) for d in decoded]).to(device)
            maps = list(gradcam(net, batch).cpu().numpy())
        for image, heatmap in zip(decoded, maps, strict=True):
            gray = thumbnail_gray(image)
            entry: dict[str, Any] = {"thumbnail": jpeg_uri(gray)}
            if heatmap is not None:
                share = border_share(heatmap)  # on the map as computed, as predict's
                flag = flag_map(share)
                entry["overlay"] = jpeg_uri(blend(gray, resize_map(heatmap, gray.shape)))
                entry["flag"] = flag
                entry["flag_note"] = flag_note(share, flag)
            out.append(entry)
    return out


def flag_counts(flags: Sequence[str], total: int) -> str:
    """The sentence on the gallery's flagged maps (saliency.py's flags), as predict logs it."""
    empty = sum(f == EMPTY_FLAG for f in flags)
    border = sum(f == BORDER_FLAG for f in flags)
    parts = []
    if empty:
        parts.append(f"{empty} of {total} maps are empty (no region raises p_tb)")
    if border:
        parts.append(
            f"{border} of {total} maps have most of their mass in the image border, outside "
            "the body: they show the frame, not the lungs"
        )
    return "; ".join(parts) + ". A flagged map is no evidence for its call; each says so."


# ---------------------------------------------------------------------------------------------
# The page.


@dataclass(frozen=True)
class PageData:
    """What the page says about the evaluated images beyond metrics.json."""

    split_file: str | None  # relative to the run folder; None for eval.split=all
    sources: dict[str, int]  # images per source (populations.source_of)


def header_rows(header: str) -> list[tuple[str, str]]:
    """report.txt's first lines (`Checkpoint: ...`, `Operating threshold: ...`) as
    (label, text) pairs, split at the first ': '."""
    rows = []
    for line in header.splitlines():
        label, _, text = line.partition(": ")
        rows.append((label, text) if text else ("", line))
    return rows


def banner(text: str, kind: str = "") -> str:
    return f'<div class="banner {kind}">{esc(text.strip())}</div>'


def kv_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def chance_level(summary: Mapping[str, Any]) -> str | None:
    """The warning for a model not shown to beat chance: the lower end of its AUROC interval
    is not above 0.5 (the interval includes 0.5, or lies below it)."""
    low, high = summary["ci"]["auroc"]
    if low is None or high is None or low > 0.5:
        return None
    where = "includes 0.5" if high >= 0.5 else "lies below 0.5 (it ranks TB below Normal)"
    return (
        f"NOT SHOWN TO BEAT CHANCE: AUROC {_fmt(summary['auroc'])} {_interval([low, high])}, "
        f"its 95% interval {where}. The figures at the threshold, the calibration curve and "
        "any Grad-CAM map below are no evidence of what this model detects."
    )


def model_section(metrics: Mapping[str, Any], header: str, notes: Sequence[tuple[str, str]]) -> str:
    rows = header_rows(header)
    parts = [
        '<section id="model"><h2>Model and operating threshold</h2>',
        kv_table(rows),
    ]
    members = metrics.get("ensemble_members") or []
    if members:
        epochs = metrics.get("ensemble_member_epochs") or [None] * len(members)
        steps = metrics.get("ensemble_member_steps") or [None] * len(members)
        body = "".join(
            f'<tr><td class="num">{n}</td><td class="path">{esc(path)}</td>'
            f'<td class="num">{esc("" if e is None else e)}</td>'
            f'<td class="num">{esc("" if s is None else s)}</td></tr>'
            for n, (path, e, s) in enumerate(zip(members, epochs, steps, strict=True))
        )
        missing_folds = metrics.get("ensemble_missing_folds") or []
        parts.append(
            f"<h3>Ensemble members ({len(members)}, relative to the multirun folder)</h3>"
            '<table id="members"><thead><tr><th class="num">#</th><th>checkpoint</th>'
            '<th class="num">epoch (from 0)</th><th class="num">global step</th></tr></thead>'
            f"<tbody>{body}</tbody></table>"
        )
        if missing_folds:
            listed = ", ".join(f"fold {m['fold']} (seed {m['seed']})" for m in missing_folds)
            parts.append(banner(f"Missing folds (allow_partial=true): {listed}"))
    for kind, text in notes:
        if kind == "calibration":
            parts.append(banner(text, "" if "WARNING" in text else "info"))
    parts.append("</section>")
    return "".join(parts)


def data_section(
    metrics: Mapping[str, Any],
    page: PageData,
    notes: Sequence[tuple[str, str]],
) -> str:
    split = metrics["split"]
    summary = metrics[split]["overall"]
    counts = summary["counts"]
    where = (
        f"the {split} rows of {page.split_file}"
        if page.split_file
        else "every image of the data source (eval.split=all)"
    )
    rows = [
        ("Split", f"{SPLIT_TITLES.get(split, split)}: {where}"),
        (
            "Images",
            f"{summary['images']} ({counts[CLASS_NAMES[0]]} {CLASS_NAMES[0]}, "
            f"{counts[CLASS_NAMES[1]]} {CLASS_NAMES[1]})",
        ),
        ("Sources", ", ".join(f"{name}: {n}" for name, n in page.sources.items())),
    ]
    if metrics.get("skipped_files"):
        rows.append(("Left out", f"{metrics['skipped_files']} bad file(s), listed in skipped.csv"))
    seen = metrics.get("seen_in_training")
    if seen is not None:
        rows.append(
            (
                "Seen in training",
                ", ".join(f"{role}: {n}" for role, n in seen.items())
                + " (their role in the model's split.csv; predictions.csv marks each image)",
            )
        )
    parts = ['<section id="data"><h2>The data it was measured on</h2>', kv_table(rows)]
    for kind, text in notes:
        if kind == "skipped":
            parts.append(banner(text, "info"))
    parts.append("</section>")
    return "".join(parts)


def screening_section(metrics: Mapping[str, Any], n_bootstrap: int, optimism: str | None) -> str:
    split = metrics["split"]
    summary = metrics[split]["overall"]
    threshold = threshold_text(summary["threshold"])
    fractions = {
        name: f"{successes}/{trials}"
        for name, (successes, trials) in rate_counts(summary["confusion_matrix"]).items()
    }
    parts = [f'<section id="screening"><h2>Screening figures at p_tb &gt;= {esc(threshold)}</h2>']
    if optimism:
        parts.append(banner(optimism))
    note = too_few_note(summary)
    if note:
        parts.append(banner(note[0].upper() + note[1:]))
    parts.append(f'<p class="muted">{esc(ci_method_line(n_bootstrap))}.</p>')
    rows, section = [], None
    for m in SCREENING:
        if m.section != section:
            section = m.section
            heading = SECTION_HEADINGS[section].format(threshold=threshold).rstrip(":")
            rows.append(f'<tr class="section"><th colspan="5">{esc(heading)}</th></tr>')
        low, high = summary["ci"][m.key]
        method = summary["ci_method"][m.key]
        extra = fractions.get(m.key, "")
        if method == "bootstrap" and looks_zero_width([low, high]):
            extra = ZERO_WIDTH_NOTE
        rows.append(
            f'<tr data-metric="{esc(m.key)}" data-value="{json_attr(summary[m.key])}" '
            f'data-ci-low="{json_attr(low)}" data-ci-high="{json_attr(high)}">'
            f"<td>{esc(m.label)}</td>"
            f'<td class="num value">{esc(_fmt(summary[m.key]))}</td>'
            f'<td class="num ci">{esc(_interval([low, high]))}</td>'
            f'<td class="num">{esc(extra)}</td>'
            f'<td class="muted">{esc("Wilson score" if method == "wilson" else "bootstrap")}</td>'
            "</tr>"
        )
    parts.append(
        '<table id="screening-table"><thead><tr><th>metric</th><th class="num">value</th>'
        f'<th class="num">{int(CI_LEVEL * 100)}% CI</th><th class="num">counts</th>'
        f"<th>interval</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    parts.append(who_block(summary))
    parts.append(confusion_and_classes(metrics, split, threshold))
    parts.append("</section>")
    return "".join(parts)


def who_block(summary: Mapping[str, Any]) -> str:
    who = summary["who_screening_minimum"]
    met, strict = who["met"], who["met_by_lower_ci"]
    return (
        f'<div class="who" id="who" data-met="{json_attr(met)}" '
        f'data-met-by-lower-ci="{json_attr(strict)}"><h3>WHO screening check</h3>'
        f'<p>By the point estimates: <span class="verdict {"met" if met else "not"}">'
        f"{'MET' if met else 'NOT met'}</span>; by the lower ends of the Wilson 95% intervals: "
        f'<span class="verdict {"met" if strict else "not"}">'
        f"{'met' if strict else 'not met'}</span>.</p>"
        f'<p class="muted">{esc(who_line(summary))}. The WHO target product profile for '
        "CXR screening asks at least this; a check on few images says little (see the "
        "intervals).</p></div>"
    )


def confusion_and_classes(metrics: Mapping[str, Any], split: str, threshold: str) -> str:
    (tn, fp), (fn, tp) = metrics[f"{split}/confusion_matrix"]
    normal, tb = CLASS_NAMES
    matrix = (
        f"<h3>Confusion matrix at p_tb &gt;= {esc(threshold)}</h3>"
        '<table id="confusion"><thead><tr><th>true \\ called</th>'
        f'<th class="num">{normal}</th><th class="num">{tb}</th></tr></thead><tbody>'
        f'<tr><th>{normal}</th><td class="num">{tn} (TN)</td><td class="num">{fp} (FP)</td></tr>'
        f'<tr><th>{tb}</th><td class="num">{fn} (FN)</td><td class="num">{tp} (TP)</td></tr>'
        "</tbody></table>"
    )
    rows = "".join(
        f"<tr><th>{name}</th>"
        + "".join(
            f'<td class="num" data-key="{esc(key)}" data-value="{json_attr(metrics[key])}">'
            f"{_fmt(metrics[key])}</td>"
            for key in (f"{split}/{kind}/{name}" for kind in ("precision", "recall", "f1"))
        )
        + "</tr>"
        for name in CLASS_NAMES
    )
    loss_key = f"{split}/loss"
    loss_name = (metrics.get(TRAINING_LOSS_KEY) or {}).get("name", loss_label(0.0))
    classes = (
        f"<h3>Per class at p_tb &gt;= {esc(threshold)} (the seed's report)</h3>"
        '<table id="per-class"><thead><tr><th>class</th><th class="num">precision</th>'
        '<th class="num">recall</th><th class="num">F1</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
        f"<p>Loss (threshold-free, the training loss: {esc(loss_name)}): "
        f'<span class="mono" '
        f'data-key="{esc(loss_key)}" data-value="{json_attr(metrics[loss_key])}">'
        f"{metrics[loss_key]:.6f}</span></p>"
    )
    return matrix + classes


def per_source_section(metrics: Mapping[str, Any], page: PageData) -> str:
    split = metrics["split"]
    per_source = metrics[split]["per_source"]
    threshold = threshold_text(metrics[split]["overall"]["threshold"])
    parts = ['<section id="per-source"><h2>Per source</h2>']
    if len(page.sources) < 2:
        name = next(iter(page.sources), "unknown")
        parts.append(
            f"<p>All {metrics[split]['overall']['images']} images come from one source "
            f"({esc(name)}): no per-source figures.</p></section>"
        )
        return "".join(parts)
    rows = []
    for name, s in per_source.items():
        note = too_few_note(s) or ""
        rows.append(
            f'<tr data-source="{esc(name)}"><td>{esc(name)}</td>'
            f'<td class="num">{s["images"]}</td><td class="num">{s["counts"][CLASS_NAMES[1]]}</td>'
            f'<td class="num">{_fmt(s["auroc"])} {esc(_interval(s["ci"]["auroc"]))}</td>'
            f'<td class="num">{_fmt(s["sensitivity"])} {esc(_interval(s["ci"]["sensitivity"]))}'
            f'</td><td class="num">{_fmt(s["specificity"])} '
            f'{esc(_interval(s["ci"]["specificity"]))}</td><td class="flag">{esc(note)}</td></tr>'
        )
    for name, n in page.sources.items():
        if name not in per_source:
            rows.append(
                f'<tr data-source="{esc(name)}"><td>{esc(name)}</td><td class="num">{n}</td>'
                '<td colspan="5" class="muted">one class only: no AUROC, sensitivity and '
                "specificity pair</td></tr>"
            )
    parts.append(
        f"<p>Sensitivity and specificity at p_tb &gt;= {esc(threshold)}, with 95% Wilson score "
        "intervals; AUROC (threshold-free) with its bootstrap interval.</p>"
        '<table id="per-source-table"><thead><tr><th>source</th><th class="num">images</th>'
        '<th class="num">TB</th><th class="num">AUROC [95% CI]</th>'
        '<th class="num">sensitivity [95% CI]</th><th class="num">specificity [95% CI]</th>'
        f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )
    return "".join(parts)


def figures_section(output_dir: Path, metrics: Mapping[str, Any], subject: str) -> str:
    threshold = threshold_text(metrics[metrics["split"]]["overall"]["threshold"])
    cells = []
    for name, caption in FIGURES:
        path = output_dir / "figures" / f"{name}.png"
        if not path.is_file():
            continue
        uri = data_uri(path.read_bytes(), "image/png")
        cells.append(
            f'<figure id="figure-{name}"><img src="{uri}" alt="{esc(name)}">'
            f"<figcaption>{esc(caption.format(t=threshold))} "
            f'<span class="muted">figures/{name}.png; {esc(subject)}.</span>'
            "</figcaption></figure>"
        )
    return (
        '<section id="figures"><h2>Figures</h2>'
        f'<div class="figures">{"".join(cells)}</div></section>'
    )


def case_card(case: GalleryCase, threshold: float, images: bool) -> str:
    called = int(case.p_tb >= threshold)
    right = called == case.label
    p_text = probability_text(case.p_tb, threshold)
    pics = ""
    if images and case.thumbnail:
        overlay = (
            f'<div><img src="{case.overlay}" alt="Grad-CAM of {esc(case.path)}">Grad-CAM</div>'
            if case.overlay
            else ""
        )
        pics = (
            f'<div class="pics"><div><img src="{case.thumbnail}" alt="{esc(case.path)}">image'
            f"</div>{overlay}</div>"
        )
    lines = [
        f'<div class="ptb">p_tb {esc(p_text)}</div>',
        f"<div>true {esc(CLASS_NAMES[case.label])}, called "
        f'<span class="call {"right" if right else "wrong"}">{esc(CLASS_NAMES[called])}</span>'
        f"{'' if right else ' (wrong)'}</div>",
        f'<div>source {esc(case.source)}</div><div class="path">{esc(case.path)}</div>',
    ]
    if case.seen:
        lines.append(f'<div class="flag">{esc(case.seen)}</div>')
    if case.flag_note:
        lines.append(f'<div class="flag">{esc(case.flag_note)}</div>')
    return (
        f'<div class="case{"" if right else " wrong"}" data-path="{esc(case.path)}" '
        f'data-p-tb="{esc(p_text)}" data-label="{case.label}" data-called="{called}">'
        f"{pics}{''.join(lines)}</div>"
    )


def gallery_section(gallery: Gallery, threshold: float) -> str:
    t = threshold_text(threshold)
    parts = [
        '<section id="gallery"><h2>Error gallery</h2>',
        f"<p>The calls at p_tb &gt;= {esc(t)}: at most {gallery.size} images per group "
        "(eval.report_gallery_size); each heading says how many there are in all. Paths as "
        "predictions.csv writes them.</p>",
    ]
    if not gallery.images:
        parts.append(
            banner(
                "Images left out (eval.report_images=false): no thumbnail or Grad-CAM map of "
                "any image is in this page; the images are named by their paths only.",
                "info",
            )
        )
    elif gallery.gradcam:
        model_input = f"{gallery.image_size} x {gallery.image_size} px" + (
            f", {gallery.preprocess}" if gallery.preprocess else ""
        )
        parts.append(
            "<p>Each image is shown as the file is, beside its Grad-CAM map of the TB logit on "
            f"the model's input ({esc(model_input)}): warm regions raise p_tb, scaled per image "
            '<span class="legend" title="jet colour map"></span> low to high. A map is '
            "evidence only where it lies on the body; a map that is empty or mostly in the "
            "image border is flagged on its card.</p>"
        )
    for note in gallery.notes:
        parts.append(banner(note, "info"))
    for key, (heading, holds, order) in GROUPS.items():
        cases, total = gallery.groups[key]
        if key == "borderline":
            count = f"the {len(cases)} nearest of {total} images"
        else:
            count = f"{len(cases)} shown of {total}"
        parts.append(
            f'<div class="group-head"><h3 id="{key}" data-total="{total}" '
            f'data-shown="{len(cases)}">{esc(heading)}: {esc(count)}</h3>'
            f'<p class="muted">{esc(holds)} at p_tb &gt;= {esc(t)}; {esc(order)}.</p></div>'
        )
        if not cases:
            parts.append("<p>None.</p>")
            continue
        cards = "".join(case_card(c, threshold, gallery.images) for c in cases)
        parts.append(
            f'<div class="gallery{"" if gallery.images else " text"}" data-group="{key}">'
            f"{cards}</div>"
        )
    parts.append("</section>")
    return "".join(parts)


def render_report_html(
    output_dir: Path,
    metrics: Mapping[str, Any],
    header: str,
    notes: Sequence[tuple[str, str]],
    gallery: Gallery,
    page: PageData,
    n_bootstrap: int,
    optimism: str | None = None,
) -> str:
    """The page, as text. `header`: report.txt's first lines (format_threshold_header);
    `notes`: (kind, text) of the lines report.txt prints after it, in its order (kinds: seen,
    calibration, skipped, synthetic); `optimism`: the note on a threshold chosen on these
    images."""
    split = metrics["split"]
    summary = metrics[split]["overall"]
    counts = summary["counts"]
    threshold = summary["threshold"]
    subject = (
        f"{'all images' if split == 'all' else f'{split} split'}: {summary['images']} images "
        f"({counts[CLASS_NAMES[0]]} {CLASS_NAMES[0]}, {counts[CLASS_NAMES[1]]} {CLASS_NAMES[1]})"
    )
    top = [banner(text, "synthetic") for kind, text in notes if kind == "synthetic"]
    chance = chance_level(summary)
    if chance:
        top.append(banner(chance))
    top += [banner(text) for kind, text in notes if kind == "seen"]
    title = f"TB screening evaluation: {metrics['checkpoint']}"
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f'<h1>TB screening evaluation</h1><p class="subtitle">'
        f'<span class="path">{esc(metrics["checkpoint"])}</span> on the {esc(subject)}, '
        f"at the operating threshold p_tb &gt;= {esc(threshold_text(threshold))}</p>",
        *top,
        model_section(metrics, header, notes),
        data_section(metrics, page, [n for n in notes if n[0] != "seen"]),
        screening_section(metrics, n_bootstrap, optimism),
        per_source_section(metrics, page),
        figures_section(output_dir, metrics, subject),
        gallery_section(gallery, threshold),
        f"<footer>Written by python -m tb_lightning.eval on {esc(written)}, beside "
        "report.txt, metrics.json (every number above), predictions.csv (every image) and "
        "provenance.json (command, versions, commit, machine). Numbers at 3 decimals; p_tb "
        "and thresholds at 6, as the CSVs write them.</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_report_html(
    output_dir: Path,
    metrics: Mapping[str, Any],
    header: str,
    notes: Sequence[tuple[str, str]],
    gallery: Gallery,
    page: PageData,
    n_bootstrap: int,
    optimism: str | None = None,
) -> Path:
    """<output_dir>/report.html (atomically); see render_report_html."""
    path = output_dir / REPORT_HTML
    text = render_report_html(
        output_dir, metrics, header, notes, gallery, page, n_bootstrap, optimism
    )
    atomic_write(path, text)
    return path
