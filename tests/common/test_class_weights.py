"""The class-weighted loss: uniform weights train bit for bit as plain cross-entropy, with and without DP;
each image's term depends on its own label only (what DP-SGD's clipping argument needs); the weights
come from the run, checked at the edge."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common import class_weights, privacy, training
from common.config import RunConfig
from common.errors import ConfigError
from common.models import build_model


def _data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g), (torch.rand(n, generator=g) < 0.3).long())


def _train(loss_fn, dp: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("classification", "cnn", image_size=16)
    loader = DataLoader(_data(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if dp:
        plan = privacy.DPPlan(noise_multiplier=1.0, sample_rate=8 / 48, max_grad_norm=1.0, delta=1e-3,
                              planned_steps=12)
        _, module, optimizer, loader = privacy.make_private(model, optimizer, loader, plan)
        torch.manual_seed(2)  # the noise
        training.train(module, loader, optimizer, 2, torch.device("cpu"), loss_fn)
    else:
        training.train(model, loader, optimizer, 2, torch.device("cpu"), loss_fn)
    return copy.deepcopy(model.state_dict())


@pytest.mark.parametrize("dp", [False, True])
def test_uniform_weights_train_exactly_as_plain_cross_entropy(dp):
    plain = _train(F.cross_entropy, dp)
    uniform = _train(training.weighted_cross_entropy([1.0, 1.0]), dp)
    weighted = _train(training.weighted_cross_entropy([1.0, 3.0]), dp)
    assert plain.keys() == uniform.keys()
    assert all(torch.equal(plain[k], uniform[k]) for k in plain)  # bit for bit
    if not dp:
        assert max(float((plain[k] - weighted[k]).abs().max()) for k in plain) > 1e-3  # the weights act
    else:
        # ... but not through DP-SGD's clipping: a weight scales an image's gradient, and clipping scales
        # it back to the clipping norm. Every per-sample gradient here is above it, so the run is the
        # plain one up to rounding (docs/privacy.md: class weights under DP)
        assert all(torch.allclose(plain[k], weighted[k], atol=1e-5) for k in plain)


def test_each_images_term_depends_on_its_own_label_only():
    """The batch loss is the sum of per-image terms over the batch size: an image's gradient is the same
    whatever the other images' labels are (torch's weighted mean would divide by their weights)."""
    loss_fn = training.weighted_cross_entropy([0.5, 4.0])
    logits = torch.randn(4, 2, requires_grad=True)
    first = torch.tensor([1, 0, 0, 0])
    other = torch.tensor([1, 1, 1, 0])  # image 0's label kept, the others changed
    g1, = torch.autograd.grad(loss_fn(logits, first), logits)
    g2, = torch.autograd.grad(loss_fn(logits, other), logits)
    assert torch.equal(g1[0], g2[0])
    per_image = [4.0 * F.cross_entropy(logits[:1], first[:1])] + \
                [0.5 * F.cross_entropy(logits[i:i + 1], first[i:i + 1]) for i in range(1, 4)]
    assert loss_fn(logits, first).item() == pytest.approx(sum(p.item() for p in per_image) / 4, rel=1e-6)


def test_prior_gives_balanced_weights_and_bad_settings_stop_at_the_edge():
    assert class_weights.parse("prior", 0.25, 2) == (1 / 1.5, 2.0)  # 1/(2(1-p)), 1/(2p)
    assert class_weights.parse("none", 0.25, 2) is None
    assert class_weights.parse("1,2.5,4", 0.0, 3) == (1.0, 2.5, 4.0)
    assert RunConfig.from_mapping({"class-weights": "prior", "class-prior": 0.25}).loss_weights == (1 / 1.5, 2.0)
    for bad, match in (({"class-weights": "prior"}, "class-prior"),
                       ({"class-weights": "prior", "class-prior": 0.3, "num-classes": 3}, "num-classes = 2"),
                       ({"class-weights": "1,2,3"}, "expected 2 positive numbers"),
                       ({"class-weights": "1,-2"}, "positive"),
                       ({"class-weights": "balanced"}, "none | prior")):
        with pytest.raises(ConfigError, match=match):
            RunConfig.from_mapping(bad)
    assert training.loss_for("classification", None) is F.cross_entropy
    assert training.loss_for("segmentation", (1.0, 2.0)) is training.LOSSES["segmentation"]


def test_a_site_trains_with_the_runs_class_weights(hospitals, tmp_path):
    """The site picks the loss from the run: uniform weights give the plain run's weights bit for bit."""
    from client.site import Site
    from common.config import SiteConfig
    from common.weights import to_record

    def trained(setting: str) -> dict[str, np.ndarray]:
        run = RunConfig(num_server_rounds=1, local_epochs=1, batch_size=8, image_size=32, dp_enabled=False,
                        class_weights=setting)
        site = Site(run, SiteConfig(str(hospitals / "site-000"), str(tmp_path / setting), "cpu"), index=0)
        torch.manual_seed(0)
        arrays, _ = site.train(to_record(build_model("classification", "cnn", image_size=32)), 1, "run")
        return {k: arrays[k].numpy() for k in arrays}

    plain, uniform, weighted = trained("none"), trained("1,1"), trained("1,4")
    assert all(np.array_equal(plain[k], uniform[k]) for k in plain)
    assert not all(np.array_equal(plain[k], weighted[k]) for k in plain)
