"""Where a site's examples come from: a folder of images with a manifest.

Classification: `labels.csv` with columns `file,label` (label a class index).
Segmentation: `masks.csv` with columns `file,mask` (mask a PNG, NPY or DICOM SEG).
Images are DICOM files (or PNG/JPEG); paths in a manifest are relative to the folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError

MANIFEST = "labels.csv"
MASK_MANIFEST = "masks.csv"
MANIFESTS = {"classification": (MANIFEST, "label"), "segmentation": (MASK_MANIFEST, "mask")}


@dataclass(frozen=True)
class Example:
    path: Path
    label: int = -1  # classification
    mask: Path | None = None  # segmentation


def dicom_folder(root: Path, task: str = "classification") -> list[Example]:
    """The examples of a site's folder; every problem names the file and the fix."""
    root = Path(root)
    name, column = MANIFESTS[task]
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: check the site's data-path")
    manifest = root / name
    if not manifest.is_file():
        if not any(root.iterdir()):
            raise DataError(f"data folder {root} is empty: put the site's DICOM files there")
        raise DataError(f"{manifest} is missing: add a CSV with columns file,{column}")
    examples = _read_manifest(manifest, column)
    if not examples:
        raise DataError(f"{manifest} lists no files: add one row per image (file,{column})")
    missing = [e.path.name for e in examples if not e.path.is_file()]
    missing += [e.mask.name for e in examples if e.mask is not None and not e.mask.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{manifest} names {len(missing)} missing file(s): {shown}")
    return examples


def _read_manifest(manifest: Path, column: str) -> list[Example]:
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", column} <= set(reader.fieldnames):
            raise DataError(f"{manifest}: the header must be 'file,{column}', got {reader.fieldnames}")
        return [_example(manifest, line, row, column) for line, row in enumerate(reader, start=2)]


def _example(manifest: Path, line: int, row: dict, column: str) -> Example:
    path = manifest.parent / row["file"]
    if column == "mask":
        if not row["mask"]:
            raise DataError(f"{manifest} line {line}: no mask for {row['file']}")
        return Example(path, mask=manifest.parent / row["mask"])
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise DataError(
            f"{manifest} line {line}: label {row['label']!r} is not a class index (0, 1, ...)"
        ) from None
    if label < 0:
        raise DataError(f"{manifest} line {line}: label {label} is negative")
    return Example(path, label=label)
