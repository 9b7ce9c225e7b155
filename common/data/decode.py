"""One example -> (image, target) at the model's input size, whatever the file type.

A multi-frame file gives one image per frame, stacked (F, size, size): the decode
cache turns each into its own example with the file's label. `channels` 3 decodes for
a colour model: each image is (3, size, size), colour kept and grey repeated; 1 (the
default) is grey, colour by its luma.
"""

from __future__ import annotations

import numpy as np

from common.data import dicom, masks, npz, raster
from common.data.example import RASTER_SUFFIXES, Example
from common.errors import DataError, MaskMismatch

RASTER = RASTER_SUFFIXES


def load_frames(example: Example, window: str = "auto", channels: int = 1) -> np.ndarray:
    """float32 (F, H, W) grey in [0, 1] at the file's own resolution; (F, 3, H, W) with `channels` 3."""
    if example.member:
        return npz.image(example, channels)[None]
    if example.path.suffix.lower() in RASTER:
        if example.frame not in (None, 0):
            raise DataError(f"{example.path.name}: a PNG/JPEG image has one frame, not frame {example.frame}")
        return (raster.read_rgb(example.path) if channels == 3 else raster.read(example.path))[None]
    return dicom.frames(example.path, window, example.frame, channels)


def decode_example(example: Example, size: int, window: str = "auto",
                   channels: int = 1) -> tuple[np.ndarray, np.ndarray | int]:
    """(image, target) at size x size: image (size, size), or (F, size, size) for F frames; with
    `channels` 3, (3, size, size) or (F, 3, size, size)."""
    if channels not in (1, 3):
        raise ValueError(f"channels = {channels}: 1 or 3")
    stack = load_frames(example, window, channels)
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
    if mask.shape != image.shape[-2:]:
        raise MaskMismatch(
            f"mask {example.mask.name} is {mask.shape[1]}x{mask.shape[0]} but image {example.path.name} "
            f"is {image.shape[-1]}x{image.shape[-2]}: they must match pixel for pixel"
        )
    return dicom.resize(image, size), masks.resize_mask(mask, size)


def is_colour(example: Example) -> bool:
    """Whether the file holds colour (from its header: nothing decoded); an unreadable file is not."""
    try:
        if example.member:
            with np.load(example.path, allow_pickle=False) as z:
                shape = npz._shape(z, example.member)
            return len(shape) == 4 and shape[-1] in (3, 4)
        if example.path.suffix.lower() in RASTER:
            return raster.is_colour(example.path)
        ds = dicom.read(example.path, header_only=True)
        return int(ds.get("SamplesPerPixel") or 1) == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    except (DataError, OSError, ValueError, KeyError):
        return False
