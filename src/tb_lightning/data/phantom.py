"""Deterministic synthetic chest-X-ray "phantoms" for offline smoke runs and speed work.

The images only *look* roughly like frontal chest radiographs (dark lungs, bright mediastinum,
ribs, clavicles, diaphragm domes); they are NOT medical data and say nothing about real TB.
Tuberculosis phantoms carry one or more lesions (upper-zone patchy opacities, nodules,
cavities, pleural effusion) whose contrast ranges from obvious to subtle.

Files follow the Kaggle "TB Chest X-ray Database" layout so the real-data code path can read
them unchanged::

    <root>/Normal/Normal-1.png ...
    <root>/Tuberculosis/Tuberculosis-1.png ...
    <root>/phantom.json          # settings the PNGs were rendered with

Every image is a pure function of ``(seed, label, index, image_size)``: file ``i`` is the same
whatever the class counts are, so a larger request only adds files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from tb_lightning.core.atomic import atomic_write_json, atomic_write_with
from tb_lightning.core.choices import LESION_MIXES
from tb_lightning.core.errors import DataError
from tb_lightning.core.labels import CLASS_NAMES
from tb_lightning.core.progress import report_progress
from tb_lightning.core.signals import cancel_pending_on_stop, raise_if_stopped

log = logging.getLogger(__name__)

PHANTOM_VERSION: int = 1  # bump when rendering changes; invalidates existing sets

_META_NAME = "phantom.json"
_NOTE = "synthetic phantom images, not medical data"
# Only files matching these names are ever deleted by the generator.
_FILE_RE = {name: re.compile(rf"^{name}-(\d+)\.png$") for name in CLASS_NAMES}
_TMP_RE = re.compile(r"^\.(Normal|Tuberculosis)-\d+\.png\..*\.tmp$")
_STALE_TMP_S = 3600.0  # temp files older than this are leftovers of killed runs
_PARALLEL_MIN = 200  # below this many missing images a process pool is not worth its start-up


# --------------------------------------------------------------------------------------------
# Rendering. Geometry lives in "patient" coordinates: the thorax spans about [-1, 1] in x
# (image left = patient right) and y (top = -1). The chest is built as a radiographic density
# map (bright = more attenuation) that a random exposure maps to grey levels.
#
# Speed: the smooth anatomy is rendered at no more than _ANATOMY_SIZE pixels and upsampled
# (it has no detail finer than that), in bands of rows so numpy temporaries stay small and
# cache resident. Small sharp things (nodules, cavities, vessel dots) and the pixel noise are
# drawn at full resolution. No BLAS calls: multithreaded BLAS oversubscribes cores when many
# generator processes run at once.
# --------------------------------------------------------------------------------------------

_ANATOMY_SIZE = 256
_BAND_PIXELS = 16384  # float32 temporaries of 64 KiB


def _smoothstep(x: np.ndarray) -> np.ndarray:
    s = np.clip(x, 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """~1 where the signed distance ``d`` is positive (inside), ~0 outside, soft edge."""
    return _smoothstep(d * (1.0 / width) + 0.5)


def _sphere(r2: np.ndarray, radius: float) -> np.ndarray:
    """Projected thickness of a ball (or a cylinder across), 1 at the centre."""
    return np.sqrt(np.clip(1.0 - r2 * (1.0 / (radius * radius)), 0.0, None))


def _pixel_centres(n: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.float32) + 0.5) / n) * 2.0 - 1.0


def _taps(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights (n, 4) for Gaussian interpolation from a (cells + 2) grid."""
    f = (_pixel_centres(n) + 1.0) * (cells / 2.0) + 0.5  # continuous grid index
    idx = np.floor(f).astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    w = np.exp(-0.5 * ((f[:, None] - idx) / 0.6) ** 2).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, cells + 1), w


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth zero-mean random field of shape (n, n), std about 1, ~``cells`` blobs across.

    A small random grid is interpolated separably with 4 Gaussian taps, far cheaper than
    blurring full-resolution noise; the grid does not depend on ``n``, so the pattern is the
    same at every size.
    """
    grid = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    idx, w = _taps(n, cells)
    cols = sum(grid[:, idx[:, k]] * w[None, :, k] for k in range(4))  # (cells + 2, n)
    field = sum(cols[idx[:, k], :] * w[:, k, None] for k in range(4))  # (n, n)
    field *= 1.0 / (float(field[:: max(n // 64, 1)].std()) + 1e-6)
    return field


def _upsample(a: np.ndarray, n: int, win: tuple[slice, slice] | None = None) -> np.ndarray:
    """Bilinear resize of a square array to (n, n) (pixel centres aligned), or a window of it."""
    m = a.shape[0]
    pos = (np.arange(n, dtype=np.float32) + 0.5) * (m / n) - 0.5
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, m - 1)
    i1 = np.minimum(i0 + 1, m - 1)
    w = np.clip(pos - i0, 0.0, 1.0).astype(np.float32)
    r, c = win if win is not None else (slice(None), slice(None))
    rows = a[i0[r]] * (1.0 - w[r])[:, None] + a[i1[r]] * w[r][:, None]
    return rows[:, i0[c]] * (1.0 - w[c])[None, :] + rows[:, i1[c]] * w[c][None, :]


class _Frame:
    """Maps pixels of an (n, n) image to patient coordinates (scale, aspect, rotation, shift)."""

    def __init__(self, n: int, scale: float, aspect: float, angle: float, shift: tuple) -> None:
        self.n = n
        self.sx, self.sy = shift
        self.ax, self.ay = scale * aspect, scale  # one patient unit in image units
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.p = _pixel_centres(n)

    def coords(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        a = self.p[win[1]][None, :] - np.float32(self.sx)
        b = self.p[win[0]][:, None] - np.float32(self.sy)
        x = (a * self.cos + b * self.sin) * (1.0 / self.ax)
        y = (b * self.cos - a * self.sin) * (1.0 / self.ay)
        return x, y

    def rect(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        """Pixel window covering the patient-space rectangle [x0, x1] x [y0, y1]."""
        cols, rows = [], []
        for px in (x0, x1):
            for py in (y0, y1):
                cols.append(px * self.ax * self.cos - py * self.ay * self.sin + self.sx)
                rows.append(px * self.ax * self.sin + py * self.ay * self.cos + self.sy)
        h = 0.5 * self.n
        r0, r1 = max(int((min(rows) + 1) * h) - 1, 0), min(int((max(rows) + 1) * h) + 2, self.n)
        c0, c1 = max(int((min(cols) + 1) * h) - 1, 0), min(int((max(cols) + 1) * h) + 2, self.n)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def disc(self, px: float, py: float, radius: float) -> tuple[slice, slice] | None:
        return self.rect(px - radius, px + radius, py - radius, py + radius)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _logu(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _vessel_tree(rng: np.random.Generator, side: int) -> list[tuple[float, ...]]:
    """Pulmonary vessels as segments (x0, y0, x1, y1, radius) branching out from a hilum."""
    segs: list[tuple[float, ...]] = []
    hx, hy = side * _u(rng, 0.15, 0.2), _u(rng, -0.1, 0.0)
    for base_angle in (-120.0, -85.0, -50.0, -15.0, 20.0, 50.0, 80.0):
        ang = math.radians(base_angle + rng.normal(0, 8))
        # Trunks leave from along the hilum (a vertical structure), not from one point.
        x0, y0 = hx + side * _u(rng, 0.0, 0.04), hy + base_angle / 600.0 + rng.normal(0, 0.02)
        stack = [(x0, y0, ang, _u(rng, 0.12, 0.2), _u(rng, 0.012, 0.02), 0)]
        while stack:
            x0, y0, ang, length, rad, depth = stack.pop()
            x1 = x0 + side * length * math.cos(ang)
            y1 = y0 + length * math.sin(ang)
            segs.append((x0, y0, x1, y1, rad))
            if depth < 1:
                for turn in (-1, 0, 1):
                    child = ang + turn * math.radians(_u(rng, 15, 35))
                    stack.append((x1, y1, child, length * _u(rng, 0.6, 0.9), rad * 0.6, depth + 1))
    return segs


class _Patient:
    """All scalar parameters of one phantom, drawn before any size-dependent array."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.scale = _u(rng, 0.9, 1.02)
        self.aspect = _u(rng, 0.9, 1.08)
        self.angle = math.radians(float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0)))
        self.shift = (_u(rng, -0.04, 0.04), _u(rng, -0.04, 0.04))
        self.body_w = _u(rng, 0.9, 1.05)
        self.shoulder = _u(rng, 0.18, 0.3)
        self.tissue = _u(rng, 0.5, 0.62)
        self.abdomen = _u(rng, 0.2, 0.28)
        self.breast = _u(rng, 0.0, 0.08)
        # Lungs, per side: index 0 = image left (patient right), 1 = image right.
        w = _u(rng, 0.28, 0.33)
        self.lung_a = (w * 1.04, w * 0.97)
        top = _u(rng, -0.8, -0.7)
        self.lung_top = (top + 0.02, top)
        base = _u(rng, 0.42, 0.55)  # depth of inspiration
        self.base = (base, base + _u(rng, 0.02, 0.07))  # patient-right dome higher: liver
        self.dome_h = _u(rng, 0.1, 0.18)
        self.lung_drop = _u(rng, 0.27, 0.37)
        self.markings = _u(rng, 0.03, 0.06)
        self.hilum = _u(rng, 0.05, 0.1)
        self.vessel_amp = _u(rng, 3.0, 5.0)  # density per unit vessel radius
        self.vessels = _vessel_tree(rng, -1) + _vessel_tree(rng, 1)
        # Mediastinum and heart (bulging to image right = patient left).
        self.heart_w = _u(rng, 0.33, 0.41)
        self.heart_h = _u(rng, 0.22, 0.28)
        self.heart_dx = _u(rng, 0.09, 0.15)
        self.heart_tilt = math.radians(_u(rng, 15.0, 35.0))
        self.solid = _u(rng, 0.22, 0.3)
        self.spine = _u(rng, 0.04, 0.07)
        # Bones.
        self.rib_sp = _u(rng, 0.12, 0.15)
        self.rib_phase = _u(rng, 0.0, 1.0)
        self.rib_curv = _u(rng, 0.6, 0.95)
        self.rib_amp = _u(rng, 0.08, 0.14)
        self.clav_y = _u(rng, -0.66, -0.56)
        self.clav_amp = _u(rng, 0.12, 0.2)
        # Label-independent look-alikes, so "any round dot" is not a TB detector.
        self.gas_bubble = bool(rng.random() < 0.6)
        self.nipples = bool(rng.random() < 0.3)
        self.vessel_dots = [
            (_u(rng, 0.2, 0.65) * rng.choice([-1, 1]), _u(rng, -0.45, 0.3), _u(rng, 0.008, 0.016))
            for _ in range(int(rng.integers(0, 6)))
        ]
        # Exposure: wide enough that mean brightness says little about the label.
        self.lo = _u(rng, -0.16, 0.06)
        self.hi = _u(rng, 0.78, 1.1)
        self.gamma = _logu(rng, 0.7, 1.4)
        self.vignette = _u(rng, 0.05, 0.3)
        self.noise = _u(rng, 0.006, 0.03)
        self.mottle = _u(rng, 0.005, 0.025)

    def lung(self, side: int) -> tuple[float, float, float, float]:
        """(centre x, half-width, apex y, base y) of the lung on ``side`` (-1 or 1)."""
        i = (side + 1) // 2
        return side * 0.4, self.lung_a[i], self.lung_top[i], self.base[i]


