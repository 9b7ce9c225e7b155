"""Decoded images cached on the site's own disk, so rounds after the first decode nothing.

The key is what the files contain (their sha256, see `digests`) plus each example's
name, label, frame and the decode settings: a copied or restored archive hits the
cache, an edited file or a new image size is decoded afresh. The site passes its own
state folder, so a cache is never shared across sites, and it is safe to delete: a
missing or damaged cache file is simply decoded again. A site keeps at most `keep` decoded sets
(image sizes, data versions): each new one removes the oldest beyond that, so a coordinator
cycling image sizes cannot fill the site's disk.

Every frame of a multi-frame file becomes its own row (`file.dcm#3`), with the file's
label; rows also carry the unit the train/validation split keeps together (`groups`)
and any split the source fixed (`splits`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data import digests
from common.data.example import Example
from common.errors import DataError, FedhospError, MaskMismatch
from common.site_state import SiteState

log = logging.getLogger(__name__)
FORMAT = 3
DIGESTS = "digests.json"


@dataclass(frozen=True)
class Decoded:
    images: np.ndarray  # (N, H, W) float16 in [0, 1]; (N, 3, H, W) decoded for a colour model (`channels` 3)
    targets: np.ndarray  # (N,) class indices, or (N, H, W) class maps for segmentation
    names: tuple[str, ...]  # file names relative to the data folder (`#k` for frame k): stay on site
    skipped: tuple[tuple[str, str], ...]  # (file, reason) for files that could not be used
    groups: tuple[str, ...] = ()  # per row: what stays on one side of the split (file, series, study)
    splits: tuple[str, ...] = ()  # per row: "train" / "val" where the source fixed it, else ""


def cache_key(examples: Sequence[Example], root: Path, params: dict,
              cache_dir: SiteState | Path | None = None) -> str:
    """A digest of the files' contents, the examples and `params`; `cache_dir` reuses saved file digests."""
    if cache_dir is not None:
        digests.load(SiteState.at(cache_dir), DIGESTS)
    key = hashlib.sha256(json.dumps({"format": FORMAT, **params}, sort_keys=True).encode())
    for e in examples:
        fields = [_base(e, root), digests.digest(e.path), e.label, e.frame, e.split, e.group]
        if e.mask is not None:
            fields += [str(e.mask.relative_to(root)), digests.digest(e.mask)]
        key.update(json.dumps(fields).encode() + b"\n")
    return key.hexdigest()[:32]


def load_or_decode(
    examples: Sequence[Example],
    root: Path,
    cache_dir: SiteState | Path,
    params: dict,
    decode: Callable[[Example], tuple[np.ndarray, np.ndarray | int]],
    keep: int | None = None,
) -> Decoded:
    """Decode every example once; unreadable files are skipped and listed, not fatal.

    `cache_dir` is a site's own cache folder (`SiteState.subfolder`); tools pass a plain folder.
    `keep`: the most decoded sets left in it after a new one is written (None: no limit)."""
    state = SiteState.at(cache_dir)
    hashed_before = digests.hashed
    name = f"decoded-{cache_key(examples, root, params, state)}.npz"
    decoded = _read(state, name)
    if decoded is None:
        decoded = _decode_all(examples, root, decode, 3 if params.get("channels") == 3 else 2)
        _write(state, name, decoded)
        if keep is not None:
            evict(state, keep)
    if digests.hashed != hashed_before:
        files = {e.path for e in examples} | {e.mask for e in examples if e.mask is not None}
        digests.save(state, DIGESTS, files)
    return decoded


def evict(state: SiteState, keep: int) -> list[str]:
    """Delete all but the `keep` newest decoded sets (by mtime), through the state's owner; returns their names."""
    folder = state.path
    held = [p for p in folder.glob("decoded-*.npz") if p.is_file() and p.stat().st_size > 0]
    held.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    old = [p.name for p in held[max(keep, 1):]]
    for name in old:
        state.remove(name)
    if old:
        log.info("decode cache: removed %d older decoded set(s), keeping %d", len(old), keep)
    return old


def _base(e: Example, root: Path) -> str:
    name = str(e.path.relative_to(root))
    return f"{name}:{e.member}" if e.member else name


def _decode_all(examples, root, decode, image_ndim: int = 2) -> Decoded:
    """`image_ndim`: an image's dimensions (2 grey, 3 colour: (3, H, W)); one more is a stack of frames."""
    images, targets, names, groups, splits, skipped = [], [], [], [], [], []
    for e in examples:
        base = _base(e, root)
        try:
            image, target = decode(e)
        except MaskMismatch:
            raise
        except FedhospError as exc:
            skipped.append((str(e.path.relative_to(root)), str(exc)))
            continue
        stack = image if image.ndim == image_ndim + 1 else image[None]
        per_frame = isinstance(target, np.ndarray) and target.ndim == 3
        for k, frame_image in enumerate(stack):
            frame = e.frame if e.frame is not None else (k if len(stack) > 1 else None)
            name = base if frame is None else f"{base}#{frame}"
            images.append(frame_image.astype(np.float16))
            targets.append(target[k] if per_frame else target)
            names.append(name)
            groups.append(e.group or (name if e.member else base))
            splits.append(e.split)
    if skipped:
        log.warning("skipped %d of %d files that could not be decoded", len(skipped), len(examples))
    if not images:
        raise DataError(f"none of the {len(examples)} files in {root} could be decoded")
    return Decoded(np.stack(images), np.asarray(targets, dtype=np.int64), tuple(names), tuple(skipped),
                   tuple(groups), tuple(splits))


def _write(state: SiteState, name: str, d: Decoded) -> None:
    state.save_npz(name, images=d.images,
                   targets=d.targets.astype(np.uint8 if d.targets.max() < 256 else np.int64),
                   names=np.asarray(d.names), groups=np.asarray(d.groups), splits=np.asarray(d.splits),
                   skipped=np.asarray(d.skipped, dtype=str).reshape(-1, 2))


def _read(state: SiteState, name: str) -> Decoded | None:
    """The cached decode, or None where it is missing or damaged (then it is simply decoded again)."""
    try:
        path = state.path_for(name)
        if not path.is_file() or path.stat().st_size == 0:  # missing, or left empty by a crash
            return None
        z = state.load_npz(name)
        if z is None:
            return None
        skipped = tuple((str(a), str(b)) for a, b in z["skipped"])
        return Decoded(z["images"], z["targets"].astype(np.int64), tuple(str(n) for n in z["names"]), skipped,
                       tuple(str(g) for g in z["groups"]), tuple(str(s) for s in z["splits"]))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("decode cache %s is unreadable (%s); decoding again", name, exc)
        return None
