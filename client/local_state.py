"""What a site keeps between rounds of one run and never sends: FedBN's normalization layers
and SCAFFOLD's control variate, one file each per run in the site's state folder."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, _BatchNorm)


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's normalization layers (FedBN keeps exactly these local)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORMS):
            keys += [f"{name}.{k}" for k in module.state_dict()]
    return keys


def load(state_dir: str | Path, kind: str, run_id: str) -> dict[str, torch.Tensor] | None:
    path = file(state_dir, kind, run_id)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def save(state_dir: str | Path, kind: str, run_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
    path = file(state_dir, kind, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def file(state_dir: str | Path, kind: str, run_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    return Path(state_dir) / "local" / f"{kind}-{safe}.pt"
