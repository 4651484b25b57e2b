"""Look-alike kidney CT slices from a second renderer, to check that training defaults hold on
data they were not tuned on.

:func:`synthesize` writes the same Kaggle layout as :mod:`kidney_edge.phantoms.classic`, through
the same writer (:func:`kidney_edge.phantoms.kaggle_layout.write_phantom`), but draws every slice
with its own anatomy model, built from signed-distance shapes placed in millimetres:

- a superellipse body (flatter at the back) with skin, subcutaneous fat of varying thickness and
  a muscle wall split by a fat plane; a vertebra with pedicles, laminae and processes; psoas,
  quadratus and paraspinal muscles; aorta, IVC and renal vessels; liver, gallbladder, spleen
  tip, colon with stool and gas, small-bowel loops with air-fluid levels; posterior ribs; the
  couch, and sometimes the arms;
- bean-shaped kidneys (a hilar notch facing anteromedially) with renal sinus fat, a pelvis and
  calyces holding urine, and spoke-like medullary pyramids in the corticomedullary phase;
- findings in one kidney: stones of 5-14 mm (2-8 px at 224 px) in a calyx or the pelvis; cysts, a
  quarter of them hyperdense (50-85 HU, not water-dark); tumours as lobulated, heterogeneous,
  often necrotic masses that bulge out of the kidney;
- calcifications outside the collecting system on any class (aortic wall plaques, gallstones,
  dense bowel contents, oral contrast), so "a bright dot" is not a shortcut.

Acquisition varies per patient: image side (0.75-1.25 x ``size``), field of view (the body fills
75-100 % of the width), contrast phase, reconstruction kernel, window, low-dose noise with a
ramp-filtered noise power spectrum, and JPEG quality 60-95. Patients are drawn from a few
body-habitus archetypes, so different patients look alike. Each patient is 3-6 consecutive
slices (the anatomy drifts by a millimetre or two, the finding is cut at 75-100 % of its widest
section) and ~3 % of files are byte copies filed under another number.

``difficulty`` (0.25-4, default 1) scales findings (size x difficulty^-0.5, tumour contrast
x difficulty^-0.3), noise (x difficulty^0.5), how often look-alike calcifications appear and
the share of non-contrast studies. numpy + Pillow only; deterministic for a seed.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from kidney_edge.errors import InputError
from kidney_edge.phantoms.kaggle_layout import (
    DEFAULT_DIFFICULTY,
    FINDINGS,
    KAGGLE_CLASS_COUNTS,
    CopyNumbering,
    DrawnSlice,
    PhantomConfig,
    PhantomSummary,
    Planning,
    ProgressFn,
    balanced_runs,
    write_phantom,
)

SLICES_PER_PATIENT = (3, 6)  # inclusive range of consecutive slices per patient
# Image side per patient as a multiple of the nominal size: 384, 448, 512 or 640 px at 512.
SIZE_FACTORS = (0.75, 0.875, 1.0, 1.25)
JPEG_QUALITY = (60, 95)  # inclusive range, drawn per patient
PATIENTS_PER_HABITUS = 4  # patients sharing one body-habitus archetype, on average
# The acquisition of every patient with ``one_scanner``: the nominal image side, a standard
# kernel at 20 HU noise, an abdominal window, JPEG quality 90 and the body filling 87.5 % of the
# field of view; contrast phase and anatomy still vary. It separates "cannot see the finding"
# from "cannot generalise across scanners" in a learnability check.
ONE_SCANNER = {"noise_hu": 20.0, "level": 50.0, "width": 400.0, "quality": 90, "fill": 0.875}
AIR, FAT, WATER, MUSCLE = -1000.0, -100.0, 8.0, 50.0
CALCIUM_HU = 400.0  # stones and calcifications are drawn above this; soft tissue stays below 300


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class _Radial:
    """A star-shaped outline about (x, y): rotated (super)ellipse, lobulated, optionally notched.

    The signed distance is measured along the ray from the centre (exact for circles, close
    for the convex-ish shapes drawn here). ``back`` is the half-axis for v > 0 (posterior);
    ``lobes`` are (relative amplitude, phase) of harmonics k = 2, 3, ...; ``notch`` indents the
    outline by that fraction around the direction ``notch_at`` (rad, shape frame).
    """

    x: float
    y: float
    a: float
    b: float
    angle: float = 0.0
    power: float = 2.0
    back: float | None = None
    lobes: tuple[tuple[float, float], ...] = ()
    notch: float = 0.0
    notch_at: float = 0.0
    notch_width: float = 0.5

    def box(self) -> tuple[float, float, float, float]:
        reach = max(self.a, self.b, self.back or 0.0) * (1.0 + sum(abs(amp) for amp, _ in self.lobes))
        return self.x - reach, self.y - reach, self.x + reach, self.y + reach

    def distance(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = px - self.x + 1e-3, py - self.y  # the offset keeps the centre off the singular ray
        u, v = dx * c + dy * s, dy * c - dx * s
        b = self.b if self.back is None else np.where(v > 0, self.back, self.b)
        if self.power == 2.0:
            norm = np.sqrt((u / self.a) ** 2 + (v / b) ** 2)
        else:
            norm = (np.abs(u / self.a) ** self.power + np.abs(v / b) ** self.power) ** (1.0 / self.power)
        rho = np.sqrt(u * u + v * v)
        boundary = rho / np.maximum(norm, 1e-9)
        if self.lobes or self.notch:
            boundary = boundary * self._modulation(u / rho, v / rho)
        return rho - boundary

    def _modulation(self, cos_t: np.ndarray, sin_t: np.ndarray) -> np.ndarray:
        ray = cos_t + 1j * sin_t  # e^{i theta}; its k-th power gives cos(k theta) without arctan
        scale = np.ones(cos_t.shape, dtype=np.float32)
        power = ray
        for amp, phase in self.lobes:
            power = power * ray
            scale += amp * (power * complex(math.cos(phase), math.sin(phase))).real
        if self.notch:
            toward = cos_t * math.cos(self.notch_at) + sin_t * math.sin(self.notch_at)
            scale *= 1.0 - self.notch * np.exp((toward - 1.0) / self.notch_width**2)
        return scale


@dataclass(frozen=True)
class _Capsule:
    """All points within ``r`` of the segment (x0, y0)-(x1, y1); a disc when the ends coincide."""

    x0: float
    y0: float
    x1: float
    y1: float
    r: float

    def box(self) -> tuple[float, float, float, float]:
        return (
            min(self.x0, self.x1) - self.r,
            min(self.y0, self.y1) - self.r,
            max(self.x0, self.x1) + self.r,
            max(self.y0, self.y1) + self.r,
        )

    def distance(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        ex, ey = self.x1 - self.x0, self.y1 - self.y0
        length2 = ex * ex + ey * ey
        t = np.clip(((px - self.x0) * ex + (py - self.y0) * ey) / length2, 0.0, 1.0) if length2 else 0.0
        return np.sqrt((px - self.x0 - t * ex) ** 2 + (py - self.y0 - t * ey) ** 2) - self.r


def _disc(x: float, y: float, r: float) -> _Capsule:
    return _Capsule(x, y, x, y, r)


_Shape = _Radial | _Capsule
Fill = float | Callable[[tuple[slice, slice]], np.ndarray]


class _Canvas:
    """Hounsfield units on a square pixel grid; shapes are placed in mm about the body centre.

    ``texture`` and ``grain`` are unit-variance fields the size of ``hu`` (smooth organ
    heterogeneity and fine mottle); ``edge_mm`` is the width of a blurred border, which stands
    in for the scanner's point-spread function and anti-aliases small shapes.
    """

    def __init__(
        self,
        hu: np.ndarray,
        mm_per_px: float,
        centre: tuple[float, float],
        edge_mm: float,
        texture: np.ndarray,
        grain: np.ndarray,
    ) -> None:
        self.hu, self.mm, self.centre, self.edge = hu, mm_per_px, centre, edge_mm
        self.texture, self.grain = texture, grain

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        return self.centre[0] + x / self.mm, self.centre[1] + y / self.mm

    def coverage(self, shape: _Shape) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """(region, 0..1 coverage on it) of ``shape``, or None when it misses the image."""
        x0, y0, x1, y1 = shape.box()
        pad = self.edge
        (c0, r0), (c1, r1) = self.to_px(x0 - pad, y0 - pad), self.to_px(x1 + pad, y1 + pad)
        height, width = self.hu.shape
        c0, r0 = max(0, int(c0)), max(0, int(r0))
        c1, r1 = min(width, int(c1) + 2), min(height, int(r1) + 2)
        if c0 >= c1 or r0 >= r1:
            return None
        px = ((np.arange(c0, c1, dtype=np.float32) - self.centre[0]) * self.mm)[None, :]
        py = ((np.arange(r0, r1, dtype=np.float32) - self.centre[1]) * self.mm)[:, None]
        weight = np.clip(0.5 - shape.distance(px, py) / self.edge, 0.0, 1.0)
        return (slice(r0, r1), slice(c0, c1)), weight

    def paint(
        self,
        shape: _Shape,
        value: Fill,
        *,
        tex: float = 0.0,
        grain: float = 0.0,
        within: np.ndarray | None = None,
        below_y: float | None = None,
        mask: np.ndarray | None = None,
    ) -> None:
        """Blend ``value`` (+ ``tex``/``grain`` HU of texture) into the shape's coverage.

        ``within``: a full-size coverage the shape is clipped to; ``below_y``: only below this
        height in mm (an air-fluid level); ``mask``: a full-size array that keeps the maximum
        of itself and the coverage (where the shape is, for tests and the truth file).
        """
        found = self.coverage(shape)
        if found is None:
            return
        region, weight = found
        if within is not None:
            weight = weight * within[region]
        if below_y is not None:
            rows = (np.arange(region[0].start, region[0].stop, dtype=np.float32) - self.centre[1]) * self.mm
            weight = weight * np.clip(0.5 + (rows[:, None] - below_y) / self.edge, 0.0, 1.0)
        fill = value(region) if callable(value) else value
        if tex:
            fill = fill + tex * self.texture[region]
        if grain:
            fill = fill + grain * self.grain[region]
        target = self.hu[region]
        target += weight * (fill - target)
        if mask is not None:
            np.maximum(mask[region], weight, out=mask[region])


# ----------------------------------------------------------------------------- random fields


@dataclass(frozen=True)
class _Fields:
    """Pre-computed random fields that patients and slices read windows of (cheap per slice)."""

    noise: dict[str, np.ndarray]  # kernel -> unit-std noise with that kernel's noise power spectrum
    texture: np.ndarray  # unit std, blobs ~6 px across (FWHM): organ heterogeneity
    grain: np.ndarray  # unit std, ~1.6 px across: mottle, stool, tumour texture


# Reconstruction kernels: (apodisation cut-off in cycles/px, relative noise std). Filtered back
# projection gives a noise power spectrum ~ f * apodisation(f)^2: no power at DC, a peak at mid
# frequencies that moves up for sharper kernels (Boedeker et al., Phys Med Biol 2007).
_KERNELS = {"soft": (0.28, 0.75), "standard": (0.4, 1.0), "sharp": (0.5, 1.35)}


def _make_fields(rng: np.random.Generator, side: int) -> _Fields:
    fy = np.fft.fftfreq(side).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(side).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)

    def shaped(amplitude: np.ndarray) -> np.ndarray:
        white = np.fft.rfft2(rng.standard_normal((side, side), dtype=np.float32))
        field_ = np.fft.irfft2(white * amplitude, s=(side, side)).astype(np.float32)
        return field_ / max(float(field_.std()), 1e-6)

    noise = {}
    for kernel, (cutoff, _) in _KERNELS.items():
        apodisation = np.where(f < cutoff, 0.5 + 0.5 * np.cos(np.pi * f / cutoff), 0.0)
        noise[kernel] = shaped(np.sqrt(f) * apodisation)
    texture = shaped(np.exp(-((f * 12.0) ** 2)))
    grain = shaped(np.exp(-((f * 3.0) ** 2)))
    return _Fields(noise, texture, grain)


def _window_of(field_: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """A random ``side`` x ``side`` window of a field, randomly flipped or transposed (a view)."""
    top, left = rng.integers(0, field_.shape[0] - side + 1, size=2)
    window = field_[top : top + side, left : left + side]
    turn = int(rng.integers(0, 8))
    if turn & 1:
        window = window[::-1]
    if turn & 2:
        window = window[:, ::-1]
    return window.T if turn & 4 else window


# ----------------------------------------------------------------------------- patients


@dataclass(frozen=True)
class _Habitus:
    """A body-habitus archetype; the patients drawn from one look alike. Lengths in mm."""

    half_width: float
    front: float  # half depth, anterior
    back: float  # half depth, posterior
    squareness: float  # superellipse exponent of the outline
    fat_front: float
    fat_back: float
    wall: float
    spine_depth: float  # back skin to the centre of the vertebral body
    kidney_spread: float  # midline to kidney centre
    kidney_tilt: float  # rad between the kidney's long axis and the sagittal plane
    liver_reach: float  # 0..1: how much liver this level cuts
    fill: float  # body width / field of view
    layout: int  # seed of organ and bowel placement, shared by the archetype


def _draw_habitus(rng: np.random.Generator) -> _Habitus:
    fat_front = rng.uniform(8, 48)
    fat_back = fat_front * rng.uniform(0.5, 0.9)
    return _Habitus(
        half_width=rng.uniform(138, 188),
        front=rng.uniform(98, 140),
        back=rng.uniform(86, 112),
        squareness=rng.uniform(2.2, 3.1),
        fat_front=fat_front,
        fat_back=fat_back,
        wall=rng.uniform(6, 12),
        spine_depth=fat_back + rng.uniform(62, 78),
        kidney_spread=rng.uniform(62, 84),
        kidney_tilt=rng.uniform(0.35, 0.8),
        liver_reach=rng.uniform(0.35, 1.0),
        fill=rng.uniform(0.75, 1.0),
        layout=int(rng.integers(0, 2**31)),
    )


def _jitter(habitus: _Habitus, rng: np.random.Generator) -> _Habitus:
    """The same archetype, a few per cent larger or smaller here and there."""
    changes = {
        name: getattr(habitus, name) * float(rng.normal(1.0, 0.03))
        for name in ("half_width", "front", "back", "fat_front", "fat_back", "wall", "spine_depth")
    }
    changes["fill"] = float(np.clip(habitus.fill * rng.normal(1.0, 0.03), 0.7, 1.02))
    return replace(habitus, **changes)


@dataclass(frozen=True)
class _Phase:
    """Organ attenuations (HU) of one contrast phase."""

    name: str
    liver: float
    spleen: float
    cortex: float
    medulla: float
    artery: float
    vein: float
    bowel_wall: float


_PHASE_NAMES = ("non-contrast", "portal-venous", "corticomedullary")


def _draw_phase(rng: np.random.Generator, difficulty: float) -> _Phase:
    plain = min(0.7, 0.15 * difficulty)  # non-contrast studies hide cysts and tumours best
    name = _PHASE_NAMES[int(rng.choice(3, p=[plain, 0.65 * (1 - plain), 0.35 * (1 - plain)]))]
    u = rng.uniform
    if name == "non-contrast":
        cortex = u(32, 42)
        return _Phase(name, u(52, 66), u(42, 52), cortex, cortex, u(36, 46), u(36, 46), u(35, 45))
    if name == "portal-venous":
        cortex = u(145, 175)
        return _Phase(
            name, u(98, 122), u(105, 125), cortex, cortex - u(0, 12), u(140, 180), u(135, 170), u(70, 95)
        )
    return _Phase(name, u(70, 92), u(115, 160), u(165, 200), u(70, 100), u(220, 300), u(90, 130), u(80, 110))


@dataclass(frozen=True)
class _Kidney:
    side: str  # the patient's side: "right" is drawn on the image's left
    x: float
    y: float
    a: float  # half long axis of the axial section, mm
    b: float
    angle: float  # long axis, rad in the image frame
    hilum: float  # direction of the hilum, rad in the image frame (anteromedial)
    lobes: tuple[tuple[float, float], ...]
    z_offset: float  # mm from this kidney's widest section to slice 0
    pelvis: float  # radius of the renal pelvis, mm
    extrarenal: bool  # the pelvis bulges out of the hilum
    calyces: tuple[tuple[float, float], ...]  # cup centres as (along long axis, towards hilum) / (a, b)


def _draw_kidneys(rng: np.random.Generator, habitus: _Habitus, spine_y: float) -> list[_Kidney]:
    kidneys = []
    for side, mirror in (("right", -1.0), ("left", 1.0)):
        tilt = habitus.kidney_tilt + rng.normal(0, 0.08)
        turn = rng.uniform(0.3, 0.8)  # hilum turned from medial towards anterior
        kidneys.append(
            _Kidney(
                side=side,
                x=mirror * (habitus.kidney_spread + rng.normal(0, 3)),
                y=spine_y + rng.uniform(-8, 14),
                a=rng.uniform(30, 38),
                b=rng.uniform(21, 27),
                angle=math.pi / 2 + mirror * tilt,
                hilum=math.atan2(-math.sin(turn), -mirror * math.cos(turn)),
                lobes=tuple((rng.uniform(0.0, 0.025), rng.uniform(0, 2 * np.pi)) for _ in range(4)),
                z_offset=rng.uniform(-18, 18),
                pelvis=rng.uniform(3.5, 6.5),
                extrarenal=bool(rng.random() < 0.15),
                calyces=tuple((rng.uniform(0.3, 0.6) * sign, rng.uniform(-0.15, 0.15)) for sign in (-1, 1))
                + ((rng.uniform(-0.2, 0.2), rng.uniform(-0.45, -0.25)),),
            )
        )
    return kidneys


@dataclass(frozen=True)
class _Scan:
    """How one patient was imaged and stored."""

    side: int  # image side, px
    mm_per_px: float
    centre: tuple[float, float]  # body centre in the image, px
    margin: int  # px of room around the image for the anatomy's drift between slices
    kernel: str
    noise_hu: float
    edge_mm: float
    level: float
    width: float
    quality: int
    spacing_mm: float  # between consecutive slices
    drift: tuple[float, float]  # px of anatomy shift per slice


def _draw_scan(
    rng: np.random.Generator, habitus: _Habitus, phase: _Phase, size: int, difficulty: float, one_scanner: bool
) -> _Scan:
    side = max(16, int(round(size * float(rng.choice(SIZE_FACTORS)) / 8)) * 8)
    mm_per_px = 2 * habitus.half_width / habitus.fill / side
    kernel = str(rng.choice(list(_KERNELS), p=[0.3, 0.5, 0.2]))
    # Low-dose abdominal CT: 10-30 HU in a standard kernel, more for larger patients.
    noise = math.exp(rng.uniform(math.log(10), math.log(30))) * (habitus.half_width / 160) ** 1.5
    noise *= _KERNELS[kernel][1] * difficulty**0.5
    width = rng.uniform(360, 500)
    level = max(rng.uniform(35, 65), phase.cortex + 70 - width / 2)  # cortex stays below white
    offset = rng.normal(0, 0.03, size=2) * side
    edge_mm = rng.uniform(0.7, 1.2)
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    spacing_mm = rng.uniform(1.5, 5.0)
    drift = (rng.normal(0, 0.6), rng.normal(0, 0.6))
    if one_scanner:  # every draw above is still made, so patients and findings stay the same
        side, kernel, width, quality = size, "standard", ONE_SCANNER["width"], ONE_SCANNER["quality"]
        mm_per_px = 2 * habitus.half_width / ONE_SCANNER["fill"] / side
        noise = ONE_SCANNER["noise_hu"] * difficulty**0.5
        level = max(ONE_SCANNER["level"], phase.cortex + 70 - width / 2)
        offset = np.zeros(2)
    return _Scan(
        side=side,
        mm_per_px=mm_per_px,
        centre=(side / 2 + offset[0], side / 2 + offset[1] + 0.02 * side),
        margin=int(math.ceil(6.0 / mm_per_px)) + 2,
        kernel=kernel,
        noise_hu=min(noise, 80.0),
        edge_mm=max(mm_per_px, edge_mm),
        level=level,
        width=width,
        quality=quality,
        spacing_mm=spacing_mm,
        drift=drift,
    )


@dataclass(frozen=True)
class _Finding:
    """One kidney's finding as a 3-D object cut by the slices; positions in mm."""

    kind: str  # "none", "cyst", "stone", "tumor"
    kidney: int  # index into the patient's kidneys
    x: float
    y: float
    radius: float  # at the widest section
    hu: float
    z: float  # mm from slice 0's plane to the widest section
    extent: float  # mm: half height of the object along z
    lobes: tuple[tuple[float, float], ...] = ()
    angle: float = 0.0
    necrosis: float = 0.0  # relative radius of a necrotic core (tumours)
    extra_stones: tuple[tuple[float, float, float, float], ...] = ()  # (x, y, radius, z) in mm


