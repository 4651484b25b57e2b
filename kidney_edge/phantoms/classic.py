"""The classic phantom: kidney CT slices in the Kaggle "CT KIDNEY DATASET" layout, for tests and
the demo.

The real dataset cannot be downloaded here, so :func:`synthesize` writes a stand-in that the
same code reads, through :func:`kidney_edge.phantoms.kaggle_layout.write_phantom`: 512x512 RGB
JPEGs with identical channels in class folders, the labels file and a ground-truth
``phantom_truth.csv`` (patient, slice, finding, lesion). This module only draws: it fills the
finding columns of that file and adds none of its own.

Each slice is an axial abdominal CT drawn in Hounsfield units (body outline, fat, muscle,
spine and ribs, liver, spleen, aorta/IVC, bowel with gas, two kidneys with cortex, medulla and
sinus fat), then posed, noised, windowed and JPEG-encoded. Findings sit in one kidney: a cyst
is round, sharp and water-dark; a stone is tiny and very bright in the collecting system; a
tumour is solid, heterogeneous, irregular and bulges the contour. Confounders (vascular
calcifications, bright bowel contents, gas, gallbladder, renal pelvis) appear in every class,
so "a bright dot" or "a dark blob" is not a shortcut.

``difficulty`` (0.25-4, default 1) is one dial: above 1 findings shrink and fade into more
noise; below 1 they grow, stones multiply and move into the parenchyma, slices cut findings
near their widest section, and confounders and non-contrast studies (where cysts and
tumours are faint) become rare. The demo uses :data:`DEMO_DIFFICULTY` (0.25) so a CPU can
learn the task in minutes.

Like the real data, a *patient* is one anatomy seen in several adjacent slices numbered
consecutively, and a few percent of files are byte-identical copies under another number, so
a random split leaks. numpy + Pillow only; deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kidney_edge.phantoms.kaggle_layout import (
    DEFAULT_DIFFICULTY,
    FINDINGS,
    KAGGLE_CLASS_COUNTS,
    SLICES_PER_PATIENT,
    CopyNumbering,
    DrawnSlice,
    PhantomConfig,
    PhantomSummary,
    Planning,
    ProgressFn,
    uniform_runs,
    write_phantom,
)

# The demo trains on this difficulty: a 2-core CPU learns the classic phantom in minutes at it
# (benchmarks/results/demo.md). The DICOM series phantom draws at it so the demo's model reads it.
DEMO_DIFFICULTY = 0.25
REF = 512.0  # anatomy is described in pixels of a 512 px slice and scaled to `size`
AIR, FAT, WATER = -1000.0, -100.0, 5.0
SHIFT = 3.0  # px at 512: slices of a patient shift by up to this much (posed once, then cropped)


# ----------------------------------------------------------------------------- painting


def _ellipse_weight(
    shape: tuple[int, int],
    cx: float,
    cy: float,
    a: float,
    b: float,
    angle: float = 0.0,
    edge: float = 1.0,
    wobble: tuple[np.ndarray, np.ndarray] | None = None,
    warp: np.ndarray | None = None,
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Anti-aliased coverage (0..1) of a rotated ellipse, on its bounding box only.

    ``wobble`` = (amplitudes, phases) of angular harmonics k=2.. that make the outline
    irregular (tumours); ``warp`` (full-size, small values) roughens the outline cheaply (body).
    ``edge`` is the blur width of the border in pixels.
    """
    reach = max(a, b) * (1.0 + (float(np.abs(wobble[0]).sum()) if wobble else 0.0)) + 2 * edge + 1
    height, width = shape
    x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
    y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c + dy * s) / a
    v = (dy * c - dx * s) / b
    rho = np.sqrt(u * u + v * v)
    if wobble is not None:
        theta = np.arctan2(v, u)
        boundary = np.ones_like(rho)
        for k, (amp, phase) in enumerate(zip(*wobble, strict=True), start=2):
            boundary += amp * np.cos(k * theta + phase)
        rho = rho / boundary
    if warp is not None:
        rho = rho * (1.0 - warp[y0:y1, x0:x1])
    weight = np.clip((1.0 - rho) * (min(a, b) / edge) + 0.5, 0.0, 1.0)
    return (slice(y0, y1), slice(x0, x1)), weight


