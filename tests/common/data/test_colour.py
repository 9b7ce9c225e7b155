"""Colour input: RGB PNG, RGB DICOM and colour .npz stay colour for a 3-channel model (`channels`)."""

import numpy as np
import pytest
import torch
from PIL import Image

from client import site as site_module
from client.site import Site
from common.config import RunConfig, SiteConfig
from common.data import npz, sources
from common.data.decode import decode_example
from common.data.example import Example
from tests import colour_sites


@pytest.fixture
def site_folder(tmp_path):
    return colour_sites.write_site(tmp_path / "site-000", images=6, size=24)


def test_rgb_png_and_dicom_decode_to_their_colours_and_grey_to_equal_luma(site_folder):
    examples = sources.load(site_folder)
    red, blue = colour_sites._colours()
    kinds = set()
    for e in examples:
        rgb, label = decode_example(e, 24, channels=3)
        assert rgb.shape == (3, 24, 24) and rgb.dtype == np.float32
        expected = colour_sites.image(label, int(e.path.stem.split("-")[1]), 24)
        assert np.abs(rgb - np.moveaxis(expected, -1, 0) / 255.0).max() < 1e-6  # no resize at 24 px: exact
        grey, _ = decode_example(e, 24)  # channels 1 (the default): one plane, the luma
        assert grey.shape == (24, 24)
        kinds.add(e.path.suffix)
    assert kinds == {".png", ".dcm"}
    red_y, blue_y = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] for c in (red, blue))
    assert abs(red_y - blue_y) < 1.0  # grey cannot tell the classes apart; colour can


def test_grey_images_are_repeated_for_a_colour_model(tmp_path):
    grey = (np.arange(16 * 16, dtype=np.uint8).reshape(16, 16))
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    rgb, _ = decode_example(Example(tmp_path / "g.png", label=0), 16, channels=3)
    assert rgb.shape == (3, 16, 16)
    assert np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[1], rgb[2])
    assert np.array_equal(rgb[0], decode_example(Example(tmp_path / "g.png", label=0), 16)[0])


def test_colour_npz_rows_keep_their_colour():
    row = np.zeros((8, 8, 3), dtype=np.uint8)
    row[..., 0] = 255
    assert np.array_equal(npz.to_rgb(row)[0], np.ones((8, 8), np.float32)) and npz.to_rgb(row)[1:].max() == 0
    assert npz.to_rgb(np.full((8, 8), 128, np.uint8)).shape == (3, 8, 8)


def test_a_site_decodes_for_its_models_channels_and_keys_its_cache_by_them(site_folder, tmp_path):
    def site(**settings):
        run = RunConfig(image_size=16, **settings)
        return Site(run, SiteConfig(str(site_folder), str(tmp_path / "state"), "cpu"), 0)

    colour, _ = site(model="resnet18").data()  # channels 0: the backbone's own, 3
    grey, _ = site(model="resnet18", channels=1).data()
    cnn_colour, _ = site(model="cnn", channels=3).data()
    assert colour.tensors[0].shape[1:] == (3, 16, 16) and grey.tensors[0].shape[1:] == (1, 16, 16)
    assert torch.equal(cnn_colour.tensors[0], colour.tensors[0])
    cached = sorted(p.name for p in (tmp_path / "state" / "cache").glob("decoded-*.npz"))
    assert len(cached) == 2  # one decoded set per channel count (the cache key holds it)
    assert site(model="cnn", channels=3).model(_record("cnn", 3)).features[0][0].in_channels == 3


def _record(name, channels):
    from common.models import build_model
    from common.weights import to_record

    return to_record(build_model("classification", name, channels, 2, 16))


def test_a_colour_site_whose_model_takes_grey_says_so(site_folder, tmp_path, caplog):
    grey_site = tmp_path / "grey"
    grey_site.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(grey_site / "a.png")
    Image.fromarray(np.full((16, 16), 200, np.uint8), "L").save(grey_site / "b.png")
    (grey_site / "labels.csv").write_text("file,label\na.png,0\nb.png,1\n")
    for folder, settings, warned in ((site_folder, {}, True), (site_folder, {"channels": 1}, False),
                                     (site_folder, {"model": "resnet18"}, False), (grey_site, {}, False)):
        caplog.clear()
        site_module._MEMO.clear()  # as a fresh process: the note comes with a decode
        run = RunConfig(image_size=16, **settings)
        Site(run, SiteConfig(str(folder), str(tmp_path / "state"), "cpu"), 0).data()
        assert ("images are colour but model" in caplog.text) == warned, (folder, settings)
