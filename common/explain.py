"""Why the model decided: class activation heatmaps and mask overlays, as images a person reads.

Heatmaps come from the `grad-cam` package (pytorch_grad_cam), using its HiResCAM:
Grad-CAM with the gradient multiplied into the activations element-wise instead of
averaged per channel first. Our SmallCNN's head reads the *maximum* of each feature
map, so the gradient of a channel is one-hot at the location that fired; plain
Grad-CAM averages that location away. Measured on synthetic lesions over five trained
models: plain Grad-CAM's peak fell inside the lesion in 4-33% of positive images (the
lesion covers 5% of the image), HiResCAM's in 27-47%, and within 2 pixels of it in
45-69% (tests/common/test_explain.py states the fraction for its model).

The layer explained is the deepest feature block whose map is still at least
MIN_SIDE pixels a side: the last block of a 32-pixel model is 4x4, too coarse to
point at a lesion a few pixels across. Overlays are drawn on the model's input (the
image decoded at the card's size), enlarged: that is the image the heatmap explains.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError

MIN_SIDE = 8
OVERLAY_SIDE = 256  # overlays show the model's input enlarged to this, so a 32-pixel input is readable
PRED_RGB, TRUE_RGB = np.array([1.0, 0.15, 0.15]), np.array([0.15, 1.0, 0.15])  # overlap shows yellow


def cam_layer(model: nn.Module, image_size: int, in_channels: int = 1) -> nn.Module:
    """The deepest block of `model.features` whose output is at least MIN_SIDE pixels a side."""
    blocks = getattr(model, "features", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ConfigError(f"heatmaps need a model with a `features` block sequence; {type(model).__name__} "
                          "has none: explain supports the cnn architecture")
    sides: list[int] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: sides.append(min(out.shape[-2:]))) for b in blocks]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    finally:
        for h in hooks:
            h.remove()
    chosen = max((i for i, side in enumerate(sides) if side >= MIN_SIDE), default=0)
    return blocks[chosen]


def heatmaps(model: nn.Module, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """(N, H, W) heatmaps in [0, 1] at the input size: where the evidence for each image's class lies."""
    from pytorch_grad_cam import HiResCAM  # imported here: it pulls in OpenCV and matplotlib (seconds)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = cam_layer(model, images.shape[-1], images.shape[1])
    cam = HiResCAM(model=model, target_layers=[layer])
    try:
        with torch.enable_grad():
            return cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        cam.activations_and_grads.release()  # not `with cam`: its __exit__ swallows IndexError


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, column) of the heatmap's maximum."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(row), int(col)


def _resize(values: np.ndarray, side: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(side, side), mode=mode)[0, 0].numpy()


def _grey_rgb(image: np.ndarray, side: int) -> np.ndarray:
    return np.repeat(np.clip(_resize(image, side, "bilinear"), 0.0, 1.0)[..., None], 3, axis=2)


def cam_overlay(image: np.ndarray, heatmap: np.ndarray, side: int = OVERLAY_SIDE) -> np.ndarray:
    """RGB uint8, side x side: the heatmap on the image as the model saw it (its input, enlarged)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    heat = np.clip(_resize(heatmap, side, "bilinear"), 0.0, 1.0)
    return show_cam_on_image(_grey_rgb(image, side), heat, use_rgb=True, image_weight=0.6)


def mask_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None,
                 side: int = OVERLAY_SIDE) -> np.ndarray:
    """RGB uint8, side x side: predicted foreground red, true foreground green (both: yellow)."""
    rgb = _grey_rgb(image, side)
    tint = np.zeros_like(rgb)
    shown = np.zeros((side, side), dtype=bool)
    for mask, colour in ((pred, PRED_RGB), (truth, TRUE_RGB)):
        if mask is None:
            continue
        on = _resize((np.asarray(mask) > 0).astype(np.float32), side, "nearest") > 0.5
        tint[on] = np.maximum(tint[on], colour)
        shown |= on
    rgb[shown] = 0.5 * rgb[shown] + 0.5 * tint[shown]
    return (255 * rgb).round().astype(np.uint8)
