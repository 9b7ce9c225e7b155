"""A site's manifest: a label (or mask) per file, per folder, per series or per study.

`file,label` labels files (a row naming a folder labels every image under it);
`series,label` and `study,label` label every slice of a DICOM series or study by its
Series/Study Instance UID, so a radiologist's per-study read labels all its images.
Slices labelled together stay on one side of the train/validation split. Error
messages name manifest lines, never UIDs or other tag values. Every path a manifest
names stays inside its folder: an absolute path, `..` or a symlink leading out is
refused, so a manifest cannot make the site train on (and leak into the model) files
outside the data it was pointed at.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

from common.data import dicom
from common.data.example import RASTER_SUFFIXES, Example, image_files
from common.errors import DataError

KEYS = ("file", "series", "study")
UID_KEYWORDS = {"series": "SeriesInstanceUID", "study": "StudyInstanceUID"}


def read(manifest: Path, column: str) -> list[Example]:
    key, rows = _rows(manifest, column)
    if not rows:
        raise DataError(f"{manifest} lists no files: add one row per image (file,{column})")
    if key != "file":
        return _by_uid(manifest, key, rows)
    examples = [e for line, row in rows for e in _file_examples(manifest, line, row, column)]
    missing = [e.path.name for e in examples if not e.path.is_file()]
    missing += [e.mask.name for e in examples if e.mask is not None and not e.mask.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{manifest} names {len(missing)} missing file(s): {shown}")
    return examples


def _rows(manifest: Path, column: str) -> tuple[str, list[tuple[int, dict]]]:
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        keys = [k for k in KEYS if k in fields] if column == "label" else ["file"] if "file" in fields else []
        if column not in fields or len(keys) != 1:
            accepted = "'file,label' (or 'series,label' / 'study,label')" if column == "label" else "'file,mask'"
            raise DataError(f"{manifest}: the header must be {accepted}, got {reader.fieldnames}")
        return keys[0], list(enumerate(reader, start=2))


def _file_examples(manifest: Path, line: int, row: dict, column: str) -> list[Example]:
    name = (row["file"] or "").strip()
    if not name:
        raise DataError(f"{manifest} line {line}: the file column is empty")
    path = inside(manifest, line, name)
    if column == "mask":
        if not row["mask"]:
            raise DataError(f"{manifest} line {line}: no mask for {row['file']}")
        return [Example(path, mask=inside(manifest, line, row["mask"].strip()))]
    label = _label(manifest, line, row)
    if path.is_dir():
        files = [inside(manifest, line, str(p.relative_to(manifest.parent))) for p in image_files(path)]
        if not files:
            raise DataError(f"{manifest} line {line}: folder {row['file']} holds no images")
        return [Example(p, label=label, group=f"folder:{name}") for p in files]
    return [Example(path, label=label)]


def inside(manifest: Path, line: int, name: str) -> Path:
    """`name` under the manifest's folder; DataError if it is absolute or leads out (`..`, a symlink)."""
    folder = manifest.parent
    path = folder / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
        where = f" line {line}" if line else ""
        raise DataError(f"{manifest}{where}: {name!r} is outside the data folder {folder}: a manifest "
                        "names files inside its own folder only (relative paths, no '..', no symlinks out)")
    return path


def _label(manifest: Path, line: int, row: dict) -> int:
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise DataError(
            f"{manifest} line {line}: label {row['label']!r} is not a class index (0, 1, ...)"
        ) from None
    if label < 0:
        raise DataError(f"{manifest} line {line}: label {label} is negative")
    return label


def _by_uid(manifest: Path, key: str, rows: list[tuple[int, dict]]) -> list[Example]:
    """Every readable DICOM file under the folder whose series (or study) the manifest labels."""
    labels: dict[str, tuple[int, int]] = {}  # uid -> (label, line)
    for line, row in rows:
        uid = (row[key] or "").strip()
        if not uid:
            raise DataError(f"{manifest} line {line}: no {key} UID")
        label = _label(manifest, line, row)
        if uid in labels and labels[uid][0] != label:
            raise DataError(f"{manifest} lines {labels[uid][1]} and {line} give one {key} two labels")
        labels[uid] = (label, line)
    members: dict[str, list[Path]] = defaultdict(list)
    for path in image_files(manifest.parent):
        inside(manifest, 0, str(path.relative_to(manifest.parent)))  # a symlink out of the folder: refused
        uid = _uid(path, UID_KEYWORDS[key])
        if uid in labels:
            members[uid].append(path)
    unmatched = sorted(line for uid, (_, line) in labels.items() if uid not in members)
    if unmatched:
        shown = ", ".join(map(str, unmatched[:5])) + (" ..." if len(unmatched) > 5 else "")
        raise DataError(f"{manifest} line(s) {shown}: no readable DICOM file under {manifest.parent} "
                        f"belongs to that {key}")
    return [Example(p, label=labels[uid][0], group=f"{key}:{_short(uid)}")
            for uid in sorted(members) for p in members[uid]]


def _uid(path: Path, keyword: str) -> str | None:
    if path.suffix.lower() in RASTER_SUFFIXES:
        return None
    try:
        return str(dicom.read(path, header_only=True).get(keyword, "")) or None
    except DataError:
        return None  # unreadable files are no example; `fedhosp inspect` lists them with the reason


def _short(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:16]
