"""Segmentation masks at a site: PNG, NPY or DICOM SEG, as integer class maps.

A PNG whose only values are 0 and 255 is read as binary (255 -> 1), the usual way
label images are saved. A DICOM SEG holds one frame per (segment, source image);
the frames that reference the image being trained on are merged into one class map
(segment number = class index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import DataError


def read_mask(path: Path, source_sop_uid: str | None = None) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            mask = np.load(path, allow_pickle=False)
        elif suffix == ".dcm":
            mask = read_seg(path, source_sop_uid)
        else:
            with Image.open(path) as img:
                mask = np.asarray(img.convert("L") if img.mode not in ("L", "I", "I;16") else img)
    except DataError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pydicom and its plugins fail in many ways on a damaged or exotic SEG
        raise DataError(f"{path.name}: not a readable mask ({type(exc).__name__}: {exc})") from exc
    if mask.ndim != 2:
        raise DataError(f"{path.name}: a mask must be one 2D class map, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer) and not np.all(np.mod(mask, 1) == 0):
        raise DataError(f"{path.name}: mask values must be class indices (integers)")
    values = np.unique(mask)
    if set(values.tolist()) == {0, 255}:
        mask = mask // 255
    if values.min() < 0:
        raise DataError(f"{path.name}: mask holds negative values")
    return mask.astype(np.int64)


def read_seg(path: Path, source_sop_uid: str | None) -> np.ndarray:
    """The class map a DICOM SEG gives the source image `source_sop_uid` (any, if None)."""
    ds = pydicom.dcmread(path)
    if ds.get("Modality") != "SEG":
        raise DataError(f"{path.name}: a .dcm mask must be a DICOM SEG object, got modality {ds.get('Modality')}")
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    mask = np.zeros((ds.Rows, ds.Columns), dtype=np.int64)
    found = False
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        refs = {
            src.ReferencedSOPInstanceUID
            for der in group.get("DerivationImageSequence", [])
            for src in der.get("SourceImageSequence", [])
        }
        if source_sop_uid is not None and source_sop_uid not in refs:
            continue
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        mask[frame > 0] = segment
        found = True
        if source_sop_uid is None:
            break
    if not found:
        raise DataError(f"{path.name}: no SEG frame references the image it is paired with")
    return mask


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour, so class indices stay class indices."""
    if mask.shape == (size, size):
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0].numpy().astype(np.int64)