def _sample_lesions(rng: np.random.Generator, pt: _Patient, lesions: str = "mixed") -> list[dict]:
    """Draw 1-3 TB findings.

    lesions="mixed": contrast and size are log-uniform over the whole range, so some findings
    are obvious and some subtle (the default, for realistic difficulty). lesions="conspicuous":
    the same kinds and places, drawn from the upper part of each contrast and size range, so
    that a small model learns them in a few minutes on a CPU (experiment=quickstart).
    """
    if lesions not in LESION_MIXES:
        raise ValueError(f"lesions={lesions!r} is not one of {list(LESION_MIXES)}")
    bold = lesions == "conspicuous"

    def amp(lo: float, hi: float) -> float:
        return _logu(rng, hi * 0.75 if bold else lo, hi)

    def size(lo: float, hi: float) -> float:
        return _u(rng, (lo + hi) / 2 if bold else lo, hi)

    kinds = ("patchy", "nodules", "cavity", "effusion")
    # Upper-zone patchy opacity is the classic post-primary TB pattern: the most common here.
    picks = rng.choice(4, size=int(rng.choice([1, 1, 1, 2, 2, 3])), p=[0.4, 0.25, 0.2, 0.15])
    out: list[dict] = []
    for k in picks:
        kind = kinds[int(k)]
        side = int(rng.choice([-1, 1]))
        cx0, a, top, base = pt.lung(side)
        if kind == "effusion":
            strength = amp(0.5, 1.0)  # drawn before the height: the random stream's order
            out.append({"kind": kind, "side": side, "height": amp(0.07, 0.45), "amp": strength})
            continue
        upper = kind != "nodules" or rng.random() < 0.6  # nodules may sit anywhere
        cy = _u(rng, top + 0.1, -0.2 if upper else base - 0.25)
        cx = cx0 + side * a * _u(rng, -0.4, 0.6)
        if kind == "patchy":
            spread = size(0.04, 0.12)
            blobs = [
                (cx + rng.normal(0, spread), cy + rng.normal(0, spread * 0.8), size(0.03, 0.09))
                for _ in range(int(rng.integers(3, 11)))
            ]
            out.append({"kind": kind, "blobs": blobs, "amp": amp(0.15, 0.95)})
        elif kind == "nodules":
            nods = [
                (cx + rng.normal(0, 0.08), cy + rng.normal(0, 0.08), size(0.015, 0.04))
                for _ in range(int(rng.choice([1, 1, 2, 3, 5])))
            ]
            out.append({"kind": kind, "nodules": nods, "amp": amp(0.2, 1.0)})
        else:  # cavity
            r = size(0.035, 0.08)
            les = {"kind": kind, "cx": cx, "cy": cy, "r": r, "inner": r * _u(rng, 0.55, 0.8)}
            les.update(halo=_u(rng, 0.0, 1.0), amp=amp(0.2, 0.8))
            out.append(les)
    return out


