"""One example -> (image, target) arrays at the model's input size, whatever the file type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from common.data import dicom, masks
from common.data.sources import Example
from common.errors import DataError, MaskMismatch

RASTER = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def load_display(path: Path) -> np.ndarray:
    """A grey image in [0, 1] at its own resolution: DICOM through the viewer pipeline, else 8/16-bit."""
    if path.suffix.lower() in RASTER:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("L"), dtype=np.float32)
        except OSError as exc:
            raise DataError(f"{path.name}: not a readable image ({exc})") from exc
        return arr / 255.0
    return dicom.display(path)


def decode_example(example: Example, size: int) -> tuple[np.ndarray, np.ndarray | int]:
    image = load_display(example.path)
    if example.mask is None:
        return dicom.resize(image, size), example.label
    sop = None
    if example.mask.suffix.lower() == ".dcm" and example.path.suffix.lower() not in RASTER:
        sop = str(pydicom.dcmread(example.path, stop_before_pixels=True).get("SOPInstanceUID", "")) or None
    mask = masks.read_mask(example.mask, sop)
    if mask.shape != image.shape:
        raise MaskMismatch(
            f"mask {example.mask.name} is {mask.shape[1]}x{mask.shape[0]} but image {example.path.name} "
            f"is {image.shape[1]}x{image.shape[0]}: they must match pixel for pixel"
        )
    return dicom.resize(image, size), masks.resize_mask(mask, size)
