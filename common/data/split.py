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