class _Canvas:
    """A Hounsfield-unit image being drawn; coordinates are given at 512 px and scaled."""

    def __init__(self, size: int, texture: np.ndarray, hu: np.ndarray | None = None) -> None:
        self.scale = size / REF
        self.hu = np.full((size, size), AIR, dtype=np.float32) if hu is None else hu
        self.texture = texture  # (size, size) smooth unit noise for organ heterogeneity

    def ellipse(
        self,
        cx: float,
        cy: float,
        a: float,
        b: float,
        value: float,
        *,
        angle: float = 0.0,
        edge: float = 1.0,
        wobble: tuple[np.ndarray, np.ndarray] | None = None,
        tex: float = 0.0,
        within: np.ndarray | None = None,
        keep: bool = False,
        rough: float = 0.0,
    ) -> np.ndarray | None:
        """Paint ``value`` (+ ``tex`` HU of texture) inside the ellipse; ``keep``: return its coverage."""
        k = self.scale
        warp = self.texture * rough if rough else None
        found = _ellipse_weight(
            self.hu.shape, cx * k, cy * k, max(a * k, 0.3), max(b * k, 0.3), angle, edge, wobble, warp
        )
        if found is None:
            return None
        region, weight = found
        if within is not None:
            weight = weight * within[region]
        target = self.hu[region]
        fill = value + tex * self.texture[region] if tex else value
        target += weight * (fill - target)
        if not keep:
            return None
        coverage = np.zeros_like(self.hu)
        coverage[region] = weight
        return coverage

    def dot(self, cx: float, cy: float, r: float, value: float) -> None:
        self.ellipse(cx, cy, r, r, value, edge=0.7)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise with unit std, smooth over ``size / cells`` pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field_ = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
    return field_ / max(float(field_.std()), 1e-6)


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _Kidney:
    cx: float
    cy: float
    a: float  # half-axis across, px at 512
    b: float  # half-axis along the long axis
    angle: float
    hilum: tuple[float, float]  # unit vector towards the renal hilum (anteromedial)


@dataclass
class Patient:
    """One anatomy: drawn once, then seen in several adjacent slices."""

    base: np.ndarray  # (size + 2*margin,) * 2 float32 HU, posed and blurred, no finding
    margin: int  # px of room for the per-slice shift
    forward: np.ndarray  # 2x3 affine: anatomy px (scaled to size) -> posed px
    kidneys: list[_Kidney]
    phase: str
    cortex_hu: float
    level: float
    width: float
    noise_hu: float
    blur: float
    quality: int
    pose: tuple[float, float, float, float]  # rotation rad, scale, shift x, shift y (px at 512)
    tumor_texture: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


_PHASES = {  # phase: (liver, spleen, cortex, medulla, vessels) HU
    "non-contrast": (58.0, 48.0, 33.0, 28.0, 42.0),
    "corticomedullary": (85.0, 120.0, 185.0, 95.0, 260.0),
    "nephrographic": (110.0, 115.0, 160.0, 150.0, 160.0),
}


def _draw_body(cv: _Canvas, rng: np.random.Generator) -> tuple[float, float, float, float, np.ndarray]:
    """Table, skin/fat, muscle wall, abdominal cavity. Returns centre, half-axes, cavity mask."""
    cx, cy = 256 + rng.normal(0, 4), 262 + rng.normal(0, 4)
    a, b = rng.uniform(185, 228), rng.uniform(130, 165)
    fat = rng.uniform(10, 38)
    wall = rng.uniform(6, 11)
    table_y = cy + b + rng.uniform(1, 5)
    _draw_couch(cv, table_y)
    cv.ellipse(cx, cy, a, b, FAT + rng.normal(0, 8), rough=0.006, tex=8.0, edge=1.2)
    cv.ellipse(cx, cy + 2, a - fat, b - fat * 0.8, 52.0, tex=6.0)
    cavity = cv.ellipse(cx, cy + 4, a - fat - wall, b - fat * 0.8 - wall, -95.0, tex=10.0, keep=True)
    return cx, cy, a, b, cavity


def _draw_couch(cv: _Canvas, top: float) -> None:
    """The CT table: a thin bright arc under the patient (only its band of rows is touched)."""
    k, size = cv.scale, cv.hu.shape[0]
    y0 = max(0, int((top - 30) * k))
    if y0 >= size:
        return
    ys = np.arange(y0, size, dtype=np.float32)[:, None] / k
    xs = np.arange(size, dtype=np.float32)[None, :] / k
    arc = top + 12.0 - 0.0004 * (xs - 256.0) ** 2  # a cradle, rising at the sides (rows at 512 px)
    inside = np.clip(1.0 - np.abs(ys - arc - 4.0) / 4.0, 0.0, 1.0)
    cv.hu[y0:] += inside * (180.0 - cv.hu[y0:])


