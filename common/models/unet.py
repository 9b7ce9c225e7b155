"""A small U-Net for segmentation that Opacus can train per-sample.

GroupNorm instead of BatchNorm; downsampling by strided convolution; upsampling by
parameter-free bilinear interpolation followed by a convolution, because Opacus's
`ew` grad-sample mode cannot compute per-sample gradients of `conv_transpose2d`
(and `hooks` pays more for it than for a plain conv).
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.cnn import NormFactory, group_norm


def _double_conv(c_in: int, c_out: int, stride: int, norm_layer: NormFactory) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        norm_layer(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        norm_layer(c_out),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """`depth` down/up levels, widths `width * 2**level`; logits per pixel per class."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int = 2, width: int = 8,
        norm_layer: NormFactory = group_norm,
    ) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.stem = _double_conv(in_channels, widths[0], 1, norm_layer)
        self.down = nn.ModuleList(_double_conv(widths[i], widths[i + 1], 2, norm_layer) for i in range(depth))
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up = nn.ModuleList(
            _double_conv(widths[i + 1] + widths[i], widths[i], 1, norm_layer) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        y = skips.pop()
        for block in self.up:
            y = block(torch.cat([self.upsample(y), skips.pop()], dim=1))
        return self.head(y)
