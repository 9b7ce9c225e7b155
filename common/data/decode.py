"""One example -> (image, target) at the model's input size, whatever the file type.

A multi-frame file gives one image per frame, stacked (F, size, size): the decode
cache turns each into its own example with the file's label.
"""

from __future__ import annotations

import numpy as np

from common.data import dicom, masks, npz, raster
from common.data.example import RASTER_SUFFIXES, Example
from common.errors import DataError, MaskMismatch

RASTER = RASTER_SUFFIXES


def load_frames(example: Example, window: str = "auto") -> np.ndarray:
    """float32 (F, H, W) grey in [0, 1] at the file's own resolution."""
    if example.member:
        return npz.image(example)[None]
    if example.path.suffix.lower() in RASTER:
        if example.frame not in (None, 0):
            raise DataError(f"{example.path.name}: a PNG/JPEG image has one frame, not frame {example.frame}")
        return raster.read(example.path)[None]
    return dicom.frames(example.path, window, example.frame)


def decode_example(example: Example, size: int, window: str = "auto") -> tuple[np.ndarray, np.ndarray | int]:
    stack = load_frames(example, window)
    if example.mask is None:
        images = dicom.resize(stack, size)
        return (images[0] if len(images) == 1 else images), example.label
    if len(stack) != 1:
        raise MaskMismatch(f"image {example.path.name} has {len(stack)} frames but mask {example.mask.name} "
                           "is one 2D map: pair masks with single-frame images")
    image = stack[0]
    sop = None
    if example.mask.suffix.lower() == ".dcm" and example.path.suffix.lower() not in RASTER:
        sop = str(dicom.read(example.path, header_only=True).get("SOPInstanceUID", "")) or None
    mask = masks.read_mask(example.mask, sop)
    if mask.shape != image.shape:
        raise MaskMismatch(
            f"mask {example.mask.name} is {mask.shape[1]}x{mask.shape[0]} but image {example.path.name} "
            f"is {image.shape[1]}x{image.shape[0]}: they must match pixel for pixel"
        )
    return dicom.resize(image, size), masks.resize_mask(mask, size)
