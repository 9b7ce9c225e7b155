"""PNG / JPEG / TIFF images in [0, 1]: grey (16-bit greys keep their depth: exported radiographs), or
colour for a colour model (`read_rgb`: RGB kept, grey repeated, transparency dropped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from common.errors import DataError

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def read(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode in SIXTEEN_BIT:
                return np.asarray(img, dtype=np.float32) / 65535.0
            if img.mode == "I":
                values = np.asarray(img, dtype=np.float64)
                return (values / (65535.0 if values.max() <= 65535 else values.max())).clip(0, 1).astype(np.float32)
            if img.mode == "F":
                return np.asarray(img, dtype=np.float32).clip(0.0, 1.0)
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0  # ITU-R 601 luma, as for DICOM
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"{Path(path).name}: not a readable image ({type(exc).__name__}: {exc})") from exc


GREY_MODES = (*SIXTEEN_BIT, "I", "F", "L", "LA", "1")


def is_colour(path: Path) -> bool:
    with Image.open(path) as img:
        return img.mode not in GREY_MODES


def read_rgb(path: Path) -> np.ndarray:
    """float32 (3, H, W) in [0, 1]: a colour image as RGB, a grey one (any depth) repeated."""
    try:
        with Image.open(path) as img:
            if img.mode not in GREY_MODES:
                return np.moveaxis(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, -1, 0).copy()
    except Exception as exc:
        raise DataError(f"{Path(path).name}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return np.repeat(read(path)[None], 3, axis=0)