def _draw_spine(cv: _Canvas, rng: np.random.Generator, sx: float, sy: float) -> None:
    """Vertebral body, canal, posterior elements, psoas and paraspinal muscles."""
    r = rng.uniform(19, 25)
    for side in (-1, 1):
        cv.ellipse(sx + side * (r + 12), sy + 6, 13, 19, 50.0, angle=side * 0.25, tex=5)  # psoas
        cv.ellipse(sx + side * 27, sy + r + 30, 22, 17, 55.0, tex=6)  # erector spinae
        cv.ellipse(sx + side * (r + 14), sy + r * 0.4, 16, 4, 650.0, angle=side * 0.35)  # transverse
        cv.ellipse(sx + side * 9, sy + r + 14, 12, 3.5, 700.0, angle=side * 1.1)  # lamina
    cv.ellipse(sx, sy, r, r * 0.9, 750.0, edge=0.8)  # cortical shell
    cv.ellipse(sx, sy, r - 3, r * 0.9 - 3, rng.uniform(180, 280), tex=25)  # cancellous bone
    cv.ellipse(sx, sy + r + 8, 8, 7, 15.0)  # spinal canal (fluid)
    cv.ellipse(sx, sy + r + 27, 3.5, 11, 700.0)  # spinous process


def _draw_ribs(cv: _Canvas, rng: np.random.Generator, cx: float, cy: float, a: float, b: float) -> None:
    for side in (-1, 1):
        for _ in range(rng.integers(2, 5)):
            t = rng.uniform(0.15, 1.1)  # angle from the lateral point towards the back
            x = cx + side * (a - rng.uniform(14, 30)) * math.cos(t)
            y = cy + (b - rng.uniform(14, 30)) * math.sin(t)
            rr = rng.uniform(4.5, 7.5)
            cv.ellipse(x, y, rr * 1.5, rr, 800.0, angle=side * t)
            cv.ellipse(x, y, rr * 1.5 - 2.2, rr - 2.2, 220.0, angle=side * t)


def _draw_bowel(
    cv: _Canvas,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    a: float,
    b: float,
    cavity: np.ndarray,
    confound: float,
) -> None:
    """Small-bowel loops anteriorly: wall, fluid, a gas pocket on top, sometimes oral contrast."""
    oral_contrast = rng.random() < 0.35 * confound
    for _ in range(max(1, round(rng.integers(5, 11) * confound))):
        x = cx + rng.uniform(-0.2, 0.5) * a
        y = cy - rng.uniform(0.15, 0.75) * b
        r = rng.uniform(10, 24)
        cv.ellipse(x, y, r, r * rng.uniform(0.7, 1.0), 45.0, angle=rng.uniform(0, np.pi), within=cavity)
        content = rng.uniform(250, 450) if oral_contrast and rng.random() < 0.6 else rng.uniform(5, 30)
        cv.ellipse(x, y, r - 3, r * 0.7 - 2, content, tex=15, within=cavity)
        if rng.random() < 0.6:  # gas rises anteriorly: a crescent at the top of the loop
            cv.ellipse(x, y - r * 0.35, r * 0.6, r * 0.3, -900.0, within=cavity)


def _draw_colon(
    cv: _Canvas, rng: np.random.Generator, x: float, y: float, r: float, cavity: np.ndarray
) -> None:
    """A colon segment with mottled stool and gas bubbles (dark blobs outside the kidney)."""
    cv.ellipse(x, y, r, r * 0.85, 40.0, within=cavity)
    cv.ellipse(x, y, r - 2.5, r * 0.85 - 2.5, rng.uniform(-60, 20), tex=60, within=cavity)
    for _ in range(rng.integers(1, 5)):
        t, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6) * r
        gr = rng.uniform(2, r * 0.45)
        cv.ellipse(x + d * math.cos(t), y + d * math.sin(t), gr, gr, -900.0, within=cavity)


