"""A site's deterministic train/validation split.

Each file goes to validation by a hash of its name and the seed, not by its
position, so adding images to the archive never moves an old one across the split
(which would leak validation images into training between runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def validation_mask(names: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    def unit(name: str) -> float:
        h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    return np.fromiter((unit(n) < fraction for n in names), dtype=bool, count=len(names))


def held_out(decoded, fraction: float, seed: int) -> np.ndarray:
    """The validation rows of a `cache.Decoded`: a split the source fixed wins ("val" held out,
    "train" not); other rows go by a hash of their group, so every frame of a file and every
    slice of a labelled series lands on the same side (neighbouring slices on both sides
    would leak validation images into training)."""
    keys = decoded.groups or decoded.names
    by_hash = validation_mask(keys, fraction, seed)
    if not decoded.splits:
        return by_hash
    splits = np.asarray(decoded.splits)
    return np.where(splits == "val", True, np.where(splits == "train", False, by_hash))
