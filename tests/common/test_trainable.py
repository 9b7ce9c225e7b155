"""`trainable = all | head | last-N`: frozen blocks are neither wrapped by Opacus nor changed; ε is Opacus's.

One DP round of a site on colour data (tests/colour_sites.py) with resnet18, `trainable = head`.
"""

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from client.site import Site
from common import drift, privacy
from common.config import RunConfig, SiteConfig
from common.errors import ConfigError
from common.models import build_model
from common.models.trainable import blocks, freeze
from common.weights import to_record
from tests import colour_sites


@pytest.fixture(scope="module")
def head_round(tmp_path_factory):
    """(global weights, reply weights, metrics, run) of one DP round with only the head training."""
    root = tmp_path_factory.mktemp("colour")
    colour_sites.write_site(root / "site-000", images=12)
    run = RunConfig(model="resnet18", trainable="head", num_server_rounds=2, local_epochs=1, batch_size=4,
                    image_size=16, dp_target_delta=1e-3)
    site = Site(run, SiteConfig(str(root / "site-000"), str(root / "state"), "cpu"), 0)
    torch.manual_seed(0)
    sent = to_record(build_model("classification", "resnet18", 3, 2, 16))
    reply, metrics = site.train(sent, 1, "run-1")
    return sent.to_torch_state_dict(), reply.to_torch_state_dict(), metrics, run


def test_frozen_layers_are_bit_identical_after_a_dp_round(head_round):
    before, after, _, _ = head_round
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # the head trained (noised); nothing else moved by one bit


def test_epsilon_with_a_frozen_backbone_equals_opacus_accountant_for_the_same_steps(head_round):
    _, _, metrics, run = head_round
    accountant = RDPAccountant()
    sample_rate = 1 / -(-metrics["num-examples"] // run.batch_size)  # Poisson: one batch per expected batch
    for _ in range(metrics["local-steps"]):
        accountant.step(noise_multiplier=metrics["noise-multiplier"], sample_rate=sample_rate)
    assert metrics["epsilon"] == pytest.approx(accountant.get_epsilon(run.dp_target_delta), rel=1e-9)
    # and the noise is the one planned for the whole model: freezing changes neither the noise multiplier nor the steps
    plan = privacy.plan(run.dp_target_epsilon, run.dp_target_delta, metrics["num-examples"], run.batch_size,
                        run.local_epochs, run.num_server_rounds, run.dp_max_grad_norm)
    assert metrics["noise-multiplier"] == plan.noise_multiplier and metrics["local-steps"] == plan.steps_per_round


def test_opacus_wraps_and_noises_only_the_trainable_layers():
    torch.manual_seed(0)
    model = build_model("classification", "resnet18", 3, 2, 16)
    assert freeze(model, "last-2") == ["layer4", "fc"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer4.", "fc.")) for n in trainable)
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    dp = privacy.DPPlan(noise_multiplier=1.0, sample_rate=1.0, max_grad_norm=1.0, delta=1e-5, planned_steps=1)
    optimizer = drift.make_optimizer("sgd", [p for p in model.parameters() if p.requires_grad], lr=0.1)
    _, module, optimizer, _ = privacy.make_private(model, optimizer, DataLoader(TensorDataset(x, y), batch_size=2),
                                                   dp)
    F.cross_entropy(module(x), y).backward()
    named = dict(model.named_parameters())
    assert {id(p) for p in optimizer.params} == {id(named[n]) for n in trainable}  # what Opacus clips and noises
    for name, p in named.items():  # per-sample gradients (Opacus's hooks) exactly on the trainable layers
        assert (getattr(p, "grad_sample", None) is not None) == (name in trainable), name
    hooked = {m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert len(model.autograd_grad_sample_hooks) == 2 * len(hooked)  # a forward and a backward hook each


def test_blocks_are_the_top_level_layers_in_forward_order():
    resnet = build_model("classification", "resnet18", 3, 2, 16)
    assert [n for n, _ in blocks(resnet)] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    cnn = build_model("classification", "cnn")
    assert [n for n, _ in blocks(cnn)] == ["features.0", "features.1", "features.2", "features.3", "head"]
    assert freeze(build_model("classification", "densenet121", 3, 2, 16), "head") == ["classifier"]
    assert freeze(build_model("segmentation", "unet-resnet18", 3, 2, 16), "last-6") == ["up4", "up3", "up2", "up1",
                                                                                        "up0", "head"]
    assert freeze(cnn, "all") == [n for n, _ in blocks(cnn)] and all(p.requires_grad for p in cnn.parameters())
    with pytest.raises(ConfigError, match=r"this model has 5 blocks \(features\.0, .*head\)"):
        freeze(cnn, "last-6")


@pytest.mark.parametrize("value", ["last-0", "some", "last-", "heads"])
def test_trainable_outside_all_head_last_n_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"'trainable'.*all \| head \| last-N"):
        RunConfig.from_mapping({"trainable": value})


@pytest.mark.parametrize(("key", "value", "accepted"), [("optimizer", "rmsprop", r"sgd \| adam \| adamw"),
                                                      ("channels", 2, r"0 \(the model's\) \| 1 \| 3")])
def test_optimizer_and_channels_outside_their_values_are_config_errors(key, value, accepted):
    with pytest.raises(ConfigError, match=f"'{key}'.*{accepted}"):
        RunConfig.from_mapping({key: value})


def test_scaffold_with_adam_is_refused_clearly():
    with pytest.raises(ConfigError, match=r"strategy 'scaffold' with optimizer 'adam'.*use optimizer = sgd"):
        RunConfig.from_mapping({"strategy": "scaffold", "optimizer": "adam"})
    assert RunConfig.from_mapping({"strategy": "fedprox", "optimizer": "adamw"}).optimizer == "adamw"


@pytest.mark.parametrize(("kind", "plain"), [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                              ("adamw", torch.optim.AdamW)])
def test_each_optimizer_under_dp_without_noise_or_clipping_is_the_plain_one(kind, plain):
    """Opacus's DPOptimizer wraps the run's optimizer: with zero noise and no clipping, one step equals torch's own."""
    torch.manual_seed(0)
    model = build_model("classification", "cnn")
    reference = build_model("classification", "cnn")
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    site_run = RunConfig(optimizer=kind, learning_rate=0.01, momentum=0.0)
    site = Site(site_run, SiteConfig("unused", "unused", "cpu"), 0)
    optimizer = site._optimizer(model)
    assert isinstance(optimizer, plain)
    dp = privacy.DPPlan(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=1e6, delta=1e-5, planned_steps=1)
    _, module, optimizer, _ = privacy.make_private(model, optimizer, DataLoader(TensorDataset(x, y), batch_size=4),
                                                   dp)
    assert optimizer.original_optimizer.__class__.__mro__[2] is plain  # the drift mixin, then torch's own
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    opt = plain(reference.parameters(), lr=0.01)
    F.cross_entropy(reference(x), y).backward()
    opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