def _draw_kidney(cv: _Canvas, kid: _Kidney, cortex: float, medulla: float, rng: np.random.Generator) -> None:
    """Cortex, 5-7 medullary pyramids, sinus fat opening to the hilum, a small renal pelvis."""
    cv.ellipse(kid.cx, kid.cy, kid.a, kid.b, cortex, angle=kid.angle, tex=4)
    hx, hy = kid.hilum
    for i in range(rng.integers(5, 8)):
        t = np.pi * (0.3 + 1.4 * i / 6) + math.atan2(hy, hx)  # around the kidney, away from the hilum
        px, py = kid.cx + 0.62 * kid.a * math.cos(t), kid.cy + 0.62 * kid.b * math.sin(t)
        cv.ellipse(px, py, kid.a * 0.2, kid.a * 0.12, medulla, angle=t, tex=4)
    sinus_angle = math.atan2(hy, hx)
    sx, sy = kid.cx + hx * kid.a * 0.7, kid.cy + hy * kid.a * 0.7
    cv.ellipse(
        sx, sy, kid.a * 0.6, kid.a * 0.32, -85.0, angle=sinus_angle, tex=12
    )  # sinus fat, open medially
    px, py = kid.cx + hx * kid.a * 0.85, kid.cy + hy * kid.a * 0.85
    cv.ellipse(px, py, kid.a * 0.3, kid.a * 0.1, 8.0, angle=sinus_angle)  # renal pelvis (urine)


def _place_kidneys(rng: np.random.Generator, sx: float, sy: float) -> list[_Kidney]:
    kidneys = []
    for side in (-1, 1):  # image left = patient right
        a, b = rng.uniform(25, 33), rng.uniform(36, 46)
        cx = sx + side * rng.uniform(58, 76)
        cy = sy - rng.uniform(-5, 18)
        angle = side * rng.uniform(0.35, 0.75)  # long axis tilted, hilum anteromedial
        hx, hy = -side * 0.8, -0.6
        kidneys.append(_Kidney(cx, cy, a, b, angle, (hx, hy)))
    return kidneys


def _phase_mix(difficulty: float) -> list[float]:
    """Non-contrast studies (where cysts and tumours are faint) are rarer on easy phantoms."""
    plain = 0.35 * min(1.0, difficulty) ** 2
    return [plain, (1.0 - plain) * 0.46, (1.0 - plain) * 0.54]


def _build_patient(rng: np.random.Generator, size: int, difficulty: float) -> Patient:
    """Draw one patient's anatomy in HU; everything slice-specific comes later.

    ``difficulty`` also sets how often look-alikes appear (``confound``): bright bowel
    contents, vascular and nodal calcifications and the gallbladder.
    """
    phase = str(rng.choice(list(_PHASES), p=_phase_mix(difficulty)))
    confound = min(1.0, difficulty)
    liver_hu, spleen_hu, cortex, medulla, vessel = (v + rng.normal(0, 6) for v in _PHASES[phase])
    cv = _Canvas(size, _smooth_noise(rng, size, 24))
    cx, cy, a, b, cavity = _draw_body(cv, rng)
    sx, sy = cx + rng.normal(0, 3), cy + b * rng.uniform(0.2, 0.3)
    # Liver (patient right = image left) and spleen, clipped to the cavity.
    cv.ellipse(cx - a * 0.5, cy - b * 0.05, a * 0.42, b * 0.62, liver_hu, angle=0.4, tex=6, within=cavity)
    if rng.random() < 0.3 * confound:  # gallbladder: a water-dark round blob outside the kidney
        cv.ellipse(cx - a * 0.3, cy - b * 0.35, 14, 11, 5.0, within=cavity)
    if rng.random() < 0.8:
        cv.ellipse(
            cx + a * 0.55, cy + b * 0.2, a * 0.2, b * 0.35, spleen_hu, angle=-0.4, tex=6, within=cavity
        )
    _draw_bowel(cv, rng, cx, cy, a, b, cavity, confound)
    kidneys = _place_kidneys(rng, sx, sy)
    for kid in kidneys:  # colon flexures beside the kidneys: gas near, not in, the kidney
        if rng.random() < 0.7 * confound:
            side = 1 if kid.cx > sx else -1
            _draw_colon(
                cv, rng, kid.cx + side * (kid.a + 14), kid.cy - kid.b * 0.9, rng.uniform(13, 20), cavity
            )
    _draw_vessels(cv, rng, sx, sy, kidneys, vessel, confound)
    _draw_spine(cv, rng, sx, sy)
    _draw_ribs(cv, rng, cx, cy, a, b)
    for kid in kidneys:
        _draw_kidney(cv, kid, cortex, medulla, rng)
    _draw_calcifications(cv, rng, cx, cy, a, b, cavity, difficulty)
    noise = rng.uniform(8, 20) * math.sqrt(difficulty)
    pose = (rng.normal(0, 0.08), rng.uniform(0.88, 1.1), rng.normal(0, 12), rng.normal(0, 10))
    blur = rng.uniform(0.0, 1.0)
    margin = max(1, round(SHIFT * size / REF))
    forward, coeffs = _pose_matrix(pose, size, margin)
    posed = Image.fromarray(cv.hu, mode="F").transform(
        (size + 2 * margin,) * 2, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=AIR
    )
    return Patient(
        base=_gaussian_blur(np.asarray(posed), blur * size / REF),
        margin=margin,
        forward=forward,
        kidneys=kidneys,
        phase=phase,
        cortex_hu=cortex,
        level=rng.uniform(25, 60),
        # Easy phantoms are shown in a wider window: stones stand out of the enhancing kidney.
        width=rng.uniform(320, 460) / min(1.0, difficulty) ** 0.25,
        noise_hu=noise,
        blur=blur,
        quality=int(rng.integers(85, 96)),
        pose=pose,
        tumor_texture=_smooth_noise(rng, size, 48),
    )


