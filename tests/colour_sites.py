"""Tiny colour hospitals written on the fly: RGB PNGs and RGB DICOM files whose class is in their hue.

Class 1 is a red disc, class 0 a blue one of the same luma, so that a model that sees only grey
cannot tell them apart and a colour model can. Written by the tests (no binary fixtures).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def _colours() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A red and a blue of equal ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), within one grey level."""
    red = (180, 40, 40)
    luma = 0.299 * red[0] + 0.587 * red[1] + 0.114 * red[2]
    green = round((luma - 0.299 * 20 - 0.114 * 255) / 0.587)
    return red, (20, green, 255)


def image(label: int, index: int, size: int = 24) -> np.ndarray:
    """(size, size, 3) uint8: a disc of the class's colour on grey, placed by `index`."""
    rng = np.random.default_rng(index)
    red, blue = _colours()
    out = np.full((size, size, 3), 40, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 4) ** 2
    out[disc] = red if label else blue
    return out


def write_dicom(path: Path, rgb: np.ndarray) -> None:
    """An uncompressed RGB Secondary Capture (PlanarConfiguration 0: R, G, B per pixel)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_site(folder: Path, images: int = 12, start: int = 0, size: int = 24) -> Path:
    """`images` files (every third one DICOM, the rest PNG), alternating labels, and labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + images):
        label = i % 2
        rgb = image(label, i, size)
        name = f"img-{i:03d}.dcm" if i % 3 == 0 else f"img-{i:03d}.png"
        if name.endswith(".dcm"):
            write_dicom(folder / name, rgb)
        else:
            Image.fromarray(rgb, "RGB").save(folder / name)
        rows.append((name, label))
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "label"))
        writer.writerows(rows)
    return folder


def write_hospitals(root: Path, sites: int = 2, images: int = 12, size: int = 24) -> Path:
    for s in range(sites):
        write_site(root / f"site-{s:03d}", images, start=s * images, size=size)
    return root