def _anatomy_band(x: np.ndarray, y: np.ndarray, pt: _Patient, texture: np.ndarray):
    """Density, lung and open-lung maps for one band of rows (x, y patient coordinates)."""
    lat = np.abs(x)
    right = np.clip(x * 20.0 + 0.5, 0.0, 1.0)  # 0 on image left, 1 on image right
    y_lo, y_hi = float(y.min()), float(y.max())

    def per_side(pair: tuple[float, float]) -> np.ndarray:
        return pair[0] + (pair[1] - pair[0]) * right

    # Body: an elliptic cylinder (thinner towards the skin line), neck and sloping shoulders.
    shoulder = -0.98 + pt.shoulder * _smoothstep((lat - 0.16) * (1 / 0.55))
    q = x * (1.0 / pt.body_w)
    body = np.sqrt(np.clip(1.0 - q * q, 0.0, None)) * _soft(y - shoulder, 0.05)
    dens = pt.tissue * body

    # Diaphragm domes: peak mid-lung, falling to the costophrenic and cardiophrenic angles.
    base = per_side(pt.base)
    u = (lat - 0.37) * (1 / 0.37)
    below = _soft(y - (base - pt.dome_h * (1.0 - u * u)), 0.012)

    # Lungs: egg shapes (wider at the base) with a flat medial border, cut off by the domes.
    top = per_side(pt.lung_top)
    cy = (top + base + 0.15) * 0.5
    t = (y - cy) / ((base + 0.15 - top) * 0.5)
    half_w = per_side(pt.lung_a) * (1.0 + 0.22 * np.clip(t, -1.0, 1.0))
    q = (lat - 0.4) / half_w
    qm = np.minimum(q, 0.0) * 0.85  # medial side: quartic, i.e. flatter and reaching further
    qm *= qm
    ql = np.maximum(q, 0.0)
    r_lung = np.sqrt(ql * ql + qm * qm + t * t)
    lung = _soft(1.0 - r_lung, 0.05) * (1.0 - below)

    # Mediastinum (narrow above, widening), tilted heart and aortic knob: one bright mass.
    med = _soft(0.09 + 0.05 * _smoothstep((y + 0.15) * 2.5) - np.abs(x - 0.01), 0.025)
    dx, dy = x - pt.heart_dx, y - ((pt.base[0] + pt.base[1]) * 0.5 - pt.heart_h * 0.6)
    c, s = math.cos(pt.heart_tilt), math.sin(pt.heart_tilt)
    hx, hy = (dx * c + dy * s) * (1 / pt.heart_w), (dy * c - dx * s) * (1 / pt.heart_h)
    heart = _soft((1.0 - np.sqrt(hx * hx + hy * hy)) * pt.heart_h, 0.02)
    kx, ky = (x - 0.09) * (1 / 0.065), (y + 0.32) * (1 / 0.065)
    knob = _soft((1.0 - np.sqrt(kx * kx + ky * ky)) * 0.065, 0.025)
    solid = np.maximum(np.maximum(med, heart), knob)
    open_lung = lung * (1.0 - solid)
    dens -= pt.lung_drop * open_lung
    abdomen = pt.abdomen * below * _soft(0.8 - lat, 0.15)
    dens += np.maximum(pt.solid * solid, abdomen) * body

    # Trachea (air column down to the carina); spine (vertebrae and discs, faint behind heart).
    if y_lo < -0.36:
        dens -= 0.08 * _soft(0.03 - np.abs(x - 0.005), 0.012) * _soft(-0.36 - y, 0.05)
    vert = 0.7 + 0.3 * np.cos(y * (2.0 * math.pi / 0.085))
    fade = 1.0 - 0.6 * np.maximum(heart, below)
    dens += pt.spine * _soft(0.05 - lat, 0.012) * vert * fade * body

    # Fine lung texture (the vessel tree is drawn later); lower zones under more soft tissue.
    ridge = np.clip(1.0 - 1.5 * np.abs(texture), 0.0, 1.0)
    hx, hy = (lat - 0.18) * (1 / 0.07), (y + 0.05) * (1 / 0.14)
    hilum = pt.hilum / (1.0 + hx * hx + hy * hy)
    dens += (pt.markings * (ridge * ridge) * (1.0 - 0.5 * lat) + hilum) * open_lung
    if pt.breast > 0.0 and y_hi > -0.05:
        dens += pt.breast * _smoothstep((y + 0.05) * 1.6) * _soft(0.8 - lat, 0.2) * body

    # Ribs: posterior ribs arc down laterally; anterior ribs are fainter and slope medially.
    if y_lo < 0.9:
        cage = _soft(1.06 - r_lung, 0.08) * (1.0 - 0.75 * solid) * (1.0 - 0.8 * below)
        w_post = y - pt.rib_curv * (lat - 0.1) ** 2
        c = 0.5 + 0.5 * np.cos((w_post * (1.0 / pt.rib_sp) + pt.rib_phase) * (2.0 * math.pi))
        c *= c
        ribs = c * c
        c = 0.5 + 0.5 * np.cos((y + 0.6 * lat) * (2.0 * math.pi / (pt.rib_sp * 1.3)))
        c *= c
        ribs += 0.3 * (c * c) * _soft(lat - 0.25, 0.15)
        dens += pt.rib_amp * ribs * cage * body

    # Clavicles: gull-wing bars from the sternal ends up and out to the shoulders.
    if y_lo < pt.clav_y + 0.1 and y_hi > pt.clav_y - 0.3:
        s = (lat - 0.07) * (1 / 0.6)  # 0 at the sternal end, 1 laterally
        yc = pt.clav_y - 0.16 * s + 0.05 * np.sin(s * math.pi)
        half = 0.03 + 0.008 * (1.0 - s)  # thicker at the sternal end
        bar = _soft(half - np.abs(y - yc), 0.012) * _soft(s, 0.04) * _soft(1.0 - s, 0.12)
        dens += pt.clav_amp * bar
    return dens, lung, open_lung