@dataclass
class _Patient:
    habitus: _Habitus
    phase: _Phase
    scan: _Scan
    kidneys: list[_Kidney]
    base: np.ndarray  # (side + 2 margin)^2 float32 HU of everything but the kidneys
    texture: np.ndarray  # same shape
    grain: np.ndarray
    noise_gain: np.ndarray  # same shape: noise is stronger where the body is thicker
    confounders: tuple[str, ...]


# ----------------------------------------------------------------------------- anatomy


def _paint_body(cv: _Canvas, h: _Habitus, rng: np.random.Generator) -> np.ndarray:
    """Skin, fat, muscle wall with a fat plane, abdominal cavity. Returns the cavity coverage."""
    outline = _Radial(0.0, 0.0, h.half_width, h.front, power=h.squareness, back=h.back)
    side = cv.hu.shape[0]
    px = ((np.arange(side, dtype=np.float32) - cv.centre[0]) * cv.mm)[None, :]
    py = ((np.arange(side, dtype=np.float32) - cv.centre[1]) * cv.mm)[:, None]
    depth = -outline.distance(px, py)  # (side, side) mm inside the skin
    front = np.clip(0.5 - py / (h.front + h.back), 0.0, 1.0)  # 1 anteriorly, 0 at the back
    fat = h.fat_back + (h.fat_front - h.fat_back) * front + 0.8 * cv.texture
    hu = cv.hu

    def layer(inner: np.ndarray | float, value: np.ndarray | float) -> np.ndarray:
        weight = np.clip(0.5 + (depth - inner) / cv.edge, 0.0, 1.0)
        hu[...] += weight * (value - hu)
        return weight

    layer(0.0, 35.0)  # skin
    layer(2.0, FAT + 6.0 * cv.grain)
    layer(fat, MUSCLE + 5.0 * cv.grain)
    plane = fat + h.wall * rng.uniform(0.35, 0.6)
    hu += np.clip(1.0 - np.abs(depth - plane) / 0.9, 0.0, 1.0) * (FAT + 20 - hu)  # fat between the obliques
    return layer(fat + h.wall, FAT + 12 + 8.0 * cv.texture)  # retroperitoneal and mesenteric fat


