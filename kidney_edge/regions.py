"""Where on a slice the model looks: the spec's region rule, applied before its resize rule.

``RegionRule.KIDNEYS`` crops an axial abdominal slice to the band about the spine that holds
both kidneys, found from the image alone (no annotation): the body's box is what is brighter
than air, the spine is the brightest structure in the middle of the body's lower part, and the
band spans ``KIDNEY_REACH`` of the body's box about the spine. Kidneys lie on either side of the
vertebral body at its level; a whole slice also shows the liver, bowel, arms and the couch, which
let a classifier trained on a few hundred patients tell patients apart instead of findings
(docs/training.md#what-the-model-can-and-cannot-learn-hard-findings). Where no body or spine is
found (a foreign image, a crop already, a coronal or sagittal view), the rule keeps the whole
image. It assumes a supine patient, spine at the bottom of the image as CT displays it; for prone
scans (the spine at the top) train with ``--region whole``.

numpy + Pillow only: the edge runtime calls it through :func:`kidney_edge.imaging.preprocess`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from kidney_edge.spec import RegionRule

Box = tuple[int, int, int, int]  # (left, top, right, bottom) pixels, as Pillow's crop takes it

FINDER_SIDE = 128  # the body and the spine are found on a thumbnail this size: ~0.3 ms a slice
AIR_LEVEL = 10  # of 255: air is black under every abdominal window
OPENING = 5  # thumbnail pixels: the couch, sheets and thin lines are narrower
MIN_BODY_SHARE = 0.2  # a body box smaller than this share of the image: not an axial body slice
# The spine is searched in the middle (SPINE_COLUMNS of the body's width) of the body's lower part
# (below SPINE_TOP of its height); bone is what reaches BONE_SHARE of that region's brightest.
SPINE_COLUMNS = (0.35, 0.65)
SPINE_TOP = 0.3
BONE_SHARE = 0.92
MIN_BONE_PIXELS = 6  # on the thumbnail: a vertebral body covers ~100
# An axial vertebra's bone is at most ~3 times as spread vertically as across (body and spinous
# process, by standard deviation; 2.4 at most on 800 phantom slices); a coronal or sagittal slice
# shows the spine as a column, and the band about its middle would cut the kidneys off: such
# slices keep the whole image.
MAX_BONE_ASPECT = 4.0
# The band about the spine centre, in shares of the body box (width, height): out to either side,
# up (anterior) and down (posterior). On both phantom renderers it holds every lesion's centre
# and 91.5% of look-alike lesions whole (a tumour bulging toward the flank may be cut;
# benchmarks/results/region.md); anatomically, kidneys reach 10-13 cm either side of the midline
# of a 30-35 cm wide abdomen, from the back wall to a few cm in front of the vertebral body. A
# looser band that held 99% of lesions whole scored like the whole slice; this one raised test
# macro-F1 on the look-alike renderer from 0.214 / 0.194 to 0.382 / 0.523
# (benchmarks/results/recipe.md).
KIDNEY_REACH = {"side": 0.42, "up": 0.30, "down": 0.22}


def region_box(image: Image.Image, rule: RegionRule) -> Box | None:
    """The box of ``image`` that ``rule`` keeps, or None for the whole image."""
    if rule is RegionRule.WHOLE:
        return None
    gray = image if image.mode == "L" else image.convert("L")
    factor = max(1, max(gray.size) // FINDER_SIDE)
    thumb = np.asarray(gray.reduce(factor) if factor > 1 else gray)  # (h, w) uint8
    body = _body_box(thumb)
    spine = _spine_centre(thumb, body) if body else None
    if body is None or spine is None:
        return None
    scale_x, scale_y = gray.width / thumb.shape[1], gray.height / thumb.shape[0]
    width, height = (body[2] - body[0]) * scale_x, (body[3] - body[1]) * scale_y
    x, y = spine[0] * scale_x, spine[1] * scale_y
    box = (
        max(0, round(x - KIDNEY_REACH["side"] * width)),
        max(0, round(y - KIDNEY_REACH["up"] * height)),
        min(gray.width, round(x + KIDNEY_REACH["side"] * width)),
        min(gray.height, round(y + KIDNEY_REACH["down"] * height)),
    )
    return box if box[2] - box[0] >= 8 and box[3] - box[1] >= 8 else None


def _body_box(thumb: np.ndarray) -> Box | None:
    """What is brighter than air, opened so the couch and thin lines drop out; None where that is
    small or fills the image from top to bottom."""
    body = _opened(thumb > AIR_LEVEL, OPENING)
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    if len(rows) == 0:
        return None
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    height, width = thumb.shape
    if (box[2] - box[0]) * (box[3] - box[1]) < MIN_BODY_SHARE * width * height:
        return None
    if box[1] == 0 and box[3] == height:
        return None  # no air above and below the body: not a whole axial slice (a crop, a photo)
    return box


def _opened(mask: np.ndarray, side: int) -> np.ndarray:
    """Morphological opening of a boolean mask by a ``side`` x ``side`` square (erosion, then
    dilation), with box sums over an integral image: a few array passes, no Python loop."""
    eroded = _box_count(mask, side) == side * side
    return _box_count(eroded, side) > 0


def _box_count(mask: np.ndarray, side: int) -> np.ndarray:
    """(h, w) count of True pixels in the ``side`` x ``side`` square centred on each pixel."""
    padded = np.pad(mask, side // 2).astype(np.int32)  # (h + side - 1, w + side - 1)
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int32)
    integral[1:, 1:] = padded.cumsum(0).cumsum(1)  # integral[i, j]: sum of padded[:i, :j]
    h, w = mask.shape
    return (
        integral[side : side + h, side : side + w]
        - integral[:h, side : side + w]
        - integral[side : side + h, :w]
        + integral[:h, :w]
    )


def _spine_centre(pixels: np.ndarray, body: Box) -> tuple[float, float] | None:
    """(x, y) of the brightest structure in the middle of the body's lower part, or None where
    there is none or it is a column (a coronal or sagittal slice)."""
    left, top, right, bottom = body
    x0 = left + int(SPINE_COLUMNS[0] * (right - left))
    x1 = left + int(SPINE_COLUMNS[1] * (right - left))
    y0 = top + int(SPINE_TOP * (bottom - top))
    search = pixels[y0:bottom, x0:x1]  # (h, w) uint8
    if search.size == 0 or int(search.max()) <= AIR_LEVEL:
        return None
    rows, cols = np.nonzero(search >= BONE_SHARE * float(search.max()))
    if len(rows) < MIN_BONE_PIXELS:
        return None
    if rows.std() > MAX_BONE_ASPECT * (cols.std() + 0.5):
        return None  # a spinal column, not a vertebra: not an axial slice
    return x0 + float(np.median(cols)) + 0.5, y0 + float(np.median(rows)) + 0.5
