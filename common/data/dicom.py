"""Decode one DICOM file into a grey image in [0, 1], the way a radiologist's viewer would.

Order matters: the modality LUT (RescaleSlope/Intercept) gives physical units, the
VOI window maps them to display, and MONOCHROME1 is inverted last so that dense
tissue is bright in every site's tensors whatever its scanner wrote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from common.errors import DataError


def read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def physical(ds: pydicom.Dataset) -> np.ndarray:
    """Pixel values in physical units (HU for CT), as float32."""
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing/undecodable pixel data
        raise DataError(f"cannot decode pixel data: {exc}") from exc
    return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)


def window_bounds(ds: pydicom.Dataset, values: np.ndarray) -> tuple[float, float]:
    """The file's own window if it has one, else the 1st-99th percentile of its values."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w > 0:
            return c - w / 2, c + w / 2
    low, high = np.percentile(values, [1, 99])
    return float(low), float(max(high, low + 1e-3))


def to_display(values: np.ndarray, low: float, high: float, photometric: str) -> np.ndarray:
    image = np.clip((values - low) / (high - low), 0.0, 1.0)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape == (size, size):
        return image
    tensor = torch.from_numpy(image)[None, None]
    out = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
    return out[0, 0].numpy()


def display(path: Path) -> np.ndarray:
    """A single-frame grey DICOM as a float32 image in [0, 1] at its own resolution."""
    ds = read(path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path.name}: photometric {photometric} is not supported yet (grey only)")
    values = physical(ds)
    if values.ndim != 2:
        raise DataError(f"{path.name}: expected one 2D frame, got shape {values.shape}")
    low, high = window_bounds(ds, values)
    return to_display(values, low, high, photometric)


def decode(path: Path, size: int) -> np.ndarray:
    """A single-frame grey DICOM as a size x size float32 image in [0, 1]."""
    return resize(display(path), size)
