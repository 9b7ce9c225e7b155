"""Scanner shift: each virtual site sees the same anatomy through its own scanner.

Real hospitals differ less in who they image than in how: gain and offset (calibration,
window), gamma (vendor post-processing), noise (dose, detector), blur (reconstruction
kernel) and resolution (matrix size, upsampled back for the model). `profiles` draws one
such scanner per site from the seed; `apply` renders a site's images through it. Pure:
images in [0, 1] in, images in [0, 1] out; the same seed gives the same pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True)
class ScannerProfile:
    site: int
    gain: float  # contrast scale around mid-grey
    offset: float  # brightness shift
    gamma: float  # > 1 darkens mid-tones, < 1 brightens them
    noise: float  # std of additive Gaussian noise
    blur: float  # Gaussian sigma in pixels (0: sharp)
    resolution: float  # acquired at this fraction of the model's size, then upsampled (1: full)

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


IDENTITY = ScannerProfile(0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0)


def profiles(num_sites: int, seed: int, strength: float = 1.0) -> list[ScannerProfile]:
    """One scanner per site; `strength` scales every deviation from the identity (0: none)."""
    rng = np.random.default_rng([seed, 0x5CA7])
    out = []
    for site in range(num_sites):
        d = rng.uniform(-1, 1, 6) * strength
        out.append(ScannerProfile(
            site=site,
            gain=float(1 + 0.25 * d[0]),
            offset=float(0.08 * d[1]),
            gamma=float(np.exp(0.35 * d[2])),
            noise=float(0.04 * abs(d[3])),
            blur=float(0.9 * abs(d[4])),
            resolution=float(1 - 0.45 * abs(d[5])),
        ))
    return out


def apply(images: np.ndarray, profile: ScannerProfile, seed: int) -> np.ndarray:
    """(N, H, W) in [0, 1] through `profile`; the noise follows (seed, site)."""
    x = np.asarray(images, dtype=np.float32)
    if len(x) == 0:
        return x
    size = x.shape[-2:]
    if profile.resolution < 0.999:
        low = (max(4, round(size[0] * profile.resolution)), max(4, round(size[1] * profile.resolution)))
        t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
        t = F.interpolate(t, size=low, mode="bilinear", antialias=True)
        x = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    if profile.blur > 0.05:
        x = gaussian_filter(x, sigma=(0, profile.blur, profile.blur))
    x = np.clip(x, 0.0, 1.0) ** profile.gamma
    x = (x - 0.5) * profile.gain + 0.5 + profile.offset
    if profile.noise > 0:
        x = x + np.random.default_rng([seed, profile.site, 0x9015E]).normal(0, profile.noise, x.shape)
    return np.clip(x, 0.0, 1.0).astype(np.float32)
