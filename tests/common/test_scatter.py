"""The scattering models: kymatio's transform exactly, no filters on the wire, a memo that changes nothing."""

import copy

import pytest
import torch
from kymatio.torch import Scattering2D
from torch.utils.data import DataLoader, TensorDataset

from common import privacy, training
from common.errors import ConfigError
from common.models import build_model, scatter
from common.weights import to_record


def _images(n=6, channels=1, size=28, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels", [1, 3])
def test_features_are_kymatios_scattering_2d_then_groupnorm(channels):
    model = build_model("classification", "scatter-linear", channels, 2, 28)
    x = _images(channels=channels)
    stock = Scattering2D(J=2, shape=(28, 28), L=8)(x).flatten(1, 2)
    assert stock.shape == (6, 81 * channels, 7, 7)
    expected = torch.nn.functional.group_norm(stock, 27, model.front.norm.weight, model.front.norm.bias)
    assert torch.allclose(model.front(x), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["scatter-linear", "scatter-cnn"])
def test_only_trainable_weights_travel(name):
    """The filter bank is rebuilt identically everywhere: not in the state_dict, nor in what a site sends."""
    model = build_model("classification", name, 1, 2, 28)
    assert len(list(model.front.scattering.buffers())) > 0  # the filters are there, on the module's device
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    assert set(to_record(model).keys()) == set(model.state_dict())


def test_the_groupnorm_is_per_sample():
    """No statistic pooled over the batch (or a site's data): an image's features ignore its batch-mates."""
    model = build_model("classification", "scatter-cnn", 1, 2, 28).train()  # GroupNorm: no mode matters
    x = _images()
    alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(model(x), alone, atol=1e-5)


def test_the_memo_returns_the_transform_and_keeps_images_apart():
    cache = scatter.FeatureCache()
    front = build_model("classification", "scatter-linear", 1, 2, 28).front
    x = _images(4)
    first = cache.features(x, front.transform)
    assert (cache.hits, cache.misses) == (0, 4)
    y = torch.cat([x[:2], _images(2, seed=1)])  # two seen, two new
    second = cache.features(y, front.transform)
    assert (cache.hits, cache.misses) == (2, 6)
    assert torch.equal(second, front.transform(y))
    assert torch.equal(second[:2], first[:2])
    nearly = x[:1].clone()
    nearly[0, 0, 0, 0] += 1e-3  # one pixel differs: another image, another entry
    assert torch.equal(cache.features(nearly, front.transform), front.transform(nearly))


def test_the_memo_is_bounded_in_bytes():
    front = build_model("classification", "scatter-linear", 1, 2, 28).front
    per_image = 81 * 7 * 7 * 4
    cache = scatter.FeatureCache(max_bytes=3 * per_image)
    cache.features(_images(5), front.transform)
    assert len(cache.entries) == 3 and cache.bytes == 3 * per_image


@pytest.mark.parametrize("name", ["scatter-linear", "scatter-cnn"])
def test_dp_with_no_noise_and_no_clipping_is_plain_sgd(name):
    """Opacus's key equivalence: the fixed front end leaves DP-SGD's gradients those of the head."""
    torch.manual_seed(0)
    model = build_model("classification", name, 1, 2, 28)
    x, y = _images(8), torch.tensor([0, 1] * 4)
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    training.train(plain, DataLoader(TensorDataset(x, y), batch_size=8), opt, 1, torch.device("cpu"))
    dp = privacy.DPPlan(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=1e6, delta=1e-5, planned_steps=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    _, module, opt, _ = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), loader, dp)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    opt.step()
    for (n, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n


def test_an_image_size_the_transform_cannot_take_is_a_config_error():
    with pytest.raises(ConfigError, match="image-size = 30"):
        build_model("classification", "scatter-linear", 1, 2, 30)
