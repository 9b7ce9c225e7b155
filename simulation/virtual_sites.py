"""Write each virtual hospital's share of a pool once, as a folder any real site could hold.

A site gets 16-bit PNGs and a `labels.csv` under `<data-root>/site-NNN/`, so the sites
read, cache and split their data with exactly the code a hospital runs, and only the
sites a Ray worker is training are in memory (never 100 copies of the pool). Scanner
shift is rendered into the pixels here. `partition.json` records what was written; a
later run with the same pool, partition and shift reuses the folders.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.config import site_name
from common.data import partition, scanner
from common.data.example import MANIFEST
from common.errors import ConfigError
from simulation.pool import Pool

log = logging.getLogger(__name__)
SPEC = "partition.json"
FORMAT = 1
MIN_SITE_SIZE = 4  # a site needs a few images for both a training and a validation split


@dataclass(frozen=True)
class PartitionOptions:
    scheme: str = "iid"
    alpha: float = 0.5
    scanner_shift: float = 0.0  # strength of per-site scanner differences (0: none, 1: strong)
    min_size: int = MIN_SITE_SIZE


def write(pool: Pool, root: Path, sites: int, opts: PartitionOptions, seed: int) -> dict[str, Any]:
    """Partition `pool` into `sites` folders under `root`; return the partition's summary for the report."""
    if opts.min_size * sites > len(pool.labels):
        raise ConfigError(f"{len(pool.labels)} pooled images cannot give {sites} sites {opts.min_size} images each: "
                          "use fewer --sites or a larger pool (--images-per-site)")
    root = Path(root)
    key = {"format": FORMAT, "pool": pool.digest, "sites": sites, "seed": seed, "scheme": opts.scheme,
           "alpha": opts.alpha if opts.scheme != "iid" else None, "scanner-shift": opts.scanner_shift,
           "min-size": opts.min_size}
    marker = root / SPEC
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            log.info("reusing %d virtual sites in %s", sites, root)
            return saved["summary"]
    parts = partition.partition(pool.labels, sites, opts.scheme, alpha=opts.alpha, seed=seed, min_size=opts.min_size)
    profiles = scanner.profiles(sites, seed, opts.scanner_shift) if opts.scanner_shift > 0 else None
    log.info("writing %d virtual sites (%s) to %s ...", sites, describe(opts), root)
    for pid, rows in enumerate(parts):
        images = pool.images[rows].astype(np.float32)
        if profiles is not None:
            images = scanner.apply(images, profiles[pid], seed)
        _write_site(root / site_name(pid), images, pool.labels[rows])
    num_classes = int(max(pool.labels.max(), pool.test_labels.max() if pool.has_test else 0)) + 1
    counts = partition.label_counts(pool.labels, parts, num_classes)
    summary = {
        "source": pool.source,
        "scheme": describe(opts),
        "sizes": [len(p) for p in parts],
        "label-counts": counts.tolist(),
        "label-skew": round(partition.label_skew(pool.labels, parts, num_classes), 4),
        "scanners": [p.to_json() for p in profiles] if profiles else None,
    }
    marker.write_text(json.dumps({"key": key, "summary": summary}, indent=1))
    return summary


def describe(opts: PartitionOptions) -> str:
    text = {"iid": "IID", "dirichlet": f"Dirichlet label skew alpha={opts.alpha:g}",
            "quantity": f"quantity skew alpha={opts.alpha:g}"}[opts.scheme]
    return text + (f", scanner shift {opts.scanner_shift:g}" if opts.scanner_shift > 0 else "")


def _write_site(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = f"img_{i:05d}.png"
        pixels = np.rint(np.clip(image, 0.0, 1.0) * 65535).astype(np.uint16)
        Image.fromarray(pixels).save(folder / name)  # 16-bit grey: no precision lost to 8 bits
        rows.append((name, int(label)))
    with open(folder / MANIFEST, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "label"))
        writer.writerows(rows)
