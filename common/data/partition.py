"""Split one pool of labelled examples into virtual hospitals: labels + seed -> index arrays.

Pure and small: every example lands in exactly one site, the same seed gives the same
split, and nothing is read or decoded here (a caller partitions labels, then writes each
site's share once). The index work is flwr-datasets' own partitioners, so a split here is
the one Flower's papers and baselines use:
- `iid`: `IidPartitioner` over a seeded shuffle (it shards contiguously; the shuffle makes it IID);
- `dirichlet`: `DirichletPartitioner` (label skew: each class spread over sites by Dirichlet(alpha));
- `quantity`: `SizePartitioner` with sizes drawn from Dirichlet(alpha) over sites (quantity skew,
  labels IID), as in Li et al., "Federated Learning on Non-IID Data Silos" (ICDE 2022).
Small alpha: strong skew; large alpha: close to IID. The pool is shuffled first, so a pool that
is sorted by hospital or scanner does not leak that order into the label split.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from common.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "quantity")
ATTEMPTS = 20  # x 10 redraws inside DirichletPartitioner


def partition(
    labels: Sequence[int] | np.ndarray,
    num_sites: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Indices into `labels` for each of `num_sites` sites (sorted); together they cover every index once."""
    labels = np.asarray(labels)
    n = len(labels)
    _check(n, num_sites, scheme, alpha, min_size)
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    # Imported here: `datasets` pulls in pyarrow and pandas (seconds); sites never need it.
    from datasets import Dataset

    pool = Dataset.from_dict({"label": labels[order].tolist(), "row": order.tolist()})
    for attempt in range(ATTEMPTS):
        # DirichletPartitioner redraws 10 times for min_size, then gives up; small alpha with few
        # classes (BreastMNIST: 2) often needs more, so go on from seeds derived from `seed`.
        partitioner = _partitioner(scheme, num_sites, alpha, seed + 1_000_003 * attempt, min_size, n)
        partitioner.dataset = pool
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DirichletPartitioner warns on each redraw
            try:
                return [np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64))
                        for i in range(num_sites)]
            except ValueError:
                continue
    raise ConfigError(
        f"partition = {scheme} with alpha = {alpha:g} left some of the {num_sites} sites with fewer than {min_size} "
        f"examples in {ATTEMPTS * 10} draws: raise --alpha or use fewer sites"
    )


def _check(n: int, num_sites: int, scheme: str, alpha: float, min_size: int) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"partition = {scheme!r} is not one of {' | '.join(SCHEMES)}")
    if num_sites < 1:
        raise ConfigError(f"--sites = {num_sites}: a federation needs at least 1 site")
    if not alpha > 0:
        raise ConfigError(f"--alpha = {alpha:g}: the Dirichlet concentration must be > 0")
    if min_size < 1:
        raise ConfigError(f"min_size = {min_size}: every site needs at least 1 example")
    if n < num_sites * min_size:
        raise ConfigError(f"{n} examples cannot give {num_sites} sites {min_size} each: use fewer sites")


def _partitioner(scheme: str, num_sites: int, alpha: float, seed: int, min_size: int, n: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, SizePartitioner

    if scheme == "iid":
        return IidPartitioner(num_sites)
    if scheme == "dirichlet":
        return DirichletPartitioner(num_sites, "label", float(alpha), min_partition_size=min_size,
                                    self_balancing=False, shuffle=True, seed=seed)
    return SizePartitioner(quantity_sizes(n, num_sites, alpha, seed, min_size))


def quantity_sizes(n: int, num_sites: int, alpha: float, seed: int, min_size: int = 1) -> list[int]:
    """Site sizes summing to n, each >= min_size, proportional to a Dirichlet(alpha) draw beyond that."""
    share = np.random.default_rng([seed, 0x517E]).dirichlet(np.full(num_sites, float(alpha)))
    spare = n - num_sites * min_size
    raw = share * spare
    sizes = np.floor(raw).astype(np.int64)
    rest = spare - int(sizes.sum())
    sizes[np.argsort(raw - sizes, kind="stable")[::-1][:rest]] += 1  # largest remainders first
    return [int(s) + min_size for s in sizes]


def label_counts(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(sites, classes) counts: what each site holds of each class."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]) if parts else \
        np.zeros((0, num_classes), dtype=np.int64)


def label_skew(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each site's label mix and the pool's (0: IID, 1: disjoint)."""
    counts = label_counts(labels, parts, num_classes).astype(float)
    pool = counts.sum(axis=0) / counts.sum()
    mixes = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return float(0.5 * np.abs(mixes - pool).sum(axis=1).mean())
