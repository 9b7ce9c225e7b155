"""Where a site's examples come from: for now a DICOM folder with a `file,label` manifest."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError

MANIFEST = "labels.csv"


@dataclass(frozen=True)
class Example:
    path: Path
    label: int


def dicom_folder(root: Path) -> list[Example]:
    """The labelled files of a DICOM folder; every problem names the file and the fix."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: check the site's data-path")
    manifest = root / MANIFEST
    if not manifest.is_file():
        if not any(root.iterdir()):
            raise DataError(f"data folder {root} is empty: put the site's DICOM files there")
        raise DataError(f"{manifest} is missing: add a CSV with columns file,label")
    examples = _read_manifest(manifest)
    if not examples:
        raise DataError(f"{manifest} lists no files: add one row per image (file,label)")
    missing = [e.path.name for e in examples if not e.path.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{manifest} names {len(missing)} missing file(s): {shown}")
    return examples


def _read_manifest(manifest: Path) -> list[Example]:
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
            raise DataError(f"{manifest}: the header must be 'file,label', got {reader.fieldnames}")
        examples = []
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(
                    f"{manifest} line {line}: label {row['label']!r} is not a class index (0, 1, ...)"
                ) from None
            if label < 0:
                raise DataError(f"{manifest} line {line}: label {label} is negative")
            examples.append(Example(manifest.parent / row["file"], label))
    return examples
