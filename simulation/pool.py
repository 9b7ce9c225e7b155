"""One pool of labelled images to split into virtual hospitals, and its held-out test set.

Three sources, all decoded once at the model's input size through the sites' own decode
path (so pooled, federated and local training see identical pixels):
- a MedMNIST-style `.npz`: train + val are the pool, its official test split the test set;
- a folder any site could read (manifest, class folders, an .npz): the pool, no test set;
- synthetic: images from one synthetic scanner, plus a fresh synthetic test set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from common.data import cache, npz, sources, synthetic
from common.data.decode import decode_example
from common.data.dicom import resize
from common.errors import DataError

log = logging.getLogger(__name__)
SYNTH_TEST_FRACTION = 0.2
SYNTH_TEST_MAX = 2000


@dataclass(frozen=True)
class Pool:
    images: np.ndarray  # (N, S, S) float16 in [0, 1], at the model's input size
    labels: np.ndarray  # (N,) class indices
    test_images: np.ndarray | None  # the source's own test split, never trained on
    test_labels: np.ndarray | None
    source: str  # what it is, for the report
    digest: str  # what the pool holds: reusing written sites is safe only for the same digest

    @property
    def has_test(self) -> bool:
        return self.test_images is not None and len(self.test_images) > 0


def load(data: Path | None, image_size: int, cache_dir: Path, *, synthetic_images: int = 0, seed: int = 0) -> Pool:
    if data is None:
        return synthetic_pool(synthetic_images, image_size, seed, cache_dir)
    data = Path(data)
    if data.is_file() and data.suffix == ".npz":
        return _archive(data, image_size, cache_dir)
    if not data.exists():
        raise DataError(f"--data {data} does not exist: pass a .npz archive or a folder of images with labels.csv")
    examples = sources.load(data, "classification")
    images, labels = _decode(examples, data, image_size, cache_dir)
    return Pool(images, labels, None, None, f"folder {data} ({len(labels)} images)", _digest(images, labels))


def _archive(path: Path, image_size: int, cache_dir: Path) -> Pool:
    examples = npz.examples(path.parent, [path], "classification", splits=("train", "val"))
    images, labels = _decode(examples, path.parent, image_size, cache_dir)
    try:
        test = npz.examples(path.parent, [path], "classification", splits=("test",))
        test_images, test_labels = _decode(test, path.parent, image_size, cache_dir)
    except DataError:
        log.info("%s has no test split: held-out metrics come from the sites' validation splits only", path.name)
        test_images = test_labels = None
    source = f"{path.name}: train+val {len(labels)} images" + (
        f", official test split {len(test_labels)}" if test_labels is not None else "")
    return Pool(images, labels, test_images, test_labels, source, _digest(images, labels))


def _decode(examples, root: Path, image_size: int, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    decoded = cache.load_or_decode(examples, root, cache_dir, {"decoder": "v2", "task": "classification",
                                                               "image_size": image_size},
                                   partial(decode_example, size=image_size))
    return decoded.images, decoded.targets.astype(np.int64)


def synthetic_pool(count: int, image_size: int, seed: int, cache_dir: Path) -> Pool:
    """`count` images from one synthetic scanner (sites differ only by partition and scanner shift)."""
    test_count = min(SYNTH_TEST_MAX, max(50, int(count * SYNTH_TEST_FRACTION)))
    key = hashlib.sha256(json.dumps([synthetic.FORMAT, count, test_count, image_size, seed]).encode()).hexdigest()
    path = Path(cache_dir) / f"synthetic-pool-{key[:16]}.npz"
    if path.is_file():
        with np.load(path) as z:
            arrays = [z[k] for k in ("images", "labels", "test_images", "test_labels")]
    else:
        log.info("rendering a synthetic pool of %d images (+%d test) ...", count, test_count)
        profile = synthetic.site_profiles(1, max(count, 10), seed)[0]
        images, labels = _render(profile, seed, range(count), image_size)
        test_images, test_labels = _render(profile, seed + 1, range(test_count), image_size)
        arrays = [images, labels, test_images, test_labels]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=images, labels=labels, test_images=test_images, test_labels=test_labels)
    images, labels, test_images, test_labels = arrays
    return Pool(images, labels, test_images, test_labels,
                f"synthetic: {count} images, test set {test_count}", _digest(images, labels))


def _render(profile: synthetic.SiteProfile, seed: int, indices: range, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for idx in indices:
        attenuation, label, _ = synthetic.image(profile, seed, idx)
        images.append(resize(synthetic.display(attenuation).astype(np.float32), size).astype(np.float16))
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:32]