def _segment(f: _Frame, dens: np.ndarray, open_lung: np.ndarray, seg: tuple, amp: float) -> None:
    """Add a tapering cylinder (a vessel) from (x0, y0) to (x1, y1), inside the open lung."""
    x0, y0, x1, y1, rad = seg
    win = f.rect(min(x0, x1) - rad, max(x0, x1) + rad, min(y0, y1) - rad, max(y0, y1) + rad)
    if win is None:
        return
    x, y = f.coords(win)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) * (1.0 / (dx * dx + dy * dy)), 0.0, 1.0)
    ex, ey = x - x0 - t * dx, y - y0 - t * dy
    r = rad * (1.0 - 0.3 * t)
    prof = np.sqrt(np.clip(1.0 - (ex * ex + ey * ey) / (r * r), 0.0, None))
    dens[win] += (amp * rad) * prof * open_lung[win]


def _render_anatomy(f: _Frame, pt: _Patient, rng: np.random.Generator):
    """Low-frequency chest: (density, lung mask, open-lung mask) at f's resolution."""
    m = f.n
    texture = _smooth_noise(rng, m, 28)
    dens = np.empty((m, m), np.float32)
    lung = np.empty((m, m), np.float32)  # lung fields above the domes
    open_lung = np.empty((m, m), np.float32)  # ... and not hidden by heart/mediastinum
    band = max(_BAND_PIXELS // m, 4)
    for r0 in range(0, m, band):
        rows = slice(r0, min(r0 + band, m))
        x, y = f.coords((rows, slice(None)))
        dens[rows], lung[rows], open_lung[rows] = _anatomy_band(x, y, pt, texture[rows])

    for seg in pt.vessels:
        _segment(f, dens, open_lung, seg, pt.vessel_amp)
    if pt.gas_bubble:  # gastric air under the patient-left (image right) dome
        gy = pt.base[1] + 0.06
        win = f.rect(0.18, 0.42, gy - 0.06, gy + 0.06)
        if win is not None:
            x, y = f.coords(win)
            gx, gyy = (x - 0.3) * (1 / 0.1), (y - gy) * (1 / 0.05)
            dens[win] -= 0.1 * _soft(1.0 - np.sqrt(gx * gx + gyy * gyy), 0.5)
    if pt.nipples:
        for side in (-1, 1):
            win = f.disc(side * 0.45, 0.25, 0.04)
            if win is not None:
                x, y = f.coords(win)
                r = np.sqrt((x - side * 0.45) ** 2 + (y - 0.25) ** 2)
                dens[win] += 0.05 * _soft(1.0 - r * (1 / 0.025), 0.5)

    # Low-frequency mottle and vignetting, folded into density so the full-resolution pass
    # only has to add pixel noise.
    dens += _smooth_noise(rng, m, 8) * (pt.mottle * (pt.hi - pt.lo))
    vig = 1.0 - 0.5 * pt.vignette * f.p * f.p
    dens -= pt.lo
    dens *= vig[:, None] * vig[None, :]
    dens += pt.lo
    return dens, lung, open_lung


def _add_spots(f: _Frame, dens: np.ndarray, mask, pt: _Patient, lesions: list[dict], tex):
    """Full-resolution details: end-on vessels (both classes) and TB lesions.

    ``mask(name, win)`` returns the 'lung' or 'open' mask over a full-resolution window.
    """
    for vx, vy, vr in pt.vessel_dots:  # end-on vessels look like tiny nodules
        win = f.disc(vx, vy, vr)
        if win is not None:
            x, y = f.coords(win)
            dens[win] += 0.1 * _sphere((x - vx) ** 2 + (y - vy) ** 2, vr) * mask("open", win)
    for les in lesions:
        kind = les["kind"]
        amp = les["amp"] * pt.lung_drop  # relative to how dark the lung is
        if kind == "effusion":
            side = les["side"]
            cx, a, top, base = pt.lung(side)
            win = f.rect(min(0.0, side), max(0.0, side), base - 0.6, base + 0.2)
            if win is None:
                continue
            x, y = f.coords(win)
            # Meniscus: the fluid line climbs laterally, blunting the costophrenic angle. The
            # fluid at most replaces the lung's air, so it merges with chest wall and abdomen.
            lateral = np.clip((side * (x - cx) / a + 1.0) * 0.5, 0.0, 1.0)
            y_m = base - les["height"] * (0.3 + 0.9 * lateral * lateral)
            fluid = _soft((y - y_m) * (1.0 / 0.06) - 0.5, 1.0) * (side * x > 0.02)
            dens[win] += amp * fluid * mask("open", win)
        elif kind == "patchy":
            blobs = les["blobs"]
            win = f.rect(
                min(b[0] - 3 * b[2] for b in blobs),
                max(b[0] + 3 * b[2] for b in blobs),
                min(b[1] - 3 * b[2] for b in blobs),
                max(b[1] + 3 * b[2] for b in blobs),
            )
            if win is None:
                continue
            x, y = f.coords(win)
            field = sum(
                np.exp(((x - bx) ** 2 + (y - by) ** 2) * (-0.5 / br**2)) for bx, by, br in blobs
            )
            field *= np.clip(0.7 + 0.5 * tex(win), 0.2, None)
            # Saturates where blobs overlap: consolidated lung at most turns to soft tissue.
            dens[win] += amp * (1.0 - np.exp(-2.0 * field)) * mask("lung", win)
        elif kind == "nodules":
            for bx, by, br in les["nodules"]:
                win = f.disc(bx, by, br)
                if win is not None:
                    x, y = f.coords(win)
                    r2 = (x - bx) ** 2 + (y - by) ** 2
                    dens[win] += amp * _sphere(r2, br) * mask("lung", win)
        else:  # cavity: thick-walled shell = ring with a lucent centre, optional halo
            cx, cy, r, inner = les["cx"], les["cy"], les["r"], les["inner"]
            win = f.disc(cx, cy, r * 3)
            if win is None:
                continue
            x, y = f.coords(win)
            r2 = (x - cx) ** 2 + (y - cy) ** 2
            shell = _sphere(r2, r) - (inner / r) * _sphere(r2, inner)
            halo = les["halo"] * 0.4 * np.exp(r2 * (-0.5 / (1.8 * r) ** 2))
            dens[win] += amp * (1.6 * shell + halo) * mask("lung", win)


def render_phantom(
    index: int, label: int, seed: int = 0, image_size: int = 512, lesions: str = "mixed"
) -> np.ndarray:
    """uint8 array (image_size, image_size); label 0 = Normal, 1 = Tuberculosis."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (Normal) or 1 (Tuberculosis), got {label!r}.")
    n = int(image_size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(label), int(index)]))
    pt = _Patient(rng)
    findings = _sample_lesions(rng, pt, lesions) if label == 1 else []

    m = min(n, _ANATOMY_SIZE)
    low = _Frame(m, pt.scale, pt.aspect, pt.angle, pt.shift)
    dens_lo, lung_lo, open_lo = _render_anatomy(low, pt, rng)
    lesion_tex = _smooth_noise(rng, m, 40)  # makes consolidations patchy, not smooth blobs
    dens = _upsample(dens_lo, n) if m < n else dens_lo

    def lowres(a: np.ndarray, win: tuple[slice, slice]) -> np.ndarray:
        return _upsample(a, n, win) if m < n else a[win]

    def mask(name: str, win: tuple[slice, slice]) -> np.ndarray:
        return lowres(lung_lo if name == "lung" else open_lo, win)

    high = _Frame(n, pt.scale, pt.aspect, pt.angle, pt.shift)
    _add_spots(high, dens, mask, pt, findings, lambda win: lowres(lesion_tex, win))

    # Exposure window plus quantum noise; gamma through a lookup table.
    levels = 4096
    lut = (np.linspace(0.0, 1.0, levels) ** pt.gamma * 255.0 + 0.5).astype(np.uint8)
    gain = (levels - 1) / (pt.hi - pt.lo)
    # Sum of two uniform bytes: triangular noise, close to Gaussian and cheaper to draw.
    noise_gain = pt.noise * (levels - 1) / 104.5
    out = np.empty((n, n), np.uint8)
    band = max(_BAND_PIXELS // n, 4)
    for r0 in range(0, n, band):
        r1 = min(r0 + band, n)
        img = (dens[r0:r1] - pt.lo) * gain
        bytes_ = rng.integers(0, 256, size=(2, r1 - r0, n), dtype=np.uint8)
        img += (bytes_[0].astype(np.float32) + bytes_[1] - 255.0) * noise_gain
        out[r0:r1] = lut[np.clip(img + 0.5, 0, levels - 1).astype(np.uint16)]
    return out


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def phantom_path(root: Path, label: int, index: int) -> Path:
    """root/Normal/Normal-{index}.png etc. (index is 1-based)."""
    name = CLASS_NAMES[label]
    return Path(root) / name / f"{name}-{index}.png"


def _write_png(path: Path, arr: np.ndarray) -> None:
    img = Image.fromarray(arr)  # 2-D uint8 -> mode "L"
    # Fast zlib settings: the noise makes PNGs incompressible beyond ~2:1 anyway.
    save = {"format": "PNG", "compress_level": 1, "compress_type": zlib.Z_RLE}
    atomic_write_with(path, lambda fh: img.save(fh, **save))


def _render_and_write(job: tuple[str, int, int, int, int, str]) -> None:
    """Worker entry point (top level so a process pool can pickle it)."""
    root, label, index, seed, image_size, lesions = job
    image = render_phantom(index, label, seed, image_size, lesions)
    _write_png(phantom_path(Path(root), label, index), image)


def _generator_files(root: Path) -> Iterable[Path]:
    for name, pattern in _FILE_RE.items():
        folder = root / name
        if folder.is_dir():
            for p in folder.iterdir():
                if pattern.match(p.name) or _TMP_RE.match(p.name):
                    yield p


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def ensure_phantom_dataset(
    root: str | Path,
    num_normal: int,
    num_tb: int,
    image_size: int = 512,
    seed: int = 0,
    lesions: str = "mixed",
    progress: bool = True,
    workers: int | None = None,
) -> list[tuple[Path, int]]:
    """Make sure root holds the first num_normal Normal and num_tb TB phantoms for these settings.

    Returns [(path, label), ...] in order (Normal 1..n then TB 1..m). Only missing files are
    rendered; a change of version/seed/image_size/lesions wipes the generator's PNGs and starts
    over.
    ``workers``: processes for rendering (None = automatic, 1 = serial).
    """
    # The values are checked with the config (config/checks.py: check_phantom).
    num_normal, num_tb, image_size, seed = int(num_normal), int(num_tb), int(image_size), int(seed)
    root = Path(root)
    wanted = {"version": PHANTOM_VERSION, "seed": seed, "image_size": image_size}
    wanted["lesions"] = lesions

    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / _META_NAME
    existing = list(_generator_files(root))
    if meta_path.exists():
        meta = _read_meta(meta_path)
        current = {k: meta.get(k) for k in wanted} if meta is not None else None
        if current != wanted:
            log.info("Phantom settings changed (%s -> %s); regenerating %s", current, wanted, root)
            for p in existing:
                p.unlink(missing_ok=True)
        else:
            _remove_stale_tmp(existing)
    elif any(_FILE_RE[p.parent.name].match(p.name) for p in existing):
        # Same names as the real Kaggle set: never delete images we cannot prove we wrote.
        raise DataError(
            f"{root} already holds Normal/Tuberculosis PNGs but no {_META_NAME}, so it may be "
            "the real dataset: set data.root to an empty folder or an existing phantom set."
        )
    if _read_meta(meta_path) != {**wanted, "note": _NOTE}:
        # Written before any image, so the PNGs on disk always match the json's settings.
        atomic_write_json(meta_path, {**wanted, "note": _NOTE})

    items: list[tuple[Path, int]] = []
    for label, count in ((0, num_normal), (1, num_tb)):
        (root / CLASS_NAMES[label]).mkdir(exist_ok=True)
        items += [(phantom_path(root, label, i), label) for i in range(1, count + 1)]
    jobs = [
        (str(root), label, int(p.stem.rsplit("-", 1)[1]), seed, image_size, lesions)
        for p, label in items
        if not p.is_file()
    ]
    if jobs:
        start = time.perf_counter()
        _generate(jobs, progress, workers)
        log.info(
            "Generated %d synthetic phantom CXR images (not medical data) in %s (%.1f s)",
            len(jobs),
            root,
            time.perf_counter() - start,
        )
    return items


def _remove_stale_tmp(paths: Iterable[Path]) -> None:
    now = time.time()
    for p in paths:
        if _TMP_RE.match(p.name):
            # FileNotFoundError: another process finished or removed it meanwhile.
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    p.unlink()


def _generate(jobs: list[tuple[str, int, int, int, int]], progress: bool, workers: int | None):
    if workers is None:
        workers = min(os.cpu_count() or 1, 16) if len(jobs) > _PARALLEL_MIN else 1
    workers = min(workers, -(-len(jobs) // 8))  # at least one chunk of 8 per process
    # A bar at a terminal, a log line every 10 % elsewhere (core/progress.py).
    with report_progress(
        "Generating phantom CXR images", len(jobs), enabled=progress, logger=log
    ) as bar:
        if workers > 1:
            try:
                with (
                    concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool,
                    cancel_pending_on_stop(pool),
                ):
                    for _ in pool.map(_render_and_write, jobs, chunksize=8):
                        raise_if_stopped()  # a safe point for Ctrl-C / SIGTERM
                        bar.update(1)
                return
            except (OSError, RuntimeError, concurrent.futures.process.BrokenProcessPool) as exc:
                # A stop signal sent to the whole process group (kill -- -PGID, scancel) also
                # ends the pool's workers: that is the stop, not a reason to go on serially.
                raise_if_stopped()
                # e.g. no __main__ guard under spawn, or no /dev/shm: finish serially instead.
                log.warning("Parallel phantom generation failed (%s); continuing serially", exc)
                jobs = [j for j in jobs if not phantom_path(Path(j[0]), j[1], j[2]).is_file()]
                bar.reset(total=len(jobs))
        for job in jobs:
            raise_if_stopped()  # a safe point for Ctrl-C / SIGTERM (core/signals.py)
            _render_and_write(job)
            bar.update(1)
