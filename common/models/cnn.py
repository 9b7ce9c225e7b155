"""A small, fast CNN classifier that Opacus can train per-sample (GroupNorm, no BatchNorm).

Downsampling is by strided convolution rather than max-pooling (cheaper on CPU and
under Opacus's hooks), and the head sees both the average and the maximum of the
last feature map: a small lesion is one strong local response that an average
alone would dilute. The pooled vector is layer-normalised (no affine) before the
head: ReLU features are all positive and large, so under DP-SGD's per-sample
clipping every head gradient is clipped and the majority class drags the logits
towards itself (measured: a -3.5 logit offset after one round at one site, none
without clipping); centring and scaling the features roughly halves that pull.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]


def group_norm(channels: int) -> nn.Module:
    """GroupNorm needs no cross-sample statistics, so DP-SGD's per-sample gradients stay exact."""
    return nn.GroupNorm(num_groups=min(8, channels // 2), num_channels=channels)


def _block(c_in: int, c_out: int, stride: int, norm_layer: NormFactory) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        norm_layer(c_out),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """(width, stride) blocks, then [global average ; global max] -> linear."""

    # Opacus per-sample gradients by torch's ExpandedWeights: the same clipped gradients as
    # `hooks`, and the fastest mode for this model (bench/dp_overhead.py, `make bench`).
    grad_sample_mode = "ew"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        blocks: tuple[tuple[int, int], ...] = ((8, 1), (16, 2), (32, 2), (32, 2)),
        norm_layer: NormFactory = group_norm,
    ) -> None:
        super().__init__()
        layers, channels = [], in_channels
        for width, stride in blocks:
            layers.append(_block(channels, width, stride, norm_layer))
            channels = width
        self.features = nn.Sequential(*layers)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.max = nn.AdaptiveMaxPool2d(1)
        self.center = nn.LayerNorm(2 * channels, elementwise_affine=False)
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([self.avg(f), self.max(f)], dim=1).flatten(1)
        return self.head(self.center(pooled))
