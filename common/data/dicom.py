"""Decode one DICOM file into grey frames in [0, 1], the way a radiologist's viewer would.

Order matters: the modality LUT (RescaleSlope/Intercept or a Modality LUT) gives
physical units, the VOI window maps them to display, and MONOCHROME1 is inverted
last so that dense tissue is bright in every site's tensors whatever its scanner
wrote. Colour (RGB, YBR, palette) becomes grey by its luma, or, for a colour model
(`channels = 3`), stays RGB (`rgb`), grey frames then repeated to three channels. Enhanced multi-frame
files keep their rescale and window per frame, in functional groups. Rows stay rows:
the first row of the array is the first row the scanner stored (the top of the image).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from common.data import pixels, windows
from common.errors import DataError

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601: the Y of YBR_FULL
# Functional-group sequences whose values override the top-level ones, frame by frame.
FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def read(path: Path, header_only: bool = False) -> pydicom.Dataset:
    """A DICOM file, also one written without the 128-byte preamble (older exports do that)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many types on a damaged file
        raise DataError(f"{Path(path).name}: not a readable DICOM file ({_reason(exc)})") from exc
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=header_only)
        looks_like_image = "Rows" in ds and (header_only or any(k in ds for k in pixels.PIXEL_KEYWORDS))
    except Exception:
        looks_like_image = False
    if not looks_like_image:
        raise DataError(f"{Path(path).name}: not a readable DICOM file (no DICM header and no image elements)")
    _assume_transfer_syntax(ds)
    return ds


def frames(path: Path, window: str = "auto", index: int | None = None, channels: int = 1) -> np.ndarray:
    """Every frame (or frame `index`) as float32 (F, rows, columns) in [0, 1], or (F, 3, rows, columns)
    with `channels` 3; DataError names the file."""
    return frames_of(read(path), Path(path).name, window, index, channels)


def frames_of(ds: pydicom.Dataset, name: str, window: str = "auto", index: int | None = None,
              channels: int = 1) -> np.ndarray:
    try:
        pixels.check(ds)
        stored, photometric = pixels.decode(ds, index)
        first = 0 if index is None else index
        one = rgb if channels == 3 else grey
        return np.stack([one(frame, frame_view(ds, first + i), photometric, window)
                         for i, frame in enumerate(stored)])
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a damaged file fails in pydicom or a plugin in many ways (pylibjpeg-rle's
        # Rust panics are BaseExceptions); none may stop a site
        raise DataError(f"{name}: cannot decode the pixel data ({_reason(exc)})") from exc


def grey(stored: np.ndarray, ds: pydicom.Dataset, photometric: str, window: str = "auto") -> np.ndarray:
    """One decoded frame -> float32 (rows, columns) in [0, 1]."""
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        image = windows.to_grey(values, ds, window)
        return 1.0 - image if photometric == "MONOCHROME1" else image
    if photometric == "PALETTE COLOR":
        return luma(apply_color_lut(stored, ds), _palette_top(ds))
    if photometric.startswith("YBR"):  # a decoder that left YCbCr: Y is the luma already
        return (stored[..., 0] / float(2 ** int(ds.BitsStored) - 1)).astype(np.float32)
    return luma(stored, float(2 ** int(ds.get("BitsStored") or stored.dtype.itemsize * 8) - 1))


def rgb(stored: np.ndarray, ds: pydicom.Dataset, photometric: str, window: str = "auto") -> np.ndarray:
    """One decoded frame -> float32 (3, rows, columns) in [0, 1]: colour as RGB, grey repeated."""
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return np.repeat(grey(stored, ds, photometric, window)[None], 3, axis=0)
    if photometric == "PALETTE COLOR":
        values, top = apply_color_lut(stored, ds), _palette_top(ds)
    else:
        top = float(2 ** int(ds.get("BitsStored") or stored.dtype.itemsize * 8) - 1)
        values = convert_color_space(stored, photometric, "RGB") if photometric.startswith("YBR") else stored
    return np.clip(np.moveaxis(values.astype(np.float32), -1, 0) / top, 0.0, 1.0)


def luma(rgb: np.ndarray, top: float) -> np.ndarray:
    """Grey from RGB as a viewer would (pydicom converts 8-bit only; wider data uses the same weights)."""
    if rgb.dtype == np.uint8:
        y = convert_color_space(rgb, "RGB", "YBR_FULL")[..., 0].astype(np.float32)
    else:
        y = rgb.astype(np.float64) @ LUMA
    return np.clip(y / top, 0.0, 1.0).astype(np.float32)


def _palette_top(ds: pydicom.Dataset) -> float:
    """The palette's white: 8-bit values in 16-bit entries are a common quirk, so look at the table."""
    entries = int(ds.RedPaletteColorLookupTableDescriptor[0]) or 2**16
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    table = apply_color_lut(np.arange(first, first + entries, dtype=np.int64), ds)
    return 255.0 if table.max() <= 255 else 65535.0


def frame_view(ds: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """`ds` as frame `index` sees it: shared, then per-frame, functional groups override the top level."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    groups = [shared[0] if shared else None, per_frame[index] if per_frame and index < len(per_frame) else None]
    if not any(g is not None and any(k in g for k in FRAME_GROUPS) for g in groups):
        return ds
    view = copy.copy(ds)
    for group in groups:
        for sequence, keywords in FRAME_GROUPS.items():
            items = group.get(sequence) if group is not None else None
            if items:
                for keyword in keywords:
                    if keyword in items[0]:
                        setattr(view, keyword, items[0][keyword].value)
    return view


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) or (F, H, W) to size x size, antialiased so that thin structures survive downsampling."""
    if image.shape[-2:] == (size, size):
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    stack = tensor.reshape(-1, 1, *image.shape[-2:])
    out = F.interpolate(stack, size=(size, size), mode="bilinear", antialias=True)
    return out.reshape(*image.shape[:-2], size, size).numpy()


def display(path: Path) -> np.ndarray:
    """A single-frame DICOM as a float32 grey image in [0, 1] at its own resolution."""
    stack = frames(path)
    if len(stack) != 1:
        raise DataError(f"{Path(path).name}: expected one 2D frame, got {len(stack)} frames")
    return stack[0]


def decode(path: Path, size: int) -> np.ndarray:
    """A single-frame DICOM as a size x size float32 grey image in [0, 1]."""
    return resize(display(path), size)


def _assume_transfer_syntax(ds: pydicom.Dataset) -> None:
    """A file without file meta says how it is encoded only by how it parsed: record that."""
    meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
    if not meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = meta


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
