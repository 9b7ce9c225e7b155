import pytest
import torch
from opacus.validators import ModuleValidator

from common.errors import ConfigError
from common.models import REGISTRY, build_model


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registry_model_passes_opacus_validation(name):
    spec = REGISTRY[name]
    model = build_model(spec.task, name, in_channels=1, num_classes=3, image_size=64)
    ModuleValidator.validate(model, strict=True)  # raises on BatchNorm & co.
    out = model(torch.zeros(2, 1, 64, 64))
    assert out.shape == ((2, 3) if spec.task == "classification" else (2, 3, 64, 64))


def test_unknown_or_mismatched_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown model 'vgg'.*cnn"):
        build_model("classification", "vgg")
    with pytest.raises(ConfigError, match="is for classification, not segmentation"):
        build_model("segmentation", "cnn")
