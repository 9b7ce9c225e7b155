"""torchvision's ImageNet classifiers, made trainable per-sample by Opacus.

Three changes, none of which alters a state_dict key, so torchvision's own weights files load:
- BatchNorm -> GroupNorm through Opacus's `ModuleValidator.fix` (BatchNorm mixes the samples of a
  batch, so per-sample gradients would not be per-sample); the model then passes `validate(strict=True)`.
- No in-place operation on a layer's output: Opacus's backward hooks wrap every trainable layer's
  output, and torch forbids modifying such a view in place. Activations get `inplace=False`, and the
  two forwards that add or ReLU in place (ResNet's residual `out += identity`, DenseNet's final
  `F.relu(..., inplace=True)`) are subclassed with out-of-place ones.
- Small images: inputs under `MIN_INPUT` pixels are upsampled (bilinear, no parameters) before the
  stem. A ResNet divides the side by 32, so a 28-32 px image would reach the last stage as one pixel;
  at 64 px it is 2x2. Parameter-free, so the pretrained weights and Opacus's accounting are untouched.

Every backbone keeps its three input channels (the weights were learned on colour): a grey batch
(one channel) is repeated to three in `forward`, which equals a one-channel stem whose kernel is the
sum of the colour kernels. So a model built for grey data and one built for colour have the same
weights, and any caller can feed either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn
from torchvision.models import DenseNet, EfficientNet, ResNet, efficientnet_b0
from torchvision.models.resnet import BasicBlock, Bottleneck

from common.errors import ConfigError

MIN_INPUT = 64  # pixels: smaller inputs are upsampled to this before the stem
COLOUR = 3  # the channels every torchvision backbone was trained on


def fit_input(x: torch.Tensor, min_size: int = MIN_INPUT) -> torch.Tensor:
    """Grey repeated to colour; a side under `min_size` upsampled to it."""
    if x.shape[1] == 1:
        x = x.expand(-1, COLOUR, -1, -1)
    elif x.shape[1] != COLOUR:
        raise ValueError(f"a torchvision backbone takes 1 or 3 input channels, not {x.shape[1]}")
    if min(x.shape[-2:]) < min_size:
        x = F.interpolate(x, size=(max(min_size, x.shape[-2]), max(min_size, x.shape[-1])), mode="bilinear",
                          align_corners=False)
    return x


class _BasicBlock(BasicBlock):
    """torchvision's BasicBlock with the residual added out of place (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _Bottleneck(Bottleneck):
    """torchvision's Bottleneck with the residual added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DPResNet(ResNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(fit_input(x))


class DPDenseNet(DenseNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(fit_input(x)))  # torchvision's is in place
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


class DPEfficientNet(EfficientNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(fit_input(x))


def dp_compatible(model: nn.Module) -> nn.Module:
    """GroupNorm for BatchNorm (Opacus's fix), no in-place activations, checked strictly."""
    model = ModuleValidator.fix(model)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    ModuleValidator.validate(model, strict=True)
    return model


def _resnet(block: type, layers: list[int]) -> Callable[[int], nn.Module]:
    return lambda num_classes: DPResNet(block, layers, num_classes=num_classes)


def _densenet(num_classes: int) -> nn.Module:
    return DPDenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes)


def _efficientnet(num_classes: int) -> nn.Module:
    model = efficientnet_b0(weights=None, num_classes=num_classes)  # its block settings, from torchvision's builder
    model.__class__ = DPEfficientNet  # a subclass adding only `fit_input`: same modules, same keys
    return model


# name -> builder(num_classes); the name is torchvision's too, so its weights enums resolve by it.
BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": _resnet(_BasicBlock, [2, 2, 2, 2]),
    "resnet34": _resnet(_BasicBlock, [3, 4, 6, 3]),
    "resnet50": _resnet(_Bottleneck, [3, 4, 6, 3]),
    "densenet121": _densenet,
    "efficientnet_b0": _efficientnet,
}


def build(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A DP-compatible torchvision classifier; `in_channels` 1 (grey, repeated) or 3."""
    if in_channels not in (1, COLOUR):
        raise ConfigError(f"model '{name}' takes 1 (grey, repeated) or 3 input channels, not {in_channels}")
    return dp_compatible(BACKBONES[name](num_classes))