def _draw_vessels(
    cv: _Canvas,
    rng: np.random.Generator,
    sx: float,
    sy: float,
    kidneys: list[_Kidney],
    hu: float,
    confound: float,
) -> None:
    """Aorta (sometimes with calcified wall), IVC and renal veins towards the hila."""
    ax, ay, ar = sx + rng.uniform(6, 16), sy - rng.uniform(30, 40), rng.uniform(8, 12)
    ix, iy = sx - rng.uniform(22, 32), sy - rng.uniform(28, 38)
    for kid in kidneys:
        hx, hy = kid.cx + kid.hilum[0] * kid.a, kid.cy + kid.hilum[1] * kid.a
        tx, ty = (ix, iy) if kid.cx < sx else (ax, ay)
        length = math.hypot(tx - hx, ty - hy) / 2
        cv.ellipse((hx + tx) / 2, (hy + ty) / 2, length, 3.5, hu, angle=math.atan2(ty - hy, tx - hx))
    cv.ellipse(ix, iy, 12, 8, hu - 10, angle=0.2)
    cv.ellipse(ax, ay, ar, ar, hu)
    if rng.random() < 0.5 * confound:  # atherosclerotic calcifications: bright dots like a stone, but outside
        for t in rng.uniform(0, 2 * np.pi, rng.integers(1, 5)):
            cv.dot(
                ax + ar * math.cos(t), ay + ar * math.sin(t), rng.uniform(0.8, 2.2), rng.uniform(400, 1100)
            )


def _draw_calcifications(
    cv: _Canvas,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    a: float,
    b: float,
    cavity: np.ndarray,
    difficulty: float,
) -> None:
    """Phleboliths / calcified nodes scattered in the abdomen: stone look-alikes outside the kidney."""
    for _ in range(rng.poisson(1.2 * difficulty)):
        x, y = cx + rng.uniform(-0.6, 0.6) * a, cy + rng.uniform(-0.6, 0.5) * b
        if (
            cavity[min(int(y * cv.scale), cavity.shape[0] - 1), min(int(x * cv.scale), cavity.shape[1] - 1)]
            > 0.5
        ):
            cv.dot(x, y, rng.uniform(0.8, 2.5), rng.uniform(350, 1000))


# ----------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Lesion:
    """One finding in one kidney, in 512 px anatomy coordinates (before the pose)."""

    finding: str  # "none" | "cyst" | "stone" | "tumor"
    side: str = ""  # "right" (image left) | "left"
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0  # largest cross-section radius (stone: of the largest stone)
    hu: float = 0.0
    contrast_hu: float = 0.0  # lesion minus cortex, what makes it visible
    extra: tuple = ()  # stones: ((dx, dy, r, hu), ...); tumor: wobble and heterogeneity


def _point_in_kidney(
    rng: np.random.Generator, kid: _Kidney, lo: float, hi: float, spread: float = np.pi - 0.5
) -> tuple[float, float]:
    """A point at ``lo..hi`` of the way from the centre to the outline, within ``spread`` radians
    of the side opposite the hilum (the default keeps only 0.5 rad around the hilum free)."""
    hilum_angle = math.atan2(kid.hilum[1], kid.hilum[0])
    t = hilum_angle + np.pi + rng.uniform(-spread, spread)
    # Radius of the rotated ellipse in direction t.
    rel = t - kid.angle
    reach = 1.0 / math.sqrt((math.cos(rel) / kid.a) ** 2 + (math.sin(rel) / kid.b) ** 2)
    d = rng.uniform(lo, hi) * reach
    return kid.cx + d * math.cos(t), kid.cy + d * math.sin(t)


