"""Decoded images cached on the site's own disk, so rounds after the first decode nothing.

The key covers every file's name, size and modification time plus the decode
settings, so an edited archive or a new image size is decoded afresh; the cache
is safe to delete and lives in the site's state folder, never shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.sources import Example
from common.errors import DataError, FedhospError, MaskMismatch

log = logging.getLogger(__name__)
FORMAT = 2


@dataclass(frozen=True)
class Decoded:
    images: np.ndarray  # (N, H, W) float16 in [0, 1]
    targets: np.ndarray  # (N,) class indices, or (N, H, W) class maps for segmentation
    names: tuple[str, ...]  # file names relative to the data folder: stay on site
    skipped: tuple[tuple[str, str], ...]  # (file, reason) for files that could not be used


def cache_key(examples: Sequence[Example], root: Path, params: dict) -> str:
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **params}, sort_keys=True).encode())
    for e in examples:
        st = e.path.stat()
        digest.update(f"{e.path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{e.label}\n".encode())
        if e.mask is not None:
            mt = e.mask.stat()
            digest.update(f"{e.mask.relative_to(root)}|{mt.st_size}|{mt.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def load_or_decode(
    examples: Sequence[Example],
    root: Path,
    cache_dir: Path,
    params: dict,
    decode: Callable[[Example], tuple[np.ndarray, np.ndarray | int]],
) -> Decoded:
    """Decode every example once; unreadable files are skipped and listed, not fatal."""
    path = Path(cache_dir) / f"decoded-{cache_key(examples, root, params)}.npz"
    if path.is_file():
        try:
            return _read(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("decode cache %s is unreadable (%s); decoding again", path.name, exc)
    decoded = _decode_all(examples, root, decode)
    _write(path, decoded)
    return decoded


def _decode_all(examples, root, decode) -> Decoded:
    images, targets, names, skipped = [], [], [], []
    for e in examples:
        name = str(e.path.relative_to(root))
        try:
            image, target = decode(e)
        except MaskMismatch:
            raise
        except FedhospError as exc:
            skipped.append((name, str(exc)))
            continue
        images.append(image.astype(np.float16))
        targets.append(target)
        names.append(name)
    if skipped:
        log.warning("skipped %d of %d files that could not be decoded", len(skipped), len(examples))
    if not images:
        raise DataError(f"none of the {len(examples)} files in {root} could be decoded")
    return Decoded(np.stack(images), np.asarray(targets, dtype=np.int64), tuple(names), tuple(skipped))


def _write(path: Path, d: Decoded) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=d.images, targets=d.targets.astype(np.uint8 if d.targets.max() < 256 else np.int64),
             names=np.asarray(d.names),
             skipped=np.asarray(d.skipped, dtype=str).reshape(-1, 2))
    os.replace(tmp, path)


def _read(path: Path) -> Decoded:
    with np.load(path, allow_pickle=False) as z:
        skipped = tuple((str(a), str(b)) for a, b in z["skipped"])
        targets = z["targets"].astype(np.int64)
        return Decoded(z["images"], targets, tuple(str(n) for n in z["names"]), skipped)