def _paint_spine(cv: _Canvas, y: float, rng: np.random.Generator) -> None:
    """Back muscles, then the vertebra: body, canal, pedicles, laminae, processes."""
    a, b = rng.uniform(20, 25), rng.uniform(16, 20)
    tail = y + b
    for m in (-1.0, 1.0):
        cv.paint(_Radial(m * 27, tail + 30, 21, 16, angle=m * 0.2), MUSCLE + 4, tex=4)  # erector spinae
        cv.paint(_Radial(m * 54, tail + 4, 17, 9, angle=m * 0.45), MUSCLE, tex=4)  # quadratus lumborum
        cv.paint(_Radial(m * (a + 11), y - 3, 11, 16, angle=-m * 0.3), MUSCLE + 2, tex=4)  # psoas
    marrow = rng.uniform(170, 290)
    cv.paint(_Radial(0, y, a, b, power=2.6), 700.0)
    cv.paint(_Radial(0, y, a - 2.5, b - 2.5, power=2.6), marrow, grain=35)
    for m in (-1.0, 1.0):
        cv.paint(_Capsule(m * 9, tail - 3, m * 11, tail + 12, 3.5), 600.0)  # pedicle
        cv.paint(_Capsule(m * 11, tail + 12, 0, tail + 20, 3.0), 600.0)  # lamina
        transverse = _Capsule(m * 14, tail + 6, m * rng.uniform(28, 36), tail + rng.uniform(0, 8), 2.8)
        cv.paint(transverse, rng.uniform(380, 520))
    cv.paint(_Capsule(0, tail + 20, 0, tail + rng.uniform(32, 42), 3.0), 560.0)  # spinous process
    cv.paint(_Radial(0, tail + 8, 8.5, 7.0), 25.0)  # canal with the cord