def _make_lesion(rng: np.random.Generator, patient: Patient, finding: str, difficulty: float) -> Lesion:
    """One finding, drawn in physical HU; ``difficulty`` sets how conspicuous it is.

    Sizes scale as difficulty**-0.8. Above 1, contrast to the kidney also fades (as
    difficulty**-0.5); below 1 (``ease`` > 1) tumours grow more heterogeneous, irregular and
    necrotic and stones more numerous, while cysts stay water: easy phantoms never get
    unphysical densities.
    """
    if finding == "none":
        return Lesion("none")
    size_f, fade, ease = difficulty**-0.8, min(1.0, difficulty**-0.5), max(1.0, 1.0 / difficulty) ** 0.5
    k = int(rng.integers(2))
    kid, side = patient.kidneys[k], ("right", "left")[k]
    cortex = patient.cortex_hu
    if finding == "cyst":
        cx, cy = _point_in_kidney(rng, kid, 0.1, 0.9)
        radius = max(2.5, min(rng.uniform(7 + 2 * (ease - 1), 20) * size_f, 1.3 * kid.b))
        hu = cortex + fade * (WATER + rng.normal(0, 4) - cortex)
        return Lesion("cyst", side, cx, cy, radius, hu, hu - cortex, (rng.uniform(0.85, 1.0),))
    if finding == "stone":
        return _make_stones(rng, kid, side, cortex, size_f, fade, ease)
    cx, cy = _point_in_kidney(rng, kid, 0.55, 0.95)  # tumour: peripheral, so it bulges the outline
    radius = max(4.0, min(rng.uniform(11, 26) * size_f, 1.4 * kid.b))
    if patient.phase == "non-contrast":
        base = cortex + rng.uniform(-12, 10)
    else:  # renal cell carcinoma enhances less than the cortex in these phases
        base = cortex - rng.uniform(40, 90) * ease
    hu = cortex + fade * (base - cortex)
    wobble = (rng.normal(0, 0.07 * ease, 5), rng.uniform(0, 2 * np.pi, 5))
    hetero = rng.uniform(12, 30) * fade * ease
    necrosis = rng.uniform(15, 35) * ease if rng.random() < min(0.9, 0.4 * ease) else 0.0
    return Lesion("tumor", side, cx, cy, radius, hu, hu - cortex, (wobble, hetero, necrosis))


def _make_stones(
    rng: np.random.Generator, kid: _Kidney, side: str, cortex: float, size_f: float, fade: float, ease: float
) -> Lesion:
    """1-3 calculi, 1.5-6 px across at 512 at difficulty 1, in the renal sinus or a calyx.

    A stone in the renal pelvis sits among the bright hilar vessels, which look much like it.
    Easy phantoms (``ease`` > 1) put most stones, close together, in the lateral calyces, away
    from the vessels.
    """
    if rng.random() < 1.0 / (1.0 + ease * ease):  # renal pelvis, at the hilum
        sx = kid.cx + kid.hilum[0] * kid.a * 0.65
        sy = kid.cy + kid.hilum[1] * kid.a * 0.65
    else:
        sx, sy = _point_in_kidney(rng, kid, 0.2, 0.55, spread=(np.pi - 0.5) / ease)
    stones = []
    for _ in range(1 + min(2, rng.poisson(0.4 * ease * ease))):
        r = max(0.6, rng.uniform(0.75, 3.0) * size_f + 5.0 * (ease - 1.0))
        hu = 300 + (rng.uniform(700, 1500) - 300) * min(1.0, fade + 0.3)
        off = rng.uniform(0, kid.a * 0.3 / ease, 2) * rng.choice([-1, 1], 2)
        stones.append((float(off[0]), float(off[1]), r, hu))
    big = max(stones, key=lambda s: s[2])
    extra = ((sx, sy), tuple(stones))
    return Lesion("stone", side, sx + big[0], sy + big[1], big[2], big[3], big[3] - cortex, extra)


