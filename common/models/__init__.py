"""The model registry: every model a run can name, built the same way on server and sites."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from common.errors import ConfigError
from common.models.cnn import SmallCNN
from common.models.unet import UNet


@dataclass(frozen=True)
class ModelSpec:
    task: str
    build: Callable[[int, int, int], nn.Module]  # (in_channels, num_classes, image_size)


REGISTRY: dict[str, ModelSpec] = {
    "cnn": ModelSpec("classification", lambda c, k, _size: SmallCNN(c, k)),
    "unet": ModelSpec("segmentation", lambda c, k, _size: UNet(c, k)),
}


# Opacus grad-sample mode when a model names none (`grad_sample_mode` class attribute): Opacus's own default.
DEFAULT_GRAD_SAMPLE_MODE = "hooks"


def grad_sample_mode(model: nn.Module) -> str:
    """How Opacus computes this model's per-sample gradients: the fastest mode that gives the same
    clipped gradients as `hooks`, measured per model by `make bench` (bench/dp_overhead.py)."""
    return getattr(model, "grad_sample_mode", DEFAULT_GRAD_SAMPLE_MODE)


def build_model(
    task: str, name: str, in_channels: int = 1, num_classes: int = 2, image_size: int = 64
) -> nn.Module:
    """Build a registry model; a name that does not exist or does not fit the task is a ConfigError."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(sorted(REGISTRY))}")
    if spec.task != task:
        names = ", ".join(n for n, s in REGISTRY.items() if s.task == task) or "none yet"
        raise ConfigError(f"model '{name}' is for {spec.task}, not {task}: choose one of {names}")
    return spec.build(in_channels, num_classes, image_size)
