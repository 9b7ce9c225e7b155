"""Each registry model's Opacus grad-sample mode: used by make_private, and exact (same clipped gradients as hooks)."""

import copy

import pytest
import torch
from opacus.grad_sample.utils import get_gsm_class
from torch.utils.data import DataLoader, TensorDataset

from common import privacy, training
from common.models import DEFAULT_GRAD_SAMPLE_MODE, REGISTRY, build_model, grad_sample_mode

# ghost clipping would need the loss wrapped by Opacus as well, which common/training.py does not do
WITHOUT_LOSS_WRAPPER = ("hooks", "ew", "functorch")


def _batch(task, n=4, size=32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g)
    y = (torch.rand(n, size, size, generator=g) > 0.9).long() if task == "segmentation" else torch.tensor([0, 1] * 2)
    return x, y


def _applied_gradient(model, task, x, y, mode):
    dp = privacy.DPPlan(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=1e-3, delta=1e-5, planned_steps=1)
    model.grad_sample_mode = mode  # on the instance: the class's setting stays
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    _, module, optimizer, _ = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, dp)
    assert type(module) is get_gsm_class(mode)
    optimizer.zero_grad()
    training.LOSSES[task](module(x), y).backward()
    optimizer.step()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_models_mode_gives_the_clipped_gradients_of_hooks(name):
    task = REGISTRY[name].task
    torch.manual_seed(0)
    model = build_model(task, name, 1, 2, 32)
    mode = grad_sample_mode(model)
    assert mode in WITHOUT_LOSS_WRAPPER
    if mode == "hooks":
        return  # the reference itself: nothing to compare (and the torchvision backbones are costly on CPU)
    x, y = _batch(task)
    reference = _applied_gradient(copy.deepcopy(model), task, x, y, "hooks")
    ours = _applied_gradient(copy.deepcopy(model), task, x, y, mode)
    assert torch.allclose(ours, reference, rtol=1e-3, atol=1e-9)


def test_a_model_without_a_setting_gets_opacus_default():
    model = torch.nn.Linear(4, 2)
    assert grad_sample_mode(model) == DEFAULT_GRAD_SAMPLE_MODE == "hooks"
    loader = DataLoader(TensorDataset(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)), batch_size=2)
    dp = privacy.DPPlan(noise_multiplier=1.0, sample_rate=1.0, max_grad_norm=1.0, delta=1e-5, planned_steps=1)
    _, module, _, _ = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, dp)
    assert type(module) is get_gsm_class("hooks")
