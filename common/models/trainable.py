"""Which of a model's layers train (run setting `trainable`): the rest are frozen.

A frozen parameter has `requires_grad = False` before Opacus wraps the model, so Opacus hooks only
the layers that train (`GradSampleModule` skips modules without trainable parameters) and its
optimizer clips and noises only their gradients: with good frozen features and a small private head,
the noise is spread over a few thousand numbers instead of millions (Tramèr & Boneh 2021). ε is
unchanged: it depends on the noise multiplier, the sample rate and the steps, not on the layers.
GroupNorm (never BatchNorm, see backbones.py) keeps no running statistics, so a frozen layer is
bit-identical after training.

Blocks, counted by `last-N`: the model's top-level child modules in registration order (every
registry model registers them in forward order), where a top-level `features` Sequential (DenseNet,
EfficientNet, the small CNN) or a ModuleList (the small U-Net) counts as its children; blocks without
parameters (activations, pooling) are not counted. `head` is `last-1`, the last block (ResNet's `fc`,
DenseNet's and EfficientNet's `classifier`, the CNN's and U-Nets' `head`); `all` freezes nothing.
For resnet18: conv1, bn1, layer1, layer2, layer3, layer4, fc, so `last-2` trains layer4 and fc.
"""

from __future__ import annotations

import re

from torch import nn

from common.errors import ConfigError

PATTERN = re.compile(r"^(all|head|last-[1-9][0-9]*)$")
ACCEPTED = "all | head | last-N (N >= 1: the last N blocks)"
EXPANDED = "features"  # a top-level Sequential of stages that counts as its children


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks in forward order, by their state_dict prefix (see the module docstring)."""
    found = []
    for name, child in model.named_children():
        if (name == EXPANDED and isinstance(child, nn.Sequential)) or isinstance(child, nn.ModuleList):
            found += [(f"{name}.{sub}", module) for sub, module in child.named_children()]
        else:
            found.append((name, child))
    return [(name, module) for name, module in found if any(True for _ in module.parameters())]


def count(trainable: str) -> int | None:
    """How many blocks from the end train: None for all."""
    if not PATTERN.match(trainable):
        raise ConfigError(f"setting 'trainable' = {trainable!r} is not valid: expected {ACCEPTED}")
    if trainable == "all":
        return None
    return 1 if trainable == "head" else int(trainable.removeprefix("last-"))


def freeze(model: nn.Module, trainable: str) -> list[str]:
    """Set `requires_grad` by `trainable`; return the names of the blocks that train."""
    n = count(trainable)
    found = blocks(model)
    if n is None:
        model.requires_grad_(True)
        return [name for name, _ in found]
    if n > len(found):
        raise ConfigError(f"trainable = {trainable!r}: this model has {len(found)} blocks "
                          f"({', '.join(name for name, _ in found)}): use all or a smaller N")
    model.requires_grad_(False)
    for _, module in found[-n:]:
        module.requires_grad_(True)
    return [name for name, _ in found[-n:]]
