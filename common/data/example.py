"""What every source yields: one 2D training image (or every frame of one file) and its target."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "labels.csv"
MASK_MANIFEST = "masks.csv"
MANIFESTS = {"classification": (MANIFEST, "label"), "segmentation": (MASK_MANIFEST, "mask")}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Example:
    path: Path
    label: int = -1  # classification
    mask: Path | None = None  # segmentation
    frame: int | None = None  # one frame of a multi-frame file / one row of an array; None: every frame
    member: str = ""  # the array inside an archive (an .npz's "train_images"); "" when the file is the image
    split: str = ""  # "train" or "val" where the source fixes it (.npz); "": the site splits by hash
    group: str = ""  # what stays on one side of the split (a series, a study); "": the file


def is_image_file(path: Path) -> bool:
    """Worth decoding: an image suffix, or no suffix and a DICOM start (PACS exports often have none)."""
    suffix = path.suffix.lower()
    if path.name.startswith(".") or path.name == "DICOMDIR":
        return False
    if suffix in DICOM_SUFFIXES or suffix in RASTER_SUFFIXES:
        return True
    return (suffix == "" or suffix[1:].isdigit()) and _starts_like_dicom(path)


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))


def _starts_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")
