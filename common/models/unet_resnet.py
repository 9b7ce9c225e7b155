"""A U-Net whose encoder is a torchvision ResNet (pretrainable on ImageNet), for segmentation under DP.

A ResNet's stem halves the image before its first feature, so its deepest skip is at half resolution;
one more decoder stage (`up0`) takes the full-resolution image itself as its skip, so thin structures
(membranes, vessels one or two pixels wide) are predicted at the image's own resolution, as the small
U-Net predicts them, not upsampled from half of it (ISBI membranes, 2 sites, no DP, 5 rounds: Dice
figures in the note of the commit that added it).

The encoder's modules keep torchvision's names (`conv1`, `bn1`, `layer1`..`layer4`), so a torchvision
ResNet weights file loads into it with only its classifier (`fc`) left out. The decoder is the small
U-Net's (common/models/unet.py): bilinear upsampling and GroupNorm convolutions, which Opacus's hooks
support. Inputs under `MIN_INPUT` pixels are upsampled for the encoder and the logits resized back, so
every mask keeps its own size. Modules are registered in forward order: `trainable = last-N`
(common/models/trainable.py) counts them from the head back through the decoder, then the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.models.backbones import BACKBONES, COLOUR, dp_compatible, fit_input
from common.models.cnn import group_norm
from common.models.unet import _double_conv

ENCODERS = {"unet-resnet18": "resnet18", "unet-resnet34": "resnet34"}  # BasicBlock ResNets: 64..512 channels
WIDTHS = (64, 64, 128, 256, 512)  # stem, layer1..layer4
DECODER = (256, 128, 64, 32, 16)  # after up4 .. up1, up0


class UNetResNet(nn.Module):
    pretrained_fresh = ("up4.", "up3.", "up2.", "up1.", "up0.", "head.")  # a ResNet's file has no decoder

    def __init__(self, encoder: str, num_classes: int) -> None:
        super().__init__()
        resnet = dp_compatible(BACKBONES[encoder](1000))
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        skips = (WIDTHS[3], WIDTHS[2], WIDTHS[1], WIDTHS[0], COLOUR)  # layer3, layer2, layer1, stem, image
        widths, c_in = [], WIDTHS[4]
        for skip, out in zip(skips, DECODER, strict=True):
            widths.append((c_in + skip, out))
            c_in = out
        self.up4, self.up3, self.up2, self.up1, self.up0 = (_double_conv(i, o, 1, group_norm) for i, o in widths)
        self.head = nn.Conv2d(DECODER[-1], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = fit_input(x)
        stem = self.relu(self.bn1(self.conv1(x)))  # /2
        f1 = self.layer1(self.maxpool(stem))  # /4
        f2 = self.layer2(f1)  # /8
        f3 = self.layer3(f2)  # /16
        y = self.layer4(f3)  # /32
        for block, skip in ((self.up4, f3), (self.up3, f2), (self.up2, f1), (self.up1, stem), (self.up0, x)):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        logits = self.head(y)  # /1 (of the encoder's input)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def pretrained_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A torchvision ResNet's weights as this model's: its classifier has no place here."""
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
