"""Partitioners: every example exactly once, deterministic per seed, skew that follows alpha."""

import numpy as np
import pytest

from common.data import partition
from common.errors import ConfigError

LABELS = np.random.default_rng(7).integers(0, 4, 2000)


@pytest.mark.parametrize("scheme", partition.SCHEMES)
def test_every_example_lands_in_exactly_one_site(scheme):
    parts = partition.partition(LABELS, 7, scheme, alpha=0.5, seed=3, min_size=2)
    assert len(parts) == 7 and all(len(p) >= 2 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS) and np.array_equal(np.sort(joined), np.arange(len(LABELS)))


@pytest.mark.parametrize("scheme", partition.SCHEMES)
def test_same_seed_same_split_other_seed_other_split(scheme):
    a = partition.partition(LABELS, 5, scheme, alpha=0.5, seed=11)
    b = partition.partition(LABELS, 5, scheme, alpha=0.5, seed=11)
    c = partition.partition(LABELS, 5, scheme, alpha=0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_small_alpha_skews_labels_large_alpha_is_near_uniform():
    skewed = partition.partition(LABELS, 10, "dirichlet", alpha=0.1, seed=0)
    uniform = partition.partition(LABELS, 10, "dirichlet", alpha=1000.0, seed=0)
    iid = partition.partition(LABELS, 10, "iid", seed=0)
    assert partition.label_skew(LABELS, skewed, 4) > 0.4
    assert partition.label_skew(LABELS, uniform, 4) < 0.08
    assert partition.label_skew(LABELS, iid, 4) < 0.08
    # with small alpha most sites are dominated by one class
    counts = partition.label_counts(LABELS, skewed, 4)
    dominant = counts.max(axis=1) / counts.sum(axis=1)
    assert np.median(dominant) > 0.6


def test_quantity_skew_varies_sizes_not_labels():
    parts = partition.partition(LABELS, 10, "quantity", alpha=0.3, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 4 * sizes.min()
    assert partition.label_skew(LABELS, [p for p in parts if len(p) >= 100], 4) < 0.1
    assert sum(partition.quantity_sizes(2000, 10, 0.3, 0, min_size=5)) == 2000


def test_pool_order_does_not_leak_into_iid_sites():
    sorted_labels = np.sort(LABELS)  # a pool sorted by class (or by hospital) still splits IID
    parts = partition.partition(sorted_labels, 4, "iid", seed=0)
    assert partition.label_skew(sorted_labels, parts, 4) < 0.08


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"scheme": "zipf"}, "is not one of"),
    ({"alpha": 0.0, "scheme": "dirichlet"}, "--alpha"),
    ({"num_sites": 3000}, "use fewer sites"),
])
def test_bad_settings_are_config_errors(kwargs, fragment):
    args = {"num_sites": 4, "scheme": "iid", **kwargs}
    with pytest.raises(ConfigError, match=fragment):
        partition.partition(LABELS, args.pop("num_sites"), args.pop("scheme"), **args)


def test_impossible_min_size_says_what_to_change():
    two_classes = np.repeat([0, 1], 300)
    with pytest.raises(ConfigError, match="raise --alpha"):
        partition.partition(two_classes, 100, "dirichlet", alpha=0.05, seed=0, min_size=3)
