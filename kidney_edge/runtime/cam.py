"""Class activation maps from the graph's ``cam`` output, drawn over the model's view or mapped
back onto the whole slice, in numpy: the one overlay code of serve's page and ``predict
--report``'s triage page.

CAM (Zhou et al. 2016, arXiv:1512.04150): the classifier weights of one class applied to the
last feature map, (h, w) per class. Here, as in :mod:`kidney_edge.gradcam`'s report figures:
ReLU (evidence for the class only), bilinear upsampling to the input size, scaling to 0..1 by
the peak, jet colours weighted by the heat so cold regions keep their grey values.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from kidney_edge.imaging import ViewGeometry, heat_on_slice, placement
from kidney_edge.spec import ResizeRule

OVERLAY_ALPHA = 0.45  # heatmap opacity at the peak: enough to read the anatomy underneath
# Thumbnails of a triage page: a 128 px slice with its overlay is about 5 KB at this quality
# (benchmarks/results/report.md states the page sizes it gives).
JPEG_QUALITY = 75
REGION_OUTLINE = (255, 215, 0)  # the outline of what the model saw on a whole slice: amber


def heatmap(cam: np.ndarray, size: int) -> np.ndarray:
    """(h, w) class activation map -> (size, size) float32 in [0, 1] (all zero without evidence)."""
    positive = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    upsampled = np.asarray(
        Image.fromarray(positive, "F").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
    )
    peak = float(upsampled.max())
    return upsampled / peak if peak > 1e-12 else np.zeros_like(upsampled)


def jet(values: np.ndarray) -> np.ndarray:
    """(...) values in [0, 1] -> (..., 3) float32 RGB in [0, 1]: blue, cyan, yellow, red."""
    t = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where R, G, B peak
    return np.clip(1.5 - np.abs(4.0 * (t - centres)), 0.0, 1.0).astype(np.float32)


def overlay(view: Image.Image, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """A (S, S) 0..1 heatmap blended over the model's (S, S) view -> RGB image."""
    base = np.asarray(view.convert("RGB"), dtype=np.float32)
    if base.shape[:2] != heat.shape:
        raise ValueError(f"heatmap {heat.shape} does not match the image {base.shape[:2]}")
    weight = alpha * np.clip(heat, 0.0, 1.0)[..., None]
    blended = base * (1.0 - weight) + jet(heat) * 255.0 * weight
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), "RGB")


def overlay_on_slice(
    slice_image: Image.Image, heat: np.ndarray, geometry: ViewGeometry, side: int | None = None
) -> Image.Image:
    """A (S, S) heatmap over the model's view drawn back onto the decoded slice, with the spec's
    region (what the model saw) outlined where it is not the whole slice -> RGB image. ``side``:
    letterboxed to a side x side thumbnail, the outline drawn at that scale so that it stays crisp."""
    drawn = overlay(slice_image, heat_on_slice(heat, geometry))
    scale, shift = 1.0, (0, 0)
    if side is not None:
        left, top, right, bottom = placement(drawn.size, side, ResizeRule.LETTERBOX)
        scale, shift = (right - left) / drawn.width, (left, top)
        thumbnail = Image.new("RGB", (side, side), 0)  # black = air in CT
        thumbnail.paste(drawn.resize((right - left, bottom - top), Image.Resampling.BILINEAR), shift)
        drawn = thumbnail
    if geometry.box != (0, 0, *geometry.slice_size):
        left, top, right, bottom = (round(v * scale) + shift[i % 2] for i, v in enumerate(geometry.box))
        width = 1 if side is not None else max(1, round(max(drawn.size) / 256))  # a pixel on a 256 px page
        ImageDraw.Draw(drawn).rectangle(
            (left, top, right - 1, bottom - 1), outline=REGION_OUTLINE, width=width
        )
    return drawn


def png_data_url(image: Image.Image) -> str:
    """An image as a ``data:image/png;base64,...`` URL (the page shows it without another request)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def jpeg_data_url(image: Image.Image, quality: int = JPEG_QUALITY) -> str:
    """An RGB image as a ``data:image/jpeg;base64,...`` URL: lossy, for pages of many thumbnails."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