def _paint_vessels(
    cv: _Canvas, phase: _Phase, spine_y: float, kidneys: list[_Kidney], rng: np.random.Generator
) -> tuple[float, float, float]:
    """Aorta, IVC and renal veins/arteries. Returns the aorta's (x, y, radius)."""
    aorta = (rng.uniform(4, 14), spine_y - rng.uniform(30, 36), rng.uniform(9.5, 13))
    ivc = (rng.uniform(-26, -18), spine_y - rng.uniform(26, 32))
    for kid in kidneys:
        hx = kid.x + math.cos(kid.hilum) * kid.b * 0.9
        hy = kid.y + math.sin(kid.hilum) * kid.b * 0.9
        # Thin and partial-volumed: a renal artery is 5-6 mm wide and runs obliquely to the slice.
        cv.paint(_Capsule(hx, hy + 3, aorta[0], aorta[1], 1.4), 0.5 * (phase.artery + MUSCLE))
        vein = rng.uniform(3.0, 4.0)
        if kid.side == "left":  # the left renal vein crosses in front of the aorta
            bend = (aorta[0], aorta[1] - aorta[2] - 4)
            cv.paint(_Capsule(hx, hy, *bend, vein), phase.vein)
            cv.paint(_Capsule(*bend, *ivc, vein), phase.vein)
        else:
            cv.paint(_Capsule(hx, hy, *ivc, vein), phase.vein)
    cv.paint(_Radial(ivc[0], ivc[1], 14, 8.5, angle=rng.uniform(-0.3, 0.3)), phase.vein)
    cv.paint(_disc(*aorta), phase.artery)
    return aorta


def _paint_organs(
    cv: _Canvas, h: _Habitus, phase: _Phase, cavity: np.ndarray, rng: np.random.Generator, gallbladder: bool
) -> tuple[float, float] | None:
    """Liver (image left), spleen tip (image right), gallbladder. Returns the gallbladder centre."""
    reach = h.liver_reach
    lobes = tuple((rng.uniform(0, 0.08), rng.uniform(0, 2 * np.pi)) for _ in range(3))
    liver = _Radial(
        -h.half_width * 0.62,
        -h.front * 0.35,
        h.half_width * 0.32 * reach + 10,
        h.front * 0.5 * reach + 10,
        angle=rng.uniform(-0.3, 0.3),
        lobes=lobes,
    )
    cv.paint(liver, phase.liver, tex=7, grain=3, within=cavity)
    if rng.random() < 0.6:
        spleen = _Radial(
            h.half_width * 0.62,
            h.back * 0.15,
            rng.uniform(16, 26),
            rng.uniform(26, 38),
            angle=rng.uniform(-0.7, -0.3),
        )
        cv.paint(spleen, phase.spleen, tex=5, within=cavity)
    if not gallbladder:
        return None
    centre = (-h.half_width * rng.uniform(0.2, 0.35), -h.front * rng.uniform(0.25, 0.45))
    cv.paint(
        _Radial(*centre, rng.uniform(11, 16), rng.uniform(17, 26), angle=rng.uniform(0, np.pi)),
        rng.uniform(2, 18),
        within=cavity,
    )
    return centre


