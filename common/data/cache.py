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
from common.errors import DataError, FedhospError

log = logging.getLogger(__name__)
FORMAT = 1


@dataclass(frozen=True)
class Decoded:
    images: np.ndarray  # (N, H, W) float16 in [0, 1]
    labels: np.ndarray  # (N,) int64
    names: tuple[str, ...]  # file names relative to the data folder: stay on site
    skipped: tuple[tuple[str, str], ...]  # (file, reason) for files that could not be used


def cache_key(examples: Sequence[Example], root: Path, params: dict) -> str:
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **params}, sort_keys=True).encode())
    for e in examples:
        st = e.path.stat()
        digest.update(f"{e.path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}|{e.label}\n".encode())
    return digest.hexdigest()[:32]


def load_or_decode(
    examples: Sequence[Example],
    root: Path,
    cache_dir: Path,
    params: dict,
    decode: Callable[[Path], np.ndarray],
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
    images, labels, names, skipped = [], [], [], []
    for e in examples:
        name = str(e.path.relative_to(root))
        try:
            images.append(decode(e.path).astype(np.float16))
        except FedhospError as exc:
            skipped.append((name, str(exc)))
            continue
        labels.append(e.label)
        names.append(name)
    if skipped:
        log.warning("skipped %d of %d files that could not be decoded", len(skipped), len(examples))
    if not images:
        raise DataError(f"none of the {len(examples)} files in {root} could be decoded")
    return Decoded(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(names), tuple(skipped))


def _write(path: Path, d: Decoded) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=d.images, labels=d.labels, names=np.asarray(d.names),
             skipped=np.asarray(d.skipped, dtype=str).reshape(-1, 2))
    os.replace(tmp, path)


def _read(path: Path) -> Decoded:
    with np.load(path, allow_pickle=False) as z:
        skipped = tuple((str(a), str(b)) for a, b in z["skipped"])
        return Decoded(z["images"], z["labels"], tuple(str(n) for n in z["names"]), skipped)
