"""Heatmaps point at the lesion: the synthetic generator writes where it is (masks.csv), so we can check."""

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from common import explain
from common.data import sources
from common.data.decode import decode_example

pytestmark = pytest.mark.slow


def _positive_validation_images(trained) -> tuple[torch.Tensor, np.ndarray]:
    """(images, lesion masks) of every positive image in the sites' validation splits, at the model's size."""
    images, masks = [], []
    size = trained.run.image_size
    for site, names in trained.val_names.items():
        root = trained.root / site
        labels = {str(e.path.relative_to(root)): e.label for e in sources.dicom_folder(root)}
        for example in sources.dicom_folder(root, "segmentation"):
            name = str(example.path.relative_to(root))
            if name in names and labels[name] == 1:
                image, mask = decode_example(example, size)
                images.append(image.astype(np.float16).astype(np.float32))
                masks.append(mask)
    return torch.from_numpy(np.stack(images)).unsqueeze(1), np.stack(masks)


def test_heatmap_peak_falls_on_the_lesion_in_most_positive_images(trained_classifier):
    """Strictly inside the lesion, and by the pointing game (Zhang et al. 2016: 15 px tolerance at 224 px).

    The 8x8 map of a 32-pixel model often peaks on the lesion's rim, a pixel or two outside
    the mask (where the lesion meets the lung's edge): the tolerance is the standard way to
    score a heatmap coarser than the image. Chance for each is the area it accepts.
    """
    images, masks = _positive_validation_images(trained_classifier)
    heat = explain.heatmaps(trained_classifier.model, images, [1] * len(images))
    assert heat.shape == masks.shape and heat.min() >= 0 and heat.max() <= 1
    distance = np.stack([distance_transform_edt(mask == 0) for mask in masks])  # pixels to the lesion
    at_peak = np.array([d[explain.peak(h)] for h, d in zip(heat, distance, strict=True)])
    tolerance = 15 * trained_classifier.run.image_size / 224
    inside, pointing = (at_peak == 0).mean(), (at_peak <= tolerance).mean()
    chance_inside, chance_pointing = (distance == 0).mean(), (distance <= tolerance).mean()
    print(f"\nheatmap peak on {len(heat)} positive held-out images: inside the lesion {inside:.2f} "
          f"(chance {chance_inside:.3f}); within {tolerance:.1f} px {pointing:.2f} (chance {chance_pointing:.3f})")
    assert inside >= 5 * chance_inside
    assert pointing >= 0.5 and pointing >= 5 * chance_pointing


def test_cam_layer_is_the_deepest_map_at_least_min_side():
    from common.models import build_model

    model = build_model("classification", "cnn")
    assert explain.cam_layer(model, 32) is model.features[2]  # 32 -> 32, 16, 8, 4: the 8x8 block
    assert explain.cam_layer(model, 64) is model.features[3]  # 64 -> ..., 8: the last block


def test_overlays_are_rgb_at_the_overlay_size():
    image = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[4, 5] = 1.0
    cam = explain.cam_overlay(image, heat)
    assert cam.shape == (explain.OVERLAY_SIDE, explain.OVERLAY_SIDE, 3) and cam.dtype == np.uint8
    pred, truth = np.zeros((32, 32), np.int64), np.zeros((32, 32), np.int64)
    pred[0:4, 0:4], truth[2:6, 2:6] = 1, 1
    over = explain.mask_overlay(image, pred, truth, side=32)
    r, g, b = over[..., 0].astype(int), over[..., 1].astype(int), over[..., 2].astype(int)
    assert r[0, 0] > g[0, 0]  # predicted only: red
    assert g[5, 5] > r[5, 5]  # true only: green
    assert r[3, 3] > b[3, 3] and g[3, 3] > b[3, 3]  # both: yellow
    assert r[20, 20] == g[20, 20] == b[20, 20]  # neither: grey