def _paint_bowel(
    cv: _Canvas,
    h: _Habitus,
    phase: _Phase,
    cavity: np.ndarray,
    spine_y: float,
    rng: np.random.Generator,
    oral_contrast: bool,
    dense_dots: bool,
) -> None:
    """Colon on both flanks (stool, gas) and small-bowel loops with air-fluid levels."""
    for x in (-h.half_width * 0.62, h.half_width * 0.66):
        r = rng.uniform(13, 21)
        y = -h.front * rng.uniform(0.1, 0.35)  # anterolateral to the kidneys
        cv.paint(_disc(x, y, r), phase.bowel_wall, within=cavity)
        cv.paint(_disc(x, y, r - 2.5), rng.uniform(-70, 10), grain=45, within=cavity)  # stool
        for _ in range(int(rng.integers(1, 5))):
            t, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6) * r
            cv.paint(
                _disc(x + d * math.cos(t), y + d * math.sin(t), rng.uniform(1.5, 0.4 * r)),
                -950.0,
                within=cavity,
            )
    dots = int(rng.integers(1, 4)) if dense_dots else 0
    for i in range(int(rng.integers(6, 14))):
        x = rng.uniform(-0.45, 0.5) * h.half_width
        y = rng.uniform(-0.85 * h.front, spine_y - 45)
        r = rng.uniform(7, 15)
        loop = _Radial(x, y, r, r * rng.uniform(0.6, 1.0), angle=rng.uniform(0, np.pi))
        cv.paint(loop, phase.bowel_wall, within=cavity)
        inner = replace(loop, a=loop.a - 2.5, b=loop.b - 2.5)
        content = rng.uniform(250, 480) if oral_contrast and rng.random() < 0.6 else rng.uniform(5, 30)
        if rng.random() < 0.35:  # gas rises: an air-fluid level across the loop
            cv.paint(inner, -950.0, within=cavity)
            cv.paint(inner, content, within=cavity, below_y=y + rng.uniform(-0.4, 0.4) * inner.b)
        else:
            cv.paint(inner, content, grain=6, within=cavity)
        if i < dots:  # a pill fragment or dense residue: a calcium-bright dot outside the kidney
            cv.paint(
                _disc(x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), rng.uniform(1.2, 2.8)),
                rng.uniform(450, 1200),
            )


def _paint_ribs(cv: _Canvas, h: _Habitus, rng: np.random.Generator) -> None:
    """Cross-sections of the lower ribs along the posterolateral wall."""
    for m in (-1.0, 1.0):
        for _ in range(int(rng.integers(0, 4))):
            t = rng.uniform(0.25, 1.0)  # rad from the lateral point towards the back
            inset = h.fat_back + h.wall * 0.6
            x = m * (h.half_width - inset) * math.cos(t)
            y = (h.back - inset) * math.sin(t)
            dx, dy = -m * math.sin(t) * rng.uniform(3, 9), math.cos(t) * rng.uniform(3, 9)
            r = rng.uniform(3.5, 5.0)
            cv.paint(_Capsule(x - dx, y - dy, x + dx, y + dy, r), 650.0)
            cv.paint(_Capsule(x - dx, y - dy, x + dx, y + dy, r - 1.1), rng.uniform(150, 250))


def _paint_couch(cv: _Canvas, h: _Habitus, rng: np.random.Generator) -> None:
    """A two-shell carbon couch curving up at the sides, under the back.

    Drawn before the body, which covers it where they touch; only the rows of its band are touched.
    """
    top, depth = h.back + rng.uniform(0, 12), rng.uniform(22, 30)
    height, width = cv.hu.shape
    r0 = max(0, int(cv.centre[1] + (top - 70) / cv.mm))
    r1 = min(height, int(cv.centre[1] + (top + depth + 5) / cv.mm) + 1)
    if r0 >= r1:
        return
    rows = ((np.arange(r0, r1, dtype=np.float32) - cv.centre[1]) * cv.mm)[:, None]
    cols = ((np.arange(width, dtype=np.float32) - cv.centre[0]) * cv.mm)[None, :]
    band = cv.hu[r0:r1]
    for offset, thick, value in ((0.0, 2.5, 280.0), (depth, 2.0, 230.0)):
        curve = top + offset - 0.0009 * cols * cols  # rises ~20 mm at 150 mm from the midline
        band += np.clip(0.5 + (thick / 2 - np.abs(rows - curve)) / cv.edge, 0.0, 1.0) * (value - band)


def _paint_arms(cv: _Canvas, h: _Habitus, rng: np.random.Generator) -> None:
    """Arms resting beside the body, when the field of view is wide enough to show them."""
    if h.fill > 0.85 or rng.random() > 0.3:
        return
    for m in (-1.0, 1.0):
        x, r = m * (h.half_width + rng.uniform(25, 40)), rng.uniform(32, 42)
        cv.paint(_Radial(x, 0.0, r, r * 1.15), FAT)
        cv.paint(_Radial(x, 0.0, r - 6, r * 1.15 - 6), MUSCLE, tex=4)
        cv.paint(_disc(x + rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(8, 11)), 750.0)


def _paint_aortic_calcium(cv: _Canvas, aorta: tuple[float, float, float], rng: np.random.Generator) -> None:
    """Atherosclerotic plaques: bright flecks on the aortic wall."""
    x, y, r = aorta
    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0, 2 * np.pi)
        cv.paint(
            _disc(x + r * math.cos(t), y + r * math.sin(t), rng.uniform(0.8, 2.2)), rng.uniform(500, 1100)
        )


