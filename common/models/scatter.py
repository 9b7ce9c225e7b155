"""Scattering-transform classifiers: fixed wavelet features, then a small trainable head.

At ~100 images a site, DP-SGD cannot learn features end to end: the noise drowns every
gradient of a feature extractor. A scattering transform (kymatio's Scattering2D: Morlet
wavelets, J = 2 scales, L = 8 angles, 81 channels per input channel at 1/4 the size) is a
fixed function of each image that needs no weights and no data, so DP pays only for the
head. With GroupNorm on the features and a linear or small CNN head it is the strongest
known DP baseline without pretrained weights (Tramèr & Boneh 2021, "Differentially Private
Learning Needs Better Features").

Privacy: the features are normalised per sample (GroupNorm over groups of channels of one
image), never with a mean/std pooled over a site's data outside the DP mechanism. The scattering
channels' scales differ by orders of magnitude (order 0 against order 2), which a linear head under
DP-SGD's clipping cannot undo; `calibrate` sets the GroupNorm's affine from a *public* pool's
per-channel mean and std (`fedhosp pretrain --model scatter-linear`), so every channel reaches the
head standardised at no privacy cost, and `trainable = head` keeps those statistics frozen
(BreastMNIST, no DP, a logistic regression on the features: test AUC 0.825 without, 0.887 with
pbcblood's statistics; bench/feature_ceiling.py). The
scattering runs inside `forward` (so the server's evaluation and `fedhosp predict` see the
same model) without gradient: it has no parameters, Opacus wraps only the head, and the
per-sample gradients are exactly those of the head on each image's own features.

Speed: on CPU the transform costs ~3.5 ms an image (one thread, 32 px), far more than the
head's DP step, and a site sees the same images every epoch. Its coefficients are memoised
per image, keyed by the image's bytes (`FeatureCache`): a pure function of one image, so a
cached coefficient is the coefficient, and DP's per-sample gradients are unchanged.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.models.cnn import SmallCNN

J = 2  # scales: the features are (image_size / 4) pixels across
L = 8  # angles per scale
SCATTER_CHANNELS = 1 + J * L + L * L * J * (J - 1) // 2  # order 0, 1, 2: 81 for J = 2, L = 8
GROUPS = 27  # GroupNorm groups over the scattering channels of each input channel (Tramèr & Boneh: 27)
CNN_BLOCKS = ((32, 1), (32, 2))  # scatter-cnn's head on the 8x8 (image-size 32) feature maps
CACHE_BYTES = 128 * 1024**2  # memoised coefficients per process: ~8,000 images at 28 px, 6,000 at 32


class FeatureCache:
    """Least-recently-used scattering coefficients by image content, bounded in bytes.

    A process-wide memo of a pure function (the same image always has the same
    coefficients), not state: losing it costs only time. The key covers the image's
    shape, dtype and every byte, so two different images never share an entry.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        h = hashlib.blake2b(f"{tuple(image.shape)}:{image.dtype}".encode(), digest_size=20)
        h.update(image.contiguous().numpy().tobytes())
        return h.digest()

    def features(self, x: torch.Tensor, transform) -> torch.Tensor:
        """`transform(x)` for a CPU batch, computing only the images not seen before."""
        keys = [self.key(image) for image in x]
        found: dict[int, torch.Tensor] = {}
        for i, k in enumerate(keys):
            if k in self.entries:
                self.entries.move_to_end(k)
                found[i] = self.entries[k]
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits, self.misses = self.hits + len(found), self.misses + len(missing)
        if missing:
            for i, f in zip(missing, transform(x[missing]), strict=True):
                found[i] = f.clone()
                self._put(keys[i], found[i])
        return torch.stack([found[i] for i in range(len(keys))])

    def _put(self, key: bytes, value: torch.Tensor) -> None:
        self.entries[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


CACHE = FeatureCache()


@cache
def _fixed_scattering() -> type[nn.Module]:
    """kymatio's Scattering2D with its filters kept out of the state_dict.

    The filters are a fixed function of (J, L, image size), built identically wherever the
    model is built: as persistent buffers they would travel to every site each round, be
    averaged, validated and checkpointed as if they were weights. Imported on first use:
    kymatio pulls in scipy.fft (~0.5 s), which a process building only the CNN never needs.
    """
    from kymatio.torch import Scattering2D

    class FixedScattering(Scattering2D):
        def register_single_filter(self, v, n):  # kymatio's hook for storing one filter as a buffer
            current = torch.from_numpy(v).unsqueeze(-1)
            self.register_buffer("tensor" + str(n), current, persistent=False)
            return current

    return FixedScattering


class ScatterFront(nn.Module):
    """(B, C, S, S) images -> (B, 81 C, S/4, S/4) scattering coefficients, GroupNorm'd per sample."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        if image_size % 2**J or image_size < 2**(J + 2):
            raise ConfigError(f"image-size = {image_size}: the scattering models need a multiple of {2**J} "
                              f"of at least {2**(J + 2)}")
        self.scattering = _fixed_scattering()(J=J, shape=(image_size, image_size), L=L)
        self.channels = SCATTER_CHANNELS * in_channels
        self.side = image_size // 2**J
        self.norm = nn.GroupNorm(GROUPS, self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # a fixed transform: nothing upstream of it to train
            s = self.transform(x) if x.device.type != "cpu" else CACHE.features(x, self.transform)
        return self.norm(s)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> nn.Module:
        """Standardise each channel by the mean and std these (public) images give it after the per-sample
        GroupNorm: its affine becomes weight 1/std, bias -mean/std. Returns the module it set."""
        total = squares = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for x in batches:
            s = F.group_norm(self.transform(x.to(self.norm.weight.device)), GROUPS, eps=self.norm.eps).double().cpu()
            total = total + s.sum((0, 2, 3))
            squares = squares + (s * s).sum((0, 2, 3))
            count += s.shape[0] * s.shape[2] * s.shape[3]
        if not count:
            raise ValueError("calibrate: no images")
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(self.norm.eps)
        self.norm.weight.copy_((1 / std).float())
        self.norm.bias.copy_((-mean / std).float())
        return self.norm

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The scattering coefficients, (B, C, 81, s, s) -> (B, 81 C, s, s)."""
        return self.scattering(x.contiguous()).flatten(1, 2)


class ScatterLinear(nn.Module):
    """Scattering -> GroupNorm -> one linear layer: DP trains (81 C (S/4)^2 + 1) x classes weights."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.front = ScatterFront(in_channels, image_size)
        self.head = nn.Linear(self.front.channels * self.front.side**2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.front(x).flatten(1))

    def calibrate(self, batches: Iterable[torch.Tensor]) -> nn.Module:
        return self.front.calibrate(batches)


class ScatterCNN(nn.Module):
    """Scattering -> GroupNorm -> the small CNN (two GroupNorm conv blocks, [avg ; max] pooling, linear)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.front = ScatterFront(in_channels, image_size)
        self.cnn = SmallCNN(self.front.channels, num_classes, blocks=CNN_BLOCKS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn(self.front(x))

    def calibrate(self, batches: Iterable[torch.Tensor]) -> nn.Module:
        return self.front.calibrate(batches)
