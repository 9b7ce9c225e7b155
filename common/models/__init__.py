"""The model registry: every model a run can name, built the same way on server and sites."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from common.errors import ConfigError
from common.models import backbones
from common.models.cnn import SmallCNN
from common.models.scatter import ScatterCNN, ScatterLinear
from common.models.unet import UNet
from common.models.unet_resnet import ENCODERS, UNetResNet


@dataclass(frozen=True)
class ModelSpec:
    task: str
    build: Callable[[int, int, int], nn.Module]  # (in_channels, num_classes, image_size)
    # The input channels the model is made for, when the run leaves `channels` at 0: 3 for backbones
    # pretrained on colour (grey data are repeated), else 1 (colour data are turned grey).
    channels: int = 1
    # The torchvision architecture whose weights enums (`pretrained = ResNet18_Weights.IMAGENET1K_V1`) fit.
    torchvision: str = ""


def _backbone(name: str) -> ModelSpec:
    return ModelSpec("classification", lambda c, k, _size: backbones.build(name, c, k), backbones.COLOUR, name)


def _unet_resnet(name: str) -> ModelSpec:
    return ModelSpec("segmentation", lambda c, k, _size: _checked_unet(name, c, k), backbones.COLOUR, ENCODERS[name])


def _checked_unet(name: str, in_channels: int, num_classes: int) -> nn.Module:
    if in_channels not in (1, backbones.COLOUR):
        raise ConfigError(f"model '{name}' takes 1 (grey, repeated) or 3 input channels, not {in_channels}")
    return UNetResNet(ENCODERS[name], num_classes)


REGISTRY: dict[str, ModelSpec] = {
    "cnn": ModelSpec("classification", lambda c, k, _size: SmallCNN(c, k)),
    "unet": ModelSpec("segmentation", lambda c, k, _size: UNet(c, k)),
    "scatter-linear": ModelSpec("classification", lambda c, k, size: ScatterLinear(c, k, size)),
    "scatter-cnn": ModelSpec("classification", lambda c, k, size: ScatterCNN(c, k, size)),
    **{name: _backbone(name) for name in backbones.BACKBONES},
    **{name: _unet_resnet(name) for name in ENCODERS},
}


# Opacus grad-sample mode when a model names none (`grad_sample_mode` class attribute): Opacus's own default.
DEFAULT_GRAD_SAMPLE_MODE = "hooks"


def grad_sample_mode(model: nn.Module) -> str:
    """How Opacus computes this model's per-sample gradients: the fastest mode that gives the same
    clipped gradients as `hooks`, measured per model by `make bench` (bench/dp_overhead.py)."""
    return getattr(model, "grad_sample_mode", DEFAULT_GRAD_SAMPLE_MODE)


def spec(task: str, name: str) -> ModelSpec:
    """The registry's entry; a name that does not exist or does not fit the task is a ConfigError."""
    found = REGISTRY.get(name)
    if found is None:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(sorted(REGISTRY))}")
    if found.task != task:
        names = ", ".join(n for n, s in REGISTRY.items() if s.task == task) or "none yet"
        raise ConfigError(f"model '{name}' is for {found.task}, not {task}: choose one of {names}")
    return found


def input_channels(task: str, name: str, channels: int = 0) -> int:
    """The channels a run's images are decoded to and its model built for: the run's `channels`, else
    the model's own (ModelSpec.channels). Server, sites and model files all ask here."""
    return channels or spec(task, name).channels


def build_model(
    task: str, name: str, in_channels: int = 1, num_classes: int = 2, image_size: int = 64
) -> nn.Module:
    """Build a registry model; a name that does not exist or does not fit the task is a ConfigError."""
    return spec(task, name).build(in_channels, num_classes, image_size)