def _paint_gallstones(cv: _Canvas, centre: tuple[float, float], rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(1.5, 4.5)
        cv.paint(
            _disc(centre[0] + rng.uniform(-6, 6), centre[1] + rng.uniform(-8, 8), r), rng.uniform(350, 900)
        )


def _build_patient(
    rng: np.random.Generator,
    habitus: _Habitus,
    fields: _Fields,
    size: int,
    difficulty: float,
    one_scanner: bool = False,
) -> _Patient:
    """Draw one patient: habitus jittered, scan protocol, everything but the kidneys painted once."""
    h = _jitter(habitus, rng)
    phase = _draw_phase(rng, difficulty)
    scan = _draw_scan(rng, h, phase, size, difficulty, one_scanner)
    full = scan.side + 2 * scan.margin
    texture, grain = _window_of(fields.texture, rng, full), _window_of(fields.grain, rng, full)
    cv = _Canvas(
        np.full((full, full), AIR, np.float32),
        scan.mm_per_px,
        (scan.centre[0] + scan.margin, scan.centre[1] + scan.margin),
        scan.edge_mm,
        texture,
        grain,
    )
    layout = np.random.default_rng(h.layout)  # placement shared by the archetype
    rate = min(1.5, difficulty**0.5)  # look-alike calcifications: rarer on easy sets
    confounders = tuple(
        name
        for name, p in (
            ("aortic-calcium", 0.25),
            ("gallstones", 0.08),
            ("bowel-dots", 0.12),
            ("oral-contrast", 0.15),
        )
        if rng.random() < min(1.0, p * rate)
    )
    has_gallbladder = layout.random() < 0.25
    _paint_couch(cv, h, layout)
    cavity = _paint_body(cv, h, layout)
    spine_y = h.back - h.spine_depth
    kidneys = _draw_kidneys(rng, h, spine_y)
    _paint_spine(cv, spine_y, layout)
    aorta = _paint_vessels(cv, phase, spine_y, kidneys, layout)
    _paint_bowel(
        cv, h, phase, cavity, spine_y, layout, "oral-contrast" in confounders, "bowel-dots" in confounders
    )
    gallbladder = _paint_organs(cv, h, phase, cavity, layout, has_gallbladder or "gallstones" in confounders)
    _paint_ribs(cv, h, layout)
    _paint_arms(cv, h, layout)
    if "aortic-calcium" in confounders:
        _paint_aortic_calcium(cv, aorta, rng)
    if gallbladder is not None and "gallstones" in confounders:
        _paint_gallstones(cv, gallbladder, rng)
    return _Patient(h, phase, scan, kidneys, cv.hu, texture, grain, _noise_gain(cv, h), confounders)


def _noise_gain(cv: _Canvas, h: _Habitus) -> np.ndarray:
    """Noise std relative to the patient's: highest in the body's centre, where the path is longest."""
    side = cv.hu.shape[0]
    px = ((np.arange(side, dtype=np.float32) - cv.centre[0]) * cv.mm / h.half_width)[None, :] ** 2
    py = ((np.arange(side, dtype=np.float32) - cv.centre[1]) * cv.mm / h.back)[:, None] ** 2
    return np.clip(1.25 - 0.5 * (px + py), 0.75, 1.25).astype(np.float32)


# ----------------------------------------------------------------------------- kidneys and findings


def _kidney_outline(kid: _Kidney, scale: float) -> _Radial:
    return _Radial(
        kid.x,
        kid.y,
        kid.a * scale,
        kid.b * scale,
        angle=kid.angle,
        lobes=kid.lobes,
        notch=0.32,
        notch_at=kid.hilum - kid.angle,
        notch_width=0.45,
    )


def _kidney_point(kid: _Kidney, along: float, towards_hilum: float, scale: float) -> tuple[float, float]:
    """A point given as fractions of the half long axis and of the half short axis towards the hilum."""
    ax, ay = math.cos(kid.angle), math.sin(kid.angle)
    hx, hy = math.cos(kid.hilum), math.sin(kid.hilum)
    return (
        kid.x + scale * (along * kid.a * ax + towards_hilum * kid.b * hx),
        kid.y + scale * (along * kid.a * ay + towards_hilum * kid.b * hy),
    )


def _pelvis_centre(kid: _Kidney, scale: float) -> tuple[float, float]:
    return _kidney_point(kid, 0.0, 1.05 if kid.extrarenal else 0.6, scale)


def _collecting_system(kid: _Kidney, scale: float) -> list[_Shape]:
    """Pelvis, infundibula and calyx cups, which hold urine (and stones)."""
    px, py = _pelvis_centre(kid, scale)
    radius = kid.pelvis * (1.8 if kid.extrarenal else 1.0) * scale
    shapes: list[_Shape] = [_disc(px, py, radius)]
    for along, across in kid.calyces:
        cx, cy = _kidney_point(kid, along, across, scale)
        shapes.append(_Capsule(px, py, cx, cy, 1.6 * scale))
        shapes.append(_disc(cx, cy, 2.8 * scale))
    return shapes


def _paint_kidney(
    cv: _Canvas, kid: _Kidney, phase: _Phase, scale: float, kidneys: np.ndarray, system: np.ndarray
) -> None:
    """Parenchyma, pyramids, sinus fat and collecting system at this slice's ``scale``.

    Their coverages are added to ``kidneys`` and ``system`` (full-size masks).
    """
    outline = _kidney_outline(kid, scale)
    cv.paint(outline, phase.cortex, tex=4, mask=kidneys)
    if phase.medulla < phase.cortex - 20:  # corticomedullary phase: darker pyramids as spokes
        pyramids = replace(outline, a=outline.a * 0.72, b=outline.b * 0.68, lobes=())
        spokes = 6.0

        def medulla(region: tuple[slice, slice]) -> np.ndarray:
            rows = (np.arange(region[0].start, region[0].stop, dtype=np.float32) - cv.centre[1]) * cv.mm
            cols = (np.arange(region[1].start, region[1].stop, dtype=np.float32) - cv.centre[0]) * cv.mm
            theta = np.arctan2(rows[:, None] - kid.y, cols[None, :] - kid.x)
            column = np.cos(spokes * theta) ** 4  # septa of cortex between the pyramids
            return phase.medulla + (phase.cortex - phase.medulla) * column

        cv.paint(pyramids, medulla)
    sx, sy = _kidney_point(kid, 0.0, 0.55, scale)  # the sinus opens through the hilum
    sinus = _Radial(sx, sy, kid.a * 0.48 * scale, kid.b * 0.55 * scale, angle=kid.angle, lobes=kid.lobes)
    cv.paint(sinus, FAT + 35, tex=10, grain=10)
    for shape in _collecting_system(kid, scale):
        cv.paint(shape, WATER, mask=system)


def _make_finding(
    rng: np.random.Generator, patient: _Patient, kind: str, difficulty: float, half_span: float
) -> _Finding:
    """Where the finding sits, how large and how dense; ``half_span`` mm of z the slices cover."""
    k = int(rng.integers(0, 2))
    kid = patient.kidneys[k]
    grow = difficulty**-0.5
    z = half_span * rng.uniform(0.8, 1.2)  # near the middle slice (slice 0 is at z = 0)
    # Slices lie within 1.2 half_span of z, so each cuts the finding at >= 75 % of its widest section.
    extent = 1.8 * half_span + 0.5
    if kind == "none":
        return _Finding("none", k, kid.x, kid.y, 0.0, 0.0, z, extent)
    if kind == "stone":
        return _make_stones(rng, kid, k, grow, z, extent)
    around = rng.uniform(0, 2 * np.pi)
    while math.cos(around - kid.hilum) > 0.5:  # not in the hilum, where the sinus is
        around = rng.uniform(0, 2 * np.pi)
    reach = _kidney_outline(kid, 1.0).distance(
        np.float32(kid.x + math.cos(around)), np.float32(kid.y + math.sin(around))
    )
    boundary = 1.0 - float(reach)  # radial distance from the kidney centre to its outline along `around`
    if kind == "cyst":
        radius = min(rng.uniform(9, 22) * grow, 30.0)
        frac = rng.uniform(0.55, 1.0)  # cortical, often exophytic
        hyperdense = rng.random() < 0.25
        hu = rng.uniform(50, 85) if hyperdense else rng.uniform(-2, 15)
        return _Finding(
            "cyst",
            k,
            kid.x + frac * boundary * math.cos(around),
            kid.y + frac * boundary * math.sin(around),
            radius,
            hu,
            z,
            extent,
        )
    radius = min(rng.uniform(15, 32) * grow, 40.0)
    frac = rng.uniform(0.75, 1.15)  # exophytic: the centre near or beyond the outline
    parenchyma = patient.phase.cortex
    if patient.phase.name == "non-contrast":
        delta = rng.choice([-1.0, 1.0]) * rng.uniform(12, 25)
    else:
        delta = -rng.uniform(45, 90)
    lobes = tuple((rng.uniform(0.04, 0.14), rng.uniform(0, 2 * np.pi)) for _ in range(4))
    return _Finding(
        "tumor",
        k,
        kid.x + frac * boundary * math.cos(around),
        kid.y + frac * boundary * math.sin(around),
        radius,
        parenchyma + delta * difficulty**-0.3,
        z,
        extent,
        lobes=lobes,
        angle=rng.uniform(0, np.pi),
        necrosis=rng.uniform(0.35, 0.6) if rng.random() < 0.7 else 0.0,
    )


def _make_stones(
    rng: np.random.Generator, kid: _Kidney, k: int, grow: float, z: float, extent: float
) -> _Finding:
    """A main stone (on every slice) in a calyx or the pelvis, sometimes smaller ones elsewhere."""
    sites = [_pelvis_centre(kid, 1.0)] + [_kidney_point(kid, a, c, 1.0) for a, c in kid.calyces]
    order = rng.permutation(len(sites))
    # Diameter 5-14 mm, log-uniform: 2.5-8 px at 224 px for a 40 cm field of view.
    radius = min(math.exp(rng.uniform(math.log(2.5), math.log(7.0))) * grow, 12.0)
    x, y = sites[order[0]]
    extra = tuple(
        (
            sites[i][0] + rng.uniform(-1, 1),
            sites[i][1] + rng.uniform(-1, 1),
            rng.uniform(0.8, 2.0) * grow,
            rng.uniform(-6, 6),
        )
        for i in order[1 : int(rng.integers(1, 4))]
    )
    return _Finding(
        "stone",
        k,
        x + rng.uniform(-1, 1),
        y + rng.uniform(-1, 1),
        radius,
        rng.uniform(700, 1500),
        z,
        extent,
        extra_stones=extra,
    )


def _paint_finding(cv: _Canvas, finding: _Finding, z: float) -> tuple[np.ndarray, float]:
    """Paint the finding's section at height ``z``; returns (its full-size coverage, section radius mm)."""
    cover = np.zeros_like(cv.hu)
    if finding.kind == "none":
        return cover, 0.0
    section = finding.radius * math.sqrt(max(0.0, 1.0 - ((z - finding.z) / finding.extent) ** 2))
    if finding.kind == "stone":
        cv.paint(_disc(finding.x, finding.y, section), finding.hu, mask=cover)
        for x, y, r, zs in finding.extra_stones:
            part = 1.0 - ((z - zs) / (2.0 * r)) ** 2  # small stones: a sphere, seen on few slices
            if part > 0:
                cv.paint(_disc(x, y, r * math.sqrt(part)), finding.hu)
    elif finding.kind == "cyst":
        cv.paint(_Radial(finding.x, finding.y, section, section * 0.92), finding.hu, grain=2, mask=cover)
    else:
        mass = _Radial(
            finding.x, finding.y, section, section * 0.88, angle=finding.angle, lobes=finding.lobes
        )
        cv.paint(mass, finding.hu, tex=12, grain=14, mask=cover)
        if finding.necrosis:
            core = replace(mass, a=section * finding.necrosis, b=section * finding.necrosis * 0.8)
            cv.paint(replace(core, x=finding.x + 0.15 * section), 18.0, grain=10)
    return cover, section


# ----------------------------------------------------------------------------- slices


@dataclass(frozen=True)
class RenderedSlice:
    """One look-alike slice before JPEG encoding, with masks that say where things are."""

    pixels: np.ndarray  # (side, side) uint8, windowed: what the JPEG encodes
    hu: np.ndarray  # (side, side) float32 Hounsfield units before noise
    kidneys: np.ndarray  # (side, side) bool: both kidneys, the finding included
    collecting_system: np.ndarray  # (side, side) bool: pelvis and calyces
    finding: np.ndarray  # (side, side) bool: the finding's section (all False on Normal)
    finding_xy: tuple[float, float]  # px
    finding_radius_px: float


def _render(
    patient: _Patient, finding: _Finding, index: int, rng: np.random.Generator, fields: _Fields
) -> RenderedSlice:
    """Slice ``index`` of ``patient``: crop the drifting anatomy, add kidneys, finding, noise, window."""
    scan = patient.scan
    z = index * scan.spacing_mm
    m, side = scan.margin, scan.side
    ox = int(np.clip(round(m + scan.drift[0] * index + rng.normal(0, 0.3)), 0, 2 * m))
    oy = int(np.clip(round(m + scan.drift[1] * index + rng.normal(0, 0.3)), 0, 2 * m))
    window = (slice(oy, oy + side), slice(ox, ox + side))
    centre = (scan.centre[0] + m - ox, scan.centre[1] + m - oy)
    texture, grain = patient.texture[window], patient.grain[window]
    cv = _Canvas(patient.base[window].copy(), scan.mm_per_px, centre, scan.edge_mm, texture, grain)
    kidneys = np.zeros_like(cv.hu)
    system = np.zeros_like(cv.hu)
    for kid in patient.kidneys:
        scale = math.sqrt(max(0.5, 1.0 - ((z + kid.z_offset) / 60.0) ** 2))  # ~120 mm long ellipsoid
        _paint_kidney(cv, kid, patient.phase, scale, kidneys, system)
    lesion, section = _paint_finding(cv, finding, z)
    clean = cv.hu.copy()
    noise = _window_of(fields.noise[scan.kernel], rng, side)
    cv.hu += noise * patient.noise_gain[window] * scan.noise_hu
    low = scan.level - scan.width / 2
    pixels = np.clip((cv.hu - low) * (255.0 / scan.width) + 0.5, 0, 255).astype(np.uint8)
    finding_mask = lesion > 0.3
    kidney_mask = kidneys > 0.5
    if finding.kind in ("cyst", "tumor"):
        kidney_mask |= finding_mask
    return RenderedSlice(
        pixels,
        clean,
        kidney_mask,
        system > 0.5,
        finding_mask,
        cv.to_px(finding.x, finding.y),
        section / scan.mm_per_px,
    )


def _encode(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render_patient(
    class_name: str,
    *,
    seed: int = 0,
    size: int = 512,
    difficulty: float = DEFAULT_DIFFICULTY,
    n_slices: int = 4,
) -> list[RenderedSlice]:
    """Render one patient of ``class_name`` with masks, without writing files (for tests and figures).

    The same drawing code as :func:`synthesize`; the HU image is kept before noise.
    """
    if class_name not in FINDINGS:
        raise InputError(f"class must be one of {list(FINDINGS)} (got {class_name!r})")
    PhantomConfig(n=n_slices, seed=seed, size=size, difficulty=difficulty)
    rng = np.random.default_rng([seed, 23])
    fields = _make_fields(np.random.default_rng([seed, 5]), _field_side(size))
    patient = _build_patient(rng, _draw_habitus(rng), fields, size, difficulty)
    finding = _make_finding(rng, patient, FINDINGS[class_name], difficulty, _half_span(patient, n_slices))
    return [_render(patient, finding, s, rng, fields) for s in range(n_slices)]


def _half_span(patient: _Patient, n_slices: int) -> float:
    return max(0.5, (n_slices - 1) * patient.scan.spacing_mm / 2)


def _field_side(size: int) -> int:
    """Side of the random fields: room for random windows of the largest image and its margin."""
    return 2 * int(round(size * max(SIZE_FACTORS))) + 64


# ----------------------------------------------------------------------------- dataset

# phantom_truth.csv columns of this renderer, after the layout's own (kaggle_layout.TRUTH_COLUMNS).
OWN_TRUTH_COLUMNS = (
    "habitus", "size_px", "fov_mm", "kernel", "noise_hu", "window", "jpeg_quality", "hyperdense",
    "confounders", "kidneys_box",
)  # fmt: skip


class _LookalikeRenderer:
    """The look-alike phantom as a :class:`~kidney_edge.phantoms.kaggle_layout.SliceRenderer`."""

    patient_prefix = "L"
    own_truth_columns = OWN_TRUTH_COLUMNS
    # Patients of balanced run lengths; the original keeps its place in its patient's run.
    planning = Planning(balanced_runs, CopyNumbering.IN_RUN)

    def __init__(self, config: PhantomConfig, one_scanner: bool = False) -> None:
        self.config = config
        self.one_scanner = one_scanner
        self.plan_rng = np.random.default_rng([config.seed, 17])
        self.fields = _make_fields(np.random.default_rng([config.seed, 5]), _field_side(config.size))
        expected_patients = config.n / (sum(config.slices_per_patient) / 2)
        habitus_rng = np.random.default_rng([config.seed, 11])
        self.archetypes = [
            _draw_habitus(habitus_rng)
            for _ in range(max(2, math.ceil(expected_patients / PATIENTS_PER_HABITUS)))
        ]

    def draw_slices(self, class_index: int, name: str, patient: int, n_slices: int) -> Iterator[DrawnSlice]:
        config = self.config
        rng = np.random.default_rng([config.seed, 31, class_index, patient])
        habitus = int(rng.integers(0, len(self.archetypes)))
        anatomy = _build_patient(
            rng, self.archetypes[habitus], self.fields, config.size, config.difficulty, self.one_scanner
        )
        finding = _make_finding(
            rng, anatomy, FINDINGS[name], config.difficulty, _half_span(anatomy, n_slices)
        )
        for s in range(n_slices):
            rendered = _render(anatomy, finding, s, rng, self.fields)
            data = _encode(rendered.pixels, anatomy.scan.quality)
            yield DrawnSlice(data, _truth(habitus, anatomy, finding, rendered))


def synthesize(
    out_dir: str | Path,
    *,
    n: int = sum(KAGGLE_CLASS_COUNTS.values()),
    seed: int = 0,
    size: int = 512,
    difficulty: float = DEFAULT_DIFFICULTY,
    class_mix: dict[str, float] | None = None,
    slices_per_patient: tuple[int, int] = SLICES_PER_PATIENT,
    progress: ProgressFn | None = None,
    one_scanner: bool = False,
) -> PhantomSummary:
    """Write ``n`` look-alike slices to ``out_dir`` in the Kaggle layout; see the module docstring.

    Takes the same arguments as :func:`kidney_edge.phantoms.classic.synthesize`. ``size`` is the
    nominal image side: each patient is stored at one of :data:`SIZE_FACTORS` times it. Deterministic
    for its arguments but ``progress``. A previous phantom in ``out_dir`` is replaced; any other
    non-empty folder is refused. ``one_scanner`` images every patient alike (:data:`ONE_SCANNER`):
    the same patients and findings, without the acquisition nuisances.
    """
    low, high = slices_per_patient
    config = PhantomConfig(
        n=n, seed=seed, size=size, difficulty=difficulty, class_mix=class_mix, slices_per_patient=(low, high)
    )
    return write_phantom(out_dir, config, functools.partial(_LookalikeRenderer, one_scanner=one_scanner), progress)


def _truth(habitus: int, patient: _Patient, finding: _Finding, rendered: RenderedSlice) -> dict[str, object]:
    """The finding columns and this renderer's own columns of phantom_truth.csv for one slice."""
    scan, found = patient.scan, finding.kind != "none"
    parenchyma = patient.phase.cortex
    return {
        "finding": finding.kind,
        "kidney_side": patient.kidneys[finding.kidney].side if found else "",
        "lesion_x": round(rendered.finding_xy[0], 1) if found else "",
        "lesion_y": round(rendered.finding_xy[1], 1) if found else "",
        "lesion_radius_px": round(rendered.finding_radius_px, 2) if found else "",
        "lesion_contrast_hu": round(finding.hu - parenchyma, 1) if found else "",
        "phase": patient.phase.name,
        "habitus": f"H{habitus:03d}",
        "size_px": scan.side,
        "fov_mm": round(scan.side * scan.mm_per_px, 1),
        "kernel": scan.kernel,
        "noise_hu": round(scan.noise_hu, 1),
        "window": f"{scan.level:.0f}/{scan.width:.0f}",
        "jpeg_quality": scan.quality,
        "hyperdense": int(finding.kind == "cyst" and finding.hu > 40),
        "confounders": "+".join(patient.confounders),
        "kidneys_box": _box_text(rendered.kidneys),
    }


def _box_text(mask: np.ndarray) -> str:
    """``"x0 y0 x1 y1"`` (px, end-exclusive) around ``mask``'s true pixels; "" when it has none.

    The kidneys' box lets a learnability check crop the region a reader looks at (an oracle
    view), which no model input may use.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return ""
    return f"{cols[0]} {rows[0]} {cols[-1] + 1} {rows[-1] + 1}"