def _draw_lesion(cv: _Canvas, lesion: Lesion, depth: float, blur: float) -> float:
    """Paint the lesion's cross-section at ``depth`` (-1..1 through it); returns the radius drawn."""
    if lesion.finding == "none":
        return 0.0
    section = math.sqrt(max(0.0, 1.0 - depth * depth))
    radius = lesion.radius * section
    if lesion.finding == "cyst":
        (ecc,) = lesion.extra
        cv.ellipse(lesion.cx, lesion.cy, radius, radius * ecc, lesion.hu, edge=0.8 + blur)
    elif lesion.finding == "stone":
        (base_x, base_y), stones = lesion.extra
        for dx, dy, r, hu in stones:  # stones are tiny: keep their full size in every slice
            cv.ellipse(base_x + dx, base_y + dy, r, r, hu, edge=0.6 + 0.5 * blur)
        radius = lesion.radius
    else:
        wobble, hetero, necrosis = lesion.extra
        cv.ellipse(
            lesion.cx, lesion.cy, radius, radius * 0.92, lesion.hu, wobble=wobble, tex=hetero, edge=1.2
        )
        if necrosis:
            cv.ellipse(lesion.cx, lesion.cy, radius * 0.4, radius * 0.35, lesion.hu - necrosis, wobble=wobble)
    return radius


# ----------------------------------------------------------------------------- slices


