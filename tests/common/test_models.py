import pytest
import torch
from opacus.validators import ModuleValidator

from common.errors import ConfigError
from common.models import REGISTRY, build_model


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registry_model_passes_opacus_validation(name):
    spec = REGISTRY[name]
    model = build_model(spec.task, name, in_channels=spec.channels, num_classes=3, image_size=64)
    ModuleValidator.validate(model, strict=True)  # raises on BatchNorm & co.
    out = model(torch.zeros(2, spec.channels, 64, 64))
    assert out.shape == ((2, 3) if spec.task == "classification" else (2, 3, 64, 64))


@pytest.mark.parametrize("name", ["resnet18", "unet-resnet18"])
def test_a_backbone_takes_grey_as_colour_repeated_and_small_images(name):
    """One set of weights for grey and colour runs: grey input equals its colour repetition; a 28 px
    image (upsampled inside) gives the task's output at its own size."""
    spec = REGISTRY[name]
    torch.manual_seed(0)
    model = build_model(spec.task, name, 1, 2, 28).eval()
    assert model.state_dict().keys() == build_model(spec.task, name, 3, 2, 28).state_dict().keys()
    grey = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(grey), model(grey.repeat(1, 3, 1, 1)))
        assert model(grey).shape == ((2, 2) if spec.task == "classification" else (2, 2, 28, 28))
    with pytest.raises(ConfigError, match=r"takes 1 .* or 3 input channels, not 2"):
        build_model(spec.task, name, 2, 2, 28)


def test_unknown_or_mismatched_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown model 'vgg'.*cnn"):
        build_model("classification", "vgg")
    with pytest.raises(ConfigError, match="is for classification, not segmentation"):
        build_model("segmentation", "cnn")


@pytest.mark.parametrize("name", ["resnet18", "unet-resnet18"])
def test_a_backbone_under_dp_without_noise_or_clipping_steps_as_plain_sgd(name):
    """Opacus's per-sample gradients through the backbones (out-of-place residuals, GroupNorm) are exact:
    with zero noise and no clipping, one DP step equals one plain SGD step (Opacus's own key test)."""
    import copy

    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from common import privacy

    task = REGISTRY[name].task
    torch.manual_seed(0)
    model = build_model(task, name, 3, 2, 16)
    plain = copy.deepcopy(model)
    x = torch.rand(2, 3, 16, 16)
    y = torch.randint(0, 2, (2, 16, 16)) if task == "segmentation" else torch.tensor([0, 1])
    dp = privacy.DPPlan(noise_multiplier=0.0, sample_rate=1.0, max_grad_norm=1e6, delta=1e-5, planned_steps=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    _, module, optimizer, _ = privacy.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, dp)
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    reference = torch.optim.SGD(plain.parameters(), lr=0.1)
    F.cross_entropy(plain(x), y).backward()
    reference.step()
    for (key, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), key
