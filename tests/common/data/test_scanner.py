"""Scanner shift: deterministic per seed, identity at strength 0, sites that really differ."""

import numpy as np

from common.data import scanner

IMAGES = np.random.default_rng(0).uniform(0.2, 0.8, (6, 32, 32)).astype(np.float32)


def test_strength_zero_is_the_identity():
    for profile in scanner.profiles(4, seed=1, strength=0.0):
        assert np.allclose(scanner.apply(IMAGES, profile, seed=1), IMAGES, atol=1e-6)


def test_same_seed_same_pixels_and_sites_differ():
    a = [scanner.apply(IMAGES, p, 3) for p in scanner.profiles(5, seed=3)]
    b = [scanner.apply(IMAGES, p, 3) for p in scanner.profiles(5, seed=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    means = [x.mean() for x in a]
    sharpness = [np.abs(np.diff(x, axis=-1)).mean() for x in a]
    assert max(means) - min(means) > 0.02 and max(sharpness) / min(sharpness) > 1.2
    assert all(x.min() >= 0 and x.max() <= 1 and x.dtype == np.float32 and x.shape == IMAGES.shape for x in a)


def test_lower_resolution_and_blur_remove_detail():
    sharp = scanner.ScannerProfile(0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0)
    soft = scanner.ScannerProfile(0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5)
    detail = lambda x: np.abs(np.diff(x, axis=-1)).mean()  # noqa: E731
    assert detail(scanner.apply(IMAGES, soft, 0)) < 0.5 * detail(scanner.apply(IMAGES, sharp, 0))