def _pose_matrix(pose: tuple[float, float, float, float], size: int, margin: int) -> tuple[np.ndarray, tuple]:
    """Forward 2x3 affine (anatomy px -> posed px, with ``margin``) and Pillow's inverse coefficients."""
    angle, scale, tx, ty = pose
    c, k = size / 2.0, size / REF
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]]) * scale
    shift = np.array([c + tx * k + margin, c + ty * k + margin]) - rot @ np.array([c, c])
    inv = np.linalg.inv(rot)
    inv_shift = -inv @ shift
    coeffs = (inv[0, 0], inv[0, 1], inv_shift[0], inv[1, 0], inv[1, 1], inv_shift[1])
    return np.hstack([rot, shift[:, None]]), coeffs


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (the reconstruction kernel's softness); a no-op below 0.3 px."""
    if sigma < 0.3:
        return image
    taps = np.arange(-2, 3, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, 2, mode="edge")
    rows = sum(w * padded[:, i : i + image.shape[1]] for i, w in enumerate(kernel))
    return sum(w * rows[i : i + image.shape[0], :] for i, w in enumerate(kernel)).astype(np.float32)


def _posed_lesion(lesion: Lesion, patient: Patient, size: int) -> Lesion:
    """The lesion in posed coordinates (at 512 px scale), so slices can draw it after the pose."""
    if lesion.finding == "none":
        return lesion
    k = size / REF
    rot = patient.forward[:, :2]
    scale = float(np.sqrt(abs(np.linalg.det(rot))))
    x, y = patient.forward @ np.array([lesion.cx * k, lesion.cy * k, 1.0]) / k
    extra = lesion.extra
    if lesion.finding == "stone":
        (bx, by), stones = extra
        bx, by = patient.forward @ np.array([bx * k, by * k, 1.0]) / k
        moved = tuple((*(rot @ np.array([dx, dy])), r * scale, hu) for dx, dy, r, hu in stones)
        extra = ((float(bx), float(by)), moved)
    return dataclasses.replace(lesion, cx=float(x), cy=float(y), radius=lesion.radius * scale, extra=extra)


def slice_hu(
    patient: Patient,
    lesion: Lesion,
    rng: np.random.Generator,
    noise_bank: np.ndarray,
    depth: float,
) -> tuple[np.ndarray, dict[str, float]]:
    """One slice in Hounsfield units: a small shift of the posed anatomy, the finding's
    cross-section at ``depth`` (-1..1 through it), noise. Also the lesion's geometry in pixels.

    ``lesion`` is already posed (:func:`_posed_lesion`).
    """
    m = patient.margin
    size = patient.base.shape[0] - 2 * m
    dx, dy = (int(v) for v in rng.integers(-m, m + 1, 2))
    hu = patient.base[m + dy : m + dy + size, m + dx : m + dx + size].copy()
    k = size / REF
    shifted = dataclasses.replace(lesion, cx=lesion.cx - dx / k, cy=lesion.cy - dy / k)
    if lesion.finding == "stone":
        (bx, by), stones = lesion.extra
        shifted = dataclasses.replace(shifted, extra=((bx - dx / k, by - dy / k), stones))
    radius = _draw_lesion(_Canvas(size, patient.tumor_texture, hu=hu), shifted, depth, patient.blur)
    oy, ox = rng.integers(0, noise_bank.shape[0] - size, 2)
    hu += patient.noise_hu * noise_bank[oy : oy + size, ox : ox + size]
    truth = {"lesion_x": shifted.cx * k, "lesion_y": shifted.cy * k, "lesion_radius_px": radius * k}
    return hu, truth


def display_window(patient: Patient, rng: np.random.Generator) -> tuple[float, float]:
    """(level, width) in HU that one slice of ``patient`` is shown in: the patient's window with
    a little per-slice jitter of the level."""
    return patient.level + rng.normal(0, 2), patient.width


def _render_slice(
    patient: Patient,
    lesion: Lesion,
    rng: np.random.Generator,
    noise_bank: np.ndarray,
    depth: float,
) -> tuple[bytes, dict[str, float]]:
    """One slice as JPEG bytes: :func:`slice_hu`, then the :func:`display_window`, 8 bits, JPEG."""
    hu, truth = slice_hu(patient, lesion, rng, noise_bank, depth)
    level, width = display_window(patient, rng)
    hu -= level - width / 2
    hu *= 255.0 / width
    gray = np.clip(hu, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").convert("RGB").save(buffer, format="JPEG", quality=patient.quality)
    return buffer.getvalue(), truth


# ----------------------------------------------------------------------------- patients and the dataset


NO_LESION = Lesion("none")


def noise_bank(rng: np.random.Generator, size: int) -> np.ndarray:
    """(2 size, 2 size) float32 white noise that :func:`slice_hu` reads a random window of for
    each slice (cheaper than fresh noise per slice)."""
    return rng.standard_normal((2 * size, 2 * size), dtype=np.float32)


def draw_patient(
    rng: np.random.Generator, size: int, difficulty: float, finding: str
) -> tuple[Patient, Lesion]:
    """One patient's anatomy and its ``finding`` (one of :data:`FINDINGS`' values), posed and
    ready for :func:`slice_hu`; both drawn from ``rng``."""
    patient = _build_patient(rng, size, difficulty)
    return patient, _posed_lesion(_make_lesion(rng, patient, finding, difficulty), patient, size)


class _ClassicRenderer:
    """The classic phantom as a :class:`~kidney_edge.phantoms.kaggle_layout.SliceRenderer`."""

    patient_prefix = "P"
    own_truth_columns: tuple[str, ...] = ()
    # Slices per patient drawn uniformly; the lowest file number of a slice counts as its original.
    planning = Planning(uniform_runs, CopyNumbering.LOWEST)

    def __init__(self, config: PhantomConfig) -> None:
        self.config = config
        self.plan_rng = np.random.default_rng([config.seed, 7])
        # The plan stream's first draw: a seed fixes the noise and the plan together.
        self.noise_bank = noise_bank(self.plan_rng, config.size)

    def draw_slices(self, class_index: int, name: str, patient: int, n_slices: int) -> Iterator[DrawnSlice]:
        config = self.config
        rng = np.random.default_rng([config.seed, class_index, patient])
        anatomy, lesion = draw_patient(rng, config.size, config.difficulty, FINDINGS[name])
        # Slices cut the lesion off-centre; on easy phantoms never far from its widest section.
        span = 0.7 * min(1.0, config.difficulty) ** 0.5
        depths = np.linspace(-span, span, n_slices) if n_slices > 1 else np.zeros(1)
        for s in range(n_slices):
            data, geometry = _render_slice(anatomy, lesion, rng, self.noise_bank, float(depths[s]))
            yield DrawnSlice(data, _finding_truth(anatomy, lesion, geometry))


def _finding_truth(patient: Patient, lesion: Lesion, geometry: dict[str, float]) -> dict[str, object]:
    """The finding columns of phantom_truth.csv for one slice (empty lesion cells on Normal)."""
    has_lesion = lesion.finding != "none"
    return {
        "finding": lesion.finding,
        "kidney_side": lesion.side,
        "lesion_x": round(geometry["lesion_x"], 1) if has_lesion else "",
        "lesion_y": round(geometry["lesion_y"], 1) if has_lesion else "",
        "lesion_radius_px": round(geometry["lesion_radius_px"], 2) if has_lesion else "",
        "lesion_contrast_hu": round(lesion.contrast_hu, 1) if has_lesion else "",
        "phase": patient.phase,
    }


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
) -> PhantomSummary:
    """Write ``n`` phantom slices to ``out_dir`` in the Kaggle layout; see the module docstring.

    Deterministic for its arguments but ``progress``. ``progress(done, total)`` is
    called after every file. A previous phantom in ``out_dir`` is replaced (only the files its
    phantom_truth.csv lists are removed); any other non-empty folder is refused.
    """
    config = PhantomConfig(
        n=n,
        seed=seed,
        size=size,
        difficulty=difficulty,
        class_mix=class_mix,
        slices_per_patient=tuple(slices_per_patient),  # type: ignore[arg-type]
    )
    return write_phantom(out_dir, config, _ClassicRenderer, progress)
