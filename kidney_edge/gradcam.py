"""Grad-CAM (Selvaraju et al. 2017, arXiv:1610.02391) on a model's ``cam_layer``, and overlays.

Hook-based, no extra dependency: a forward hook keeps the layer's output (N, K, h, w) and its
gradient; each channel is weighted by its spatially averaged gradient of the chosen class
logit, summed, passed through ReLU (only evidence *for* the class), upsampled to the input
size and scaled to 0..1 per image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

OVERLAY_ALPHA = 0.45  # heatmap opacity: enough to read the anatomy underneath


def grad_cam(
    model: Any, batch: np.ndarray, class_indices: np.ndarray, layer: Any | None = None
) -> np.ndarray:
    """(N, 3, S, S) float32 inputs -> (N, S, S) float32 heatmaps in [0, 1] for ``class_indices``.

    ``layer`` defaults to ``model.cam_layer``. The model's train/eval mode is left as it is
    (call it in eval mode so BatchNorm and dropout behave as at inference).
    """
    import torch
    import torch.nn.functional as F

    layer = layer if layer is not None else model.cam_layer
    captured: dict[str, torch.Tensor] = {}

    def keep_output(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        captured["activation"] = output

    handle = layer.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            inputs = torch.as_tensor(np.asarray(batch, dtype=np.float32)).requires_grad_(True)
            logits = model(inputs)  # (N, C)
            index = torch.as_tensor(np.asarray(class_indices, dtype=np.int64)).view(-1, 1)
            # Sum over the batch: each item's class logit depends only on its own activations.
            # autograd.grad (not backward) leaves the model's parameter .grad untouched.
            (gradient,) = torch.autograd.grad(logits.gather(1, index).sum(), captured["activation"])
    finally:
        handle.remove()
    activation = captured["activation"].detach()  # (N, K, h, w)
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (N, K, 1, 1)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))  # (N, 1, h, w)
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).numpy().astype(np.float32)


def overlay(image: Any, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Any:
    """Blend a (S, S) 0..1 heatmap (jet colours) over a PIL image of the same size -> RGB PIL image."""
    from matplotlib import colormaps
    from PIL import Image

    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if base.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} does not match image {base.shape[:2]}")
    colours = colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3] * 255.0
    # Weight the colour by the heat so cold regions keep the original grey values.
    weight = alpha * np.clip(heatmap, 0.0, 1.0)[..., None]
    blended = base * (1 - weight) + colours * weight
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), "RGB")
