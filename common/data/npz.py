"""MedMNIST-style archives: `<split>_images` and `<split>_labels` arrays in one `.npz`.

The archive's own train/val split is kept (a site does not re-split it), and its test
split stays out of the federation: it is for a final evaluation, never for training or
for choosing a model. Images are (N, H, W) or (N, H, W, 3) arrays; labels (N,) or (N, 1).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from common.data.dicom import luma
from common.data.example import Example
from common.errors import DataError

SPLITS = ("train", "val", "test")
SITE_SPLITS = ("train", "val")


def examples(root: Path, archives: list[Path], task: str, splits: tuple[str, ...] = SITE_SPLITS) -> list[Example]:
    if len(archives) > 1:
        raise DataError(f"{root} holds {len(archives)} .npz files ({', '.join(a.name for a in archives[:3])}): "
                        "keep one archive per site folder")
    path = archives[0]
    if task != "classification":
        raise DataError(f"{path}: an .npz archive holds labels, not masks: segmentation needs masks.csv")
    found: list[Example] = []
    try:
        with np.load(path, allow_pickle=False) as z:
            present = [s for s in SPLITS if f"{s}_images" in z.files and f"{s}_labels" in z.files]
            if not present:
                raise DataError(f"{path}: no train_images/train_labels (or val_*, test_*) arrays: "
                                "not a MedMNIST-style archive")
            for split in (s for s in splits if s in present):
                found += _split(path, z, split)
    except DataError:
        raise
    except Exception as exc:  # a damaged zip or array header
        raise DataError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from exc
    if not found:
        raise DataError(f"{path}: the archive has no {' or '.join(splits)} split")
    return found


def _split(path: Path, z, split: str) -> list[Example]:
    labels = np.asarray(z[f"{split}_labels"])
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path}: {split}_labels has shape {labels.shape}: multi-label archives are not supported")
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise DataError(f"{path}: {split}_labels must be class indices (0, 1, ...)")
    shape = _shape(z, f"{split}_images")
    if shape[0] != len(labels):
        raise DataError(f"{path}: {split}_images holds {shape[0]} images but {split}_labels {len(labels)} labels")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3, 4))):
        raise DataError(f"{path}: {split}_images has shape {shape}: only 2D images (grey or colour) are supported")
    member = f"{split}_images"
    return [Example(path, label=int(label), frame=i, member=member, split=split) for i, label in enumerate(labels)]


def _shape(z, key: str) -> tuple[int, ...]:
    """An array's shape from its header, without loading it (a 224-pixel MedMNIST is gigabytes)."""
    with z.zip.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(header(f)[0])


def image(example: Example, channels: int = 1) -> np.ndarray:
    """Row `example.frame` of `example.member` as float32 grey (H, W) in [0, 1], or (3, H, W) with `channels` 3."""
    st = example.path.stat()
    array = _array(str(example.path), example.member, st.st_size, st.st_mtime_ns)
    if example.frame is None or not 0 <= example.frame < len(array):
        raise DataError(f"{example.path.name}: {example.member} has no row {example.frame}")
    return to_rgb(array[example.frame]) if channels == 3 else to_grey(array[example.frame])


@functools.lru_cache(maxsize=4)
def _array(path: str, member: str, size: int, mtime_ns: int) -> np.ndarray:
    """The whole array, once per process (size and mtime in the key: an edited archive is read again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[member]
    except Exception as exc:
        raise DataError(f"{Path(path).name}: cannot read {member} ({type(exc).__name__}: {exc})") from exc


def to_rgb(row: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1]: a colour row's RGB (alpha dropped), a grey row repeated."""
    if row.ndim == 3 and row.shape[-1] in (3, 4):
        row = np.ascontiguousarray(row[..., :3])
        top = 255.0 if row.dtype == np.uint8 else float(max(row.max(), 1))
        return np.clip(np.moveaxis(row.astype(np.float32), -1, 0) / top, 0.0, 1.0)
    return np.repeat(to_grey(row)[None], 3, axis=0)


def to_grey(row: np.ndarray) -> np.ndarray:
    if row.ndim == 3:
        row = row[..., 0] if row.shape[-1] == 1 else row[..., :3]
    if row.ndim == 3:
        top = 255.0 if row.dtype == np.uint8 else float(max(row.max(), 1))
        return luma(np.ascontiguousarray(row), top)
    if np.issubdtype(row.dtype, np.integer):
        return (row / float(np.iinfo(row.dtype).max)).astype(np.float32)
    if row.dtype == bool:
        return row.astype(np.float32)
    values = row.astype(np.float32)
    return values.clip(0.0, 1.0) if values.max() <= 1.0 else (values - values.min()) / max(np.ptp(values), 1e-6)
